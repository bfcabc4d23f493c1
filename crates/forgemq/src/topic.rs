//! Topics and their layout: a plain topic lives under one hash tag `{T}` (one slot); a
//! partitioned topic spreads over `n` tags chosen to cover the slot space evenly, so that
//! on Redis Cluster one topic uses every master.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::{validate_topic, TopicKeys, MAX_PARTITIONS};

/// How long a client trusts the layout it read before reading it again. Writes never act
/// on a stale layout (the publish script checks it), so this only bounds how long a
/// reader (stats, peek) may look at the old one after a change.
const LAYOUT_TTL: Duration = Duration::from_secs(10);

/// Longest a layout change keeps publishing frozen if the process making it dies.
const FREEZE_HOLD: Duration = Duration::from_secs(30);

/// Options for [`Client::create_topic`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TopicOptions {
    partitions: Option<u32>,
}

impl TopicOptions {
    /// One partition: a plain topic.
    pub fn new() -> Self {
        Self::default()
    }

    /// Spreads the topic over `n` partitions (1–1,024), each under its own hash tag, so
    /// that on Redis Cluster it uses every master. Messages are placed by
    /// [`PublishOptions::partition_key`](crate::PublishOptions::partition_key), else by
    /// their unique key, else by their id (hashed); there is no order across partitions.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = Some(n);
        self
    }
}

/// A topic and how it is laid out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TopicInfo {
    /// The topic.
    pub topic: String,
    /// Its partitions (1: a plain topic).
    pub partitions: u32,
}

impl TopicInfo {
    /// A topic with this many partitions.
    pub fn new(topic: impl Into<String>, partitions: u32) -> Self {
        Self {
            topic: topic.into(),
            partitions,
        }
    }
}

/// The keys of every partition of a topic (one set for a plain topic), as read at
/// `read_at`.
#[derive(Debug)]
pub(crate) struct TopicLayout {
    pub(crate) partitions: Vec<TopicKeys>,
    read_at: Instant,
}

impl TopicLayout {
    pub(crate) fn count(&self) -> u32 {
        self.partitions.len() as u32
    }

    pub(crate) fn is_partitioned(&self) -> bool {
        self.partitions.len() > 1
    }
}

impl Client {
    /// The layout of `topic`, from the cache when it is fresh enough.
    pub(crate) async fn layout(&self, topic: &str) -> Result<Arc<TopicLayout>> {
        validate_topic(topic)?;
        let cached = self
            .inner
            .layouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .filter(|l| l.read_at.elapsed() < LAYOUT_TTL)
            .cloned();
        match cached {
            Some(l) => Ok(l),
            None => self.fresh_layout(topic).await,
        }
    }

    /// The layout of `topic`, read from Redis now.
    pub(crate) async fn fresh_layout(&self, topic: &str) -> Result<Arc<TopicLayout>> {
        validate_topic(topic)?;
        let ns = &self.store().ns;
        let n = self.store().partitions(&ns.meta(topic)).await?;
        let layout = Arc::new(self.layout_of(topic, n));
        self.inner
            .layouts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned(), Arc::clone(&layout));
        Ok(layout)
    }

    fn layout_of(&self, topic: &str, n: u32) -> TopicLayout {
        let ns = &self.store().ns;
        let partitions = if n <= 1 {
            vec![ns.topic(topic)]
        } else {
            (0..n).map(|p| ns.partition(topic, p, n)).collect()
        };
        TopicLayout {
            partitions,
            read_at: Instant::now(),
        }
    }

    /// Creates `topic` with the given options, or changes its partition count.
    ///
    /// A plain topic needs no creating (publishing creates it); this is for partitioned
    /// ones: `create_topic("hot.orders", TopicOptions::new().partitions(12))`. The count
    /// is stored in Redis with the topic, and every client and worker picks it up (workers
    /// within their recover interval, producers at their next publish). Asking for the
    /// count the topic has changes nothing (it repairs a change that died half-way).
    ///
    /// The count can change only while the topic holds no message in any state:
    /// otherwise [`Error::TopicNotEmpty`] says how many it holds, and nothing changes. While the
    /// change is made, publishing to the topic is refused for a moment (`TRYAGAIN`, which
    /// publish retries); a change that dies half-way stops refusing after 30 s, and two
    /// changes at once are refused (`BUSY`) rather than mixed. A paused topic stays paused.
    pub async fn create_topic(&self, topic: &str, options: TopicOptions) -> Result<TopicInfo> {
        validate_topic(topic)?;
        let n = options.partitions.unwrap_or(1);
        if n == 0 || n > MAX_PARTITIONS {
            return Err(Error::Config(format!(
                "partitions of {topic:?} must be 1 to {MAX_PARTITIONS}, not {n}"
            )));
        }
        let store = self.store();
        let owner = crate::worker::random_token();
        let current = self.fresh_layout(topic).await?;
        let plain = store.ns.topic(topic);
        let new = self.layout_of(topic, n);
        if current.count() == n {
            // Nothing to change; but a change that died half-way may have left some of the
            // layout keys frozen or behind: write them all again.
            for keys in new.partitions.iter().filter(|k| k.meta != plain.meta) {
                store.layout(keys, "set", n, &owner, FREEZE_HOLD).await?;
            }
            store.layout(&plain, "set", n, &owner, FREEZE_HOLD).await?;
            store.register_topic(topic).await?;
            return Ok(TopicInfo {
                topic: topic.to_owned(),
                partitions: n,
            });
        }
        // Freeze everywhere a producer may write now: the plain topic's slot (a producer
        // that believes the topic plain writes there) and each current partition.
        let mut frozen: Vec<TopicKeys> = vec![plain.clone()];
        if current.is_partitioned() {
            frozen.extend(current.partitions.iter().cloned());
        }
        let mut stored = 0;
        let mut failure = None;
        for (i, keys) in frozen.iter().enumerate() {
            match store.layout(keys, "freeze", 0, &owner, FREEZE_HOLD).await {
                Ok(n) => stored += n,
                Err(e) => {
                    failure = Some((i, e));
                    break;
                }
            }
        }
        if failure.is_some() || stored > 0 {
            let upto = failure.as_ref().map_or(frozen.len(), |(i, _)| *i);
            for keys in &frozen[..upto] {
                // Best effort: a freeze left behind ends by itself after FREEZE_HOLD.
                if let Err(e) = store.layout(keys, "thaw", 0, &owner, FREEZE_HOLD).await {
                    tracing::warn!(topic, error = %e, "could not lift the freeze; it ends by itself in 30 s");
                }
            }
            return Err(match failure {
                Some((_, e)) => e,
                None => Error::TopicNotEmpty {
                    topic: topic.to_owned(),
                    messages: stored,
                    partitions: current.count(),
                },
            });
        }
        let limit = self.rate_limit(topic).await?;
        let paused =
            futures::future::try_join_all(current.partitions.iter().map(|k| store.stats(k)))
                .await?
                .iter()
                .any(|s| s.paused);
        // Commit: the new partitions, then the plain slot (what every client reads), then
        // the old partitions (a producer refused there re-reads the plain slot and finds
        // the new count).
        for keys in new.partitions.iter().filter(|k| k.meta != plain.meta) {
            store.layout(keys, "set", n, &owner, FREEZE_HOLD).await?;
            if paused {
                store.pause(keys).await?;
            }
        }
        store.layout(&plain, "set", n, &owner, FREEZE_HOLD).await?;
        if current.is_partitioned() {
            for keys in current.partitions.iter().filter(|k| k.meta != plain.meta) {
                store.layout(keys, "set", n, &owner, FREEZE_HOLD).await?;
            }
        }
        if paused {
            store.pause(&plain).await?;
        }
        store.register_topic(topic).await?;
        self.fresh_layout(topic).await?;
        // A rate limit carries over, split over the new partitions; the old buckets go.
        if let Some(limit) = limit {
            for keys in &current.partitions {
                store.set_limit(keys, None).await?;
            }
            self.set_rate_limit(topic, limit).await?;
        }
        Ok(TopicInfo {
            topic: topic.to_owned(),
            partitions: n,
        })
    }

    /// A topic's layout: how many partitions it has (1 for a plain topic, also for one
    /// never used).
    pub async fn topic_info(&self, topic: &str) -> Result<TopicInfo> {
        let layout = self.fresh_layout(topic).await?;
        Ok(TopicInfo {
            topic: topic.to_owned(),
            partitions: layout.count(),
        })
    }

    /// Every registered topic with its layout, sorted by name.
    pub async fn topic_infos(&self) -> Result<Vec<TopicInfo>> {
        let mut out = Vec::new();
        for topic in self.topics().await? {
            out.push(self.topic_info(&topic).await?);
        }
        Ok(out)
    }
}
