//! A checker for ForgeMQ's Redis data layout.
//!
//! This deliberately re-states the key layout instead of importing it from
//! `forgemq` (which would be a dependency cycle): if the two ever disagree,
//! the tests fail, which is exactly when someone should look.
//!
//! Layout for namespace `NS` and topic `T` (`{T}` is a literal Redis Cluster
//! hash tag, so all keys of a topic live in one slot):
//!
//! | key              | type | holds                                     |
//! |------------------|------|-------------------------------------------|
//! | `NS:{T}:pending` | LIST | ids ready to run                          |
//! | `NS:{T}:msg`     | HASH | id → envelope JSON (the only body copy)   |
//! | `NS:{T}:active`  | ZSET | id → lease deadline                       |
//! | `NS:{T}:lease`   | HASH | id → lease token                          |
//! | `NS:{T}:delayed` | ZSET | id → due time                             |
//! | `NS:{T}:dead`    | ZSET | id → time it died                         |
//! | `NS:{T}:cancelled` | HASH | id → tombstones: entries of cancelled ids still listed in pending |
//! | `NS:{T}:uniq`    | HASH | id → unique key held until a final state  |
//! | `NS:{T}:ready`   | ZSET | id → when it became ready, for entries pushed at the head |
//! | `NS:{T}:runs`    | LIST | `"<count> <ms>"`: the other entries, by when they became ready |
//! | `NS:{T}:progress` | HASH | id → progress its running handler reported (until a final state) |
//! | `NS:{T}:waiters` | HASH | id → callers waiting for it to finish (until a final state) |
//!
//! An acknowledged message is gone from all of them. A cancelled pending message leaves
//! its id in the pending list with a tombstone in `cancelled` until a fetch skips it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

/// Namespace ForgeMQ uses when none is configured.
pub const DEFAULT_NAMESPACE: &str = "mq";

/// At most this many violations are spelled out in a panic message; more
/// would bury the first (usually most telling) ones.
const MAX_LISTED: usize = 50;

/// At most this many lost ids are listed by [`assert_none_lost`].
const MAX_LOST_LISTED: usize = 20;

/// Key names of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Key prefix, `"mq"` by default.
    pub namespace: String,
    /// Topic name, used inside the `{…}` hash tag.
    pub topic: String,
}

impl Layout {
    /// Layout for `topic` under `namespace`.
    pub fn new(namespace: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            topic: topic.into(),
        }
    }

    /// Layout for `topic` under [`DEFAULT_NAMESPACE`].
    pub fn with_default_namespace(topic: impl Into<String>) -> Self {
        Self::new(DEFAULT_NAMESPACE, topic)
    }

    /// `NS:{T}:pending`, LIST of ids ready to run.
    pub fn pending(&self) -> String {
        self.key("pending")
    }

    /// `NS:{T}:msg`, HASH id → envelope JSON.
    pub fn msg(&self) -> String {
        self.key("msg")
    }

    /// `NS:{T}:active`, ZSET id → lease deadline.
    pub fn active(&self) -> String {
        self.key("active")
    }

    /// `NS:{T}:lease`, HASH id → lease token.
    pub fn lease(&self) -> String {
        self.key("lease")
    }

    /// `NS:{T}:delayed`, ZSET id → due time.
    pub fn delayed(&self) -> String {
        self.key("delayed")
    }

    /// `NS:{T}:dead`, ZSET id → time of death.
    pub fn dead(&self) -> String {
        self.key("dead")
    }

    /// `NS:{T}:cancelled`, HASH id → number of listed entries of that id that belong to
    /// cancelled messages (tombstones).
    pub fn cancelled(&self) -> String {
        self.key("cancelled")
    }

    /// `NS:{T}:uniq`, HASH id → unique key it holds until its final state.
    pub fn uniq(&self) -> String {
        self.key("uniq")
    }

    /// `NS:{T}:ready`, ZSET id → when it became ready to run, for the pending entries
    /// pushed at the head (recovered, released).
    pub fn ready(&self) -> String {
        self.key("ready")
    }

    /// `NS:{T}:runs`, LIST of `"<count> <ms>"`: the other pending entries, in runs by
    /// when they became ready.
    pub fn runs(&self) -> String {
        self.key("runs")
    }

    /// `NS:{T}:progress`, HASH id → the progress its running handler reported.
    pub fn progress(&self) -> String {
        self.key("progress")
    }

    /// `NS:{T}:waiters`, HASH id → callers waiting for it to finish.
    pub fn waiters(&self) -> String {
        self.key("waiters")
    }

    /// All ten keys, e.g. for `DEL` in a test's setup.
    pub fn all_keys(&self) -> [String; 10] {
        [
            self.pending(),
            self.msg(),
            self.active(),
            self.lease(),
            self.delayed(),
            self.dead(),
            self.cancelled(),
            self.uniq(),
            self.ready(),
            self.runs(),
        ]
    }

    /// `NS:{T}:<suffix>`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{{{}}}:{suffix}", self.namespace, self.topic)
    }
}

/// Where a message is, as seen in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// In the pending list, waiting for a consumer.
    Pending,
    /// In the delayed set, waiting for its due time (retry backoff or scheduled).
    Delayed,
    /// Leased to a consumer (in the active set, with a lease token).
    Active,
    /// In the dead-letter set.
    Dead,
    /// In no state and without a body: acknowledged (or lost).
    Gone,
}

impl State {
    /// Every state, in report order.
    pub const ALL: [State; 5] = [
        State::Pending,
        State::Delayed,
        State::Active,
        State::Dead,
        State::Gone,
    ];
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            State::Pending => "pending",
            State::Delayed => "delayed",
            State::Active => "active",
            State::Dead => "dead",
            State::Gone => "gone",
        };
        f.write_str(name)
    }
}

/// Classification of the checked ids; each id is in exactly one list.
///
/// `Debug` and `Display` print only counts, because id lists of a stress
/// test would drown a failure message.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StateReport {
    /// Ids in the pending list, sorted.
    pub pending: Vec<String>,
    /// Ids in the delayed set, sorted.
    pub delayed: Vec<String>,
    /// Ids in the active set, sorted.
    pub active: Vec<String>,
    /// Ids in the dead-letter set, sorted.
    pub dead: Vec<String>,
    /// Ids in no state and without a body, sorted.
    pub gone: Vec<String>,
}

impl StateReport {
    /// The state of `id`, or `None` if it was not among the checked ids.
    pub fn state_of(&self, id: &str) -> Option<State> {
        State::ALL.into_iter().find(|&state| {
            self.ids(state)
                .binary_search_by(|probe| probe.as_str().cmp(id))
                .is_ok()
        })
    }

    /// How many checked ids are in `state`.
    pub fn count(&self, state: State) -> usize {
        self.ids(state).len()
    }

    /// The sorted ids in `state`.
    pub fn ids(&self, state: State) -> &[String] {
        match state {
            State::Pending => &self.pending,
            State::Delayed => &self.delayed,
            State::Active => &self.active,
            State::Dead => &self.dead,
            State::Gone => &self.gone,
        }
    }

    fn ids_mut(&mut self, state: State) -> &mut Vec<String> {
        match state {
            State::Pending => &mut self.pending,
            State::Delayed => &mut self.delayed,
            State::Active => &mut self.active,
            State::Dead => &mut self.dead,
            State::Gone => &mut self.gone,
        }
    }
}

impl fmt::Display for StateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pending={} delayed={} active={} dead={} gone={}",
            self.pending.len(),
            self.delayed.len(),
            self.active.len(),
            self.dead.len(),
            self.gone.len()
        )
    }
}

impl fmt::Debug for StateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateReport")
            .field("pending", &self.pending.len())
            .field("delayed", &self.delayed.len())
            .field("active", &self.active.len())
            .field("dead", &self.dead.len())
            .field("gone", &self.gone.len())
            .finish()
    }
}

/// Reads the topic's keys in one `MULTI`/`EXEC` snapshot, classifies every id
/// of `ids`, and panics if the layout is inconsistent.
///
/// The snapshot is atomic so the check is valid even while producers and
/// consumers are running (every ForgeMQ transition is one Lua script).
///
/// Panics, listing every problem found, if:
/// - an id is in more than one of pending/delayed/active/dead,
/// - the pending list holds an id twice,
/// - an id in some state has no body in `msg`,
/// - an active id has no lease, or a lease exists for an id that is not active,
/// - a body exists for an id in no state (orphan, also for ids not in `ids`),
/// - an id in some state is not in `ids` (unknown message),
/// - a key has the wrong type or Redis cannot be read.
pub fn check_invariants(
    conn: &mut redis::Connection,
    layout: &Layout,
    ids: &[String],
) -> StateReport {
    // Fair groups: the lists `NS:{T}:g:<group>` of every group named in the ring, the
    // group index or the active counts (a list missing from the ring is seen through the
    // index of its messages; KEYS is never sent), flattened as: group, entry count,
    // entries...
    const GROUP_LISTS: &str = "local names, out = {}, {} \
        for _, g in ipairs(redis.call('LRANGE', KEYS[1] .. 'gring', 0, -1)) do names[g] = true end \
        for _, g in ipairs(redis.call('HVALS', KEYS[1] .. 'group')) do names[g] = true end \
        for _, g in ipairs(redis.call('HKEYS', KEYS[1] .. 'gactive')) do names[g] = true end \
        for g in pairs(names) do \
          if g ~= '' then \
            local ids = redis.call('LRANGE', KEYS[1] .. 'g:' .. g, 0, -1) \
            out[#out + 1] = g \
            out[#out + 1] = tostring(#ids) \
            for _, id in ipairs(ids) do out[#out + 1] = id end \
          end \
        end \
        return out";
    let values: Vec<redis::Value> = redis::pipe()
        .atomic()
        .cmd("LRANGE")
        .arg(layout.pending())
        .arg(0)
        .arg(-1)
        .cmd("ZRANGE")
        .arg(layout.delayed())
        .arg(0)
        .arg(-1)
        .cmd("ZRANGE")
        .arg(layout.active())
        .arg(0)
        .arg(-1)
        .cmd("ZRANGE")
        .arg(layout.dead())
        .arg(0)
        .arg(-1)
        .cmd("HKEYS")
        .arg(layout.msg())
        .cmd("HKEYS")
        .arg(layout.lease())
        .cmd("HGETALL")
        .arg(layout.cancelled())
        .cmd("HKEYS")
        .arg(layout.uniq())
        .cmd("ZRANGE")
        .arg(layout.ready())
        .arg(0)
        .arg(-1)
        .cmd("LRANGE")
        .arg(layout.runs())
        .arg(0)
        .arg(-1)
        .cmd("HKEYS")
        .arg(layout.progress())
        .cmd("HKEYS")
        .arg(layout.waiters())
        .cmd("LRANGE")
        .arg(layout.key("gring"))
        .arg(0)
        .arg(-1)
        .cmd("HGETALL")
        .arg(layout.key("group"))
        .cmd("HGETALL")
        .arg(layout.key("gactive"))
        .cmd("HGET")
        .arg(layout.key("stats"))
        .arg("grouped")
        .cmd("ZRANGE")
        .arg(layout.key("gready"))
        .arg(0)
        .arg(-1)
        .cmd("EVAL")
        .arg(GROUP_LISTS)
        .arg(1)
        .arg(layout.key(""))
        .query(conn)
        .unwrap_or_else(|e| {
            panic!(
                "cannot read ForgeMQ keys of topic {:?} (namespace {:?}): {e}",
                layout.topic, layout.namespace
            )
        });
    fn get<T: redis::FromRedisValue>(values: &[redis::Value], i: usize, layout: &Layout) -> T {
        values
            .get(i)
            .ok_or_else(|| "missing reply".to_owned())
            .and_then(|v| redis::from_redis_value(v.clone()).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| {
                panic!(
                    "cannot read ForgeMQ keys of topic {:?} (namespace {:?}), reply {i}: {e}",
                    layout.topic, layout.namespace
                )
            })
    }
    let flat: Vec<String> = get(&values, 17, layout);
    let mut group_lists = BTreeMap::new();
    let mut rest = flat.into_iter();
    while let Some(group) = rest.next() {
        let n: usize = rest.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        group_lists.insert(group, rest.by_ref().take(n).collect::<Vec<String>>());
    }
    classify(
        layout,
        ids,
        &Snapshot {
            pending: get(&values, 0, layout),
            delayed: get(&values, 1, layout),
            active: get(&values, 2, layout),
            dead: get(&values, 3, layout),
            bodies: get(&values, 4, layout),
            leases: get(&values, 5, layout),
            tombstones: get(&values, 6, layout),
            held: get(&values, 7, layout),
            ready: get(&values, 8, layout),
            runs: get(&values, 9, layout),
            progress: get(&values, 10, layout),
            waiters: get(&values, 11, layout),
            ring: get(&values, 12, layout),
            group_index: get(&values, 13, layout),
            group_active: get(&values, 14, layout),
            grouped: get::<Option<i64>>(&values, 15, layout).unwrap_or(0),
            group_lists,
            gready: get(&values, 16, layout),
        },
    )
}

/// Raw contents of a topic's keys (members only; scores and values do not
/// matter for the invariants).
struct Snapshot {
    pending: Vec<String>,
    delayed: Vec<String>,
    active: Vec<String>,
    dead: Vec<String>,
    bodies: Vec<String>,
    leases: Vec<String>,
    /// The `cancelled` hash: id → tombstones.
    tombstones: BTreeMap<String, i64>,
    /// Ids in the unique-key index.
    held: Vec<String>,
    /// Members of the `ready` set.
    ready: Vec<String>,
    /// The `runs` list.
    runs: Vec<String>,
    /// Ids with a progress report.
    progress: Vec<String>,
    /// Ids someone waits on.
    waiters: Vec<String>,
    /// The ring of fair groups with listed entries ('' for the pending list).
    ring: Vec<String>,
    /// The group index: id → group.
    group_index: BTreeMap<String, String>,
    /// Group → its active messages.
    group_active: BTreeMap<String, i64>,
    /// The `grouped` counter of the stats hash: entries listed in groups' lists.
    grouped: i64,
    /// Group → the entries of its list.
    group_lists: BTreeMap<String, Vec<String>>,
    /// Members of `gready`.
    gready: Vec<String>,
}

/// The pure part of [`check_invariants`], separate so the rules read as a list.
fn classify(layout: &Layout, ids: &[String], snapshot: &Snapshot) -> StateReport {
    let known: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let bodies: BTreeSet<&str> = snapshot.bodies.iter().map(String::as_str).collect();
    let leases: BTreeSet<&str> = snapshot.leases.iter().map(String::as_str).collect();
    let mut violations = Vec::new();

    // Every id found in a state key, with all the states it was found in.
    // BTreeMap so violations come out in a stable order.
    let mut states: BTreeMap<&str, Vec<State>> = BTreeMap::new();
    // Entries per list ("" for the pending list, else a fair group) and id; a tombstone
    // (`cancelled` field `<id>` for the pending list, `<group> <id>` for a group's) stands
    // for one listed entry of a cancelled message in that list, which is in no state.
    let mut per_list: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for id in &snapshot.pending {
        *per_list.entry(("", id)).or_default() += 1;
    }
    for (group, list) in &snapshot.group_lists {
        for id in list {
            *per_list.entry((group, id)).or_default() += 1;
        }
    }
    for (field, &count) in &snapshot.tombstones {
        let (group, id) = field.split_once(' ').unwrap_or(("", field.as_str()));
        let listed = per_list.get(&(group, id)).copied().unwrap_or(0);
        if count < 1 || count as usize > listed {
            violations.push(format!(
                "{field:?} has {count} tombstone(s) in {:?} but {listed} entries in {}",
                layout.cancelled(),
                if group.is_empty() {
                    "the pending list".to_owned()
                } else {
                    format!("group {group:?}'s list")
                }
            ));
        }
        if let Some(times) = per_list.get_mut(&(group, id)) {
            *times = times.saturating_sub(count.max(0) as usize);
        }
    }
    per_list.retain(|_, times| *times > 0);
    let mut pending_seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (&(_, id), &times) in &per_list {
        *pending_seen.entry(id).or_default() += times;
    }
    for (id, &times) in &pending_seen {
        if times > 1 {
            violations.push(format!(
                "id {id:?} is {times} times in the pending list {:?} and the groups' lists",
                layout.pending()
            ));
        }
        states.entry(id).or_default().push(State::Pending);
    }
    for (state, members) in [
        (State::Delayed, &snapshot.delayed),
        (State::Active, &snapshot.active),
        (State::Dead, &snapshot.dead),
    ] {
        for id in members {
            states.entry(id).or_default().push(state);
        }
    }

    for (id, in_states) in &states {
        if in_states.len() > 1 {
            let names: Vec<String> = in_states.iter().map(ToString::to_string).collect();
            violations.push(format!(
                "id {id:?} is in more than one state: {}",
                names.join(" and ")
            ));
        }
        if !bodies.contains(id) {
            violations.push(format!(
                "id {id:?} is {} but has no body in {:?}",
                in_states[0],
                layout.msg()
            ));
        }
        if !known.contains(id) {
            violations.push(format!(
                "unknown message: id {id:?} is {} but is not among the {} checked ids",
                in_states[0],
                known.len()
            ));
        }
        if in_states.contains(&State::Active) && !leases.contains(id) {
            violations.push(format!(
                "id {id:?} is active but has no lease token in {:?}",
                layout.lease()
            ));
        }
    }
    for id in &leases {
        if !states.get(id).is_some_and(|s| s.contains(&State::Active)) {
            violations.push(format!(
                "id {id:?} has a lease token in {:?} but is not active",
                layout.lease()
            ));
        }
    }
    // Readiness: every listed entry (tombstones included: they count until a fetch passes
    // them) is either in `ready` or in a run.
    let listed: BTreeSet<&str> = snapshot.pending.iter().map(String::as_str).collect();
    for id in &snapshot.ready {
        if !listed.contains(id.as_str()) {
            violations.push(format!(
                "id {id:?} is in {:?} but not in the pending list",
                layout.ready()
            ));
        }
    }
    let mut in_runs = 0usize;
    for run in &snapshot.runs {
        match run
            .split_once(' ')
            .map(|(n, ms)| (n.parse::<usize>(), ms.parse::<u64>()))
        {
            Some((Ok(n), Ok(_))) if n > 0 => in_runs += n,
            _ => violations.push(format!(
                "{:?} holds {run:?}, not \"<count> <ms>\"",
                layout.runs()
            )),
        }
    }
    if in_runs + snapshot.ready.len() != snapshot.pending.len() {
        violations.push(format!(
            "{} pending entries, but {in_runs} in the runs of {:?} and {} in {:?} (the queue latency would be off)",
            snapshot.pending.len(),
            layout.runs(),
            snapshot.ready.len(),
            layout.ready()
        ));
    }
    check_groups(layout, snapshot, &states, &per_list, &mut violations);
    for id in &snapshot.held {
        match states.get(id.as_str()) {
            Some(s) if !s.contains(&State::Dead) => {}
            found => violations.push(format!(
                "id {id:?} still holds a unique key in {:?} but is {} (the key outlives its message)",
                layout.uniq(),
                if found.is_some() { "dead" } else { "in no state" }
            )),
        }
    }
    // Progress and waiters belong to messages that have not finished: a final state
    // (done, dead, cancelled, purged) takes them away.
    for (what, key, members) in [
        ("a progress report", layout.progress(), &snapshot.progress),
        ("a waiter", layout.waiters(), &snapshot.waiters),
    ] {
        for id in members {
            match states.get(id.as_str()) {
                Some(s) if !s.contains(&State::Dead) => {}
                found => violations.push(format!(
                    "id {id:?} has {what} in {key:?} but is {} (it outlives its message)",
                    if found.is_some() {
                        "dead"
                    } else {
                        "in no state"
                    }
                )),
            }
        }
    }
    for id in &bodies {
        if !states.contains_key(id) {
            violations.push(format!(
                "orphan body: id {id:?} has a body in {:?} but is in no state{}",
                layout.msg(),
                if known.contains(id) {
                    ""
                } else {
                    " (and is not among the checked ids)"
                }
            ));
        }
    }

    let mut report = StateReport::default();
    for id in &known {
        let state = states.get(id).map_or(State::Gone, |in_states| in_states[0]);
        report.ids_mut(state).push((*id).to_owned());
    }
    for state in State::ALL {
        report.ids_mut(state).sort_unstable();
    }

    if !violations.is_empty() {
        let more = violations.len().saturating_sub(MAX_LISTED);
        let listed = violations[..violations.len().min(MAX_LISTED)].join("\n  - ");
        panic!(
            "ForgeMQ invariants violated for topic {:?} (namespace {:?}): {} problem(s)\n  - {listed}{}\nstates of the checked ids: {report}",
            layout.topic,
            layout.namespace,
            violations.len(),
            if more > 0 {
                format!("\n  … and {more} more")
            } else {
                String::new()
            },
        );
    }
    report
}

/// The rules of fair groups (see `lua/prelude.lua` in `forgemq`): the ring holds each
/// group with listed entries once (and '' while the pending list has entries), a listed
/// grouped message is in `ready`, the index names the group of every grouped message that
/// is pending, delayed or active and of no other, the active counts match, and the
/// `grouped` counter counts the groups' entries.
fn check_groups(
    layout: &Layout,
    snapshot: &Snapshot,
    states: &BTreeMap<&str, Vec<State>>,
    live: &BTreeMap<(&str, &str), usize>,
    violations: &mut Vec<String>,
) {
    let gready: BTreeSet<&str> = snapshot.gready.iter().map(String::as_str).collect();
    for id in &gready {
        if !live.keys().any(|(g, i)| !g.is_empty() && i == id) {
            violations.push(format!(
                "id {id:?} is in {:?} but waits in no group's list",
                layout.key("gready")
            ));
        }
    }
    let ring_key = layout.key("gring");
    let mut in_ring: BTreeMap<&str, usize> = BTreeMap::new();
    for g in &snapshot.ring {
        *in_ring.entry(g.as_str()).or_default() += 1;
    }
    for (g, &times) in &in_ring {
        if times > 1 {
            violations.push(format!("group {g:?} is {times} times in {ring_key:?}"));
        }
        let listed = if g.is_empty() {
            !snapshot.pending.is_empty()
        } else {
            snapshot.group_lists.get(*g).is_some_and(|l| !l.is_empty())
        };
        if !listed {
            violations.push(format!(
                "group {g:?} is in {ring_key:?} but has no listed entries"
            ));
        }
    }
    for (g, list) in &snapshot.group_lists {
        if !list.is_empty() && !in_ring.contains_key(g.as_str()) {
            violations.push(format!(
                "group {g:?} has {} listed entries but is not in {ring_key:?}: no worker would take them",
                list.len()
            ));
        }
    }
    if !snapshot.ring.is_empty() && !snapshot.pending.is_empty() && !in_ring.contains_key("") {
        violations.push(format!(
            "the pending list has entries but '' is not in {ring_key:?}: no worker would take them"
        ));
    }
    let entries: usize = snapshot.group_lists.values().map(Vec::len).sum();
    if snapshot.grouped != entries as i64 {
        violations.push(format!(
            "the `grouped` counter says {} but the groups' lists hold {entries} entries (the pending count would be off)",
            snapshot.grouped
        ));
    }
    let mut active: BTreeMap<&str, i64> = BTreeMap::new();
    for &(g, id) in live.keys() {
        if g.is_empty() || !states.get(id).is_some_and(|s| s.contains(&State::Pending)) {
            continue;
        }
        if !gready.contains(id) {
            violations.push(format!(
                "id {id:?} waits in group {g:?} but is not in {:?} (the queue latency would be off)",
                layout.key("gready")
            ));
        }
        if snapshot.group_index.get(id).map(String::as_str) != Some(g) {
            violations.push(format!(
                "id {id:?} waits in group {g:?} but the group index says {:?}",
                snapshot.group_index.get(id)
            ));
        }
    }
    for (id, g) in &snapshot.group_index {
        match states.get(id.as_str()) {
            Some(s) if !s.contains(&State::Dead) => {
                if s.contains(&State::Active) {
                    *active.entry(g.as_str()).or_default() += 1;
                }
            }
            found => violations.push(format!(
                "id {id:?} is in the group index (group {g:?}) but is {}",
                if found.is_some() {
                    "dead"
                } else {
                    "in no state"
                }
            )),
        }
    }
    let names: BTreeSet<&str> = active
        .keys()
        .copied()
        .chain(snapshot.group_active.keys().map(String::as_str))
        .collect();
    for g in names {
        let (want, have) = (
            active.get(g).copied().unwrap_or(0),
            snapshot.group_active.get(g).copied().unwrap_or(0),
        );
        if want != have {
            violations.push(format!(
                "group {g:?} has {want} active messages but its count in {:?} says {have}",
                layout.key("gactive")
            ));
        }
    }
}

/// Panics if a message vanished without being processed: an id that is
/// [`State::Gone`] in `report` but not in `processed` was lost.
///
/// Lists up to 20 lost ids.
pub fn assert_none_lost(report: &StateReport, processed: &HashSet<String>) {
    let lost: Vec<&String> = report
        .gone
        .iter()
        .filter(|id| !processed.contains(*id))
        .collect();
    if lost.is_empty() {
        return;
    }
    let listed: Vec<&str> = lost
        .iter()
        .take(MAX_LOST_LISTED)
        .map(|id| id.as_str())
        .collect();
    panic!(
        "{} message(s) lost (gone from Redis but never processed): {listed:?}{}; states: {report}",
        lost.len(),
        if lost.len() > MAX_LOST_LISTED {
            format!(" … and {} more", lost.len() - MAX_LOST_LISTED)
        } else {
            String::new()
        }
    );
}
