//! The worker runtime: subscriptions, fetch loops, lease renewal, the recoverer and
//! graceful shutdown.
//!
//! Per group of topics (one topic, or a `priority` group) a worker runs one fetch loop
//! that leases up to its free concurrency slots in one script call per topic, or blocks
//! on the topics' wake lists when there is nothing to do. Each message runs in its own
//! handler task (a batch subscription: each batch). Per topic, a completer settles the
//! outcomes that finished together in one script call, and a renewer extends the leases
//! of everything in flight. One recoverer per worker returns expired leases of its topics.

mod group;
mod presence;
mod runner;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::handler::{Backoff, HandlerError};
use crate::keys::{validate_topic, TopicKeys};
use crate::message::Message;
use crate::status::{HandlerOutput, Retention};
use group::Group;
use presence::Presence;
pub(crate) use runner::{failure_op, lease_token, random_token};
use runner::{ErasedBatchHandler, ErasedHandler, HandlerKind, RetryDelay, Runner, Verdict};

/// Most messages held leased ahead of free slots: one fetch's worth.
const MAX_PREFETCH: usize = 1000;

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
    pub(crate) concurrency: usize,
    pub(crate) max_retry: u32,
    pub(crate) backoff: Backoff,
    pub(crate) lease: Duration,
    pub(crate) timeout: Option<Duration>,
    pub(crate) dedup_ttl: Option<Duration>,
    pub(crate) prefetch: Option<usize>,
    pub(crate) results: Option<Retention>,
    /// With the `otel` feature: run attempts as children of the producer's span.
    #[cfg(feature = "otel")]
    pub(crate) trace_parent: bool,
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
            prefetch: None,
            results: None,
            #[cfg(feature = "otel")]
            trace_parent: false,
        }
    }
}

impl Subscription {
    /// With the `otel` feature: run each attempt's CONSUMER span as a child of the span
    /// that published the message (one trace from request to handler) instead of in a trace
    /// of its own with a link to it (the default, as the OpenTelemetry messaging
    /// conventions recommend: a message may run long after, or many times).
    #[cfg(feature = "otel")]
    pub fn trace_parent(mut self, parent: bool) -> Self {
        self.trace_parent = parent;
        self
    }

    /// One handler at a time, 3 retries, exponential backoff from 1 s, 15 s lease,
    /// 30 min handler timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records of finished messages this topic keeps (results, progress, for
    /// [`Client::message_status`](crate::Client::message_status)): the last `max_len`, for
    /// at most `max_age`. Default: the client's
    /// ([`ClientBuilder::result_retention`](crate::ClientBuilder::result_retention), itself
    /// 1,000 for an hour). `max_len` 0 keeps none, which saves Redis a little work per
    /// message on a topic nobody asks about.
    pub fn result_retention(mut self, max_len: u64, max_age: Duration) -> Self {
        self.results = Some(Retention { max_len, max_age });
        self
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

    /// Most messages this worker holds leased ahead of a free slot (default: four times
    /// the concurrency, at least 64, at most 1,000; `0` turns it off).
    ///
    /// The worker holds only as many as its handlers get through during one fetch round
    /// trip, measured as it runs, so fast handlers never wait for Redis while handlers
    /// slower than a round trip get next to none: their messages stay in Redis for other
    /// workers. Held messages are leased and renewed like running ones; at shutdown they
    /// go straight back to the head of pending, in order, and if the worker dies they run
    /// again after their lease, as running ones do (each counting a recovery, as running
    /// ones do: a process that keeps crashing adds a recovery to everything it holds).
    /// Priority groups never hold any (it would bend the order).
    pub fn prefetch(mut self, max: usize) -> Self {
        self.prefetch = Some(max);
        self
    }

    /// The prefetch limit in effect.
    pub(crate) fn prefetch_limit(&self) -> usize {
        self.prefetch
            .unwrap_or_else(|| self.concurrency.saturating_mul(4).max(64))
            .min(MAX_PREFETCH)
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

/// How a batch subscription collects its batches.
///
/// # Examples
/// ```
/// use forgemq::{BatchOptions, Subscription};
/// use std::time::Duration;
///
/// let options = BatchOptions::new()
///     .max_size(100)
///     .max_wait(Duration::from_secs(1))
///     .subscription(Subscription::new().max_retry(5));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BatchOptions {
    pub(crate) max_size: usize,
    pub(crate) max_wait: Duration,
    pub(crate) subscription: Subscription,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_size: 100,
            max_wait: Duration::from_secs(1),
            subscription: Subscription::default(),
        }
    }
}

impl BatchOptions {
    /// Batches of up to 100, a partial batch handed over 1 s after its first message (the
    /// seed's batch consumer), default [`Subscription`] settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Largest batch (at most 1,000).
    pub fn max_size(mut self, n: usize) -> Self {
        self.max_size = n;
        self
    }

    /// Longest a partial batch waits for more after its first message arrived.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// Retries, backoff, lease and timeout (the timeout is for the whole batch;
    /// concurrency is the number of batches handled at once).
    pub fn subscription(mut self, sub: Subscription) -> Self {
        self.subscription = sub;
        self
    }
}

/// The outcome a batch handler returns for one message of its batch.
#[derive(Debug)]
#[non_exhaustive]
pub enum BatchOutcome {
    /// Handled: acknowledge it.
    Done,
    /// Handled, with a result kept in the message's record
    /// ([`Client::message_status`](crate::Client::message_status)).
    DoneWith(Value),
    /// Failed: retried with backoff, dead-lettered at once if the error is fatal, after
    /// `retry_after` if it says so.
    Failed(HandlerError),
}

impl BatchOutcome {
    /// Handled.
    pub fn done() -> Self {
        BatchOutcome::Done
    }

    /// Handled, with a result to keep (any `Serialize` value; one that does not
    /// serialize is kept as `null`).
    pub fn done_with(result: impl serde::Serialize) -> Self {
        BatchOutcome::DoneWith(serde_json::to_value(result).unwrap_or(Value::Null))
    }

    /// Failed; try again after the backoff.
    pub fn retry(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BatchOutcome::Failed(HandlerError::retry(error))
    }

    /// Failed for good; dead-letter it.
    pub fn dead(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BatchOutcome::Failed(HandlerError::fatal(error))
    }
}

/// How a worker shares its slots among a group of topics (the seed's priority queues).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Priority {
    /// Always take from the first topic that has work: `notification.urgent` drains
    /// before any `notification.normal` runs.
    Strict,
    /// Take from the topics in proportion to these weights (one per topic, in order) while
    /// they all have work; a topic without work never holds the others back.
    Weighted(Vec<u32>),
}

struct SubSpec {
    topic: String,
    sub: Subscription,
    handler: HandlerKind,
}

/// Worker-wide settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) shutdown_timeout: Duration,
    pub(crate) recover_interval: Duration,
    pub(crate) max_recoveries: u32,
    pub(crate) idle_wait: Duration,
    pub(crate) require_safe_redis: bool,
    pub(crate) heartbeat_interval: Duration,
    /// Whether this worker runs a scheduler (see [`WorkerBuilder::scheduler`]).
    pub(crate) scheduler: bool,
    /// This worker in the registry (set by [`WorkerBuilder::build`]).
    pub(crate) presence: Arc<Presence>,
}

/// Builds a [`Worker`]; start with [`Worker::builder`].
pub struct WorkerBuilder {
    client: Client,
    name: Option<String>,
    subs: Vec<SubSpec>,
    groups: Vec<(Vec<String>, Priority)>,
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
            .field("groups", &self.groups)
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
    ///
    /// The handler returns `Ok(())` when done, or a result to keep in the message's record
    /// (`Ok(Done(value))`; see [`Done`](crate::Done) and
    /// [`Client::message_status`](crate::Client::message_status)).
    pub fn subscribe<T, F, Fut, R>(self, topic: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Message<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
        R: HandlerOutput,
    {
        self.subscribe_with(topic, Subscription::new(), handler)
    }

    /// Handles `topic` with the given settings.
    pub fn subscribe_with<T, F, Fut, R>(self, topic: &str, sub: Subscription, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Message<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
        R: HandlerOutput,
    {
        let handler = Arc::new(handler);
        let erased: ErasedHandler = Arc::new(move |msg: Message<Value>| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let typed = msg
                    .try_map_data(typed_data::<T>)
                    .map_err(|e| HandlerError::fatal(decode_error::<T>(&e)))?;
                handler(typed).await.map(HandlerOutput::record_members)
            })
        });
        self.add(topic, sub, HandlerKind::Single(erased))
    }

    /// Handles `topic` in batches: the handler gets up to `max_size` messages at once (a
    /// partial batch no later than `max_wait` after its first message arrived) and returns
    /// one [`BatchOutcome`] per message, in order. All outcomes of a batch are applied by
    /// one script call. `Err` from the handler, a panic or a timeout fails the whole batch.
    ///
    /// # Examples
    /// ```no_run
    /// # fn example(mq: forgemq::Client) -> forgemq::Result<()> {
    /// use forgemq::{BatchOptions, BatchOutcome, HandlerError, Message, Worker};
    /// use serde_json::Value;
    ///
    /// let worker = Worker::builder(mq)
    ///     .subscribe_batch("email.send", BatchOptions::new().max_size(100), |batch: Vec<Message<Value>>| async move {
    ///         // send them in one request to the mail provider ...
    ///         Ok::<_, HandlerError>(batch.iter().map(|_| BatchOutcome::done()).collect())
    ///     })
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn subscribe_batch<T, F, Fut>(self, topic: &str, options: BatchOptions, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Vec<Message<T>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<BatchOutcome>, HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: ErasedBatchHandler = Arc::new(move |messages: Vec<Message<Value>>| {
            let handler = Arc::clone(&handler);
            Box::pin(async move {
                let n = messages.len();
                let mut verdicts: Vec<Option<Verdict>> = (0..n).map(|_| None).collect();
                let mut typed = Vec::with_capacity(n);
                let mut positions = Vec::with_capacity(n);
                for (i, m) in messages.into_iter().enumerate() {
                    match m.try_map_data(typed_data::<T>) {
                        Ok(t) => {
                            typed.push(t);
                            positions.push(i);
                        }
                        Err(e) => {
                            verdicts[i] = Some(Verdict::Dead {
                                error: decode_error::<T>(&e),
                            })
                        }
                    }
                }
                if !typed.is_empty() {
                    let k = typed.len();
                    match handler(typed).await {
                        Ok(outcomes) => {
                            let got = outcomes.len();
                            for (pos, outcome) in positions.iter().zip(outcomes) {
                                verdicts[*pos] = Some(match outcome {
                                    BatchOutcome::Done => Verdict::Ack { result: None },
                                    BatchOutcome::DoneWith(result) => Verdict::Ack {
                                        result: result.record_members(),
                                    },
                                    BatchOutcome::Failed(e) => Verdict::from_error(&e),
                                });
                            }
                            for pos in positions.iter().skip(got) {
                                verdicts[*pos] = Some(Verdict::Retry {
                                    error: format!("the batch handler returned {got} outcomes for {k} messages"),
                                    after: None,
                                });
                            }
                        }
                        Err(e) => {
                            for pos in &positions {
                                verdicts[*pos] = Some(Verdict::from_error(&e));
                            }
                        }
                    }
                }
                verdicts
                    .into_iter()
                    .map(|v| v.unwrap_or(Verdict::Ack { result: None }))
                    .collect()
            })
        });
        let sub = options.subscription.clone();
        self.add(topic, sub, HandlerKind::Batch(erased, options))
    }

    fn add(mut self, topic: &str, sub: Subscription, handler: HandlerKind) -> Self {
        let checked = validate_topic(topic).and_then(|()| sub.validate(topic));
        let checked = checked.and_then(|()| match &handler {
            HandlerKind::Batch(_, o) if o.max_size == 0 || o.max_wait.is_zero() => {
                Err(Error::Config(format!(
                    "batch max_size and max_wait of {topic:?} must be above zero"
                )))
            }
            HandlerKind::Batch(_, o) if o.max_size > crate::store::MAX_PER_CALL => {
                Err(Error::Config(format!(
                    "batch max_size of {topic:?} is {}; at most {} (one script call settles a whole batch)",
                    o.max_size,
                    crate::store::MAX_PER_CALL
                )))
            }
            _ => Ok(()),
        });
        let checked = checked.and_then(|()| {
            if self.subs.iter().any(|s| s.topic == topic) {
                Err(Error::Config(format!(
                    "{topic:?} is subscribed twice in one worker"
                )))
            } else {
                Ok(())
            }
        });
        if let Err(e) = checked {
            self.error.get_or_insert(e);
            return self;
        }
        self.subs.push(SubSpec {
            topic: topic.to_owned(),
            sub,
            handler,
        });
        self
    }

    /// Consumes the given subscribed topics as one group in priority order: they share one
    /// pool of slots (the sum of their concurrency) and each fetch asks them in the order
    /// `priority` gives. Each topic keeps its own handler, retries and lease.
    ///
    /// # Examples
    /// ```no_run
    /// # fn example(mq: forgemq::Client) -> forgemq::Result<()> {
    /// use forgemq::{HandlerError, Message, Priority, Worker};
    /// use serde_json::Value;
    ///
    /// async fn notify(msg: Message<Value>) -> Result<(), HandlerError> { Ok(()) }
    /// let worker = Worker::builder(mq)
    ///     .subscribe("notification.urgent", notify)
    ///     .subscribe("notification.normal", notify)
    ///     .priority(["notification.urgent", "notification.normal"], Priority::Strict)
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn priority<I, S>(mut self, topics: I, priority: Priority) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.groups
            .push((topics.into_iter().map(Into::into).collect(), priority));
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

    /// Refuse to start (`run_until` returns [`Error::UnsafeRedis`]) when the Redis server
    /// would evict messages or has no AOF (snapshots alone lose what came after the last
    /// one), instead of only warning. A server
    /// that does not let us check (`CONFIG GET` refused) is warned about, not refused.
    pub fn require_safe_redis(mut self, strict: bool) -> Self {
        self.settings.require_safe_redis = strict;
        self
    }

    /// How often this worker writes its heartbeat to the worker registry (default 5 s).
    /// Its entry stands for three intervals: killed without a word, it drops out of
    /// [`Client::workers`] after at most that (15 s by default).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.settings.heartbeat_interval = interval;
        self
    }

    /// Whether this worker also runs a scheduler, which fires the namespace's schedules
    /// ([`Client::upsert_schedule`]) when their time comes (default: yes). Any number of
    /// schedulers may run: each fire time still gives exactly one message. Idle, a
    /// scheduler reads the list of schedules every 5 s.
    pub fn scheduler(mut self, enabled: bool) -> Self {
        self.settings.scheduler = enabled;
        self
    }

    /// A label shown with this worker in [`Client::workers`], e.g. `gateway` or
    /// `image-resizer` (at most 100 bytes).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Checks the settings.
    pub fn build(mut self) -> Result<Worker> {
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
        if self.settings.heartbeat_interval < Duration::from_millis(100) {
            return Err(Error::Config(
                "heartbeat_interval must be at least 100ms".into(),
            ));
        }
        if self.name.as_ref().is_some_and(|n| n.len() > 100) {
            return Err(Error::Config("a worker name is at most 100 bytes".into()));
        }
        let mut grouped: Vec<&str> = Vec::new();
        for (topics, priority) in &self.groups {
            if topics.is_empty() {
                return Err(Error::Config(
                    "a priority group needs at least one topic".into(),
                ));
            }
            if let Priority::Weighted(w) = priority {
                if w.len() != topics.len() || w.contains(&0) {
                    return Err(Error::Config(format!(
                        "Priority::Weighted needs one weight above zero per topic: {} topics, weights {w:?}",
                        topics.len()
                    )));
                }
            }
            for t in topics {
                match self.subs.iter().find(|s| &s.topic == t) {
                    None => {
                        return Err(Error::Config(format!(
                        "priority group names {t:?}, which is not subscribed; subscribe it first"
                    )))
                    }
                    Some(s) if matches!(s.handler, HandlerKind::Batch(..)) => {
                        return Err(Error::Config(format!(
                            "{t:?} is a batch subscription and can't be in a priority group"
                        )))
                    }
                    Some(_) => {}
                }
                if grouped.contains(&t.as_str()) {
                    return Err(Error::Config(format!("{t:?} is in two priority groups")));
                }
                grouped.push(t);
            }
        }
        self.settings.presence = Arc::new(Presence::new(
            crate::registry::new_worker_id(),
            self.name,
            self.subs
                .iter()
                .map(|s| (s.topic.clone(), s.sub.concurrency))
                .collect(),
        ));
        Ok(Worker {
            client: self.client,
            subs: self.subs,
            groups: self.groups,
            settings: self.settings,
        })
    }
}

/// Turns a message's data into the handler's type. A handler that takes the data as a
/// `serde_json::Value` gets it as decoded, not rebuilt field by field.
fn typed_data<T: DeserializeOwned + 'static>(data: Value) -> serde_json::Result<T> {
    let mut slot = Some(data);
    if let Some(same) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<T>>() {
        if let Some(data) = same.take() {
            return Ok(data);
        }
    }
    serde_json::from_value(slot.unwrap_or(Value::Null))
}

fn decode_error<T>(e: &serde_json::Error) -> String {
    format!(
        "message data does not decode as {}: {e}",
        std::any::type_name::<T>()
    )
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
    groups: Vec<(Vec<String>, Priority)>,
    settings: Settings,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field(
                "topics",
                &self.subs.iter().map(|s| &s.topic).collect::<Vec<_>>(),
            )
            .field("groups", &self.groups)
            .field("settings", &self.settings)
            .finish()
    }
}

impl Worker {
    /// Starts configuring a worker that uses `client`'s Redis and namespace.
    pub fn builder(client: Client) -> WorkerBuilder {
        WorkerBuilder {
            client,
            name: None,
            subs: Vec::new(),
            groups: Vec::new(),
            settings: Settings {
                shutdown_timeout: Duration::from_secs(10),
                recover_interval: Duration::from_secs(5),
                max_recoveries: 3,
                idle_wait: Duration::from_secs(5),
                require_safe_redis: false,
                heartbeat_interval: Duration::from_secs(5),
                scheduler: true,
                presence: Arc::default(),
            },
            error: None,
        }
    }

    /// This worker's id in the worker registry ([`Client::workers`]) and in the holder of
    /// the messages it runs: `{host}-{pid}-{random}`.
    pub fn id(&self) -> &str {
        &self.settings.presence.id
    }

    /// Runs until `shutdown` completes, then stops fetching, lets in-flight handlers finish
    /// within the shutdown timeout, returns the unfinished ones to pending at once, and
    /// returns. Redis errors never end it: it logs them and retries with backoff.
    ///
    /// While it runs it keeps its entry in the worker registry ([`Client::workers`]):
    /// `draining` once shutdown begins, removed when it returns.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        match self.client.server_warnings().await {
            Ok(warnings) => {
                for w in &warnings {
                    tracing::warn!("{w}");
                }
                let risks: Vec<String> = warnings
                    .into_iter()
                    .filter(|w| w.kind != crate::client::WarningKind::Unverified)
                    .map(|w| w.message)
                    .collect();
                if self.settings.require_safe_redis && !risks.is_empty() {
                    return Err(Error::UnsafeRedis(risks));
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the Redis configuration"),
        }

        // The groups: each priority group, then every other subscription on its own.
        let mut subs = self.subs;
        let mut specs: Vec<(Vec<SubSpec>, Priority)> = Vec::new();
        for (members, priority) in self.groups {
            let mut group = Vec::new();
            for m in &members {
                if let Some(pos) = subs.iter().position(|s| &s.topic == m) {
                    group.push(subs.remove(pos));
                }
            }
            specs.push((group, priority));
        }
        specs.extend(subs.into_iter().map(|s| (vec![s], Priority::Strict)));

        let presence = Arc::clone(&self.settings.presence);
        let interval = self.settings.heartbeat_interval;
        // The first heartbeat before any work, so the worker is listed from its first fetch.
        if let Err(e) = presence.beat(&self.client, interval).await {
            tracing::warn!(worker = %presence.id, error = %e, "first heartbeat failed; trying again on the next");
        }
        tracing::info!(worker = %presence.id, "worker started");
        let (beat_stop, beat_stop_rx) = watch::channel(false);
        let heartbeats = tokio::spawn(presence::heartbeat_loop(
            self.client.clone(),
            Arc::clone(&presence),
            interval,
            beat_stop_rx,
        ));

        let (stop_tx, stop_rx) = watch::channel(false);
        let scheduler = self.settings.scheduler.then(|| {
            tokio::spawn(crate::schedule::scheduler_loop(
                self.client.clone(),
                stop_rx.clone(),
            ))
        });
        let mut running = JoinSet::new();
        for (members, priority) in specs {
            running.spawn(supervise(
                self.client.clone(),
                members,
                priority,
                self.settings.clone(),
                stop_rx.clone(),
            ));
        }

        shutdown.await;
        tracing::info!(worker = %presence.id, "shutting down: no new fetches, waiting for in-flight handlers");
        let _ = stop_tx.send(true);
        // Say so at once (a Redis that is gone must not hold the shutdown up); the
        // heartbeats go on while the handlers finish.
        presence.set_draining();
        let bound = Duration::from_secs(2);
        let _ = tokio::time::timeout(bound, presence.beat(&self.client, interval)).await;
        while let Some(done) = running.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a subscription task failed");
            }
        }
        if let Some(scheduler) = scheduler {
            let _ = scheduler.await;
        }
        let _ = beat_stop.send(true);
        let _ = heartbeats.await;
        match tokio::time::timeout(bound, presence.leave(&self.client)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(worker = %presence.id, error = %e, "could not remove this worker from the registry; it drops out when its heartbeat expires")
            }
            Err(_) => {
                tracing::warn!(worker = %presence.id, "removing this worker from the registry timed out; it drops out when its heartbeat expires")
            }
        }
        Ok(())
    }
}

/// Runs one group of subscriptions on the current layout of its topics (a runner per
/// partition), with its recoverer, until told to stop. Every recover interval it reads the
/// layouts again: when a topic's partition count changed, the group stops (handing its
/// work back as at shutdown) and starts again on the new layout.
async fn supervise(
    client: Client,
    members: Vec<SubSpec>,
    priority: Priority,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
) {
    let topics: Vec<String> = members.iter().map(|m| m.topic.clone()).collect();
    let mut backoff = RetryDelay::default();
    loop {
        let layouts = loop {
            if *stop.borrow() {
                return;
            }
            match read_layouts(&client, &topics).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(topics = ?topics, error = %e, "could not read the topics' layout; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next()) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        };
        backoff.reset();
        let mut runners = Vec::new();
        let mut tiers = Vec::new();
        let mut all_keys = Vec::new();
        let mut concurrency = 0;
        for (m, layout) in members.iter().zip(&layouts) {
            let mut tier = Vec::new();
            for keys in layout {
                tier.push(runners.len());
                all_keys.push(keys.clone());
                runners.push(Runner::new(
                    client.clone(),
                    keys.clone(),
                    m.sub.clone(),
                    m.handler.clone(),
                    settings.clone(),
                ));
            }
            tiers.push(tier);
            concurrency += m.sub.concurrency;
        }
        let patient = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let group = Group {
            runners,
            tiers,
            priority: priority.clone(),
            concurrency,
            patient: Arc::clone(&patient),
        };
        let (group_stop, group_stop_rx) = watch::channel(false);
        let run = tokio::spawn(group.run(group_stop_rx.clone()));
        let recover = tokio::spawn(recover_loop(
            client.clone(),
            all_keys,
            settings.clone(),
            group_stop_rx,
        ));
        let shape = |l: &[Vec<TopicKeys>]| l.iter().map(Vec::len).collect::<Vec<_>>();
        let changed = loop {
            if *stop.borrow() {
                break false;
            }
            tokio::select! {
                _ = stop.changed() => break false,
                () = tokio::time::sleep(settings.recover_interval) => {
                    if let Ok(now) = read_layouts(&client, &topics).await {
                        if shape(&now) != shape(&layouts) {
                            break true;
                        }
                    }
                }
            }
        };
        // A restart on a new layout lets running handlers finish, however long they take;
        // a shutdown keeps to the shutdown timeout.
        patient.store(changed, std::sync::atomic::Ordering::SeqCst);
        let _ = group_stop.send(true);
        let mut run = run;
        let mut watching = changed;
        let finished = loop {
            tokio::select! {
                done = &mut run => break done,
                _ = stop.changed(), if watching => {
                    // Shutting down while restarting: back to the shutdown timeout.
                    patient.store(false, std::sync::atomic::Ordering::SeqCst);
                    watching = false;
                }
            }
        };
        if let Err(e) = finished {
            tracing::error!(error = %e, "a subscription task failed");
        }
        recover.abort();
        if !changed {
            return;
        }
        tracing::warn!(topics = ?topics, "the partition count of a topic changed; consuming its new layout");
    }
}

/// The keys of every partition of each topic (one set for a plain topic), read fresh.
async fn read_layouts(client: &Client, topics: &[String]) -> Result<Vec<Vec<TopicKeys>>> {
    let mut out = Vec::with_capacity(topics.len());
    for t in topics {
        out.push(client.fresh_layout(t).await?.partitions.clone());
    }
    Ok(out)
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
