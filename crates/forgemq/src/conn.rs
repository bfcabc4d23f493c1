//! Where Redis is and how to reach it: one server (`redis://`), the master of a
//! Sentinel-managed group (`redis+sentinel://`), or a Redis Cluster (`redis+cluster://`).
//!
//! [`Backend`] gives the rest of the library one shape whatever the topology: a shared
//! multiplexed connection that routes each request to the master of the slot it names, a
//! way to reach one node (for `CONFIG GET`, `SCRIPT LOAD`, `CLIENT UNBLOCK`), dedicated
//! connections for blocking waits, and dedicated connections for writes that must be
//! replicated (`WAIT`) before they are acknowledged.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route as SlotRoute, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, Cmd, FromRedisValue, Value};

use crate::error::{Error, Result};
use crate::scripts::Lua;
use crate::store::ConnSettings;

/// The oldest Redis ForgeMQ runs on, in every mode: the fetch script takes a batch with
/// `LPOP key count` (Redis 6.2). Cluster and Sentinel mode need nothing newer (no sharded
/// pub/sub, no Redis Functions, no `CLUSTER SHARDS`).
pub(crate) const MIN_VERSION: (u32, u32, u32) = (6, 2, 0);

/// `major.minor.patch` of a `redis_version` (`7.0.15`, `6.2.14`, `7.4.0-rc1`); `None` when
/// it does not start with a number.
pub(crate) fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: u16 = 16384;

/// The hash slot of a key, as Redis Cluster computes it: CRC16 (XMODEM) of the key, or of
/// its hash tag (the part between the first `{` and the next `}`, when not empty).
pub(crate) fn slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS
}

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with.
pub(crate) fn crc16(bytes: &[u8]) -> u16 {
    crc16_from(0, bytes)
}

/// [`crc16`] of a byte string that starts with the bytes whose checksum is `crc`,
/// continued over `bytes`.
pub(crate) fn crc16_from(mut crc: u16, bytes: &[u8]) -> u16 {
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A Redis node's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Node {
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How to build the URL of one node of a cluster or sentinel group: the scheme (TLS or
/// not) and the credentials shared by every node.
#[derive(Debug, Clone)]
pub(crate) struct NodeTemplate {
    tls: bool,
    /// `user:password` or `:password`, as written in the URL (still percent-encoded).
    userinfo: Option<String>,
}

impl NodeTemplate {
    pub(crate) fn url(&self, node: &Node) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        match &self.userinfo {
            Some(u) => format!("{scheme}://{u}@{node}/"),
            None => format!("{scheme}://{node}/"),
        }
    }
}

/// Where Redis is, parsed from a URL.
#[derive(Debug, Clone)]
pub(crate) enum Topology {
    /// One server: `redis://`, `rediss://`, `unix://`, as the redis crate reads them.
    Single { url: String },
    /// A Redis Cluster, found from seed nodes.
    Cluster {
        seeds: Vec<Node>,
        template: NodeTemplate,
    },
    /// The master of `master`, as the sentinels say.
    Sentinel {
        sentinels: Vec<Node>,
        master: String,
        /// The master's scheme and credentials.
        template: NodeTemplate,
        /// The sentinels' password (`?sentinel_password=`), if they need one.
        sentinel_password: Option<String>,
    },
}

const GRAMMAR: &str = "use redis://host:port, redis+cluster://[user:pass@]host:port,host:port or redis+sentinel://[user:pass@]host:port,host:port/MASTER[?sentinel_password=P] (rediss… for TLS)";

impl Topology {
    /// Parses a Redis URL; a malformed one is a [`Error::Config`] that says what to write.
    pub(crate) fn parse(url: &str) -> Result<Topology> {
        let bad =
            |why: &str| Error::Config(format!("bad Redis URL {}: {why}; {GRAMMAR}", redact(url)));
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad("no scheme"));
        };
        let (tls, kind) = match scheme {
            "redis" | "rediss" | "unix" | "redis+unix" | "valkey" | "valkeys" => {
                return Ok(Topology::Single {
                    url: url.to_owned(),
                })
            }
            "redis+cluster" => (false, "cluster"),
            "rediss+cluster" => (true, "cluster"),
            "redis+sentinel" => (false, "sentinel"),
            "rediss+sentinel" => (true, "sentinel"),
            other => return Err(bad(&format!("unknown scheme {other:?}"))),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (Some(authority[..i].to_owned()), &authority[i + 1..]),
            None => (None, authority),
        };
        let default_port = if kind == "cluster" { 6379 } else { 26379 };
        let mut nodes = Vec::new();
        for h in hosts.split(',') {
            nodes.push(parse_node(h, default_port).map_err(|why| bad(&why))?);
        }
        if nodes.is_empty() {
            return Err(bad("no host"));
        }
        let template = NodeTemplate { tls, userinfo };
        let mut sentinel_password = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sentinel_password", v)) if kind == "sentinel" => {
                    sentinel_password = Some(v.to_owned())
                }
                _ => return Err(bad(&format!("unknown option {pair:?}"))),
            }
        }
        if kind == "cluster" {
            if !path.is_empty() {
                return Err(bad(
                    "a cluster has no database number (nothing may follow the hosts)",
                ));
            }
            return Ok(Topology::Cluster {
                seeds: nodes,
                template,
            });
        }
        let master = path.trim_end_matches('/');
        if master.is_empty() || master.contains('/') {
            return Err(bad("name the master after the hosts: /MASTER"));
        }
        Ok(Topology::Sentinel {
            sentinels: nodes,
            master: master.to_owned(),
            template,
            sentinel_password,
        })
    }
}

fn parse_node(text: &str, default_port: u16) -> std::result::Result<Node, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("an empty host in the list".into());
    }
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(format!("{text:?} opens [ without closing it"));
        };
        (host, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port number"))?,
        None => default_port,
    };
    if host.is_empty() {
        return Err(format!("{text:?} has no host name"));
    }
    Ok(Node {
        host: host.to_owned(),
        port,
    })
}

/// The URL without its passwords (the credentials, and `sentinel_password=`), for
/// messages.
pub(crate) fn redact(url: &str) -> String {
    let url = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    };
    match url.find("sentinel_password=") {
        Some(i) => {
            let start = i + "sentinel_password=".len();
            let end = url[start..].find('&').map_or(url.len(), |j| start + j);
            format!("{}***{}", &url[..start], &url[end..])
        }
        None => url,
    }
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Route<'a> {
    /// The master of the slot of this key (every key of one request shares it).
    Key(&'a str),
    /// This node.
    Node(&'a Node),
}

/// A request: one command or a pipeline (without `ignore`d commands: a cluster pipeline
/// answers every command).
#[derive(Clone, Copy)]
pub(crate) enum Req<'a> {
    Cmd(&'a Cmd),
    Pipe(&'a redis::Pipeline),
}

/// The connections of one client to Redis, whatever the topology.
pub(crate) struct Backend {
    settings: ConnSettings,
    kind: Kind,
    /// Dedicated connections for replicated writes, per node: `WAIT` blocks its connection
    /// and counts only that connection's writes.
    replicated: Mutex<HashMap<Option<Node>, Vec<MultiplexedConnection>>>,
}

enum Kind {
    /// One server, or the current master of a sentinel group.
    Master(Arc<MasterLink>),
    Cluster(Box<ClusterLink>),
}

/// The link to one master: its client and shared connection, swapped when Sentinel names
/// another master, or when the connection stopped answering.
struct MasterLink {
    current: RwLock<Arc<Master>>,
    config: ConnectionManagerConfig,
    /// Bumped each time the master changes, so that dedicated connections reconnect.
    epoch: AtomicU64,
    sentinel: Option<SentinelWatch>,
}

struct Master {
    node: Option<Node>,
    client: redis::Client,
    manager: Arc<ConnectionManager>,
}

struct SentinelWatch {
    sentinels: Vec<redis::Client>,
    name: String,
    template: NodeTemplate,
    /// Wakes the watcher at once (a write refused with `READONLY`, a lost connection).
    kick: tokio::sync::Notify,
}

struct ClusterLink {
    client: ClusterClient,
    conn: Arc<RwLock<ClusterConnection>>,
    /// Bumped when the shared connection is being replaced.
    generation: AtomicU64,
    template: NodeTemplate,
    /// Slot ranges and their masters, from `CLUSTER SLOTS`; refreshed when a node says a
    /// slot moved or a connection to it fails.
    slots: RwLock<Vec<(u16, u16, Node)>>,
}

impl Backend {
    /// Connects to Redis as `url` says. Fails, with a message naming what is wrong, when
    /// the URL is malformed, no node answers, or a cluster is not `cluster_state:ok`.
    pub(crate) async fn connect(url: &str, settings: ConnSettings) -> Result<Self> {
        let topology = Topology::parse(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.response_timeout))
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_number_of_retries(settings.reconnect_retries)
            .set_max_delay(Duration::from_secs(2));
        let kind = match topology {
            Topology::Single { url } => {
                let client = open_client(&url, &settings)?;
                let node = match client.get_connection_info().addr() {
                    redis::ConnectionAddr::Tcp(host, port)
                    | redis::ConnectionAddr::TcpTls { host, port, .. } => Some(Node {
                        host: host.clone(),
                        port: *port,
                    }),
                    _ => None,
                };
                let manager =
                    ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
                Kind::Master(Arc::new(MasterLink {
                    current: RwLock::new(Arc::new(Master {
                        node,
                        client,
                        manager: Arc::new(manager),
                    })),
                    config,
                    epoch: AtomicU64::new(0),
                    sentinel: None,
                }))
            }
            Topology::Sentinel {
                sentinels,
                master,
                template,
                sentinel_password,
            } => {
                let sentinel_template = NodeTemplate {
                    tls: template.tls,
                    userinfo: sentinel_password.map(|p| format!(":{p}")),
                };
                let clients = sentinels
                    .iter()
                    .map(|n| open_client(&sentinel_template.url(n), &settings))
                    .collect::<Result<Vec<_>>>()?;
                let watch = SentinelWatch {
                    sentinels: clients,
                    name: master,
                    template,
                    kick: tokio::sync::Notify::new(),
                };
                let (node, client) = watch.resolve(&settings).await?;
                let manager =
                    ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
                let link = Arc::new(MasterLink {
                    current: RwLock::new(Arc::new(Master {
                        node: Some(node),
                        client,
                        manager: Arc::new(manager),
                    })),
                    config,
                    epoch: AtomicU64::new(0),
                    sentinel: Some(watch),
                });
                tokio::spawn(watch_sentinels(Arc::downgrade(&link), settings.clone()));
                Kind::Master(link)
            }
            Topology::Cluster { seeds, template } => {
                let urls: Vec<String> = seeds.iter().map(|n| template.url(n)).collect();
                let mut builder = ClusterClient::builder(urls)
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.response_timeout)
                    .retries(3);
                #[cfg(feature = "tls")]
                if template.tls || settings.tls_ca.is_some() {
                    install_crypto_provider();
                    builder = builder.certs(tls_certificates(&settings));
                }
                #[cfg(not(feature = "tls"))]
                if template.tls {
                    return Err(no_tls());
                }
                let client = builder.build()?;
                let conn = tokio::time::timeout(
                    settings.connect_timeout.saturating_mul(3),
                    client.get_async_connection(),
                )
                .await
                .map_err(|_| {
                    Error::Connect(format!(
                        "no node of the cluster answered within {:?} (seeds: {})",
                        settings.connect_timeout.saturating_mul(3),
                        list(&seeds)
                    ))
                })?;
                let conn = match conn {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Say why if a seed can tell (a cluster that is down says so).
                        let why = cluster_state_of(&seeds, &template, &settings).await;
                        return Err(Error::Connect(match why {
                            Some(why) => why,
                            None => format!(
                                "no node of the cluster answered (seeds: {}): {e}",
                                list(&seeds)
                            ),
                        }));
                    }
                };
                Kind::Cluster(Box::new(ClusterLink {
                    client,
                    conn: Arc::new(RwLock::new(conn)),
                    generation: AtomicU64::new(0),
                    template,
                    slots: RwLock::new(Vec::new()),
                }))
            }
        };
        let backend = Self {
            settings,
            kind,
            replicated: Mutex::new(HashMap::new()),
        };
        match backend.kind {
            Kind::Cluster(_) => backend.check_cluster().await?,
            Kind::Master(_) => backend.check_version(Route::Key("")).await?,
        }
        Ok(backend)
    }

    /// Whether this is a Redis Cluster (keys of different slots never meet in a request).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// Every master answers, says `cluster_state:ok` and runs a Redis recent enough.
    async fn check_cluster(&self) -> Result<()> {
        let masters = self.masters().await?;
        for node in &masters {
            self.check_version(Route::Node(node)).await?;
            let info = redis::cmd("CLUSTER").arg("INFO").to_owned();
            let text: String = self.exec(Req::Cmd(&info), Route::Node(node), None).await?;
            let state = text
                .lines()
                .find_map(|l| l.strip_prefix("cluster_state:"))
                .map(str::trim)
                .unwrap_or("unknown");
            if state != "ok" {
                return Err(Error::Connect(format!(
                    "the Redis Cluster is not usable: node {node} says cluster_state:{state} (are all slots covered by a reachable master?)"
                )));
            }
        }
        Ok(())
    }

    /// Refuses a server older than [`MIN_VERSION`], read from `INFO server` on the node
    /// `route` names, with an error that names both versions: otherwise the first fetch
    /// fails, much later, as "wrong number of arguments for 'lpop'". A server that refuses
    /// `INFO` (an ACL user without `+info|server`, a managed service that renames it) or
    /// does not say its version is not checked.
    async fn check_version(&self, route: Route<'_>) -> Result<()> {
        let info = redis::cmd("INFO").arg("server").to_owned();
        let text: String = match self.exec(Req::Cmd(&info), route, None).await {
            Ok(text) => text,
            Err(Error::Redis(e)) if e.code().is_some() => {
                tracing::debug!(error = %e, "INFO server refused; the Redis version is not checked");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let Some(version) = text
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(str::trim)
        else {
            return Ok(());
        };
        match parse_version(version) {
            Some(found) if found < MIN_VERSION => {
                let on = match route {
                    Route::Node(node) => format!(" (node {node})"),
                    Route::Key(_) => String::new(),
                };
                Err(Error::Config(format!(
                    "Redis {version}{on} is too old: ForgeMQ needs {}.{} or newer (LPOP with a count)",
                    MIN_VERSION.0, MIN_VERSION.1
                )))
            }
            _ => Ok(()),
        }
    }

    /// Sends a request where `route` says and turns the reply into `T`. On `NOSCRIPT` (a
    /// restarted or failed-over node forgets its script cache) it loads `script` there and
    /// sends again. One bound for the whole call, reconnecting included; after a timeout
    /// the shared connection is replaced (a link that silently stopped answering).
    pub(crate) async fn exec<T: FromRedisValue>(
        &self,
        req: Req<'_>,
        route: Route<'_>,
        script: Option<&Lua>,
    ) -> Result<T> {
        let limit = self
            .settings
            .response_timeout
            .saturating_mul(2)
            .saturating_add(self.settings.connect_timeout);
        let mut handle = self.handle();
        let sent = tokio::time::timeout(limit, self.exec_once(&mut handle, req, route, script));
        match sent.await {
            Ok(Ok(value)) => Ok(T::from_redis_value(value).map_err(redis::RedisError::from)?),
            Ok(Err(e)) => {
                if e.is_timeout() {
                    self.replace_shared(&handle);
                }
                self.after_error(&e);
                Err(e.into())
            }
            Err(_) => {
                self.replace_shared(&handle);
                Err(Error::Timeout(limit))
            }
        }
    }

    async fn exec_once(
        &self,
        handle: &mut Handle,
        req: Req<'_>,
        route: Route<'_>,
        script: Option<&Lua>,
    ) -> redis::RedisResult<Value> {
        let mut result = handle.query(req, route).await;
        if let (Err(e), Some(script)) = (&result, script) {
            if is_noscript(e) {
                let load = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(script.code())
                    .to_owned();
                result = match handle.query(Req::Cmd(&load), route).await {
                    Ok(_) => handle.query(req, route).await,
                    Err(e) => Err(e),
                };
            }
        }
        result
    }

    fn handle(&self) -> Handle {
        match &self.kind {
            Kind::Master(link) => {
                let master = link.current();
                Handle::Master((*master.manager).clone(), master)
            }
            Kind::Cluster(c) => Handle::Cluster(
                c.conn.read().unwrap_or_else(|p| p.into_inner()).clone(),
                c.generation.load(Ordering::SeqCst),
            ),
        }
    }

    /// What an error says about the topology: a demoted master (`READONLY`) or a lost
    /// connection makes the sentinel watcher look again at once.
    fn after_error(&self, e: &redis::RedisError) {
        if let Kind::Master(link) = &self.kind {
            if let Some(watch) = &link.sentinel {
                // Redis 6.2 wraps a READONLY raised inside a script in an `ERR`.
                if crate::error::server_codes(e)
                    .iter()
                    .any(|c| c == "READONLY")
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                {
                    watch.kick.notify_one();
                }
            }
        }
    }

    /// Replaces the shared connection `used` (it timed out), unless another caller did.
    fn replace_shared(&self, used: &Handle) {
        match &self.kind {
            Kind::Master(link) => {
                let mut current = link.current.write().unwrap_or_else(|p| p.into_inner());
                if let Handle::Master(_, was) = used {
                    if !Arc::ptr_eq(&current, was) {
                        return;
                    }
                }
                match ConnectionManager::new_lazy_with_config(
                    current.client.clone(),
                    link.config.clone(),
                ) {
                    Ok(fresh) => {
                        tracing::warn!("redis did not answer in time; opening a new connection");
                        *current = Arc::new(Master {
                            node: current.node.clone(),
                            client: current.client.clone(),
                            manager: Arc::new(fresh),
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "could not open a new redis connection"),
                }
                if let Some(watch) = &link.sentinel {
                    watch.kick.notify_one();
                }
            }
            Kind::Cluster(c) => {
                // The cluster connection reconnects to failed nodes by itself; a fresh one
                // replaces it, in the background, only to drop links that hang silently.
                let Handle::Cluster(_, generation) = used else {
                    return;
                };
                // One replacement per generation, however many requests timed out on it.
                if c.generation
                    .compare_exchange(
                        *generation,
                        generation + 1,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_err()
                {
                    return;
                }
                let client = c.client.clone();
                let slot = Arc::clone(&c.conn);
                let limit = self.settings.connect_timeout.saturating_mul(3);
                tokio::spawn(async move {
                    if let Ok(Ok(fresh)) =
                        tokio::time::timeout(limit, client.get_async_connection()).await
                    {
                        tracing::warn!(
                            "redis did not answer in time; opened new cluster connections"
                        );
                        *slot.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                    }
                });
            }
        }
    }

    /// The masters, one entry per node (a single server or sentinel group has one).
    pub(crate) async fn masters(&self) -> Result<Vec<Node>> {
        match &self.kind {
            Kind::Master(link) => Ok(link.current().node.clone().into_iter().collect()),
            Kind::Cluster(c) => {
                self.refresh_slots().await?;
                let slots = c.slots.read().unwrap_or_else(|p| p.into_inner());
                let mut nodes: Vec<Node> = Vec::new();
                for (_, _, n) in slots.iter() {
                    if !nodes.contains(n) {
                        nodes.push(n.clone());
                    }
                }
                Ok(nodes)
            }
        }
    }

    /// Reads the slot map of the cluster (`CLUSTER SLOTS`).
    async fn refresh_slots(&self) -> Result<()> {
        let Kind::Cluster(c) = &self.kind else {
            return Ok(());
        };
        let cmd = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
        let mut handle = self.handle();
        let reply = tokio::time::timeout(self.settings.response_timeout, handle.query_random(&cmd))
            .await
            .map_err(|_| Error::Timeout(self.settings.response_timeout))??;
        let mut map = Vec::new();
        if let Value::Array(ranges) = reply {
            for range in ranges {
                let Value::Array(parts) = range else { continue };
                let (Some(start), Some(end), Some(master)) =
                    (parts.first(), parts.get(1), parts.get(2))
                else {
                    continue;
                };
                let start: i64 = FromRedisValue::from_redis_value(start.clone())
                    .map_err(redis::RedisError::from)?;
                let end: i64 = FromRedisValue::from_redis_value(end.clone())
                    .map_err(redis::RedisError::from)?;
                let Value::Array(addr) = master else { continue };
                let (Some(host), Some(port)) = (addr.first(), addr.get(1)) else {
                    continue;
                };
                let host: String = FromRedisValue::from_redis_value(host.clone())
                    .map_err(redis::RedisError::from)?;
                let port: i64 = FromRedisValue::from_redis_value(port.clone())
                    .map_err(redis::RedisError::from)?;
                map.push((
                    start as u16,
                    end as u16,
                    Node {
                        host,
                        port: port as u16,
                    },
                ));
            }
        }
        *c.slots.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// The master serving `key`'s slot (cluster), or the master.
    async fn node_for(&self, key: &str, fresh: bool) -> Result<Option<Node>> {
        match &self.kind {
            Kind::Master(link) => Ok(link.current().node.clone()),
            Kind::Cluster(c) => {
                let s = slot(key.as_bytes());
                let find = || {
                    c.slots
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .find(|(a, b, _)| *a <= s && s <= *b)
                        .map(|(_, _, n)| n.clone())
                };
                if !fresh {
                    if let Some(n) = find() {
                        return Ok(Some(n));
                    }
                }
                self.refresh_slots().await?;
                find().map(Some).ok_or_else(|| {
                    Error::Config(format!("no master of the cluster serves slot {s}"))
                })
            }
        }
    }

    /// Groups wake-up keys that one blocking call may wait on together: all of them on one
    /// server, the keys of one slot on a cluster.
    pub(crate) fn wait_groups(&self, keys: &[String]) -> Vec<Vec<String>> {
        if !self.is_cluster() {
            return vec![keys.to_vec()];
        }
        let mut groups: Vec<(u16, Vec<String>)> = Vec::new();
        for k in keys {
            let s = slot(k.as_bytes());
            match groups.iter_mut().find(|(g, _)| *g == s) {
                Some((_, v)) => v.push(k.clone()),
                None => groups.push((s, vec![k.clone()])),
            }
        }
        groups.into_iter().map(|(_, v)| v).collect()
    }

    /// A new dedicated connection to the master that serves `key`, for a blocking wait;
    /// with the node it goes to and the master epoch it was opened in.
    pub(crate) async fn blocking_connection(
        &self,
        key: &str,
        fresh: bool,
    ) -> Result<(MultiplexedConnection, Option<Node>, u64)> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(None);
        let (client, node, epoch) = match &self.kind {
            Kind::Master(link) => {
                let m = link.current();
                (
                    m.client.clone(),
                    m.node.clone(),
                    link.epoch.load(Ordering::SeqCst),
                )
            }
            Kind::Cluster(c) => {
                let node = self.node_for(key, fresh).await?;
                let url = c.template.url(
                    node.as_ref()
                        .ok_or_else(|| Error::Config("no node for a blocking wait".into()))?,
                );
                (open_client(&url, &self.settings)?, node, 0)
            }
        };
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok((conn, node, epoch))
    }

    /// The current master epoch: a dedicated connection opened in an older one points at a
    /// master Sentinel replaced.
    pub(crate) fn epoch(&self) -> u64 {
        match &self.kind {
            Kind::Master(link) => link.epoch.load(Ordering::SeqCst),
            Kind::Cluster(_) => 0,
        }
    }

    /// Ends the blocking call of the client with this id on `node`; true if it was blocked.
    pub(crate) async fn unblock(&self, node: Option<&Node>, client_id: u64) -> Result<bool> {
        let cmd = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(client_id)
            .to_owned();
        let answer: i64 = match (&self.kind, node) {
            (Kind::Cluster(_), Some(node)) => {
                self.exec(Req::Cmd(&cmd), Route::Node(node), None).await?
            }
            (Kind::Cluster(_), None) => return Ok(false),
            (Kind::Master(_), _) => self.exec(Req::Cmd(&cmd), Route::Key(""), None).await?,
        };
        Ok(answer == 1)
    }

    /// Sends `cmd` (a script call) to the master serving `key` on a dedicated connection,
    /// followed by `WAIT replicas timeout`: the reply only once that many replicas have the
    /// write, else [`Error::NotReplicated`] (the write is on the master, not confirmed
    /// elsewhere).
    pub(crate) async fn exec_replicated<T: FromRedisValue>(
        &self,
        cmd: &Cmd,
        key: &str,
        script: &Lua,
        replicas: usize,
        timeout: Duration,
    ) -> Result<T> {
        let limit = self
            .settings
            .response_timeout
            .saturating_mul(2)
            .saturating_add(self.settings.connect_timeout)
            .saturating_add(timeout);
        let run = async {
            let mut fresh = false;
            for _ in 0..3 {
                let node = self.node_for(key, fresh).await?;
                let mut conn = match self.replicated_conn(&node).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        self.forget_slots();
                        if let Kind::Master(link) = &self.kind {
                            if let Some(watch) = &link.sentinel {
                                watch.kick.notify_one();
                            }
                        }
                        return Err(e);
                    }
                };
                // A small write after the script, in its slot: WAIT waits for this
                // connection's last write, and a script that writes nothing (a publish sent
                // again after a lost reply finds its message stored) would otherwise be
                // confirmed at once, though the first sending's write may not be replicated.
                // The replication stream is one per master, so confirming this write
                // confirms every write before it.
                let barrier = match key.find('}') {
                    Some(i) => format!("{}:wait", &key[..=i]),
                    None => format!("{key}:wait"),
                };
                let mut pipe = redis::pipe();
                pipe.add_command(cmd.clone())
                    .cmd("SET")
                    .arg(&barrier)
                    .arg(1)
                    .arg("PX")
                    .arg(60_000)
                    .cmd("WAIT")
                    .arg(replicas)
                    .arg(timeout.as_millis() as u64);
                let mut sent: redis::RedisResult<(Value, Value, i64)> =
                    pipe.query_async(&mut conn).await;
                if let Err(e) = &sent {
                    if is_noscript(e) {
                        let load = redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(script.code())
                            .to_owned();
                        sent = match load.query_async::<String>(&mut conn).await {
                            Ok(_) => pipe.query_async(&mut conn).await,
                            Err(e) => Err(e),
                        };
                    }
                }
                match sent {
                    Ok((value, _, acked)) => {
                        self.put_replicated_conn(node, conn);
                        let acked = usize::try_from(acked).unwrap_or(0);
                        if acked < replicas {
                            return Err(Error::NotReplicated {
                                acked,
                                wanted: replicas,
                            });
                        }
                        return Ok(T::from_redis_value(value).map_err(redis::RedisError::from)?);
                    }
                    Err(e) if is_moved(&e) => {
                        // The slot moved: ask the cluster where it is now.
                        fresh = true;
                    }
                    Err(e) => {
                        self.after_error(&e);
                        // A node that failed may not be the slot's master any more: the
                        // next replicated write looks the master up again.
                        self.forget_slots();
                        return Err(e.into());
                    }
                }
            }
            Err(Error::Config(format!(
                "the slot of {key} kept moving while a replicated write was sent"
            )))
        };
        match tokio::time::timeout(limit, run).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(limit)),
        }
    }

    /// Drops the cached slot map: the next lookup asks the cluster.
    fn forget_slots(&self) {
        if let Kind::Cluster(c) = &self.kind {
            c.slots.write().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    async fn replicated_conn(&self, node: &Option<Node>) -> Result<MultiplexedConnection> {
        let pooled = self
            .replicated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(node)
            .and_then(Vec::pop);
        if let Some(conn) = pooled {
            return Ok(conn);
        }
        let client = match (&self.kind, node) {
            (Kind::Cluster(c), Some(n)) => open_client(&c.template.url(n), &self.settings)?,
            (Kind::Master(link), _) => link.current().client.clone(),
            (Kind::Cluster(_), None) => {
                return Err(Error::Config("no node for a replicated write".into()))
            }
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(None);
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    fn put_replicated_conn(&self, node: Option<Node>, conn: MultiplexedConnection) {
        let mut pool = self.replicated.lock().unwrap_or_else(|p| p.into_inner());
        let list = pool.entry(node).or_default();
        // Enough for the replicated writes a client has in flight at once; more are closed.
        if list.len() < 32 {
            list.push(conn);
        }
    }
}

impl MasterLink {
    fn current(&self) -> Arc<Master> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A connection handle for one request, with what it was taken from (to replace that, and
/// only that, when it stops answering).
enum Handle {
    Master(ConnectionManager, Arc<Master>),
    Cluster(ClusterConnection, u64),
}

impl Handle {
    /// Sends a request; an error reply (also one inside a pipeline's answers) is an `Err`.
    async fn query(&mut self, req: Req<'_>, route: Route<'_>) -> redis::RedisResult<Value> {
        self.query_raw(req, route).await?.extract_error()
    }

    async fn query_raw(&mut self, req: Req<'_>, route: Route<'_>) -> redis::RedisResult<Value> {
        match self {
            Handle::Master(conn, _) => match req {
                Req::Cmd(c) => c.query_async(conn).await,
                Req::Pipe(p) => p.query_async(conn).await,
            },
            Handle::Cluster(conn, _) => {
                let target = match route {
                    Route::Key(key) => SingleNodeRoutingInfo::SpecificNode(SlotRoute::new(
                        slot(key.as_bytes()),
                        SlotAddr::Master,
                    )),
                    Route::Node(node) => SingleNodeRoutingInfo::ByAddress {
                        host: node.host.clone(),
                        port: node.port,
                    },
                };
                match req {
                    Req::Cmd(c) => {
                        conn.route_command(c.clone(), RoutingInfo::SingleNode(target))
                            .await
                    }
                    Req::Pipe(p) => {
                        let n = p.len();
                        conn.route_pipeline(p.clone(), 0, n, target)
                            .await
                            .map(Value::Array)
                    }
                }
            }
        }
    }

    async fn query_random(&mut self, cmd: &Cmd) -> redis::RedisResult<Value> {
        match self {
            Handle::Master(conn, _) => cmd.query_async(conn).await,
            Handle::Cluster(conn, _) => {
                conn.route_command(
                    cmd.clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                )
                .await
            }
        }
    }
}

impl SentinelWatch {
    /// The master the sentinels name, checked with `ROLE`: the first sentinel that answers
    /// with a master that says it is one.
    async fn resolve(&self, settings: &ConnSettings) -> Result<(Node, redis::Client)> {
        let mut problems = Vec::new();
        for sentinel in &self.sentinels {
            match self.ask(sentinel, settings).await {
                Ok(node) => {
                    let client = open_client(&self.template.url(&node), settings)?;
                    match role(&client, settings).await {
                        Ok(role) if role == "master" => return Ok((node, client)),
                        Ok(role) => problems.push(format!("{node} says it is a {role}")),
                        Err(e) => problems.push(format!("master {node}: {e}")),
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        Err(Error::Connect(format!(
            "no sentinel named a reachable master {:?}: {}",
            self.name,
            problems.join("; ")
        )))
    }

    async fn ask(&self, sentinel: &redis::Client, settings: &ConnSettings) -> Result<Node> {
        let at = sentinel.get_connection_info().addr().to_string();
        let query = async {
            let mut conn = sentinel.get_multiplexed_async_connection().await?;
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.name)
                .query_async(&mut conn)
                .await?;
            Ok::<_, Error>(addr)
        };
        match tokio::time::timeout(settings.connect_timeout + settings.response_timeout, query)
            .await
        {
            Ok(Ok(Some((host, port)))) => Ok(Node { host, port }),
            Ok(Ok(None)) => Err(Error::Connect(format!(
                "sentinel {at} knows no master named {:?}",
                self.name
            ))),
            Ok(Err(e)) => Err(Error::Connect(format!("sentinel {at}: {e}"))),
            Err(_) => Err(Error::Connect(format!("sentinel {at} did not answer"))),
        }
    }
}

/// The `ROLE` of a node: "master", "slave" or "sentinel".
async fn role(client: &redis::Client, settings: &ConnSettings) -> Result<String> {
    let query = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let role: Value = redis::cmd("ROLE").query_async(&mut conn).await?;
        match role {
            Value::Array(parts) => match parts.into_iter().next() {
                Some(v) => Ok(String::from_redis_value(v).map_err(redis::RedisError::from)?),
                None => Ok(String::new()),
            },
            other => Err(Error::Protocol(format!("ROLE answered {other:?}"))),
        }
    };
    tokio::time::timeout(settings.connect_timeout + settings.response_timeout, query)
        .await
        .map_err(|_| Error::Timeout(settings.connect_timeout + settings.response_timeout))?
}

/// Follows the master of a sentinel group: once a second (and at once when a request saw
/// `READONLY` or a lost connection) asks the sentinels which node is master and checks the
/// current one's `ROLE`; when they differ, the shared connection is moved to the new
/// master and dedicated connections reconnect. Ends when the client is dropped.
async fn watch_sentinels(link: Weak<MasterLink>, settings: ConnSettings) {
    let mut sentinel_conn: Option<(usize, MultiplexedConnection)> = None;
    let mut next_sentinel = 0;
    loop {
        let Some(strong) = link.upgrade() else { return };
        let Some(watch) = &strong.sentinel else {
            return;
        };
        let kicked = tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => false,
            () = watch.kick.notified() => true,
        };
        let current = strong.current();
        // ROLE on the shared connection: no connection of its own once a second.
        let mut shared = (*current.manager).clone();
        let role = tokio::time::timeout(
            settings.response_timeout,
            redis::cmd("ROLE").query_async::<Value>(&mut shared),
        )
        .await;
        let demoted = match role {
            Ok(Ok(Value::Array(parts))) => !matches!(
                parts.first(),
                Some(Value::BulkString(b)) if b.as_slice() == b"master"
            ),
            _ => kicked,
        };
        // Which node the sentinels name: on the connection kept from last time, else on
        // the next sentinel that answers.
        let mut named = None;
        let count = watch.sentinels.len();
        for attempt in 0..count {
            let (i, mut conn) = match sentinel_conn.take() {
                Some(kept) => kept,
                None => {
                    let i = (next_sentinel + attempt) % count;
                    let connect = watch.sentinels[i].get_multiplexed_async_connection();
                    match tokio::time::timeout(settings.connect_timeout, connect).await {
                        Ok(Ok(conn)) => (i, conn),
                        _ => continue,
                    }
                }
            };
            let ask = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&watch.name)
                .to_owned();
            let answer = tokio::time::timeout(
                settings.response_timeout,
                ask.query_async::<Option<(String, u16)>>(&mut conn),
            )
            .await;
            if let Ok(Ok(Some((host, port)))) = answer {
                named = Some(Node { host, port });
                sentinel_conn = Some((i, conn));
                break;
            }
            next_sentinel = i + 1;
        }
        let moved = named
            .as_ref()
            .is_some_and(|n| Some(n) != current.node.as_ref());
        if !(moved || demoted) {
            continue;
        }
        match watch.resolve(&settings).await {
            Ok((node, client)) if Some(&node) != current.node.as_ref() || demoted => {
                match ConnectionManager::new_lazy_with_config(client.clone(), strong.config.clone())
                {
                    Ok(manager) => {
                        tracing::warn!(
                            master = %watch.name,
                            from = %current.node.as_ref().map(ToString::to_string).unwrap_or_default(),
                            to = %node,
                            "sentinel: the master moved; switching to it"
                        );
                        *strong.current.write().unwrap_or_else(|p| p.into_inner()) =
                            Arc::new(Master {
                                node: Some(node),
                                client,
                                manager: Arc::new(manager),
                            });
                        strong.epoch.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "sentinel: could not connect to the new master")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sentinel: no master to switch to yet"),
        }
    }
}

/// What the first seed that answers says of the cluster, when it is not `ok`.
async fn cluster_state_of(
    seeds: &[Node],
    template: &NodeTemplate,
    settings: &ConnSettings,
) -> Option<String> {
    for node in seeds {
        let Ok(client) = open_client(&template.url(node), settings) else {
            continue;
        };
        let probe = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async::<String>(&mut conn)
                .await
        };
        let limit = settings.connect_timeout + settings.response_timeout;
        if let Ok(Ok(info)) = tokio::time::timeout(limit, probe).await {
            let state = info
                .lines()
                .find_map(|l| l.strip_prefix("cluster_state:"))
                .map(str::trim)
                .unwrap_or("unknown")
                .to_owned();
            if state != "ok" {
                return Some(format!(
                    "the Redis Cluster is not usable: node {node} says cluster_state:{state} (are all slots covered by a reachable master?)"
                ));
            }
            return None;
        }
    }
    None
}

fn list(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        || e.to_string().contains("NOSCRIPT")
}

/// The slot is served elsewhere now: ask the cluster where.
fn is_moved(e: &redis::RedisError) -> bool {
    crate::error::server_codes(e)
        .iter()
        .any(|c| c == "MOVED" || c == "ASK")
}

/// A `redis::Client` for one server's URL, with the TLS settings when there are some.
#[cfg(feature = "tls")]
pub(crate) fn open_client(url: &str, settings: &ConnSettings) -> Result<redis::Client> {
    if url.starts_with("rediss") || settings.tls_ca.is_some() {
        install_crypto_provider();
    }
    if settings.tls_ca.is_some() || settings.tls_client.is_some() {
        Ok(redis::Client::build_with_tls(
            url,
            tls_certificates(settings),
        )?)
    } else {
        Ok(redis::Client::open(url)?)
    }
}

/// rustls needs a process-wide crypto provider: ring's, unless the application chose one.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(feature = "tls")]
fn tls_certificates(settings: &ConnSettings) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: settings
            .tls_client
            .clone()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert,
                client_key: key,
            }),
        root_cert: settings.tls_ca.clone(),
    }
}

/// A `redis::Client` for one server's URL; this build has no TLS.
#[cfg(not(feature = "tls"))]
pub(crate) fn open_client(url: &str, settings: &ConnSettings) -> Result<redis::Client> {
    if url.starts_with("rediss") || settings.tls_ca.is_some() || settings.tls_client.is_some() {
        return Err(no_tls());
    }
    Ok(redis::Client::open(url)?)
}

#[cfg(not(feature = "tls"))]
fn no_tls() -> Error {
    Error::Config(
        "this build of forgemq has no TLS: enable the crate's `tls` feature for rediss:// URLs"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"mq:{order.paid}:pending"), slot(b"order.paid"));
        assert_eq!(slot(b"a{}b"), crc16(b"a{}b") % SLOTS);
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn redis_versions_parse_and_compare() {
        assert_eq!(parse_version("7.0.15"), Some((7, 0, 15)));
        assert_eq!(parse_version("6.2.14"), Some((6, 2, 14)));
        assert_eq!(parse_version("7.4.0-rc1"), Some((7, 4, 0)));
        assert_eq!(parse_version("8"), Some((8, 0, 0)));
        assert_eq!(parse_version("unknown"), None);
        assert!(parse_version("6.0.9").unwrap() < MIN_VERSION);
        assert!(parse_version("5.0.14").unwrap() < MIN_VERSION);
        assert!(parse_version("6.2.0").unwrap() >= MIN_VERSION);
        assert!(parse_version("10.0.0").unwrap() >= MIN_VERSION);
    }

    #[test]
    fn urls_parse_into_topologies() {
        let t = Topology::parse("redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001").unwrap();
        let Topology::Cluster { seeds, template } = t else {
            panic!()
        };
        assert_eq!(seeds.len(), 2);
        assert_eq!(template.url(&seeds[1]), "redis://u:p%40ss@10.0.0.2:7001/");
        let t =
            Topology::parse("rediss+sentinel://:pw@[::1]:26379,h2/mymaster?sentinel_password=s")
                .unwrap();
        let Topology::Sentinel {
            sentinels,
            master,
            template,
            sentinel_password,
        } = t
        else {
            panic!()
        };
        assert_eq!(master, "mymaster");
        assert_eq!(sentinels[0].to_string(), "[::1]:26379");
        assert_eq!(sentinels[1].port, 26379);
        assert!(template.tls);
        assert_eq!(sentinel_password.as_deref(), Some("s"));
        assert!(matches!(
            Topology::parse("redis://127.0.0.1:6379/2").unwrap(),
            Topology::Single { .. }
        ));
        for bad in [
            "127.0.0.1:6379",
            "http://x",
            "redis+cluster://",
            "redis+cluster://h:0",
            "redis+cluster://h:notaport",
            "redis+cluster://h:1/3",
            "redis+sentinel://h:1",
            "redis+sentinel://h:1/m?x=1",
            "redis+cluster://h:1,,h:2",
        ] {
            let e = Topology::parse(bad).unwrap_err().to_string();
            assert!(e.contains("bad Redis URL"), "{bad}: {e}");
        }
        // The password is never in the message.
        let e = Topology::parse("redis+cluster://u:secret@h:x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
