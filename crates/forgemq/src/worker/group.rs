//! Fetch loops. A group is one or more topics that share concurrency slots and one
//! blocking wait: a plain subscription is a group of one; `priority` groups several,
//! strictly ordered or weighted. A batch subscription collects batches instead.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::runner::{lease_token, HandlerKind, RetryDelay, Runner, Tracked};
use super::Priority;
use crate::store::{BlockingConn, FetchResult, Store};

/// Most messages one fetch leases, whatever the concurrency.
const MAX_FETCH: usize = 1000;

pub(crate) struct Group {
    pub(crate) runners: Vec<Arc<Runner>>,
    /// The runners of each subscribed topic, in the group's order: one for a plain topic,
    /// one per partition for a partitioned one.
    pub(crate) tiers: Vec<Vec<usize>>,
    pub(crate) priority: Priority,
    /// Handlers (or batches) running at once across the group's topics.
    pub(crate) concurrency: usize,
    /// Set before a stop that is a restart on a new layout, not a shutdown: running
    /// handlers are then waited for without the shutdown timeout (aborting them would make
    /// their side effects run twice for nothing).
    pub(crate) patient: Arc<std::sync::atomic::AtomicBool>,
}

impl Group {
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let services: Vec<_> = self.runners.iter().map(Runner::spawn_services).collect();
        let mut tasks = JoinSet::new();
        match &self.runners[0].handler {
            HandlerKind::Batch(_, options) => {
                let (size, wait) = (options.max_size, options.max_wait);
                self.batch_loop(size, wait, &mut tasks, &mut stop).await;
            }
            HandlerKind::Single(_) => self.fetch_loop(&mut tasks, &mut stop).await,
        }

        // Shutdown: let handlers finish within the timeout, then hand the rest back.
        let settings = &self.runners[0].settings;
        let started = Instant::now();
        loop {
            // Re-read each second: a shutdown during a patient restart ends the patience.
            let limit = if self.patient.load(std::sync::atomic::Ordering::SeqCst) {
                Duration::MAX
            } else {
                settings.shutdown_timeout
            };
            // A year stands in for "no limit" when the timeout is too large to add.
            let deadline = started
                .checked_add(limit)
                .unwrap_or(started + Duration::from_secs(365 * 24 * 3600));
            let step = deadline.min(Instant::now() + Duration::from_secs(1));
            match tokio::time::timeout_at(step, tasks.join_next()).await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) if Instant::now() >= deadline => break,
                Err(_) => {}
            }
        }
        if !tasks.is_empty() {
            tracing::warn!(
                unfinished = tasks.len(),
                "shutdown timeout reached; handing unfinished messages back to pending"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        for (runner, services) in self.runners.iter().zip(services) {
            runner.shut_down(services).await;
        }
    }

    fn store(&self) -> &Store {
        self.runners[0].client.store()
    }

    /// A waiter on every runner's wake-up key.
    fn waiter(&self) -> Waiter {
        Waiter::new(self.runners.iter().map(|r| r.keys.wake.clone()).collect())
    }

    fn idle_wait(&self) -> Duration {
        self.runners[0].settings.idle_wait
    }

    async fn fetch(&self, runner: &Runner, n: usize, token: &str) -> crate::Result<FetchResult> {
        self.store()
            .fetch(
                &runner.keys,
                n,
                runner.sub.lease,
                token,
                runner.sub.dedup_ttl.is_some(),
                true,
            )
            .await
    }

    /// Waits for a wake-up on any of the group's topics, for at most `wait`.
    ///
    /// The blocking wait on Redis always runs for the full idle wait: Redis times
    /// blocked commands out only on its own cron tick (every 100 ms at the default
    /// `hz 10`), so a delayed message due sooner is waited for here, on a local timer.
    /// When the timer ends the wait, the blocking call is cancelled on Redis (`CLIENT
    /// UNBLOCK`): left there while this worker goes back to work, it would take the next
    /// wake-up token (Redis serves the oldest waiter first), and idle workers would sleep
    /// through new work (DESIGN.md rule 8: fire close to the due time, not on a tick).
    async fn wait(
        &self,
        waiter: &mut Waiter,
        wait: Duration,
        backoff: &mut RetryDelay,
        stop: &mut watch::Receiver<bool>,
    ) {
        let idle = self.idle_wait();
        if waiter.waits.is_empty() {
            waiter.waits = self
                .store()
                .wait_groups(&waiter.keys)
                .into_iter()
                .map(SlotWait::new)
                .collect();
        }
        for w in &mut waiter.waits {
            if w.outstanding.is_none() {
                let mut conn = w
                    .conn
                    .take()
                    .unwrap_or_else(|| self.store().blocking_conn());
                w.client_id = conn.id_cell();
                w.node = conn.node_cell();
                let keys = w.keys.clone();
                let client = self.runners[0].client.clone();
                w.outstanding = Some(tokio::spawn(async move {
                    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                    let woke = client.store().wait_wake(&mut conn, &keys, idle).await;
                    (conn, woke)
                }));
            }
        }
        let due = async {
            if wait < idle {
                tokio::time::sleep(wait).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let any = futures::future::select_all(
            waiter
                .waits
                .iter_mut()
                .map(|w| w.outstanding.as_mut().expect("started above")),
        );
        tokio::select! {
            (done, index, _) = any => {
                let w = &mut waiter.waits[index];
                w.outstanding = None;
                match done {
                    Ok((conn, woke)) => {
                        w.conn = Some(conn);
                        if let Err(e) = woke {
                            tracing::warn!(error = %e, "waiting for work failed; retrying");
                            pause(backoff.next(), stop).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "the wait for work ended abnormally"),
                }
                // The other waits (other slots) must not stay registered while this worker
                // goes back to work.
                self.cancel_waits(waiter).await;
            }
            () = due => self.cancel_waits(waiter).await,
            _ = stop.changed() => {
                for w in &mut waiter.waits {
                    if let Some(task) = w.outstanding.take() {
                        task.abort();
                    }
                }
            }
        }
    }

    /// Ends the blocking waits that are still outstanding: `CLIENT UNBLOCK` makes Redis
    /// answer each at once, and its connection is kept for the next wait. If Redis does not
    /// confirm (the wait was not blocked yet, the ACL forbids `CLIENT UNBLOCK`, the link is
    /// gone), the wait is dropped with its connection, which Redis notices when the socket
    /// closes.
    async fn cancel_waits(&self, waiter: &mut Waiter) {
        for w in &mut waiter.waits {
            let Some(task) = w.outstanding.take() else {
                continue;
            };
            let id = w.client_id.load(std::sync::atomic::Ordering::SeqCst);
            let node = w.node.read().unwrap_or_else(|p| p.into_inner()).clone();
            let unblocked =
                id != 0 && matches!(self.store().unblock(node.as_ref(), id).await, Ok(true));
            if unblocked || task.is_finished() {
                let limit = self.runners[0]
                    .settings
                    .idle_wait
                    .min(Duration::from_secs(1));
                match tokio::time::timeout(limit, task).await {
                    Ok(Ok((conn, Ok(_)))) => w.conn = Some(conn),
                    Ok(_) => {}
                    Err(_) => {
                        tracing::debug!("an unblocked wait did not end; dropping its connection")
                    }
                }
            } else {
                task.abort();
            }
        }
    }

    /// Leases work for the group's free slots and runs it, one handler task per message.
    ///
    /// A fetch runs alongside the handlers, never in front of them: while it is on its
    /// way, the slots keep running what an earlier fetch brought. A single-topic group
    /// holds a few messages leased ahead of a free slot — as many as its handlers get
    /// through during one fetch round trip, measured as it runs (see [`Pace`]) — so fast
    /// handlers never wait for Redis, and slow ones get no messages ahead at all. A
    /// priority group holds none, so that the order of its topics is kept exactly.
    async fn fetch_loop(&self, tasks: &mut JoinSet<()>, stop: &mut watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut waiter = self.waiter();
        let mut backoff = RetryDelay::default();
        let mut order = Order::new(&self.priority, &self.tiers);
        let mut pace = Pace::new(self);
        // Leased and tracked (so renewed, and handed back at shutdown), not started yet.
        let mut buffer: VecDeque<(usize, Tracked)> = VecDeque::new();
        let mut fetching: Option<Pin<Box<dyn Future<Output = Round> + Send + '_>>> = None;
        // After a fetch that found less than it asked for, the queue is empty: no fetch
        // until the buffer has run dry and a wake-up (or the earliest delayed message's
        // due time, when one is known) has come.
        let mut dry: Option<Option<Instant>> = None;
        loop {
            while tasks.try_join_next().is_some() {}
            if *stop.borrow() {
                break;
            }
            while !buffer.is_empty() {
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    break;
                };
                if let Some((index, t)) = buffer.pop_front() {
                    self.runners[index].start_single(t, permit, tasks);
                }
            }
            if dry.is_none() && fetching.is_none() {
                let target = pace.target(self);
                if buffer.len() <= target / 2 {
                    let want = (slots.available_permits() + target)
                        .saturating_sub(buffer.len())
                        .min(MAX_FETCH);
                    if want > 0 {
                        fetching = Some(Box::pin(self.fetch_round(order.next(), want)));
                    }
                }
            }
            if let (Some(until), None, true) = (dry, &fetching, buffer.is_empty()) {
                // Idle: block until work is published or the next delayed message is due.
                // With no due time the wait is the full idle wait, so that it is the blocking
                // call that ends it (a local timer just short of it would fetch twice).
                let wait = until.map_or(self.idle_wait(), |u| {
                    u.saturating_duration_since(Instant::now())
                });
                if wait < SHORT_WAIT {
                    // Due in a moment (a rate-limited topic's next token, a delayed message):
                    // a blocking wait and its cancellation would cost two round trips.
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => {}
                    }
                } else {
                    self.wait(&mut waiter, wait, &mut backoff, stop).await;
                }
                dry = None;
                continue;
            }
            tokio::select! {
                round = async {
                    match fetching.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    fetching = None;
                    pace.observe(round.rtt);
                    if round.failed {
                        buffer.extend(round.got);
                        pause(backoff.next(), stop).await;
                        continue;
                    }
                    backoff.reset();
                    if round.got.len() < round.asked {
                        dry = Some(round.due_at);
                    }
                    buffer.extend(round.got);
                }
                // A slot came free: for the next buffered message, or (nothing buffered,
                // nothing on its way, every slot was busy) to look for work again.
                permit = Arc::clone(&slots).acquire_owned(), if !buffer.is_empty() || fetching.is_none() => {
                    if let (Ok(permit), Some((index, t))) = (permit, buffer.pop_front()) {
                        self.runners[index].start_single(t, permit, tasks);
                    }
                }
                _ = stop.changed() => {}
            }
        }
        // A fetch that ran must hand its messages over. Leased but never started, they go
        // back to the head of pending now, in the order they were taken, rather than after
        // the running handlers finish (whatever is not released here is handed back then).
        if let Some(f) = fetching {
            buffer.extend(f.await.got);
        }
        let mut held: Vec<Vec<Tracked>> = self.runners.iter().map(|_| Vec::new()).collect();
        for (index, t) in buffer {
            if let Some(list) = held.get_mut(index) {
                list.push(t);
            }
        }
        for (runner, held) in self.runners.iter().zip(held) {
            runner.release_held(held).await;
        }
    }

    /// One fetch round: asks the topics in `order` for up to `want` messages in all, and
    /// tracks what it gets.
    async fn fetch_round(&self, order: Vec<usize>, mut want: usize) -> Round {
        let started = Instant::now();
        let mut round = Round {
            got: Vec::new(),
            asked: want,
            due_at: None,
            failed: false,
            rtt: Duration::ZERO,
        };
        let (mut asked, mut failed) = (0, 0);
        for index in order {
            if want == 0 {
                break;
            }
            let runner = &self.runners[index];
            let token: Arc<str> = lease_token(&runner.settings.presence.id).into();
            asked += 1;
            match self.fetch(runner, want, &token).await {
                Ok(f) => {
                    let due = until_due(&f);
                    if due != Duration::MAX {
                        let at = Instant::now() + due;
                        round.due_at = Some(round.due_at.map_or(at, |d| d.min(at)));
                    }
                    want = want.saturating_sub(f.messages.len());
                    // The token the script stored: the given one and when it ran.
                    let token: Arc<str> = f.token.as_str().into();
                    round.got.extend(
                        f.messages
                            .into_iter()
                            .map(|m| (index, runner.track(m, &token))),
                    );
                }
                Err(e) => {
                    // One partition (or topic) failing (its master is failing over) must
                    // not stop the others: ask the next one.
                    tracing::warn!(topic = %runner.keys.topic, error = %e, "fetch failed; retrying");
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            if failed == asked {
                round.failed = true;
            } else {
                // Look again soon for what the failed ones hold, rather than only when
                // woken.
                let soon = Instant::now() + Duration::from_millis(500);
                round.due_at = Some(round.due_at.map_or(soon, |d| d.min(soon)));
            }
        }
        round.rtt = started.elapsed();
        round
    }

    /// Collects up to `max_size` messages, or what arrived within `max_wait` of the first,
    /// and hands them to the batch handler as one.
    async fn batch_loop(
        &self,
        max_size: usize,
        max_wait: Duration,
        tasks: &mut JoinSet<()>,
        stop: &mut watch::Receiver<bool>,
    ) {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut waiter = self.waiter();
        let mut owner_waiters: std::collections::HashMap<usize, Waiter> = Default::default();
        let mut backoff = RetryDelay::default();
        // The partitions of a partitioned topic take turns: each batch is filled from one
        // (it is settled in one script call, in that partition's slot), starting with the
        // one after the previous batch's.
        let n = self.runners.len();
        let mut turn = 0usize;
        loop {
            while tasks.try_join_next().is_some() {}
            let Some(mut permits) = acquire(&slots, 1, stop).await else {
                return;
            };
            let Some(permit) = permits.pop() else { return };
            let mut batch: Vec<Tracked> = Vec::new();
            let mut owner: Option<usize> = None;
            let mut first_at: Option<Instant> = None;
            let mut empty_in_a_row = 0usize;
            let mut due = Duration::MAX;
            while !*stop.borrow() && batch.len() < max_size {
                let index = owner.unwrap_or(turn % n);
                let runner = &self.runners[index];
                let token: Arc<str> = lease_token(&runner.settings.presence.id).into();
                match self.fetch(runner, max_size - batch.len(), &token).await {
                    Ok(f) => {
                        backoff.reset();
                        due = due.min(until_due(&f));
                        if f.messages.is_empty() && owner.is_none() {
                            // Nothing here: ask the next partition before waiting.
                            turn += 1;
                            empty_in_a_row += 1;
                            if empty_in_a_row < n {
                                continue;
                            }
                        }
                        empty_in_a_row = 0;
                        if !f.messages.is_empty() {
                            owner.get_or_insert(index);
                            first_at.get_or_insert_with(Instant::now);
                        }
                        // Tracked at once: their leases are renewed while the batch fills.
                        let token: Arc<str> = f.token.as_str().into();
                        batch.extend(f.messages.into_iter().map(|m| runner.track(m, &token)));
                        if batch.len() >= max_size {
                            break;
                        }
                        let mut wait = self.idle_wait().min(due);
                        due = Duration::MAX;
                        if let Some(t0) = first_at {
                            let left = max_wait.saturating_sub(t0.elapsed());
                            if left.is_zero() {
                                break;
                            }
                            wait = wait.min(left);
                        }
                        // While a batch fills from one partition, wait on that partition
                        // alone: a wake-up for another one belongs to an idle worker.
                        match owner {
                            Some(o) if n > 1 => {
                                let w = owner_waiters
                                    .entry(o)
                                    .or_insert_with(|| Waiter::new(vec![runner.keys.wake.clone()]));
                                self.wait(w, wait, &mut backoff, stop).await;
                            }
                            _ => self.wait(&mut waiter, wait, &mut backoff, stop).await,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(topic = %runner.keys.topic, error = %e, "fetch failed; retrying");
                        if owner.is_none() {
                            // Another partition may be reachable: try it next.
                            turn += 1;
                        }
                        pause(backoff.next(), stop).await;
                    }
                }
            }
            if *stop.borrow() {
                // A batch that never reached its handler is handed back at shutdown.
                return;
            }
            if let Some(index) = owner {
                turn = index + 1;
                self.runners[index].start_batch(batch, permit, tasks);
            }
        }
    }
}

/// The blocking waits of a group, one per set of wake-up keys that can be waited on
/// together (all of them on one server; one slot each on a cluster), each possibly still
/// outstanding from an earlier [`Group::wait`].
struct Waiter {
    /// The wake-up keys it waits on.
    keys: Vec<String>,
    waits: Vec<SlotWait>,
}

impl Waiter {
    fn new(keys: Vec<String>) -> Self {
        Self {
            keys,
            waits: Vec::new(),
        }
    }
}

/// One blocking wait and its connection while none is outstanding.
struct SlotWait {
    keys: Vec<String>,
    conn: Option<BlockingConn>,
    outstanding: Option<tokio::task::JoinHandle<(BlockingConn, crate::Result<bool>)>>,
    /// Redis's client id of the connection the outstanding wait blocks on.
    client_id: Arc<std::sync::atomic::AtomicU64>,
    /// The node that connection goes to.
    node: Arc<std::sync::RwLock<Option<crate::conn::Node>>>,
}

impl SlotWait {
    fn new(keys: Vec<String>) -> Self {
        Self {
            keys,
            conn: None,
            outstanding: None,
            client_id: Arc::default(),
            node: Arc::default(),
        }
    }
}

impl Drop for SlotWait {
    fn drop(&mut self) {
        if let Some(task) = self.outstanding.take() {
            task.abort();
        }
    }
}

/// Waits for one free slot, then takes up to `max` free slots without waiting.
async fn acquire(
    slots: &Arc<Semaphore>,
    max: usize,
    stop: &mut watch::Receiver<bool>,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        permit = Arc::clone(slots).acquire_owned() => permit.ok()?,
        _ = stop.changed() => return None,
    };
    let mut permits = vec![first];
    while permits.len() < max {
        match Arc::clone(slots).try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
    Some(permits)
}

/// How long until the earliest delayed message is due, from a fetch that leased less
/// than it asked for (only those report it); `Duration::MAX` when none is known.
fn until_due(f: &FetchResult) -> Duration {
    match f.next_due_ms {
        Some(due) if !f.paused => Duration::from_millis(due.saturating_sub(f.now_ms).max(1) as u64),
        _ => Duration::MAX,
    }
}

/// An idle wait shorter than this is slept locally instead of blocking on Redis.
const SHORT_WAIT: Duration = Duration::from_millis(20);

/// What one [`Group::fetch_round`] brought.
struct Round {
    got: Vec<(usize, Tracked)>,
    asked: usize,
    /// When the earliest delayed message of the topics asked is due.
    due_at: Option<Instant>,
    failed: bool,
    rtt: Duration,
}

/// How many messages a single-topic group holds leased ahead of its free slots: twice
/// what its handlers finish during one fetch round trip (a fetch starts when the buffer
/// is half empty), from running averages of both, at most the subscription's `prefetch`.
/// Handlers slower than a round trip get next to nothing ahead, so a slow topic's
/// messages stay in Redis for other workers to take.
struct Pace {
    rtt_us: f64,
    cap: usize,
}

impl Pace {
    fn new(group: &Group) -> Self {
        // One topic (plain, or the partitions of one): no order between its runners to
        // keep, so it may hold messages ahead.
        let cap = match group.tiers.as_slice() {
            [_] => group.runners[0].sub.prefetch_limit(),
            _ => 0,
        };
        Self { rtt_us: 0.0, cap }
    }

    fn observe(&mut self, rtt: Duration) {
        let us = rtt.as_secs_f64() * 1e6;
        self.rtt_us = if self.rtt_us == 0.0 {
            us
        } else {
            0.8 * self.rtt_us + 0.2 * us
        };
    }

    fn target(&self, group: &Group) -> usize {
        if self.cap == 0 || self.rtt_us == 0.0 {
            return 0;
        }
        // The partitions of a topic run the same handler: their average.
        let known: Vec<f64> = group
            .runners
            .iter()
            .map(|r| r.handler_time_us())
            .filter(|t| *t > 0.0)
            .collect();
        if known.is_empty() {
            return 0;
        }
        let handler_us = known.iter().sum::<f64>() / known.len() as f64;
        let per_round_trip = group.concurrency as f64 * self.rtt_us / handler_us;
        // Rounded down: handlers that take longer than a round trip hold nothing ahead.
        ((2.0 * per_round_trip).floor() as usize).min(self.cap)
    }
}

async fn pause(delay: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        _ = stop.changed() => {}
    }
}

/// The order in which a group's runners are asked for work on each fetch: topics in the
/// group's priority order (strict, or the first one by weight), and within a partitioned
/// topic its partitions in turn, starting one further each time, so that none is starved.
struct Order {
    tiers: Vec<Vec<usize>>,
    /// Strict: always 0, 1, 2, … Weighted: smooth weighted round-robin (as nginx) picks
    /// the first; the others follow by weight, so an empty topic never idles a slot.
    weights: Option<Vec<i64>>,
    current: Vec<i64>,
    by_weight: Vec<usize>,
    /// Where each tier's rotation starts next.
    start: Vec<usize>,
}

impl Order {
    fn new(priority: &Priority, tiers: &[Vec<usize>]) -> Self {
        let n = tiers.len();
        let weights = match priority {
            Priority::Strict => None,
            Priority::Weighted(w) => Some(w.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()),
        };
        let mut by_weight: Vec<usize> = (0..n).collect();
        if let Some(w) = &weights {
            by_weight.sort_by_key(|&i| std::cmp::Reverse(w[i]));
        }
        Self {
            tiers: tiers.to_vec(),
            weights,
            current: vec![0; n],
            by_weight,
            start: vec![0; n],
        }
    }

    /// The runners to ask, in order.
    fn next(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for tier in self.tier_order() {
            let members = &self.tiers[tier];
            let start = self.start[tier] % members.len().max(1);
            self.start[tier] = start + 1;
            out.extend(members[start..].iter().chain(&members[..start]).copied());
        }
        out
    }

    fn tier_order(&mut self) -> Vec<usize> {
        let Some(weights) = &self.weights else {
            return (0..self.current.len()).collect();
        };
        let total: i64 = weights.iter().sum();
        for (c, w) in self.current.iter_mut().zip(weights) {
            *c += w;
        }
        let first = (0..self.current.len())
            .max_by_key(|&i| (self.current[i], std::cmp::Reverse(i)))
            .unwrap_or(0);
        self.current[first] -= total;
        let mut order = vec![first];
        order.extend(self.by_weight.iter().copied().filter(|&i| i != first));
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_order_picks_first_in_proportion() {
        let mut order = Order::new(&Priority::Weighted(vec![3, 1]), &[vec![0], vec![1]]);
        let firsts: Vec<usize> = (0..8).map(|_| order.next()[0]).collect();
        assert_eq!(firsts.iter().filter(|&&i| i == 0).count(), 6);
        assert!(
            order.next().len() == 2,
            "every topic is asked, the chosen one first"
        );
        let mut strict = Order::new(&Priority::Strict, &[vec![0], vec![1], vec![2]]);
        assert_eq!(strict.next(), vec![0, 1, 2]);
        // Partitions of one topic take turns at being asked first.
        let mut parts = Order::new(&Priority::Strict, &[vec![0, 1, 2], vec![3]]);
        assert_eq!(parts.next(), vec![0, 1, 2, 3]);
        assert_eq!(parts.next(), vec![1, 2, 0, 3]);
        assert_eq!(parts.next(), vec![2, 0, 1, 3]);
    }
}
