//! A real Redis Cluster per test: `masters` masters with `replicas` replicas each, every
//! node its own `redis-server` process on free ports (below 55535, since a node's cluster
//! bus listens on port + 10000), joined with `CLUSTER MEET` and `CLUSTER ADDSLOTS`.
//!
//! Ready when every node says `cluster_state:ok` and, with replicas, `WAIT 1` on every
//! master returns 1.

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use crate::server::{RedisOptions, RedisServer};

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// How long a cluster may take to form.
const FORM_DEADLINE: Duration = Duration::from_secs(30);

/// A Redis Cluster of private `redis-server` processes, killed when dropped.
#[derive(Debug)]
pub struct TestCluster {
    nodes: Vec<RedisServer>,
    masters: usize,
}

impl TestCluster {
    /// Starts `masters` masters, each with `replicas` replicas, without persistence.
    ///
    /// Panics (with the nodes' logs) if the cluster does not form within 30 s.
    pub fn start(masters: usize, replicas: usize) -> TestCluster {
        Self::start_with(masters, replicas, RedisOptions::new())
    }

    /// As [`TestCluster::start`], every node with `options` (e.g. AOF for crash tests).
    pub fn start_with(masters: usize, replicas: usize, options: RedisOptions) -> TestCluster {
        assert!(masters > 0, "a cluster needs a master");
        let options = options.cluster_node();
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| RedisServer::start_with(options.clone()))
            .collect();
        let cluster = TestCluster { nodes, masters };
        cluster.form(replicas);
        cluster
    }

    fn form(&self, replicas: usize) {
        // Slots: equal contiguous ranges, as `redis-cli --cluster create` assigns them.
        for m in 0..self.masters {
            let (start, end) = self.slot_range(m);
            let slots: Vec<u16> = (start..=end).collect();
            redis::cmd("CLUSTER")
                .arg("ADDSLOTS")
                .arg(slots)
                .exec(&mut self.nodes[m].conn())
                .unwrap_or_else(|e| panic!("CLUSTER ADDSLOTS on master {m}: {e}"));
        }
        let mut first = self.nodes[0].conn();
        for node in &self.nodes[1..] {
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port())
                .exec(&mut first)
                .unwrap_or_else(|e| panic!("CLUSTER MEET 127.0.0.1:{}: {e}", node.port()));
        }
        self.wait_for("every node to know every other", |c| {
            c.known_nodes().into_iter().all(|n| n == c.nodes.len())
        });
        // Replicas: node masters + r * masters + m replicates master m.
        for r in 0..replicas {
            for m in 0..self.masters {
                let replica = self.masters + r * self.masters + m;
                let master_id = self.node_id(m);
                redis::cmd("CLUSTER")
                    .arg("REPLICATE")
                    .arg(&master_id)
                    .exec(&mut self.nodes[replica].conn())
                    .unwrap_or_else(|e| panic!("CLUSTER REPLICATE on node {replica}: {e}"));
            }
        }
        self.wait_ok();
        if replicas > 0 {
            self.wait_for("every master to have its replicas in sync", |c| {
                (0..c.masters).all(|m| {
                    let mut conn = c.nodes[m].conn();
                    let _: redis::RedisResult<()> = redis::cmd("SET")
                        .arg(c.key_of_master(m))
                        .arg(1)
                        .query(&mut conn);
                    let acked: i64 = redis::cmd("WAIT")
                        .arg(replicas)
                        .arg(500)
                        .query(&mut conn)
                        .unwrap_or(0);
                    let _: redis::RedisResult<()> =
                        redis::cmd("DEL").arg(c.key_of_master(m)).query(&mut conn);
                    acked >= replicas as i64
                })
            });
        }
    }

    /// The slots master `m` was given when the cluster formed.
    pub fn slot_range(&self, m: usize) -> (u16, u16) {
        let per = SLOTS as usize / self.masters;
        let start = (m * per) as u16;
        let end = if m + 1 == self.masters {
            SLOTS - 1
        } else {
            ((m + 1) * per - 1) as u16
        };
        (start, end)
    }

    /// A key that hashes into the slots master `m` was given.
    fn key_of_master(&self, m: usize) -> String {
        let (start, end) = self.slot_range(m);
        (0..)
            .map(|i| format!("forgemq-test-probe-{i}"))
            .find(|k| (start..=end).contains(&key_slot(k.as_bytes())))
            .unwrap_or_default()
    }

    /// Waits until every running node says `cluster_state:ok` and agrees on the masters.
    ///
    /// Panics with the nodes' log tails after 30 s.
    pub fn wait_ok(&self) {
        self.wait_for("cluster_state:ok on every node", |c| {
            c.nodes.iter().filter(|n| n.is_running()).all(|n| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut n.conn())
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            })
        });
    }

    fn wait_for(&self, what: &str, mut ready: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + FORM_DEADLINE;
        loop {
            if ready(self) {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- node {} ---\n{}", n.port(), n.log_tail(20)))
                    .collect();
                panic!(
                    "the test cluster was not ready within {FORM_DEADLINE:?}: waiting for {what}\n{}",
                    logs.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn known_nodes(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| {
                let text: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query(&mut n.conn())
                    .unwrap_or_default();
                text.lines().filter(|l| !l.contains("handshake")).count()
            })
            .collect()
    }

    fn node_id(&self, i: usize) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.nodes[i].conn())
            .unwrap_or_else(|e| panic!("CLUSTER MYID on node {i}: {e}"))
    }

    /// The URL of the cluster for ForgeMQ: `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Every node, masters first (then the replicas of masters 0, 1, … in turn).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// One node, to kill or freeze it.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// How many masters the cluster was formed with.
    pub fn master_count(&self) -> usize {
        self.masters
    }

    /// The index of the node that is master of `slot` now (after failovers too).
    pub fn master_of_slot(&self, slot: u16) -> usize {
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.is_running() {
                continue;
            }
            let Ok(slots) = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query::<redis::Value>(&mut n.conn())
            else {
                continue;
            };
            let redis::Value::Array(ranges) = slots else {
                continue;
            };
            for range in ranges {
                let redis::Value::Array(parts) = range else {
                    continue;
                };
                let num = |v: Option<&redis::Value>| match v {
                    Some(redis::Value::Int(x)) => *x,
                    _ => -1,
                };
                let (start, end) = (num(parts.first()), num(parts.get(1)));
                if !(start..=end).contains(&i64::from(slot)) {
                    continue;
                }
                if let Some(redis::Value::Array(addr)) = parts.get(2) {
                    let port = num(addr.get(1));
                    if let Some(j) = self.nodes.iter().position(|n| i64::from(n.port()) == port) {
                        return j;
                    }
                }
            }
            let _ = i;
        }
        panic!("no running node knows the master of slot {slot}");
    }

    /// The index of the master of `key`'s slot now.
    pub fn master_of(&self, key: &str) -> usize {
        self.master_of_slot(key_slot(key.as_bytes()))
    }

    /// A plain connection to the master of `key`'s slot, for a `MULTI` on one slot's keys
    /// (the invariant checker) or commands about one topic.
    pub fn conn_for_key(&self, key: &str) -> redis::Connection {
        self.nodes[self.master_of(key)].conn()
    }

    /// A connection that routes every command by its key, as a cluster client does.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.url())
            .collect();
        redis::cluster::ClusterClient::new(seeds)
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("cannot connect to the test cluster: {e}"))
    }

    /// Calls per command, summed over the masters (`INFO commandstats`).
    pub fn command_stats(&self) -> HashMap<String, u64> {
        let mut total = HashMap::new();
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            let role: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut n.conn())
                .unwrap_or_default();
            if !role.contains("role:master") {
                continue;
            }
            for (k, v) in n.command_stats() {
                *total.entry(k).or_insert(0) += v;
            }
        }
        total
    }

    /// Moves `slot` (with its keys) from its master to the master at index `to`, as
    /// `redis-cli --cluster reshard` does: `SETSLOT IMPORTING/MIGRATING`, `MIGRATE` in
    /// batches, then `SETSLOT NODE` on both.
    pub fn move_slot(&self, slot: u16, to: usize) {
        let from = self.master_of_slot(slot);
        if from == to {
            return;
        }
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let mut src = self.nodes[from].conn();
        let mut dst = self.nodes[to].conn();
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&from_id)
            .exec(&mut dst)
            .unwrap_or_else(|e| panic!("SETSLOT IMPORTING: {e}"));
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&to_id)
            .exec(&mut src)
            .unwrap_or_else(|e| panic!("SETSLOT MIGRATING: {e}"));
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut src)
                .unwrap_or_else(|e| panic!("GETKEYSINSLOT: {e}"));
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.nodes[to].port())
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .exec(&mut src)
                .unwrap_or_else(|e| panic!("MIGRATE: {e}"));
        }
        for conn in [&mut dst, &mut src] {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&to_id)
                .exec(conn)
                .unwrap_or_else(|e| panic!("SETSLOT NODE: {e}"));
        }
        // The other masters learn it by gossip.
        for (i, n) in self.nodes.iter().enumerate() {
            if i != from && i != to && n.is_running() {
                let _: redis::RedisResult<()> = redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg("NODE")
                    .arg(&to_id)
                    .query(&mut n.conn());
            }
        }
    }
}

/// The hash slot of a key (CRC16-XMODEM of the key or its `{hash tag}`, mod 16384).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}
