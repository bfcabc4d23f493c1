//! Test helpers for ForgeMQ.
//!
//! - [`RedisServer`]: a private `redis-server` per test (own port, own
//!   temporary directory), which can be killed with SIGKILL, restarted on the
//!   same port and data, or frozen with SIGSTOP, so crash and stall scenarios
//!   are testable without disturbing other tests. It can also serve TLS on a
//!   second port ([`RedisOptions::tls`]) and create ACL users
//!   ([`RedisServer::acl_setuser`], [`RedisServer::url_as`]).
//! - [`TestCluster`]: a real Redis Cluster (masters and replicas, each a `redis-server`
//!   process) and [`TestSentinel`]: a master, its replicas and three sentinels, for the
//!   scale-out and failover tests.
//! - [`check_invariants`] / [`assert_none_lost`]: read ForgeMQ's keys and fail
//!   loudly if a message is in two states, lost its body or lease, or vanished
//!   without being processed. They restate the key layout on purpose (see
//!   [`Layout`]) and do not depend on the `forgemq` crate, which uses this
//!   crate as a dev-dependency.
//!
//! `redis-server` (6.2 or 7.x) must be on `PATH`, or named by `$REDIS_SERVER`
//! ([`redis_server_binary`]).
//!
//! ```
//! use forgemq_test_support::{check_invariants, Aof, Layout, RedisOptions, RedisServer, State};
//!
//! let mut server = RedisServer::start_with(RedisOptions::new().aof(Aof::Always));
//! let mut conn = server.conn();
//! let layout = Layout::new("mq", "emails");
//! redis::cmd("HSET").arg(layout.msg()).arg("m1").arg("{}").exec(&mut conn).unwrap();
//! redis::cmd("RPUSH").arg(layout.pending()).arg("m1").exec(&mut conn).unwrap();
//! // One pending entry, ready since 1,000 ms after the epoch (see `Layout::runs`).
//! redis::cmd("RPUSH").arg(layout.runs()).arg("1 1000").exec(&mut conn).unwrap();
//!
//! // A crash keeps everything that was fsynced.
//! server.kill9();
//! server.restart();
//! let report = check_invariants(&mut server.conn(), &layout, &["m1".to_owned()]);
//! assert_eq!(report.state_of("m1"), Some(State::Pending));
//! ```

mod cluster;
mod invariants;
mod sentinel;
mod server;
mod wait;

pub use cluster::{key_slot, TestCluster};
pub use invariants::{
    assert_none_lost, check_invariants, Layout, State, StateReport, DEFAULT_NAMESPACE,
};
pub use sentinel::{TestSentinel, MASTER_NAME};
pub use server::{
    free_cluster_port, free_port, redis_server_binary, server_supports_tls, Aof, RedisOptions,
    RedisServer, TlsFiles, REDIS_SERVER_ENV,
};
pub use wait::eventually;
