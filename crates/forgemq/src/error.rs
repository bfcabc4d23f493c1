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
    /// The same error for another caller of a call that several callers shared (a
    /// coalesced publish): same variant and text where the variant can be copied.
    pub(crate) fn for_another_caller(&self) -> Error {
        match self {
            Error::Redis(e) => Error::Redis(e.clone()),
            Error::Timeout(d) => Error::Timeout(*d),
            Error::Protocol(m) => Error::Protocol(m.clone()),
            Error::Conflict(m) => Error::Conflict(m.clone()),
            Error::Connect(m) => Error::Connect(m.clone()),
            Error::Config(m) => Error::Config(m.clone()),
            Error::InvalidData(m) => Error::InvalidData(m.clone()),
            Error::NotReplicated { acked, wanted } => Error::NotReplicated {
                acked: *acked,
                wanted: *wanted,
            },
            Error::TopicNotEmpty {
                topic,
                messages,
                partitions,
            } => Error::TopicNotEmpty {
                topic: topic.clone(),
                messages: *messages,
                partitions: *partitions,
            },
            other => Error::Protocol(other.to_string()),
        }
    }

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
/// a failed pipeline (a publish is one: the topic registration and its script), and those
/// wrapped inside a script error.
pub(crate) fn server_codes(e: &redis::RedisError) -> Vec<String> {
    let mut codes: Vec<String> = e.code().map(str::to_owned).into_iter().collect();
    if let Some(errors) = e.clone().into_server_errors() {
        codes.extend(errors.iter().map(|(_, se)| se.code().to_owned()));
    }
    // Redis 7 keeps the code of an error raised inside a script (`OOM command not allowed
    // … script: …`), but Redis 6.2 wraps it: `ERR Error running script (call to f_…):
    // @user_script:1: @user_script: 1: -OOM command not allowed …`. The code inside is
    // what counts. The text of a pipeline failure holds each command's error the same way.
    let text = e.to_string();
    for code in WRAPPED_CODES {
        if text.contains(&format!(": -{code} ")) {
            codes.push((*code).to_owned());
        }
    }
    // An ACL refusal inside a script has no code on 6.2 or 7.0 (7.2 says NOPERM): `ERR The
    // user executing the script can't run this command or subcommand` (or "can't access
    // at least one of the keys"), wrapped as above on 6.2.
    if text.contains("The user executing the script can't") {
        codes.push("NOPERM".to_owned());
    }
    codes
}

/// The error codes looked for inside a wrapped script error: those of the errors Redis
/// raises itself inside a script (`OOM`, `READONLY`, ...), the library's own
/// (`PARTITIONED`), and every class [`Error`]'s predicates ask about.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The error Redis answers with this text (after the `-`).
    fn reply(text: &str) -> redis::RedisError {
        let value = redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap();
        value.extract_error().unwrap_err()
    }

    /// A connection that answers every pipeline with these replies (`Err` for an error).
    struct Canned(Vec<redis::Value>);

    impl redis::ConnectionLike for Canned {
        fn req_packed_command(&mut self, _: &[u8]) -> redis::RedisResult<redis::Value> {
            Ok(self.0.remove(0))
        }
        fn req_packed_commands(
            &mut self,
            _: &[u8],
            _: usize,
            count: usize,
        ) -> redis::RedisResult<Vec<redis::Value>> {
            Ok(self.0.drain(..count).collect())
        }
        fn get_db(&self) -> i64 {
            0
        }
        fn check_connection(&mut self) -> bool {
            true
        }
        fn is_open(&self) -> bool {
            true
        }
    }

    /// A publish-like pipeline (`SADD`, then `EVALSHA`) whose script fails with `text`.
    fn pipeline_failure(text: &str) -> redis::RedisError {
        let script_reply = redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap();
        let mut conn = Canned(vec![redis::Value::Int(1), script_reply]);
        let mut pipe = redis::pipe();
        pipe.cmd("SADD").arg("mq:topics").arg("t");
        pipe.cmd("EVALSHA").arg("0").arg(0);
        pipe.query::<redis::Value>(&mut conn).unwrap_err()
    }

    /// The same refusal as Redis 7.x, Redis 6.2 and a pipeline report it, for one code.
    fn every_wrapping(code: &str, message: &str) -> Vec<(String, Error)> {
        let sha = "f5a1b0c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8";
        let v7 = format!("{code} {message} script: {sha}, on @user_script:12.");
        let v62 = format!(
            "ERR Error running script (call to f_{sha}): @user_script:12: @user_script: 12: -{code} {message}"
        );
        vec![
            (
                "plain".into(),
                Error::Redis(reply(&format!("{code} {message}"))),
            ),
            (format!("7.x: {v7}"), Error::Redis(reply(&v7))),
            (format!("6.2: {v62}"), Error::Redis(reply(&v62))),
            (
                format!("7.x pipeline: {v7}"),
                Error::Redis(pipeline_failure(&v7)),
            ),
            (
                format!("6.2 pipeline: {v62}"),
                Error::Redis(pipeline_failure(&v62)),
            ),
        ]
    }

    fn has_code(e: &Error, code: &str) -> bool {
        matches!(e, Error::Redis(r) if server_codes(r).iter().any(|c| c == code))
    }

    #[test]
    fn out_of_memory_is_recognised_in_every_wrapping() {
        for (how, e) in every_wrapping("OOM", "command not allowed when used memory > 'maxmemory'.")
        {
            assert!(e.is_out_of_memory(), "{how}: {e}");
            assert!(!e.is_transient(), "{how}: {e}");
            assert!(!e.is_read_only() && !e.is_no_permission(), "{how}: {e}");
        }
    }

    #[test]
    fn read_only_is_recognised_in_every_wrapping() {
        for (how, e) in every_wrapping("READONLY", "You can't write against a read only replica.") {
            assert!(e.is_read_only(), "{how}: {e}");
            assert!(e.is_transient(), "{how}: {e}");
            assert!(!e.is_out_of_memory(), "{how}: {e}");
        }
    }

    #[test]
    fn no_permission_is_recognised_in_every_wrapping() {
        for (how, e) in every_wrapping(
            "NOPERM",
            "this user has no permissions to access one of the keys used as arguments",
        ) {
            assert!(e.is_no_permission(), "{how}: {e}");
            assert!(!e.is_transient(), "{how}: {e}");
        }
        // Inside a script, Redis 6.2 and 7.0 refuse without a code (as seen on 6.2.14 and
        // 7.0.15); 7.2 says NOPERM.
        let sha = "f5a1b0c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8";
        for text in [
            format!("ERR Error running script (call to f_{sha}): @user_script:1: @user_script: 1: The user executing the script can't access at least one of the keys mentioned in the command arguments"),
            format!("ERR Error running script (call to f_{sha}): @user_script:1: @user_script: 1: The user executing the script can't run this command or subcommand"),
            format!("ERR The user executing the script can't run this command or subcommand script: {sha}, on @user_script:1."),
            format!("ERR The user executing the script can't access at least one of the keys mentioned in the command arguments script: {sha}, on @user_script:1."),
        ] {
            assert!(Error::Redis(reply(&text)).is_no_permission(), "{text}");
            assert!(Error::Redis(pipeline_failure(&text)).is_no_permission(), "pipeline: {text}");
        }
    }

    #[test]
    fn transient_classes_are_recognised_in_every_wrapping() {
        for (code, message) in [
            ("LOADING", "Redis is loading the dataset in memory"),
            ("TRYAGAIN", "Multiple keys request during rehashing of slot"),
            (
                "MASTERDOWN",
                "Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            ),
            (
                "BUSY",
                "Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
            ),
        ] {
            for (how, e) in every_wrapping(code, message) {
                assert!(has_code(&e, code), "{how}: {e}");
                assert!(e.is_transient(), "{how}: {e}");
                assert!(!e.is_out_of_memory() && !e.is_no_permission(), "{how}: {e}");
            }
        }
    }

    #[test]
    fn noscript_is_recognised_in_every_wrapping() {
        for (how, e) in every_wrapping("NOSCRIPT", "No matching script. Please use EVAL.") {
            assert!(has_code(&e, "NOSCRIPT"), "{how}: {e}");
            assert!(!e.is_transient(), "{how}: {e}");
        }
    }

    #[test]
    fn a_code_named_in_ordinary_text_is_not_a_code() {
        let sha = "f5a1b0c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8";
        for text in [
            format!("ERR Error running script (call to f_{sha}): @user_script:3: user_script:3: topic OOM-BUSY is not READONLY"),
            "WRONGTYPE Operation against a key holding the wrong kind of value".to_owned(),
        ] {
            let e = Error::Redis(reply(&text));
            assert!(!e.is_out_of_memory() && !e.is_read_only() && !e.is_no_permission(), "{e}");
            assert!(!e.is_transient(), "{e}");
        }
    }
}
