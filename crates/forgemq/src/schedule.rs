//! Schedules: a message published on a cron pattern or every N, by any number of
//! schedulers and no leader.
//!
//! A schedule's state (its spec and its next fire time) lives in its topic's slot; the
//! namespace keeps only the list of names (`mq:schedules`). Every scheduler computes the
//! fire times itself, but one script (`lua/schedule_fire.lua`) claims a fire time by
//! compare-and-set against the stored next fire time and Redis's clock, publishes the
//! message with the id `schedule:<name>:<fire ms>` and advances the schedule, all in one
//! call. So with N schedulers there is exactly one message per fire time, none is lost
//! when a scheduler dies mid-fire (the call ran whole or not at all), and none is early
//! (Redis's clock decides, not the scheduler's).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use chrono::TimeZone;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::client::{Client, PublishOptions, UniqueUntil};
use crate::error::{Error, Result};
use crate::keys::{partition_of, validate_topic, TopicKeys};
use crate::message::{from_millis, rfc3339, MessageId};
use crate::store::{FireCall, FireOutcome, PublishItem, MAX_PER_CALL};

/// Longest schedule name in bytes: its messages' ids (`schedule:<name>:<13-digit ms>`)
/// then stay within the 200-byte id limit.
pub const MAX_SCHEDULE_NAME: usize = 176;

/// How often a scheduler reads the list of schedules again: a new or changed schedule
/// starts firing within this long (a changed one whose old next fire time comes first is
/// corrected at that fire, by the compare-and-set).
const REFRESH: Duration = Duration::from_secs(5);

/// With [`Missed::Skip`], how late a fire may still happen (a scheduler that was busy or
/// restarting for a moment): a later one counts as missed.
const SKIP_GRACE_MS: i64 = 60_000;

/// The next fire time of a schedule that has none (a cron pattern that never matches
/// again): the last millisecond of the year 9999.
const NEVER_MS: i64 = 253_402_300_799_999;

/// What a schedule does about the fire times it missed while no scheduler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Missed {
    /// One message now for all that were missed (the default), with the latest missed
    /// fire time in its id.
    #[default]
    Once,
    /// None of the missed times: wait for the next regular time. When only the latest
    /// fire time is due and it is less than a minute late, it is not missed.
    Skip,
    /// Up to N of the missed fires, the oldest first; the rest are dropped.
    CatchUp(u32),
}

impl std::fmt::Display for Missed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missed::Once => f.write_str("once"),
            Missed::Skip => f.write_str("skip"),
            Missed::CatchUp(n) => write!(f, "catch-up:{n}"),
        }
    }
}

impl FromStr for Missed {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "once" => Ok(Missed::Once),
            "skip" => Ok(Missed::Skip),
            _ => match s.strip_prefix("catch-up:").map(str::parse::<u32>) {
                Some(Ok(n)) if n >= 1 && n as usize <= MAX_PER_CALL => Ok(Missed::CatchUp(n)),
                _ => Err(Error::Config(format!(
                    "missed must be once, skip or catch-up:N with N from 1 to {MAX_PER_CALL}, not {s:?}"
                ))),
            },
        }
    }
}

impl Serialize for Missed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// When a schedule fires and what it publishes; give it to [`Client::upsert_schedule`].
///
/// # Examples
/// ```
/// use forgemq::{Missed, ScheduleSpec};
/// use serde_json::json;
/// use std::time::Duration;
///
/// let nightly = ScheduleSpec::cron("30 2 * * *")
///     .tz("Asia/Shanghai")
///     .topic("report.nightly")
///     .data(json!({"kind": "sales"}))
///     .missed(Missed::Skip);
/// let heartbeat = ScheduleSpec::every(Duration::from_secs(30)).topic("ops.ping");
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct ScheduleSpec {
    cron: Option<String>,
    every: Option<Duration>,
    tz: Option<String>,
    topic: Option<String>,
    data: std::result::Result<Value, String>,
    options: PublishOptions,
    missed: Missed,
}

impl ScheduleSpec {
    /// Fires on a cron pattern: 5 fields (minute hour day-of-month month day-of-week), or
    /// 6 with seconds first; names (`MON`, `JAN`), ranges, lists and steps, and `L`, `W`,
    /// `#` as croner reads them. Evaluated in UTC unless [`ScheduleSpec::tz`] says otherwise.
    pub fn cron(pattern: impl Into<String>) -> Self {
        Self::new(Some(pattern.into()), None)
    }

    /// Fires every `period` (at least 1 s), counted from when the schedule was created or
    /// last changed: the first fire is one period after that.
    pub fn every(period: Duration) -> Self {
        Self::new(None, Some(period))
    }

    fn new(cron: Option<String>, every: Option<Duration>) -> Self {
        Self {
            cron,
            every,
            tz: None,
            topic: None,
            data: Ok(Value::Null),
            options: PublishOptions::new(),
            missed: Missed::Once,
        }
    }

    /// The IANA time zone the cron pattern is read in, e.g. `Asia/Shanghai` (default UTC).
    /// Daylight saving: a time skipped by the clock change fires when the gap ends, and a
    /// fixed time that happens twice fires once (the first).
    pub fn tz(mut self, zone: impl Into<String>) -> Self {
        self.tz = Some(zone.into());
        self
    }

    /// The topic the messages go to (required).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// The data of every message (JSON null if not given).
    pub fn data<D: Serialize>(mut self, data: D) -> Self {
        self.data = serde_json::to_value(data).map_err(|e| e.to_string());
        self
    }

    /// Options for each message: delay, retries, unique key, headers. An id is not allowed (each
    /// message's id comes from its fire time), nor a partition key (a schedule's messages
    /// go to the partition its name picks).
    pub fn options(mut self, options: PublishOptions) -> Self {
        self.options = options;
        self
    }

    /// What to do about fire times missed while no scheduler ran (default [`Missed::Once`]).
    pub fn missed(mut self, missed: Missed) -> Self {
        self.missed = missed;
        self
    }

    /// The spec as stored, checked.
    fn stored(&self) -> Result<StoredSpec> {
        let topic = self
            .topic
            .clone()
            .ok_or_else(|| Error::Config("a schedule needs a topic: .topic(\"...\")".into()))?;
        validate_topic(&topic)?;
        let data = self
            .data
            .clone()
            .map_err(|e| Error::InvalidData(format!("schedule data: {e}")))?;
        if self.options.id.is_some() {
            return Err(Error::Config(
                "a schedule's messages get their ids from their fire times; remove the id option"
                    .into(),
            ));
        }
        if self.options.partition_key.is_some() {
            return Err(Error::Config(
                "a schedule's messages go to the partition its name picks; remove the partition_key option"
                    .into(),
            ));
        }
        let every_ms = match (&self.cron, self.every) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(Error::Config(
                    "a schedule has either a cron pattern or an every period".into(),
                ))
            }
            (None, Some(every)) => {
                if every < Duration::from_secs(1) {
                    return Err(Error::Config(format!(
                        "every must be at least 1s, not {}",
                        humantime::format_duration(every)
                    )));
                }
                Some(every.as_millis().min(i64::MAX as u128) as i64)
            }
            (Some(_), None) => None,
        };
        let spec = StoredSpec {
            cron: self.cron.as_ref().map(|c| c.trim().to_owned()),
            every_ms,
            tz: self.tz.clone().unwrap_or_else(|| "UTC".to_owned()),
            topic,
            data,
            missed: self.missed.to_string(),
            delay_ms: self.options.delay.map(|d| d.as_millis() as u64),
            max_retry: self.options.max_retry,
            unique_key: self.options.unique.as_ref().map(|(k, _)| k.clone()),
            unique_ttl_ms: self
                .options
                .unique
                .as_ref()
                .map(|(_, ttl)| ttl.as_millis() as u64),
            unique_ttl_only: (self.options.unique.is_some()
                && self.options.unique_until == UniqueUntil::Ttl)
                .then_some(true),
            headers: self.options.headers.clone(),
        };
        spec.timing(0)?;
        Ok(spec)
    }
}

/// A schedule as stored, as [`Client::schedules`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[non_exhaustive]
pub struct Schedule {
    /// Its name.
    pub name: String,
    /// The topic its messages go to.
    pub topic: String,
    /// Its cron pattern, for a cron schedule.
    pub cron: Option<String>,
    /// Its period in ms, for an every-N schedule.
    pub every_ms: Option<u64>,
    /// The time zone its cron pattern is read in.
    pub tz: String,
    /// The data of its messages.
    pub data: Value,
    /// What it does about missed fires.
    pub missed: Missed,
    /// When it fires next (Redis clock); `None` if never again.
    #[serde(serialize_with = "opt_time")]
    pub next_fire: Option<SystemTime>,
    /// When it last fired (the fire time in its message's id), if ever.
    #[serde(serialize_with = "opt_time")]
    pub last_fire: Option<SystemTime>,
    /// How many messages it published.
    pub fired: u64,
}

fn opt_time<S: serde::Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// The stored form of a spec (the `spec` field of the schedule's hash, JSON). Its FNV-1a
/// hash is the schedule's revision: the same spec always gives the same revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cron: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    every_ms: Option<i64>,
    tz: String,
    topic: String,
    data: Value,
    missed: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_retry: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unique_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unique_ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unique_ttl_only: Option<bool>,
    #[serde(default, skip_serializing_if = "crate::message::Headers::is_empty")]
    headers: crate::message::Headers,
}

impl StoredSpec {
    fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn rev(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.json().bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }

    fn missed(&self) -> Missed {
        self.missed.parse().unwrap_or_default()
    }

    /// The fire times: `anchor` is when an every-N schedule counts from.
    fn timing(&self, anchor: i64) -> Result<Timing> {
        if let Some(period) = self.every_ms {
            return Ok(Timing::Every { period, anchor });
        }
        let pattern = self.cron.as_deref().unwrap_or_default();
        let fields = pattern.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(Error::Config(format!(
                "cron pattern {pattern:?} has {fields} fields: give 5 (minute hour day month weekday) or 6 (seconds first)"
            )));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(pattern)
            .map_err(|e| Error::Config(format!("cron pattern {pattern:?}: {e}")))?;
        let tz: chrono_tz::Tz = self.tz.parse().map_err(|_| {
            Error::Config(format!(
                "unknown time zone {:?}: use an IANA name such as UTC, Europe/Berlin or Asia/Shanghai",
                self.tz
            ))
        })?;
        Ok(Timing::Cron {
            cron: Box::new(cron),
            tz,
        })
    }

    fn options(&self) -> PublishOptions {
        let mut options = PublishOptions::new();
        for (name, value) in &self.headers {
            options = options.header(name.clone(), value.clone());
        }
        if let Some(ms) = self.delay_ms {
            options = options.delay(Duration::from_millis(ms));
        }
        if let Some(n) = self.max_retry {
            options = options.max_retry(n);
        }
        if let (Some(key), Some(ttl)) = (&self.unique_key, self.unique_ttl_ms) {
            options = options.unique_key(key.clone(), Duration::from_millis(ttl));
            if self.unique_ttl_only == Some(true) {
                options = options.unique_until(UniqueUntil::Ttl);
            }
        }
        options
    }
}

/// A schedule's fire times (ms since the epoch, Redis clock).
#[derive(Debug, Clone)]
enum Timing {
    Cron {
        cron: Box<croner::Cron>,
        tz: chrono_tz::Tz,
    },
    Every {
        period: i64,
        anchor: i64,
    },
}

impl Timing {
    /// The first fire time after `t`.
    fn next_after(&self, t: i64) -> Option<i64> {
        match self {
            Timing::Every { period, anchor } => {
                let k = if t < *anchor {
                    1
                } else {
                    (t - anchor) / period + 1
                };
                anchor.checked_add(k.checked_mul(*period)?)
            }
            Timing::Cron { cron, tz } => {
                let at = tz
                    .timestamp_millis_opt(t.div_euclid(1000) * 1000)
                    .single()?;
                let next = cron.find_next_occurrence(&at, false).ok()?;
                Some(next.timestamp_millis())
            }
        }
    }

    /// The last fire time at or before `t`.
    fn last_until(&self, t: i64) -> Option<i64> {
        match self {
            Timing::Every { period, anchor } => {
                let k = (t - anchor).div_euclid(*period);
                (k >= 1).then(|| anchor + k * period)
            }
            Timing::Cron { cron, tz } => {
                let at = tz
                    .timestamp_millis_opt(t.div_euclid(1000) * 1000)
                    .single()?;
                let last = cron.find_previous_occurrence(&at, true).ok()?;
                Some(last.timestamp_millis())
            }
        }
    }
}

/// What one fire call does: the fire times to publish (oldest first) and the next fire
/// time after it. `None` while `next` has not come at `now`.
fn plan(timing: &Timing, next: i64, now: i64, missed: Missed) -> Option<(Vec<i64>, i64)> {
    if now < next {
        return None;
    }
    let last = timing.last_until(now).unwrap_or(next).max(next);
    let new_next = timing.next_after(now).unwrap_or(NEVER_MS).max(next + 1);
    let fires = match missed {
        Missed::Once => vec![last],
        Missed::Skip if last == next && now - last <= SKIP_GRACE_MS => vec![last],
        Missed::Skip => Vec::new(),
        Missed::CatchUp(n) => {
            let mut fires = Vec::new();
            let mut t = Some(next);
            while let Some(at) = t.filter(|&at| at <= now && fires.len() < n as usize) {
                fires.push(at);
                t = timing.next_after(at);
            }
            fires
        }
    };
    Some((fires, new_next))
}

/// Checks a schedule name: 1–176 bytes, no spaces or control characters.
fn validate_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > MAX_SCHEDULE_NAME
        || name.chars().any(|c| c.is_control() || c.is_whitespace());
    if bad {
        return Err(Error::Config(format!(
            "invalid schedule name {name:?}: 1-{MAX_SCHEDULE_NAME} bytes without spaces or control characters (its messages' ids are schedule:<name>:<fire ms>, at most 200 bytes)"
        )));
    }
    Ok(())
}

/// Where a schedule named `name` lives in the index: revision, partition count, topic.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexEntry {
    rev: String,
    partitions: u32,
    topic: String,
}

impl IndexEntry {
    fn parse(value: &str) -> Option<Self> {
        let mut parts = value.splitn(3, ' ');
        Some(Self {
            rev: parts.next()?.to_owned(),
            partitions: parts.next()?.parse().ok()?,
            topic: parts.next()?.to_owned(),
        })
    }

    fn value(&self) -> String {
        format!("{} {} {}", self.rev, self.partitions, self.topic)
    }
}

/// A schedule's state as read from its hash.
struct State {
    spec: StoredSpec,
    rev: String,
    next: i64,
    anchor: i64,
    last: Option<i64>,
    fired: u64,
}

impl State {
    fn read(hash: &HashMap<String, String>) -> Option<Self> {
        let num = |k: &str| hash.get(k).and_then(|v| v.parse::<i64>().ok());
        Some(Self {
            spec: serde_json::from_str(hash.get("spec")?).ok()?,
            rev: hash.get("rev")?.clone(),
            next: num("next")?,
            anchor: num("anchor").unwrap_or(0),
            last: num("last"),
            fired: num("fired").unwrap_or(0).max(0) as u64,
        })
    }

    fn schedule(&self, name: &str) -> Schedule {
        Schedule {
            name: name.to_owned(),
            topic: self.spec.topic.clone(),
            cron: self.spec.cron.clone(),
            every_ms: self.spec.every_ms.map(|ms| ms as u64),
            tz: self.spec.tz.clone(),
            data: self.spec.data.clone(),
            missed: self.spec.missed(),
            next_fire: (self.next < NEVER_MS).then(|| from_millis(self.next as f64)),
            last_fire: self.last.map(|ms| from_millis(ms as f64)),
            fired: self.fired,
        }
    }
}

impl Client {
    /// The keys a schedule's state and messages live under: the topic's, or on a
    /// partitioned topic the partition the schedule's name picks.
    fn schedule_keys(&self, topic: &str, name: &str, partitions: u32) -> TopicKeys {
        let ns = &self.store().ns;
        if partitions <= 1 {
            ns.topic(topic)
        } else {
            ns.partition(topic, partition_of(name, partitions), partitions)
        }
    }

    /// Creates or changes the schedule `name`; any running scheduler picks it up within
    /// 5 s. Upserting an unchanged spec keeps its next fire time; a changed spec computes
    /// it again (from Redis's clock). Returns the schedule as stored.
    ///
    /// ```no_run
    /// # async fn example(mq: forgemq::Client) -> forgemq::Result<()> {
    /// use forgemq::ScheduleSpec;
    /// mq.upsert_schedule(
    ///     "cleanup",
    ///     ScheduleSpec::cron("*/5 * * * *").tz("Asia/Shanghai").topic("orders.cleanup"),
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn upsert_schedule(&self, name: &str, spec: ScheduleSpec) -> Result<Schedule> {
        validate_name(name)?;
        let spec = spec.stored()?;
        // The message must be publishable (size, nesting) before anything is stored.
        let probe = MessageId::from_stored(format!("schedule:{name}:{NEVER_MS}"));
        self.prepare_item(&spec.topic, &probe, &spec.data, &spec.options())?;
        let store = self.store();
        let layout = self.fresh_layout(&spec.topic).await?;
        let partitions = layout.count();
        let keys = self.schedule_keys(&spec.topic, name, partitions);
        let key = keys.schedule(name);
        let now = store.time_ms(&key).await?;
        let rev = spec.rev();
        let first = spec.timing(now)?.next_after(now).unwrap_or(NEVER_MS);
        store
            .schedule_set(&key, &spec.json(), &rev, first, now)
            .await?;
        let (index, _) = store.schedule_index().await?;
        let entry = IndexEntry {
            rev,
            partitions,
            topic: spec.topic.clone(),
        };
        store.schedule_index_set(name, Some(&entry.value())).await?;
        // It moved (another topic, or the topic's layout changed): the old state goes.
        if let Some(old) = index.get(name).and_then(|v| IndexEntry::parse(v)) {
            let old_key = self
                .schedule_keys(&old.topic, name, old.partitions)
                .schedule(name);
            if old_key != key {
                store.schedule_del(&old_key).await?;
            }
        }
        self.register(&spec.topic).await?;
        let state = store.schedule_state(&key).await?;
        State::read(&state)
            .map(|s| s.schedule(name))
            .ok_or_else(|| Error::Protocol(format!("schedule {name:?} vanished after writing it")))
    }

    /// Removes the schedule `name`; whether it existed. Messages it already published stay.
    pub async fn remove_schedule(&self, name: &str) -> Result<bool> {
        validate_name(name)?;
        let store = self.store();
        let (index, _) = store.schedule_index().await?;
        let Some(entry) = index.get(name).and_then(|v| IndexEntry::parse(v)) else {
            return Ok(false);
        };
        let key = self
            .schedule_keys(&entry.topic, name, entry.partitions)
            .schedule(name);
        // The state first: a scheduler that still lists the name finds it gone.
        store.schedule_del(&key).await?;
        store.schedule_index_set(name, None).await?;
        Ok(true)
    }

    /// Every schedule, sorted by name.
    pub async fn schedules(&self) -> Result<Vec<Schedule>> {
        let (index, _) = self.store().schedule_index().await?;
        let mut names: Vec<&String> = index.keys().collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            if let Some(s) = self.read_schedule(name, &index[name]).await? {
                out.push(s.schedule(name));
            }
        }
        Ok(out)
    }

    /// One schedule, if it exists.
    pub async fn schedule(&self, name: &str) -> Result<Option<Schedule>> {
        validate_name(name)?;
        let (index, _) = self.store().schedule_index().await?;
        match index.get(name) {
            Some(v) => Ok(self.read_schedule(name, v).await?.map(|s| s.schedule(name))),
            None => Ok(None),
        }
    }

    async fn read_schedule(&self, name: &str, index_value: &str) -> Result<Option<State>> {
        let Some(entry) = IndexEntry::parse(index_value) else {
            return Ok(None);
        };
        let key = self
            .schedule_keys(&entry.topic, name, entry.partitions)
            .schedule(name);
        Ok(State::read(&self.store().schedule_state(&key).await?))
    }

    /// Publishes the schedule's message now, with the id `schedule:<name>:<now ms>`; its
    /// regular fire times stay as they are. [`Error::NotFound`]-like
    /// [`Error::Config`] when there is no such schedule.
    pub async fn run_schedule_now(&self, name: &str) -> Result<MessageId> {
        validate_name(name)?;
        let store = self.store();
        let (index, _) = store.schedule_index().await?;
        let entry = index
            .get(name)
            .and_then(|v| IndexEntry::parse(v))
            .ok_or_else(|| Error::Config(format!("no schedule named {name:?}")))?;
        // Where the topic's layout puts it now (moved there first if its count changed).
        let partitions = move_schedule(self, name, &entry.topic, entry.partitions).await?;
        let keys = self.schedule_keys(&entry.topic, name, partitions);
        let state = State::read(&store.schedule_state(&keys.schedule(name)).await?)
            .ok_or_else(|| Error::Config(format!("no schedule named {name:?}")))?;
        let now = store.time_ms(&keys.msg).await?;
        let id = MessageId::from_stored(format!("schedule:{name}:{now}"));
        let item = self.prepare_item(
            &state.spec.topic,
            &id,
            &state.spec.data,
            &state.spec.options(),
        )?;
        let call = FireCall {
            name,
            tick: false,
            expected_next: 0,
            rev: &state.rev,
            new_next: 0,
            latest: now,
        };
        match store
            .schedule_fire(&keys, partitions, &call, &[&item])
            .await?
        {
            FireOutcome::Published(_) => Ok(id),
            FireOutcome::Gone => Err(Error::Config(format!("no schedule named {name:?}"))),
            other => Err(Error::Conflict(format!(
                "schedule {name:?} changed while it was run ({other:?}); try again"
            ))),
        }
    }

    /// Runs a scheduler in this process until `shutdown` completes: it fires every
    /// schedule of the namespace when its time comes. Any number may run (workers, `serve`
    /// and the gateway run one each by default); each fire time still gives exactly one
    /// message. Redis errors never end it: it logs them and tries again.
    pub async fn run_scheduler(&self, shutdown: impl std::future::Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(scheduler_loop(self.clone(), stop_rx));
        shutdown.await;
        let _ = stop_tx.send(true);
        let _ = task.await;
    }
}

/// One schedule as a scheduler knows it.
struct Entry {
    topic: String,
    partitions: u32,
    rev: String,
    spec: StoredSpec,
    timing: Timing,
    next: i64,
    /// Not before this (after an error, or an `early` answer).
    not_before: Option<Instant>,
}

fn local_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) async fn scheduler_loop(client: Client, mut stop: watch::Receiver<bool>) {
    let mut entries: HashMap<String, Entry> = HashMap::new();
    // Redis's clock minus this machine's (ms), as of the last refresh.
    let mut offset = 0i64;
    let mut refresh_at = Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        if Instant::now() >= refresh_at {
            match refresh(&client, &mut entries).await {
                Ok(redis_now) => offset = redis_now - local_ms(),
                Err(e) => {
                    tracing::warn!(error = %e, "scheduler: could not read the schedules; trying again")
                }
            }
            refresh_at = Instant::now() + REFRESH;
        }
        let names: Vec<String> = entries.keys().cloned().collect();
        for name in names {
            let now = local_ms() + offset;
            let Some(entry) = entries.get_mut(&name) else {
                continue;
            };
            if entry.next > now || entry.not_before.is_some_and(|t| t > Instant::now()) {
                continue;
            }
            if let Err(e) = fire(&client, &name, entry, now).await {
                tracing::warn!(schedule = %name, error = %e, "scheduler: fire failed; trying again");
                entry.not_before = Some(Instant::now() + Duration::from_secs(1));
            }
            if entry.next == i64::MIN {
                entries.remove(&name);
            }
        }
        // Sleep until the earliest fire (on this machine's clock), the next refresh, or stop.
        let now = local_ms() + offset;
        let mut wake = refresh_at;
        for entry in entries.values() {
            // The later of its due time and a back-off (an error, an `early` answer).
            let due = Instant::now()
                + Duration::from_millis((entry.next - now).clamp(0, 3_600_000) as u64);
            let at = entry.not_before.map_or(due, |t| t.max(due));
            wake = wake.min(at);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Reads the index and the state of every new or changed schedule; returns Redis's clock.
async fn refresh(client: &Client, entries: &mut HashMap<String, Entry>) -> Result<i64> {
    let (index, now) = client.store().schedule_index().await?;
    entries.retain(|name, _| index.contains_key(name));
    for (name, value) in &index {
        let Some(ix) = IndexEntry::parse(value) else {
            continue;
        };
        let known = entries.get(name).is_some_and(|e| {
            e.rev == ix.rev && e.partitions == ix.partitions && e.topic == ix.topic
        });
        if known {
            continue;
        }
        match load(client, name, &ix).await {
            Ok(Some(entry)) => {
                entries.insert(name.clone(), entry);
            }
            Ok(None) => {
                entries.remove(name);
            }
            Err(e) => {
                tracing::warn!(schedule = %name, error = %e, "scheduler: could not read a schedule")
            }
        }
    }
    Ok(now)
}

async fn load(client: &Client, name: &str, ix: &IndexEntry) -> Result<Option<Entry>> {
    let key = client
        .schedule_keys(&ix.topic, name, ix.partitions)
        .schedule(name);
    let Some(state) = State::read(&client.store().schedule_state(&key).await?) else {
        return Ok(None);
    };
    let timing = match state.spec.timing(state.anchor) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(schedule = %name, error = %e, "scheduler: a stored schedule does not parse; skipping it");
            return Ok(None);
        }
    };
    Ok(Some(Entry {
        topic: ix.topic.clone(),
        partitions: ix.partitions,
        rev: state.rev,
        spec: state.spec,
        timing,
        next: state.next,
        not_before: None,
    }))
}

/// One fire attempt of a due schedule. Sets `entry.next` to `i64::MIN` when the schedule
/// is gone.
async fn fire(client: &Client, name: &str, entry: &mut Entry, now: i64) -> Result<()> {
    entry.not_before = None;
    let Some((fires, new_next)) = plan(&entry.timing, entry.next, now, entry.spec.missed()) else {
        return Ok(());
    };
    let options = entry.spec.options();
    let mut items = Vec::with_capacity(fires.len());
    for at in &fires {
        let id = MessageId::from_stored(format!("schedule:{name}:{at}"));
        items.push(client.prepare_item(&entry.topic, &id, &entry.spec.data, &options)?);
    }
    let refs: Vec<&PublishItem> = items.iter().collect();
    let keys = client.schedule_keys(&entry.topic, name, entry.partitions);
    let call = FireCall {
        name,
        tick: true,
        expected_next: entry.next,
        rev: &entry.rev,
        new_next,
        latest: fires.last().copied().unwrap_or(0),
    };
    match client
        .store()
        .schedule_fire(&keys, entry.partitions, &call, &refs)
        .await
    {
        Ok(FireOutcome::Published(n)) => {
            tracing::debug!(schedule = %name, fires = ?fires, messages = n, "schedule fired");
            entry.next = new_next;
        }
        Ok(FireOutcome::Stale { next, rev, anchor }) => {
            if rev == entry.rev {
                entry.next = next;
                // The same spec set again (removed and added, or changed and back) counts
                // from a new anchor.
                if matches!(entry.timing, Timing::Every { anchor: a, .. } if a != anchor) {
                    entry.timing = entry.spec.timing(anchor)?;
                }
            } else {
                let ix = IndexEntry {
                    rev,
                    partitions: entry.partitions,
                    topic: entry.topic.clone(),
                };
                match load(client, name, &ix).await? {
                    Some(fresh) => *entry = fresh,
                    None => entry.next = i64::MIN,
                }
            }
        }
        Ok(FireOutcome::Early(ms)) => {
            entry.not_before =
                Some(Instant::now() + Duration::from_millis(ms.clamp(1, 60_000) as u64));
        }
        Ok(FireOutcome::Gone) => entry.next = i64::MIN,
        Err(e) if crate::client::layout_changed(&e) => {
            relocate(client, name, entry).await?;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// The topic's partition count changed under a schedule: its state moves to the keys the
/// new layout gives it (copied unless already there, then the index, then the old copy
/// goes). Any scheduler may do it; the copy never overwrites, so it is done once.
async fn relocate(client: &Client, name: &str, entry: &mut Entry) -> Result<()> {
    let partitions = move_schedule(client, name, &entry.topic, entry.partitions).await?;
    let ix = IndexEntry {
        rev: entry.rev.clone(),
        partitions,
        topic: entry.topic.clone(),
    };
    match load(client, name, &ix).await? {
        Some(fresh) => *entry = fresh,
        None => entry.next = i64::MIN,
    }
    Ok(())
}

/// Moves a schedule's state from where `partitions` put it to where the topic's current
/// layout puts it (nothing when they agree); returns the current partition count.
async fn move_schedule(client: &Client, name: &str, topic: &str, partitions: u32) -> Result<u32> {
    let store = client.store();
    let now = client.fresh_layout(topic).await?.count();
    if now == partitions {
        return Ok(now);
    }
    let old_key = client.schedule_keys(topic, name, partitions).schedule(name);
    let new_key = client.schedule_keys(topic, name, now).schedule(name);
    let fields = store.schedule_state(&old_key).await?;
    if let Some(state) = State::read(&fields) {
        // Copied whole (last fire and count too), and only if absent: a newer spec upserted
        // at the new place meanwhile stays.
        store.schedule_copy(&new_key, &fields).await?;
        let ix = IndexEntry {
            rev: state.rev.clone(),
            partitions: now,
            topic: topic.to_owned(),
        };
        store.schedule_index_set(name, Some(&ix.value())).await?;
        if old_key != new_key {
            store.schedule_del(&old_key).await?;
        }
        tracing::info!(schedule = %name, partitions = now, "schedule moved to the topic's new layout");
    }
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    fn cron(pattern: &str, tz: &str) -> Timing {
        ScheduleSpec::cron(pattern)
            .tz(tz)
            .topic("t")
            .stored()
            .unwrap()
            .timing(0)
            .unwrap()
    }

    #[test]
    fn cron_fire_times_follow_the_zone() {
        let t = cron("*/5 * * * *", "UTC");
        assert_eq!(
            t.next_after(ms("2026-12-03T10:02:07.500Z")),
            Some(ms("2026-12-03T10:05:00Z"))
        );
        assert_eq!(
            t.last_until(ms("2026-12-03T10:05:00Z")),
            Some(ms("2026-12-03T10:05:00Z"))
        );
        // 02:30 in Shanghai (UTC+8) is 18:30 UTC the day before.
        let t = cron("30 2 * * *", "Asia/Shanghai");
        assert_eq!(
            t.next_after(ms("2026-12-03T00:00:00Z")),
            Some(ms("2026-12-03T18:30:00Z"))
        );
        // Six fields: seconds first.
        let t = cron("*/10 * * * * *", "UTC");
        assert_eq!(
            t.next_after(ms("2026-12-03T10:00:00Z")),
            Some(ms("2026-12-03T10:00:10Z"))
        );
    }

    #[test]
    fn daylight_saving_gaps_fire_once_after_and_overlaps_once() {
        // New York springs forward at 02:00 EST on 2026-03-08 (07:00 UTC): 02:30 does not
        // exist that day and fires when the gap ends (03:00 EDT = 07:00 UTC).
        let t = cron("30 2 * * *", "America/New_York");
        assert_eq!(
            t.next_after(ms("2026-03-08T06:59:00Z")),
            Some(ms("2026-03-08T07:00:00Z"))
        );
        assert_eq!(
            t.next_after(ms("2026-03-08T07:00:00Z")),
            Some(ms("2026-03-09T06:30:00Z"))
        );
        // It falls back at 02:00 EDT on 2026-11-01 (06:00 UTC): 01:30 happens twice and a
        // daily 01:30 fires at the first only.
        let t = cron("30 1 * * *", "America/New_York");
        assert_eq!(
            t.next_after(ms("2026-11-01T05:00:00Z")),
            Some(ms("2026-11-01T05:30:00Z"))
        );
        assert_eq!(
            t.next_after(ms("2026-11-01T05:30:00Z")),
            Some(ms("2026-11-02T06:30:00Z"))
        );
        // An hourly job runs on both 01:00s.
        let t = cron("0 * * * *", "America/New_York");
        assert_eq!(
            t.next_after(ms("2026-11-01T05:00:00Z")),
            Some(ms("2026-11-01T06:00:00Z"))
        );
    }

    #[test]
    fn every_counts_from_its_anchor() {
        let t = Timing::Every {
            period: 1000,
            anchor: 10_500,
        };
        assert_eq!(t.next_after(10_500), Some(11_500));
        assert_eq!(t.next_after(11_499), Some(11_500));
        assert_eq!(t.next_after(11_500), Some(12_500));
        assert_eq!(t.last_until(11_499), None);
        assert_eq!(t.last_until(12_700), Some(12_500));
    }

    #[test]
    fn missed_fires_follow_the_policy() {
        let t = Timing::Every {
            period: 1000,
            anchor: 0,
        };
        // On time: one fire whatever the policy.
        for missed in [Missed::Once, Missed::Skip, Missed::CatchUp(3)] {
            assert_eq!(plan(&t, 5000, 5040, missed), Some((vec![5000], 6000)));
        }
        assert_eq!(plan(&t, 5000, 4999, Missed::Once), None);
        // Down from 5 s to 9.5 s: 5, 6, 7, 8 and 9 missed.
        assert_eq!(
            plan(&t, 5000, 9500, Missed::Once),
            Some((vec![9000], 10_000))
        );
        assert_eq!(plan(&t, 5000, 9500, Missed::Skip), Some((vec![], 10_000)));
        assert_eq!(
            plan(&t, 5000, 9500, Missed::CatchUp(3)),
            Some((vec![5000, 6000, 7000], 10_000))
        );
        assert_eq!(
            plan(&t, 5000, 9500, Missed::CatchUp(10)),
            Some((vec![5000, 6000, 7000, 8000, 9000], 10_000))
        );
        // A daily job a few minutes late is not missed; an hour late it is, with skip.
        let day = Timing::Every {
            period: 86_400_000,
            anchor: 0,
        };
        let at = 86_400_000;
        assert_eq!(
            plan(&day, at, at + 30_000, Missed::Skip).unwrap().0,
            vec![at]
        );
        assert!(plan(&day, at, at + 3_600_000, Missed::Skip)
            .unwrap()
            .0
            .is_empty());
    }

    #[test]
    fn specs_are_checked() {
        let bad = [
            ScheduleSpec::cron("* * *").topic("t"),
            ScheduleSpec::cron("* * * * * * *").topic("t"),
            ScheduleSpec::cron("61 * * * *").topic("t"),
            ScheduleSpec::cron("* * * * *")
                .tz("Mars/Olympus")
                .topic("t"),
            ScheduleSpec::cron("* * * * *"),
            ScheduleSpec::cron("* * * * *").topic("bad topic"),
            ScheduleSpec::every(Duration::from_millis(500)).topic("t"),
            ScheduleSpec::every(Duration::from_secs(1))
                .topic("t")
                .options(PublishOptions::new().id(MessageId::new("x").unwrap())),
        ];
        for spec in bad {
            assert!(spec.stored().is_err(), "{spec:?} should be refused");
        }
        assert!("catch-up:0".parse::<Missed>().is_err());
        assert_eq!("catch-up:5".parse::<Missed>().unwrap(), Missed::CatchUp(5));
        assert!(validate_name(&"n".repeat(MAX_SCHEDULE_NAME)).is_ok());
        assert!(validate_name(&"n".repeat(MAX_SCHEDULE_NAME + 1)).is_err());
        assert!(validate_name("a b").is_err());
        // The same spec gives the same revision; another gives another.
        let a = ScheduleSpec::cron("* * * * *").topic("t").stored().unwrap();
        let b = ScheduleSpec::cron("* * * * *").topic("t").stored().unwrap();
        let c = ScheduleSpec::cron("*/2 * * * *")
            .topic("t")
            .stored()
            .unwrap();
        assert_eq!(a.rev(), b.rev());
        assert_ne!(a.rev(), c.rev());
    }
}
