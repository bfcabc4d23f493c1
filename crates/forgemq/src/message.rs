//! Messages: the id, the envelope stored in Redis, and what a handler receives.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;

type Result<T, E = Error> = std::result::Result<T, E>;

/// Longest caller-chosen id, in bytes; generated ids are 36.
const MAX_ID_LEN: usize = 200;

/// How many past failures an envelope keeps in `errors`: enough to see a pattern in the
/// dead-letter browser, few enough that a message failing forever stays small.
const ERROR_HISTORY: usize = 10;

/// Longest error text kept in an envelope, in bytes (`last_error` and each history entry);
/// longer ones are cut on a character boundary and marked. Handlers' errors can be long
/// (a remote server's whole error page): unbounded, they would grow a message past the
/// payload limit on its own retries.
pub(crate) const MAX_ERROR_TEXT: usize = 2048;

/// How much a stored envelope may exceed the payload limit: the failure record it carries
/// besides the published data, at most `ERROR_HISTORY + 1` error texts of
/// [`MAX_ERROR_TEXT`] bytes, each up to 6 bytes a byte once escaped in JSON, with their
/// fields, plus the counters the scripts append. A message published under the limit is
/// never refused for its history.
pub(crate) const HISTORY_ALLOWANCE: usize = (ERROR_HISTORY + 1) * (6 * MAX_ERROR_TEXT + 128) + 4096;

/// The largest stored envelope a consumer reads, for a client whose payload limit is
/// `max_payload`: anything bigger was not written by ForgeMQ and is dead-lettered unread.
pub(crate) fn stored_limit(max_payload: usize) -> usize {
    max_payload.saturating_add(HISTORY_ALLOWANCE)
}

/// `error` cut to [`MAX_ERROR_TEXT`] bytes on a character boundary, with a note saying how
/// much was cut.
pub(crate) fn cap_error(error: &str) -> String {
    if error.len() <= MAX_ERROR_TEXT {
        return error.to_owned();
    }
    // Room for the note: " [cut: N bytes more]" with N of up to 20 digits.
    let mut end = MAX_ERROR_TEXT - 40;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    let cut = error.len() - end;
    format!("{} [cut: {cut} bytes more]", &error[..end])
}

/// A message id: unique, non-empty and, when ForgeMQ makes it, time-sortable (UUIDv7).
///
/// The client makes the id before writing, so a publish retried after an unknown outcome
/// writes the same id again and Redis keeps one copy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(String);

impl MessageId {
    /// A new time-sortable id (UUIDv7, e.g. `01937a2c-5c3e-7d1a-9f6b-0c4b2a1e8d77`).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().hyphenated().to_string())
    }

    /// Wraps a caller-chosen id: 1–200 bytes, no spaces or control characters.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("it is empty")
        } else if id.len() > MAX_ID_LEN {
            Some("it is longer than 200 bytes")
        } else if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
            Some("spaces and control characters are not allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidId { id, reason }),
            None => Ok(Self(id)),
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps an id read back from Redis, which was validated when it was written.
    pub(crate) fn from_stored(id: String) -> Self {
        Self(id)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for MessageId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for MessageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// A message's headers: string to string, sorted by name.
pub type Headers = std::collections::BTreeMap<String, String>;

/// Most headers one message may carry.
pub const MAX_HEADERS: usize = 64;

/// Longest header name, in bytes.
pub const MAX_HEADER_NAME: usize = 128;

/// Longest header value, in characters (a JSON Schema `maxLength` says the same).
pub const MAX_HEADER_VALUE: usize = 1024;

/// Checks a message's headers: at most 64; names 1-128 bytes of printable ASCII without
/// spaces; values up to 1,024 characters without control characters.
pub(crate) fn check_headers(headers: &Headers) -> Result<()> {
    if headers.len() > MAX_HEADERS {
        return Err(Error::InvalidData(format!(
            "{} headers: at most {MAX_HEADERS}",
            headers.len()
        )));
    }
    for (name, value) in headers {
        if name.is_empty()
            || name.len() > MAX_HEADER_NAME
            || !name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Error::InvalidData(format!(
                "header name {name:?}: 1-{MAX_HEADER_NAME} bytes of printable ASCII without spaces"
            )));
        }
        if value.chars().count() > MAX_HEADER_VALUE || value.chars().any(char::is_control) {
            return Err(Error::InvalidData(format!(
                "header {name:?}: its value must be at most {MAX_HEADER_VALUE} characters without control characters"
            )));
        }
    }
    Ok(())
}

/// One past failure, kept in the envelope's `errors` history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FailureRecord {
    /// Which attempt failed (0 = the first run).
    pub(crate) attempt: u32,
    /// When it failed, RFC 3339 UTC.
    pub(crate) at: String,
    /// The handler's error text.
    pub(crate) error: String,
}

/// The stored form of a message (see `docs` in the README: "Envelope").
///
/// Compatible with the seed's `Message` (`id`, `topic`, `data`, `timestamp`, `retry`);
/// the optional fields appear only when set, and unknown fields are kept as they are.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Envelope {
    pub(crate) id: String,
    pub(crate) topic: String,
    pub(crate) data: Value,
    /// Time of publishing, RFC 3339 UTC.
    pub(crate) timestamp: String,
    /// Failed attempts so far.
    pub(crate) retry: u32,
    /// Retries allowed for this message; absent means the subscription's setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_retry: Option<u32>,
    /// Times a lease expired while this message was being handled (worker crash or stall).
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) recoveries: u32,
    /// Text of the most recent failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_error: Option<String>,
    /// The last few failures, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) errors: Vec<FailureRecord>,
    /// The publisher's headers (trace context and the like), string to string.
    #[serde(skip_serializing_if = "Headers::is_empty")]
    pub(crate) headers: Headers,
    /// The fair group it waits in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<String>,
    /// Fields this version does not know, kept so that a newer writer's fields survive.
    #[serde(flatten)]
    pub(crate) extra: Map<String, Value>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Decoded by hand rather than derived: the derive refuses a repeated key (the Lua scripts
/// append a changed field again; the last one wins) and, with `extra` flattened, buffers
/// every field before decoding it, which made decoding the biggest cost of a no-op handler.
impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        de.deserialize_map(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

impl<'de> serde::de::Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message envelope (a JSON object with id, topic and data)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Envelope, A::Error> {
        use serde::de::Error as _;
        let (mut id, mut topic, mut data) = (None, None, None);
        let mut env = Envelope {
            id: String::new(),
            topic: String::new(),
            data: Value::Null,
            timestamp: String::new(),
            retry: 0,
            max_retry: None,
            recoveries: 0,
            last_error: None,
            errors: Vec::new(),
            headers: Headers::new(),
            group: None,
            extra: Map::new(),
        };
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "id" => id = Some(map.next_value::<String>()?),
                "topic" => topic = Some(map.next_value::<String>()?),
                "data" => data = Some(map.next_value::<Value>()?),
                "timestamp" => env.timestamp = map.next_value()?,
                "retry" => env.retry = map.next_value()?,
                "max_retry" => env.max_retry = map.next_value()?,
                "recoveries" => env.recoveries = map.next_value()?,
                "last_error" => env.last_error = map.next_value()?,
                "errors" => env.errors = map.next_value()?,
                "group" => {
                    let value = map.next_value::<Value>()?;
                    match value {
                        Value::String(g) => env.group = Some(g),
                        Value::Null => env.group = None,
                        other => {
                            env.extra.insert("group".to_owned(), other);
                        }
                    }
                }
                // Read leniently: another producer's malformed headers must not make the
                // whole message unreadable; they are kept as they are, unread.
                "headers" => {
                    let value = map.next_value::<Value>()?;
                    match serde_json::from_value::<Headers>(value.clone()) {
                        Ok(headers) => env.headers = headers,
                        Err(_) => {
                            env.extra.insert("headers".to_owned(), value);
                        }
                    }
                }
                _ => {
                    let value = map.next_value::<Value>()?;
                    env.extra.insert(key.into_owned(), value);
                }
            }
        }
        env.id = id.ok_or_else(|| A::Error::missing_field("id"))?;
        env.topic = topic.ok_or_else(|| A::Error::missing_field("topic"))?;
        env.data = data.ok_or_else(|| A::Error::missing_field("data"))?;
        Ok(env)
    }
}

impl Envelope {
    #[cfg(test)]
    pub(crate) fn new(id: &MessageId, topic: &str, data: Value, max_retry: Option<u32>) -> Self {
        Self {
            id: id.as_str().to_owned(),
            topic: topic.to_owned(),
            data,
            timestamp: rfc3339(SystemTime::now()),
            retry: 0,
            max_retry,
            recoveries: 0,
            last_error: None,
            errors: Vec::new(),
            headers: Headers::new(),
            group: None,
            extra: Map::new(),
        }
    }

    /// Encodes a new message's envelope from data already serialized: the fields and
    /// their order are those of [`Envelope::encode`]; `data` is the caller's serialization
    /// as it is (a struct keeps its field order, where a `Value` would have sorted keys).
    pub(crate) fn encode_new(
        id: &MessageId,
        topic: &str,
        data: &serde_json::value::RawValue,
        timestamp: &str,
        max_retry: Option<u32>,
        headers: &Headers,
        group: Option<&str>,
    ) -> String {
        #[derive(Serialize)]
        struct New<'a> {
            id: &'a str,
            topic: &'a str,
            data: &'a serde_json::value::RawValue,
            timestamp: &'a str,
            retry: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            max_retry: Option<u32>,
            #[serde(skip_serializing_if = "Headers::is_empty")]
            headers: &'a Headers,
            #[serde(skip_serializing_if = "Option::is_none")]
            group: Option<&'a str>,
        }
        let new = New {
            id: id.as_str(),
            topic,
            data,
            timestamp,
            retry: 0,
            max_retry,
            headers,
            group,
        };
        // Strings, numbers and JSON text already checked: this cannot fail.
        serde_json::to_string(&new).unwrap_or_default()
    }

    /// Decodes a stored envelope.
    ///
    /// Lua scripts change a field by appending it again (see `lua/prelude.lua`), so the
    /// last occurrence of a key wins.
    pub(crate) fn decode(body: &[u8]) -> std::result::Result<Self, serde_json::Error> {
        let env = match serde_json::from_slice::<Envelope>(body) {
            Ok(env) => env,
            // A repeated known field whose earlier value has another type (`"retry":"x",
            // ..., "retry":2`) fails the one-pass decode; through a map, only the last
            // value of each key is decoded. Rare, so the common case pays nothing for it.
            Err(first) => {
                let Ok(map) = serde_json::from_slice::<Map<String, Value>>(body) else {
                    return Err(first);
                };
                serde_json::from_value(Value::Object(map))?
            }
        };
        // serde_json reads an integer beyond 64 bits as a float, silently rounded; a
        // handler must not act on a changed number. Checked only when the data holds such
        // a float, so ordinary messages pay nothing.
        if has_huge_float(&env.data) && json_shape(body).big_integer {
            return Err(<serde_json::Error as serde::de::Error>::custom(
                "an integer in the data does not fit in 64 bits and would be rounded",
            ));
        }
        Ok(env)
    }

    pub(crate) fn encode(&self) -> String {
        // Serializing a struct of strings, numbers and `Value`s cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Records a failed attempt: `retry` grows by one, the error joins the history.
    pub(crate) fn record_failure(&mut self, error: &str) {
        let error = cap_error(error);
        self.errors.push(FailureRecord {
            attempt: self.retry,
            at: rfc3339(SystemTime::now()),
            error: error.clone(),
        });
        if self.errors.len() > ERROR_HISTORY {
            let extra = self.errors.len() - ERROR_HISTORY;
            self.errors.drain(..extra);
        }
        self.last_error = Some(error);
        self.retry += 1;
    }

    pub(crate) fn timestamp(&self) -> SystemTime {
        humantime::parse_rfc3339_weak(&self.timestamp).unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Whether `v` holds a float at or beyond the 64-bit integer range (what an integer
/// literal too large for i64/u64 becomes).
fn has_huge_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64() && n.as_f64().is_some_and(|f| f.abs() >= 9.2e18),
        Value::Array(a) => a.iter().any(has_huge_float),
        Value::Object(o) => o.values().any(has_huge_float),
        _ => false,
    }
}

/// What [`json_shape`] found in JSON text.
pub(crate) struct JsonShape {
    /// Deepest nesting of arrays and objects.
    pub(crate) depth: usize,
    /// An integer literal (no fraction, no exponent) that fits neither u64 nor i64.
    pub(crate) big_integer: bool,
}

/// One pass over JSON text, outside strings: how deep it nests and whether it holds an
/// integer beyond 64 bits (which a decoder would round).
pub(crate) fn json_shape(json: &[u8]) -> JsonShape {
    let mut shape = JsonShape {
        depth: 0,
        big_integer: false,
    };
    let (mut depth, mut i, mut in_string) = (0usize, 0, false);
    while i < json.len() {
        let b = json[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                shape.depth = shape.depth.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < json.len()
                    && matches!(json[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                shape.big_integer |= integer_beyond_64_bits(&json[start..i]);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    shape
}

/// Whether a number token is an integer that fits neither u64 nor i64.
fn integer_beyond_64_bits(token: &[u8]) -> bool {
    if token.iter().any(|c| matches!(c, b'.' | b'e' | b'E')) {
        return false;
    }
    let (negative, digits) = match token.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, token),
    };
    // Up to 18 digits always fit; only longer ones are worth parsing.
    if digits.len() <= 18 {
        return false;
    }
    let fits = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u128>().ok())
        .is_some_and(|n| {
            if negative {
                n <= 1u128 << 63
            } else {
                n <= u128::from(u64::MAX)
            }
        });
    !fits
}

/// An envelope that stands in for a stored body that does not decode: it keeps the
/// original text in `raw`, so the dead-letter queue can show it and nothing is lost.
pub(crate) fn undecodable_envelope(id: &str, topic: &str, raw: &[u8], error: &str) -> String {
    serde_json::json!({
        "id": id,
        "topic": topic,
        "data": null,
        "raw": String::from_utf8_lossy(raw),
        "timestamp": rfc3339(SystemTime::now()),
        "retry": 0,
        "last_error": error,
    })
    .to_string()
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-10-15T10:30:00.123Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Converts Redis milliseconds since the epoch into a `SystemTime`.
pub(crate) fn from_millis(ms: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0.0) as u64)
}

/// A message as a handler sees it.
///
/// `T` is the type of `data`: any `serde` type, or `serde_json::Value` to take whatever
/// comes. The fields are the seed's `Message` plus what a handler needs to decide.
#[derive(Debug)]
#[non_exhaustive]
pub struct Message<T = Value> {
    /// Unique id, made by the publisher.
    pub id: MessageId,
    /// The topic it was published to.
    pub topic: String,
    /// The published data.
    pub data: T,
    /// When it was published (publisher's clock).
    pub timestamp: SystemTime,
    /// Failed attempts before this one: 0 on the first delivery.
    pub retry: u32,
    /// Retries allowed before the message is dead-lettered.
    pub max_retry: u32,
    /// How often a lease on it expired before (a worker crashed or stalled while handling it).
    pub recoveries: u32,
    /// The publisher's headers ([`PublishOptions::header`](crate::PublishOptions::header)),
    /// e.g. a W3C `traceparent`.
    pub headers: Headers,
    /// The fair group it waited in ([`PublishOptions::group`](crate::PublishOptions::group)).
    pub group: Option<String>,
    pub(crate) lease: Arc<LeaseState>,
    pub(crate) client: crate::Client,
}

impl<T> Message<T> {
    /// The client of the worker handling this message: publish follow-ups (also delayed
    /// ones) through it, e.g. the welcome gift one hour after registration.
    pub fn client(&self) -> &crate::Client {
        &self.client
    }

    /// True once this worker no longer owns the delivery: its lease expired and the
    /// message went to another worker, or it was purged. A long handler can check this and
    /// stop early; its outcome will be refused anyway.
    pub fn is_lease_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// Waits until the lease is lost (see [`Message::is_lease_lost`]); never returns while
    /// the lease is healthy, so use it in `tokio::select!` beside the real work.
    pub async fn lease_lost(&self) {
        self.lease.wait_lost().await;
    }

    /// Whether this is the last attempt before the dead-letter queue.
    pub fn is_last_attempt(&self) -> bool {
        self.retry >= self.max_retry
    }

    pub(crate) fn try_map_data<U, E>(
        self,
        f: impl FnOnce(T) -> Result<U, E>,
    ) -> Result<Message<U>, E> {
        Ok(Message {
            id: self.id,
            topic: self.topic,
            data: f(self.data)?,
            timestamp: self.timestamp,
            retry: self.retry,
            max_retry: self.max_retry,
            recoveries: self.recoveries,
            headers: self.headers,
            group: self.group,
            lease: self.lease,
            client: self.client,
        })
    }
}

/// Lease health of one in-flight delivery, shared by the renewer and the handler.
#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    lost: AtomicBool,
    notify: tokio::sync::Notify,
    /// The keys of the delivery's topic (or partition) and its lease token: what a
    /// progress report is fenced by.
    fence: Option<(Arc<crate::keys::TopicKeys>, Arc<str>)>,
}

impl LeaseState {
    pub(crate) fn new(keys: Arc<crate::keys::TopicKeys>, token: Arc<str>) -> Self {
        Self {
            fence: Some((keys, token)),
            ..Self::default()
        }
    }

    pub(crate) fn fence(&self) -> Option<(&crate::keys::TopicKeys, &str)> {
        self.fence.as_ref().map(|(k, t)| (&**k, &**t))
    }

    pub(crate) fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    async fn wait_lost(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_lost() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_occurrence_of_a_field_wins() {
        let body = br#"{"id":"a","topic":"t","data":{"x":[],"p":299.99},"timestamp":"2025-10-15T10:30:00Z","retry":2,"recoveries":1,"retry":0,"recoveries":2}"#;
        let env = Envelope::decode(body).unwrap();
        assert_eq!(env.retry, 0);
        assert_eq!(env.recoveries, 2);
        assert_eq!(env.data["p"], serde_json::json!(299.99));
        assert_eq!(env.data["x"], serde_json::json!([]));
    }

    #[test]
    fn integers_beyond_64_bits_do_not_decode_but_floats_and_u64_do() {
        let env = |data: &str| {
            format!(r#"{{"id":"a","topic":"t","data":{data},"timestamp":"","retry":0}}"#)
        };
        for bad in [
            "123456789012345678901234567890",
            "[-9223372036854775809]",
            r#"{"n":18446744073709551616}"#,
        ] {
            assert!(Envelope::decode(env(bad).as_bytes()).is_err(), "{bad}");
        }
        for good in [
            "18446744073709551615",
            "-9223372036854775808",
            "1e30",
            "1.5e300",
            r#""123456789012345678901234567890""#,
        ] {
            assert!(Envelope::decode(env(good).as_bytes()).is_ok(), "{good}");
        }
    }

    #[test]
    fn malformed_headers_do_not_make_a_message_unreadable() {
        for headers in ["null", "{\"k\":1}", "[1,2]", "\"x\""] {
            let body = format!(
                r#"{{"id":"a","topic":"t","data":1,"timestamp":"2025-10-15T10:30:00Z","retry":0,"headers":{headers}}}"#
            );
            let env = Envelope::decode(body.as_bytes()).unwrap();
            assert!(env.headers.is_empty());
            let again: Value = serde_json::from_str(&env.encode()).unwrap();
            assert_eq!(
                again["headers"],
                serde_json::from_str::<Value>(headers).unwrap()
            );
        }
    }

    #[test]
    fn unknown_fields_are_kept() {
        let body = br#"{"id":"a","topic":"t","data":1,"timestamp":"2025-10-15T10:30:00Z","retry":0,"trace":"abc"}"#;
        let env = Envelope::decode(body).unwrap();
        let again: Value = serde_json::from_str(&env.encode()).unwrap();
        assert_eq!(again["trace"], "abc");
    }

    #[test]
    fn new_envelopes_encode_as_the_struct_does_and_decode_back() {
        let id = MessageId::new("order-\"1\"").unwrap();
        let data = serde_json::json!({"price": 299.99, "items": [], "nested": {"a": [1, {"b": null}]}, "s": "\u{e9}\n"});
        let traced: Headers = [
            (
                "traceparent".to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            ),
            ("tenant".to_owned(), "ACME \"42\"".to_owned()),
        ]
        .into();
        for (max_retry, headers, group) in [
            (None, Headers::new(), None),
            (Some(5), traced, Some("tenant-42")),
        ] {
            let mut env = Envelope::new(&id, "order.created", data.clone(), max_retry);
            env.timestamp = "2025-10-15T10:30:00.123Z".to_owned();
            env.headers = headers.clone();
            env.group = group.map(str::to_owned);
            let raw = serde_json::value::to_raw_value(&data).unwrap();
            let fast = Envelope::encode_new(
                &id,
                "order.created",
                &raw,
                &env.timestamp,
                max_retry,
                &headers,
                group,
            );
            assert_eq!(fast, env.encode());
            assert_eq!(
                Envelope::decode(fast.as_bytes()).unwrap().group.as_deref(),
                group
            );
            let back = Envelope::decode(fast.as_bytes()).unwrap();
            assert_eq!(back.data, data);
            assert_eq!(back.max_retry, max_retry);
            assert_eq!(back.id, id.as_str());
            assert_eq!(back.headers, headers);
            assert!(back.extra.is_empty());
        }
        assert!(check_headers(&[("a b".to_owned(), "x".to_owned())].into()).is_err());
        assert!(check_headers(&[("k".to_owned(), "x\ny".to_owned())].into()).is_err());
        assert!(
            check_headers(&[("k".to_owned(), "x".repeat(MAX_HEADER_VALUE + 1))].into()).is_err()
        );
        let many: Headers = (0..=MAX_HEADERS)
            .map(|i| (format!("h{i}"), String::new()))
            .collect();
        assert!(check_headers(&many).is_err());
    }

    #[test]
    fn a_repeated_field_whose_first_value_has_another_type_still_decodes() {
        let body = br#"{"id":"a","topic":"t","data":1,"retry":"x","retry":2}"#;
        assert_eq!(Envelope::decode(body).unwrap().retry, 2);
        assert!(Envelope::decode(br#"{"id":"a","topic":"t","data":1,"retry":"x"}"#).is_err());
    }

    #[test]
    fn repeated_keys_decode_last_one_wins_and_missing_ones_are_errors() {
        let body =
            br#"{"id":"a","topic":"t","data":1,"retry":0,"x":1,"retry":2,"x":2,"last_error":"e"}"#;
        let env = Envelope::decode(body).unwrap();
        assert_eq!(env.retry, 2);
        assert_eq!(env.extra["x"], 2);
        assert_eq!(env.last_error.as_deref(), Some("e"));
        for missing in [
            &br#"{"topic":"t","data":1}"#[..],
            br#"{"id":"a","data":1}"#,
            br#"{"id":"a","topic":"t"}"#,
            b"[1]",
            b"7",
        ] {
            assert!(
                Envelope::decode(missing).is_err(),
                "{}",
                String::from_utf8_lossy(missing)
            );
        }
    }

    #[test]
    fn failure_history_is_capped() {
        let id = MessageId::generate();
        let mut env = Envelope::new(&id, "t", Value::Null, None);
        for i in 0..25 {
            env.record_failure(&format!("e{i}"));
        }
        assert_eq!(env.retry, 25);
        assert_eq!(env.errors.len(), ERROR_HISTORY);
        assert_eq!(env.last_error.as_deref(), Some("e24"));
        assert_eq!(env.errors[0].error, "e15");
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary_and_marked() {
        assert_eq!(cap_error("short"), "short");
        let long = "é".repeat(5000);
        let cut = cap_error(&long);
        assert!(cut.len() <= MAX_ERROR_TEXT, "{}", cut.len());
        assert!(cut.ends_with("bytes more]"), "{cut}");
        let kept = cut.split(" [cut: ").next().unwrap();
        let said: usize = cut
            .rsplit("cut: ")
            .next()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(kept.len() + said, long.len());
        let id = MessageId::generate();
        let mut env = Envelope::new(&id, "t", Value::Null, None);
        for _ in 0..30 {
            env.record_failure(&long);
        }
        let body = env.encode();
        assert!(
            body.len() < HISTORY_ALLOWANCE,
            "{} bytes of history",
            body.len()
        );
    }

    #[test]
    fn caller_ids_are_checked() {
        assert!(MessageId::new("order-1").is_ok());
        assert!(MessageId::new("").is_err());
        assert!(MessageId::new("a b").is_err());
        assert!(MessageId::new("x".repeat(201)).is_err());
    }
}
