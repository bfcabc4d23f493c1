//! Redis access: the only module that sends commands.
//!
//! Every state change of a message is one Lua script (`lua/*.lua`); this module builds the
//! `EVALSHA` calls, loads a script when Redis answers `NOSCRIPT` (a restarted server
//! forgets its script cache) and turns replies into plain Rust values.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{Cmd, FromRedisValue, Value};

use crate::conn::{Backend, Node, Req, Route};

use crate::error::{Error, Result};
use crate::keys::{Namespace, TopicKeys};
use crate::scripts::{Lua, Scripts};
use crate::status::Retention;

/// Most messages any one script call takes or settles: Lua's `unpack` fails past about
/// 8,000 values, and a bounded call keeps Redis responsive for other clients.
pub(crate) const MAX_PER_CALL: usize = 1000;

/// Connection settings, from [`crate::ClientBuilder`].
#[derive(Debug, Clone)]
pub(crate) struct ConnSettings {
    pub(crate) response_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) reconnect_retries: usize,
    /// Dead letters kept per topic (0 = no cap).
    pub(crate) dead_max_len: u64,
    /// Longest a dead letter is kept (zero = forever).
    pub(crate) dead_max_age: Duration,
    /// Records of finished messages kept per topic where nothing else says (see
    /// [`crate::ClientBuilder::result_retention`]).
    pub(crate) results: Retention,
    /// PEM CA to verify the server with, instead of the system's roots (`rediss://` only).
    pub(crate) tls_ca: Option<Vec<u8>>,
    /// PEM client certificate and key for mutual TLS.
    pub(crate) tls_client: Option<(Vec<u8>, Vec<u8>)>,
    /// Acknowledge publishes and settles only once this many replicas have them
    /// (`WAIT n timeout`); `None`: as soon as the master has them.
    pub(crate) replicas: Option<(usize, Duration)>,
}

/// One message to publish.
#[derive(Debug, Clone)]
pub(crate) struct PublishItem {
    pub(crate) id: String,
    pub(crate) delay: Duration,
    pub(crate) body: String,
    /// A unique key, how long it holds at most, and whether it is released when the
    /// message reaches a final state (else it holds for the whole ttl).
    pub(crate) unique: Option<(String, Duration, bool)>,
    /// The fair group it waits in ([`crate::PublishOptions::group`]).
    pub(crate) group: Option<String>,
}

/// What publishing one message did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    New,
    /// A message with this id is stored, or was processed within the dedup window.
    DuplicateId,
    /// The unique key is held by the message with this id.
    UniqueHeldBy(String),
}

/// The outcome of one finished delivery, for [`Store::settle`].
#[derive(Debug)]
pub(crate) enum SettleOp {
    /// Done. `retry`: failed attempts before this one; `result`: the handler's result
    /// (JSON), kept in the message's record.
    Ack { retry: u32, result: Option<String> },
    /// Back to wait `delay`, with the rewritten envelope.
    Retry { body: String, delay: Duration },
    /// To the dead-letter queue, with the rewritten envelope.
    Dead { body: String },
    /// To the dead-letter queue with the stored body kept as it is (too large to read, or
    /// with an unreadable id); Lua appends `last_error` to it.
    DeadAsIs { error: String },
}

impl SettleOp {
    /// The settle script's arguments for anything but an ack: op name, envelope (or error
    /// text) and delay in ms.
    fn failure_args(&self) -> Option<(&'static str, &[u8], u64)> {
        match self {
            SettleOp::Ack { result: None, .. } => None,
            SettleOp::Ack {
                result: Some(result),
                retry,
            } => Some(("done", result.as_bytes(), u64::from(*retry))),
            SettleOp::Retry { body, delay } => Some(("retry", body.as_bytes(), millis(*delay))),
            SettleOp::Dead { body } => Some(("dead", body.as_bytes(), 0)),
            SettleOp::DeadAsIs { error } => Some(("dead_as_is", error.as_bytes(), 0)),
        }
    }
}

/// The identity of one settle: the same outcomes sent again after an error carry the same
/// id, so that the script can answer what the first sending applied.
#[derive(Debug, Clone)]
pub(crate) struct SettleCall {
    id: String,
    again: bool,
}

impl SettleCall {
    pub(crate) fn new() -> Self {
        Self {
            id: format!("{:016x}", rand::random::<u64>()),
            again: false,
        }
    }

    /// The same call, sent again.
    pub(crate) fn again(&self) -> Self {
        Self {
            id: self.id.clone(),
            again: true,
        }
    }
}

/// A state to look into with [`Store::peek`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeekState {
    Pending,
    Delayed,
    Active,
    Dead,
}

/// Where `cancel` found a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CancelState {
    Delayed,
    Pending,
    Active,
    Dead,
    Missing,
}

/// One message handed out by a fetch: its id and raw body.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) id: String,
    pub(crate) body: Vec<u8>,
}

/// What a fetch returned.
#[derive(Debug)]
pub(crate) struct FetchResult {
    /// The lease token of the fetched messages, to settle and renew them with: the one
    /// given, with `@{now_ms}` appended by the script (when the deliveries started).
    pub(crate) token: String,
    /// Redis time of the fetch, ms.
    pub(crate) now_ms: i64,
    /// Due time of the earliest delayed message, when nothing was leased.
    pub(crate) next_due_ms: Option<i64>,
    pub(crate) messages: Vec<Fetched>,
    /// The topic is paused: nothing was handed out.
    pub(crate) paused: bool,
}

/// Counts and counters of one topic, as read from Redis.
#[derive(Debug, Default)]
pub(crate) struct RawStats {
    pub(crate) pending: u64,
    pub(crate) active: u64,
    pub(crate) delayed: u64,
    pub(crate) dead: u64,
    pub(crate) counters: HashMap<String, u64>,
    pub(crate) paused: bool,
    /// Records of finished messages kept.
    pub(crate) results: u64,
    /// Redis's clock when read (ms).
    pub(crate) now_ms: i64,
    /// When the message waiting longest became ready (ms).
    pub(crate) oldest_ready_ms: Option<i64>,
    /// When the oldest dead letter died (ms).
    pub(crate) oldest_dead_ms: Option<i64>,
    /// When the next delayed message is due (ms).
    pub(crate) next_due_ms: Option<i64>,
}

/// The worker registry as read from Redis.
#[derive(Debug, Default)]
pub(crate) struct RawRegistry {
    pub(crate) now_ms: i64,
    /// Worker id → when its entry expires (ms).
    pub(crate) expiries: Vec<(String, i64)>,
    /// Worker id → `<last heartbeat ms> <description JSON>`.
    pub(crate) info: HashMap<String, String>,
    /// Worker id → first heartbeat (ms).
    pub(crate) started: HashMap<String, i64>,
}

/// Where one id is, as read from Redis (see [`Store::lookup`]).
#[derive(Debug, Default)]
pub(crate) struct RawLookup {
    pub(crate) ready: Option<f64>,
    pub(crate) delayed: Option<f64>,
    pub(crate) active: Option<f64>,
    pub(crate) dead: Option<f64>,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) lease: Option<String>,
    pub(crate) started: Option<i64>,
    /// What its running handler last reported.
    pub(crate) progress: Option<String>,
    /// Its record, if it finished within the retention.
    pub(crate) record: Option<String>,
    /// Redis's clock when this was read, ms (a record past its `until` is not shown).
    pub(crate) now_ms: i64,
}

/// A dedicated connection for blocking waits.
///
/// A blocked `BLPOP` holds its connection for the whole wait, so it must not share the
/// multiplexed connection (it would stall every other command), and the normal response
/// timeout would cut it short (DESIGN.md rule 6). On a cluster it goes to the master of
/// the slot it waits on; after a Sentinel failover it reconnects to the new master.
pub(crate) struct BlockingConn {
    conn: Option<MultiplexedConnection>,
    /// Redis's `CLIENT ID` of the connection (0 until connected), for `CLIENT UNBLOCK`.
    id: Arc<std::sync::atomic::AtomicU64>,
    /// The node it is connected to (shared with the waiter, for `CLIENT UNBLOCK`).
    node: Arc<RwLock<Option<Node>>>,
    /// The master epoch it was opened in.
    epoch: u64,
    /// The last wait failed: look the slot's master up again before reconnecting.
    stale: bool,
}

impl BlockingConn {
    /// A handle on the connection's Redis client id that stays valid while a wait owns
    /// the connection.
    pub(crate) fn id_cell(&self) -> Arc<std::sync::atomic::AtomicU64> {
        Arc::clone(&self.id)
    }

    /// A handle on the node the connection goes to.
    pub(crate) fn node_cell(&self) -> Arc<RwLock<Option<Node>>> {
        Arc::clone(&self.node)
    }

    /// Forgets the connection (and its client id: another client may get it, and must
    /// never be unblocked by mistake); the next wait looks the master up again.
    fn drop_connection(&mut self) {
        self.conn = None;
        self.id.store(0, std::sync::atomic::Ordering::SeqCst);
        self.stale = true;
    }
}

/// A script call: the `EVALSHA` command and the key whose slot it runs in.
pub(crate) struct Call {
    cmd: Cmd,
    route: String,
}

impl std::ops::Deref for Call {
    type Target = Cmd;
    fn deref(&self) -> &Cmd {
        &self.cmd
    }
}

impl std::ops::DerefMut for Call {
    fn deref_mut(&mut self) -> &mut Cmd {
        &mut self.cmd
    }
}

pub(crate) struct Store {
    backend: Backend,
    settings: ConnSettings,
    pub(crate) ns: Namespace,
    scripts: Scripts,
}

impl Store {
    /// Whether writes wait for replicas (each then takes a connection of its own, so two
    /// calls in flight may run in either order).
    pub(crate) fn replicated(&self) -> bool {
        self.settings.replicas.is_some()
    }

    pub(crate) async fn connect(url: &str, ns: Namespace, settings: ConnSettings) -> Result<Self> {
        let backend = Backend::connect(url, settings.clone()).await?;
        Ok(Self {
            backend,
            settings,
            ns,
            scripts: Scripts::new(),
        })
    }

    async fn exec<T: FromRedisValue>(
        &self,
        req: Req<'_>,
        route: Route<'_>,
        script: Option<&Lua>,
    ) -> Result<T> {
        self.backend.exec(req, route, script).await
    }

    /// A command on the key's slot.
    async fn cmd<T: FromRedisValue>(&self, cmd: &Cmd, key: &str) -> Result<T> {
        self.exec(Req::Cmd(cmd), Route::Key(key), None).await
    }

    /// The nodes that hold data: every master of a cluster, or the one master.
    async fn targets(&self) -> Result<Vec<Option<Node>>> {
        if self.backend.is_cluster() {
            Ok(self
                .backend
                .masters()
                .await?
                .into_iter()
                .map(Some)
                .collect())
        } else {
            Ok(vec![None])
        }
    }

    /// Proves Redis answers and accepts writes (not read-only, not out of memory): a
    /// short-lived marker key in the namespace.
    pub(crate) async fn check_writable(&self) -> Result<()> {
        let key = format!("{}:readyz", self.ns.name());
        let set = redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("PX")
            .arg(10_000)
            .to_owned();
        self.cmd::<()>(&set, &key).await
    }

    /// Loads every script on every master, one round trip each, so that the first calls
    /// need no `NOSCRIPT` detour; it also proves Redis answers.
    pub(crate) async fn load_scripts(&self) -> Result<()> {
        let mut pipe = redis::pipe();
        for script in self.scripts.all() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(script.code());
        }
        for node in self.targets().await? {
            let route = node.as_ref().map_or(Route::Key(""), Route::Node);
            self.exec::<Vec<String>>(Req::Pipe(&pipe), route, None)
                .await?;
        }
        Ok(())
    }

    fn evalsha(script: &Lua, keys: &[&str]) -> Call {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.hash()).arg(keys.len()).arg(keys);
        Call {
            cmd,
            route: keys.first().map(|k| (*k).to_owned()).unwrap_or_default(),
        }
    }

    /// Runs a script call built by [`Store::evalsha`].
    async fn run<T: FromRedisValue>(&self, script: &Lua, call: &Call) -> Result<T> {
        self.exec(Req::Cmd(&call.cmd), Route::Key(&call.route), Some(script))
            .await
    }

    /// Runs a script call that acknowledges something to the caller (publish, settle):
    /// with [`ConnSettings::replicas`], on a dedicated connection followed by `WAIT`.
    async fn run_acknowledged<T: FromRedisValue>(&self, script: &Lua, call: &Call) -> Result<T> {
        match self.settings.replicas {
            Some((n, timeout)) if n > 0 => {
                self.backend
                    .exec_replicated(&call.cmd, &call.route, script, n, timeout)
                    .await
            }
            _ => self.run(script, call).await,
        }
    }

    /// The partition count stored in a layout key (1 when absent: a plain topic).
    pub(crate) async fn partitions(&self, meta: &str) -> Result<u32> {
        let get = redis::cmd("HGET").arg(meta).arg("partitions").to_owned();
        let n: Option<u32> = self.cmd(&get, meta).await?;
        Ok(n.unwrap_or(1).max(1))
    }

    /// One step of changing a topic's layout (see `lua/layout.lua`), by the change `owner`:
    /// `freeze` (for at most `hold`) returns the messages stored under `keys`.
    pub(crate) async fn layout(
        &self,
        keys: &TopicKeys,
        op: &str,
        partitions: u32,
        owner: &str,
        hold: Duration,
    ) -> Result<u64> {
        let script = &self.scripts.layout;
        let mut call = Self::evalsha(
            script,
            &[
                &keys.meta,
                &keys.pending,
                &keys.stats,
                &keys.active,
                &keys.delayed,
                &keys.dead,
            ],
        );
        call.arg(op).arg(partitions).arg(owner).arg(millis(hold));
        let n: i64 = self.run(script, &call).await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Adds `topic` to the namespace's topic registry (`mq:topics`).
    pub(crate) async fn register_topic(&self, topic: &str) -> Result<()> {
        let key = self.ns.topics();
        let add = redis::cmd("SADD").arg(&key).arg(topic).to_owned();
        self.cmd::<()>(&add, &key).await
    }

    /// Stores messages (the caller registers the topic).
    pub(crate) async fn publish(
        &self,
        keys: &TopicKeys,
        partitions: u32,
        items: &[&PublishItem],
    ) -> Result<Vec<Written>> {
        let script = &self.scripts.publish;
        let (key_names, options) = message_args(keys, None, items);
        let refs: Vec<&str> = key_names.iter().map(String::as_str).collect();
        let mut call = Self::evalsha(script, &refs);
        call.arg(partitions);
        for (item, options) in items.iter().zip(&options) {
            call.arg(&item.id).arg(&item.body).arg(options);
        }
        let written: Vec<Value> = self.run_acknowledged(script, &call).await?;
        written
            .into_iter()
            .map(|v| match v {
                Value::Int(1) => Ok(Written::New),
                Value::Int(_) => Ok(Written::DuplicateId),
                other => Ok(Written::UniqueHeldBy(
                    redis::from_redis_value(other).map_err(redis::RedisError::from)?,
                )),
            })
            .collect()
    }

    /// Sets (`Some((rate per second, burst))`) or removes a topic's rate limit. A changed
    /// limit keeps the tokens it has, up to the new burst; a new one starts full.
    pub(crate) async fn set_limit(
        &self,
        keys: &TopicKeys,
        limit: Option<(f64, u32)>,
    ) -> Result<()> {
        let Some((rate, burst)) = limit else {
            let del = redis::cmd("DEL").arg(&keys.limit).to_owned();
            return self.cmd::<()>(&del, &keys.limit).await;
        };
        let script = &self.scripts.limit;
        let mut call = Self::evalsha(script, &[&keys.limit]);
        call.arg("set").arg(format!("{rate}")).arg(burst);
        self.run::<()>(script, &call).await
    }

    /// Sets (`Some("<max_active> <weight> <paused>")`) or removes the settings of one fair
    /// group; whether it had settings.
    pub(crate) async fn set_group(
        &self,
        keys: &TopicKeys,
        group: &str,
        settings: Option<&str>,
    ) -> Result<bool> {
        let script = &self.scripts.group_set;
        let mut call = Self::evalsha(script, &[&keys.gconf, &keys.wake]);
        call.arg(group).arg(settings.unwrap_or(""));
        Ok(self.run::<i64>(script, &call).await? == 1)
    }

    /// The fair groups of one topic (or partition) with waiting or running messages or
    /// settings: name, entries listed, active, settings (as stored).
    pub(crate) async fn groups(
        &self,
        keys: &TopicKeys,
    ) -> Result<Vec<(String, u64, u64, Option<String>)>> {
        let mut pipe = redis::pipe();
        pipe.cmd("LRANGE")
            .arg(&keys.gring)
            .arg(0)
            .arg(-1)
            .hgetall(&keys.gactive)
            .hgetall(&keys.gconf);
        let (ring, active, conf): (Vec<String>, HashMap<String, u64>, HashMap<String, String>) =
            self.exec(Req::Pipe(&pipe), Route::Key(&keys.gring), None)
                .await?;
        let mut names: Vec<String> = ring
            .into_iter()
            .filter(|g| !g.is_empty())
            .chain(active.keys().cloned())
            .chain(conf.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut lens = Vec::with_capacity(names.len());
        for chunk in names.chunks(MAX_PER_CALL) {
            let mut pipe = redis::pipe();
            for g in chunk {
                pipe.llen(keys.group_list(g));
            }
            let part: Vec<u64> = self
                .exec(Req::Pipe(&pipe), Route::Key(&keys.gring), None)
                .await?;
            lens.extend(part);
        }
        Ok(names
            .into_iter()
            .zip(lens)
            .map(|(g, pending)| {
                let a = active.get(&g).copied().unwrap_or(0);
                let c = conf.get(&g).cloned();
                (g, pending, a, c)
            })
            .collect())
    }

    /// A topic's rate limit: rate per second and burst.
    pub(crate) async fn limit(&self, keys: &TopicKeys) -> Result<Option<(f64, u32)>> {
        let cmd = redis::cmd("HMGET")
            .arg(&keys.limit)
            .arg("rate")
            .arg("burst")
            .to_owned();
        let (rate, burst): (Option<f64>, Option<u32>) = self.cmd(&cmd, &keys.limit).await?;
        Ok(rate.zip(burst))
    }

    /// Empties a topic's bucket for `hold` (a remote 429 said to wait): no token before it.
    pub(crate) async fn drain_limit(&self, keys: &TopicKeys, hold: Duration) -> Result<()> {
        let script = &self.scripts.limit;
        let mut call = Self::evalsha(script, &[&keys.limit]);
        call.arg("drain").arg(millis(hold));
        self.run::<()>(script, &call).await
    }

    /// Redis's clock (ms) on the node of `key`.
    pub(crate) async fn time_ms(&self, key: &str) -> Result<i64> {
        let (secs, micros): (i64, i64) = self.cmd(&redis::cmd("TIME"), key).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// The schedule index (name → `"<rev> <partitions> <topic>"`) and Redis's clock (ms).
    pub(crate) async fn schedule_index(&self) -> Result<(HashMap<String, String>, i64)> {
        let key = self.ns.schedules();
        let mut pipe = redis::pipe();
        pipe.hgetall(&key).cmd("TIME");
        let (index, (secs, micros)): (HashMap<String, String>, (i64, i64)) =
            self.exec(Req::Pipe(&pipe), Route::Key(&key), None).await?;
        Ok((index, secs * 1000 + micros / 1000))
    }

    /// Sets (`Some`) or removes (`None`) one schedule's index entry.
    pub(crate) async fn schedule_index_set(&self, name: &str, entry: Option<&str>) -> Result<()> {
        let key = self.ns.schedules();
        let cmd = match entry {
            Some(entry) => redis::cmd("HSET").arg(&key).arg(name).arg(entry).to_owned(),
            None => redis::cmd("HDEL").arg(&key).arg(name).to_owned(),
        };
        self.cmd::<()>(&cmd, &key).await
    }

    /// One schedule's state (empty when it does not exist).
    pub(crate) async fn schedule_state(&self, key: &str) -> Result<HashMap<String, String>> {
        self.cmd(&redis::cmd("HGETALL").arg(key).to_owned(), key)
            .await
    }

    /// Writes a schedule's spec: whether it changed, and its next fire time (ms).
    pub(crate) async fn schedule_set(
        &self,
        key: &str,
        spec: &str,
        rev: &str,
        next_ms: i64,
        anchor_ms: i64,
    ) -> Result<(bool, i64)> {
        let script = &self.scripts.schedule_set;
        let mut call = Self::evalsha(script, &[key]);
        call.arg("set")
            .arg(spec)
            .arg(rev)
            .arg(next_ms)
            .arg(anchor_ms);
        let (changed, next): (i64, i64) = self.run_acknowledged(script, &call).await?;
        Ok((changed == 1, next))
    }

    /// Writes a schedule's whole state (field, value pairs) unless it exists: a move to
    /// the topic's new layout, which must not overwrite a newer spec written meanwhile.
    pub(crate) async fn schedule_copy(
        &self,
        key: &str,
        fields: &HashMap<String, String>,
    ) -> Result<bool> {
        let script = &self.scripts.schedule_set;
        let mut call = Self::evalsha(script, &[key]);
        call.arg("copy");
        for (field, value) in fields {
            call.arg(field).arg(value);
        }
        let n: i64 = self.run_acknowledged(script, &call).await?;
        Ok(n > 0)
    }

    /// Removes a schedule's state; whether it existed.
    pub(crate) async fn schedule_del(&self, key: &str) -> Result<bool> {
        let script = &self.scripts.schedule_set;
        let mut call = Self::evalsha(script, &[key]);
        call.arg("del");
        let n: i64 = self.run_acknowledged(script, &call).await?;
        Ok(n > 0)
    }

    /// Claims a schedule's fire time and publishes its messages (`lua/schedule_fire.lua`).
    pub(crate) async fn schedule_fire(
        &self,
        keys: &TopicKeys,
        partitions: u32,
        fire: &FireCall<'_>,
        items: &[&PublishItem],
    ) -> Result<FireOutcome> {
        let script = &self.scripts.schedule_fire;
        let schedule = keys.schedule(fire.name);
        let (key_names, options) = message_args(keys, Some(&schedule), items);
        let refs: Vec<&str> = key_names.iter().map(String::as_str).collect();
        let mut call = Self::evalsha(script, &refs);
        call.arg(partitions)
            .arg(if fire.tick { "tick" } else { "now" })
            .arg(fire.expected_next)
            .arg(fire.rev)
            .arg(fire.new_next)
            .arg(fire.latest);
        for (item, options) in items.iter().zip(&options) {
            call.arg(&item.id).arg(&item.body).arg(options);
        }
        let reply: Vec<Value> = self.run_acknowledged(script, &call).await?;
        let text = |v: &Value| -> Result<String> {
            Ok(redis::from_redis_value::<String>(v.clone()).map_err(redis::RedisError::from)?)
        };
        let kind = reply.first().map(text).transpose()?.unwrap_or_default();
        Ok(match kind.as_str() {
            "fired" => FireOutcome::Published(reply.len() - 1),
            "stale" => FireOutcome::Stale {
                next: text(&reply[1])?.parse().unwrap_or(0),
                rev: text(&reply[2])?,
                anchor: text(&reply[3])?.parse().unwrap_or(0),
            },
            "early" => FireOutcome::Early(text(&reply[1])?.parse().unwrap_or(1)),
            _ => FireOutcome::Gone,
        })
    }

    pub(crate) async fn fetch(
        &self,
        keys: &TopicKeys,
        n: usize,
        lease: Duration,
        token: &str,
        dedup: bool,
        will_wait: bool,
    ) -> Result<FetchResult> {
        let script = &self.scripts.fetch;
        let mut call = Self::evalsha(
            script,
            &[
                &keys.pending,
                &keys.active,
                &keys.lease,
                &keys.delayed,
                &keys.msg,
                &keys.wake,
                &keys.stats,
                &keys.paused,
                &keys.processed,
                &keys.cancelled,
                &keys.uniq,
                &keys.ready,
                &keys.runs,
                &keys.limit,
                &keys.progress,
                &keys.waiters,
            ],
        );
        call.arg(n.min(MAX_PER_CALL))
            .arg(millis(lease))
            .arg(token)
            // Due delayed messages promoted per call: bounds the time one call holds Redis
            // when many fall due at once; the rest follow on the next fetch.
            .arg(MAX_PER_CALL)
            .arg(u8::from(dedup))
            .arg(u8::from(will_wait));
        let (now_ms, next_due, flat, paused): (i64, i64, Vec<Value>, i64) =
            self.run(script, &call).await?;
        let token = format!("{token}@{now_ms}");
        let token_ref = token.as_str();
        let mut messages = Vec::with_capacity(flat.len() / 2);
        let mut unreadable = Vec::new();
        let mut it = flat.into_iter();
        while let (Some(id), Some(body)) = (it.next(), it.next()) {
            let id: Vec<u8> = redis::from_redis_value(id).map_err(redis::RedisError::from)?;
            let body: Vec<u8> = redis::from_redis_value(body).map_err(redis::RedisError::from)?;
            match String::from_utf8(id) {
                Ok(id) => messages.push(Fetched { id, body }),
                // Planted by hand: no handler could be told its id. Dead-letter it here
                // rather than fail the whole fetch.
                Err(e) => unreadable.push(e.into_bytes()),
            }
        }
        if !unreadable.is_empty() {
            let op = SettleOp::DeadAsIs {
                error: "message id is not valid UTF-8".to_owned(),
            };
            let outcomes: Vec<(&str, &[u8], &SettleOp)> = unreadable
                .iter()
                .map(|id| (token_ref, id.as_slice(), &op))
                .collect();
            self.settle(keys, &outcomes, Duration::ZERO, None, &SettleCall::new())
                .await?;
        }
        Ok(FetchResult {
            token,
            now_ms,
            next_due_ms: (next_due >= 0).then_some(next_due),
            messages,
            paused: paused == 1,
        })
    }

    /// Applies outcomes of finished deliveries, `(token, id, op)`, in one script call per
    /// 1,000; per delivery, whether the lease was still ours (or the outcome was applied by
    /// an earlier sending of the same `call`). `dedup_ttl` > 0 records acked ids in the
    /// processed ledger for that long.
    ///
    /// A caller that sends the same outcomes again after an error passes the same `call`
    /// with [`SettleCall::again`]: parts that Redis applied the first time are reported as
    /// applied, not as a lost lease.
    pub(crate) async fn settle(
        &self,
        keys: &TopicKeys,
        outcomes: &[(&str, &[u8], &SettleOp)],
        dedup_ttl: Duration,
        results: Option<Retention>,
        call: &SettleCall,
    ) -> Result<Vec<bool>> {
        let results = results.unwrap_or(self.settings.results);
        let mut flags = Vec::with_capacity(outcomes.len());
        for (k, chunk) in outcomes.chunks(MAX_PER_CALL).enumerate() {
            let id = format!("{}.{k}", call.id);
            flags.extend(
                self.settle_chunk(keys, chunk, dedup_ttl, results, &id, call.again)
                    .await?,
            );
        }
        Ok(flags)
    }

    async fn settle_chunk(
        &self,
        keys: &TopicKeys,
        outcomes: &[(&str, &[u8], &SettleOp)],
        dedup_ttl: Duration,
        results: Retention,
        call_id: &str,
        again: bool,
    ) -> Result<Vec<bool>> {
        let script = &self.scripts.settle;
        let mut call = Self::evalsha(
            script,
            &[
                &keys.active,
                &keys.lease,
                &keys.msg,
                &keys.delayed,
                &keys.pending,
                &keys.dead,
                &keys.wake,
                &keys.stats,
                &keys.processed,
                &keys.minutes,
                &keys.uniq,
                &keys.settled[0],
                &keys.settled[1],
                &keys.purged_tokens,
                &keys.ready,
                &keys.runs,
                &keys.results,
                &keys.finished,
                &keys.progress,
                &keys.waiters,
            ],
        );
        // Acks first, as (token, id, retry) triples; then the other outcomes (acks with a
        // result among them) in groups of 5.
        // The script answers in that order; `order` maps its answers back to ours.
        let mut acks = Vec::new();
        let mut others = Vec::new();
        for (i, (_, _, op)) in outcomes.iter().enumerate() {
            if let Some(args) = op.failure_args() {
                others.push((i, args));
            } else if let SettleOp::Ack { retry, .. } = op {
                acks.push((i, *retry));
            }
        }
        call.arg(self.settings.dead_max_len)
            .arg(millis(self.settings.dead_max_age))
            .arg(millis(dedup_ttl))
            .arg(call_id)
            .arg(u8::from(again))
            .arg(results.max_len)
            .arg(millis(results.max_age))
            .arg(acks.len());
        for &(i, retry) in &acks {
            let (token, id, _) = outcomes[i];
            call.arg(token).arg(id).arg(retry);
        }
        for &(i, (name, text, delay)) in &others {
            let (token, id, _) = outcomes[i];
            call.arg(name).arg(token).arg(id).arg(text).arg(delay);
        }
        let order = acks
            .into_iter()
            .map(|(i, _)| i)
            .chain(others.into_iter().map(|(i, _)| i));
        let answers: Vec<i64> = self.run_acknowledged(script, &call).await?;
        let answers = answers.into_iter().map(|f| f == 1);
        let mut flags = vec![false; outcomes.len()];
        for (i, ok) in order.zip(answers) {
            flags[i] = ok;
        }
        Ok(flags)
    }

    pub(crate) async fn release(
        &self,
        keys: &TopicKeys,
        deliveries: &[(String, String)],
    ) -> Result<Vec<bool>> {
        let mut flags = Vec::with_capacity(deliveries.len());
        for chunk in deliveries.chunks(MAX_PER_CALL) {
            flags.extend(self.release_chunk(keys, chunk).await?);
        }
        Ok(flags)
    }

    async fn release_chunk(
        &self,
        keys: &TopicKeys,
        deliveries: &[(String, String)],
    ) -> Result<Vec<bool>> {
        let script = &self.scripts.release;
        let mut call = Self::evalsha(
            script,
            &[
                &keys.active,
                &keys.lease,
                &keys.pending,
                &keys.wake,
                &keys.stats,
                &keys.ready,
            ],
        );
        for (token, id) in deliveries {
            call.arg(token).arg(id);
        }
        self.run_flags(script, &call).await
    }

    pub(crate) async fn extend(
        &self,
        keys: &TopicKeys,
        lease: Duration,
        deliveries: &[(String, String)],
    ) -> Result<Vec<bool>> {
        let mut flags = Vec::with_capacity(deliveries.len());
        for chunk in deliveries.chunks(MAX_PER_CALL) {
            flags.extend(self.extend_chunk(keys, lease, chunk).await?);
        }
        Ok(flags)
    }

    async fn extend_chunk(
        &self,
        keys: &TopicKeys,
        lease: Duration,
        deliveries: &[(String, String)],
    ) -> Result<Vec<bool>> {
        let script = &self.scripts.extend;
        let mut call = Self::evalsha(script, &[&keys.active, &keys.lease]);
        call.arg(millis(lease));
        for (token, id) in deliveries {
            call.arg(token).arg(id);
        }
        self.run_flags(script, &call).await
    }

    /// Stores the progress of a running delivery if its lease is still `token`'s; false
    /// when it is not (nothing written).
    pub(crate) async fn progress(
        &self,
        keys: &TopicKeys,
        id: &str,
        token: &str,
        progress: &str,
    ) -> Result<bool> {
        let script = &self.scripts.progress;
        let mut call = Self::evalsha(script, &[&keys.lease, &keys.progress]);
        call.arg(id).arg(token).arg(progress);
        let written: i64 = self.run(script, &call).await?;
        Ok(written == 1)
    }

    /// Registers a caller waiting for `id` to finish; false when there is nothing to wait
    /// for (it finished, is dead or unknown). With `drop`, takes a registration back.
    pub(crate) async fn watch(&self, keys: &TopicKeys, id: &str, drop: bool) -> Result<bool> {
        let script = &self.scripts.watch;
        let mut call = Self::evalsha(script, &[&keys.msg, &keys.dead, &keys.waiters]);
        call.arg(id).arg(if drop { "drop" } else { "add" });
        let registered: i64 = self.run(script, &call).await?;
        Ok(registered == 1)
    }

    /// Returns expired leases to pending; `(recovered, dead_lettered)`.
    pub(crate) async fn recover(
        &self,
        keys: &TopicKeys,
        max_recoveries: u32,
        limit: usize,
    ) -> Result<(u64, u64)> {
        let script = &self.scripts.recover;
        let mut call = Self::evalsha(
            script,
            &[
                &keys.active,
                &keys.lease,
                &keys.msg,
                &keys.pending,
                &keys.dead,
                &keys.wake,
                &keys.stats,
                &keys.uniq,
                &keys.ready,
                &keys.progress,
                &keys.waiters,
            ],
        );
        call.arg(max_recoveries)
            .arg(limit)
            .arg(self.settings.dead_max_len)
            .arg(millis(self.settings.dead_max_age));
        self.run(script, &call).await
    }

    /// Requeues dead letters (at most [`MAX_PER_CALL`] ids); per id, whether it was one.
    pub(crate) async fn reprocess(&self, keys: &TopicKeys, ids: &[&str]) -> Result<Vec<bool>> {
        let script = &self.scripts.reprocess;
        let mut call = Self::evalsha(
            script,
            &[
                &keys.dead,
                &keys.msg,
                &keys.pending,
                &keys.wake,
                &keys.stats,
                &keys.runs,
            ],
        );
        call.arg(ids);
        self.run_flags(script, &call).await
    }

    /// Deletes the given dead letters, or (ids empty) up to `oldest` of the oldest ones;
    /// returns the ids deleted.
    pub(crate) async fn drop_dead(
        &self,
        keys: &TopicKeys,
        ids: &[&str],
        oldest: usize,
    ) -> Result<Vec<String>> {
        let script = &self.scripts.drop_dead;
        let mut call = Self::evalsha(script, &[&keys.dead, &keys.msg, &keys.stats]);
        if ids.is_empty() {
            call.arg("oldest").arg(oldest.clamp(1, MAX_PER_CALL));
        } else {
            call.arg("ids").arg(ids);
        }
        self.run(script, &call).await
    }

    /// Ids of one state ranked `start..=stop` with their scores (due time, lease deadline,
    /// time of death; `None` for pending), and their bodies.
    pub(crate) async fn peek(
        &self,
        keys: &TopicKeys,
        state: PeekState,
        start: usize,
        stop: usize,
    ) -> Result<Vec<(String, Option<f64>, Option<Vec<u8>>)>> {
        let ranked = self.ranked(keys, state, start, stop).await?;
        let bodies = self.bodies(keys, &ranked).await?;
        Ok(ranked
            .into_iter()
            .zip(bodies)
            .map(|((id, score), body)| (String::from_utf8_lossy(&id).into_owned(), score, body))
            .collect())
    }

    /// The ids of one state ranked `start..=stop`, with their scores (`None` for pending).
    /// Ids are read as bytes: one planted by hand that is not UTF-8 must not hide the rest.
    pub(crate) async fn ranked(
        &self,
        keys: &TopicKeys,
        state: PeekState,
        start: usize,
        stop: usize,
    ) -> Result<Vec<(Vec<u8>, Option<f64>)>> {
        Ok(match state {
            PeekState::Pending => {
                // The ungrouped ones first, then each fair group's (in the ring's order, the
                // first 100 groups), as if they were one list.
                let range = redis::cmd("LRANGE")
                    .arg(&keys.pending)
                    .arg(start)
                    .arg(stop)
                    .to_owned();
                let mut ids: Vec<Vec<u8>> = self.cmd(&range, &keys.pending).await?;
                let want = stop.saturating_sub(start) + 1;
                if ids.len() < want {
                    let ring = redis::cmd("LRANGE")
                        .arg(&keys.gring)
                        .arg(0)
                        .arg(99)
                        .to_owned();
                    let ring: Vec<String> = self.cmd(&ring, &keys.gring).await?;
                    let mut lists = vec![keys.pending.clone()];
                    lists.extend(
                        ring.iter()
                            .filter(|g| !g.is_empty())
                            .map(|g| keys.group_list(g)),
                    );
                    if lists.len() > 1 {
                        ids.clear();
                        let mut skip = start;
                        for list in &lists {
                            let left = want - ids.len();
                            if left == 0 {
                                break;
                            }
                            let len: usize = self
                                .cmd(&redis::cmd("LLEN").arg(list).to_owned(), list)
                                .await?;
                            if skip >= len {
                                skip -= len;
                                continue;
                            }
                            let range = redis::cmd("LRANGE")
                                .arg(list)
                                .arg(skip)
                                .arg(skip + left - 1)
                                .to_owned();
                            let part: Vec<Vec<u8>> = self.cmd(&range, list).await?;
                            ids.extend(part);
                            skip = 0;
                        }
                    }
                }
                ids.into_iter().map(|id| (id, None)).collect()
            }
            PeekState::Delayed | PeekState::Active | PeekState::Dead => {
                let key = match state {
                    PeekState::Delayed => &keys.delayed,
                    PeekState::Active => &keys.active,
                    _ => &keys.dead,
                };
                let range = redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(start)
                    .arg(stop)
                    .arg("WITHSCORES")
                    .to_owned();
                let ids: Vec<(Vec<u8>, f64)> = self.cmd(&range, key).await?;
                ids.into_iter().map(|(id, s)| (id, Some(s))).collect()
            }
        })
    }

    /// The bodies of these ids (`None`: gone meanwhile), in one round trip.
    pub(crate) async fn bodies(
        &self,
        keys: &TopicKeys,
        ids: &[(Vec<u8>, Option<f64>)],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let hmget = redis::cmd("HMGET")
            .arg(&keys.msg)
            .arg(ids.iter().map(|(id, _)| id).collect::<Vec<_>>())
            .to_owned();
        self.cmd(&hmget, &keys.msg).await
    }

    /// Deletes every message of a topic; how many there were per state: pending, active,
    /// delayed, dead.
    pub(crate) async fn purge(&self, keys: &TopicKeys) -> Result<(u64, u64, u64, u64)> {
        let script = &self.scripts.purge;
        let call = Self::evalsha(
            script,
            &[
                &keys.msg,
                &keys.pending,
                &keys.active,
                &keys.lease,
                &keys.delayed,
                &keys.dead,
                &keys.wake,
                &keys.stats,
                &keys.processed,
                &keys.uniq,
                &keys.cancelled,
                &keys.purged_tokens,
                &keys.ready,
                &keys.runs,
                &keys.results,
                &keys.finished,
                &keys.progress,
                &keys.waiters,
            ],
        );
        self.run(script, &call).await
    }

    pub(crate) async fn cancel(&self, keys: &TopicKeys, id: &str) -> Result<CancelState> {
        let script = &self.scripts.cancel;
        let mut call = Self::evalsha(
            script,
            &[
                &keys.delayed,
                &keys.pending,
                &keys.active,
                &keys.dead,
                &keys.msg,
                &keys.stats,
                &keys.cancelled,
                &keys.uniq,
                &keys.ready,
                &keys.results,
                &keys.finished,
                &keys.progress,
                &keys.waiters,
            ],
        );
        let results = self.settings.results;
        call.arg(id)
            .arg(results.max_len)
            .arg(millis(results.max_age));
        let state: String = self.run(script, &call).await?;
        Ok(match state.as_str() {
            "delayed" => CancelState::Delayed,
            "pending" => CancelState::Pending,
            "active" => CancelState::Active,
            "dead" => CancelState::Dead,
            _ => CancelState::Missing,
        })
    }

    /// Pauses a topic: fetches hand out nothing until it is resumed.
    pub(crate) async fn pause(&self, keys: &TopicKeys) -> Result<()> {
        let set = redis::cmd("SET").arg(&keys.paused).arg(1).to_owned();
        self.cmd(&set, &keys.paused).await
    }

    /// Resumes a topic and wakes a worker; true if it was paused.
    pub(crate) async fn resume(&self, keys: &TopicKeys) -> Result<bool> {
        let script = &self.scripts.resume;
        let call = Self::evalsha(script, &[&keys.paused, &keys.wake]);
        Ok(self.run::<i64>(script, &call).await? == 1)
    }

    async fn run_flags(&self, script: &Lua, call: &Call) -> Result<Vec<bool>> {
        let flags: Vec<i64> = self.run(script, call).await?;
        Ok(flags.into_iter().map(|f| f == 1).collect())
    }

    /// Counts per state and the counters of one topic, in one round trip.
    pub(crate) async fn stats(&self, keys: &TopicKeys) -> Result<RawStats> {
        let mut pipe = redis::pipe();
        pipe.llen(&keys.pending)
            .zcard(&keys.active)
            .zcard(&keys.delayed)
            .zcard(&keys.dead)
            .hgetall(&keys.stats)
            .exists(&keys.paused);
        // The oldest ready (plain and grouped), oldest dead and soonest due entries, and
        // Redis's clock: O(log n).
        for key in [&keys.ready, &keys.dead, &keys.delayed, &keys.gready] {
            pipe.cmd("ZRANGE").arg(key).arg(0).arg(0).arg("WITHSCORES");
        }
        pipe.cmd("TIME")
            .cmd("LINDEX")
            .arg(&keys.runs)
            .arg(0)
            .hlen(&keys.results);
        // More replies than a tuple reads: each is converted on its own.
        let values: Vec<Value> = self
            .exec(Req::Pipe(&pipe), Route::Key(&keys.stats), None)
            .await?;
        fn nth<T: FromRedisValue>(values: &[Value], i: usize) -> Result<T> {
            let value = values
                .get(i)
                .cloned()
                .ok_or_else(|| Error::Protocol(format!("stats: reply {i} missing")))?;
            T::from_redis_value(value).map_err(|e| Error::Redis(redis::RedisError::from(e)))
        }
        let listed: u64 = nth(&values, 0)?;
        let active: u64 = nth(&values, 1)?;
        let delayed: u64 = nth(&values, 2)?;
        let dead: u64 = nth(&values, 3)?;
        let counters: HashMap<String, u64> = nth(&values, 4)?;
        let paused: bool = nth(&values, 5)?;
        let ready: Vec<(String, f64)> = nth(&values, 6)?;
        let died: Vec<(String, f64)> = nth(&values, 7)?;
        let due: Vec<(String, f64)> = nth(&values, 8)?;
        let grouped_ready: Vec<(String, f64)> = nth(&values, 9)?;
        let (secs, micros): (i64, i64) = nth(&values, 10)?;
        let run: Option<String> = nth(&values, 11)?;
        let results: u64 = nth(&values, 12)?;
        let first = |v: Vec<(String, f64)>| v.first().map(|(_, s)| *s as i64);
        // The first run: "<count> <ms>".
        let run_ms = run
            .as_deref()
            .and_then(|r| r.split_once(' '))
            .and_then(|(_, ms)| ms.parse::<i64>().ok());
        let oldest_ready_ms = [first(ready), run_ms, first(grouped_ready)]
            .into_iter()
            .flatten()
            .min();
        Ok(RawStats {
            // Entries of cancelled messages stay listed until a fetch skips them.
            // Grouped messages wait in their groups' lists, counted in `grouped`.
            pending: (listed + counters.get("grouped").copied().unwrap_or(0))
                .saturating_sub(counters.get("tombstones").copied().unwrap_or(0)),
            active,
            delayed,
            dead,
            counters,
            paused,
            results,
            now_ms: secs * 1000 + micros / 1000,
            oldest_ready_ms,
            oldest_dead_ms: first(died),
            next_due_ms: first(due),
        })
    }

    /// The workers consuming a topic, as their heartbeats left them: worker id →
    /// `concurrency,in_flight,expires_ms`, and Redis's clock (ms).
    pub(crate) async fn topic_consumers(
        &self,
        keys: &TopicKeys,
    ) -> Result<(HashMap<String, String>, i64)> {
        let mut pipe = redis::pipe();
        pipe.hgetall(&keys.workers).cmd("TIME");
        let (all, (secs, micros)): (HashMap<String, String>, (i64, i64)) = self
            .exec(Req::Pipe(&pipe), Route::Key(&keys.workers), None)
            .await?;
        Ok((all, secs * 1000 + micros / 1000))
    }

    /// Writes (or, with `description` `None`, removes) a worker's registry entry, which
    /// stands for `ttl` without another heartbeat, and removes expired ones; returns
    /// Redis's clock (ms).
    pub(crate) async fn heartbeat(
        &self,
        worker: &str,
        description: Option<&str>,
        ttl: Duration,
    ) -> Result<i64> {
        let [beats, info, started] = self.ns.registry();
        let script = &self.scripts.heartbeat;
        let mut call = Self::evalsha(script, &[&beats, &info, &started]);
        call.arg(worker)
            .arg(description.unwrap_or(""))
            .arg(millis(ttl));
        self.run(script, &call).await
    }

    /// How a worker consumes one topic (or, with `None`, that it stopped), in the topic's
    /// slot; the entry stands for `ttl` without another heartbeat.
    pub(crate) async fn consumers(
        &self,
        keys: &TopicKeys,
        worker: &str,
        counts: Option<(usize, usize)>,
        ttl: Duration,
    ) -> Result<()> {
        let script = &self.scripts.consumers;
        let mut call = Self::evalsha(script, &[&keys.workers]);
        call.arg(worker);
        match counts {
            Some((concurrency, in_flight)) => call.arg(concurrency).arg(in_flight),
            None => call.arg("").arg(0),
        };
        call.arg(millis(ttl));
        self.run::<i64>(script, &call).await.map(|_| ())
    }

    /// The whole worker registry: per worker when its entry expires, its last heartbeat
    /// and description, and its first heartbeat; and Redis's clock (ms).
    pub(crate) async fn registry(&self) -> Result<RawRegistry> {
        let [beats, info, started] = self.ns.registry();
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(&beats)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .hgetall(&info)
            .hgetall(&started)
            .cmd("TIME");
        #[allow(clippy::type_complexity)]
        let (expiries, info, started, (secs, micros)): (
            Vec<(String, f64)>,
            HashMap<String, String>,
            HashMap<String, i64>,
            (i64, i64),
        ) = self
            .exec(Req::Pipe(&pipe), Route::Key(&beats), None)
            .await?;
        Ok(RawRegistry {
            now_ms: secs * 1000 + micros / 1000,
            expiries: expiries.into_iter().map(|(id, s)| (id, s as i64)).collect(),
            info,
            started,
        })
    }

    /// Who holds these active ids (their lease tokens) and since when (ms).
    pub(crate) async fn holders(
        &self,
        keys: &TopicKeys,
        ids: &[String],
    ) -> Result<Vec<(Option<String>, Option<i64>)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET").arg(&keys.lease).arg(ids);
        let (tokens,): (Vec<Option<String>>,) = self
            .exec(Req::Pipe(&pipe), Route::Key(&keys.lease), None)
            .await?;
        Ok(tokens
            .into_iter()
            .map(|t| {
                let since = t.as_deref().and_then(crate::registry::started_of);
                (t, since)
            })
            .collect())
    }

    /// Where one id is in a topic (or partition): its scores in the delayed, active and
    /// dead sets, its body, and for an active one its holder's token and start time.
    pub(crate) async fn lookup(&self, keys: &TopicKeys, id: &str) -> Result<RawLookup> {
        let mut pipe = redis::pipe();
        pipe.zscore(&keys.ready, id)
            .zscore(&keys.delayed, id)
            .zscore(&keys.active, id)
            .zscore(&keys.dead, id)
            .hget(&keys.msg, id)
            .hget(&keys.lease, id)
            .hget(&keys.progress, id)
            .hget(&keys.results, id)
            .cmd("TIME");
        #[allow(clippy::type_complexity)]
        let (ready, delayed, active, dead, body, lease, progress, record, (secs, micros)): (
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<Vec<u8>>,
            Option<String>,
            Option<String>,
            Option<String>,
            (i64, i64),
        ) = self
            .exec(Req::Pipe(&pipe), Route::Key(&keys.msg), None)
            .await?;
        Ok(RawLookup {
            ready,
            delayed,
            active,
            dead,
            body,
            started: lease.as_deref().and_then(crate::registry::started_of),
            lease,
            progress,
            record,
            now_ms: secs * 1000 + micros / 1000,
        })
    }

    /// The per-minute counter ring of a topic and Redis's current time (ms):
    /// `(minute, published, processed, failed)` per slot in use.
    pub(crate) async fn minutes(
        &self,
        keys: &TopicKeys,
    ) -> Result<(i64, Vec<(i64, u64, u64, u64)>)> {
        let mut pipe = redis::pipe();
        pipe.hgetall(&keys.minutes).cmd("TIME");
        let (fields, (secs, micros)): (HashMap<String, i64>, (i64, i64)) = self
            .exec(Req::Pipe(&pipe), Route::Key(&keys.minutes), None)
            .await?;
        let get = |slot: i64, kind: &str| fields.get(&format!("{slot}:{kind}")).copied();
        let slots = (0..60)
            .filter_map(|slot| {
                let minute = get(slot, "m")?;
                let n = |k| u64::try_from(get(slot, k).unwrap_or(0)).unwrap_or(0);
                Some((minute, n("p"), n("d"), n("f")))
            })
            .collect();
        Ok((secs * 1000 + micros / 1000, slots))
    }

    pub(crate) async fn topics(&self) -> Result<Vec<String>> {
        let key = self.ns.topics();
        let members = redis::cmd("SMEMBERS").arg(&key).to_owned();
        let mut topics: Vec<String> = self.cmd(&members, &key).await?;
        topics.sort();
        Ok(topics)
    }

    /// `CONFIG GET` of the given parameters, or why the server refused it (managed
    /// services rename or disable `CONFIG`; an ACL user may lack `+config|get`).
    pub(crate) async fn config_get(&self, params: &[&str]) -> Result<Vec<NodeConfig>> {
        let mut nodes = Vec::new();
        for node in self.targets().await? {
            let route = node.as_ref().map_or(Route::Key(""), Route::Node);
            let mut out = HashMap::new();
            let mut refused = None;
            for p in params {
                let get = redis::cmd("CONFIG").arg("GET").arg(p).to_owned();
                match self
                    .exec::<HashMap<String, String>>(Req::Cmd(&get), route, None)
                    .await
                {
                    Ok(map) => out.extend(map),
                    Err(Error::Redis(e)) if matches!(e.kind(), redis::ErrorKind::Server(_)) => {
                        refused = Some(e.to_string());
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            nodes.push(NodeConfig {
                node: node.map(|n| n.to_string()),
                config: refused.map_or(Ok(out), Err),
            });
        }
        Ok(nodes)
    }

    pub(crate) fn blocking_conn(&self) -> BlockingConn {
        BlockingConn {
            conn: None,
            id: Arc::default(),
            node: Arc::default(),
            epoch: 0,
            stale: false,
        }
    }

    /// Groups wake-up keys that one blocking call may wait on together (one slot each on
    /// a cluster).
    pub(crate) fn wait_groups(&self, keys: &[String]) -> Vec<Vec<String>> {
        self.backend.wait_groups(keys)
    }

    /// Ends the blocking wait of the connection with this `CLIENT ID` on `node`, if it is
    /// blocked; true if it was. A wait left on Redis after its worker went back to work
    /// would take the next wake-up token (Redis serves the oldest waiter first) from idle
    /// workers.
    pub(crate) async fn unblock(&self, node: Option<&Node>, client_id: u64) -> Result<bool> {
        self.backend.unblock(node, client_id).await
    }

    /// Waits on the wake lists of one or more topics (of one slot) for at most `timeout`
    /// (whole ms). Returns true if a wake-up token was taken.
    pub(crate) async fn wait_wake(
        &self,
        bc: &mut BlockingConn,
        wake_keys: &[&str],
        timeout: Duration,
    ) -> Result<bool> {
        if bc.conn.is_some() && bc.epoch != self.backend.epoch() {
            // Sentinel named another master since this connection was opened.
            bc.drop_connection();
        }
        if bc.conn.is_none() {
            let first = wake_keys.first().copied().unwrap_or_default();
            let (mut conn, node, epoch) = self.backend.blocking_connection(first, bc.stale).await?;
            // Without its id (an ACL user without `+client|id`) a wait that must end early
            // is ended by dropping the connection instead.
            let id = redis::cmd("CLIENT").arg("ID").to_owned();
            let id = match tokio::time::timeout(
                self.settings.response_timeout,
                id.query_async::<u64>(&mut conn),
            )
            .await
            {
                Ok(Ok(id)) => id,
                Ok(Err(e)) if matches!(e.kind(), redis::ErrorKind::Server(_)) => 0,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(Error::Timeout(self.settings.response_timeout)),
            };
            bc.id.store(id, std::sync::atomic::Ordering::SeqCst);
            *bc.node.write().unwrap_or_else(|p| p.into_inner()) = node;
            bc.epoch = epoch;
            bc.stale = false;
            bc.conn = Some(conn);
        }
        let Some(conn) = bc.conn.as_mut() else {
            return Ok(false);
        };
        // BLPOP takes seconds with millisecond precision (Redis 6+); 0 would mean forever.
        let secs = (timeout.as_millis().max(1) as f64) / 1000.0;
        let call = redis::cmd("BLPOP").arg(wake_keys).arg(secs).to_owned();
        // The server answers by its own timeout; our guard only catches a dead link
        // (no RST, e.g. a network partition), after which the connection is replaced.
        let guard = timeout.saturating_add(self.settings.response_timeout);
        match tokio::time::timeout(guard, call.query_async::<Option<(String, String)>>(conn)).await
        {
            Ok(Ok(popped)) => Ok(popped.is_some()),
            Ok(Err(e)) => {
                // A moved slot, a failed-over node: look the master up again.
                bc.drop_connection();
                Err(e.into())
            }
            Err(_) => {
                bc.drop_connection();
                Err(Error::Timeout(guard))
            }
        }
    }
}

/// The `CONFIG GET` answers of one node, or why it refused them.
#[derive(Debug)]
pub(crate) struct NodeConfig {
    /// The node, on a cluster.
    pub(crate) node: Option<String>,
    pub(crate) config: std::result::Result<HashMap<String, String>, String>,
}

/// Milliseconds for a script argument, at most 100 years: Lua numbers are doubles, and
/// `now + delay` must stay an exact integer (and a valid `PX`).
fn millis(d: Duration) -> u64 {
    const CENTURY_MS: u128 = 100 * 365 * 24 * 3600 * 1000;
    d.as_millis().min(CENTURY_MS) as u64
}

/// The keys and per-message options of a call that stores messages (publish.lua's layout):
/// the topic's 11 keys, `extra` (the schedule of schedule_fire.lua), then one key per
/// unique key, which the options point to by index.
fn message_args(
    keys: &TopicKeys,
    extra: Option<&str>,
    items: &[&PublishItem],
) -> (Vec<String>, Vec<String>) {
    let mut key_names: Vec<String> = vec![
        keys.msg.clone(),
        keys.pending.clone(),
        keys.delayed.clone(),
        keys.wake.clone(),
        keys.stats.clone(),
        keys.processed.clone(),
        keys.minutes.clone(),
        keys.uniq.clone(),
        keys.meta.clone(),
        keys.ready.clone(),
        keys.runs.clone(),
    ];
    key_names.extend(extra.map(str::to_owned));
    // Per message: options ('' for the common case; see publish.lua).
    let mut options: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let index = match &item.unique {
            Some((key, ttl, until_final)) => {
                key_names.push(keys.unique(key));
                Some((key_names.len(), millis(*ttl), u8::from(*until_final)))
            }
            None => None,
        };
        let delay = millis(item.delay);
        let mut option = match index {
            None if delay == 0 && item.group.is_none() => String::new(),
            None => format!("{delay},0,0,0"),
            Some((index, ttl, until_final)) => format!("{delay},{index},{ttl},{until_final}"),
        };
        if let Some(group) = &item.group {
            option.push(',');
            option.push_str(group);
        }
        options.push(option);
    }
    (key_names, options)
}

/// What a schedule fire call is about (see `lua/schedule_fire.lua`).
pub(crate) struct FireCall<'a> {
    pub(crate) name: &'a str,
    /// A regular fire (compare-and-set on `expected_next`), else a run-now.
    pub(crate) tick: bool,
    pub(crate) expected_next: i64,
    pub(crate) rev: &'a str,
    pub(crate) new_next: i64,
    /// The latest fire time among the messages (0 when none).
    pub(crate) latest: i64,
}

/// What a schedule fire call did.
#[derive(Debug)]
pub(crate) enum FireOutcome {
    /// It published this many messages (some may be duplicates) and advanced the schedule.
    Published(usize),
    /// The schedule moved on or changed: its next fire time and revision now.
    Stale { next: i64, rev: String, anchor: i64 },
    /// The fire time is this many ms away on Redis's clock.
    Early(i64),
    /// The schedule does not exist.
    Gone,
}
