//! Tests of the test helpers themselves: if these are wrong, every ForgeMQ
//! test built on them proves nothing.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::Command;
use std::time::Duration;

use forgemq_test_support::{
    assert_none_lost, check_invariants, Aof, Layout, RedisOptions, RedisServer, State, TlsFiles,
};

fn ping(conn: &mut redis::Connection) -> redis::RedisResult<String> {
    redis::cmd("PING").query(conn)
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Runs `f` and returns its panic message, failing the test if it did not panic.
fn panic_message(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("expected a panic");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// Whether a process with this pid exists (`kill -0`).
fn process_exists(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn start_answers_ping() {
    let server = RedisServer::start();
    assert_eq!(ping(&mut server.conn()).unwrap(), "PONG");
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );
    assert!(server.dir().is_dir());
    assert!(server.is_running());
    assert!(server.pid().is_some());
    assert!(server.log_tail(100).contains("Ready to accept connections"));

    // Off means no persistence at all.
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(save, ["save", ""]);
}

#[test]
fn kill9_makes_connections_fail() {
    let mut server = RedisServer::start();
    let mut conn = server.conn();
    let pid = server.pid().unwrap();
    server.kill9();
    assert!(!server.is_running());
    assert_eq!(server.pid(), None);
    assert!(!process_exists(pid));
    assert!(ping(&mut conn).is_err());
    assert!(server.client().get_connection().is_err());
}

#[test]
fn restart_with_aof_always_keeps_acknowledged_writes() {
    let mut server = RedisServer::start_with(RedisOptions::new().aof(Aof::Always));
    let port = server.port();
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .exec(&mut server.conn())
        .unwrap();
    server.kill9();
    server.restart();
    assert_eq!(server.port(), port);
    let value: Option<String> = redis::cmd("GET")
        .arg("k")
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(value.as_deref(), Some("v"));
}

#[test]
fn two_servers_are_isolated() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    redis::cmd("SET")
        .arg("k")
        .arg("a")
        .exec(&mut a.conn())
        .unwrap();
    let in_b: Option<String> = redis::cmd("GET").arg("k").query(&mut b.conn()).unwrap();
    assert_eq!(in_b, None);
}

#[test]
fn options_reach_the_server() {
    let server = RedisServer::start_with(
        RedisOptions::new()
            .maxmemory_policy("noeviction")
            .args(["--maxmemory", "10mb"]),
    );
    let mut conn = server.conn();
    let policy: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut conn)
        .unwrap();
    assert_eq!(policy[1], "noeviction");
    let maxmemory: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory")
        .query(&mut conn)
        .unwrap();
    assert_eq!(maxmemory[1], (10 * 1024 * 1024).to_string());
}

#[test]
fn sigstop_freezes_and_sigcont_resumes() {
    let mut server = RedisServer::start();
    let mut conn = server.conn();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    server.sigstop();
    assert!(server.is_running(), "a stopped server still exists");
    assert!(ping(&mut conn).is_err(), "a stopped server must not answer");
    server.sigcont();
    // The timed-out connection may hold the late reply; use a fresh one.
    assert_eq!(ping(&mut server.conn()).unwrap(), "PONG");
}

#[test]
fn command_stats_count_calls() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    for _ in 0..3 {
        redis::cmd("GET").arg("x").exec(&mut conn).unwrap();
    }
    let stats = server.command_stats();
    assert_eq!(stats.get("get"), Some(&3));
}

#[test]
fn drop_kills_the_server_even_when_panicking() {
    let mut pid = None;
    let message = panic_message(|| {
        let server = RedisServer::start();
        pid = server.pid();
        panic!("test failure inside");
    });
    assert_eq!(message, "test failure inside");
    assert!(!process_exists(pid.unwrap()));
}

// ---- invariant checker ----

/// Stores a body for each id, as ForgeMQ does on enqueue.
fn put_bodies(conn: &mut redis::Connection, layout: &Layout, ids: &[&str]) {
    for id in ids {
        redis::cmd("HSET")
            .arg(layout.msg())
            .arg(*id)
            .arg("{}")
            .exec(conn)
            .unwrap();
    }
}

/// A consistent topic with one message in each state: p pending, d delayed,
/// a active (with lease), x dead, g gone.
fn build_states(conn: &mut redis::Connection, layout: &Layout) {
    put_bodies(conn, layout, &["p", "d", "a", "x"]);
    redis::cmd("RPUSH")
        .arg(layout.pending())
        .arg("p")
        .exec(conn)
        .unwrap();
    // One tail entry, ready since 90 ms after the epoch.
    redis::cmd("RPUSH")
        .arg(layout.runs())
        .arg("1 90")
        .exec(conn)
        .unwrap();
    redis::cmd("ZADD")
        .arg(layout.delayed())
        .arg(100)
        .arg("d")
        .exec(conn)
        .unwrap();
    redis::cmd("ZADD")
        .arg(layout.active())
        .arg(100)
        .arg("a")
        .exec(conn)
        .unwrap();
    redis::cmd("HSET")
        .arg(layout.lease())
        .arg("a")
        .arg("token")
        .exec(conn)
        .unwrap();
    redis::cmd("ZADD")
        .arg(layout.dead())
        .arg(100)
        .arg("x")
        .exec(conn)
        .unwrap();
}

#[test]
fn layout_key_names() {
    let layout = Layout::new("mq", "emails");
    assert_eq!(layout.pending(), "mq:{emails}:pending");
    assert_eq!(layout.msg(), "mq:{emails}:msg");
    assert_eq!(layout.active(), "mq:{emails}:active");
    assert_eq!(layout.lease(), "mq:{emails}:lease");
    assert_eq!(layout.delayed(), "mq:{emails}:delayed");
    assert_eq!(layout.dead(), "mq:{emails}:dead");
    assert_eq!(Layout::with_default_namespace("emails"), layout);
}

#[test]
fn invariants_classify_states() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let layout = Layout::new("mq", "t");
    build_states(&mut conn, &layout);
    let all = ids(&["p", "d", "a", "x", "g"]);
    let report = check_invariants(&mut conn, &layout, &all);

    assert_eq!(report.state_of("p"), Some(State::Pending));
    assert_eq!(report.state_of("d"), Some(State::Delayed));
    assert_eq!(report.state_of("a"), Some(State::Active));
    assert_eq!(report.state_of("x"), Some(State::Dead));
    assert_eq!(report.state_of("g"), Some(State::Gone));
    assert_eq!(report.state_of("nope"), None);
    for state in State::ALL {
        assert_eq!(report.count(state), 1, "{state}");
    }
    assert_eq!(
        report.to_string(),
        "pending=1 delayed=1 active=1 dead=1 gone=1"
    );

    // g was processed; anything else gone would be lost.
    assert_none_lost(&report, &HashSet::from(["g".to_owned()]));
    let message = panic_message(|| assert_none_lost(&report, &HashSet::new()));
    assert!(
        message.contains("1 message(s) lost") && message.contains("\"g\""),
        "{message}"
    );

    // Another topic's keys are none of this topic's business.
    let empty = check_invariants(&mut conn, &Layout::new("mq", "other"), &all);
    assert_eq!(empty.count(State::Gone), 5);
}

/// Each corruption is planted on top of a consistent topic and must be
/// reported with a message naming the problem.
#[test]
fn invariants_detect_corruption() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let all = ids(&["p", "d", "a", "x", "g"]);
    type Plant = fn(&mut redis::Connection, &Layout);
    let cases: [(&str, Plant, &str); 12] = [
        (
            "double_state",
            |c, l| {
                redis::cmd("ZADD")
                    .arg(l.dead())
                    .arg(1)
                    .arg("p")
                    .exec(c)
                    .unwrap();
            },
            "\"p\" is in more than one state: pending and dead",
        ),
        (
            "pending_twice",
            |c, l| {
                redis::cmd("RPUSH")
                    .arg(l.pending())
                    .arg("p")
                    .exec(c)
                    .unwrap();
            },
            "\"p\" is 2 times in the pending list",
        ),
        (
            "orphan_body",
            |c, l| {
                redis::cmd("HSET")
                    .arg(l.msg())
                    .arg("g")
                    .arg("{}")
                    .exec(c)
                    .unwrap();
            },
            "orphan body: id \"g\"",
        ),
        (
            "orphan_body_of_unknown_id",
            |c, l| {
                redis::cmd("HSET")
                    .arg(l.msg())
                    .arg("zz")
                    .arg("{}")
                    .exec(c)
                    .unwrap();
            },
            "orphan body: id \"zz\"",
        ),
        (
            "missing_body",
            |c, l| {
                redis::cmd("HDEL").arg(l.msg()).arg("d").exec(c).unwrap();
            },
            "\"d\" is delayed but has no body",
        ),
        (
            "active_without_lease",
            |c, l| {
                redis::cmd("HDEL").arg(l.lease()).arg("a").exec(c).unwrap();
            },
            "\"a\" is active but has no lease",
        ),
        (
            "lease_without_active",
            |c, l| {
                redis::cmd("HSET")
                    .arg(l.lease())
                    .arg("x")
                    .arg("t")
                    .exec(c)
                    .unwrap();
            },
            "\"x\" has a lease token",
        ),
        (
            "unknown_id",
            |c, l| {
                redis::cmd("HSET")
                    .arg(l.msg())
                    .arg("u")
                    .arg("{}")
                    .exec(c)
                    .unwrap();
                redis::cmd("RPUSH")
                    .arg(l.pending())
                    .arg("u")
                    .exec(c)
                    .unwrap();
            },
            "unknown message: id \"u\"",
        ),
        (
            "latency_misses_an_entry",
            |c, l| {
                redis::cmd("DEL").arg(l.runs()).exec(c).unwrap();
            },
            "1 pending entries, but 0 in the runs",
        ),
        (
            "ready_but_not_listed",
            |c, l| {
                redis::cmd("ZADD")
                    .arg(l.ready())
                    .arg(5)
                    .arg("d")
                    .exec(c)
                    .unwrap();
            },
            "\"d\" is in \"mq:{ready_but_not_listed}:ready\" but not in the pending list",
        ),
        (
            "progress_of_a_dead_message",
            |c, l| {
                redis::cmd("HSET")
                    .arg(l.progress())
                    .arg("x")
                    .arg("50")
                    .exec(c)
                    .unwrap();
            },
            "\"x\" has a progress report in \"mq:{progress_of_a_dead_message}:progress\" but is dead",
        ),
        (
            "waiter_on_a_gone_message",
            |c, l| {
                redis::cmd("HSET")
                    .arg(l.waiters())
                    .arg("gone")
                    .arg(1)
                    .exec(c)
                    .unwrap();
            },
            "\"gone\" has a waiter in \"mq:{waiter_on_a_gone_message}:waiters\" but is in no state",
        ),
    ];
    for (name, plant, expected) in cases {
        let layout = Layout::new("mq", name);
        build_states(&mut conn, &layout);
        check_invariants(&mut conn, &layout, &all);
        plant(&mut conn, &layout);
        let message = panic_message(|| {
            check_invariants(&mut conn, &layout, &all);
        });
        assert!(
            message.contains(expected),
            "case {name}: expected {expected:?} in:\n{message}"
        );
    }
}

#[test]
#[should_panic(expected = "is in more than one state")]
fn invariants_panic_on_double_state() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let layout = Layout::new("mq", "t");
    build_states(&mut conn, &layout);
    redis::cmd("ZADD")
        .arg(layout.dead())
        .arg(1)
        .arg("p")
        .exec(&mut conn)
        .unwrap();
    check_invariants(&mut conn, &layout, &ids(&["p", "d", "a", "x"]));
}

/// A CA and a server certificate for 127.0.0.1, as PEM files in `dir`; returns the CA PEM.
fn write_test_pki(dir: &std::path::Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    ca_cert.pem()
}

#[test]
fn tls_port_serves_tls_and_survives_restart() {
    if !forgemq_test_support::server_supports_tls() {
        eprintln!(
            "skipped: {} was built without TLS (`tls-port` is an unknown directive)",
            forgemq_test_support::redis_server_binary().display()
        );
        return;
    }
    // The redis crate's rustls needs a crypto provider; ignored if one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = tempfile::tempdir().unwrap();
    let ca = write_test_pki(pki.path());
    let files = TlsFiles::new(
        pki.path().join("server.pem"),
        pki.path().join("server.key"),
        pki.path().join("ca.pem"),
    );
    let mut server = RedisServer::start_with(RedisOptions::new().tls(files));
    let tls_port = server.tls_port().expect("a TLS port");
    assert_ne!(tls_port, server.port());
    assert_eq!(server.tls_url(), format!("rediss://127.0.0.1:{tls_port}/"));
    let tls_ping = |server: &RedisServer| {
        let client = redis::Client::build_with_tls(
            server.tls_url(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone().into_bytes()),
            },
        )
        .unwrap();
        ping(&mut client.get_connection().unwrap())
    };
    assert_eq!(tls_ping(&server).unwrap(), "PONG");
    // The plain port stays open for setup.
    assert_eq!(ping(&mut server.conn()).unwrap(), "PONG");
    server.restart();
    assert_eq!(server.tls_port(), Some(tls_port));
    assert_eq!(tls_ping(&server).unwrap(), "PONG");
}

#[test]
fn a_server_without_tls_has_no_tls_port() {
    let server = RedisServer::start();
    assert_eq!(server.tls_port(), None);
    let message = panic_message(|| {
        let _ = server.tls_url();
    });
    assert!(message.contains("without RedisOptions::tls"), "{message}");
}

#[test]
fn acl_helpers_create_and_use_a_user() {
    let server = RedisServer::start();
    server.acl_setuser("reader", &["on", ">pw", "~allowed:*", "+get", "+ping"]);
    assert_eq!(
        server.url_as("reader", "pw"),
        format!("redis://reader:pw@127.0.0.1:{}/", server.port())
    );
    let mut conn = server.conn_as("reader", "pw");
    assert_eq!(ping(&mut conn).unwrap(), "PONG");
    let value: Option<String> = redis::cmd("GET").arg("allowed:x").query(&mut conn).unwrap();
    assert_eq!(value, None);
    let err = redis::cmd("GET")
        .arg("other:x")
        .query::<Option<String>>(&mut conn)
        .unwrap_err();
    assert_eq!(err.code(), Some("NOPERM"), "{err}");
    let message = panic_message(|| server.acl_setuser("bad", &["+no-such-command"]));
    assert!(message.contains("ACL SETUSER bad"), "{message}");
}

/// A 3-master cluster with a replica each forms, routes keys to the right master, and
/// moves a slot with its keys.
#[test]
fn cluster_of_three_masters_forms_and_moves_a_slot() {
    use forgemq_test_support::{key_slot, TestCluster};
    let cluster = TestCluster::start(3, 1);
    assert_eq!(cluster.nodes().len(), 6);
    let mut conn = cluster.conn();
    for i in 0..30 {
        redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(i)
            .exec(&mut conn)
            .unwrap();
    }
    let masters: HashSet<usize> = (0..30)
        .map(|i| cluster.master_of(&format!("k{i}")))
        .collect();
    assert_eq!(masters.len(), 3, "30 keys land on all 3 masters");
    let slot = key_slot(b"k7");
    let from = cluster.master_of("k7");
    let to = (from + 1) % 3;
    cluster.move_slot(slot, to);
    assert_eq!(cluster.master_of("k7"), to);
    let v: i64 = redis::cmd("GET")
        .arg("k7")
        .query(&mut cluster.conn())
        .unwrap();
    assert_eq!(v, 7);
    assert!(cluster.url().starts_with("redis+cluster://127.0.0.1:"));
}

/// A sentinel group forms, names its master, and fails over to the replica on request.
#[test]
fn sentinel_group_fails_over_on_request() {
    use forgemq_test_support::TestSentinel;
    let group = TestSentinel::start();
    assert_eq!(group.master(), 0);
    group.failover();
    let now = group.wait_for_new_master(0, Duration::from_secs(20));
    assert_eq!(now, 1);
    assert!(group.url().ends_with("/forgemq"));
}
