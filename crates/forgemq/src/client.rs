//! The producer and inspector: publish, look at queues, manage dead letters.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::keys::{partition_of, validate_topic, Namespace, TopicKeys};
use crate::message::{from_millis, json_shape, rfc3339, Envelope, MessageId};
use crate::store::{
    CancelState, ConnSettings, PeekState, PublishItem, RawStats, Store, Written, MAX_PER_CALL,
};
use crate::topic::TopicLayout;

/// Default namespace: keys look like `mq:{user.welcome}:pending`.
pub const DEFAULT_NAMESPACE: &str = "mq";

/// Default payload limit. Redis holds every body in memory; a megabyte is already a large
/// message for a queue, and bigger blobs belong in object storage with a reference here.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// An id read from a state's key, as bytes, with its score (`None` in the pending list).
type RankedId = (Vec<u8>, Option<f64>);

/// How deep the pages of a partitioned topic's peek reach (every partition is read
/// from its head to the end of the page).
const PARTITIONED_PEEK_DEPTH: usize = 10_000;

/// How many of a partition's oldest dead letters [`Client::dead_letters_matching`] reads.
const DEAD_LETTER_SCAN: usize = 10_000;

/// Messages per `publish_batch` round trip. Large enough to amortise the round trip,
/// small enough that one script call does not stall Redis for other clients.
const PUBLISH_CHUNK: usize = 1000;

/// Script calls of one batch publish in flight at once, per partition.
const CHUNKS_IN_FLIGHT: usize = 2;

/// Attempts for one publish when Redis is briefly unreachable. The id is fixed before the
/// first attempt, so a retry after an unknown outcome never stores a second copy.
const PUBLISH_ATTEMPTS: u32 = 3;

/// Deepest nesting of arrays and objects accepted in `data`: the decoder (serde_json)
/// stops at 128 levels with the envelope around it, so deeper data could be published but
/// never consumed.
pub const MAX_NESTING: usize = 100;

fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// A connection to ForgeMQ on one Redis server: publishes and inspects queues.
///
/// Cheap to clone; clones share one multiplexed connection that reconnects by itself.
///
/// # Examples
/// ```no_run
/// # async fn example() -> forgemq::Result<()> {
/// use serde_json::json;
/// let mq = forgemq::Client::connect("redis://127.0.0.1:6379").await?;
/// let id = mq.publish("user.welcome", json!({"user_id": "123"})).await?;
/// println!("published {id}; waiting: {}", mq.get_queue_length("user.welcome").await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    max_payload: usize,
    /// Poison limit of the recovery that a manual fetch runs first.
    pub(crate) max_recoveries: u32,
    /// The layout (partitions) of each topic this client used, with when it was read.
    pub(crate) layouts: std::sync::Mutex<HashMap<String, Arc<TopicLayout>>>,
    /// Which partition a manual fetch of a partitioned topic starts with next.
    pub(crate) pop_turn: std::sync::atomic::AtomicUsize,
    /// When this client last added each topic to the topic registry (`mq:topics`): the
    /// registry is a namespace-wide key, another slot than the topic's on a cluster, so it
    /// is written on its own, once a minute per topic at most.
    registered: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Single publishes waiting to share a script call (see `coalesce.rs`).
    pub(crate) coalescer: crate::coalesce::Coalescer,
}

/// How long a topic's registration is trusted before the next publish writes it again
/// (the registry is a set: writing it again is harmless, and restores it after a Redis
/// restart without persistence).
const REGISTRATION_REFRESH: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("namespace", &self.inner.store.ns.name())
            .field("max_payload", &self.inner.max_payload)
            .finish()
    }
}

/// Settings for a [`Client`]; start with [`Client::builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    url: String,
    namespace: String,
    response_timeout: Duration,
    connect_timeout: Duration,
    reconnect_retries: usize,
    max_payload: usize,
    max_recoveries: u32,
    dead_max_len: u64,
    dead_max_age: Duration,
    results: crate::status::Retention,
    tls_ca: Option<Vec<u8>>,
    tls_client: Option<(Vec<u8>, Vec<u8>)>,
    replicas: Option<(usize, Duration)>,
}

/// Dead letters kept per topic by default: enough to investigate an incident, few enough
/// that a topic failing forever cannot fill Redis.
pub const DEFAULT_DEAD_LETTER_MAX_LEN: u64 = 10_000;

/// How long a dead letter is kept by default.
pub const DEFAULT_DEAD_LETTER_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password and the key is secret: neither is printed.
        f.debug_struct("ClientBuilder")
            .field("namespace", &self.namespace)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_payload", &self.max_payload)
            .field("tls_ca", &self.tls_ca.is_some())
            .field("tls_client_cert", &self.tls_client.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Dead-letter retention per topic: at most `max_len` entries and none older than
    /// `max_age` (defaults 10,000 and 30 days). Older ones are deleted with their bodies
    /// and counted in [`QueueStats::dead_trimmed`]. `0` / `Duration::ZERO` = no limit.
    pub fn dead_letter_retention(mut self, max_len: u64, max_age: Duration) -> Self {
        self.dead_max_len = max_len;
        self.dead_max_age = max_age;
        self
    }

    /// Records of finished messages kept per topic (each partition of a partitioned one)
    /// for [`Client::message_status`] and [`Client::wait_result`]: the last `max_len`
    /// (default 1,000), none older than `max_age` (default 1 hour). A subscription can say
    /// otherwise for its topic ([`Subscription::result_retention`](crate::Subscription::result_retention)).
    /// `max_len` 0 keeps none.
    pub fn result_retention(mut self, max_len: u64, max_age: Duration) -> Self {
        self.results = crate::status::Retention { max_len, max_age };
        self
    }

    /// Prefix of every key (default `mq`). Several applications can share one Redis with
    /// different namespaces.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long a command may take before it fails with a timeout (default 5 s). Blocking
    /// waits use their own connection and are not cut by this.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long a connection attempt may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connection attempts after a connection drops before a call fails (default 3, with
    /// exponential backoff from 100 ms). Workers keep retrying beyond this on their own.
    pub fn reconnect_retries(mut self, retries: usize) -> Self {
        self.reconnect_retries = retries;
        self
    }

    /// Verify a `rediss://` server with this CA (PEM) instead of the system's trust store.
    /// The server is always verified: there is no insecure mode.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(pem.into());
        self
    }

    /// Present this client certificate and key (PEM) to a server that asks for one
    /// (`tls-auth-clients yes`).
    pub fn tls_client_cert_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls_client = Some((cert.into(), key.into()));
        self
    }

    /// Largest serialized message accepted, in bytes (default 1 MiB).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Acknowledged means replicated: a publish (and a worker's settle) returns `Ok` only
    /// once `replicas` replicas of the master that took it confirmed the write (`WAIT`),
    /// within `timeout`; else [`Error::NotReplicated`]. Off by default: each acknowledged
    /// write then waits one replication round trip, and needs a dedicated connection
    /// (`WAIT` blocks its connection). With it, a master failover loses no acknowledged
    /// message.
    pub fn replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Lease expiries a message survives before the recovery that
    /// [`Client::pop_messages`] runs first dead-letters it as poison (default 3, as
    /// [`WorkerBuilder::max_recoveries`](crate::WorkerBuilder::max_recoveries)).
    pub fn max_recoveries(mut self, n: u32) -> Self {
        self.max_recoveries = n;
        self
    }

    /// Connects. Fails when Redis can't be reached, so a misconfigured producer finds out
    /// at start-up rather than by losing messages; and with [`Error::Config`] naming the
    /// version when Redis (a master of a cluster) is older than 6.2, the oldest ForgeMQ
    /// runs on. A user that may not run `INFO server` skips that check.
    pub async fn build(self) -> Result<Client> {
        let ns = Namespace::new(&self.namespace)?;
        if self.max_payload == 0 {
            return Err(Error::Config("max_payload must be at least 1 byte".into()));
        }
        if self
            .replicas
            .is_some_and(|(_, t)| t < Duration::from_millis(1))
        {
            // WAIT with 0 ms waits for ever.
            return Err(Error::Config(
                "the replicas timeout must be at least 1ms".into(),
            ));
        }
        let store = Store::connect(
            &self.url,
            ns,
            ConnSettings {
                response_timeout: self.response_timeout,
                connect_timeout: self.connect_timeout,
                reconnect_retries: self.reconnect_retries,
                dead_max_len: self.dead_max_len,
                dead_max_age: self.dead_max_age,
                results: self.results,
                tls_ca: self.tls_ca,
                tls_client: self.tls_client,
                replicas: self.replicas,
            },
        )
        .await?;
        // A round trip now, so that "connected" means Redis answered.
        store.load_scripts().await?;
        Ok(Client {
            inner: Arc::new(Inner {
                store,
                max_payload: self.max_payload,
                max_recoveries: self.max_recoveries,
                registered: Default::default(),
                coalescer: Default::default(),
                layouts: Default::default(),
                pop_turn: Default::default(),
            }),
        })
    }
}

/// Options for [`Client::publish_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PublishOptions {
    pub(crate) delay: Option<Duration>,
    pub(crate) max_retry: Option<u32>,
    pub(crate) id: Option<MessageId>,
    pub(crate) unique: Option<(String, Duration)>,
    pub(crate) unique_until: UniqueUntil,
    pub(crate) partition_key: Option<String>,
    pub(crate) headers: crate::message::Headers,
    pub(crate) group: Option<String>,
}

/// How long a unique key ([`PublishOptions::unique_key`]) holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum UniqueUntil {
    /// Until the message reaches a final state (processed, cancelled, purged or
    /// dead-lettered) or the ttl ends, whichever comes first. The default, as Sidekiq's
    /// unique jobs and BullMQ's deduplication behave. A key released when its message is
    /// dead-lettered can be taken by a new message before the dead letter is retried.
    #[default]
    Final,
    /// For the whole ttl, whatever happens to the message.
    Ttl,
}

impl std::str::FromStr for UniqueUntil {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "final" => Ok(UniqueUntil::Final),
            "ttl" => Ok(UniqueUntil::Ttl),
            other => Err(Error::Config(format!(
                "unknown unique_until {other:?}: use final or ttl"
            ))),
        }
    }
}

impl PublishOptions {
    /// No delay, the subscription's retry limit, a generated id.
    pub fn new() -> Self {
        Self::default()
    }

    /// Deliver no earlier than `delay` from now (measured on Redis's clock).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Retries for this message, overriding the subscription's `max_retry`.
    pub fn max_retry(mut self, retries: u32) -> Self {
        self.max_retry = Some(retries);
        self
    }

    /// At most one message per `key` at a time: while the key is held, publishing with
    /// it writes nothing and returns [`PublishOutcome::Duplicate`] with the holder's id
    /// (Sidekiq's unique jobs). The key is held until the message is processed, cancelled,
    /// purged or dead-lettered, or until `ttl` ends, whichever comes first (see
    /// [`PublishOptions::unique_until`] for ttl only). The key is per topic.
    pub fn unique_key(mut self, key: impl Into<String>, ttl: Duration) -> Self {
        self.unique = Some((key.into(), ttl));
        self
    }

    /// How long the unique key holds: until the message's final state or the ttl
    /// ([`UniqueUntil::Final`], the default), or for the whole ttl ([`UniqueUntil::Ttl`],
    /// the behaviour before version 0.2).
    pub fn unique_until(mut self, until: UniqueUntil) -> Self {
        self.unique_until = until;
        self
    }

    /// Which partition of a partitioned topic the message goes to: messages with the
    /// same key go to the same partition. Without it, the unique key decides, else the
    /// message id (hashed). Ignored on a plain topic. On a partitioned topic a message with
    /// a unique key may not have a partition key too ([`Error::Conflict`]): the unique key
    /// must pick the partition for it to hold across the whole topic.
    pub fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// The fair group this message waits in, e.g. a tenant: within a topic, workers take
    /// from the groups with waiting messages in turn (weighted round robin), so a group
    /// with a million waiting messages does not delay a group with ten. Per-group settings
    /// (most handled at once, weight, pause): [`Client::set_group`]. Group names follow the
    /// id rules: 1-200 bytes, no spaces or control characters. On a partitioned topic the
    /// group picks the partition (unless a partition key or unique key is given), so each
    /// group's settings hold for the whole topic.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The key that picks the partition: the partition key, else the unique key, else
    /// the group, else the id; and whether both a partition key and a unique key were given (refused on a
    /// partitioned topic: the unique key is per topic only while every message with it
    /// goes to one partition, the one the unique key picks).
    fn route_key(&self, id: &MessageId) -> (String, bool) {
        let both = self.partition_key.is_some() && self.unique.is_some();
        let key = self
            .partition_key
            .clone()
            .or_else(|| self.unique.as_ref().map(|(k, _)| k.clone()))
            .or_else(|| self.group.clone())
            .unwrap_or_else(|| id.as_str().to_owned());
        (key, both)
    }

    /// Adds a header: a string the consumer reads in [`Message::headers`](crate::Message)
    /// without touching the data, e.g. a W3C `traceparent` to continue a trace, a tenant or
    /// a correlation id. At most 64 per message; names 1-128 bytes of printable ASCII
    /// without spaces, values up to 1,024 characters.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Use this id instead of a generated one. Publishing the same id again while the
    /// message is stored writes nothing and returns [`PublishOutcome::Duplicate`].
    pub fn id(mut self, id: MessageId) -> Self {
        self.id = Some(id);
        self
    }
}

/// What [`Client::publish_with`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishOutcome {
    /// The message was stored under this id.
    Published(MessageId),
    /// Nothing was written: a message with this id is already stored (or was processed
    /// within a deduplication window), or the unique key is held by the message with this id.
    Duplicate(MessageId),
}

impl PublishOutcome {
    /// The id, in either case.
    pub fn id(&self) -> &MessageId {
        match self {
            PublishOutcome::Published(id) | PublishOutcome::Duplicate(id) => id,
        }
    }

    /// True for [`PublishOutcome::Duplicate`].
    pub fn is_duplicate(&self) -> bool {
        matches!(self, PublishOutcome::Duplicate(_))
    }
}

/// Where the messages of one topic are, and what happened to them so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct QueueStats {
    /// The topic.
    pub topic: String,
    /// Waiting to run now (the seed's queue length).
    pub pending: u64,
    /// Being handled (leased by a worker).
    pub active: u64,
    /// Waiting for their due time: delayed publishes and retries in backoff.
    pub delayed: u64,
    /// In the dead-letter queue now.
    pub dead: u64,
    /// Ever published.
    pub published: u64,
    /// Ever acknowledged (handler succeeded).
    pub processed: u64,
    /// Failed attempts (each failed run counts once).
    pub failed: u64,
    /// Failed attempts that were scheduled to run again.
    pub retried: u64,
    /// Ever moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Deliveries whose lease expired and went back to pending (worker crash or stall).
    pub recovered: u64,
    /// Dead letters sent back to the queue.
    pub reprocessed: u64,
    /// Messages deleted by `purge_queue`.
    pub purged: u64,
    /// Messages removed by `cancel` before they ran.
    pub cancelled: u64,
    /// Redeliveries of already-processed ids that were skipped (see
    /// [`Subscription::deduplicate`](crate::Subscription::deduplicate)).
    pub deduplicated: u64,
    /// Dead letters deleted by retention (count or age limit).
    pub dead_trimmed: u64,
    /// Dead letters deleted by hand (`delete_dead_letter`, `purge_dead_letters`).
    pub dead_deleted: u64,
    /// Handler runs whose outcome was refused because the lease had expired and the
    /// message was handed to another delivery meanwhile: the message ran (or will run)
    /// twice (DESIGN.md rule 7). A worker stalled past its lease, or cut off from Redis.
    pub duplicate_runs: u64,
    /// Ids found without a body (deleted behind ForgeMQ's back) and dropped.
    pub orphans: u64,
    /// Whether the topic is paused (a partitioned one: any of its partitions).
    pub paused: bool,
    /// The queue latency: how long the message waiting longest has been ready to run
    /// (since it was published, or since it came due for a delayed or retried one, or since
    /// it went back to pending), in ms on Redis's clock; `None` with nothing ready. A
    /// partitioned topic: its oldest partition's.
    pub oldest_pending_age_ms: Option<u64>,
    /// How long ago the oldest dead letter died, in ms; `None` without dead letters.
    pub oldest_dead_age_ms: Option<u64>,
    /// When the next delayed message (or retry) is due, in ms from now (0: due, being
    /// moved to pending); `None` with nothing delayed.
    pub next_due_in_ms: Option<u64>,
    /// Live workers consuming the topic (see [`Client::workers`]).
    pub workers: u64,
    /// Their handler slots for the topic: the sum of their concurrency.
    pub worker_slots: u64,
    /// Messages of the topic their handlers were running at their last heartbeats.
    pub in_flight: u64,
    /// Records of finished (done or cancelled) messages kept for
    /// [`Client::message_status`], within the retention ([`crate::Retention`]); a few may be
    /// past their age and no longer shown.
    pub results_kept: u64,
    /// The topic's fair groups ([`Client::groups`]), when it ever had grouped messages.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<crate::group::GroupInfo>,
    /// Which partition these figures are of (in [`QueueStats::partitions`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// A partitioned topic's figures per partition (the fields above are their sums);
    /// empty for a plain topic.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<QueueStats>,
}

impl QueueStats {
    /// The seed's `Length`: messages waiting to be consumed.
    pub fn length(&self) -> u64 {
        self.pending
    }

    fn from_raw(topic: &str, partition: Option<u32>, raw: &RawStats) -> Self {
        let c = |name: &str| raw.counters.get(name).copied().unwrap_or(0);
        QueueStats {
            topic: topic.to_owned(),
            pending: raw.pending,
            active: raw.active,
            delayed: raw.delayed,
            dead: raw.dead,
            published: c("published"),
            processed: c("processed"),
            failed: c("failed"),
            retried: c("retried"),
            dead_lettered: c("dead"),
            recovered: c("recovered"),
            reprocessed: c("reprocessed"),
            purged: c("purged"),
            cancelled: c("cancelled"),
            deduplicated: c("deduplicated"),
            dead_trimmed: c("dead_trimmed"),
            dead_deleted: c("dead_deleted"),
            duplicate_runs: c("duplicate_runs"),
            orphans: c("orphans"),
            paused: raw.paused,
            // A delayed message past its due time is ready, whether or not a fetch has
            // moved it to pending yet (nothing does while no worker runs).
            oldest_pending_age_ms: match (raw.oldest_ready_ms, raw.next_due_ms) {
                (Some(r), Some(d)) if d < r => Some(d),
                (None, Some(d)) if d <= raw.now_ms => Some(d),
                (r, _) => r,
            }
            .map(|t| age(raw.now_ms, t)),
            oldest_dead_age_ms: raw.oldest_dead_ms.map(|t| age(raw.now_ms, t)),
            next_due_in_ms: raw.next_due_ms.map(|t| age(t, raw.now_ms)),
            workers: 0,
            worker_slots: 0,
            in_flight: 0,
            results_kept: raw.results,
            groups: Vec::new(),
            partition,
            partitions: Vec::new(),
        }
    }

    /// Adds a partition's figures to these.
    fn add(&mut self, p: &QueueStats) {
        self.pending += p.pending;
        self.results_kept += p.results_kept;
        self.active += p.active;
        self.delayed += p.delayed;
        self.dead += p.dead;
        self.published += p.published;
        self.processed += p.processed;
        self.failed += p.failed;
        self.retried += p.retried;
        self.dead_lettered += p.dead_lettered;
        self.recovered += p.recovered;
        self.reprocessed += p.reprocessed;
        self.purged += p.purged;
        self.cancelled += p.cancelled;
        self.deduplicated += p.deduplicated;
        self.dead_trimmed += p.dead_trimmed;
        self.dead_deleted += p.dead_deleted;
        self.duplicate_runs += p.duplicate_runs;
        self.orphans += p.orphans;
        self.paused |= p.paused;
        self.oldest_pending_age_ms = self.oldest_pending_age_ms.max(p.oldest_pending_age_ms);
        self.oldest_dead_age_ms = self.oldest_dead_age_ms.max(p.oldest_dead_age_ms);
        self.next_due_in_ms = match (self.next_due_in_ms, p.next_due_in_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Sets what the topic's workers' heartbeats say.
    fn set_workers(&mut self, (workers, slots, in_flight): (u64, u64, u64)) {
        self.workers = workers;
        self.worker_slots = slots;
        self.in_flight = in_flight;
    }
}

/// `later - earlier` in ms, never below 0 (the two readings may cross by a millisecond).
fn age(later: i64, earlier: i64) -> u64 {
    u64::try_from(later.saturating_sub(earlier)).unwrap_or(0)
}

/// Whether a publish was refused because the topic's layout is not what the client read.
pub(crate) fn layout_changed(e: &Error) -> bool {
    matches!(e, Error::Redis(r) if crate::error::server_codes(r).iter().any(|c| c == "PARTITIONED"))
}

fn outcome(id: MessageId, written: Written) -> PublishOutcome {
    match written {
        Written::New => PublishOutcome::Published(id),
        Written::DuplicateId => PublishOutcome::Duplicate(id),
        Written::UniqueHeldBy(holder) => PublishOutcome::Duplicate(MessageId::from_stored(holder)),
    }
}

/// A setting of the Redis server that puts messages at risk; see
/// [`Client::server_warnings`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ServerWarning {
    /// What is wrong.
    pub kind: WarningKind,
    /// One sentence saying what and how to fix it.
    pub message: String,
}

impl std::fmt::Display for ServerWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The kinds of [`ServerWarning`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WarningKind {
    /// `maxmemory-policy` is not `noeviction`.
    EvictionPolicy,
    /// Neither AOF nor RDB snapshots.
    PersistenceOff,
    /// RDB snapshots only.
    AofOff,
    /// `CONFIG GET` was refused, so nothing could be checked.
    Unverified,
}

/// What [`Client::purge_queue`] deleted, per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Purged {
    /// Messages that were waiting to run.
    pub pending: u64,
    /// Messages a handler was running (their outcomes will be refused).
    pub active: u64,
    /// Messages waiting for their due time.
    pub delayed: u64,
    /// Dead letters.
    pub dead: u64,
}

impl Purged {
    /// All the messages deleted.
    pub fn total(&self) -> u64 {
        self.pending + self.active + self.delayed + self.dead
    }
}

/// Where [`Client::cancel`] removed a message from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Cancelled {
    /// It was waiting for its due time.
    Delayed,
    /// It was waiting to run.
    Pending,
}

/// One minute of a topic's throughput; see [`Client::throughput`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MinuteCounts {
    /// The start of the minute (Redis clock).
    #[serde(serialize_with = "rfc3339_ser")]
    pub minute: SystemTime,
    /// Messages published in it.
    pub published: u64,
    /// Messages acknowledged in it.
    pub processed: u64,
    /// Failed attempts in it.
    pub failed: u64,
}

pub(crate) fn rfc3339_opt_ser<S: serde::Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// A stored body as a [`PeekedMessage`] (without a holder).
fn peeked(
    topic: &str,
    id: &str,
    state: MessageState,
    body: &[u8],
    score: Option<f64>,
) -> PeekedMessage {
    let raw = String::from_utf8_lossy(body).into_owned();
    let (data, retry, error, envelope) = match Envelope::decode(body) {
        Ok(env) => {
            let envelope = serde_json::to_value(&env).unwrap_or(Value::Null);
            (env.data, env.retry, env.last_error, envelope)
        }
        Err(e) => (
            Value::Null,
            0,
            Some(format!("undecodable envelope: {e}")),
            Value::Null,
        ),
    };
    PeekedMessage {
        id: MessageId::from_stored(id.to_owned()),
        topic: topic.to_owned(),
        state,
        data,
        retry,
        error,
        at: score.map(from_millis),
        holder: None,
        started_at: None,
        envelope,
        raw,
    }
}

pub(crate) fn rfc3339_ser<S: serde::Serializer>(
    t: &SystemTime,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

/// The states a stored message can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum MessageState {
    /// Waiting to run.
    Pending,
    /// Waiting for its due time (delayed publish or retry backoff).
    Delayed,
    /// Being handled under a lease.
    Active,
    /// In the dead-letter queue.
    Dead,
}

impl std::str::FromStr for MessageState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(MessageState::Pending),
            "delayed" => Ok(MessageState::Delayed),
            "active" => Ok(MessageState::Active),
            "dead" => Ok(MessageState::Dead),
            other => Err(Error::Config(format!(
                "unknown state {other:?}: use pending, delayed, active or dead"
            ))),
        }
    }
}

/// A stored message as [`Client::peek`] and [`Client::message`] see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PeekedMessage {
    /// The message id.
    pub id: MessageId,
    /// Its topic.
    pub topic: String,
    /// The state it was found in.
    pub state: MessageState,
    /// The published data (`null` when the body does not decode).
    pub data: Value,
    /// Failed attempts so far.
    pub retry: u32,
    /// The last error, if it failed before (or why the body does not decode).
    pub error: Option<String>,
    /// Due time (delayed), lease deadline (active) or time of death (dead); for a
    /// pending one found by [`Client::message`], when it became ready to run if it went
    /// back to the head of the queue (recovered or released), else `None` (the envelope's
    /// `timestamp` says when it was published). Redis clock.
    pub at: Option<SystemTime>,
    /// Who runs an active message: the [`WorkerInfo::id`](crate::WorkerInfo::id) of a
    /// worker, or `{host}-{pid}-pop` for a manual fetch.
    pub holder: Option<String>,
    /// When the current run of an active message started (Redis clock).
    #[serde(serialize_with = "rfc3339_opt_ser")]
    pub started_at: Option<SystemTime>,
    /// The stored envelope as a JSON object (`null` when it does not decode).
    pub envelope: Value,
    /// The stored envelope as text, exactly as in Redis.
    pub raw: String,
}

impl From<PeekedMessage> for DeadLetter {
    fn from(p: PeekedMessage) -> Self {
        DeadLetter {
            id: p.id,
            topic: p.topic,
            data: p.data,
            retry: p.retry,
            error: p.error,
            died_at: p.at.unwrap_or(SystemTime::UNIX_EPOCH),
            envelope: p.raw,
        }
    }
}

/// A message in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The message id.
    pub id: MessageId,
    /// Its topic.
    pub topic: String,
    /// The published data (`null` when the stored body could not be decoded).
    pub data: Value,
    /// Failed attempts.
    pub retry: u32,
    /// Why it died: the last handler error, a decode error or a poison-message note.
    pub error: Option<String>,
    /// When it died (Redis clock).
    pub died_at: SystemTime,
    /// The whole stored envelope as JSON text, including the failure history.
    pub envelope: String,
}

impl Client {
    /// Connects with default settings; see [`Client::builder`] for the rest.
    pub async fn connect(url: &str) -> Result<Client> {
        Self::builder(url).build().await
    }

    /// Starts configuring a client for the Redis at `url` (`redis://host:port/db`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            response_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            reconnect_retries: 3,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_recoveries: 3,
            dead_max_len: DEFAULT_DEAD_LETTER_MAX_LEN,
            dead_max_age: DEFAULT_DEAD_LETTER_MAX_AGE,
            results: crate::status::Retention::DEFAULT,
            tls_ca: None,
            tls_client: None,
            replicas: None,
        }
    }

    /// The key namespace in use.
    pub fn namespace(&self) -> &str {
        self.inner.store.ns.name()
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Publishes `data` to `topic` and returns its id once Redis has stored it.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn example(mq: forgemq::Client) -> forgemq::Result<()> {
    /// let id = mq
    ///     .publish("order.paid", serde_json::json!({"order_id": "ORD123", "amount": 299.99}))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn publish<D: Serialize>(&self, topic: &str, data: D) -> Result<MessageId> {
        Ok(self
            .publish_with(topic, data, PublishOptions::new())
            .await?
            .id()
            .clone())
    }

    /// Publishes `data` to be delivered no earlier than `delay` from now.
    ///
    /// The due time is kept in Redis, so it fires even if this process exits right after.
    pub async fn publish_with_delay<D: Serialize>(
        &self,
        topic: &str,
        data: D,
        delay: Duration,
    ) -> Result<MessageId> {
        Ok(self
            .publish_with(topic, data, PublishOptions::new().delay(delay))
            .await?
            .id()
            .clone())
    }

    /// Publishes with options: delay, retry limit, caller-chosen id.
    pub async fn publish_with<D: Serialize>(
        &self,
        topic: &str,
        data: D,
        options: PublishOptions,
    ) -> Result<PublishOutcome> {
        validate_topic(topic)?;
        let id = options.id.clone().unwrap_or_else(MessageId::generate);
        let item = self.prepare(topic, &id, data, &options, &now_rfc3339())?;
        let route = options.route_key(&id);
        let written = self.write_routed(topic, &[item], &[route]).await?;
        Ok(outcome(
            id,
            written.into_iter().next().unwrap_or(Written::New),
        ))
    }

    /// Publishes many messages, one script call per 1,000 (two of them in flight at a
    /// time); returns their ids in order, and they are queued in that order (a chunk that
    /// had to be sent again after a transient error may land after the one behind it).
    ///
    /// Every item is checked (serializable, within the size limit) before anything is
    /// written, so a bad item fails the call with nothing stored. If Redis fails midway,
    /// the chunks before the failure are stored, and perhaps the one after it; to retry
    /// such a batch without duplicates, give each message an id with
    /// [`Client::publish_batch_with`].
    pub async fn publish_batch<I, D>(&self, topic: &str, items: I) -> Result<Vec<MessageId>>
    where
        I: IntoIterator<Item = D>,
        D: Serialize,
    {
        let items = items.into_iter().map(|d| (d, PublishOptions::new()));
        let outcomes = self.publish_batch_with(topic, items).await?;
        Ok(outcomes.into_iter().map(|o| o.id().clone()).collect())
    }

    /// Publishes many messages, each with its own options (id, delay, retries, unique
    /// key), one round trip per 1,000 (per partition, the partitions at once). With
    /// caller-chosen ids the whole call can be retried after an error: what was stored is
    /// reported as a duplicate, not stored twice.
    pub async fn publish_batch_with<I, D>(
        &self,
        topic: &str,
        items: I,
    ) -> Result<Vec<PublishOutcome>>
    where
        I: IntoIterator<Item = (D, PublishOptions)>,
        D: Serialize,
    {
        validate_topic(topic)?;
        let mut ids = Vec::new();
        let mut prepared = Vec::new();
        let mut routes = Vec::new();
        let timestamp = now_rfc3339();
        for (data, options) in items {
            let id = options.id.clone().unwrap_or_else(MessageId::generate);
            prepared.push(self.prepare(topic, &id, data, &options, &timestamp)?);
            routes.push(options.route_key(&id));
            ids.push(id);
        }
        let written = self.write_routed(topic, &prepared, &routes).await?;
        Ok(ids
            .into_iter()
            .zip(written)
            .map(|(id, w)| outcome(id, w))
            .collect())
    }

    /// Writes prepared messages to the partitions their routing keys pick (all to the
    /// topic's keys when it is plain), 1,000 per script call; the answers in order. When
    /// the topic's layout changed since this client read it, reads it again and writes
    /// again (publish is idempotent by id).
    async fn write_routed(
        &self,
        topic: &str,
        items: &[PublishItem],
        routes: &[(String, bool)],
    ) -> Result<Vec<Written>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.register(topic).await?;
        let mut layout = self.layout(topic).await?;
        let mut again = true;
        loop {
            match self.write_layout(&layout, items, routes).await {
                Err(e) if again && layout_changed(&e) => {
                    again = false;
                    layout = self.fresh_layout(topic).await?;
                }
                other => return other,
            }
        }
    }

    async fn write_layout(
        &self,
        layout: &TopicLayout,
        items: &[PublishItem],
        routes: &[(String, bool)],
    ) -> Result<Vec<Written>> {
        let n = layout.count();
        if n > 1 && routes.iter().any(|(_, both)| *both) {
            return Err(Error::Conflict(format!(
                "{:?} is partitioned: a message with a unique key goes to the partition its unique key picks, so give a partition key or a unique key, not both",
                layout.partitions[0].topic
            )));
        }
        let mut per_partition: Vec<Vec<usize>> = vec![Vec::new(); layout.partitions.len()];
        for (i, (route, _)) in routes.iter().enumerate() {
            let p = if n > 1 { partition_of(route, n) } else { 0 };
            per_partition[p as usize].push(i);
        }
        let writes = per_partition
            .iter()
            .enumerate()
            .filter(|(_, idx)| !idx.is_empty())
            .map(|(p, idx)| async move {
                let keys = &layout.partitions[p];
                if let [i] = idx.as_slice() {
                    // One message: it shares a call with whatever else is published
                    // to this topic meanwhile.
                    let written = self.write_coalesced(keys, n, items[*i].clone()).await?;
                    return Ok::<_, Error>((idx, vec![written]));
                }
                // Two chunks in flight: Redis runs one while the next one's arguments are
                // built and sent (same connection, so they still run in order). Not with
                // replicated writes: each takes a connection of its own, in no set order.
                let in_flight_max = if self.inner.store.replicated() {
                    1
                } else {
                    CHUNKS_IN_FLIGHT
                };
                let chunks: Vec<Vec<&PublishItem>> = idx
                    .chunks(PUBLISH_CHUNK)
                    .map(|chunk| chunk.iter().map(|&i| &items[i]).collect())
                    .collect();
                let mut written = Vec::with_capacity(idx.len());
                let mut in_flight = futures::stream::FuturesOrdered::new();
                for chunk in &chunks {
                    if in_flight.len() == in_flight_max {
                        if let Some(done) = in_flight.next().await {
                            written.extend(done?);
                        }
                    }
                    in_flight.push_back(self.write(keys, n, chunk));
                }
                while let Some(done) = in_flight.next().await {
                    written.extend(done?);
                }
                Ok::<_, Error>((idx, written))
            });
        let mut out: Vec<Option<Written>> = (0..items.len()).map(|_| None).collect();
        for (idx, written) in futures::future::try_join_all(writes).await? {
            for (&i, w) in idx.iter().zip(written) {
                out[i] = Some(w);
            }
        }
        Ok(out.into_iter().map(|w| w.unwrap_or(Written::New)).collect())
    }

    /// Checks a message as [`Client::publish_with`] would (topic name, serializable data,
    /// nesting, size, options) without sending anything: for tools that must refuse a whole
    /// import before writing any of it.
    pub fn validate_message<D: Serialize>(
        &self,
        topic: &str,
        data: D,
        options: &PublishOptions,
    ) -> Result<()> {
        validate_topic(topic)?;
        let id = options.id.clone().unwrap_or_else(MessageId::generate);
        self.prepare(topic, &id, data, options, &now_rfc3339())
            .map(|_| ())
    }

    /// Checks and encodes one message published now (a schedule's).
    pub(crate) fn prepare_item(
        &self,
        topic: &str,
        id: &MessageId,
        data: &Value,
        options: &PublishOptions,
    ) -> Result<PublishItem> {
        self.prepare(topic, id, data, options, &now_rfc3339())
    }

    /// Checks and encodes one message; `timestamp` is the time of publishing (one per call,
    /// however many messages it holds).
    fn prepare<D: Serialize>(
        &self,
        topic: &str,
        id: &MessageId,
        data: D,
        options: &PublishOptions,
        timestamp: &str,
    ) -> Result<PublishItem> {
        if let Some(key) = &options.partition_key {
            if key.is_empty() || key.len() > 200 || key.chars().any(char::is_control) {
                return Err(Error::Config(
                    "partition_key must be 1-200 bytes without control characters".into(),
                ));
            }
        }
        if let Some(group) = &options.group {
            crate::group::check_group_name(group)?;
        }
        if let Some((key, ttl)) = &options.unique {
            if key.is_empty() || key.len() > 200 || key.chars().any(char::is_control) {
                return Err(Error::Config(
                    "unique_key must be 1-200 bytes without control characters".into(),
                ));
            }
            if ttl.as_millis() == 0 {
                return Err(Error::Config("unique_key ttl must be at least 1ms".into()));
            }
        }
        let data = serde_json::value::to_raw_value(&data).map_err(Error::Serialize)?;
        let shape = json_shape(data.get().as_bytes());
        if shape.depth > MAX_NESTING {
            return Err(Error::InvalidData(format!(
                "data is nested more than {MAX_NESTING} levels deep; consumers could not decode it"
            )));
        }
        // serde_json writes a u128/i128 beyond 64 bits as is; consumers could not read it
        // without rounding (they would dead-letter it), so it is refused here.
        if shape.big_integer {
            return Err(Error::InvalidData(
                "data holds an integer that does not fit in 64 bits; send it as a string".into(),
            ));
        }
        #[cfg(feature = "otel")]
        let headers = crate::otel::with_current_context(&options.headers);
        #[cfg(not(feature = "otel"))]
        let headers = std::borrow::Cow::Borrowed(&options.headers);
        crate::message::check_headers(&headers)?;
        let body = Envelope::encode_new(
            id,
            topic,
            &data,
            timestamp,
            options.max_retry,
            &headers,
            options.group.as_deref(),
        );
        if body.len() > self.inner.max_payload {
            return Err(Error::PayloadTooLarge {
                size: body.len(),
                limit: self.inner.max_payload,
            });
        }
        Ok(PublishItem {
            id: id.as_str().to_owned(),
            delay: options.delay.unwrap_or_default(),
            body,
            unique: options
                .unique
                .clone()
                .map(|(key, ttl)| (key, ttl, options.unique_until == UniqueUntil::Final)),
            group: options.group.clone(),
        })
    }

    /// Writes prepared messages to one topic's (or partition's) keys, retrying transient
    /// failures with the same ids.
    pub(crate) async fn write(
        &self,
        keys: &TopicKeys,
        partitions: u32,
        items: &[&PublishItem],
    ) -> Result<Vec<Written>> {
        let mut attempt = 1;
        loop {
            match self.inner.store.publish(keys, partitions, items).await {
                Err(e) if e.is_transient() && attempt < PUBLISH_ATTEMPTS => {
                    tracing::warn!(topic = %keys.topic, attempt, error = %e, "publish failed; retrying with the same ids");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Adds the topic to the registry unless this client did so within the last minute.
    pub(crate) async fn register(&self, topic: &str) -> Result<()> {
        let fresh = |map: &HashMap<String, std::time::Instant>| {
            map.get(topic)
                .is_some_and(|at| at.elapsed() < REGISTRATION_REFRESH)
        };
        if fresh(
            &self
                .inner
                .registered
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        ) {
            return Ok(());
        }
        self.inner.store.register_topic(topic).await?;
        self.inner
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned(), std::time::Instant::now());
        Ok(())
    }

    /// Messages waiting to be consumed in `topic` (not counting active, delayed or dead
    /// ones, nor history). Drops to 0 once everything is consumed.
    pub async fn get_queue_length(&self, topic: &str) -> Result<u64> {
        Ok(self.stats(topic).await?.pending)
    }

    /// Runs `op` on every partition of `topic` at once (once for a plain topic); the
    /// answers in partition order. The layout is read fresh: these are changes, which must
    /// not act on a layout that changed a moment ago.
    async fn each_partition<'a, T, F, Fut>(&'a self, topic: &str, op: F) -> Result<Vec<T>>
    where
        F: Fn(TopicKeys) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + 'a,
    {
        let layout = self.fresh_layout(topic).await?;
        futures::future::try_join_all(layout.partitions.iter().cloned().map(op)).await
    }

    /// Counts per state and the counters of one topic. For a partitioned topic: the sums,
    /// with each partition's own figures in [`QueueStats::partitions`].
    pub async fn stats(&self, topic: &str) -> Result<QueueStats> {
        let layout = self.layout(topic).await?;
        let store = &self.inner.store;
        let plain = store.ns.topic(topic);
        let (raws, (consumers, now_ms)) = futures::future::try_join(
            futures::future::try_join_all(layout.partitions.iter().map(|keys| store.stats(keys))),
            store.topic_consumers(&plain),
        )
        .await?;
        let workers = crate::registry::consumer_counts(consumers.values(), now_ms);
        // A topic that ever had grouped messages keeps the counter.
        let grouped = raws.iter().any(|r| r.counters.contains_key("grouped"));
        let groups = if grouped {
            self.groups(topic).await?
        } else {
            Vec::new()
        };
        let mut parts: Vec<QueueStats> = raws
            .into_iter()
            .zip(&layout.partitions)
            .map(|(raw, keys)| {
                let mut p = QueueStats::from_raw(topic, keys.partition, &raw);
                // Workers consume the whole topic: every partition.
                p.set_workers(workers);
                p
            })
            .collect();
        if parts.len() == 1 {
            let mut only = parts.remove(0);
            only.partition = None;
            only.groups = groups;
            return Ok(only);
        }
        let mut total = QueueStats {
            topic: topic.to_owned(),
            ..QueueStats::default()
        };
        for p in &parts {
            total.add(p);
        }
        total.set_workers(workers);
        total.partitions = parts;
        total.groups = groups;
        Ok(total)
    }

    /// Names of every topic ever published to in this namespace, sorted; read from the
    /// topic registry (`mq:topics`), never by scanning the keyspace. Names planted by hand
    /// that break the naming rules are left out.
    pub async fn topics(&self) -> Result<Vec<String>> {
        let mut topics = self.inner.store.topics().await?;
        topics.retain(|t| validate_topic(t).is_ok());
        Ok(topics)
    }

    /// Stats of every topic ever published to in this namespace, sorted by name.
    /// Read from the topic registry (`mq:topics`), never by scanning the keyspace.
    pub async fn get_all_queues(&self) -> Result<Vec<QueueStats>> {
        let mut all = Vec::new();
        for topic in self.topics().await? {
            all.push(self.stats(&topic).await?);
        }
        Ok(all)
    }

    /// A page of the dead-letter queue of `topic`, oldest first: `0..50` is the first 50.
    pub async fn get_dead_letters(
        &self,
        topic: &str,
        range: Range<usize>,
    ) -> Result<Vec<DeadLetter>> {
        Ok(self
            .peek(topic, MessageState::Dead, range)
            .await?
            .into_iter()
            .map(DeadLetter::from)
            .collect())
    }

    /// The dead letters of `topic` whose error contains `text` (ignoring case), oldest
    /// first, as [`Client::peek`] shows them (`DeadLetter::from` turns one into a
    /// [`DeadLetter`]); `range` pages through the matches (at most 1,000 at a time). Reads the
    /// oldest 10,000 dead letters of each partition, which is all of them under the
    /// default retention ([`DEFAULT_DEAD_LETTER_MAX_LEN`]).
    pub async fn dead_letters_matching(
        &self,
        topic: &str,
        text: &str,
        range: Range<usize>,
    ) -> Result<Vec<PeekedMessage>> {
        let layout = self.layout(topic).await?;
        let end = range.end.min(range.start.saturating_add(MAX_PER_CALL));
        if range.start >= end {
            return Ok(Vec::new());
        }
        let needle = text.to_lowercase();
        let store = &self.inner.store;
        let scans = futures::future::try_join_all(layout.partitions.iter().map(|keys| {
            let needle = &needle;
            async move {
                let mut found = Vec::new();
                let mut from = 0;
                while from < DEAD_LETTER_SCAN {
                    let page = store
                        .peek(keys, PeekState::Dead, from, from + MAX_PER_CALL - 1)
                        .await?;
                    from += MAX_PER_CALL;
                    let last = page.len() < MAX_PER_CALL;
                    for (id, score, body) in page {
                        let Some(body) = body else { continue };
                        let m = peeked(topic, &id, MessageState::Dead, &body, score);
                        let hit = m
                            .error
                            .as_deref()
                            .is_some_and(|e| e.to_lowercase().contains(needle.as_str()));
                        if hit {
                            found.push(m);
                        }
                    }
                    if last {
                        break;
                    }
                }
                Ok::<_, Error>(found)
            }
        }))
        .await?;
        let mut all: Vec<PeekedMessage> = scans.into_iter().flatten().collect();
        all.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.id.cmp(&b.id)));
        Ok(all
            .into_iter()
            .skip(range.start)
            .take(end - range.start)
            .collect())
    }

    /// Looks at the messages of one state without taking them, in order (pending: next
    /// to run first; delayed: soonest due first; active: soonest lease expiry first; dead:
    /// oldest first). `0..20` is the first 20, at most 1,000 at a time.
    ///
    /// A partitioned topic merges its partitions: by time for delayed, active and dead,
    /// and the heads of the partitions in turn for pending (there is no order across
    /// partitions). Its pages reach 10,000 deep.
    pub async fn peek(
        &self,
        topic: &str,
        state: MessageState,
        range: Range<usize>,
    ) -> Result<Vec<PeekedMessage>> {
        let layout = self.layout(topic).await?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let which = match state {
            MessageState::Pending => PeekState::Pending,
            MessageState::Delayed => PeekState::Delayed,
            MessageState::Active => PeekState::Active,
            MessageState::Dead => PeekState::Dead,
        };
        let end = range.end.min(range.start.saturating_add(MAX_PER_CALL));
        let store = &self.inner.store;
        let rows = if layout.is_partitioned() {
            // Every partition's first `end`, merged, then the page cut out of that.
            let end = end.min(PARTITIONED_PEEK_DEPTH);
            if range.start >= end {
                return Ok(Vec::new());
            }
            // Ids and scores only, from every partition; the bodies of the page alone.
            let pages = futures::future::try_join_all(
                layout
                    .partitions
                    .iter()
                    .map(|keys| store.ranked(keys, which, 0, end - 1)),
            )
            .await?;
            let mut merged: Vec<(usize, RankedId)> = Vec::new();
            if which == PeekState::Pending {
                let mut iters: Vec<_> = pages.into_iter().map(Vec::into_iter).collect();
                while merged.len() < end {
                    let before = merged.len();
                    for (p, it) in iters.iter_mut().enumerate() {
                        merged.extend(it.next().map(|row| (p, row)));
                    }
                    if merged.len() == before {
                        break;
                    }
                }
            } else {
                merged = pages
                    .into_iter()
                    .enumerate()
                    .flat_map(|(p, rows)| rows.into_iter().map(move |row| (p, row)))
                    .collect();
                merged.sort_by(|a, b| {
                    a.1 .1
                        .unwrap_or(0.0)
                        .total_cmp(&b.1 .1.unwrap_or(0.0))
                        .then_with(|| a.1 .0.cmp(&b.1 .0))
                });
            }
            let page: Vec<(usize, RankedId)> = merged
                .into_iter()
                .skip(range.start)
                .take(end - range.start)
                .collect();
            let mut per_partition: Vec<Vec<(Vec<u8>, Option<f64>)>> =
                vec![Vec::new(); layout.partitions.len()];
            for (p, row) in &page {
                per_partition[*p].push(row.clone());
            }
            let bodies = futures::future::try_join_all(
                layout
                    .partitions
                    .iter()
                    .zip(&per_partition)
                    .map(|(keys, rows)| store.bodies(keys, rows)),
            )
            .await?;
            let mut bodies: Vec<std::vec::IntoIter<Option<Vec<u8>>>> =
                bodies.into_iter().map(Vec::into_iter).collect();
            page.into_iter()
                .map(|(p, (id, score))| {
                    let body = bodies[p].next().flatten();
                    (p, String::from_utf8_lossy(&id).into_owned(), score, body)
                })
                .collect()
        } else {
            store
                .peek(&layout.partitions[0], which, range.start, end - 1)
                .await?
                .into_iter()
                .map(|(id, score, body)| (0, id, score, body))
                .collect::<Vec<_>>()
        };
        // Who runs the active ones, and since when.
        let mut holders: HashMap<(usize, String), (Option<String>, Option<i64>)> = HashMap::new();
        if state == MessageState::Active {
            let mut ids: Vec<Vec<String>> = vec![Vec::new(); layout.partitions.len()];
            for (p, id, _, _) in &rows {
                ids[*p].push(id.clone());
            }
            let found = futures::future::try_join_all(
                layout
                    .partitions
                    .iter()
                    .zip(&ids)
                    .map(|(keys, ids)| store.holders(keys, ids)),
            )
            .await?;
            for (p, (ids, found)) in ids.into_iter().zip(found).enumerate() {
                for (id, h) in ids.into_iter().zip(found) {
                    holders.insert((p, id), h);
                }
            }
        }
        Ok(rows
            .iter()
            .filter_map(|(p, id, score, body)| {
                // Gone between the two reads (acked, trimmed): not there any more.
                let mut m = peeked(topic, id, state, body.as_deref()?, *score);
                if let Some((token, since)) = holders.remove(&(*p, id.clone())) {
                    m.holder = token
                        .as_deref()
                        .and_then(crate::registry::holder_of)
                        .map(str::to_owned);
                    m.started_at = since.map(|ms| from_millis(ms as f64));
                }
                Some(m)
            })
            .collect())
    }

    /// One message by id, in whatever state it is: its envelope, and for an active one who
    /// runs it and since when. `None` when the topic has no message with that id (it was
    /// processed and acknowledged, cancelled, purged, or never published). A partitioned
    /// topic asks every partition at once.
    pub async fn message(&self, topic: &str, id: &MessageId) -> Result<Option<PeekedMessage>> {
        let layout = self.layout(topic).await?;
        let store = &self.inner.store;
        let found = futures::future::try_join_all(
            layout
                .partitions
                .iter()
                .map(|keys| store.lookup(keys, id.as_str())),
        )
        .await?;
        let Some(raw) = found.into_iter().find(|r| r.body.is_some()) else {
            return Ok(None);
        };
        let (state, at) = if let Some(at) = raw.active {
            (MessageState::Active, Some(at))
        } else if let Some(at) = raw.delayed {
            (MessageState::Delayed, Some(at))
        } else if let Some(at) = raw.dead {
            (MessageState::Dead, Some(at))
        } else {
            (MessageState::Pending, raw.ready)
        };
        let body = raw.body.unwrap_or_default();
        let mut m = peeked(topic, id.as_str(), state, &body, at);
        if state == MessageState::Active {
            m.holder = raw
                .lease
                .as_deref()
                .and_then(crate::registry::holder_of)
                .map(str::to_owned);
            m.started_at = raw.started.map(|ms| from_millis(ms as f64));
        }
        Ok(Some(m))
    }

    /// Moves one dead letter back to the queue with a fresh set of retries.
    /// [`Error::NotFound`] when `topic` has no dead letter with that id.
    pub async fn reprocess_dead_letter(&self, topic: &str, id: &MessageId) -> Result<()> {
        let store = &self.inner.store;
        let done = self
            .each_partition(topic, |keys| async move {
                Ok(store
                    .reprocess(&keys, &[id.as_str()])
                    .await?
                    .first()
                    .copied()
                    .unwrap_or(false))
            })
            .await?;
        if done.contains(&true) {
            Ok(())
        } else {
            Err(self.no_dead_letter(topic, id))
        }
    }

    /// Moves every dead letter of `topic` back to the queue (oldest first, 1,000 per
    /// script call; a partitioned topic one partition after another, not atomically
    /// across them); returns how many. Bounded by the dead letters there were when it
    /// started: ones that die again meanwhile are not chased.
    pub async fn reprocess_all_dead_letters(&self, topic: &str) -> Result<u64> {
        let layout = self.fresh_layout(topic).await?;
        let mut total = 0;
        for keys in &layout.partitions {
            total += self.reprocess_all_in(keys).await?;
        }
        Ok(total)
    }

    async fn reprocess_all_in(&self, keys: &TopicKeys) -> Result<u64> {
        let at_start = self.inner.store.stats(keys).await?.dead;
        let (mut requeued, mut skipped) = (0u64, 0u64);
        while requeued + skipped < at_start {
            // Entries that can't be requeued (no body) stay at the front: step past them.
            let from = usize::try_from(skipped).unwrap_or(usize::MAX);
            let page = self
                .inner
                .store
                .peek(keys, PeekState::Dead, from, from + MAX_PER_CALL - 1)
                .await?;
            if page.is_empty() {
                break;
            }
            let ids: Vec<&str> = page.iter().map(|(id, _, _)| id.as_str()).collect();
            let done = self.inner.store.reprocess(keys, &ids).await?;
            let n = done.iter().filter(|d| **d).count() as u64;
            requeued += n;
            skipped += done.len() as u64 - n;
        }
        Ok(requeued)
    }

    /// Deletes one dead letter for good. [`Error::NotFound`] when there is none with that id.
    pub async fn delete_dead_letter(&self, topic: &str, id: &MessageId) -> Result<()> {
        let store = &self.inner.store;
        let gone = self
            .each_partition(topic, |keys| async move {
                Ok(!store.drop_dead(&keys, &[id.as_str()], 0).await?.is_empty())
            })
            .await?;
        if gone.contains(&true) {
            Ok(())
        } else {
            Err(self.no_dead_letter(topic, id))
        }
    }

    /// Deletes every dead letter of `topic` for good (1,000 per script call; a partitioned
    /// topic one partition after another); returns how many. The other states are
    /// untouched.
    pub async fn purge_dead_letters(&self, topic: &str) -> Result<u64> {
        let layout = self.fresh_layout(topic).await?;
        let mut total = 0;
        for keys in &layout.partitions {
            // Bounded by what was there at the start: messages dying meanwhile don't keep
            // it going.
            let at_start = self.inner.store.stats(keys).await?.dead;
            let mut here = 0;
            while here < at_start {
                let gone = self.inner.store.drop_dead(keys, &[], MAX_PER_CALL).await?;
                if gone.is_empty() {
                    break;
                }
                here += gone.len() as u64;
            }
            total += here;
        }
        Ok(total)
    }

    /// Moves these dead letters back to the queue with a fresh set of retries (1,000 ids
    /// per script call); returns how many were moved. Ids that are not dead letters of
    /// `topic` (any more) are skipped, not an error: the selection may be a little old.
    pub async fn reprocess_dead_letters(&self, topic: &str, ids: &[MessageId]) -> Result<u64> {
        let store = &self.inner.store;
        let ids: Vec<&str> = ids.iter().map(MessageId::as_str).collect();
        let ids = &ids;
        let moved = self
            .each_partition(topic, |keys| async move {
                let mut n = 0;
                for chunk in ids.chunks(MAX_PER_CALL) {
                    n += store
                        .reprocess(&keys, chunk)
                        .await?
                        .iter()
                        .filter(|d| **d)
                        .count();
                }
                Ok(n as u64)
            })
            .await?;
        Ok(moved.iter().sum())
    }

    /// Deletes these dead letters for good (1,000 ids per script call); returns how many
    /// were deleted. Ids that are not dead letters of `topic` (any more) are skipped.
    pub async fn delete_dead_letters(&self, topic: &str, ids: &[MessageId]) -> Result<u64> {
        let store = &self.inner.store;
        let ids: Vec<&str> = ids.iter().map(MessageId::as_str).collect();
        let ids = &ids;
        let gone = self
            .each_partition(topic, |keys| async move {
                let mut n = 0;
                for chunk in ids.chunks(MAX_PER_CALL) {
                    n += store.drop_dead(&keys, chunk, 0).await?.len();
                }
                Ok(n as u64)
            })
            .await?;
        Ok(gone.iter().sum())
    }

    fn no_dead_letter(&self, topic: &str, id: &MessageId) -> Error {
        Error::NotFound {
            topic: topic.to_owned(),
            id: id.to_string(),
            what: "dead letter",
        }
    }

    /// Deletes every message of `topic` in every state (pending, delayed, active, dead),
    /// the unique keys its messages hold and its processed ledger, and returns how many
    /// messages there were per state. Counters and the topic's registration stay; running
    /// workers go on with what is published next (their outcomes for purged messages are
    /// refused). A partitioned topic is purged one partition after another, not
    /// atomically across them.
    pub async fn purge_queue(&self, topic: &str) -> Result<Purged> {
        let layout = self.fresh_layout(topic).await?;
        let mut total = Purged::default();
        for keys in &layout.partitions {
            let (pending, active, delayed, dead) = self.inner.store.purge(keys).await?;
            total.pending += pending;
            total.active += active;
            total.delayed += delayed;
            total.dead += dead;
        }
        Ok(total)
    }

    /// Cancels a message that has not started: a delayed one (e.g. the payment check of
    /// an order that was paid) or a pending one. Returns the state it was removed from.
    /// [`Error::NotCancellable`] when a handler is running it (or it is dead);
    /// [`Error::NotFound`] when it does not exist (already processed, or never published).
    /// On a partitioned topic every partition is asked at once.
    pub async fn cancel(&self, topic: &str, id: &MessageId) -> Result<Cancelled> {
        let store = &self.inner.store;
        let states = self
            .each_partition(topic, |keys| async move {
                store.cancel(&keys, id.as_str()).await
            })
            .await?;
        let not = |state, hint| Error::NotCancellable {
            topic: topic.to_owned(),
            id: id.to_string(),
            state,
            hint,
        };
        let found = |s: CancelState| states.contains(&s);
        if found(CancelState::Delayed) {
            Ok(Cancelled::Delayed)
        } else if found(CancelState::Pending) {
            Ok(Cancelled::Pending)
        } else if found(CancelState::Active) {
            Err(not(
                "active",
                " (a handler is running it; make the handler check whether its work is still wanted)",
            ))
        } else if found(CancelState::Dead) {
            Err(not("dead", " (it is in the dead-letter queue already)"))
        } else {
            Err(Error::NotFound {
                topic: topic.to_owned(),
                id: id.to_string(),
                what: "waiting message",
            })
        }
    }

    /// Pauses a topic: publishing still works, but workers in every process stop taking
    /// its messages (running handlers finish). Takes effect at each worker's next fetch.
    /// A partitioned topic is paused partition by partition.
    pub async fn pause(&self, topic: &str) -> Result<()> {
        let store = &self.inner.store;
        self.each_partition(topic, |keys| async move { store.pause(&keys).await })
            .await?;
        Ok(())
    }

    /// Resumes a paused topic and wakes its workers. Returns whether it was paused.
    pub async fn resume(&self, topic: &str) -> Result<bool> {
        let store = &self.inner.store;
        let was = self
            .each_partition(topic, |keys| async move { store.resume(&keys).await })
            .await?;
        Ok(was.contains(&true))
    }

    /// Settings of the Redis server that put messages at risk: an eviction policy other
    /// than `noeviction` (Redis may delete queued messages when full), persistence switched
    /// off (a restart loses everything), or a server that refuses `CONFIG GET` (managed
    /// services, ACL users without `+config|get`), so that nothing could be verified.
    /// Empty when all is well.
    pub async fn server_warnings(&self) -> Result<Vec<ServerWarning>> {
        let nodes = self
            .inner
            .store
            .config_get(&["maxmemory-policy", "appendonly", "save"])
            .await?;
        let mut warnings = Vec::new();
        for node in nodes {
            // On a cluster, every master is checked and named.
            let on = node
                .node
                .as_deref()
                .map(|n| format!(" (master {n})"))
                .unwrap_or_default();
            let config = match node.config {
                Ok(config) => config,
                Err(refusal) => {
                    warnings.push(ServerWarning {
                        kind: WarningKind::Unverified,
                        message: format!(
                            "could not verify that Redis{on} keeps messages safe (eviction policy, persistence): CONFIG GET was refused ({refusal}). Check `maxmemory-policy noeviction` and `appendonly yes` by hand."
                        ),
                    });
                    continue;
                }
            };
            if let Some(policy) = config.get("maxmemory-policy") {
                if policy != "noeviction" {
                    warnings.push(ServerWarning {
                        kind: WarningKind::EvictionPolicy,
                        message: format!(
                            "Redis{on} maxmemory-policy is {policy:?}: when memory fills up Redis will evict queued messages. Set `maxmemory-policy noeviction`."
                        ),
                    });
                }
            }
            let aof = config.get("appendonly").is_some_and(|v| v == "yes");
            let rdb = config.get("save").is_some_and(|v| !v.trim().is_empty());
            if !aof && !rdb {
                warnings.push(ServerWarning {
                    kind: WarningKind::PersistenceOff,
                    message: format!("Redis{on} persistence is off (no AOF, no RDB snapshots): a Redis restart loses every queued message. Set `appendonly yes`."),
                });
            } else if !aof {
                warnings.push(ServerWarning {
                    kind: WarningKind::AofOff,
                    message: format!("Redis{on} AOF is off: a crash loses the messages published since the last RDB snapshot. Set `appendonly yes`."),
                });
            }
        }
        Ok(warnings)
    }

    /// Messages published, processed and failed per minute over the last 60 minutes,
    /// oldest first, one entry per minute (zeros included), counted by the scripts
    /// themselves (every process sees the same numbers).
    pub async fn throughput(&self, topic: &str) -> Result<Vec<MinuteCounts>> {
        let store = &self.inner.store;
        let rings = self
            .each_partition(topic, |keys| async move { store.minutes(&keys).await })
            .await?;
        let now_ms = rings.iter().map(|(now, _)| *now).max().unwrap_or(0);
        let this_minute = now_ms.div_euclid(60_000);
        Ok((this_minute - 59..=this_minute)
            .map(|minute| {
                let (mut published, mut processed, mut failed) = (0, 0, 0);
                for (_, slots) in &rings {
                    if let Some(s) = slots.iter().find(|s| s.0 == minute) {
                        published += s.1;
                        processed += s.2;
                        failed += s.3;
                    }
                }
                MinuteCounts {
                    minute: from_millis((minute * 60_000) as f64),
                    published,
                    processed,
                    failed,
                }
            })
            .collect())
    }

    /// Checks that Redis answers and accepts writes (for readiness probes): writes a
    /// marker key `NS:readyz` that expires after 10 s.
    pub async fn check_writable(&self) -> Result<()> {
        self.inner.store.check_writable().await
    }

    /// The largest serialized message this client accepts.
    pub fn max_payload(&self) -> usize {
        self.inner.max_payload
    }
}
