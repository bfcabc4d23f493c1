//! Redis key names: the only module that builds them.
//!
//! Every key of one topic carries the hash tag `{topic}`, so each Lua script touches a
//! single slot and the same scripts run on Redis Cluster.

use crate::error::{Error, Result};

/// Longest topic name in bytes. Long enough for any `<entity>.<action>` scheme, short
/// enough that key names stay small next to the bodies they index.
pub(crate) const MAX_TOPIC_LEN: usize = 200;

/// Checks a topic name: 1–200 bytes of ASCII letters, digits and `.` `_` `-` `:`.
///
/// `{` and `}` would break the hash tag, `#` is kept for partitioned topics, and spaces
/// or control characters make names that are hard to type into `redis-cli`.
pub fn validate_topic(topic: &str) -> Result<()> {
    check_name(topic).map_err(|reason| Error::InvalidTopic {
        topic: topic.to_owned(),
        reason,
    })
}

/// Checks a namespace with the same rules as a topic name.
pub(crate) fn validate_namespace(namespace: &str) -> Result<()> {
    check_name(namespace).map_err(|reason| Error::InvalidNamespace {
        namespace: namespace.to_owned(),
        reason,
    })
}

fn check_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty; use e.g. \"user.welcome\"");
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err("it is longer than 200 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
    {
        return Err("only ASCII letters, digits and . _ - : are allowed");
    }
    Ok(())
}

/// Most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// The hash tag of partition `p` of a topic of `n` partitions: `T#p`, or `T#p.k` with the
/// smallest `k` that puts the tag's slot into the `p`-th of `n` equal ranges of the 16,384
/// cluster slots. So the partitions spread evenly over the slot space, and therefore over
/// the masters of a cluster whose masters own equal slot ranges (naive tags `T#0`… fall
/// anywhere: 3 of them land on 3 different masters only 2 times in 9). The same topic,
/// partition and count always give the same tag, in every client.
pub(crate) fn partition_tag(topic: &str, p: u32, n: u32) -> String {
    let slots = u32::from(crate::conn::SLOTS);
    let (lo, hi) = (p * slots / n, (p + 1) * slots / n);
    let base = format!("{topic}#{p}");
    if (lo..hi).contains(&u32::from(crate::conn::slot(base.as_bytes()))) {
        return base;
    }
    // Each try lands in the range with probability 1/n: about n tries. CRC16 reads the
    // bytes in order, so `{base}.` is hashed once and each try hashes only its number.
    let prefix = crate::conn::crc16(format!("{base}.").as_bytes());
    let in_range = |k: &u64| {
        let crc = crate::conn::crc16_from(prefix, k.to_string().as_bytes());
        (lo..hi).contains(&u32::from(crc % crate::conn::SLOTS))
    };
    (1u64..)
        .find(in_range)
        .map(|k| format!("{base}.{k}"))
        .unwrap_or(base)
}

/// The tags of every partition of a topic of `n` partitions, computed once per process
/// (a topic of 1,024 partitions takes about a million checksums).
pub(crate) fn partition_tags(topic: &str, n: u32) -> std::sync::Arc<Vec<String>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    type Tags = HashMap<(String, u32), Arc<Vec<String>>>;
    static TAGS: OnceLock<Mutex<Tags>> = OnceLock::new();
    let cache = TAGS.get_or_init(Default::default);
    let key = (topic.to_owned(), n);
    if let Some(tags) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Arc::clone(tags);
    }
    let tags = Arc::new(
        (0..n)
            .map(|p| partition_tag(topic, p, n))
            .collect::<Vec<_>>(),
    );
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    // Bounded: a process that sees thousands of partitioned topics recomputes some.
    if map.len() >= 1024 {
        map.clear();
    }
    map.insert(key, Arc::clone(&tags));
    tags
}

/// Which partition of `n` a message with this key goes to: FNV-1a (64 bits) of the key's
/// bytes, modulo `n`. A key always maps to the same partition, so a retried publish (same
/// id) and the messages of one partition key stay together.
pub(crate) fn partition_of(key: &str, n: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(n.max(1))) as u32
}

/// Key names of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Namespace {
    ns: String,
}

impl Namespace {
    pub(crate) fn new(ns: &str) -> Result<Self> {
        validate_namespace(ns)?;
        Ok(Self { ns: ns.to_owned() })
    }

    pub(crate) fn name(&self) -> &str {
        &self.ns
    }

    /// The SET of all topic names (no `KEYS` or `SCAN` anywhere).
    pub(crate) fn topics(&self) -> String {
        format!("{}:topics", self.ns)
    }

    /// The HASH of every schedule: name → `"<rev> <partitions> <topic>"`, where the
    /// schedule's state lives (see [`TopicKeys::schedule`]) and which revision of its spec.
    pub(crate) fn schedules(&self) -> String {
        format!("{}:schedules", self.ns)
    }

    /// Key names of one topic. The topic must have been validated.
    pub(crate) fn topic(&self, topic: &str) -> TopicKeys {
        self.keys_under(topic, topic, None)
    }

    /// Key names of partition `p` of a topic of `n` partitions, under their own hash tag
    /// (see [`partition_tag`]).
    pub(crate) fn partition(&self, topic: &str, p: u32, n: u32) -> TopicKeys {
        self.keys_under(topic, &partition_tags(topic, n)[p as usize], Some(p))
    }

    /// The worker registry, under the tag `{#workers}`, which no topic can have: ZSET
    /// worker id → when its entry expires (ms), HASH worker id → its last heartbeat and
    /// description, HASH worker id → its first heartbeat (ms).
    pub(crate) fn registry(&self) -> [String; 3] {
        ["heartbeats", "info", "started"].map(|k| format!("{}:{{#workers}}:{k}", self.ns))
    }

    /// The key of a topic's layout (its partition count), in the plain topic's slot.
    pub(crate) fn meta(&self, topic: &str) -> String {
        format!("{}:{{{}}}:meta", self.ns, topic)
    }

    fn keys_under(&self, topic: &str, tag: &str, partition: Option<u32>) -> TopicKeys {
        let p = format!("{}:{{{}}}:", self.ns, tag);
        let k = |s: &str| format!("{p}{s}");
        TopicKeys {
            topic: topic.to_owned(),
            partition,
            meta: k("meta"),
            pending: k("pending"),
            msg: k("msg"),
            active: k("active"),
            lease: k("lease"),
            delayed: k("delayed"),
            dead: k("dead"),
            stats: k("stats"),
            wake: k("wake"),
            paused: k("paused"),
            processed: k("processed"),
            minutes: k("minutes"),
            uniq: k("uniq"),
            cancelled: k("cancelled"),
            settled: [k("settled:0"), k("settled:1")],
            purged_tokens: k("purged_tokens"),
            ready: k("ready"),
            runs: k("runs"),
            limit: k("limit"),
            results: k("results"),
            finished: k("finished"),
            progress: k("progress"),
            waiters: k("waiters"),
            gring: k("gring"),
            gready: k("gready"),
            gconf: k("gconf"),
            gactive: k("gactive"),
            group_prefix: k("g:"),
            // One per topic, partitioned or not: workers consume topics, not partitions.
            workers: format!("{}:{{{}}}:workers", self.ns, topic),
            unique_prefix: k("unique:"),
            schedule_prefix: k("schedule:"),
        }
    }
}

/// The keys of one topic; see the README's "Redis layout".
#[derive(Debug, Clone)]
pub(crate) struct TopicKeys {
    pub(crate) topic: String,
    /// Which partition of a partitioned topic these keys are; `None` for a plain topic.
    pub(crate) partition: Option<u32>,
    /// HASH: the topic's layout (`partitions`), and `frozen` while it is being changed.
    /// A partition keeps its own copy, in its own slot, for its scripts to check.
    pub(crate) meta: String,
    /// LIST of ids ready to run, oldest at the head.
    pub(crate) pending: String,
    /// HASH id → envelope JSON, the only copy of each body.
    pub(crate) msg: String,
    /// ZSET id → lease deadline (ms, Redis clock).
    pub(crate) active: String,
    /// HASH id → token of the delivery that owns the lease.
    pub(crate) lease: String,
    /// ZSET id → due time (ms): delayed publishes and retry backoff.
    pub(crate) delayed: String,
    /// ZSET id → time it died (ms).
    pub(crate) dead: String,
    /// HASH of counters.
    pub(crate) stats: String,
    /// LIST holding at most one wake-up token that idle workers block on.
    pub(crate) wake: String,
    /// STRING present while the topic is paused.
    pub(crate) paused: String,
    /// ZSET id → until when (ms) a redelivery of that acked id counts as a duplicate.
    pub(crate) processed: String,
    /// HASH of per-minute counters, a ring of the last 60 minutes.
    pub(crate) minutes: String,
    /// HASH id → unique key, for the messages that hold their key until they reach a final
    /// state: the scripts of those states release the key through it, and purge finds every
    /// held key here.
    pub(crate) uniq: String,
    /// HASH id → number of entries of that id in the pending list that belong to cancelled
    /// messages (tombstones): cancel is O(1) instead of an O(N) `LREM`, and fetch skips those
    /// entries when they come up. The stats hash counts them all (`tombstones`).
    pub(crate) cancelled: String,
    /// Two HASHes (alternating 30 s generations) of settle call id → its answers: a settle
    /// retried after its reply was lost learns what the first call applied.
    pub(crate) settled: [String; 2],
    /// SET of the lease tokens of deliveries whose message was purged under them (kept an
    /// hour): their refused outcomes are not duplicate runs.
    pub(crate) purged_tokens: String,
    /// ZSET id → when it became ready to run (ms, Redis clock), for the pending entries
    /// pushed at the head of the list (recovered and released messages).
    pub(crate) ready: String,
    /// LIST of `"<count> <ms>"` runs: the tail entries of pending by when they became ready,
    /// oldest first (see prelude.lua). The queue latency is the age of the older of the
    /// first run and the first `ready` member.
    pub(crate) runs: String,
    /// HASH: the rate limit, a token bucket applied by the fetch script (`rate` per second,
    /// `burst`, `tokens`, `at`); absent without a limit.
    pub(crate) limit: String,
    /// HASH id → record of a finished message (JSON: state, finished_at, until, retry,
    /// result, progress), kept to a retention ([`crate::Retention`]).
    pub(crate) results: String,
    /// LIST of ids in the order they finished: the order in which records leave `results`.
    pub(crate) finished: String,
    /// HASH id → the last progress its running handler reported, until a final state.
    pub(crate) progress: String,
    /// HASH id → how many callers wait for it to finish; each is woken by a token on the
    /// LIST `<waiters>:<id>`.
    pub(crate) waiters: String,
    /// LIST of the fair groups with waiting messages, in the order fetch visits them ('' is
    /// `pending`, the ungrouped messages); see `lua/prelude.lua`.
    pub(crate) gring: String,
    /// ZSET id → when it became ready (ms), for the waiting grouped messages.
    pub(crate) gready: String,
    /// HASH group → `"<max_active> <weight> <paused>"`, the groups' settings.
    pub(crate) gconf: String,
    /// HASH group → its messages being handled now.
    pub(crate) gactive: String,
    pub(crate) group_prefix: String,
    /// HASH worker id → `concurrency,in_flight,expires_ms` of the workers consuming the
    /// topic (in the plain topic's slot for a partitioned one).
    pub(crate) workers: String,
    pub(crate) unique_prefix: String,
    pub(crate) schedule_prefix: String,
}

impl TopicKeys {
    /// LIST on which a finished message leaves one token per waiter.
    pub(crate) fn waiting(&self, id: &str) -> String {
        format!("{}:{}", self.waiters, id)
    }

    /// LIST of the waiting messages of one fair group.
    pub(crate) fn group_list(&self, group: &str) -> String {
        format!("{}{}", self.group_prefix, group)
    }

    /// STRING holding the id of the message that owns a unique key, until its ttl.
    pub(crate) fn unique(&self, key: &str) -> String {
        format!("{}{}", self.unique_prefix, key)
    }

    /// HASH of one schedule whose messages go to these keys: spec, rev, next, anchor,
    /// last, fired (see `lua/schedule_set.lua`).
    pub(crate) fn schedule(&self, name: &str) -> String {
        format!("{}{}", self.schedule_prefix, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_rules() {
        for ok in [
            "user.welcome",
            "order.payment.check",
            "a",
            "x_y-z:1",
            &"a".repeat(200),
        ] {
            assert!(validate_topic(ok).is_ok(), "{ok} should be valid");
        }
        for bad in ["", "a{b}", "a b", "é", "a#1", "a\n", &"a".repeat(201)] {
            assert!(validate_topic(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn partition_tags_spread_over_the_slot_space() {
        for n in [2u32, 3, 12, 64] {
            for p in 0..n {
                let tag = partition_tag("hot.orders", p, n);
                let slot = u32::from(crate::conn::slot(tag.as_bytes()));
                assert!(
                    slot >= p * 16384 / n && slot < (p + 1) * 16384 / n,
                    "{tag}: slot {slot}"
                );
                assert!(tag.starts_with(&format!("hot.orders#{p}")));
            }
        }
        let k = Namespace::new("mq").unwrap().partition("t", 1, 2);
        assert_eq!(k.topic, "t");
        assert_eq!(k.partition, Some(1));
        assert!(k.pending.starts_with("mq:{t#1"), "{}", k.pending);
        assert_eq!(partition_of("order-42", 12), partition_of("order-42", 12));
        let spread: std::collections::HashSet<u32> = (0..1000)
            .map(|i| partition_of(&format!("k{i}"), 12))
            .collect();
        assert_eq!(spread.len(), 12);
    }

    #[test]
    fn tags_hash_only_the_number_and_match_the_plain_search() {
        // The search of docs/wire-format.md, hashing each whole candidate.
        let plain = |topic: &str, p: u32, n: u32| {
            let (lo, hi) = (p * 16384 / n, (p + 1) * 16384 / n);
            let fits = |t: &str| (lo..hi).contains(&u32::from(crate::conn::slot(t.as_bytes())));
            let base = format!("{topic}#{p}");
            if fits(&base) {
                return base;
            }
            (1..)
                .map(|k| format!("{base}.{k}"))
                .find(|t| fits(t))
                .unwrap()
        };
        for topic in ["hot.orders", "t", &"a.b-c:d_e".repeat(20)] {
            for n in [2u32, 7, 64, 1024] {
                let tags = partition_tags(topic, n);
                for p in (0..n).step_by(((n / 16).max(1)) as usize) {
                    assert_eq!(tags[p as usize], plain(topic, p, n), "{topic} {p}/{n}");
                }
            }
        }
    }

    #[test]
    fn keys_share_the_topic_hash_tag() {
        let k = Namespace::new("mq").unwrap().topic("order.paid");
        assert_eq!(k.pending, "mq:{order.paid}:pending");
        assert_eq!(k.msg, "mq:{order.paid}:msg");
        assert_eq!(Namespace::new("mq").unwrap().topics(), "mq:topics");
    }
}
