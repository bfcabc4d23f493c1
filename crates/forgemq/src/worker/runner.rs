//! One subscribed topic inside a worker: its in-flight deliveries, the completer that
//! settles their outcomes (everything that finished together in one script call), the
//! renewer that keeps their leases, and the hand-back of unfinished work at shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use rand::Rng;
use serde_json::Value;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::task::{JoinHandle, JoinSet};

use super::presence::Running;
use super::{BatchOptions, Settings, Subscription};
use crate::client::Client;
use crate::error::Result;
use crate::handler::{Backoff, HandlerError};
use crate::keys::TopicKeys;
use crate::message::{Envelope, LeaseState, Message, MessageId};
use crate::store::{Fetched, SettleCall, SettleOp};

/// A handler's future; `Ok` carries the members of the message's record for its result
/// (see [`crate::status::HandlerOutput`]).
pub(crate) type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<Option<String>, HandlerError>> + Send>>;
pub(crate) type ErasedHandler = Arc<dyn Fn(Message<Value>) -> HandlerFuture + Send + Sync>;
/// A batch handler with its data already decoded: one verdict per message, in order.
pub(crate) type BatchFuture = Pin<Box<dyn Future<Output = Vec<Verdict>> + Send>>;
pub(crate) type ErasedBatchHandler = Arc<dyn Fn(Vec<Message<Value>>) -> BatchFuture + Send + Sync>;

/// Most outcomes settled in one script call.
const MAX_SETTLE_BATCH: usize = 1000;

/// How a topic's messages are handled.
#[derive(Clone)]
pub(crate) enum HandlerKind {
    Single(ErasedHandler),
    Batch(ErasedBatchHandler, BatchOptions),
}

/// In-flight deliveries by (id, lease token): the same id can be in flight twice in one
/// worker (a recovered message fetched again while its stale run is still finishing), and
/// each delivery must be settled, renewed and handed back on its own.
type InFlightMap = HashMap<(String, Arc<str>), InFlight>;

/// One in-flight delivery as the worker tracks it.
struct InFlight {
    lease: Arc<LeaseState>,
    /// Which run of the message this is (1 for the first), once its envelope decoded.
    attempt: Arc<AtomicU32>,
    /// Set by the handler task right before it reports its outcome, so shutdown knows
    /// which deliveries to hand back.
    finished: Arc<AtomicBool>,
}

/// A fetched delivery, registered as in flight (its lease is renewed from now on).
pub(crate) struct Tracked {
    fetched: Fetched,
    token: Arc<str>,
    lease: Arc<LeaseState>,
    finished: Arc<AtomicBool>,
    attempt: Arc<AtomicU32>,
}

/// What to do with a delivery.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Done; with the record members of its result, if the handler returned one.
    Ack {
        result: Option<String>,
    },
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// Back after `after` without costing an attempt, the topic's bucket drained as long.
    RateLimited {
        after: Duration,
    },
    Dead {
        error: String,
    },
    /// Dead-letter the stored body unread (over the payload limit).
    DeadAsIs {
        error: String,
    },
}

impl Verdict {
    pub(crate) fn from_error(e: &HandlerError) -> Self {
        if e.is_fatal() {
            Verdict::Dead {
                error: e.to_string(),
            }
        } else if e.is_rate_limited() {
            Verdict::RateLimited {
                after: e.retry_after_delay().unwrap_or_default(),
            }
        } else {
            Verdict::Retry {
                error: e.to_string(),
                after: e.retry_after_delay(),
            }
        }
    }

    fn retry(error: String) -> Self {
        Verdict::Retry { error, after: None }
    }
}

struct Outcome {
    id: String,
    token: Arc<str>,
    /// Which run of the message this was (1 for the first; 0 when its envelope did not
    /// decode), for the logs.
    attempt: u32,
    /// The stored body as fetched; failures rewrite it (retry count, last error).
    body: Vec<u8>,
    verdict: Verdict,
}

/// The background tasks of one runner.
pub(crate) struct Services {
    completer: JoinHandle<()>,
    abandon: watch::Sender<bool>,
    renew_stop: watch::Sender<bool>,
    renewer: JoinHandle<()>,
}

pub(crate) struct Runner {
    pub(crate) client: Client,
    pub(crate) keys: TopicKeys,
    /// The same keys, shared with every delivery's lease (progress reports are fenced
    /// by them and the lease token).
    shared_keys: Arc<TopicKeys>,
    pub(crate) sub: Subscription,
    pub(crate) handler: HandlerKind,
    pub(crate) settings: Settings,
    inflight: Mutex<InFlightMap>,
    out_tx: Mutex<Option<mpsc::UnboundedSender<Vec<Outcome>>>>,
    /// Running average of how long a slot is taken per message (start to outcome), µs,
    /// as `f64` bits; 0 until the first handler finished. Read by the fetch loop's pace.
    handler_time: Arc<AtomicU64>,
    /// Handlers of this topic running in this worker (all its runners), for the registry.
    running: Arc<AtomicUsize>,
}

impl Runner {
    pub(crate) fn new(
        client: Client,
        keys: TopicKeys,
        sub: Subscription,
        handler: HandlerKind,
        settings: Settings,
    ) -> Arc<Self> {
        let running = settings.presence.counter(&keys.topic);
        Arc::new(Self {
            client,
            shared_keys: Arc::new(keys.clone()),
            keys,
            sub,
            handler,
            settings,
            inflight: Mutex::new(HashMap::new()),
            out_tx: Mutex::new(None),
            handler_time: Arc::new(AtomicU64::new(0)),
            running,
        })
    }

    /// Starts the completer and the renewer.
    pub(crate) fn spawn_services(self: &Arc<Self>) -> Services {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        *self.out_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(out_tx);
        let (abandon, abandon_rx) = watch::channel(false);
        let (renew_stop, renew_stop_rx) = watch::channel(false);
        Services {
            completer: tokio::spawn(Arc::clone(self).complete_loop(out_rx, abandon_rx)),
            abandon,
            renew_stop,
            renewer: tokio::spawn(Arc::clone(self).renew_loop(renew_stop_rx)),
        }
    }

    /// After every handler task has ended: hands unfinished deliveries back, lets the
    /// completer record every outcome (not forever when Redis is gone: those leases then
    /// expire and the recoverer takes over), and stops the renewer.
    pub(crate) async fn shut_down(&self, services: Services) {
        self.release_unfinished().await;
        self.out_tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let flush = tokio::time::timeout(self.settings.shutdown_timeout, services.completer);
        if flush.await.is_err() {
            let _ = services.abandon.send(true);
            tracing::warn!(topic = %self.keys.topic, "could not record every outcome before shutdown; those messages will be recovered after their lease");
        }
        // Nothing is left to renew; a renewal stuck on a dead link must not hold us up.
        let _ = services.renew_stop.send(true);
        services.renewer.abort();
        let _ = services.renewer.await;
    }

    fn send(&self, outcomes: Vec<Outcome>) {
        if let Some(tx) = self
            .out_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send(outcomes);
        }
    }

    fn sender(&self) -> Option<mpsc::UnboundedSender<Vec<Outcome>>> {
        self.out_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Registers a fetched delivery as in flight, so that its lease is renewed.
    pub(crate) fn track(&self, fetched: Fetched, token: &Arc<str>) -> Tracked {
        let lease = Arc::new(LeaseState::new(
            Arc::clone(&self.shared_keys),
            Arc::clone(token),
        ));
        let finished = Arc::new(AtomicBool::new(false));
        let attempt = Arc::new(AtomicU32::new(0));
        self.lock_inflight().insert(
            (fetched.id.clone(), Arc::clone(token)),
            InFlight {
                lease: Arc::clone(&lease),
                finished: Arc::clone(&finished),
                attempt: Arc::clone(&attempt),
            },
        );
        Tracked {
            fetched,
            token: Arc::clone(token),
            lease,
            finished,
            attempt,
        }
    }

    /// What a handler receives, or the verdict for a body that does not decode (running
    /// it cannot help, and it must not block the queue).
    fn message(&self, t: &Tracked) -> std::result::Result<Message<Value>, Verdict> {
        // The limit is the payload limit plus room for the failure history the envelope
        // carries: a message published under the limit gets all its runs.
        let limit = crate::message::stored_limit(self.client.max_payload());
        if t.fetched.body.len() > limit {
            // Planted behind the client's back: decoding or rewriting it could take
            // unbounded memory, so it is dead-lettered as it is.
            return Err(Verdict::DeadAsIs {
                error: format!(
                    "stored body of {} bytes is over the {limit}-byte limit for stored messages (the {}-byte payload limit plus room for a failure history)",
                    t.fetched.body.len(),
                    self.client.max_payload()
                ),
            });
        }
        let decoded = Envelope::decode(&t.fetched.body);
        if let Ok(envelope) = &decoded {
            t.attempt
                .store(envelope.retry.saturating_add(1), Ordering::Relaxed);
        }
        match decoded {
            Ok(envelope) => Ok(Message {
                id: MessageId::from_stored(t.fetched.id.clone()),
                topic: self.keys.topic.clone(),
                timestamp: envelope.timestamp(),
                retry: envelope.retry,
                max_retry: envelope.max_retry.unwrap_or(self.sub.max_retry),
                recoveries: envelope.recoveries,
                headers: envelope.headers,
                group: envelope.group,
                data: envelope.data,
                lease: Arc::clone(&t.lease),
                client: self.client.clone(),
            }),
            Err(e) => {
                tracing::warn!(worker = %self.worker(), topic = %self.keys.topic, id = %t.fetched.id, attempt = 0, error = %e, "undecodable message; dead-lettering it");
                Err(Verdict::Dead {
                    error: format!("envelope does not decode: {e}"),
                })
            }
        }
    }

    fn outcome(t: Tracked, verdict: Verdict) -> Outcome {
        Outcome {
            attempt: t.attempt.load(Ordering::Relaxed),
            id: t.fetched.id,
            token: t.token,
            body: t.fetched.body,
            verdict,
        }
    }

    /// This worker's id, for the logs.
    fn worker(&self) -> &str {
        &self.settings.presence.id
    }

    /// The running average of how long a slot is taken per message, µs (0: not known yet).
    pub(crate) fn handler_time_us(&self) -> f64 {
        f64::from_bits(self.handler_time.load(Ordering::Relaxed))
    }

    /// Starts one handler task for one delivery.
    pub(crate) fn start_single(
        self: &Arc<Self>,
        t: Tracked,
        permit: OwnedSemaphorePermit,
        tasks: &mut JoinSet<()>,
    ) {
        let HandlerKind::Single(handler) = &self.handler else {
            return;
        };
        if self.forget_if_lost(&t) {
            return;
        }
        let message = match self.message(&t) {
            Ok(m) => m,
            Err(verdict) => {
                t.finished.store(true, Ordering::SeqCst);
                self.send(vec![Self::outcome(t, verdict)]);
                return;
            }
        };
        let running = Running::new(&self.running, 1);
        let handler = Arc::clone(handler);
        let timeout = self.sub.timeout;
        let Some(out_tx) = self.sender() else { return };
        let handler_time = Arc::clone(&self.handler_time);
        let started = std::time::Instant::now();
        let runner = Arc::clone(self);
        #[cfg(feature = "otel")]
        let span = crate::otel::attempt_span(&message, self.sub.trace_parent);
        tasks.spawn(async move {
            let work = async move { handler(message).await };
            #[cfg(feature = "otel")]
            let work = tracing::Instrument::instrument(work, span);
            let verdict = guarded(work, timeout, |r| match r {
                Ok(result) => Verdict::Ack { result },
                Err(e) => Verdict::from_error(&e),
            })
            .await
            .unwrap_or_else(Verdict::retry);
            // Racing updates may drop a sample; an average does not mind.
            let took = started.elapsed().as_secs_f64() * 1e6;
            let before = f64::from_bits(handler_time.load(Ordering::Relaxed));
            let average = if before == 0.0 {
                took
            } else {
                0.9 * before + 0.1 * took
            };
            handler_time.store(average.to_bits(), Ordering::Relaxed);
            // A remote 429: the topic's bucket is drained before this slot frees, so that
            // the slot's next fetch already finds it empty.
            if let Verdict::RateLimited { after } = &verdict {
                let keys = &runner.keys;
                if let Err(e) = runner.client.store().drain_limit(keys, *after).await {
                    tracing::warn!(topic = %keys.topic, error = %e, "could not drain the rate limit");
                }
            }
            // No await between these two: an abort at shutdown either sees the outcome
            // sent or the delivery unfinished, never half of it.
            t.finished.store(true, Ordering::SeqCst);
            let _ = out_tx.send(vec![Self::outcome(t, verdict)]);
            drop(running);
            drop(permit);
        });
    }

    /// Starts one handler task for a whole batch; its outcomes are settled in one call.
    pub(crate) fn start_batch(
        self: &Arc<Self>,
        batch: Vec<Tracked>,
        permit: OwnedSemaphorePermit,
        tasks: &mut JoinSet<()>,
    ) {
        let HandlerKind::Batch(handler, _) = &self.handler else {
            return;
        };
        let mut undecodable = Vec::new();
        let mut messages = Vec::new();
        let mut held = Vec::new();
        for t in batch {
            if self.forget_if_lost(&t) {
                continue;
            }
            match self.message(&t) {
                Ok(m) => {
                    messages.push(m);
                    held.push(t);
                }
                Err(verdict) => {
                    t.finished.store(true, Ordering::SeqCst);
                    undecodable.push(Self::outcome(t, verdict));
                }
            }
        }
        if !undecodable.is_empty() {
            self.send(undecodable);
        }
        if held.is_empty() {
            return;
        }
        let running = Running::new(&self.running, held.len());
        let handler = Arc::clone(handler);
        let timeout = self.sub.timeout;
        let Some(out_tx) = self.sender() else { return };
        #[cfg(feature = "otel")]
        let span = crate::otel::batch_span(&self.keys.topic, &messages);
        tasks.spawn(async move {
            let work = async move { handler(messages).await };
            #[cfg(feature = "otel")]
            let work = tracing::Instrument::instrument(work, span);
            let n = held.len();
            let verdicts = match guarded(work, timeout, |v| v).await {
                Ok(v) => v,
                Err(error) => (0..n).map(|_| Verdict::retry(error.clone())).collect(),
            };
            for t in &held {
                t.finished.store(true, Ordering::SeqCst);
            }
            let outcomes = held
                .into_iter()
                .zip(
                    verdicts
                        .into_iter()
                        .map(Some)
                        .chain(std::iter::repeat_with(|| None)),
                )
                .map(|(t, v)| {
                    let v = v.unwrap_or_else(|| {
                        Verdict::retry(
                            "the batch handler returned no outcome for this message".into(),
                        )
                    });
                    Self::outcome(t, v)
                })
                .collect();
            let _ = out_tx.send(outcomes);
            drop(running);
            drop(permit);
        });
    }

    /// A delivery held ahead (or while its batch filled) whose lease was lost meanwhile (a
    /// long stall: it is back in pending or running elsewhere) must not start: it is
    /// forgotten here, and nothing is written for it.
    fn forget_if_lost(&self, t: &Tracked) -> bool {
        if !t.lease.is_lost() {
            return false;
        }
        self.lock_inflight()
            .remove(&(t.fetched.id.clone(), Arc::clone(&t.token)));
        tracing::warn!(worker = %self.worker(), topic = %self.keys.topic, id = %t.fetched.id, attempt = t.attempt.load(Ordering::Relaxed), "not starting a message held ahead: its lease was lost meanwhile");
        true
    }

    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, InFlightMap> {
        // A panic while holding this lock cannot leave the map inconsistent (single
        // inserts and removes), so a poisoned lock is still usable.
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands deliveries that were leased but never started back to the head of pending,
    /// in the order they were taken, without counting an attempt. If Redis does not take
    /// them now, they stay tracked and go back with the unfinished ones at shutdown.
    pub(crate) async fn release_held(&self, held: Vec<Tracked>) {
        if held.is_empty() {
            return;
        }
        // release.lua pushes each id to the head in turn: last taken first, so that the
        // first taken ends up first.
        let pairs: Vec<(String, String)> = held
            .iter()
            .rev()
            .map(|t| (t.token.to_string(), t.fetched.id.clone()))
            .collect();
        match self.client.store().release(&self.keys, &pairs).await {
            Ok(flags) => {
                let mut map = self.lock_inflight();
                for t in &held {
                    map.remove(&(t.fetched.id.clone(), Arc::clone(&t.token)));
                }
                let released = flags.iter().filter(|f| **f).count();
                tracing::debug!(topic = %self.keys.topic, released, "messages held ahead returned to pending");
            }
            Err(e) => {
                tracing::warn!(topic = %self.keys.topic, error = %e, "could not return the messages held ahead; retrying at shutdown");
            }
        }
    }

    /// Hands deliveries whose handler did not finish back to pending, without counting an
    /// attempt.
    async fn release_unfinished(&self) {
        let unfinished: Vec<(String, String)> = {
            let mut map = self.lock_inflight();
            let keys: Vec<(String, Arc<str>)> = map
                .iter()
                .filter(|(_, f)| !f.finished.load(Ordering::SeqCst))
                .map(|(k, _)| k.clone())
                .collect();
            for k in &keys {
                map.remove(k);
            }
            keys.into_iter()
                .map(|(id, token)| (token.to_string(), id))
                .collect()
        };
        if unfinished.is_empty() {
            return;
        }
        let mut delay = RetryDelay::default();
        // Bounded by the shutdown timeout: if Redis stays unreachable the leases expire and
        // the recoverer of another worker hands these messages back.
        let deadline = tokio::time::Instant::now()
            + self
                .settings
                .shutdown_timeout
                .min(Duration::from_secs(3600));
        for attempt in 1.. {
            match self.client.store().release(&self.keys, &unfinished).await {
                Ok(flags) => {
                    let released = flags.iter().filter(|f| **f).count();
                    tracing::info!(topic = %self.keys.topic, released, "unfinished messages returned to pending");
                    return;
                }
                Err(e) => {
                    tracing::warn!(topic = %self.keys.topic, attempt, error = %e, "could not return unfinished messages; retrying");
                    let pause = delay.next();
                    if tokio::time::Instant::now() + pause >= deadline {
                        break;
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
        tracing::warn!(topic = %self.keys.topic, "could not return unfinished messages; they come back when their lease expires");
    }

    /// Applies outcomes as they arrive; outcomes that arrive together go in one call.
    async fn complete_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Vec<Outcome>>,
        abandon: watch::Receiver<bool>,
    ) {
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.extend(first);
            while batch.len() < MAX_SETTLE_BATCH {
                match rx.try_recv() {
                    Ok(o) => batch.extend(o),
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
            .map(|o| {
                let (error, fatal, after) = match &o.verdict {
                    Verdict::Ack { result } => {
                        return SettleOp::Ack {
                            retry: o.attempt.saturating_sub(1),
                            result: result.clone(),
                        }
                    }
                    Verdict::DeadAsIs { error } => {
                        tracing::warn!(worker = %self.worker(), topic = %self.keys.topic, id = %o.id, attempt = o.attempt, error = %error, "dead-lettering a stored body unread");
                        return SettleOp::DeadAsIs {
                            error: error.clone(),
                        };
                    }
                    Verdict::RateLimited { after } => {
                        tracing::info!(worker = %self.worker(), topic = %self.keys.topic, id = %o.id, attempt = o.attempt, retry_after = ?after, "rate limited by the remote side; back without costing an attempt");
                        return SettleOp::Retry {
                            body: String::from_utf8_lossy(&o.body).into_owned(),
                            delay: *after,
                        };
                    }
                    Verdict::Retry { error, after } => (error, false, *after),
                    Verdict::Dead { error } => (error, true, None),
                };
                tracing::info!(worker = %self.worker(), topic = %self.keys.topic, id = %o.id, attempt = o.attempt, error = %error, "handler failed");
                failure_op(
                    &o.body,
                    &self.keys.topic,
                    &o.id,
                    error,
                    fatal,
                    after,
                    self.sub.max_retry,
                    &self.sub.backoff,
                )
            })
            .collect();
        let args: Vec<(&str, &[u8], &SettleOp)> = outcomes
            .iter()
            .zip(&ops)
            .map(|(o, op)| (&*o.token, o.id.as_bytes(), op))
            .collect();
        let store = self.client.store();
        // A remote 429: no worker takes from this topic for as long as it said.
        let hold = outcomes
            .iter()
            .filter_map(|o| match o.verdict {
                Verdict::RateLimited { after } => Some(after),
                _ => None,
            })
            .max();
        if let Some(hold) = hold {
            if let Err(e) = store.drain_limit(&self.keys, hold).await {
                tracing::warn!(topic = %self.keys.topic, error = %e, "could not drain the rate limit");
            }
        }
        let dedup = self.sub.dedup_ttl.unwrap_or_default();
        // The same call id on every attempt: what an attempt whose reply was lost applied
        // is answered as applied, not as a lost lease.
        let first = SettleCall::new();
        let again = first.again();
        let mut call = &first;
        let Some(flags) = retry_until_done(abandon, || {
            let sent = store.settle(&self.keys, &args, dedup, self.sub.results, call);
            call = &again;
            sent
        })
        .await
        else {
            return;
        };
        let mut map = self.lock_inflight();
        for ((o, op), ok) in outcomes.iter().zip(&ops).zip(flags) {
            map.remove(&(o.id.clone(), Arc::clone(&o.token)));
            if !ok {
                // Rule 7: a duplicate run is possible only here; say so (the settle script
                // counts it in `duplicate_runs`).
                tracing::warn!(worker = %self.worker(), topic = %self.keys.topic, id = %o.id, attempt = o.attempt, "outcome refused: the lease was taken by another worker (this run was a duplicate)");
            } else if let SettleOp::Dead { .. } = op {
                tracing::warn!(worker = %self.worker(), topic = %self.keys.topic, id = %o.id, attempt = o.attempt, "dead-lettered");
            }
        }
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
                .keys()
                .map(|(id, token)| (token.to_string(), id.clone()))
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
                    for ((token, id), ok) in held.iter().zip(flags) {
                        if !ok {
                            if let Some(f) = map.get(&(id.clone(), Arc::from(token.as_str()))) {
                                if !f.lease.is_lost() {
                                    tracing::warn!(worker = %self.worker(), topic = %self.keys.topic, id = %id, attempt = f.attempt.load(Ordering::Relaxed), "lease lost while handling; the handler's outcome will be refused");
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

/// Runs a handler future, catching a panic and enforcing the timeout; `Err` carries the
/// failure text for either.
async fn guarded<T, V>(
    fut: impl Future<Output = T>,
    timeout: Option<Duration>,
    map: impl FnOnce(T) -> V,
) -> std::result::Result<V, String> {
    let run = AssertUnwindSafe(fut).catch_unwind();
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, run).await {
            Ok(r) => r,
            Err(_) => return Err(format!("handler timed out after {t:?}")),
        },
        None => run.await,
    };
    match result {
        Ok(v) => Ok(map(v)),
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            Err(format!("handler panicked: {text}"))
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
pub(crate) struct RetryDelay {
    failures: u32,
}

impl RetryDelay {
    pub(crate) fn next(&mut self) -> Duration {
        let step = Duration::from_millis(100)
            .saturating_mul(1 << self.failures.min(6))
            .min(Duration::from_secs(5));
        self.failures += 1;
        step.mul_f64(rand::rng().random_range(0.5..1.0))
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A random lease token of 72 hex digits (288 random bits), so that no stale worker can
/// guess a live lease's.
///
/// The length is deliberate: Redis keeps a hash whose values are all 64 bytes or shorter
/// in a listpack (`hash-max-listpack-value`), a flat array it searches end to end on every
/// HSET, HMGET and HDEL, up to 512 entries (`hash-max-listpack-entries`). With a few
/// hundred deliveries in flight, the lease hash spent most of the fetch and settle scripts'
/// time in those scans; a value over 64 bytes makes Redis keep it as a real hash table
/// from the first entry. (Measured with forgemq-bench process-c50: 82k → 105–130k msg/s.)
pub(crate) fn random_token() -> String {
    let mut rng = rand::rng();
    let (a, b) = (rng.random::<u128>(), rng.random::<u128>());
    format!("{a:032x}{b:032x}{:08x}", rng.random::<u32>())
}

/// A lease token that names its holder: `{holder}/{random_token}`. Who runs an active
/// message is read from it ([`crate::registry::holder_of`]); only the random part keeps
/// stale workers out.
pub(crate) fn lease_token(holder: &str) -> String {
    format!("{holder}/{}", random_token())
}
