//! The worker registry: which workers are alive, what they consume, and how busy they are.
//!
//! Every [`Worker`](crate::Worker) writes a heartbeat every few seconds (see
//! [`WorkerBuilder::heartbeat_interval`](crate::WorkerBuilder::heartbeat_interval)): its
//! description into the namespace's registry (`{ns}:{#workers}:*`, one slot) and, per
//! topic, its concurrency and running handlers into the topic's `workers` hash (the
//! topic's slot). An entry stands for three heartbeat intervals: a worker killed without
//! a word drops out of every list after at most that (15 s by default), and the next
//! heartbeat of any worker deletes what is left of it. A worker that stops cleanly removes
//! itself at once.

use std::sync::OnceLock;
use std::time::SystemTime;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::client::{rfc3339_ser, Client};
use crate::error::Result;
use crate::keys::validate_topic;
use crate::message::from_millis;

/// Whether a worker is taking work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum WorkerState {
    /// Fetching and handling messages.
    Running,
    /// Shutting down: no new fetches, in-flight handlers finishing.
    Draining,
}

/// How a worker consumes one topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerTopic {
    /// The topic.
    pub topic: String,
    /// Handlers (or batches) of the topic it runs at once at most.
    pub concurrency: usize,
    /// Messages of the topic its handlers were running at its last heartbeat.
    pub in_flight: usize,
}

/// A live worker, as its last heartbeat described it; see [`Client::workers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// Its id, `{host}-{pid}-{random}`: the holder named on the messages it runs
    /// ([`PeekedMessage::holder`](crate::PeekedMessage::holder)).
    pub id: String,
    /// The label it was given ([`WorkerBuilder::name`](crate::WorkerBuilder::name)), e.g.
    /// `gateway`.
    pub name: Option<String>,
    /// The host it runs on.
    pub host: String,
    /// Its process id on that host.
    pub pid: u32,
    /// The ForgeMQ library version it runs.
    pub version: String,
    /// Running or draining.
    pub state: WorkerState,
    /// Its first heartbeat (Redis clock).
    #[serde(serialize_with = "rfc3339_ser")]
    pub started_at: SystemTime,
    /// Its last heartbeat (Redis clock).
    #[serde(serialize_with = "rfc3339_ser")]
    pub last_heartbeat: SystemTime,
    /// What it consumes, in the order it subscribed.
    pub topics: Vec<WorkerTopic>,
}

impl WorkerInfo {
    /// Messages its handlers were running at its last heartbeat, over all its topics.
    pub fn in_flight(&self) -> usize {
        self.topics.iter().map(|t| t.in_flight).sum()
    }
}

/// What a worker writes about itself at each heartbeat (the registry adds the times).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Description {
    pub(crate) id: String,
    pub(crate) name: Option<String>,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) version: String,
    pub(crate) state: WorkerState,
    pub(crate) topics: Vec<WorkerTopic>,
}

/// This machine's host name, as `[A-Za-z0-9._-]` (at most 64 bytes), read once.
pub(crate) fn host_name() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::env::var("COMPUTERNAME").ok())
            .unwrap_or_default();
        let clean: String = raw
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        if clean.is_empty() {
            "localhost".to_owned()
        } else {
            clean
        }
    })
}

/// A fresh worker id: `{host}-{pid}-{8 hex digits}`, unique even for two workers of one
/// process.
pub(crate) fn new_worker_id() -> String {
    format!(
        "{}-{}-{:08x}",
        host_name(),
        std::process::id(),
        rand::rng().random::<u32>()
    )
}

/// Who holds a delivery, from its lease token (`{holder}/{random}@{start ms}`): a worker
/// id, or `{host}-{pid}-pop` for a manual fetch.
pub(crate) fn holder_of(token: &str) -> Option<&str> {
    token.rsplit_once('/').map(|(holder, _)| holder)
}

/// When a delivery started (ms, Redis clock), from its lease token: the fetch script
/// appends `@{now}` to the token it was given.
pub(crate) fn started_of(token: &str) -> Option<i64> {
    token.rsplit_once('@').and_then(|(_, ms)| ms.parse().ok())
}

/// The holder named in the lease tokens of manual fetches (`pop_message`) of this process.
pub(crate) fn pop_holder() -> String {
    format!("{}-{}-pop", host_name(), std::process::id())
}

impl Client {
    /// The live workers of this namespace (those whose last heartbeat is less than three of
    /// their heartbeat intervals old), oldest first: who they are, what they consume and
    /// how many messages each is running. One read of the registry, wherever the topics are.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        let raw = self.store().registry().await?;
        let mut out: Vec<WorkerInfo> = raw
            .expiries
            .iter()
            .filter(|(_, expires)| *expires >= raw.now_ms)
            .filter_map(|(id, _)| {
                let (beat, json) = raw.info.get(id)?.split_once(' ')?;
                let beat: i64 = beat.parse().ok()?;
                // Written by a worker of this library; anything else is skipped.
                let d: Description = serde_json::from_str(json).ok()?;
                let started = raw.started.get(id).copied().unwrap_or(beat);
                Some(WorkerInfo {
                    id: id.clone(),
                    name: d.name,
                    host: d.host,
                    pid: d.pid,
                    version: d.version,
                    state: d.state,
                    started_at: from_millis(started as f64),
                    last_heartbeat: from_millis(beat as f64),
                    topics: d.topics,
                })
            })
            .collect();
        out.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The live workers that consume `topic` (see [`Client::workers`]).
    pub async fn topic_workers(&self, topic: &str) -> Result<Vec<WorkerInfo>> {
        validate_topic(topic)?;
        let mut all = self.workers().await?;
        all.retain(|w| w.topics.iter().any(|t| t.topic == topic));
        Ok(all)
    }
}

/// Per topic, what the live workers' heartbeats say: (workers, slots, running), from the
/// topic's `workers` hash (`concurrency,in_flight,expires_ms` per worker).
pub(crate) fn consumer_counts<'a>(
    entries: impl IntoIterator<Item = &'a String>,
    now_ms: i64,
) -> (u64, u64, u64) {
    let (mut workers, mut slots, mut running) = (0, 0, 0);
    for entry in entries {
        let mut parts = entry.split(',').map(|p| p.parse::<u64>().ok());
        if let (Some(Some(c)), Some(Some(f)), Some(Some(expires))) =
            (parts.next(), parts.next(), parts.next())
        {
            if i64::try_from(expires).unwrap_or(i64::MAX) >= now_ms {
                workers += 1;
                slots += c;
                running += f;
            }
        }
    }
    (workers, slots, running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_is_what_comes_before_the_last_slash() {
        assert_eq!(holder_of("web-1-0a1b2c3d/ffee"), Some("web-1-0a1b2c3d"));
        assert_eq!(holder_of("ffee"), None);
        let token = "web-1-0a1b2c3d/ffee@1764758400123";
        assert_eq!(holder_of(token), Some("web-1-0a1b2c3d"));
        assert_eq!(started_of(token), Some(1_764_758_400_123));
        assert_eq!(started_of("web-1-0a1b2c3d/ffee"), None);
    }

    #[test]
    fn expired_and_malformed_entries_do_not_count() {
        let entries = [
            "4,2,2000".to_owned(),
            "8,0,999".to_owned(),
            "x,1,5000".to_owned(),
            "3,1,1000".to_owned(),
        ];
        assert_eq!(consumer_counts(&entries, 1000), (2, 7, 3));
    }

    #[test]
    fn worker_ids_are_host_pid_random() {
        let (a, b) = (new_worker_id(), new_worker_id());
        assert_ne!(a, b);
        let pid = format!("-{}-", std::process::id());
        assert!(a.starts_with(host_name()) && a.contains(&pid), "{a}");
        assert!(!a.contains('/'));
    }
}
