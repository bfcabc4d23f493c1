//! Case 4: user registration (场景：用户注册流程).
//!
//! An HTTP handler (axum) creates the user and publishes `user.registered`, then answers at
//! once. The worker sends the welcome email, creates the user's preferences, adds them to
//! the new-users group and schedules `user.welcome.gift` one hour later, publishing it from
//! inside the handler (`msg.client()`). The gift handler sends the gift.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use forgemq::{Client, HandlerError, Message, WorkerBuilder};
use serde::Deserialize;
use serde_json::{json, Value};

pub const REGISTERED: &str = "user.registered";
pub const GIFT: &str = "user.welcome.gift";

/// One thing the worker did for a user, and when.
#[derive(Debug, Clone)]
pub struct Event {
    pub user_id: String,
    pub what: String,
    pub at: Instant,
}

#[derive(Clone)]
pub struct Registration {
    mq: Client,
    hour: Duration,
    events: Arc<Mutex<Vec<Event>>>,
    next: Arc<Mutex<u32>>,
}

#[derive(Debug, Deserialize)]
struct RegisterRequest {
    username: String,
    email: String,
}

/// `user.registered`.
#[derive(Debug, Deserialize)]
pub struct Registered {
    pub user_id: String,
    pub username: String,
    pub email: String,
}

/// `user.welcome.gift`.
#[derive(Debug, Deserialize)]
pub struct Gift {
    pub user_id: String,
}

impl Registration {
    /// `hour` is how long one "hour" of the scenario takes.
    pub fn new(mq: Client, hour: Duration) -> Self {
        Self {
            mq,
            hour,
            events: Arc::default(),
            next: Arc::default(),
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn note(&self, user_id: &str, what: impl Into<String>) {
        let what = what.into();
        println!("{user_id}: {what}");
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event {
                user_id: user_id.to_owned(),
                what,
                at: Instant::now(),
            });
    }

    /// `POST /register` `{"username", "email"}` → `201 {"user_id"}`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/register", post(register))
            .with_state(self.clone())
    }

    pub fn subscribe(&self, worker: WorkerBuilder) -> WorkerBuilder {
        let (a, b) = (self.clone(), self.clone());
        worker
            .subscribe(REGISTERED, move |m: Message<Registered>| {
                let this = a.clone();
                async move { this.on_registered(m).await }
            })
            .subscribe(GIFT, move |m: Message<Gift>| {
                let this = b.clone();
                async move {
                    this.note(&m.data.user_id, "welcome gift sent");
                    Ok::<(), HandlerError>(())
                }
            })
    }

    async fn on_registered(&self, m: Message<Registered>) -> Result<(), HandlerError> {
        let u = &m.data;
        self.note(
            &u.user_id,
            format!("welcome email sent to {} <{}>", u.username, u.email),
        );
        self.note(&u.user_id, "preferences created");
        self.note(&u.user_id, "added to the new-users group");
        // From inside the handler, on the handler's own client.
        m.client()
            .publish_with_delay(GIFT, json!({"user_id": u.user_id}), self.hour)
            .await
            .map_err(HandlerError::retry)?;
        self.note(&u.user_id, "welcome gift scheduled in 1 hour");
        Ok(())
    }
}

async fn register(
    State(reg): State<Registration>,
    body: Result<Json<RegisterRequest>, axum::extract::rejection::JsonRejection>,
) -> (StatusCode, Json<Value>) {
    let Ok(Json(req)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "send {\"username\": \"...\", \"email\": \"...\"}"})),
        );
    };
    if req.username.trim().is_empty() || !req.email.contains('@') {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "username must not be empty and email must contain @"})),
        );
    }
    let user_id = {
        let mut next = reg.next.lock().unwrap_or_else(|p| p.into_inner());
        *next += 1;
        format!("u{:04}", *next)
    };
    // The user is created; the rest happens in the background.
    match reg
        .mq
        .publish(
            REGISTERED,
            json!({"user_id": user_id, "username": req.username, "email": req.email}),
        )
        .await
    {
        Ok(_) => (StatusCode::CREATED, Json(json!({"user_id": user_id}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": format!("could not queue the welcome: {e}")})),
        ),
    }
}
