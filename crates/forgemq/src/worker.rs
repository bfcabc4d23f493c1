//! The worker runtime: subscriptions, the fetch loop, lease renewal, the recoverer and
//! graceful shutdown.
//!
//! Per subscription a worker runs one fetch loop (leases up to its free concurrency
//! slots in one script call, or blocks on the topic's wake list when there is nothing to
//! do), one handler task per message, one completer (applies outcomes, batching acks that
//! finish together into one script call) and one renewer (extends the leases of
//! everything in flight). One recoverer per worker returns expired leases of its topics.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::handler::{Backoff, HandlerError};
use crate::keys::{validate_topic, TopicKeys};
use crate::message::{Envelope, LeaseState, Message, MessageId};
use crate::store::SettleOp;

type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;
type ErasedHandler = Arc<dyn Fn(Message<Value>) -> HandlerFuture + Send + Sync>;

/// Most due delayed messages one fetch promotes: bounds the time one script call holds
/// Redis when a large batch falls due at once; the rest follow on the next fetch.
const PROMOTE_LIMIT: usize = 1000;

/// Most messages one fetch leases, whatever the concurrency.
const MAX_FETCH: usize = 1000;

/// Most outcomes applied in one ack call.
const MAX_ACK_BATCH: usize = 1000;

/// Most expired leases one recoverer call handles; it loops while there are more.
const RECOVER_LIMIT: usize = 1000;

/// How one topic is consumed: concurrency, retries, backoff, lease and timeout.
///
/// # Examples
/// ```
/// use forgemq::{Backoff, Subscription};
/// use std::time::Duration;
///
/// let sub = Subscription::new()
///     .concurrency(5)
///     .max_retry(5)
///     .backoff(Backoff::exponential(Duration::from_secs(2), Duration::from_secs(600)))
///     .lease(Duration::from_secs(30))
///     .timeout(Duration::from_secs(60));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Subscription {
    concurrency: usize,
    max_retry: u32,
    backoff: Backoff,
    lease: Duration,
    timeout: Option<Duration>,
    dedup_ttl: Option<Duration>,
}

/// How long [`Subscription::deduplicate`] remembers processed ids, as the seed's
/// `processed:<id>` marker: 24 hours.
pub const DEFAULT_DEDUP_TTL: Duration = Duration::from_secs(24 * 3600);

impl Default for Subscription {
    fn default() -> Self {
        Self {
            concurrency: 1,
            max_retry: 3,
            backoff: Backoff::default(),
            lease: Duration::from_secs(15),
            timeout: Some(Duration::from_secs(30 * 60)),
            dedup_ttl: None,
        }
    }
}

impl Subscription {
    /// One handler at a time, 3 retries, exponential backoff from 1 s, 15 s lease,
    /// 30 min handler timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handlers of this topic running at once in this worker (default 1, as the seed's
    /// `Subscribe`). Five subscribers sharing a topic = `concurrency(5)`.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Retries after the first run (default 3: at most 4 runs, then the dead-letter
    /// queue). A message published with its own `max_retry` keeps that.
    pub fn max_retry(mut self, retries: u32) -> Self {
        self.max_retry = retries;
        self
    }

    /// Wait between a failure and the next attempt.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long a delivery is owned without renewal (default 15 s). The worker renews it
    /// every third of that while the handler runs; if the worker dies, the message runs
    /// again after about one lease plus the recoverer interval.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Longest a handler may run before it counts as failed (default 30 min).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// No handler timeout: a handler may run as long as its worker keeps the lease.
    pub fn no_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    /// Remembers each processed id for `ttl` ([`DEFAULT_DEDUP_TTL`] is the seed's 24 h),
    /// recorded by the same script that acknowledges it. A redelivery of a remembered id
    /// (a publisher retrying with the same id, an ack whose reply was lost) is skipped
    /// instead of running its side effect again, and counted in
    /// [`QueueStats::deduplicated`](crate::QueueStats::deduplicated).
    pub fn deduplicate(mut self, ttl: Duration) -> Self {
        self.dedup_ttl = Some(ttl);
        self
    }

    fn validate(&self, topic: &str) -> Result<()> {
        if self.dedup_ttl.is_some_and(|t| t.as_millis() == 0) {
            return Err(Error::Config(format!(
                "deduplicate ttl of {topic:?} must be at least 1ms"
            )));
        }
        if self.concurrency == 0 {
            return Err(Error::Config(format!(
                "concurrency of {topic:?} must be at least 1"
            )));
        }
        if self.lease < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "lease of {topic:?} must be at least 100ms (it is renewed every third of it)"
            )));
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::Config(format!(
                "timeout of {topic:?} must be above zero"
            )));
        }
        Ok(())
    }
}

struct SubSpec {
    topic: String,
    sub: Subscription,
    handler: ErasedHandler,
}

/// Worker-wide settings.
#[derive(Debug, Clone)]
struct Settings {
    shutdown_timeout: Duration,
    recover_interval: Duration,
    max_recoveries: u32,
    idle_wait: Duration,
}

/// Builds a [`Worker`]; start with [`Worker::builder`].
pub struct WorkerBuilder {
    client: Client,
    subs: Vec<SubSpec>,
    settings: Settings,
    error: Option<Error>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field(
                "topics",
                &self.subs.iter().map(|s| &s.topic).collect::<Vec<_>>(),
            )
            .field("settings", &self.settings)
            .finish()
    }
}

impl WorkerBuilder {
    /// Handles `topic` with default [`Subscription`] settings.
    ///
    /// `T` is the type the message's `data` is decoded into (`serde_json::Value` takes
    /// anything). Data that does not decode into `T` is dead-lettered with the decode
    /// error, since running again would not change it.
    pub fn subscribe<T, F, Fut>(self, topic: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Message<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.subscribe_with(topic, Subscription::new(), handler)
    }

    /// Handles `topic` with the given settings.
    pub fn subscribe_with<T, F, Fut>(mut self, topic: &str, sub: Subscription, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Message<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        if let Err(e) = validate_topic(topic).and_then(|()| sub.validate(topic)) {
            self.error.get_or_insert(e);
            return self;
        }
        let handler = Arc::new(handler);
        let erased: ErasedHandler = Arc::new(move |msg: Message<Value>| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let typed = msg.try_map_data(serde_json::from_value::<T>).map_err(|e| {
                    HandlerError::fatal(format!(
                        "message data does not decode as {}: {e}",
                        std::any::type_name::<T>()
                    ))
                })?;
                handler(typed).await
            })
        });
        self.subs.push(SubSpec {
            topic: topic.to_owned(),
            sub,
            handler: erased,
        });
        self
    }

    /// How long in-flight handlers may run on after shutdown begins (default 10 s);
    /// unfinished ones then go straight back to pending.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.settings.shutdown_timeout = timeout;
        self
    }

    /// How often this worker returns expired leases of its topics to pending (default 5 s).
    pub fn recover_interval(mut self, interval: Duration) -> Self {
        self.settings.recover_interval = interval;
        self
    }

    /// Lease expiries a message survives before it is dead-lettered as poison
    /// (default 3): a message that kills every worker that takes it must not kill forever.
    pub fn max_recoveries(mut self, n: u32) -> Self {
        self.settings.max_recoveries = n;
        self
    }

    /// Longest an idle worker blocks before it looks again on its own (default 5 s).
    /// Work normally wakes it at once; this only bounds the cost of a lost wake-up.
    pub fn idle_wait(mut self, wait: Duration) -> Self {
        self.settings.idle_wait = wait;
        self
    }

    /// Checks the settings.
    pub fn build(self) -> Result<Worker> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.subs.is_empty() {
            return Err(Error::NoSubscriptions);
        }
        if self.settings.recover_interval.is_zero() || self.settings.idle_wait.is_zero() {
            return Err(Error::Config(
                "recover_interval and idle_wait must be above zero".into(),
            ));
        }
        Ok(Worker {
            client: self.client,
            subs: self.subs,
            settings: self.settings,
        })
    }
}

/// Consumes topics with handlers until told to stop.
///
/// # Examples
/// ```no_run
/// # async fn example() -> forgemq::Result<()> {
/// use forgemq::{Client, HandlerError, Message, Worker};
///
/// #[derive(serde::Deserialize)]
/// struct Welcome { user_id: String }
///
/// let mq = Client::connect("redis://127.0.0.1:6379").await?;
/// Worker::builder(mq)
///     .subscribe("user.welcome", |msg: Message<Welcome>| async move {
///         println!("welcome {}", msg.data.user_id);
///         Ok::<(), HandlerError>(())
///     })
///     .build()?
///     .run_until(async { tokio::signal::ctrl_c().await.ok(); })
///     .await
/// # }
/// ```
pub struct Worker {
    client: Client,
    subs: Vec<SubSpec>,
    settings: Settings,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field(
                "topics",
                &self.subs.iter().map(|s| &s.topic).collect::<Vec<_>>(),
            )
            .field("settings", &self.settings)
            .finish()
    }
}

impl Worker {
    /// Starts configuring a worker that uses `client`'s Redis and namespace.
    pub fn builder(client: Client) -> WorkerBuilder {
        WorkerBuilder {
            client,
            subs: Vec::new(),
            settings: Settings {
                shutdown_timeout: Duration::from_secs(10),
                recover_interval: Duration::from_secs(5),
                max_recoveries: 3,
                idle_wait: Duration::from_secs(5),
            },
            error: None,
        }
    }

    /// Runs until `shutdown` completes, then stops fetching, lets in-flight handlers finish
    /// within the shutdown timeout, returns the unfinished ones to pending at once, and
    /// returns. Redis errors never end it: it logs them and retries with backoff.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        match self.client.server_warnings().await {
            Ok(warnings) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the Redis configuration"),
        }

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut runners = JoinSet::new();
        let mut topics: Vec<TopicKeys> = Vec::new();
        for spec in self.subs {
            let keys = self.client.keys(&spec.topic)?;
            if !topics.iter().any(|k| k.topic == keys.topic) {
                topics.push(keys.clone());
            }
            let runner = Runner {
                client: self.client.clone(),
                keys,
                sub: spec.sub,
                handler: spec.handler,
                settings: self.settings.clone(),
                inflight: Mutex::new(HashMap::new()),
            };
            runners.spawn(Arc::new(runner).run(stop_rx.clone()));
        }
        let recoverer = tokio::spawn(recover_loop(
            self.client.clone(),
            topics,
            self.settings.clone(),
            stop_rx,
        ));

        shutdown.await;
        tracing::info!("shutting down: no new fetches, waiting for in-flight handlers");
        let _ = stop_tx.send(true);
        while let Some(done) = runners.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a subscription task failed");
            }
        }
        recoverer.abort();
        Ok(())
    }
}

/// Runs the recoverer for `topics` every interval until stopped.
async fn recover_loop(
    client: Client,
    topics: Vec<TopicKeys>,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        for keys in &topics {
            loop {
                match client
                    .store()
                    .recover(keys, settings.max_recoveries, RECOVER_LIMIT)
                    .await
                {
                    Ok((recovered, dead)) => {
                        if recovered > 0 || dead > 0 {
                            tracing::warn!(
                                topic = %keys.topic, recovered, dead,
                                "returned deliveries with expired leases (a worker crashed or stalled)"
                            );
                        }
                        if (recovered + dead) < RECOVER_LIMIT as u64 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(topic = %keys.topic, error = %e, "recoverer failed; will try again");
                        break;
                    }
                }
            }
        }
        // Jitter keeps the recoverers of many workers from firing in step.
        let jitter = rand::rng().random_range(0.9..1.1);
        let pause = settings.recover_interval.mul_f64(jitter);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One in-flight delivery as the worker tracks it.
struct InFlight {
    token: Arc<str>,
    lease: Arc<LeaseState>,
    /// Set by the handler task right before it reports its outcome, so shutdown knows
    /// which deliveries to hand back.
    finished: Arc<AtomicBool>,
}

/// What to do with a delivery.
enum Verdict {
    Ack,
    Retry {
        error: String,
        after: Option<Duration>,
    },
    Dead {
        error: String,
    },
}

struct Outcome {
    id: String,
    token: Arc<str>,
    /// The stored body as fetched; failures rewrite it (retry count, last error).
    body: Vec<u8>,
    verdict: Verdict,
}

struct Runner {
    client: Client,
    keys: TopicKeys,
    sub: Subscription,
    handler: ErasedHandler,
    settings: Settings,
    inflight: Mutex<HashMap<String, InFlight>>,
}

impl Runner {
    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (abandon_tx, abandon_rx) = watch::channel(false);
        let completer = tokio::spawn(Arc::clone(&self).complete_loop(out_rx, abandon_rx));
        let (renew_stop_tx, renew_stop_rx) = watch::channel(false);
        let renewer = tokio::spawn(Arc::clone(&self).renew_loop(renew_stop_rx));

        let mut tasks = JoinSet::new();
        Arc::clone(&self)
            .fetch_loop(&mut tasks, &out_tx, &mut stop)
            .await;

        // Shutdown: let handlers finish within the timeout.
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_timeout;
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {}
        if !tasks.is_empty() {
            tracing::warn!(
                topic = %self.keys.topic, unfinished = tasks.len(),
                "shutdown timeout reached; handing unfinished messages back to pending"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        self.release_unfinished().await;

        // Every outcome has been sent; let the completer flush them, but not forever
        // when Redis is gone (the leases then expire and the recoverer takes over).
        drop(out_tx);
        let flush = tokio::time::timeout(self.settings.shutdown_timeout, completer);
        if flush.await.is_err() {
            let _ = abandon_tx.send(true);
            tracing::warn!(topic = %self.keys.topic, "could not record every outcome before shutdown; those messages will be recovered after their lease");
        }
        let _ = renew_stop_tx.send(true);
        let _ = renewer.await;
    }

    async fn fetch_loop(
        self: Arc<Self>,
        tasks: &mut JoinSet<()>,
        out_tx: &mpsc::UnboundedSender<Outcome>,
        stop: &mut watch::Receiver<bool>,
    ) {
        let store = self.client.store();
        let slots = Arc::new(Semaphore::new(self.sub.concurrency));
        let mut blocking = store.blocking_conn();
        let mut backoff = RetryDelay::default();
        loop {
            if *stop.borrow() {
                return;
            }
            while tasks.try_join_next().is_some() {}
            let first = tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = stop.changed() => return,
            };
            let mut permits = vec![first];
            while permits.len() < MAX_FETCH {
                match Arc::clone(&slots).try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let token: Arc<str> = random_token().into();
            // Not cancelled by shutdown: a fetch that ran must hand its messages to us.
            let fetched = store
                .fetch(
                    &self.keys,
                    permits.len(),
                    self.sub.lease,
                    &token,
                    PROMOTE_LIMIT,
                    self.sub.dedup_ttl.is_some(),
                )
                .await;
            match fetched {
                Ok(f) if !f.messages.is_empty() => {
                    backoff.reset();
                    for (m, permit) in f.messages.into_iter().zip(permits) {
                        self.start(m.id, m.body, &token, permit, tasks, out_tx);
                    }
                }
                Ok(f) => {
                    drop(permits);
                    if f.paused {
                        tracing::debug!(topic = %self.keys.topic, "topic is paused; waiting for resume");
                    }
                    let mut wait = self.settings.idle_wait;
                    if let Some(due) = f.next_due_ms {
                        let until_due =
                            Duration::from_millis(due.saturating_sub(f.now_ms).max(1) as u64);
                        wait = wait.min(until_due);
                    }
                    tokio::select! {
                        woke = store.wait_wake(&mut blocking, &self.keys, wait) => {
                            if let Err(e) = woke {
                                tracing::warn!(topic = %self.keys.topic, error = %e, "waiting for work failed; retrying");
                                self.pause(backoff.next(), stop).await;
                            }
                        }
                        _ = stop.changed() => return,
                    }
                }
                Err(e) => {
                    drop(permits);
                    tracing::warn!(topic = %self.keys.topic, error = %e, "fetch failed; retrying");
                    self.pause(backoff.next(), stop).await;
                }
            }
        }
    }

    async fn pause(&self, delay: Duration, stop: &mut watch::Receiver<bool>) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => {}
        }
    }

    /// Starts handling one fetched message.
    fn start(
        self: &Arc<Self>,
        id: String,
        body: Vec<u8>,
        token: &Arc<str>,
        permit: OwnedSemaphorePermit,
        tasks: &mut JoinSet<()>,
        out_tx: &mpsc::UnboundedSender<Outcome>,
    ) {
        let lease = Arc::new(LeaseState::default());
        let finished = Arc::new(AtomicBool::new(false));
        self.lock_inflight().insert(
            id.clone(),
            InFlight {
                token: Arc::clone(token),
                lease: Arc::clone(&lease),
                finished: Arc::clone(&finished),
            },
        );
        let envelope = match Envelope::decode(&body) {
            Ok(env) => env,
            Err(e) => {
                // Undecodable: running it cannot help, and it must not block the queue.
                tracing::warn!(topic = %self.keys.topic, id = %id, error = %e, "undecodable message; dead-lettering it");
                finished.store(true, Ordering::SeqCst);
                let _ = out_tx.send(Outcome {
                    id,
                    token: Arc::clone(token),
                    body,
                    verdict: Verdict::Dead {
                        error: format!("envelope does not decode: {e}"),
                    },
                });
                return;
            }
        };
        let message = Message {
            id: MessageId::from_stored(id.clone()),
            topic: self.keys.topic.clone(),
            timestamp: envelope.timestamp(),
            retry: envelope.retry,
            max_retry: envelope.max_retry.unwrap_or(self.sub.max_retry),
            recoveries: envelope.recoveries,
            data: envelope.data,
            lease,
        };
        let handler = Arc::clone(&self.handler);
        let timeout = self.sub.timeout;
        let out_tx = out_tx.clone();
        let token = Arc::clone(token);
        tasks.spawn(async move {
            let verdict = run_handler(&handler, message, timeout).await;
            // No await between these two: an abort at shutdown either sees the outcome
            // sent or the delivery unfinished, never half of it.
            finished.store(true, Ordering::SeqCst);
            let _ = out_tx.send(Outcome {
                id,
                token,
                body,
                verdict,
            });
            drop(permit);
        });
    }

    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, HashMap<String, InFlight>> {
        // A panic while holding this lock cannot leave the map inconsistent (single
        // inserts and removes), so a poisoned lock is still usable.
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands deliveries whose handler did not finish back to pending, without counting an
    /// attempt.
    async fn release_unfinished(&self) {
        let unfinished: Vec<(String, String)> = {
            let mut map = self.lock_inflight();
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, f)| !f.finished.load(Ordering::SeqCst))
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| map.remove(&id).map(|f| (f.token.to_string(), id)))
                .collect()
        };
        if unfinished.is_empty() {
            return;
        }
        let mut delay = RetryDelay::default();
        for attempt in 1..=5 {
            match self.client.store().release(&self.keys, &unfinished).await {
                Ok(flags) => {
                    let released = flags.iter().filter(|f| **f).count();
                    tracing::info!(topic = %self.keys.topic, released, "unfinished messages returned to pending");
                    return;
                }
                Err(e) => {
                    tracing::warn!(topic = %self.keys.topic, attempt, error = %e, "could not return unfinished messages; retrying");
                    tokio::time::sleep(delay.next()).await;
                }
            }
        }
    }

    /// Applies outcomes as they arrive; outcomes that arrive together go in one call.
    async fn complete_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Outcome>,
        abandon: watch::Receiver<bool>,
    ) {
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < MAX_ACK_BATCH {
                match rx.try_recv() {
                    Ok(o) => batch.push(o),
                    Err(_) => break,
                }
            }
            self.apply(&batch, &abandon).await;
            batch.clear();
        }
    }

    async fn apply(&self, outcomes: &[Outcome], abandon: &watch::Receiver<bool>) {
        let ops: Vec<SettleOp> = outcomes
            .iter()
            .map(|o| match &o.verdict {
                Verdict::Ack => SettleOp::Ack,
                Verdict::Retry { error, after } => {
                    self.log_failure(&o.id, error);
                    failure_op(
                        &o.body,
                        &self.keys.topic,
                        &o.id,
                        error,
                        false,
                        *after,
                        self.sub.max_retry,
                        &self.sub.backoff,
                    )
                }
                Verdict::Dead { error } => {
                    self.log_failure(&o.id, error);
                    failure_op(
                        &o.body,
                        &self.keys.topic,
                        &o.id,
                        error,
                        true,
                        None,
                        self.sub.max_retry,
                        &self.sub.backoff,
                    )
                }
            })
            .collect();
        let args: Vec<(&str, &str, &SettleOp)> = outcomes
            .iter()
            .zip(&ops)
            .map(|(o, op)| (&*o.token, o.id.as_str(), op))
            .collect();
        let store = self.client.store();
        let dedup = self.sub.dedup_ttl.unwrap_or_default();
        let Some(flags) =
            retry_until_done(abandon, || store.settle(&self.keys, &args, dedup)).await
        else {
            return;
        };
        let mut map = self.lock_inflight();
        for ((o, op), ok) in outcomes.iter().zip(&ops).zip(flags) {
            map.remove(&o.id);
            if !ok {
                // Rule 7: a duplicate run is possible only here; say so.
                tracing::warn!(topic = %self.keys.topic, id = %o.id, "outcome refused: lease lost (the message was recovered and may run again, or was purged)");
            } else if let SettleOp::Dead { .. } = op {
                tracing::warn!(topic = %self.keys.topic, id = %o.id, "dead-lettered");
            }
        }
    }

    fn log_failure(&self, id: &str, error: &str) {
        tracing::info!(topic = %self.keys.topic, id = %id, error = %error, "handler failed");
    }

    /// Renews the leases of everything in flight every third of the lease.
    async fn renew_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = self.sub.lease / 3;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let held: Vec<(String, String)> = self
                .lock_inflight()
                .iter()
                .map(|(id, f)| (f.token.to_string(), id.clone()))
                .collect();
            if held.is_empty() {
                continue;
            }
            match self
                .client
                .store()
                .extend(&self.keys, self.sub.lease, &held)
                .await
            {
                Ok(flags) => {
                    let map = self.lock_inflight();
                    for ((_, id), ok) in held.iter().zip(flags) {
                        if !ok {
                            if let Some(f) = map.get(id) {
                                if !f.lease.is_lost() {
                                    tracing::warn!(topic = %self.keys.topic, id = %id, "lease lost while handling; the handler's outcome will be refused");
                                }
                                f.lease.mark_lost();
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(topic = %self.keys.topic, error = %e, "lease renewal failed; will try again")
                }
            }
        }
    }
}

/// Turns a failed attempt into its settle operation: the envelope records the failure,
/// then the message waits for a retry or, when fatal or out of retries, goes dead. A body
/// that does not decode is dead-lettered inside a stand-in envelope that keeps it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn failure_op(
    body: &[u8],
    topic: &str,
    id: &str,
    error: &str,
    fatal: bool,
    retry_after: Option<Duration>,
    default_max_retry: u32,
    backoff: &Backoff,
) -> SettleOp {
    match Envelope::decode(body) {
        Err(_) => SettleOp::Dead {
            body: crate::message::undecodable_envelope(id, topic, body, error),
        },
        Ok(mut env) => {
            env.record_failure(error);
            let max = env.max_retry.unwrap_or(default_max_retry);
            if fatal || env.retry > max {
                SettleOp::Dead { body: env.encode() }
            } else {
                SettleOp::Retry {
                    delay: retry_after.unwrap_or_else(|| backoff.delay(env.retry)),
                    body: env.encode(),
                }
            }
        }
    }
}

/// Runs a handler, turning its result, a panic or a timeout into a verdict.
async fn run_handler(
    handler: &ErasedHandler,
    message: Message<Value>,
    timeout: Option<Duration>,
) -> Verdict {
    let run = AssertUnwindSafe(handler(message)).catch_unwind();
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, run).await {
            Ok(r) => r,
            Err(_) => {
                return Verdict::Retry {
                    error: format!("handler timed out after {t:?}"),
                    after: None,
                }
            }
        },
        None => run.await,
    };
    match result {
        Ok(Ok(())) => Verdict::Ack,
        Ok(Err(e)) if e.is_fatal() => Verdict::Dead {
            error: e.to_string(),
        },
        Ok(Err(e)) => Verdict::Retry {
            after: e.retry_after_delay(),
            error: e.to_string(),
        },
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Verdict::Retry {
                error: format!("handler panicked: {text}"),
                after: None,
            }
        }
    }
}

/// Calls `op` until it succeeds, with backoff, unless told to give up.
async fn retry_until_done<T, F, Fut>(abandon: &watch::Receiver<bool>, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut delay = RetryDelay::default();
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => {
                if *abandon.borrow() {
                    return None;
                }
                tracing::warn!(error = %e, "recording an outcome failed; retrying");
                tokio::time::sleep(delay.next()).await;
            }
        }
    }
}

/// Delay between attempts after Redis errors: 100 ms doubling to 5 s, with jitter, so
/// that many workers reconnecting after a Redis restart do not arrive in step.
#[derive(Debug, Default)]
struct RetryDelay {
    failures: u32,
}

impl RetryDelay {
    fn next(&mut self) -> Duration {
        let step = Duration::from_millis(100)
            .saturating_mul(1 << self.failures.min(6))
            .min(Duration::from_secs(5));
        self.failures += 1;
        step.mul_f64(rand::rng().random_range(0.5..1.0))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A random lease token: 128 bits, so that no stale worker can guess a live lease's.
pub(crate) fn random_token() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}
