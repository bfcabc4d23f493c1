//! Results and progress: what happened to message X.
//!
//! A running handler reports progress ([`Message::progress`]); a finished one may return a
//! result ([`Done`], or a `serde_json::Value`). Both are fenced by the delivery's lease
//! token, so a worker whose lease was lost cannot write. Finished messages leave a record in
//! their topic's slot, kept to a retention ([`ClientBuilder::result_retention`], per
//! subscription [`Subscription::result_retention`]). [`Client::message_status`] reads the
//! state of any message; [`Client::wait_result`] waits until one finishes.
//!
//! [`ClientBuilder::result_retention`]: crate::ClientBuilder::result_retention
//! [`Subscription::result_retention`]: crate::Subscription::result_retention

use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

use crate::client::Client;
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::message::{from_millis, Envelope, Message, MessageId};
use crate::store::RawLookup;

/// Largest progress or result, serialized: they live in Redis beside the messages, and a
/// status read returns them whole.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;

/// How many records of finished messages a topic keeps, and for how long.
///
/// A record for every message at 100k msg/s would not fit in memory, so only the last
/// `max_len` finished messages of each topic (each partition of a partitioned topic) are
/// kept (up to a tenth more between bulk trims), none shown for longer than `max_age`
/// (`Duration::ZERO`: no age limit). Default: 1,000 for 1 hour.
///
/// The retention is given by whoever finishes a message (a worker's subscription, else
/// the client's default, e.g. for [`Client::cancel`] and manual fetches) while the records
/// of a topic are kept together: when they differ, the smaller count trims for both, and
/// the keys expire after the age given with the last record. An id that finishes twice
/// (published again with the same id) may lose its newer record when the older one is
/// trimmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Records kept (0: none; [`Client::message_status`] then says `unknown` for every
    /// finished message).
    pub max_len: u64,
    /// Longest a record is kept.
    pub max_age: Duration,
}

impl Retention {
    /// The default: the last 1,000 finished messages, for at most an hour.
    pub const DEFAULT: Retention = Retention {
        max_len: 1000,
        max_age: Duration::from_secs(3600),
    };
}

impl Default for Retention {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Where a message is in its life; see [`Client::message_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting to run.
    Pending,
    /// Waiting for its due time (delayed, or a retry in its backoff).
    Delayed,
    /// A worker is running it.
    Active,
    /// Handled (its record is kept for the topic's [`Retention`]).
    Done,
    /// In the dead-letter queue.
    Dead,
    /// Cancelled before it ran ([`Client::cancel`]).
    Cancelled,
    /// No such message: never published, purged, or finished longer ago than the
    /// retention keeps records.
    Unknown,
}

impl Status {
    /// Done, dead or cancelled: nothing more happens to it unless someone acts (a dead
    /// letter can be reprocessed).
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Done | Status::Dead | Status::Cancelled)
    }

    /// The name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Delayed => "delayed",
            Status::Active => "active",
            Status::Done => "done",
            Status::Dead => "dead",
            Status::Cancelled => "cancelled",
            Status::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to one message: `{"state", "retry", "progress", "result", "error"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct MessageStatus {
    /// Where it is.
    pub state: Status,
    /// Failed attempts so far (for a done one: before the attempt that succeeded).
    pub retry: u32,
    /// The last progress its handler reported ([`Message::progress`]).
    pub progress: Option<Value>,
    /// What its handler returned ([`Done`]).
    pub result: Option<Value>,
    /// The last failure, if it failed before (for a dead one: why it died).
    pub error: Option<String>,
    /// When it finished, for a done or cancelled one (Redis clock).
    #[serde(serialize_with = "crate::client::rfc3339_opt_ser")]
    pub finished_at: Option<SystemTime>,
}

impl MessageStatus {
    fn unknown() -> Self {
        MessageStatus {
            state: Status::Unknown,
            retry: 0,
            progress: None,
            result: None,
            error: None,
            finished_at: None,
        }
    }

    /// The status of a message from one partition's lookup; `None` when that partition
    /// knows nothing of it.
    pub(crate) fn from_lookup(raw: &RawLookup) -> Option<Self> {
        let progress = raw
            .progress
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok());
        if let Some(body) = &raw.body {
            let state = if raw.active.is_some() {
                Status::Active
            } else if raw.delayed.is_some() {
                Status::Delayed
            } else if raw.dead.is_some() {
                Status::Dead
            } else {
                Status::Pending
            };
            let (retry, error) = match Envelope::decode(body) {
                Ok(env) => (env.retry, env.last_error),
                Err(e) => (0, Some(format!("undecodable envelope: {e}"))),
            };
            return Some(MessageStatus {
                state,
                retry,
                progress,
                result: None,
                error,
                finished_at: None,
            });
        }
        let record: Value = serde_json::from_str(raw.record.as_deref()?).ok()?;
        // Kept in Redis a little past its retention (trimmed in bulk, keys expiring after
        // the topic's last record): past `until`, it is not shown.
        let until = record.get("until").and_then(Value::as_i64).unwrap_or(0);
        if until > 0 && until < raw.now_ms {
            return None;
        }
        let state = match record.get("state").and_then(Value::as_str) {
            Some("done") => Status::Done,
            Some("cancelled") => Status::Cancelled,
            _ => return None,
        };
        Some(MessageStatus {
            state,
            retry: record
                .get("retry")
                .and_then(Value::as_u64)
                .map_or(0, |r| u32::try_from(r).unwrap_or(u32::MAX)),
            progress: record.get("progress").cloned(),
            result: record.get("result").cloned(),
            error: record
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned),
            finished_at: record
                .get("finished_at")
                .and_then(Value::as_f64)
                .map(from_millis),
        })
    }
}

/// A handler's result, kept in the message's record: return `Ok(Done(value))` with any
/// `Serialize` value. Read it with [`Client::message_status`] or [`Client::wait_result`].
///
/// # Examples
/// ```no_run
/// # fn example(mq: forgemq::Client) -> forgemq::Result<()> {
/// use forgemq::{Done, HandlerError, Message, Worker};
/// use serde_json::{json, Value};
///
/// let worker = Worker::builder(mq)
///     .subscribe("video.transcode", |msg: Message<Value>| async move {
///         msg.progress(json!({"percent": 50})).await?;
///         // ... the second half ...
///         Ok::<_, HandlerError>(Done(json!({"url": "https://cdn.example/v/42.mp4"})))
///     })
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done<T>(pub T);

/// What a handler may return when it succeeds: `()` (nothing to keep), a [`Done`] with a
/// result, or a `serde_json::Value` (the result itself).
pub trait HandlerOutput: Send + 'static {
    /// The record's JSON members for this result (`"result":…`, or `"error":…` when it
    /// cannot be kept), without braces; `None` for no result.
    #[doc(hidden)]
    fn record_members(self) -> Option<String>;
}

impl HandlerOutput for () {
    fn record_members(self) -> Option<String> {
        None
    }
}

impl HandlerOutput for Value {
    fn record_members(self) -> Option<String> {
        Done(self).record_members()
    }
}

impl<T: Serialize + Send + 'static> HandlerOutput for Done<T> {
    fn record_members(self) -> Option<String> {
        Some(result_members(serde_json::to_string(&self.0)))
    }
}

/// `"result":<json>`, or an `"error"` saying why the result is not kept (the message is
/// done either way: its work happened, and running it again would repeat it).
fn result_members(json: serde_json::Result<String>) -> String {
    let error = match json {
        Ok(json) if json.len() <= MAX_RESULT_BYTES => return format!("\"result\":{json}"),
        Ok(json) => format!(
            "result of {} bytes not kept: over the {MAX_RESULT_BYTES}-byte limit",
            json.len()
        ),
        Err(e) => format!("result not kept: it does not serialize: {e}"),
    };
    tracing::warn!(%error, "handler result");
    format!("\"error\":{}", Value::String(error))
}

/// Serializes a progress report, within the size limit.
fn progress_json<P: Serialize>(progress: &P) -> Result<String> {
    let json = serde_json::to_string(progress).map_err(Error::Serialize)?;
    if json.len() > MAX_RESULT_BYTES {
        return Err(Error::InvalidData(format!(
            "progress of {} bytes is over the {MAX_RESULT_BYTES}-byte limit",
            json.len()
        )));
    }
    Ok(json)
}

impl<T> Message<T> {
    /// Reports how far the handler got (any JSON: `{"percent": 40}`, a stage name), for
    /// [`Client::message_status`], the API and the dashboard. It replaces the previous
    /// report and is kept in the message's record when it finishes; a retried or recovered
    /// message shows its last attempt's report until the new attempt reports.
    ///
    /// [`Error::LeaseLost`] when this worker no longer owns the delivery (nothing is
    /// written: a stale run cannot overwrite the progress of the live one).
    pub async fn progress<P: Serialize>(&self, progress: P) -> Result<()> {
        let json = progress_json(&progress)?;
        let Some((keys, token)) = self.lease.fence() else {
            return Err(Error::Config(
                "this message was not delivered by a worker or pop_message: it has no lease to report progress under".into(),
            ));
        };
        if self
            .client
            .store()
            .progress(keys, self.id.as_str(), token, &json)
            .await?
        {
            Ok(())
        } else {
            self.lease.mark_lost();
            Err(Error::LeaseLost {
                topic: self.topic.clone(),
                id: self.id.to_string(),
            })
        }
    }
}

impl Delivery {
    /// Reports progress; see [`Message::progress`].
    pub async fn progress<P: Serialize>(&self, progress: P) -> Result<()> {
        self.message().progress(progress).await
    }
}

impl Client {
    /// What happened to one message: pending, delayed, active (with its progress), done
    /// (with its result), dead (with its error), cancelled, or unknown (never published,
    /// purged, or finished longer ago than the topic's [`Retention`] keeps records).
    ///
    /// A partitioned topic asks every partition at once.
    pub async fn message_status(&self, topic: &str, id: &MessageId) -> Result<MessageStatus> {
        Ok(self
            .locate(topic, id)
            .await?
            .map_or_else(MessageStatus::unknown, |(_, status)| status))
    }

    /// The partition that knows the message, and its status there. The one holding its
    /// body wins over one holding only a record (an id published again after it finished).
    async fn locate(&self, topic: &str, id: &MessageId) -> Result<Option<(usize, MessageStatus)>> {
        let layout = self.layout(topic).await?;
        let store = self.store();
        let found = futures::future::try_join_all(
            layout
                .partitions
                .iter()
                .map(|keys| store.lookup(keys, id.as_str())),
        )
        .await?;
        let with_body = found.iter().position(|raw| raw.body.is_some());
        let at = with_body.or_else(|| found.iter().position(|raw| raw.record.is_some()));
        Ok(at.and_then(|p| MessageStatus::from_lookup(&found[p]).map(|s| (p, s))))
    }

    /// Waits until the message finishes (done, dead or cancelled) and returns its status;
    /// at once when it has finished already or is unknown (check
    /// [`MessageStatus::state`]). [`Error::Timeout`] when it is still pending, delayed or
    /// active after `timeout`.
    ///
    /// No polling: the script that finishes the message wakes the waiter, which blocks on
    /// a connection of its own for the wait (one per concurrent `wait_result`).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn example(mq: forgemq::Client) -> forgemq::Result<()> {
    /// use std::time::Duration;
    ///
    /// let id = mq.publish("video.transcode", serde_json::json!({"video": 42})).await?;
    /// let status = mq.wait_result("video.transcode", &id, Duration::from_secs(60)).await?;
    /// println!("{}: {:?}", status.state, status.result);
    /// # Ok(()) }
    /// ```
    pub async fn wait_result(
        &self,
        topic: &str,
        id: &MessageId,
        timeout: Duration,
    ) -> Result<MessageStatus> {
        let now = tokio::time::Instant::now();
        // `Duration::MAX` and the like: as good as for ever.
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        let store = self.store();
        let mut blocking = store.blocking_conn();
        // The partition this caller is registered in as a waiter, if any.
        let mut registered: Option<usize> = None;
        loop {
            let found = self.locate(topic, id).await?;
            let layout = self.layout(topic).await?;
            let p = match found {
                Some((p, status)) if !status.state.is_finished() => p,
                // Finished (the finish took every registration) or unknown.
                other => {
                    if let (None, Some(r)) = (&other, registered) {
                        if let Some(keys) = layout.partitions.get(r) {
                            store.watch(keys, id.as_str(), true).await?;
                        }
                    }
                    return Ok(other.map_or_else(MessageStatus::unknown, |(_, s)| s));
                }
            };
            let keys = &layout.partitions[p];
            if registered != Some(p) {
                // Registered only while it is there and not finished, atomically: a
                // finish after this leaves our token, however soon it comes.
                if !store.watch(keys, id.as_str(), false).await? {
                    registered = None;
                    continue;
                }
                registered = Some(p);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let list = keys.waiting(id.as_str());
            let woken = if left.is_zero() {
                Ok(false)
            } else {
                store.wait_wake(&mut blocking, &[&list], left).await
            };
            match woken {
                // A token: the message finished (the next look says so), or a token left
                // by an earlier message with this id, and we wait on, still registered.
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    // Timed out or failed: take the registration back (a finish that
                    // came meanwhile took it already; then this changes nothing).
                    store.watch(keys, id.as_str(), true).await?;
                    woken?;
                    let status = self.message_status(topic, id).await?;
                    if status.state.is_finished() || status.state == Status::Unknown {
                        return Ok(status);
                    }
                    return Err(Error::Timeout(timeout));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_become_record_members_within_the_limit() {
        assert_eq!(().record_members(), None);
        assert_eq!(
            Done(serde_json::json!({"url": "x"})).record_members(),
            Some(r#""result":{"url":"x"}"#.to_owned())
        );
        assert_eq!(
            Value::from(3).record_members(),
            Some(r#""result":3"#.to_owned())
        );
        let big = Done("x".repeat(MAX_RESULT_BYTES + 1))
            .record_members()
            .unwrap();
        assert!(
            big.starts_with(r#""error":"result of 65539 bytes not kept"#),
            "{big}"
        );
        assert!(progress_json(&"y".repeat(MAX_RESULT_BYTES)).is_err());
        assert_eq!(
            progress_json(&serde_json::json!({"p": 1})).unwrap(),
            r#"{"p":1}"#
        );
    }

    #[test]
    fn records_read_back_as_statuses() {
        let raw = RawLookup {
            record: Some(
                r#"{"state":"done","finished_at":1700000000000,"until":1700003600000,"retry":2,"result":{"ok":true},"progress":7}"#
                    .to_owned(),
            ),
            now_ms: 1_700_000_001_000,
            ..RawLookup::default()
        };
        let s = MessageStatus::from_lookup(&raw).unwrap();
        assert_eq!(s.state, Status::Done);
        assert_eq!(s.retry, 2);
        assert_eq!(s.result, Some(serde_json::json!({"ok": true})));
        assert_eq!(s.progress, Some(serde_json::json!(7)));
        assert_eq!(s.finished_at, Some(from_millis(1.7e12)));
        assert!(MessageStatus::from_lookup(&RawLookup::default()).is_none());
        // Past its `until`: not shown.
        let expired = RawLookup {
            now_ms: 1_700_003_600_001,
            ..raw
        };
        assert!(MessageStatus::from_lookup(&expired).is_none());
        assert_eq!(
            serde_json::to_value(&s).unwrap()["state"],
            serde_json::json!("done")
        );
    }
}
