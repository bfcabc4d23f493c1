//! A real Sentinel group per test: a master, its replicas and three sentinels (quorum 2),
//! every one its own process on free ports; the sentinels mark a master down after 1 s.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::server::{free_port, RedisOptions, RedisServer};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "forgemq";

/// How long the group may take to form.
const FORM_DEADLINE: Duration = Duration::from_secs(30);

/// A master, its replicas and three sentinels, killed when dropped.
#[derive(Debug)]
pub struct TestSentinel {
    /// The data nodes: index 0 was the master at the start.
    nodes: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
}

#[derive(Debug)]
struct SentinelProcess {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestSentinel {
    /// A master with one replica, and three sentinels.
    pub fn start() -> TestSentinel {
        Self::start_with(1, RedisOptions::new())
    }

    /// A master with `replicas` replicas (each node with `options`), and three sentinels.
    ///
    /// Panics (with logs) if the group is not ready within 30 s: every sentinel sees the
    /// master, its replicas and the other sentinels, and `WAIT` confirms replication.
    pub fn start_with(replicas: usize, options: RedisOptions) -> TestSentinel {
        let master = RedisServer::start_with(options.clone());
        let mut nodes = vec![master];
        let master_port = nodes[0].port();
        for _ in 0..replicas {
            // Host and port as two arguments: Redis 6.2 refuses `--replicaof "host port"`.
            nodes.push(RedisServer::start_with(options.clone().args([
                "--replicaof".to_owned(),
                "127.0.0.1".to_owned(),
                master_port.to_string(),
            ])));
        }
        let sentinels = (0..3)
            .map(|_| SentinelProcess::spawn(master_port))
            .collect();
        let group = TestSentinel { nodes, sentinels };
        group.wait_ready(replicas);
        group
    }

    fn wait_ready(&self, replicas: usize) {
        let deadline = Instant::now() + FORM_DEADLINE;
        loop {
            let ready = self.sentinels.iter().all(|s| {
                let Ok(mut conn) = s.conn() else { return false };
                let info: redis::RedisResult<Vec<String>> = redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(MASTER_NAME)
                    .query(&mut conn);
                let Ok(info) = info else { return false };
                let field = |name: &str| {
                    info.chunks(2)
                        .find(|kv| kv[0] == name)
                        .and_then(|kv| kv.get(1))
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0)
                };
                field("num-slaves") >= replicas && field("num-other-sentinels") >= 2
            });
            let replicated = replicas == 0 || {
                let mut conn = self.nodes[0].conn();
                let _: redis::RedisResult<()> = redis::cmd("SET")
                    .arg("forgemq-test-probe")
                    .arg(1)
                    .query(&mut conn);
                redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(500)
                    .query::<i64>(&mut conn)
                    .unwrap_or(0)
                    >= replicas as i64
            };
            if ready && replicated {
                let _: redis::RedisResult<()> = redis::cmd("DEL")
                    .arg("forgemq-test-probe")
                    .query(&mut self.nodes[0].conn());
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the sentinel group was not ready within {FORM_DEADLINE:?}\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The log tails of every process, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push(format!("--- redis {} ---\n{}", n.port(), n.log_tail(20)));
        }
        for s in &self.sentinels {
            let log = fs::read_to_string(s.dir.path().join("sentinel.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            out.push(format!(
                "--- sentinel {} ---\n{}",
                s.port,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        out.join("\n")
    }

    /// The URL for ForgeMQ: `redis+sentinel://` with the three sentinels.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The data nodes; index 0 was the master at the start.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One data node, to kill it.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The index of the node the sentinels name as master now.
    pub fn master(&self) -> usize {
        for s in &self.sentinels {
            let Ok(mut conn) = s.conn() else { continue };
            let addr: redis::RedisResult<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(MASTER_NAME)
                .query(&mut conn);
            if let Ok((_, port)) = addr {
                if let Some(i) = self.nodes.iter().position(|n| n.port() == port) {
                    return i;
                }
            }
        }
        panic!("no sentinel names a master\n{}", self.logs());
    }

    /// A manual failover (`SENTINEL FAILOVER`): a replica becomes master while the old
    /// master still runs (and, for a few seconds, still accepts writes).
    pub fn failover(&self) {
        let mut conn = self.sentinels[0]
            .conn()
            .unwrap_or_else(|e| panic!("sentinel: {e}"));
        redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(MASTER_NAME)
            .exec(&mut conn)
            .unwrap_or_else(|e| panic!("SENTINEL FAILOVER: {e}"));
    }

    /// Waits until the sentinels name a master other than node `old` and that node says it
    /// is a master.
    pub fn wait_for_new_master(&self, old: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let now = self.master();
            if now != old {
                let role: redis::RedisResult<redis::Value> =
                    redis::cmd("ROLE").query(&mut self.nodes[now].conn());
                if let Ok(redis::Value::Array(parts)) = role {
                    if matches!(parts.first(), Some(redis::Value::BulkString(b)) if b == b"master")
                    {
                        return now;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "no failover away from node {old} within {within:?}\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl SentinelProcess {
    fn spawn(master_port: u16) -> SentinelProcess {
        let dir = tempfile::Builder::new()
            .prefix("forgemq-sentinel-")
            .tempdir()
            .expect("cannot create a temporary directory for a sentinel");
        let port = free_port();
        let conf: PathBuf = dir.path().join("sentinel.conf");
        fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\nlogfile {}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 10000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir.path().display(),
                dir.path().join("sentinel.log").display()
            ),
        )
        .expect("cannot write sentinel.conf");
        let child = Command::new(crate::server::redis_server_binary())
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn redis-server --sentinel: {e}"));
        let process = SentinelProcess { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while process.conn().is_err() {
            assert!(
                Instant::now() < deadline,
                "sentinel on port {port} did not start"
            );
            thread::sleep(Duration::from_millis(20));
        }
        process
    }

    fn conn(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_millis(500))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        redis::cmd("PING").exec(&mut conn)?;
        Ok(conn)
    }
}
