//! A worker's entry in the registry: its heartbeat, and the running-handler counts it
//! reports (see [`crate::registry`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::client::Client;
use crate::registry::{host_name, Description, WorkerState, WorkerTopic};

/// An entry stands for this many heartbeat intervals without another heartbeat.
pub(crate) const HEARTBEATS_PER_TTL: u32 = 3;

/// Who this worker is, and how many handlers of each topic it is running.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    pub(crate) id: Arc<str>,
    name: Option<String>,
    /// Topic → concurrency, in subscription order.
    topics: Vec<(String, usize)>,
    running: HashMap<String, Arc<AtomicUsize>>,
    draining: AtomicBool,
}

impl Presence {
    pub(crate) fn new(id: String, name: Option<String>, topics: Vec<(String, usize)>) -> Self {
        let running = topics
            .iter()
            .map(|(t, _)| (t.clone(), Arc::new(AtomicUsize::new(0))))
            .collect();
        Self {
            id: id.into(),
            name,
            topics,
            running,
            draining: AtomicBool::new(false),
        }
    }

    /// The count of running handlers of `topic`, shared by all its runners.
    pub(crate) fn counter(&self, topic: &str) -> Arc<AtomicUsize> {
        self.running.get(topic).cloned().unwrap_or_default()
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn description(&self) -> Description {
        Description {
            id: self.id.to_string(),
            name: self.name.clone(),
            host: host_name().to_owned(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            state: if self.draining.load(Ordering::SeqCst) {
                WorkerState::Draining
            } else {
                WorkerState::Running
            },
            topics: self
                .topics
                .iter()
                .map(|(topic, concurrency)| WorkerTopic {
                    topic: topic.clone(),
                    concurrency: *concurrency,
                    in_flight: self.counter(topic).load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// Writes one heartbeat: the registry entry, then each topic's entry (one script call
    /// each, in their own slots, at once).
    pub(crate) async fn beat(&self, client: &Client, interval: Duration) -> crate::Result<()> {
        let ttl = interval.saturating_mul(HEARTBEATS_PER_TTL);
        let d = self.description();
        let json = serde_json::to_string(&d).map_err(|e| crate::Error::Config(e.to_string()))?;
        let store = client.store();
        store.heartbeat(&self.id, Some(&json), ttl).await?;
        futures::future::try_join_all(d.topics.iter().map(|t| {
            let keys = store.ns.topic(&t.topic);
            async move {
                store
                    .consumers(&keys, &self.id, Some((t.concurrency, t.in_flight)), ttl)
                    .await
            }
        }))
        .await?;
        Ok(())
    }

    /// Removes this worker's entries (it stopped).
    pub(crate) async fn leave(&self, client: &Client) -> crate::Result<()> {
        let store = client.store();
        futures::future::try_join_all(self.topics.iter().map(|(topic, _)| {
            let keys = store.ns.topic(topic);
            async move {
                store
                    .consumers(&keys, &self.id, None, Duration::from_secs(1))
                    .await
            }
        }))
        .await?;
        store
            .heartbeat(&self.id, None, Duration::from_secs(1))
            .await?;
        Ok(())
    }
}

/// Counts `n` running handlers of a topic for as long as it lives (a handler task holds
/// it, so an aborted task stops counting too).
pub(crate) struct Running {
    counter: Arc<AtomicUsize>,
    n: usize,
}

impl Running {
    pub(crate) fn new(counter: &Arc<AtomicUsize>, n: usize) -> Self {
        counter.fetch_add(n, Ordering::Relaxed);
        Self {
            counter: Arc::clone(counter),
            n,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// Writes a heartbeat every `interval` until stopped. A failed heartbeat is logged and
/// the next one tried on time: the registry is for people, and must never stop work.
pub(crate) async fn heartbeat_loop(
    client: Client,
    presence: Arc<Presence>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        match presence.beat(&client, interval).await {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(worker = %presence.id, error = %e, "heartbeat failed; this worker may drop out of the worker list until it succeeds");
                }
                failing = true;
            }
        }
    }
}
