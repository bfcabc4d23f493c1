//! The receiver the gateway demo delivers to (`examples/gateway/`): it prints each delivery
//! and answers 200, except for a message whose data has `"fail": true`, which it refuses
//! with a 500 every time, so you can watch it retried and then dead-lettered.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;

/// One delivery as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The path it was posted to (the route's name in the demo config).
    pub path: String,
    pub id: String,
    pub envelope: Value,
    /// The status the receiver answered.
    pub status: u16,
}

/// What the receiver has seen, shared with whoever started it.
pub type Seen = Arc<Mutex<Vec<Delivery>>>;

/// `POST /{name}`: records and prints the delivery.
pub fn router(seen: Seen) -> Router {
    Router::new()
        .route("/{name}", post(receive))
        .with_state(seen)
}

async fn receive(
    State(seen): State<Seen>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, &'static str) {
    let envelope: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let id = headers
        .get("x-forgemq-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let fail = envelope["data"]["fail"] == Value::Bool(true);
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    println!(
        "/{name}: {} {id} attempt {} data={} -> {}",
        envelope["topic"].as_str().unwrap_or("?"),
        envelope["retry"].as_u64().unwrap_or(0) + 1,
        envelope["data"],
        status.as_u16()
    );
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Delivery {
            path: name,
            id,
            envelope,
            status: status.as_u16(),
        });
    if fail {
        (status, "simulated failure (data.fail is true)")
    } else {
        (status, "ok")
    }
}
