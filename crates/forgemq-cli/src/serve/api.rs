//! The routes under `/api/v1`. Each is declared once with `#[utoipa::path]` and the
//! router is built from those declarations, so the OpenAPI document always matches.
//!
//! Every rejection (path, query string, body) answers the same JSON `{"error"}` with 400
//! (413 for a body over the limit), never axum's plain-text defaults.

#![allow(unused_qualifications)] // in the code that utoipa generates for the routes

use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use forgemq::{Error, MessageId, MessageState, PublishOptions, PublishOutcome};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::schema::{
    self, BatchPublished, Cancelled, CancelledFrom, DeletedCount, DeletedId, DeletedSchedule,
    Duplicate, Envelope, ErrorBody, GroupEntry, IdList, LimitEntry, MessageStatus, MinuteCounts,
    Paused, Published, PurgeResult, RequeuedCount, RequeuedId, Resumed, RunningMessage,
    ScheduleEntry, TopicLayout, TopicStats, WorkerEntry, WorkerStateField, WorkerTopicEntry,
};
use super::AppState;
use crate::output;

/// Messages a batch publish may carry: bounds the request body and the time one request
/// holds the server.
const MAX_BATCH: usize = 10_000;

/// Most messages one peek returns, whatever `limit` asks for.
const MAX_PAGE: u64 = 1000;

/// Unique keys hold this long unless `unique_ttl_ms` says otherwise.
const DEFAULT_UNIQUE_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(OpenApi)]
#[openapi(info(
    title = "ForgeMQ",
    description = "A reliable message queue on Redis: publish, inspect, manage dead letters. \
                   Every error answer is `{\"error\": \"...\"}`."
))]
struct ApiDoc;

/// The API routes and `/openapi.json`, relative to `/api/v1`.
pub(super) fn router(state: AppState) -> Router<AppState> {
    // Body limits before parsing: one message is at most max_payload (plus room for the
    // request's other fields and JSON escaping); a batch has its own, larger bound.
    let one = state
        .mq
        .max_payload()
        .saturating_mul(2)
        .saturating_add(64 << 10);
    let batch = OpenApiRouter::new()
        .routes(routes!(publish_batch))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20));
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(publish))
        .routes(routes!(list_topics, create_topic))
        .routes(routes!(topic_stats))
        .routes(routes!(peek))
        .routes(routes!(get_message, cancel))
        .routes(routes!(list_dead_letters, purge_dead_letters))
        .routes(routes!(retry_dead_letter))
        .routes(routes!(delete_dead_letter))
        .routes(routes!(retry_dead_letters))
        .routes(routes!(delete_dead_letters))
        .routes(routes!(list_workers))
        .routes(routes!(topic_workers))
        .routes(routes!(throughput_all))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(purge))
        .routes(routes!(throughput))
        .routes(routes!(list_limits))
        .routes(routes!(get_limit, put_limit, delete_limit))
        .routes(routes!(list_groups))
        .routes(routes!(put_group, delete_group))
        .routes(routes!(list_schedules))
        .routes(routes!(get_schedule, put_schedule, delete_schedule))
        .routes(routes!(run_schedule))
        .layer(axum::extract::DefaultBodyLimit::max(one))
        .merge(batch)
        .split_for_parts();
    let doc_json = schema::finish_document(&doc, state.token.is_some()).to_string();
    api.route(
        "/openapi.json",
        axum::routing::get(move || async move {
            (
                [(header::CONTENT_TYPE, "application/json")],
                doc_json.clone(),
            )
        }),
    )
    // The library checks the exact payload limit; this only stops absurd bodies early.
    .layer(axum::extract::DefaultBodyLimit::max(
        state
            .mq
            .max_payload()
            .saturating_mul(MAX_BATCH)
            .min(256 << 20),
    ))
}

/// Any path that is not a route: JSON like every other error.
pub(super) async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such route; the API is described at /api/v1/openapi.json".to_owned(),
    )
}

/// An error response: `{"error": "..."}` with a status that says whose fault it is.
pub(super) struct ApiError(pub(super) StatusCode, pub(super) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::NotCancellable { .. } | Error::TopicNotEmpty { .. } | Error::Conflict(_) => {
                StatusCode::CONFLICT
            }
            // On the master, not confirmed by enough replicas in time: the replicas lag or
            // are down, which is the server side's trouble and passes.
            Error::NotReplicated { .. } => StatusCode::SERVICE_UNAVAILABLE,
            e if e.is_invalid_input() => StatusCode::BAD_REQUEST,
            e if e.is_out_of_memory() || e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// `Path`, rejected with the API's JSON 400 (a path segment that is not UTF-8, say).
struct ApiPath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("bad path: {}", e.body_text()),
            )),
        }
    }
}

/// `Query`, rejected with the API's JSON 400 (`limit=-1`, an unknown `state`, ...).
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(e) => Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("bad query string: {}", e.body_text()),
            )),
        }
    }
}

/// `Json`, rejected with the API's JSON 400, or 413 for a body over the limit.
struct ApiJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> ApiResult<Self> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(e) => {
                let status = match e.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                Err(ApiError(
                    status,
                    format!("malformed request body: {}", e.body_text()),
                ))
            }
        }
    }
}

/// The topic of a route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct TopicPath {
    /// Topic name: 1-200 ASCII letters, digits and `. _ - :`, e.g. `user.welcome`.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,200}$", example = "user.welcome")]
    topic: String,
}

/// The topic and message id of a route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct MessagePath {
    /// Topic name: 1-200 ASCII letters, digits and `. _ - :`, e.g. `user.welcome`.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,200}$", example = "user.welcome")]
    topic: String,
    /// Message id: 1-200 bytes (UTF-8) without whitespace or control characters.
    #[param(
        pattern = "^[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,200}$",
        example = "01937a2c-5c3e-7d1a-9f6b-0c4b2a1e8d77"
    )]
    id: String,
}

/// A message to publish.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// Any JSON: the message data (integers must fit in 64 bits).
    data: Value,
    /// Deliver no earlier than this many milliseconds from now.
    #[serde(default, deserialize_with = "schema::opt_u64")]
    #[schema(minimum = 0, maximum = 9007199254740991_u64)]
    delay_ms: Option<u64>,
    /// Retries before the dead-letter queue (default: the consumer's, 3).
    #[serde(default, deserialize_with = "schema::opt_u32")]
    #[schema(minimum = 0, maximum = 4294967295_u64)]
    max_retry: Option<u32>,
    /// At most one message with this key at a time (see `unique_until`, `unique_ttl_ms`):
    /// 1-200 bytes (UTF-8) without control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"
    )]
    #[serde(default)]
    unique_key: Option<String>,
    /// How long the unique key holds at most, in milliseconds (default 24 h). Only with
    /// `unique_key`.
    #[serde(default, deserialize_with = "schema::opt_u64")]
    #[schema(minimum = 1, maximum = 9007199254740991_u64)]
    unique_ttl_ms: Option<u64>,
    /// When the unique key is released: `final` (default) when the message is processed,
    /// cancelled, purged or dead-lettered, or when the ttl ends if sooner; `ttl` only when
    /// the ttl ends. Only with `unique_key`.
    #[serde(default)]
    unique_until: Option<UniqueUntilField>,
    /// A caller-chosen id (1-200 bytes (UTF-8) without whitespace or control characters):
    /// publishing it again while it is stored is a duplicate.
    #[schema(
        max_length = 200,
        pattern = "^[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,200}$"
    )]
    #[serde(default)]
    id: Option<String>,
    /// Which partition of a partitioned topic it goes to: messages with the same key go
    /// to the same partition (default: the unique key, else the id, hashed). Ignored on a
    /// plain topic. 1-200 bytes (UTF-8) without control characters. On a partitioned topic
    /// a message with a `unique_key` may not have one too (409): the unique key picks the
    /// partition.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"
    )]
    #[serde(default)]
    partition_key: Option<String>,
    /// Headers the consumer reads without touching the data (e.g. a W3C `traceparent`):
    /// at most 64; names 1-128 bytes of printable ASCII without spaces, values up to 1,024 characters.
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    /// The fair group it waits in, e.g. a tenant: workers take from the groups in turn, so
    /// one group's backlog does not delay another. 1-200 bytes (UTF-8) without whitespace
    /// or control characters. On a partitioned topic the group picks the partition (unless
    /// a partition key or unique key is given).
    #[schema(
        max_length = 200,
        pattern = "^[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,200}$"
    )]
    #[serde(default)]
    group: Option<String>,
}

/// `unique_until` of a publish request.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum UniqueUntilField {
    #[default]
    Final,
    Ttl,
}

impl From<UniqueUntilField> for forgemq::UniqueUntil {
    fn from(u: UniqueUntilField) -> Self {
        match u {
            UniqueUntilField::Final => forgemq::UniqueUntil::Final,
            UniqueUntilField::Ttl => forgemq::UniqueUntil::Ttl,
        }
    }
}

impl PublishRequest {
    fn into_parts(self) -> ApiResult<(Value, PublishOptions)> {
        let mut options = PublishOptions::new();
        if let Some(ms) = self.delay_ms {
            options = options.delay(Duration::from_millis(ms));
        }
        if let Some(n) = self.max_retry {
            options = options.max_retry(n);
        }
        // Refused with or without a unique key: the document says at least 1.
        if self.unique_ttl_ms == Some(0) {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "unique_ttl_ms must be at least 1".to_owned(),
            ));
        }
        if let Some(key) = self.unique_key {
            let ttl = self
                .unique_ttl_ms
                .map_or(DEFAULT_UNIQUE_TTL, Duration::from_millis);
            options = options
                .unique_key(key, ttl)
                .unique_until(self.unique_until.unwrap_or_default().into());
        }
        if let Some(id) = self.id {
            options = options.id(message_id(&id)?);
        }
        if let Some(key) = self.partition_key {
            options = options.partition_key(key);
        }
        for (name, value) in self.headers {
            options = options.header(name, value);
        }
        if let Some(group) = self.group {
            options = options.group(group);
        }
        Ok((self.data, options))
    }
}

/// Up to 10,000 messages, stored in one go in request order.
#[derive(Debug, ToSchema)]
#[schema(max_items = 10000)]
struct PublishBatch(Vec<PublishRequest>);

impl<'de> Deserialize<'de> for PublishBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items = Vec::<Object<PublishRequest>>::deserialize(d)?;
        Ok(PublishBatch(items.into_iter().map(|Object(r)| r).collect()))
    }
}

/// A `T` that must come as a JSON object. serde's derive also reads a struct from an
/// array of its fields in order (`[1, null]` as `{"data": 1, "delay_ms": null}`), which
/// the API does not offer: a client sending that has a bug the server should report.
#[derive(Debug)]
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OnlyMaps<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for OnlyMaps<T> {
            type Value = T;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }

        d.deserialize_map(OnlyMaps(std::marker::PhantomData))
            .map(Object)
    }
}

fn message_id(id: &str) -> ApiResult<MessageId> {
    MessageId::new(id).map_err(ApiError::from)
}

/// Publish one message.
#[utoipa::path(post, path = "/topics/{topic}/messages", tag = "messages",
    params(TopicPath),
    request_body = PublishRequest,
    responses(
        (status = 201, description = "Stored", body = Published),
        (status = 200, description = "Duplicate: a message with this id, or holding this unique key, is stored; nothing was written", body = Duplicate),
        (status = 400, description = "Bad topic name, malformed JSON or a bad field", body = ErrorBody),
        (status = 409, description = "A partition key with a unique key, on a partitioned topic: nothing was written", body = ErrorBody),
        (status = 413, description = "Payload over the limit (1 MiB by default)", body = ErrorBody),
    ))]
async fn publish(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
    ApiJson(Object(request)): ApiJson<Object<PublishRequest>>,
) -> ApiResult<Response> {
    // The id is made here when the request has none (the same kind the library makes),
    // so that an answer after the write, such as too few replicas, can name it.
    let id = request.id.clone();
    let (data, mut options) = request.into_parts()?;
    let id = match id {
        Some(id) => id,
        None => {
            let id = MessageId::generate();
            options = options.id(id.clone());
            id.to_string()
        }
    };
    let outcome = state
        .mq
        .publish_with(&topic, data, options)
        .await
        .map_err(|e| match e {
            Error::NotReplicated { .. } => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "message {id} is stored on the master, but not yet on enough replicas ({e}); \
                     send it again with \"id\": \"{id}\" to be sure: it is stored once"
                ),
            ),
            e => e.into(),
        })?;
    Ok(match outcome {
        PublishOutcome::Duplicate(id) => (
            StatusCode::OK,
            Json(Duplicate {
                id: id.to_string(),
                duplicate: true,
            }),
        )
            .into_response(),
        outcome => (
            StatusCode::CREATED,
            Json(Published {
                id: outcome.id().to_string(),
            }),
        )
            .into_response(),
    })
}

/// Publish many messages in one request: all or nothing.
#[utoipa::path(post, path = "/topics/{topic}/messages/batch", tag = "messages",
    params(TopicPath),
    request_body = PublishBatch,
    responses(
        (status = 201, description = "Stored (duplicates excepted), ids in request order", body = BatchPublished),
        (status = 400, description = "Bad topic, malformed JSON, a bad field or more than 10,000 messages: nothing was stored", body = ErrorBody),
        (status = 409, description = "A partition key with a unique key, on a partitioned topic: nothing was stored", body = ErrorBody),
        (status = 413, description = "A payload over the limit: nothing was stored", body = ErrorBody),
    ))]
async fn publish_batch(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
    ApiJson(PublishBatch(requests)): ApiJson<PublishBatch>,
) -> ApiResult<(StatusCode, Json<BatchPublished>)> {
    if requests.len() > MAX_BATCH {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{} messages in one batch; at most {MAX_BATCH}",
                requests.len()
            ),
        ));
    }
    let items = requests
        .into_iter()
        .map(PublishRequest::into_parts)
        .collect::<ApiResult<Vec<_>>>()?;
    let outcomes = state
        .mq
        .publish_batch_with(&topic, items)
        .await
        .map_err(|e| match e {
            Error::NotReplicated { .. } => ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the batch is stored on the master, but not yet on enough replicas ({e}); \
                     sending it again stores again the messages without an \"id\""
                ),
            ),
            e => e.into(),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(BatchPublished {
            duplicates: outcomes.iter().filter(|o| o.is_duplicate()).count() as u64,
            ids: outcomes.iter().map(|o| o.id().to_string()).collect(),
        }),
    ))
}

/// Every topic with its counts per state and counters, by name.
#[utoipa::path(get, path = "/topics", tag = "topics",
    responses((status = 200, description = "Every topic's stats", body = Vec<TopicStats>)))]
async fn list_topics(State(state): State<AppState>) -> ApiResult<Json<Vec<forgemq::QueueStats>>> {
    Ok(Json(state.mq.get_all_queues().await?))
}

/// A topic to create, or whose partition count to change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateTopic {
    /// Topic name: 1-200 ASCII letters, digits and `. _ - :`.
    #[schema(
        pattern = "^[A-Za-z0-9._:-]{1,200}$",
        max_length = 200,
        example = "hot.orders"
    )]
    topic: String,
    /// Its partitions: 1 (a plain topic, the default) to 1,024. A partitioned topic
    /// spreads over that many hash tags, so that on Redis Cluster it uses every master.
    #[serde(default, deserialize_with = "schema::opt_u32")]
    #[schema(minimum = 1, maximum = 1024)]
    partitions: Option<u32>,
}

/// Create a topic with a partition count, or change its count.
///
/// The count of a topic can change only while it holds no message. `201` when the topic
/// is new or its count changed, `200` when it already had that count (nothing changed).
#[utoipa::path(post, path = "/topics", tag = "topics",
    request_body = CreateTopic,
    responses(
        (status = 201, description = "Created, or its partition count changed", body = TopicLayout),
        (status = 200, description = "It already had that partition count: nothing changed", body = TopicLayout),
        (status = 400, description = "Bad topic name, a partition count outside 1-1,024 or malformed JSON", body = ErrorBody),
        (status = 409, description = "The topic holds messages: its partition count can change only while it is empty", body = ErrorBody),
    ))]
async fn create_topic(
    State(state): State<AppState>,
    ApiJson(Object(request)): ApiJson<Object<CreateTopic>>,
) -> ApiResult<(StatusCode, Json<TopicLayout>)> {
    let topic = request.topic;
    forgemq::validate_topic(&topic)?;
    let partitions = request.partitions.unwrap_or(1);
    if !(1..=forgemq::MAX_PARTITIONS).contains(&partitions) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "partitions must be 1 to {}, not {partitions}",
                forgemq::MAX_PARTITIONS
            ),
        ));
    }
    // Read first only to choose between 200 and 201; the library decides and checks.
    let before = state.mq.topic_info(&topic).await?.partitions;
    let known = state.mq.topics().await?.contains(&topic);
    let info = state
        .mq
        .create_topic(&topic, forgemq::TopicOptions::new().partitions(partitions))
        .await?;
    let status = if known && before == info.partitions {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(TopicLayout {
            topic: info.topic,
            partitions: info.partitions,
        }),
    ))
}

/// One topic's counts per state and counters (zeros for a topic never used).
#[utoipa::path(get, path = "/topics/{topic}", tag = "topics",
    params(TopicPath),
    responses((status = 200, description = "The topic's stats", body = TopicStats),
              (status = 400, description = "Bad topic name", body = ErrorBody)))]
async fn topic_stats(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<forgemq::QueueStats>> {
    Ok(Json(state.mq.stats(&topic).await?))
}

/// The states `peek` can look into.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum StateParam {
    Pending,
    Delayed,
    Active,
    Dead,
}

impl From<StateParam> for MessageState {
    fn from(s: StateParam) -> Self {
        match s {
            StateParam::Pending => MessageState::Pending,
            StateParam::Delayed => MessageState::Delayed,
            StateParam::Active => MessageState::Active,
            StateParam::Dead => MessageState::Dead,
        }
    }
}

/// Which messages to look at.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PeekQuery {
    /// Which state (default pending).
    #[serde(default)]
    #[param(inline, nullable = false)]
    state: Option<StateParam>,
    /// How many (default 20; at most 1,000 are returned).
    #[serde(default, deserialize_with = "schema::query_u64")]
    #[param(nullable = false, minimum = 0, maximum = 9007199254740991_u64)]
    limit: Option<u64>,
    /// How many to skip (default 0).
    #[serde(default, deserialize_with = "schema::query_u64")]
    #[param(nullable = false, minimum = 0, maximum = 9007199254740991_u64)]
    offset: Option<u64>,
}

/// Which dead letters to look at.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeadLetterQuery {
    /// Only those whose error contains this text, ignoring case (among the 10,000 oldest
    /// of each partition).
    #[serde(default)]
    #[param(nullable = false, max_length = 2048)]
    error: Option<String>,
    /// How many (default 20; at most 1,000 are returned).
    #[serde(default, deserialize_with = "schema::query_u64")]
    #[param(nullable = false, minimum = 0, maximum = 9007199254740991_u64)]
    limit: Option<u64>,
    /// How many to skip (default 0).
    #[serde(default, deserialize_with = "schema::query_u64")]
    #[param(nullable = false, minimum = 0, maximum = 9007199254740991_u64)]
    offset: Option<u64>,
}

fn page(limit: Option<u64>, offset: Option<u64>) -> std::ops::Range<usize> {
    // Far past any real queue, and within Redis's integer range.
    let offset = offset.unwrap_or(0).min(1 << 40);
    let limit = limit.unwrap_or(20).min(MAX_PAGE);
    // Both fit a usize on every platform Redis runs on.
    let offset = usize::try_from(offset).unwrap_or(usize::MAX);
    offset..offset.saturating_add(usize::try_from(limit).unwrap_or(0))
}

/// Look at messages of one state without taking them, oldest first.
///
/// A partitioned topic's partitions are merged: by time for delayed, active and dead
/// messages; for pending ones the partitions take turns (there is no order across them),
/// and pages reach 10,000 deep.
#[utoipa::path(get, path = "/topics/{topic}/messages", tag = "messages",
    params(TopicPath, PeekQuery),
    responses((status = 200, description = "Stored envelopes", body = Vec<Envelope>),
              (status = 400, description = "Bad topic or query string", body = ErrorBody)))]
async fn peek(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
    ApiQuery(q): ApiQuery<PeekQuery>,
) -> ApiResult<Json<Vec<Value>>> {
    let which = q.state.map_or(MessageState::Pending, MessageState::from);
    let found = state
        .mq
        .peek(&topic, which, page(q.limit, q.offset))
        .await?;
    Ok(Json(output::envelopes(&found)))
}

/// One message by id: what happened to it (`state`: pending, delayed, active, done,
/// dead, cancelled), its `progress`, `result` and last `error`, and for a stored one its
/// envelope with the fields of its state (`ready_since` pending, `due_at` delayed,
/// `lease_until`, `holder` and `started_at` active, `died_at` dead). Done and cancelled
/// ones are kept for the topic's result retention (default: the last 1,000 for an hour),
/// with `data` null and `finished_at`.
#[utoipa::path(get, path = "/topics/{topic}/messages/{id}", tag = "messages",
    params(MessagePath),
    responses((status = 200, description = "Where it is, and its envelope", body = MessageStatus),
              (status = 400, description = "Bad topic or id", body = ErrorBody),
              (status = 404, description = "Unknown: never published, purged, or finished longer ago than the topic keeps records", body = ErrorBody)))]
async fn get_message(
    State(state): State<AppState>,
    ApiPath(MessagePath { topic, id }): ApiPath<MessagePath>,
) -> ApiResult<Json<Value>> {
    let id = message_id(&id)?;
    let stored = state.mq.message(&topic, &id).await?;
    let status = state.mq.message_status(&topic, &id).await?;
    if stored.is_none() && status.state == forgemq::Status::Unknown {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no message {id} in {topic}: {}", crate::UNKNOWN_MESSAGE),
        ));
    }
    Ok(Json(output::status(&topic, &id, stored.as_ref(), &status)))
}

/// Cancel a delayed or pending message.
#[utoipa::path(delete, path = "/topics/{topic}/messages/{id}", tag = "messages",
    params(MessagePath),
    responses((status = 200, description = "Cancelled", body = Cancelled),
              (status = 400, description = "Bad topic or id", body = ErrorBody),
              (status = 404, description = "No such waiting message", body = ErrorBody),
              (status = 409, description = "Being handled or dead: not cancellable", body = ErrorBody)))]
async fn cancel(
    State(state): State<AppState>,
    ApiPath(MessagePath { topic, id }): ApiPath<MessagePath>,
) -> ApiResult<Json<Cancelled>> {
    let was = match state.mq.cancel(&topic, &message_id(&id)?).await? {
        forgemq::Cancelled::Delayed => CancelledFrom::Delayed,
        _ => CancelledFrom::Pending,
    };
    Ok(Json(Cancelled { cancelled: id, was }))
}

/// The dead-letter queue, oldest first, with the error that killed each; with `error`,
/// only those whose error contains that text.
#[utoipa::path(get, path = "/topics/{topic}/dead-letters", tag = "dead letters",
    params(TopicPath, DeadLetterQuery),
    responses((status = 200, description = "Dead letters: envelopes with `error` and `died_at`", body = Vec<Envelope>),
              (status = 400, description = "Bad topic or query string", body = ErrorBody)))]
async fn list_dead_letters(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
    ApiQuery(q): ApiQuery<DeadLetterQuery>,
) -> ApiResult<Json<Vec<Value>>> {
    let range = page(q.limit, q.offset);
    if q.error
        .as_ref()
        .is_some_and(|e| e.chars().count() > MAX_ERROR_FILTER)
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("error is at most {MAX_ERROR_FILTER} characters (stored error texts are at most 2 KiB)"),
        ));
    }
    let found = match q.error.filter(|e| !e.is_empty()) {
        Some(text) => state.mq.dead_letters_matching(&topic, &text, range).await?,
        None => state.mq.peek(&topic, MessageState::Dead, range).await?,
    };
    Ok(Json(output::envelopes(&found)))
}

/// Delete every dead letter of the topic for good.
#[utoipa::path(delete, path = "/topics/{topic}/dead-letters", tag = "dead letters",
    params(TopicPath),
    responses((status = 200, description = "How many were deleted", body = DeletedCount),
              (status = 400, description = "Bad topic name", body = ErrorBody)))]
async fn purge_dead_letters(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<DeletedCount>> {
    Ok(Json(DeletedCount {
        deleted: state.mq.purge_dead_letters(&topic).await?,
    }))
}

/// Send one dead letter back to the queue with fresh retries.
#[utoipa::path(post, path = "/topics/{topic}/dead-letters/{id}/retry", tag = "dead letters",
    params(MessagePath),
    responses((status = 200, description = "Back in the queue", body = RequeuedId),
              (status = 400, description = "Bad topic or id", body = ErrorBody),
              (status = 404, description = "No such dead letter", body = ErrorBody)))]
async fn retry_dead_letter(
    State(state): State<AppState>,
    ApiPath(MessagePath { topic, id }): ApiPath<MessagePath>,
) -> ApiResult<Json<RequeuedId>> {
    state
        .mq
        .reprocess_dead_letter(&topic, &message_id(&id)?)
        .await?;
    Ok(Json(RequeuedId { requeued: id }))
}

/// Delete one dead letter for good.
#[utoipa::path(delete, path = "/topics/{topic}/dead-letters/{id}", tag = "dead letters",
    params(MessagePath),
    responses((status = 200, description = "Deleted", body = DeletedId),
              (status = 400, description = "Bad topic or id", body = ErrorBody),
              (status = 404, description = "No such dead letter", body = ErrorBody)))]
async fn delete_dead_letter(
    State(state): State<AppState>,
    ApiPath(MessagePath { topic, id }): ApiPath<MessagePath>,
) -> ApiResult<Json<DeletedId>> {
    state
        .mq
        .delete_dead_letter(&topic, &message_id(&id)?)
        .await?;
    Ok(Json(DeletedId { deleted: id }))
}

/// Send dead letters back to the queue with fresh retries: those of `{"ids": [...]}`
/// (ids that are not dead letters of the topic are skipped), or every one without a body.
#[utoipa::path(post, path = "/topics/{topic}/dead-letters/retry", tag = "dead letters",
    params(TopicPath),
    request_body(content = Option<IdList>, description = "The dead letters to retry; without a body (or `null`), all of them"),
    responses((status = 200, description = "How many went back", body = RequeuedCount),
              (status = 400, description = "Bad topic name, malformed body or a bad id", body = ErrorBody),
              (status = 413, description = "Body over the limit", body = ErrorBody)))]
async fn retry_dead_letters(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
    body: axum::body::Bytes,
) -> ApiResult<Json<RequeuedCount>> {
    let requeued = match id_list(&body)? {
        None => state.mq.reprocess_all_dead_letters(&topic).await?,
        Some(ids) => state.mq.reprocess_dead_letters(&topic, &ids).await?,
    };
    Ok(Json(RequeuedCount { requeued }))
}

/// Delete the dead letters of `{"ids": [...]}` for good (ids that are not dead letters of
/// the topic are skipped).
#[utoipa::path(post, path = "/topics/{topic}/dead-letters/delete", tag = "dead letters",
    params(TopicPath),
    request_body = IdList,
    responses((status = 200, description = "How many were deleted", body = DeletedCount),
              (status = 400, description = "Bad topic name, malformed body or a bad id", body = ErrorBody),
              (status = 413, description = "Body over the limit", body = ErrorBody)))]
async fn delete_dead_letters(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
    body: axum::body::Bytes,
) -> ApiResult<Json<DeletedCount>> {
    let Some(ids) = id_list(&body)? else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "give the dead letters to delete as {\"ids\": [...]}; DELETE .../dead-letters deletes all".to_owned(),
        ));
    };
    Ok(Json(DeletedCount {
        deleted: state.mq.delete_dead_letters(&topic, &ids).await?,
    }))
}

/// Longest `error` filter: error texts are stored up to 2 KiB, so a longer one matches nothing.
const MAX_ERROR_FILTER: usize = 2048;

/// Most ids one bulk request may name.
const MAX_IDS: usize = 10_000;

/// The ids of an `{"ids": [...]}` body; `None` for an empty body or `null`.
fn id_list(body: &[u8]) -> ApiResult<Option<Vec<MessageId>>> {
    let text = body.trim_ascii();
    if text.is_empty() || text == b"null" {
        return Ok(None);
    }
    let bad = |e: String| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("malformed request body: {e}"),
        )
    };
    let Object(list) =
        serde_json::from_slice::<Object<IdList>>(body).map_err(|e| bad(e.to_string()))?;
    if list.ids.len() > MAX_IDS {
        return Err(bad(format!(
            "{} ids; one request takes at most {MAX_IDS}",
            list.ids.len()
        )));
    }
    list.ids
        .into_iter()
        .map(|id| message_id(&id.0))
        .collect::<ApiResult<Vec<_>>>()
        .map(Some)
}

/// The live workers, oldest first: who they are, what they consume, how busy they are
/// and which messages they are running. A worker that stops heartbeating drops out three
/// heartbeat intervals (15 s by default) after its last one.
#[utoipa::path(get, path = "/workers", tag = "workers",
    responses((status = 200, description = "Live workers", body = Vec<WorkerEntry>)))]
async fn list_workers(State(state): State<AppState>) -> ApiResult<Json<Vec<WorkerEntry>>> {
    let workers = state.mq.workers().await?;
    Ok(Json(worker_entries(&state.mq, workers).await?))
}

/// The live workers that consume one topic (see `GET /workers`).
#[utoipa::path(get, path = "/topics/{topic}/workers", tag = "workers",
    params(TopicPath),
    responses((status = 200, description = "Live workers of the topic", body = Vec<WorkerEntry>),
              (status = 400, description = "Bad topic name", body = ErrorBody)))]
async fn topic_workers(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<Vec<WorkerEntry>>> {
    let workers = state.mq.topic_workers(&topic).await?;
    Ok(Json(worker_entries(&state.mq, workers).await?))
}

/// The API's worker entries: the registry's, with the messages each one runs (read from
/// the active messages of their topics: one peek per topic).
async fn worker_entries(
    mq: &forgemq::Client,
    workers: Vec<forgemq::WorkerInfo>,
) -> ApiResult<Vec<WorkerEntry>> {
    let mut topics: Vec<&str> = workers
        .iter()
        .flat_map(|w| w.topics.iter().map(|t| t.topic.as_str()))
        .collect();
    topics.sort_unstable();
    topics.dedup();
    let active = futures::future::try_join_all(
        topics
            .iter()
            .map(|t| mq.peek(t, MessageState::Active, 0..MAX_PAGE as usize)),
    )
    .await?;
    let mut running: std::collections::HashMap<&str, Vec<RunningMessage>> = Default::default();
    for m in active.iter().flatten() {
        if let Some(holder) = m.holder.as_deref() {
            running.entry(holder).or_default().push(RunningMessage {
                topic: m.topic.clone(),
                id: m.id.to_string(),
                started_at: m.started_at.map(output::rfc3339),
            });
        }
    }
    Ok(workers
        .into_iter()
        .map(|w| {
            let mut runs = running.remove(w.id.as_str()).unwrap_or_default();
            runs.sort_by(|a, b| a.started_at.cmp(&b.started_at));
            WorkerEntry {
                state: match w.state {
                    forgemq::WorkerState::Draining => WorkerStateField::Draining,
                    _ => WorkerStateField::Running,
                },
                started_at: output::rfc3339(w.started_at),
                last_heartbeat: output::rfc3339(w.last_heartbeat),
                topics: w
                    .topics
                    .iter()
                    .map(|t| WorkerTopicEntry {
                        topic: t.topic.clone(),
                        concurrency: t.concurrency as u64,
                        in_flight: t.in_flight as u64,
                    })
                    .collect(),
                running: runs,
                id: w.id,
                name: w.name,
                host: w.host,
                pid: w.pid,
                version: w.version,
            }
        })
        .collect())
}

/// Pause a topic: workers everywhere stop taking its messages; publishing still works.
#[utoipa::path(post, path = "/topics/{topic}/pause", tag = "topics",
    params(TopicPath),
    responses((status = 200, description = "Paused", body = Paused),
              (status = 400, description = "Bad topic name", body = ErrorBody)))]
async fn pause(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<Paused>> {
    state.mq.pause(&topic).await?;
    Ok(Json(Paused { paused: true }))
}

/// Resume a paused topic.
#[utoipa::path(post, path = "/topics/{topic}/resume", tag = "topics",
    params(TopicPath),
    responses((status = 200, description = "Running", body = Resumed),
              (status = 400, description = "Bad topic name", body = ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<Resumed>> {
    let was_paused = state.mq.resume(&topic).await?;
    Ok(Json(Resumed {
        paused: false,
        was_paused,
    }))
}

/// Delete every message of the topic in every state, and its record of processed ids
/// (counters stay). Messages being handled are deleted too; their outcome is refused.
#[utoipa::path(post, path = "/topics/{topic}/purge", tag = "topics",
    params(TopicPath),
    responses((status = 200, description = "What was deleted, per state", body = PurgeResult),
              (status = 400, description = "Bad topic name", body = ErrorBody)))]
async fn purge(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<Value>> {
    let deleted = state.mq.purge_queue(&topic).await?;
    Ok(Json(serde_json::json!({ "deleted": deleted })))
}

/// Published, processed and failed per minute over the last hour, oldest first.
#[utoipa::path(get, path = "/topics/{topic}/throughput", tag = "topics",
    params(TopicPath),
    responses((status = 200, description = "60 minutes, oldest first", body = Vec<MinuteCounts>),
              (status = 400, description = "Bad topic name", body = ErrorBody)))]
async fn throughput(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<Vec<forgemq::MinuteCounts>>> {
    Ok(Json(state.mq.throughput(&topic).await?))
}

/// Published, processed and failed per minute over the last hour across all topics,
/// oldest first.
#[utoipa::path(get, path = "/throughput", tag = "topics",
    responses((status = 200, description = "60 minutes, oldest first", body = Vec<MinuteCounts>)))]
async fn throughput_all(
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<forgemq::MinuteCounts>>> {
    let topics = state.mq.topics().await?;
    let each = futures::future::try_join_all(topics.iter().map(|t| state.mq.throughput(t))).await?;
    let mut sum: Vec<forgemq::MinuteCounts> = Vec::new();
    for minutes in each {
        if sum.is_empty() {
            sum = minutes;
            continue;
        }
        // Matched by minute: each topic's figures were read at a slightly different time.
        for m in minutes {
            if let Some(total) = sum.iter_mut().find(|t| t.minute == m.minute) {
                total.published += m.published;
                total.processed += m.processed;
                total.failed += m.failed;
            }
        }
    }
    if sum.is_empty() {
        // No topic yet: the same 60 minutes, all zero (a topic that was never used).
        sum = state.mq.throughput("forgemq.none").await?;
    }
    Ok(Json(sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::openapi::path::ParameterIn;

    fn pattern_of(params: Vec<utoipa::openapi::path::Parameter>, name: &str) -> String {
        let params = serde_json::to_value(params).unwrap();
        params
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["schema"]["pattern"].as_str())
            .unwrap()
            .to_owned()
    }

    /// The documented topic pattern is the library's rule, character by character.
    #[test]
    fn topic_pattern_is_the_library_rule() {
        let pattern = pattern_of(TopicPath::into_params(|| Some(ParameterIn::Path)), "topic");
        assert_eq!(pattern, "^[A-Za-z0-9._:-]{1,200}$");
        assert_eq!(
            pattern_of(
                MessagePath::into_params(|| Some(ParameterIn::Path)),
                "topic"
            ),
            pattern
        );
        for c in (0..=0x2fff_u32).filter_map(char::from_u32) {
            let in_class = c.is_ascii_alphanumeric() || "._:-".contains(c);
            assert_eq!(
                forgemq::validate_topic(&c.to_string()).is_ok(),
                in_class,
                "{c:?}"
            );
        }
        assert!(forgemq::validate_topic(&"a".repeat(200)).is_ok());
        assert!(forgemq::validate_topic(&"a".repeat(201)).is_err());
    }

    /// The documented id pattern is the library's rule (no whitespace, no control
    /// characters), character by character.
    #[test]
    fn id_pattern_is_the_library_rule() {
        let pattern = pattern_of(MessagePath::into_params(|| Some(ParameterIn::Path)), "id");
        let excluded = |c: char| {
            let c = u32::from(c);
            c <= 0x20
                || (0x7f..=0xa0).contains(&c)
                || matches!(c, 0x1680 | 0x2028 | 0x2029 | 0x202f | 0x205f | 0x3000)
                || (0x2000..=0x200a).contains(&c)
        };
        assert_eq!(
            pattern,
            "^[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,200}$"
        );
        for c in (0..=0x3100_u32).filter_map(char::from_u32) {
            assert_eq!(MessageId::new(c.to_string()).is_ok(), !excluded(c), "{c:?}");
        }
    }
}

/// The schedule of a route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct SchedulePath {
    /// Schedule name: 1-176 bytes (UTF-8) without whitespace or control characters.
    #[param(
        pattern = "^[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,176}$",
        example = "nightly-report"
    )]
    name: String,
}

/// A schedule to create or change: `cron` (with `tz`) or `every`, and the topic.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ScheduleRequest {
    /// A cron pattern: 5 fields (minute hour day month weekday), or 6 with seconds first.
    #[schema(example = "*/5 * * * *")]
    cron: Option<String>,
    /// The IANA time zone the cron pattern is read in (default UTC).
    #[schema(example = "Asia/Shanghai")]
    tz: Option<String>,
    /// Fire every this long instead, e.g. `30s`, `15m` (at least 1s).
    #[schema(example = "30s")]
    every: Option<String>,
    /// The topic its messages go to.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,200}$", example = "report.nightly")]
    topic: String,
    /// The data of its messages (default null).
    #[serde(default)]
    data: Value,
    /// Fire times missed while no scheduler ran: `once` (default), `skip`, `catch-up:N`.
    #[schema(example = "once")]
    missed: Option<String>,
    /// Retries of each message before the dead-letter queue.
    #[serde(default, deserialize_with = "schema::opt_u32")]
    #[schema(minimum = 0, maximum = 4294967295_u64)]
    max_retry: Option<u32>,
}

fn schedule_entry(s: forgemq::Schedule) -> ScheduleEntry {
    ScheduleEntry {
        name: s.name,
        topic: s.topic,
        cron: s.cron,
        every_ms: s.every_ms,
        tz: s.tz,
        data: s.data,
        missed: s.missed.to_string(),
        next_fire: s.next_fire.map(output::rfc3339),
        last_fire: s.last_fire.map(output::rfc3339),
        fired: s.fired,
    }
}

fn no_schedule(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no schedule named {name:?}"))
}

/// Every schedule, sorted by name.
#[utoipa::path(get, path = "/schedules", tag = "schedules",
    responses((status = 200, description = "The schedules", body = Vec<ScheduleEntry>)))]
async fn list_schedules(State(state): State<AppState>) -> ApiResult<Json<Vec<ScheduleEntry>>> {
    let all = state.mq.schedules().await?;
    Ok(Json(all.into_iter().map(schedule_entry).collect()))
}

/// One schedule.
#[utoipa::path(get, path = "/schedules/{name}", tag = "schedules",
    params(SchedulePath),
    responses((status = 200, description = "The schedule", body = ScheduleEntry),
              (status = 400, description = "Bad schedule name", body = ErrorBody),
              (status = 404, description = "No such schedule", body = ErrorBody)))]
async fn get_schedule(
    State(state): State<AppState>,
    ApiPath(SchedulePath { name }): ApiPath<SchedulePath>,
) -> ApiResult<Json<ScheduleEntry>> {
    match state.mq.schedule(&name).await? {
        Some(s) => Ok(Json(schedule_entry(s))),
        None => Err(no_schedule(&name)),
    }
}

/// Create or change a schedule. An unchanged spec keeps its next fire time; a changed one
/// computes it again. Its messages have the ids `schedule:<name>:<fire time in ms>`.
#[utoipa::path(put, path = "/schedules/{name}", tag = "schedules",
    params(SchedulePath),
    request_body = ScheduleRequest,
    responses((status = 200, description = "The schedule as stored", body = ScheduleEntry),
              (status = 400, description = "Bad name, pattern, time zone, period, topic or data", body = ErrorBody),
              (status = 413, description = "Its message would be over the payload limit", body = ErrorBody)))]
async fn put_schedule(
    State(state): State<AppState>,
    ApiPath(SchedulePath { name }): ApiPath<SchedulePath>,
    ApiJson(Object(request)): ApiJson<Object<ScheduleRequest>>,
) -> ApiResult<Json<ScheduleEntry>> {
    let bad = |text: String| ApiError(StatusCode::BAD_REQUEST, text);
    let mut spec = match (request.cron, request.every) {
        (Some(cron), None) => {
            forgemq::ScheduleSpec::cron(cron).tz(request.tz.unwrap_or_else(|| "UTC".to_owned()))
        }
        (None, Some(every)) => {
            if request.tz.is_some() {
                return Err(bad("tz applies to cron schedules only".to_owned()));
            }
            let period = humantime::parse_duration(&every)
                .map_err(|e| bad(format!("every {every:?}: {e} (e.g. \"30s\", \"15m\")")))?;
            forgemq::ScheduleSpec::every(period)
        }
        _ => return Err(bad("give either cron or every".to_owned())),
    };
    if let Some(missed) = request.missed {
        spec = spec.missed(missed.parse()?);
    }
    if let Some(n) = request.max_retry {
        spec = spec.options(PublishOptions::new().max_retry(n));
    }
    spec = spec.topic(request.topic).data(request.data);
    Ok(Json(schedule_entry(
        state.mq.upsert_schedule(&name, spec).await?,
    )))
}

/// Remove a schedule; the messages it published stay.
#[utoipa::path(delete, path = "/schedules/{name}", tag = "schedules",
    params(SchedulePath),
    responses((status = 200, description = "Removed", body = DeletedSchedule),
              (status = 400, description = "Bad schedule name", body = ErrorBody),
              (status = 404, description = "No such schedule", body = ErrorBody)))]
async fn delete_schedule(
    State(state): State<AppState>,
    ApiPath(SchedulePath { name }): ApiPath<SchedulePath>,
) -> ApiResult<Json<DeletedSchedule>> {
    if state.mq.remove_schedule(&name).await? {
        Ok(Json(DeletedSchedule { deleted: name }))
    } else {
        Err(no_schedule(&name))
    }
}

/// Publish the schedule's message now, with the id `schedule:<name>:<now in ms>`; its
/// regular fire times stay.
#[utoipa::path(post, path = "/schedules/{name}/run", tag = "schedules",
    params(SchedulePath),
    responses((status = 201, description = "Published", body = Published),
              (status = 400, description = "Bad schedule name", body = ErrorBody),
              (status = 404, description = "No such schedule", body = ErrorBody)))]
async fn run_schedule(
    State(state): State<AppState>,
    ApiPath(SchedulePath { name }): ApiPath<SchedulePath>,
) -> ApiResult<(StatusCode, Json<Published>)> {
    if state.mq.schedule(&name).await?.is_none() {
        return Err(no_schedule(&name));
    }
    let id = state.mq.run_schedule_now(&name).await?;
    Ok((StatusCode::CREATED, Json(Published { id: id.to_string() })))
}

/// The topic and group of a route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct GroupPath {
    /// Topic name: 1-200 ASCII letters, digits and `. _ - :`, e.g. `user.welcome`.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,200}$", example = "user.welcome")]
    topic: String,
    /// Group name: 1-200 bytes (UTF-8) without whitespace or control characters.
    #[param(
        pattern = "^[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]{1,200}$",
        example = "tenant-42"
    )]
    group: String,
}

/// A fair group's settings to set; fields left out keep their current value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct GroupRequest {
    /// Most of its messages handled at once across every worker (0: no cap).
    #[serde(default, deserialize_with = "schema::opt_u32")]
    #[schema(minimum = 0, maximum = 4294967295_u64)]
    max_active: Option<u32>,
    /// Messages it gives per turn of the round robin.
    #[serde(default, deserialize_with = "schema::opt_u32")]
    #[schema(minimum = 1, maximum = 1000)]
    weight: Option<u32>,
    /// Paused: its messages wait, the other groups go on.
    #[serde(default)]
    paused: Option<bool>,
}

fn group_entry(g: forgemq::GroupInfo) -> GroupEntry {
    GroupEntry {
        group: g.group,
        pending: g.pending,
        active: g.active,
        max_active: g.max_active,
        weight: g.weight,
        paused: g.paused,
        configured: g.configured,
    }
}

async fn one_group(state: &AppState, topic: &str, group: &str) -> ApiResult<GroupEntry> {
    let found = state
        .mq
        .groups(topic)
        .await?
        .into_iter()
        .find(|g| g.group == group);
    Ok(match found {
        Some(g) => group_entry(g),
        None => GroupEntry {
            group: group.to_owned(),
            pending: 0,
            active: 0,
            max_active: 0,
            weight: 1,
            paused: false,
            configured: false,
        },
    })
}

/// The topic's fair groups: those with waiting or running messages or settings.
#[utoipa::path(get, path = "/topics/{topic}/groups", tag = "groups",
    params(TopicPath),
    responses((status = 200, description = "The groups, by name", body = Vec<GroupEntry>),
              (status = 400, description = "Bad topic name", body = ErrorBody)))]
async fn list_groups(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<Vec<GroupEntry>>> {
    let all = state.mq.groups(&topic).await?;
    Ok(Json(all.into_iter().map(group_entry).collect()))
}

/// Set how workers treat one group of the topic, for every worker from now on.
#[utoipa::path(put, path = "/topics/{topic}/groups/{group}", tag = "groups",
    params(GroupPath),
    request_body = GroupRequest,
    responses((status = 200, description = "The group as it now is", body = GroupEntry),
              (status = 400, description = "Bad topic or group name, or weight", body = ErrorBody)))]
async fn put_group(
    State(state): State<AppState>,
    ApiPath(GroupPath { topic, group }): ApiPath<GroupPath>,
    ApiJson(Object(request)): ApiJson<Object<GroupRequest>>,
) -> ApiResult<Json<GroupEntry>> {
    let mut settings = state.mq.group_settings(&topic, &group).await?;
    if let Some(n) = request.max_active {
        settings = settings.max_active(n);
    }
    if let Some(w) = request.weight {
        settings = settings.weight(w);
    }
    if let Some(p) = request.paused {
        settings = settings.paused(p);
    }
    state.mq.set_group(&topic, &group, settings).await?;
    Ok(Json(one_group(&state, &topic, &group).await?))
}

/// Remove a group's settings (back to no cap, weight 1, not paused).
#[utoipa::path(delete, path = "/topics/{topic}/groups/{group}", tag = "groups",
    params(GroupPath),
    responses((status = 200, description = "Removed; the group as it now is", body = GroupEntry),
              (status = 400, description = "Bad topic or group name", body = ErrorBody),
              (status = 404, description = "The group has no settings", body = ErrorBody)))]
async fn delete_group(
    State(state): State<AppState>,
    ApiPath(GroupPath { topic, group }): ApiPath<GroupPath>,
) -> ApiResult<Json<GroupEntry>> {
    if !state.mq.remove_group(&topic, &group).await? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("group {group:?} of {topic:?} has no settings"),
        ));
    }
    Ok(Json(one_group(&state, &topic, &group).await?))
}

/// A rate limit to set.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LimitRequest {
    /// COUNT/PERIOD: `100/s`, `6000/m`, `10/h`, `5/500ms`.
    #[schema(example = "100/s")]
    rate: String,
    /// How many may start at once after a quiet spell (default: a tenth of a second's
    /// worth, at least 1).
    #[serde(default, deserialize_with = "schema::opt_u32")]
    #[schema(minimum = 1, maximum = 1000000)]
    burst: Option<u32>,
}

fn limit_entry(topic: String, limit: forgemq::RateLimit) -> LimitEntry {
    LimitEntry {
        topic,
        rate: limit.to_string(),
        per_second: limit.per_second(),
        burst: limit.burst_size(),
    }
}

/// Every topic with a rate limit.
#[utoipa::path(get, path = "/limits", tag = "limits",
    responses((status = 200, description = "The limits", body = Vec<LimitEntry>)))]
async fn list_limits(State(state): State<AppState>) -> ApiResult<Json<Vec<LimitEntry>>> {
    let all = state.mq.rate_limits().await?;
    Ok(Json(
        all.into_iter()
            .map(|l| LimitEntry {
                topic: l.topic,
                rate: l.rate,
                per_second: l.per_second,
                burst: l.burst,
            })
            .collect(),
    ))
}

/// The topic's rate limit.
#[utoipa::path(get, path = "/topics/{topic}/limit", tag = "limits",
    params(TopicPath),
    responses((status = 200, description = "The limit", body = LimitEntry),
              (status = 400, description = "Bad topic name", body = ErrorBody),
              (status = 404, description = "The topic has no rate limit", body = ErrorBody)))]
async fn get_limit(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<LimitEntry>> {
    match state.mq.rate_limit(&topic).await? {
        Some(limit) => Ok(Json(limit_entry(topic, limit))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{topic:?} has no rate limit"),
        )),
    }
}

/// Limit how many messages of the topic start per unit of time, across every worker, from
/// now on. On a partitioned topic each of its N partitions gets rate/N.
#[utoipa::path(put, path = "/topics/{topic}/limit", tag = "limits",
    params(TopicPath),
    request_body = LimitRequest,
    responses((status = 200, description = "The limit as set", body = LimitEntry),
              (status = 400, description = "Bad topic name, rate or burst", body = ErrorBody)))]
async fn put_limit(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
    ApiJson(Object(request)): ApiJson<Object<LimitRequest>>,
) -> ApiResult<Json<LimitEntry>> {
    let mut limit: forgemq::RateLimit = request.rate.parse()?;
    if let Some(b) = request.burst {
        limit = limit.burst(b);
    }
    state.mq.set_rate_limit(&topic, limit).await?;
    Ok(Json(limit_entry(topic, limit)))
}

/// Remove the topic's rate limit.
#[utoipa::path(delete, path = "/topics/{topic}/limit", tag = "limits",
    params(TopicPath),
    responses((status = 200, description = "Removed; the limit it had", body = LimitEntry),
              (status = 400, description = "Bad topic name", body = ErrorBody),
              (status = 404, description = "The topic has no rate limit", body = ErrorBody)))]
async fn delete_limit(
    State(state): State<AppState>,
    ApiPath(TopicPath { topic }): ApiPath<TopicPath>,
) -> ApiResult<Json<LimitEntry>> {
    let Some(limit) = state.mq.rate_limit(&topic).await? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{topic:?} has no rate limit"),
        ));
    };
    state.mq.remove_rate_limit(&topic).await?;
    Ok(Json(limit_entry(topic, limit)))
}
