//! Case 3: data sync (案例 3：数据同步).
//!
//! Updating a user publishes `user.sync` `{user_id, action, data}` with the changed fields
//! as a nested map, which reaches the cache, the search index and the data warehouse
//! exactly as it was sent (nested objects, arrays, floats). An action the worker does not
//! know is a no-op, logged and acknowledged. The worker records processed ids in the
//! idempotency ledger (`Subscription::deduplicate`) and each change is published under an
//! id of its own (`user.sync:<user>:<change>`), so a change published twice, or delivered
//! again after it was processed, syncs once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forgemq::{
    Client, HandlerError, Message, MessageId, PublishOptions, Subscription, WorkerBuilder,
};
use serde::Deserialize;
use serde_json::{json, Value};

pub const TOPIC: &str = "user.sync";

/// How long the ledger remembers a processed change.
const LEDGER: Duration = Duration::from_secs(24 * 3600);

/// The message.
#[derive(Debug, Deserialize)]
pub struct SyncEvent {
    pub user_id: String,
    pub action: String,
    #[serde(default)]
    pub data: Value,
}

/// The three places a change is copied to, and what the worker did.
#[derive(Debug, Default, Clone)]
pub struct Sinks {
    pub cache: HashMap<String, Value>,
    pub search: HashMap<String, Value>,
    pub warehouse: Vec<(String, Value)>,
    /// Syncs per user: a change must be applied once.
    pub syncs: HashMap<String, u32>,
    /// Events with an action the worker does not know.
    pub ignored: Vec<String>,
}

#[derive(Clone)]
pub struct UserSync {
    mq: Client,
    sinks: Arc<Mutex<Sinks>>,
}

impl UserSync {
    pub fn new(mq: Client) -> Self {
        Self {
            mq,
            sinks: Arc::default(),
        }
    }

    pub fn sinks(&self) -> Sinks {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publishes one change of a user under its own id, so publishing it again is
    /// recognised; returns whether it was new.
    pub async fn update_user(
        &self,
        user_id: &str,
        change: &str,
        data: Value,
    ) -> anyhow::Result<bool> {
        self.publish(user_id, change, "update", data).await
    }

    /// Publishes an event with any action (the worker ignores unknown ones).
    pub async fn publish(
        &self,
        user_id: &str,
        change: &str,
        action: &str,
        data: Value,
    ) -> anyhow::Result<bool> {
        let id = MessageId::new(format!("user.sync:{user_id}:{change}"))?;
        let outcome = self
            .mq
            .publish_with(
                TOPIC,
                json!({"user_id": user_id, "action": action, "data": data}),
                PublishOptions::new().id(id),
            )
            .await?;
        Ok(!outcome.is_duplicate())
    }

    pub fn subscribe(&self, worker: WorkerBuilder) -> WorkerBuilder {
        let this = self.clone();
        worker.subscribe_with(
            TOPIC,
            Subscription::new().concurrency(4).deduplicate(LEDGER),
            move |m: Message<SyncEvent>| {
                let this = this.clone();
                async move {
                    this.apply(m.data);
                    Ok::<(), HandlerError>(())
                }
            },
        )
    }

    fn apply(&self, event: SyncEvent) {
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        match event.action.as_str() {
            "update" => {
                sinks
                    .cache
                    .insert(event.user_id.clone(), event.data.clone());
                sinks
                    .search
                    .insert(event.user_id.clone(), event.data.clone());
                sinks.warehouse.push((event.user_id.clone(), event.data));
                *sinks.syncs.entry(event.user_id.clone()).or_default() += 1;
                println!("{}: synced to cache, search and warehouse", event.user_id);
            }
            other => {
                println!("{}: action {other:?} is not synced; ignored", event.user_id);
                sinks.ignored.push(other.to_owned());
            }
        }
    }
}
