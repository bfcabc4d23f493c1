//! ForgeMQ: a reliable message queue on Redis.
//!
//! Publish JSON messages to topics, consume them with async handlers, delay them, retry
//! them with backoff, and keep the ones that fail for good in a dead-letter queue. Every
//! state change is one Lua script, every delivery is leased with a random token, and a
//! killed worker's messages run again: nothing is lost, delivery is at-least-once.
//!
//! ```no_run
//! use forgemq::{Client, HandlerError, Message, Worker};
//! use serde_json::{json, Value};
//!
//! # async fn example() -> forgemq::Result<()> {
//! let mq = Client::connect("redis://127.0.0.1:6379").await?;
//! mq.publish("user.welcome", json!({"user_id": "123", "email": "john@example.com"})).await?;
//!
//! Worker::builder(mq.clone())
//!     .subscribe("user.welcome", |msg: Message<Value>| async move {
//!         println!("welcome {}", msg.data["email"]);
//!         Ok::<(), HandlerError>(())
//!     })
//!     .build()?
//!     .run_until(async { tokio::signal::ctrl_c().await.ok(); })
//!     .await
//! # }
//! ```
//!
//! # Layout
//! - [`client`]: [`Client`], the producer and inspector (publish, stats, dead letters, purge).
//! - [`delivery`]: [`Delivery`], manual fetch (`pop_message`) with ack / nack / dead.
//! - [`worker`]: [`Worker`], subscriptions, the fetch loop, lease renewal, recovery, shutdown.
//! - [`handler`]: [`HandlerError`] and [`Backoff`], what handlers return and how retries wait.
//! - [`message`]: [`Message`] and [`MessageId`].
//! - [`registry`]: [`WorkerInfo`], the live workers as their heartbeats describe them.
//! - [`limit`]: [`RateLimit`], global rate limits per topic (a token bucket in Redis).
//! - [`schedule`]: [`ScheduleSpec`], cron and every-N messages fired by leaderless schedulers.
//! - [`error`]: [`Error`], the one error type.
//! - `keys`: Redis key names (the only place they are built).
//! - `store`: Redis commands (the only place they are sent); scripts live in `lua/*.lua`.

pub mod client;
mod coalesce;
mod conn;
pub mod delivery;
pub mod error;
pub mod group;
pub mod handler;
mod keys;
pub mod limit;
pub mod message;
#[cfg(feature = "otel")]
mod otel;
pub mod registry;
pub mod schedule;
mod scripts;
pub mod status;
mod store;
pub mod topic;
pub mod worker;

/// Entry points for the fuzz targets in `fuzz/` (crate-private parsers made reachable);
/// not part of the API and not covered by semver.
#[doc(hidden)]
pub mod __fuzz {
    /// Whether `bytes` decode as a stored envelope (`Envelope::decode`).
    pub fn decode_envelope(bytes: &[u8]) -> bool {
        crate::message::Envelope::decode(bytes).is_ok()
    }

    /// Whether `s` is accepted as a topic name (`keys::validate_topic`).
    pub fn validate_topic(s: &str) -> bool {
        crate::keys::validate_topic(s).is_ok()
    }
}

pub use client::{
    Cancelled, Client, ClientBuilder, DeadLetter, MessageState, MinuteCounts, PeekedMessage,
    PublishOptions, PublishOutcome, Purged, QueueStats, ServerWarning, UniqueUntil, WarningKind,
};
pub use delivery::Delivery;
pub use error::{Error, Result};
pub use group::{GroupInfo, GroupSettings, MAX_GROUP_NAME, MAX_GROUP_WEIGHT};
pub use handler::{Backoff, HandlerError};
pub use keys::{validate_topic, MAX_PARTITIONS};
pub use limit::{RateLimit, TopicLimit};
pub use message::{Headers, Message, MessageId};
pub use registry::{WorkerInfo, WorkerState, WorkerTopic};
pub use schedule::{Missed, Schedule, ScheduleSpec, MAX_SCHEDULE_NAME};
pub use status::{Done, HandlerOutput, MessageStatus, Retention, Status, MAX_RESULT_BYTES};
pub use topic::{TopicInfo, TopicOptions};
pub use worker::{
    BatchOptions, BatchOutcome, Priority, Subscription, Worker, WorkerBuilder, DEFAULT_DEDUP_TTL,
};
