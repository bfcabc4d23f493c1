//! The API's contract: the shapes of its answers as OpenAPI schemas, how numbers in
//! requests are read, and what every operation can answer besides its own statuses.
//!
//! Answers built here (`Published`, `Cancelled`, ...) are serialized from these types, so
//! their schemas can't drift. Answers that are library types (`QueueStats`, `Purged`,
//! `MinuteCounts`, envelopes) are serialized as the library makes them, and described by
//! mirror types here, since the library does not depend on utoipa; a test compares each
//! mirror's fields with the library type's serialization.

#![allow(unused_qualifications)] // in the code that utoipa generates for the schemas

use serde::{Deserializer, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

/// Largest integer a request may carry: 2^53 - 1, the largest that every JSON reader
/// (JavaScript's included) holds exactly, and one the OpenAPI `maximum` states exactly.
/// Past it durations mean nothing anyway: the library caps delays and ttls at a century.
pub(super) const MAX_INTEGER: u64 = (1 << 53) - 1;

/// `{"error": "..."}`: every answer that is not a success.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorBody {
    /// What went wrong and, where it helps, what to do.
    pub(super) error: String,
}

/// A stored message: `201`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Published {
    /// Its id.
    pub(super) id: String,
}

/// Nothing stored: a message with this id, or holding this unique key, exists: `200`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Duplicate {
    /// The id of the message that is stored: the one given, or the unique key's holder.
    pub(super) id: String,
    /// Always true.
    pub(super) duplicate: bool,
}

/// A stored batch.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BatchPublished {
    /// One id per message, in request order; a duplicate's is the stored message's id.
    pub(super) ids: Vec<String>,
    /// How many of them were duplicates (nothing stored for those).
    pub(super) duplicates: u64,
}

/// Where a cancelled message was.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum CancelledFrom {
    /// Waiting for its due time.
    Delayed,
    /// Waiting to run.
    Pending,
}

/// A cancelled message.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Cancelled {
    /// Its id.
    pub(super) cancelled: String,
    /// Where it was.
    pub(super) was: CancelledFrom,
}

/// How many were deleted.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeletedCount {
    /// How many.
    pub(super) deleted: u64,
}

/// Which one was deleted.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeletedId {
    /// Its id.
    pub(super) deleted: String,
}

/// How many went back to the queue.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RequeuedCount {
    /// How many.
    pub(super) requeued: u64,
}

/// Which one went back to the queue.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RequeuedId {
    /// Its id.
    pub(super) requeued: String,
}

/// A paused topic.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Paused {
    /// Always true.
    pub(super) paused: bool,
}

/// A resumed topic.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Resumed {
    /// Always false.
    pub(super) paused: bool,
    /// Whether it was paused before.
    pub(super) was_paused: bool,
}

/// What a purge deleted, per state (mirror of `forgemq::Purged`).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PurgedCounts {
    /// Messages that were waiting to run.
    pub(super) pending: u64,
    /// Messages a handler was running (their outcomes will be refused).
    pub(super) active: u64,
    /// Messages waiting for their due time.
    pub(super) delayed: u64,
    /// Dead letters.
    pub(super) dead: u64,
}

/// A purge.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PurgeResult {
    /// What was deleted, per state.
    pub(super) deleted: PurgedCounts,
}

/// Where the messages of one topic are, and what happened to them so far (mirror of
/// `forgemq::QueueStats`).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TopicStats {
    /// The topic.
    pub(super) topic: String,
    /// Waiting to run now (the queue length).
    pub(super) pending: u64,
    /// Being handled (leased by a worker).
    pub(super) active: u64,
    /// Waiting for their due time: delayed publishes and retries in backoff.
    pub(super) delayed: u64,
    /// In the dead-letter queue now.
    pub(super) dead: u64,
    /// Ever published.
    pub(super) published: u64,
    /// Ever acknowledged (handler succeeded).
    pub(super) processed: u64,
    /// Failed attempts.
    pub(super) failed: u64,
    /// Failed attempts that were scheduled to run again.
    pub(super) retried: u64,
    /// Ever moved to the dead-letter queue.
    pub(super) dead_lettered: u64,
    /// Deliveries whose lease expired and went back to pending.
    pub(super) recovered: u64,
    /// Dead letters sent back to the queue.
    pub(super) reprocessed: u64,
    /// Messages deleted by purges.
    pub(super) purged: u64,
    /// Messages cancelled before they ran.
    pub(super) cancelled: u64,
    /// Redeliveries of already-processed ids that were skipped.
    pub(super) deduplicated: u64,
    /// Dead letters deleted by retention (count or age limit).
    pub(super) dead_trimmed: u64,
    /// Dead letters deleted by hand.
    pub(super) dead_deleted: u64,
    /// Handler runs whose outcome was refused because the lease had expired and the
    /// message was handed out again: the message ran twice.
    pub(super) duplicate_runs: u64,
    /// Ids found without a body (deleted behind ForgeMQ's back) and dropped.
    pub(super) orphans: u64,
    /// Whether the topic is paused (a partitioned one: any of its partitions).
    pub(super) paused: bool,
    /// Queue latency: how long the oldest ready message has waited since it became ready
    /// (its publish, or its due time for delayed and retried ones), in milliseconds on
    /// Redis's clock; null when none waits.
    #[schema(minimum = 0, required = true)]
    pub(super) oldest_pending_age_ms: Option<u64>,
    /// How long ago the oldest dead letter died, in milliseconds; null when there is none.
    #[schema(minimum = 0, required = true)]
    pub(super) oldest_dead_age_ms: Option<u64>,
    /// When the next delayed message is due, in milliseconds from now (0: due already);
    /// null when none is delayed.
    #[schema(minimum = 0, required = true)]
    pub(super) next_due_in_ms: Option<u64>,
    /// Live workers consuming the topic.
    pub(super) workers: u64,
    /// Their handlers for the topic (concurrency) added up.
    pub(super) worker_slots: u64,
    /// Messages of the topic their handlers were running at their last heartbeats.
    pub(super) in_flight: u64,
    /// Records of finished (done or cancelled) messages kept for the message lookup.
    pub(super) results_kept: u64,
    /// Which partition these figures are of: only in `partitions`.
    #[schema(nullable = false, minimum = 0, maximum = 1023)]
    pub(super) partition: Option<u32>,
    /// A partitioned topic's figures per partition, in partition order (the fields above
    /// are their sums); absent for a plain topic.
    #[schema(no_recursion, required = false)]
    pub(super) partitions: Vec<TopicStats>,
    /// The topic's fair groups; absent for a topic that never had grouped messages.
    #[schema(required = false)]
    pub(super) groups: Vec<GroupEntry>,
}

/// One fair group of a topic (mirror of `forgemq::GroupInfo`).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct GroupEntry {
    /// The group's name.
    pub(super) group: String,
    /// Its messages waiting to run.
    pub(super) pending: u64,
    /// Its messages being handled now.
    pub(super) active: u64,
    /// Most handled at once across every worker (0: no cap).
    pub(super) max_active: u32,
    /// Messages it gives per turn of the round robin.
    #[schema(minimum = 1, maximum = 1000)]
    pub(super) weight: u32,
    /// Whether it is paused.
    pub(super) paused: bool,
    /// Whether its settings were set rather than the defaults.
    pub(super) configured: bool,
}

/// A topic's layout (the fields of `forgemq::TopicInfo`).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TopicLayout {
    /// The topic.
    pub(super) topic: String,
    /// Its partitions (1: a plain topic).
    #[schema(minimum = 1, maximum = 1024)]
    pub(super) partitions: u32,
}

/// One minute of a topic's throughput (mirror of `forgemq::MinuteCounts`).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct MinuteCounts {
    /// The start of the minute, RFC 3339 (Redis clock).
    #[schema(format = DateTime)]
    pub(super) minute: String,
    /// Messages published in it.
    pub(super) published: u64,
    /// Messages acknowledged in it.
    pub(super) processed: u64,
    /// Failed attempts in it.
    pub(super) failed: u64,
}

/// One failure of a message.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Failure {
    /// Which attempt (0 for the first run).
    pub(super) attempt: u32,
    /// When, RFC 3339.
    pub(super) at: String,
    /// The error.
    pub(super) error: String,
}

/// A stored message as it is in Redis (`docs/wire-format.md`), plus where it is: dead
/// letters add `error` and `died_at`, delayed ones `due_at`, active ones `lease_until`.
/// A body that does not decode comes as `{"id", "topic", "data": null, "raw"}`. Fields
/// other writers added are kept (the schema allows any other property).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Envelope {
    /// The message id.
    pub(super) id: String,
    /// The topic.
    pub(super) topic: String,
    /// What the producer published.
    pub(super) data: Value,
    /// Time of publishing, RFC 3339 UTC.
    pub(super) timestamp: Option<String>,
    /// Failed attempts so far.
    pub(super) retry: Option<u32>,
    /// Retries this message allows (absent: the consumer's setting).
    pub(super) max_retry: Option<u32>,
    /// Times its lease expired while it was being handled.
    pub(super) recoveries: Option<u32>,
    /// The most recent failure's text.
    pub(super) last_error: Option<String>,
    /// The last failures, oldest first.
    pub(super) errors: Option<Vec<Failure>>,
    /// Dead letters: the error that killed it.
    pub(super) error: Option<String>,
    /// Dead letters: when it died, RFC 3339.
    pub(super) died_at: Option<String>,
    /// Delayed messages: when it is due, RFC 3339.
    pub(super) due_at: Option<String>,
    /// Active messages: when its lease ends, RFC 3339.
    pub(super) lease_until: Option<String>,
    /// Active messages: the worker running it (its id in `/workers`), or
    /// `{host}-{pid}-pop` for a manual fetch.
    pub(super) holder: Option<String>,
    /// Active messages: when the current run started, RFC 3339 (Redis clock).
    pub(super) started_at: Option<String>,
    /// A body that does not decode, as stored.
    pub(super) raw: Option<String>,
}

/// A message found by id: its envelope with the fields of its state, the state, and for
/// a pending one since when it is ready (the schema of what `output::message` writes).
#[allow(dead_code)]
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct MessageStatus {
    /// Where it is.
    pub(super) state: MessageStateField,
    /// Pending messages that went back to the head of the queue (recovered, released):
    /// when, RFC 3339 (Redis clock); null for the others (`timestamp` says when they were
    /// published).
    pub(super) ready_since: Option<String>,
    /// The last progress its handler reported (any JSON), or null.
    pub(super) progress: Option<Value>,
    /// What its handler returned when it finished (any JSON), or null.
    pub(super) result: Option<Value>,
    /// Done and cancelled messages: when, RFC 3339 (Redis clock); else null.
    pub(super) finished_at: Option<String>,
    /// The envelope and the fields of its state (for a done or cancelled message, whose
    /// body is gone: `id`, `topic`, `data` null and `retry`).
    #[serde(flatten)]
    pub(super) envelope: Envelope,
}

/// The states a stored message can be in.
#[allow(dead_code)] // the schema of what `output::message` writes
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum MessageStateField {
    /// Waiting to run.
    Pending,
    /// Waiting for its due time.
    Delayed,
    /// Being handled under a lease.
    Active,
    /// In the dead-letter queue.
    Dead,
    /// Handled (kept for the topic's result retention).
    Done,
    /// Cancelled before it ran (kept for the topic's result retention).
    Cancelled,
}

/// Dead letters to act on.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct IdList {
    /// Message ids (1-200 bytes (UTF-8) each, without whitespace or control characters);
    /// those that are not dead letters of the topic are skipped.
    #[schema(max_items = 10000, inline)]
    pub(super) ids: Vec<IdField>,
}

/// A message id: 1-200 bytes (UTF-8) without whitespace or control characters.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[schema(
    min_length = 1,
    max_length = 200,
    pattern = "^[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,200}$"
)]
pub(super) struct IdField(pub(super) String);

/// Whether a worker is taking work.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum WorkerStateField {
    /// Fetching and handling messages.
    Running,
    /// Shutting down: no new fetches, running handlers finishing.
    Draining,
}

/// How a worker consumes one topic.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct WorkerTopicEntry {
    /// The topic.
    pub(super) topic: String,
    /// Handlers of the topic it runs at once at most.
    pub(super) concurrency: u64,
    /// Messages of the topic its handlers were running at its last heartbeat.
    pub(super) in_flight: u64,
}

/// A message a worker is running.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RunningMessage {
    /// Its topic.
    pub(super) topic: String,
    /// Its id.
    pub(super) id: String,
    /// When this run started, RFC 3339 (Redis clock).
    pub(super) started_at: Option<String>,
}

/// A schedule: when it fires, what it publishes, when it fires next.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ScheduleEntry {
    /// Its name.
    pub(super) name: String,
    /// The topic its messages go to.
    pub(super) topic: String,
    /// Its cron pattern (5 fields, or 6 with seconds first), for a cron schedule.
    pub(super) cron: Option<String>,
    /// Its period in ms, for an every-N schedule.
    #[schema(minimum = 1000)]
    pub(super) every_ms: Option<u64>,
    /// The IANA time zone its cron pattern is read in.
    pub(super) tz: String,
    /// The data of its messages.
    pub(super) data: Value,
    /// What it does about missed fire times: `once`, `skip` or `catch-up:N`.
    pub(super) missed: String,
    /// When it fires next, RFC 3339 (Redis clock); null if never again.
    pub(super) next_fire: Option<String>,
    /// When it last fired (the time in its message's id), RFC 3339; null if never.
    pub(super) last_fire: Option<String>,
    /// How many messages it published.
    #[schema(minimum = 0)]
    pub(super) fired: u64,
}

/// A topic's rate limit.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LimitEntry {
    /// The topic.
    pub(super) topic: String,
    /// The limit as COUNT/PERIOD, e.g. `100/s`.
    pub(super) rate: String,
    /// Deliveries per second.
    pub(super) per_second: f64,
    /// How many may start at once after a quiet spell.
    #[schema(minimum = 1)]
    pub(super) burst: u32,
}

/// A schedule removed.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DeletedSchedule {
    /// Its name.
    pub(super) deleted: String,
}

/// A live worker, as its last heartbeat described it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct WorkerEntry {
    /// Its id, `{host}-{pid}-{random}`: the `holder` of the messages it runs.
    pub(super) id: String,
    /// The label it was given (e.g. `gateway`).
    pub(super) name: Option<String>,
    /// The host it runs on.
    pub(super) host: String,
    /// Its process id on that host.
    pub(super) pid: u32,
    /// The ForgeMQ library version it runs.
    pub(super) version: String,
    /// Running or draining.
    pub(super) state: WorkerStateField,
    /// Its first heartbeat, RFC 3339 (Redis clock).
    pub(super) started_at: String,
    /// Its last heartbeat, RFC 3339 (Redis clock); it drops out of the list three
    /// heartbeat intervals after it.
    pub(super) last_heartbeat: String,
    /// What it consumes.
    pub(super) topics: Vec<WorkerTopicEntry>,
    /// The messages it is running now, oldest run first (up to 1,000 per topic).
    pub(super) running: Vec<RunningMessage>,
}

/// An optional whole number of a JSON body: `5` and `5.0` are both 5 (JSON Schema's
/// `integer` admits `5.0`, and some clients send it), while strings, fractions, negatives
/// and numbers past [`MAX_INTEGER`] are refused.
pub(super) fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(Whole { text: false })
}

/// [`opt_u64`] for a query string, where every value is text: `5` and `5.0` are 5.
pub(super) fn query_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(Whole { text: true })
}

/// [`opt_u64`] for a `u32`.
pub(super) fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match opt_u64(d)? {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{n} is more than {}", u32::MAX))),
    }
}

/// Reads a whole number; `text`: from a string (a query string's values are all text).
struct Whole {
    text: bool,
}

impl Whole {
    fn check<E: serde::de::Error>(n: u64) -> Result<Option<u64>, E> {
        if n > MAX_INTEGER {
            Err(E::custom(format!("{n} is more than {MAX_INTEGER}")))
        } else {
            Ok(Some(n))
        }
    }
}

impl serde::de::Visitor<'_> for Whole {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a whole number from 0 to {MAX_INTEGER}")
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Self::check(n)
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
        match u64::try_from(n) {
            Ok(n) => Self::check(n),
            Err(_) => Err(E::custom(format!("{n} is negative"))),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<Self::Value, E> {
        // Exact: every whole f64 up to 2^53 is a u64 of the same value.
        if x.fract() == 0.0 && (0.0..=MAX_INTEGER as f64).contains(&x) {
            Ok(Some(x as u64))
        } else {
            Err(E::custom(format!(
                "{x} is not a whole number from 0 to {MAX_INTEGER}"
            )))
        }
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        if !self.text {
            return Err(E::invalid_type(serde::de::Unexpected::Str(s), &self));
        }
        match s.parse::<u64>() {
            Ok(n) => Self::check(n),
            Err(_) => match s.parse::<f64>() {
                Ok(x) if x.is_finite() => self.visit_f64(x),
                _ => Err(E::custom(format!("{s:?} is not a whole number"))),
            },
        }
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// Adds to the generated document what holds for every operation, so that a client
/// generated from it knows where the API is and every status it can get:
/// - `servers`: the API lives under `/api/v1`;
/// - `403` (a foreign `Host` or `Origin`), `503` (Redis unreachable, or a write not
///   replicated in time) everywhere, and with a token the bearer security scheme and `401`;
/// - every error answer's body is [`ErrorBody`].
pub(super) fn finish_document(doc: &utoipa::openapi::OpenApi, token: bool) -> Value {
    let mut doc = serde_json::to_value(doc).unwrap_or_else(|_| json!({}));
    unsigned_formats(&mut doc);
    // What utoipa cannot say of a map: the rules of message headers, exactly as the
    // library checks them.
    let headers = &mut doc["components"]["schemas"]["PublishRequest"]["properties"]["headers"];
    if headers.is_object() {
        *headers = json!({
            "type": "object",
            "description": "Headers the consumer reads without touching the data (e.g. a W3C `traceparent`): at most 64; names 1-128 bytes of printable ASCII without spaces, values up to 1,024 characters without control characters.",
            "maxProperties": 64,
            "propertyNames": {"type": "string", "pattern": "^[!-~]{1,128}$"},
            "additionalProperties": {"type": "string", "maxLength": 1024, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}
        });
    }
    doc["servers"] = json!([{"url": "/api/v1", "description": "this server"}]);
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        })
    };
    let mut shared = vec![
        ("403", "Forbidden", error("A foreign Host on a loopback server (DNS rebinding), or a state-changing request from a foreign Origin")),
        ("503", "Unavailable", error("Redis is unreachable or refuses writes (out of memory), or, with --replicas, fewer replicas than asked confirmed a write in time: it is stored on the master, and the error says how to send it again")),
    ];
    if token {
        shared.push((
            "401",
            "Unauthorized",
            error("Missing or wrong `Authorization: Bearer <token>`"),
        ));
        doc["components"]["securitySchemes"] = json!({
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The server's --token (or FORGEMQ_TOKEN); the scheme name is case-insensitive"
            }
        });
        doc["security"] = json!([{"bearer": []}]);
    }
    for (_, name, response) in &shared {
        doc["components"]["responses"][*name] = response.clone();
    }
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for op in item.values_mut() {
                let Some(responses) = op["responses"].as_object_mut() else {
                    continue;
                };
                for (code, name, _) in &shared {
                    responses.entry(*code).or_insert_with(
                        || json!({"$ref": format!("#/components/responses/{name}")}),
                    );
                }
            }
        }
    }
    doc
}

/// utoipa writes the formats of unsigned integers as `u-int64`, `u-int32`; the names
/// OpenAPI tools know are `uint64`, `uint32`.
fn unsigned_formats(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(format) if key == "format" && format.starts_with("u-int") => {
                        *format = format.replacen("u-int", "uint", 1);
                    }
                    other => unsigned_formats(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unsigned_formats),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn fields(value: &Value) -> BTreeSet<String> {
        value.as_object().unwrap().keys().cloned().collect()
    }

    fn schema_fields<T: ToSchema>() -> BTreeSet<String> {
        let schema = serde_json::to_value(T::schema()).unwrap();
        fields(&schema["properties"])
    }

    /// The mirrors describe every field the library serializes, and nothing more.
    #[test]
    fn mirrors_match_the_library_types() {
        // A partition of a partitioned topic's stats: every optional field present.
        let mut part = forgemq::QueueStats::default();
        part.partition = Some(0);
        let mut stats = forgemq::QueueStats::default();
        stats.partitions = vec![part.clone()];
        stats.groups = vec![forgemq::GroupInfo::default()];
        assert_eq!(
            schema_fields::<GroupEntry>(),
            fields(&serde_json::to_value(forgemq::GroupInfo::default()).unwrap())
        );
        let serialized = serde_json::to_value(&stats).unwrap();
        assert_eq!(
            schema_fields::<TopicStats>(),
            &fields(&serialized) | &fields(&serialized["partitions"][0])
        );
        // Plain stats leave out the partition fields; the schema says they may be absent.
        let plain = fields(&serde_json::to_value(forgemq::QueueStats::default()).unwrap());
        let schema = serde_json::to_value(<TopicStats as utoipa::PartialSchema>::schema()).unwrap();
        let required: BTreeSet<String> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(required, plain);
        assert_eq!(
            schema_fields::<PurgedCounts>(),
            fields(&serde_json::to_value(forgemq::Purged::default()).unwrap())
        );
        let schedule = forgemq::Schedule::default();
        assert_eq!(
            schema_fields::<ScheduleEntry>(),
            fields(&serde_json::to_value(schedule).unwrap())
        );
        let minute = json!({"minute": "", "published": 0, "processed": 0, "failed": 0});
        assert_eq!(schema_fields::<MinuteCounts>(), fields(&minute));
    }

    #[derive(serde::Deserialize)]
    struct Q {
        #[serde(default, deserialize_with = "opt_u64")]
        n: Option<u64>,
        #[serde(default, deserialize_with = "opt_u32")]
        m: Option<u32>,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Text {
        #[serde(default, deserialize_with = "query_u64")]
        n: Option<u64>,
    }

    #[test]
    fn whole_numbers_are_read_leniently_and_bounded() {
        let json = |s: &str| serde_json::from_str::<Q>(s).map(|q| (q.n, q.m));
        assert_eq!(json(r#"{"n": 5, "m": 7}"#).unwrap(), (Some(5), Some(7)));
        assert_eq!(
            json(r#"{"n": 5.0, "m": 1e3}"#).unwrap(),
            (Some(5), Some(1000))
        );
        assert_eq!(json(r#"{"n": null}"#).unwrap(), (None, None));
        assert_eq!(json("{}").unwrap(), (None, None));
        assert_eq!(
            json(r#"{"n": 9007199254740991}"#).unwrap().0,
            Some(MAX_INTEGER)
        );
        // Read exactly (serde_json's float_roundtrip): not ...305.5.
        assert_eq!(
            json(r#"{"n": 3742058052500306.0}"#).unwrap().0,
            Some(3742058052500306)
        );
        for bad in [
            r#"{"n": -1}"#,
            r#"{"n": 1.5}"#,
            r#"{"n": 9007199254740992}"#,
            r#"{"n": 18446744073709551616}"#,
            r#"{"n": "x"}"#,
            r#"{"m": 4294967296}"#,
            r#"{"n": true}"#,
            r#"{"n": "5"}"#,
        ] {
            assert!(json(bad).is_err(), "{bad}");
        }
        let query = |s: &str| {
            let uri: axum::http::Uri = format!("/?{s}").parse().unwrap();
            axum::extract::Query::<Text>::try_from_uri(&uri).map(|q| q.0.n)
        };
        assert_eq!(query("n=5").unwrap(), Some(5));
        assert_eq!(query("n=5.0").unwrap(), Some(5));
        for bad in ["n=-1", "n=", "n=1e400", "n=NaN", "n=1.5"] {
            assert!(query(bad).is_err(), "{bad}");
        }
    }
}
