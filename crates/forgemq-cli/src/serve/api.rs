//! The routes under `/api/v1`. Each is declared once with `#[utoipa::path]` and the
//! router is built from those declarations, so the OpenAPI document always matches.

#![allow(unused_qualifications)] // in the code that utoipa generates for the routes

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use forgemq::{Error, MessageId, MessageState, PublishOptions, PublishOutcome};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::output;

/// Messages a batch publish may carry: bounds the request body and the time one request
/// holds the server.
const MAX_BATCH: usize = 10_000;

#[derive(OpenApi)]
#[openapi(info(
    title = "ForgeMQ",
    description = "A reliable message queue on Redis: publish, inspect, manage dead letters."
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
        .routes(routes!(list_topics))
        .routes(routes!(topic_stats))
        .routes(routes!(peek))
        .routes(routes!(cancel))
        .routes(routes!(list_dead_letters, purge_dead_letters))
        .routes(routes!(retry_dead_letter))
        .routes(routes!(delete_dead_letter))
        .routes(routes!(retry_all_dead_letters))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(purge))
        .routes(routes!(throughput))
        .layer(axum::extract::DefaultBodyLimit::max(one))
        .merge(batch)
        .split_for_parts();
    let doc_json = doc.to_json().unwrap_or_else(|_| "{}".to_owned());
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
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::NotCancellable { .. } => StatusCode::CONFLICT,
            e if e.is_invalid_input() => StatusCode::BAD_REQUEST,
            e if e.is_out_of_memory() || e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        let status = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, format!("malformed request body: {}", e.body_text()))
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn message_id(id: &str) -> ApiResult<MessageId> {
    MessageId::new(id).map_err(ApiError::from)
}

/// A message to publish.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// Any JSON: the message data.
    data: Value,
    /// Deliver no earlier than this many milliseconds from now.
    #[serde(default)]
    delay_ms: Option<u64>,
    /// Retries before the dead-letter queue (default: the consumer's, 3).
    #[serde(default)]
    max_retry: Option<u32>,
    /// At most one message with this key per `unique_ttl_ms` (default 24 h).
    #[serde(default)]
    unique_key: Option<String>,
    /// How long the unique key holds at most, in milliseconds.
    #[serde(default)]
    unique_ttl_ms: Option<u64>,
    /// When the unique key is released: `final` (default) when the message is processed,
    /// cancelled, purged or dead-lettered, or when the ttl ends if sooner; `ttl` only when
    /// the ttl ends. Only with `unique_key`.
    #[serde(default)]
    unique_until: Option<UniqueUntilField>,
    /// A caller-chosen id: publishing it again while stored is a duplicate.
    #[serde(default)]
    id: Option<String>,
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
        if let Some(key) = self.unique_key {
            let ttl = Duration::from_millis(self.unique_ttl_ms.unwrap_or(24 * 3600 * 1000));
            options = options
                .unique_key(key, ttl)
                .unique_until(self.unique_until.unwrap_or_default().into());
        }
        if let Some(id) = self.id {
            options = options.id(message_id(&id)?);
        }
        Ok((self.data, options))
    }
}

fn outcome_json(outcome: &PublishOutcome) -> Value {
    match outcome {
        PublishOutcome::Duplicate(id) => json!({"id": id, "duplicate": true}),
        other => json!({"id": other.id()}),
    }
}

/// Publish one message.
#[utoipa::path(post, path = "/topics/{topic}/messages", tag = "messages",
    params(("topic" = String, Path, description = "Topic name, e.g. user.welcome")),
    request_body = PublishRequest,
    responses(
        (status = 201, description = "Stored: `{\"id\"}`", body = Object),
        (status = 200, description = "Duplicate (id or unique key held): `{\"id\", \"duplicate\": true}`", body = Object),
        (status = 400, description = "Bad topic name or malformed JSON", body = Object),
        (status = 413, description = "Payload over the limit", body = Object),
    ))]
async fn publish(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(request) = body?;
    let (data, options) = request.into_parts()?;
    let outcome = state.mq.publish_with(&topic, data, options).await?;
    let status = if outcome.is_duplicate() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(outcome_json(&outcome))))
}

/// Publish many messages in one request (at most 10,000).
#[utoipa::path(post, path = "/topics/{topic}/messages/batch", tag = "messages",
    params(("topic" = String, Path, description = "Topic name")),
    request_body = Vec<PublishRequest>,
    responses(
        (status = 201, description = "`{\"ids\": [...], \"duplicates\": n}` in request order", body = Object),
        (status = 400, description = "Bad topic, malformed JSON or too many messages", body = Object),
        (status = 413, description = "A payload over the limit: nothing was stored", body = Object),
    ))]
async fn publish_batch(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    body: Result<Json<Vec<PublishRequest>>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(requests) = body?;
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
    let outcomes = state.mq.publish_batch_with(&topic, items).await?;
    let duplicates = outcomes.iter().filter(|o| o.is_duplicate()).count();
    let ids: Vec<&MessageId> = outcomes.iter().map(PublishOutcome::id).collect();
    Ok((
        StatusCode::CREATED,
        Json(json!({"ids": ids, "duplicates": duplicates})),
    ))
}

/// Every topic with its counts per state and counters.
#[utoipa::path(get, path = "/topics", tag = "topics",
    responses((status = 200, description = "Array of topic stats", body = Vec<Object>)))]
async fn list_topics(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!(state.mq.get_all_queues().await?)))
}

/// One topic's counts per state and counters.
#[utoipa::path(get, path = "/topics/{topic}", tag = "topics",
    params(("topic" = String, Path, description = "Topic name")),
    responses((status = 200, description = "`{\"topic\", \"pending\", \"active\", \"delayed\", \"dead\", \"processed\", ...}`", body = Object),
               (status = 400, description = "Bad topic name", body = Object)))]
async fn topic_stats(
    State(state): State<AppState>,
    Path(topic): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(state.mq.stats(&topic).await?)))
}

/// Which messages to look at.
#[derive(Debug, Deserialize, IntoParams)]
struct PeekQuery {
    /// pending (default), delayed, active or dead.
    state: Option<String>,
    /// How many (default 20, at most 1,000).
    limit: Option<usize>,
    /// How many to skip.
    offset: Option<usize>,
}

fn page(q: &PeekQuery) -> std::ops::Range<usize> {
    // Far past any real queue, and within Redis's integer range.
    let offset = q.offset.unwrap_or(0).min(1 << 40);
    offset..offset.saturating_add(q.limit.unwrap_or(20).min(1000))
}

/// Look at messages of one state without taking them.
#[utoipa::path(get, path = "/topics/{topic}/messages", tag = "messages",
    params(("topic" = String, Path, description = "Topic name"), PeekQuery),
    responses((status = 200, description = "Array of envelopes", body = Vec<Object>),
               (status = 400, description = "Bad topic or state", body = Object)))]
async fn peek(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<PeekQuery>,
) -> ApiResult<Json<Value>> {
    let which: MessageState = q.state.as_deref().unwrap_or("pending").parse()?;
    let found = state.mq.peek(&topic, which, page(&q)).await?;
    Ok(Json(json!(output::envelopes(&found))))
}

/// Cancel a delayed or pending message.
#[utoipa::path(delete, path = "/topics/{topic}/messages/{id}", tag = "messages",
    params(("topic" = String, Path, description = "Topic name"), ("id" = String, Path, description = "Message id")),
    responses((status = 200, description = "`{\"cancelled\": id, \"was\": \"delayed\"|\"pending\"}`", body = Object),
              (status = 404, description = "No such waiting message", body = Object),
              (status = 409, description = "Being handled or dead: not cancellable", body = Object)))]
async fn cancel(
    State(state): State<AppState>,
    Path((topic, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let from = state.mq.cancel(&topic, &message_id(&id)?).await?;
    Ok(Json(
        json!({"cancelled": id, "was": output::cancelled(from)}),
    ))
}

/// The dead-letter queue, oldest first, with the error that killed each message.
#[utoipa::path(get, path = "/topics/{topic}/dead-letters", tag = "dead letters",
    params(("topic" = String, Path, description = "Topic name"), PeekQuery),
    responses((status = 200, description = "Array of envelopes with `error` and `died_at`", body = Vec<Object>)))]
async fn list_dead_letters(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    Query(q): Query<PeekQuery>,
) -> ApiResult<Json<Value>> {
    let found = state.mq.peek(&topic, MessageState::Dead, page(&q)).await?;
    Ok(Json(json!(output::envelopes(&found))))
}

/// Delete every dead letter of the topic for good.
#[utoipa::path(delete, path = "/topics/{topic}/dead-letters", tag = "dead letters",
    params(("topic" = String, Path, description = "Topic name")),
    responses((status = 200, description = "`{\"deleted\": n}`", body = Object)))]
async fn purge_dead_letters(
    State(state): State<AppState>,
    Path(topic): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({"deleted": state.mq.purge_dead_letters(&topic).await?}),
    ))
}

/// Send one dead letter back to the queue with fresh retries.
#[utoipa::path(post, path = "/topics/{topic}/dead-letters/{id}/retry", tag = "dead letters",
    params(("topic" = String, Path, description = "Topic name"), ("id" = String, Path, description = "Message id")),
    responses((status = 200, description = "`{\"requeued\": id}`", body = Object),
              (status = 404, description = "No such dead letter", body = Object)))]
async fn retry_dead_letter(
    State(state): State<AppState>,
    Path((topic, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    state
        .mq
        .reprocess_dead_letter(&topic, &message_id(&id)?)
        .await?;
    Ok(Json(json!({"requeued": id})))
}

/// Delete one dead letter for good.
#[utoipa::path(delete, path = "/topics/{topic}/dead-letters/{id}", tag = "dead letters",
    params(("topic" = String, Path, description = "Topic name"), ("id" = String, Path, description = "Message id")),
    responses((status = 200, description = "`{\"deleted\": id}`", body = Object),
              (status = 404, description = "No such dead letter", body = Object)))]
async fn delete_dead_letter(
    State(state): State<AppState>,
    Path((topic, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    state
        .mq
        .delete_dead_letter(&topic, &message_id(&id)?)
        .await?;
    Ok(Json(json!({"deleted": id})))
}

/// Send every dead letter of the topic back to the queue.
#[utoipa::path(post, path = "/topics/{topic}/dead-letters/retry", tag = "dead letters",
    params(("topic" = String, Path, description = "Topic name")),
    responses((status = 200, description = "`{\"requeued\": n}`", body = Object)))]
async fn retry_all_dead_letters(
    State(state): State<AppState>,
    Path(topic): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({"requeued": state.mq.reprocess_all_dead_letters(&topic).await?}),
    ))
}

/// Pause a topic: workers everywhere stop taking its messages; publishing still works.
#[utoipa::path(post, path = "/topics/{topic}/pause", tag = "topics",
    params(("topic" = String, Path, description = "Topic name")),
    responses((status = 200, description = "`{\"paused\": true}`", body = Object)))]
async fn pause(State(state): State<AppState>, Path(topic): Path<String>) -> ApiResult<Json<Value>> {
    state.mq.pause(&topic).await?;
    Ok(Json(json!({"paused": true})))
}

/// Resume a paused topic.
#[utoipa::path(post, path = "/topics/{topic}/resume", tag = "topics",
    params(("topic" = String, Path, description = "Topic name")),
    responses((status = 200, description = "`{\"paused\": false, \"was_paused\": bool}`", body = Object)))]
async fn resume(
    State(state): State<AppState>,
    Path(topic): Path<String>,
) -> ApiResult<Json<Value>> {
    let was = state.mq.resume(&topic).await?;
    Ok(Json(json!({"paused": false, "was_paused": was})))
}

/// Delete every message of the topic in every state (counters stay).
#[utoipa::path(post, path = "/topics/{topic}/purge", tag = "topics",
    params(("topic" = String, Path, description = "Topic name")),
    responses((status = 200, description = "`{\"deleted\": n}`", body = Object)))]
async fn purge(State(state): State<AppState>, Path(topic): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(
        json!({"deleted": state.mq.purge_queue(&topic).await?}),
    ))
}

/// Published, processed and failed per minute over the last hour, oldest first.
#[utoipa::path(get, path = "/topics/{topic}/throughput", tag = "topics",
    params(("topic" = String, Path, description = "Topic name")),
    responses((status = 200, description = "60 entries `{\"minute\", \"published\", \"processed\", \"failed\"}`", body = Vec<Object>)))]
async fn throughput(
    State(state): State<AppState>,
    Path(topic): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(state.mq.throughput(&topic).await?)))
}
