//! The library's one error type.

use std::time::Duration;

/// Everything that can go wrong in ForgeMQ.
///
/// Errors carry what a caller needs to react: predicates such as [`Error::is_transient`]
/// say whether trying again may help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic name broke the naming rules; nothing was written.
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopic {
        /// The name as given.
        topic: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A namespace broke the naming rules (the same as for topics).
    #[error("invalid namespace {namespace:?}: {reason}")]
    InvalidNamespace {
        /// The namespace as given.
        namespace: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A caller-chosen message id was empty, too long or had control characters or spaces.
    #[error("invalid message id {id:?}: {reason}")]
    InvalidId {
        /// The id as given.
        id: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// The serialized message is larger than the configured limit; nothing was written.
    #[error("message of {size} bytes is over the {limit}-byte limit (raise it with ClientBuilder::max_payload)")]
    PayloadTooLarge {
        /// Size of the serialized envelope in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The data can be serialized but would not decode again on the consuming side.
    #[error("message data refused: {0}")]
    InvalidData(String),
    /// The data could not be serialized to JSON.
    #[error("message data is not serializable to JSON: {0}")]
    Serialize(#[source] serde_json::Error),
    /// No message with that id is in the state the operation needs.
    #[error("no {what} with id {id:?} in topic {topic:?}")]
    NotFound {
        /// The topic searched.
        topic: String,
        /// The id looked for.
        id: String,
        /// What was looked for, e.g. "dead letter".
        what: &'static str,
    },
    /// The message can't be cancelled in its current state.
    #[error("message {id:?} of topic {topic:?} can't be cancelled: it is {state}{hint}")]
    NotCancellable {
        /// The message's topic.
        topic: String,
        /// The message id.
        id: String,
        /// Its state: "active" (a handler is running it) or "dead".
        state: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// The delivery's lease is no longer this worker's: it expired and the message was
    /// handed to another worker, or it was completed or purged meanwhile.
    #[error("lease lost for message {id:?} of topic {topic:?}: another delivery owns it now")]
    LeaseLost {
        /// The message's topic.
        topic: String,
        /// The message id.
        id: String,
    },
    /// An option was out of range; the message says which and why.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A worker was built without any subscription.
    #[error("the worker has no subscriptions: call subscribe() before build()")]
    NoSubscriptions,
    /// The worker was told to refuse a Redis server that puts messages at risk
    /// (`WorkerBuilder::require_safe_redis`), and this one does.
    #[error("refusing to run on this Redis: {}", .0.join(" "))]
    UnsafeRedis(Vec<String>),
    /// Redis answered with an error, or could not be reached within the timeout.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered with something this version of ForgeMQ does not understand.
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
    /// An operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The request does not fit the topic as it is now (e.g. a partition key together with
    /// a unique key on a partitioned topic); nothing was written.
    #[error("{0}")]
    Conflict(String),
    /// Redis could not be reached at start-up: no seed or sentinel answered, or a cluster
    /// is not `cluster_state:ok`. The message names the nodes and what they said.
    #[error("could not connect to Redis: {0}")]
    Connect(String),
    /// A topic's partition count can change only while it holds no message; it holds some.
    #[error("topic {topic:?} holds {messages} message(s): its partition count ({partitions}) can change only while it is empty; consume or purge it first")]
    TopicNotEmpty {
        /// The topic.
        topic: String,
        /// Messages it holds, in every state.
        messages: u64,
        /// Its partition count now.
        partitions: u32,
    },
    /// The write is on the master but fewer replicas than asked confirmed it in time
    /// (`ClientBuilder::replicas`): it would be lost if the master failed now. A publish
    /// can be sent again with the same id (it is stored once); a settle is sent again by
    /// the worker.
    #[error("written, but only {acked} of {wanted} replicas confirmed it in time")]
    NotReplicated {
        /// Replicas that confirmed the write.
        acked: usize,
        /// Replicas asked for.
        wanted: usize,
    },
}

impl Error {
    /// True when the same call may succeed if tried again later: Redis unreachable, a
    /// dropped connection, a timeout, Redis loading its data or briefly paused.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || server_codes(e).iter().any(|c| {
                        matches!(
                            c.as_str(),
                            "LOADING"
                                | "TRYAGAIN"
                                | "MASTERDOWN"
                                | "BUSY"
                                | "READONLY"
                                | "CLUSTERDOWN"
                                | "MOVED"
                                | "ASK"
                        )
                    })
            }
            Error::Timeout(_) | Error::Connect(_) => true,
            _ => false,
        }
    }

    /// True when Redis refused a write because it is out of memory (`maxmemory` reached
    /// with `noeviction`): nothing was written; consume or raise `maxmemory`, then retry.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Redis(e) if server_codes(e).iter().any(|c| c == "OOM"))
    }

    /// True when a node refused a write because it is a replica now (`READONLY`): a master
    /// was demoted by a failover; the client follows the new master.
    pub fn is_read_only(&self) -> bool {
        matches!(self, Error::Redis(e) if server_codes(e).iter().any(|c| c == "READONLY"))
    }

    /// True when the Redis user lacks a permission (`NOPERM`, from an ACL).
    pub fn is_no_permission(&self) -> bool {
        matches!(self, Error::Redis(e) if server_codes(e).iter().any(|c| c == "NOPERM"))
    }

    /// True for [`Error::NotReplicated`].
    pub fn is_not_replicated(&self) -> bool {
        matches!(self, Error::NotReplicated { .. })
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// True for [`Error::LeaseLost`].
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost { .. })
    }

    /// True when the caller's input was refused before anything was written.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidTopic { .. }
                | Error::InvalidNamespace { .. }
                | Error::InvalidId { .. }
                | Error::PayloadTooLarge { .. }
                | Error::InvalidData(_)
                | Error::Serialize(_)
                | Error::Config(_)
        )
    }
}

/// The error codes (`OOM`, `LOADING`, ...) of a Redis error, also those of the commands of
/// a failed pipeline (a publish is one: the topic registration and its script).
pub(crate) fn server_codes(e: &redis::RedisError) -> Vec<String> {
    let mut codes: Vec<String> = e.code().map(str::to_owned).into_iter().collect();
    if let Some(errors) = e.clone().into_server_errors() {
        codes.extend(errors.iter().map(|(_, se)| se.code().to_owned()));
    }
    // Redis 6.2 wraps an error raised inside a script: `ERR Error running script (call to
    // f_…): @user_script:…: -OOM command not allowed …`. The code inside is what counts.
    let text = e.to_string();
    for code in WRAPPED_CODES {
        if text.contains(&format!("-{code} ")) {
            codes.push((*code).to_owned());
        }
    }
    codes
}

/// The error codes looked for inside a wrapped script error.
const WRAPPED_CODES: &[&str] = &[
    "PARTITIONED",
    "OOM",
    "LOADING",
    "TRYAGAIN",
    "MASTERDOWN",
    "BUSY",
    "NOSCRIPT",
    "READONLY",
    "NOPERM",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
];

/// `Result` with ForgeMQ's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
