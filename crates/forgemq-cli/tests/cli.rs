//! The `forgemq` command against a private redis-server: outputs, JSON shapes, exit codes.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use forgemq_test_support::{free_port, RedisServer, TestCluster, TestSentinel};
use serde_json::{json, Value};

fn forgemq(server: &RedisServer, args: &[&str]) -> Output {
    forgemq_at(&server.url(), args)
}

/// `forgemq ARGS` with `REDIS_URL=url` (and none of the other settings of the
/// environment the tests run in).
fn forgemq_at(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(args)
        .env("REDIS_URL", url)
        .env_remove("FORGEMQ_REPLICAS")
        .env_remove("FORGEMQ_REPLICAS_TIMEOUT")
        .env_remove("FORGEMQ_LOG_FORMAT")
        .output()
        .unwrap()
}

fn ok(server: &RedisServer, args: &[&str]) -> String {
    ok_at(&server.url(), args)
}

fn ok_at(url: &str, args: &[&str]) -> String {
    let out = forgemq_at(url, args);
    assert!(
        out.status.success(),
        "forgemq {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_of(server: &RedisServer, args: &[&str]) -> Value {
    json_at(&server.url(), args)
}

fn json_at(url: &str, args: &[&str]) -> Value {
    serde_json::from_str(&ok_at(url, args)).unwrap()
}

/// Runs `forgemq ARGS` (no Redis in the environment) and checks that it fails with exit
/// `code` within `limit`, with one line on stderr, which it returns.
fn fails_fast(args: &[&str], code: i32, limit: Duration) -> String {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("FORGEMQ_REPLICAS")
        .env_remove("FORGEMQ_REPLICAS_TIMEOUT")
        .env_remove("FORGEMQ_LOG_FORMAT")
        .env_remove("FORGEMQ_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(took < limit, "{args:?} took {took:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    err
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// `publish` prints only the id; the message is stored with its data, delay and retries.
#[test]
fn publish_prints_only_the_id_and_stores_the_message() {
    let server = RedisServer::start();
    let id = ok(
        &server,
        &[
            "publish",
            "order.paid",
            r#"{"order_id":"ORD1","amount":299.99}"#,
        ],
    );
    let id = id.trim();
    assert_eq!(id.len(), 36, "{id:?}");
    ok(
        &server,
        &[
            "publish",
            "order.reminder",
            "{}",
            "--delay",
            "30s",
            "--max-retry",
            "5",
        ],
    );
    let peek = json_of(&server, &["peek", "order.paid", "--json"]);
    assert_eq!(peek[0]["id"], id);
    assert_eq!(
        peek[0]["data"],
        json!({"order_id": "ORD1", "amount": 299.99})
    );
    let delayed = json_of(
        &server,
        &["peek", "order.reminder", "--state", "delayed", "--json"],
    );
    assert_eq!(delayed[0]["max_retry"], 5);
    assert!(delayed[0]["due_at"].is_string());
}

/// Data from stdin (`-`) and many messages from a JSON-lines file.
#[test]
fn publish_reads_stdin_and_jsonl_files() {
    let server = RedisServer::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(["publish", "user.welcome", "-"])
        .env("REDIS_URL", server.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"user_id":"42"}"#)
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.jsonl");
    let lines: String = (0..2500).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    std::fs::write(&file, lines).unwrap();
    let ids = ok(
        &server,
        &["publish", "user.welcome", "--file", file.to_str().unwrap()],
    );
    assert_eq!(ids.lines().count(), 2500);
    let stats = json_of(&server, &["stats", "user.welcome", "--json"]);
    assert_eq!(stats["pending"], 2501);
}

/// `stats TOPIC --json` is one object with every state and counter; `queues --json` an array.
#[test]
fn stats_and_queues_json_shapes() {
    let server = RedisServer::start();
    ok(&server, &["publish", "a.one", "1"]);
    ok(&server, &["publish", "b.two", "2"]);
    let s = json_of(&server, &["stats", "a.one", "--json"]);
    for field in [
        "topic",
        "pending",
        "active",
        "delayed",
        "dead",
        "processed",
        "failed",
        "retried",
        "recovered",
    ] {
        assert!(s.get(field).is_some(), "stats lacks {field}: {s}");
    }
    assert_eq!(
        (s["topic"].as_str(), s["pending"].as_u64()),
        (Some("a.one"), Some(1))
    );
    let q = json_of(&server, &["queues", "--json"]);
    let topics: Vec<&str> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, vec!["a.one", "b.two"]);
    let table = ok(&server, &["queues"]);
    assert!(table.starts_with("TOPIC"), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("a.one"));
}

/// The dead-letter queue: list with the error, retry one, retry all, purge.
#[test]
fn dlq_list_retry_and_purge() {
    let server = RedisServer::start();
    let mq_url = server.url();
    let ids: Vec<String> = runtime().block_on(async {
        let mq = forgemq::Client::connect(&mq_url).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(
                mq.publish("email.send", json!({"i": i}))
                    .await
                    .unwrap()
                    .to_string(),
            );
            let d = mq.pop_message("email.send").await.unwrap().unwrap();
            d.dead(&format!("550 mailbox {i} unavailable"))
                .await
                .unwrap();
        }
        ids
    });
    let list = json_of(&server, &["dlq", "list", "email.send", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert_eq!(list[0]["id"], ids[0]);
    assert_eq!(list[0]["error"], "550 mailbox 0 unavailable");
    assert!(list[0]["died_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(list[0]["data"], json!({"i": 0}));
    ok(&server, &["dlq", "retry", "email.send", &ids[0]]);
    assert_eq!(
        json_of(&server, &["stats", "email.send", "--json"])["pending"],
        1
    );
    let missing = forgemq(&server, &["dlq", "retry", "email.send", &ids[0]]);
    assert_eq!(missing.status.code(), Some(1));
    ok(&server, &["dlq", "retry", "email.send", "--all"]);
    assert_eq!(
        json_of(&server, &["stats", "email.send", "--json"])["pending"],
        3
    );
    runtime().block_on(async {
        let mq = forgemq::Client::connect(&mq_url).await.unwrap();
        for d in mq.pop_messages("email.send", 10).await.unwrap() {
            d.dead("again").await.unwrap();
        }
    });
    ok(&server, &["dlq", "delete", "email.send", &ids[1]]);
    ok(&server, &["dlq", "purge", "email.send", "--yes"]);
    let s = json_of(&server, &["stats", "email.send", "--json"]);
    assert_eq!(
        (s["dead"].as_u64(), s["dead_deleted"].as_u64()),
        (Some(0), Some(3))
    );
}

/// cancel, pause, resume and purge change what they say.
#[test]
fn cancel_pause_resume_purge() {
    let server = RedisServer::start();
    let id = ok(
        &server,
        &["publish", "order.payment.check", "{}", "--delay", "30m"],
    );
    ok(&server, &["cancel", "order.payment.check", id.trim()]);
    assert_eq!(
        json_of(&server, &["stats", "order.payment.check", "--json"])["delayed"],
        0
    );
    let again = forgemq(&server, &["cancel", "order.payment.check", id.trim()]);
    assert_eq!(again.status.code(), Some(1));
    ok(&server, &["pause", "order.payment.check"]);
    assert_eq!(
        json_of(&server, &["stats", "order.payment.check", "--json"])["paused"],
        true
    );
    ok(&server, &["resume", "order.payment.check"]);
    assert_eq!(
        json_of(&server, &["stats", "order.payment.check", "--json"])["paused"],
        false
    );
    for _ in 0..3 {
        ok(&server, &["publish", "order.payment.check", "{}"]);
    }
    ok(&server, &["purge", "order.payment.check", "--yes"]);
    assert_eq!(
        json_of(&server, &["stats", "order.payment.check", "--json"])["pending"],
        0
    );
}

/// Errors: one line on stderr; exit 2 for usage, 1 for runtime; nothing written.
#[test]
fn errors_are_one_line_with_the_right_exit_code() {
    let server = RedisServer::start();
    for (args, code) in [
        (vec!["publish", "bad topic", "{}"], 1),
        (vec!["publish", "t.ok", "{not json"], 1),
        (vec!["peek", "t.ok", "--state", "sideways"], 2),
        (vec!["cancel", "t.ok", "no-such-id"], 1),
        (vec!["frobnicate"], 2),
        (vec!["publish"], 2),
        (vec!["dlq", "retry", "t.ok"], 2),
    ] {
        let out = forgemq(&server, &args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut server.conn()).unwrap();
    assert_eq!(dbsize, 0, "bad input wrote something");
    let down = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(["--redis", "redis://127.0.0.1:1", "queues"])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("could not connect"));
}

/// `stats --json` is an object for one topic and an array without one, whatever the data;
/// a JSON-lines file with one bad line writes nothing.
#[test]
fn stats_shape_follows_arguments_and_bad_files_write_nothing() {
    let server = RedisServer::start();
    ok(&server, &["publish", "only.topic", "1"]);
    assert!(json_of(&server, &["stats", "--json"]).is_array());
    assert!(json_of(&server, &["stats", "only.topic", "--json"]).is_object());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.jsonl");
    let mut lines: String = (0..1500).map(|i| format!("{{\"i\":{i}}}\n")).collect();
    lines.push_str(&format!("{{\"blob\":\"{}\"}}\n", "x".repeat(2 << 20)));
    std::fs::write(&file, lines).unwrap();
    let out = forgemq(
        &server,
        &["publish", "file.topic", "--file", file.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("m.jsonl:1501"), "{err}");
    let topics = json_of(&server, &["queues", "--json"]);
    assert_eq!(
        topics.as_array().unwrap().len(),
        1,
        "file.topic must not exist: {topics}"
    );
}

/// `--help` explains itself and completions are generated.
#[test]
fn help_and_completions() {
    let server = RedisServer::start();
    let help = ok(&server, &["--help"]);
    assert!(
        help.contains("dead-letter queue") && help.contains("--redis"),
        "{help}"
    );
    let bash = ok(&server, &["completions", "bash"]);
    assert!(bash.contains("forgemq"));
}

/// Puts 2 pending, 1 delayed and 1 dead message in `topic`.
fn seed_every_state(server: &RedisServer, topic: &str) {
    let url = server.url();
    runtime().block_on(async {
        let mq = forgemq::Client::connect(&url).await.unwrap();
        mq.publish(topic, json!({"n": 0})).await.unwrap();
        mq.pop_message(topic)
            .await
            .unwrap()
            .unwrap()
            .dead("gone bad")
            .await
            .unwrap();
        mq.publish(topic, json!({"n": 1})).await.unwrap();
        mq.publish(topic, json!({"n": 2})).await.unwrap();
        mq.publish_with_delay(topic, json!({"n": 3}), Duration::from_secs(3600))
            .await
            .unwrap();
    });
}

fn counts(server: &RedisServer, topic: &str) -> (u64, u64, u64) {
    let s = json_of(server, &["stats", topic, "--json"]);
    (
        s["pending"].as_u64().unwrap(),
        s["delayed"].as_u64().unwrap(),
        s["dead"].as_u64().unwrap(),
    )
}

/// Without a terminal, `purge` and `dlq purge` delete nothing unless given `--yes`: exit
/// 2 and one line naming `--yes`. With it they say what they deleted, by state.
#[test]
fn purge_without_a_terminal_needs_yes() {
    let server = RedisServer::start();
    seed_every_state(&server, "order.paid");
    for args in [
        vec!["purge", "order.paid"],
        vec!["dlq", "purge", "order.paid"],
    ] {
        let out = forgemq(&server, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains("--yes"), "{err}");
        assert_eq!(counts(&server, "order.paid"), (2, 1, 1), "{args:?} deleted");
    }
    let out = forgemq(&server, &["dlq", "purge", "order.paid", "--yes"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "deleted 1 dead letters of order.paid"
    );
    seed_every_state(&server, "order.paid");
    let out = forgemq(&server, &["purge", "order.paid", "--yes"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "deleted 4 pending, 0 active, 2 delayed, 1 dead messages of order.paid"
    );
    assert_eq!(counts(&server, "order.paid"), (0, 0, 0));
}

/// Runs forgemq with its stdin on a pseudo-terminal, typing `answer`; exit code, stderr.
fn on_terminal(server: &RedisServer, args: &[&str], answer: &str) -> (Option<i32>, String) {
    use std::io::Write;
    let pty = nix::pty::openpty(None, None).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(args)
        .env("REDIS_URL", server.url())
        .stdin(Stdio::from(pty.slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut terminal = std::fs::File::from(pty.master);
    terminal
        .write_all(format!("{answer}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    drop(terminal);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// On a terminal, `purge` shows what it would delete, by state, and goes ahead only when
/// the topic name is typed back; `dlq purge` the same for the dead letters.
#[test]
fn purge_on_a_terminal_asks_with_the_counts() {
    let server = RedisServer::start();
    seed_every_state(&server, "order.paid");
    for answer in ["y", "", "order.pai"] {
        let (code, err) = on_terminal(&server, &["purge", "order.paid"], answer);
        assert_eq!(code, Some(1), "answer {answer:?}: {err}");
        assert!(
            err.contains("2 pending, 0 active, 1 delayed, 1 dead"),
            "the prompt shows the counts: {err}"
        );
        assert!(err.contains("nothing was deleted"), "{err}");
        assert_eq!(counts(&server, "order.paid"), (2, 1, 1));
    }
    let (code, err) = on_terminal(&server, &["dlq", "purge", "order.paid"], "nope");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("1 dead letter"), "{err}");
    assert_eq!(counts(&server, "order.paid"), (2, 1, 1));
    let (code, err) = on_terminal(&server, &["dlq", "purge", "order.paid"], "order.paid");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("deleted 1 dead letters of order.paid"),
        "{err}"
    );
    assert_eq!(counts(&server, "order.paid"), (2, 1, 0));
    let (code, err) = on_terminal(&server, &["purge", "order.paid"], "order.paid");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("deleted 2 pending, 0 active, 1 delayed, 0 dead messages of order.paid"),
        "{err}"
    );
    assert_eq!(counts(&server, "order.paid"), (0, 0, 0));
    // --yes skips the question on a terminal too.
    seed_every_state(&server, "order.paid");
    let (code, err) = on_terminal(&server, &["purge", "order.paid", "--yes"], "");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(counts(&server, "order.paid"), (0, 0, 0));
}

/// Error texts come from remote endpoints: the `dlq list` and `peek` tables show their
/// control characters (terminal escapes, bells, newlines) as visible escapes, never raw;
/// the JSON keeps the text exact.
#[test]
fn dlq_list_table_neutralises_control_characters() {
    let server = RedisServer::start();
    let hostile = "HTTP 500: \u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[31mred\r\nsecond line\u{9b}31m\u{202e}txt.exe";
    let url = server.url();
    runtime().block_on(async {
        let mq = forgemq::Client::connect(&url).await.unwrap();
        mq.publish("hook.call", json!({"to": "x"})).await.unwrap();
        mq.pop_message("hook.call")
            .await
            .unwrap()
            .unwrap()
            .dead(hostile)
            .await
            .unwrap();
    });
    for args in [
        vec!["dlq", "list", "hook.call"],
        vec!["peek", "hook.call", "--state", "dead"],
    ] {
        let table = ok(&server, &args);
        assert!(
            !table
                .chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "{args:?}: raw control characters in {table:?}"
        );
        assert_eq!(table.lines().count(), 2, "{args:?}: one row: {table}");
        assert!(
            table.contains(r"\u{1b}[31mred\r\nsecond line"),
            "{args:?}: escapes are shown: {table}"
        );
    }
    let list = json_of(&server, &["dlq", "list", "hook.call", "--json"]);
    assert_eq!(list[0]["error"], hostile);
}

/// `publish --unique-until ttl` holds the key for the whole ttl, also after the message
/// was processed; the default (`final`) frees it when the message is done.
#[test]
fn publish_takes_unique_until() {
    let server = RedisServer::start();
    let url = server.url();
    let process_all = || {
        runtime().block_on(async {
            let mq = forgemq::Client::connect(&url).await.unwrap();
            while let Some(d) = mq.pop_message("order.reminder").await.unwrap() {
                d.ack().await.unwrap();
            }
        })
    };
    for (until, duplicate) in [(Some("ttl"), true), (Some("final"), false), (None, false)] {
        let key = format!("reminder:{until:?}");
        let mut args = vec!["publish", "order.reminder", "{}", "--unique-key", &key];
        if let Some(u) = until {
            args.extend(["--unique-until", u]);
        }
        let first = ok(&server, &args);
        process_all();
        let out = forgemq(&server, &args);
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.contains("duplicate"), duplicate, "{until:?}: {err}");
        let second = String::from_utf8_lossy(&out.stdout);
        assert_eq!(first == second, duplicate, "{until:?}");
    }
    let out = forgemq(
        &server,
        &[
            "publish",
            "t.x",
            "{}",
            "--unique-key",
            "k",
            "--unique-until",
            "never",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
}

/// The stats table has the duplicate runs (rule 7: each one counted and shown).
#[test]
fn stats_table_shows_duplicate_runs() {
    let server = RedisServer::start();
    ok(&server, &["publish", "a.one", "1"]);
    let _: i64 = redis::cmd("HINCRBY")
        .arg("mq:{a.one}:stats")
        .arg("duplicate_runs")
        .arg(3)
        .query(&mut server.conn())
        .unwrap();
    let table = ok(&server, &["stats"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let column = header
        .iter()
        .position(|h| *h == "DUP RUNS")
        .unwrap_or_else(|| panic!("no DUP RUNS column: {table}"));
    assert_eq!(row[column], "3", "{table}");
    assert_eq!(
        json_of(&server, &["stats", "a.one", "--json"])["duplicate_runs"],
        3
    );
}

/// On a 3-master Redis Cluster: a topic over 4 partitions is created, listed, published
/// to (by partition key, from a file too), inspected as one topic with a row per
/// partition, peeked and dead-lettered without naming a partition; changing its count
/// while it holds messages is refused, and a plain topic works next to it.
#[test]
fn commands_work_on_a_redis_cluster() {
    let cluster = TestCluster::start(3, 0);
    let url = cluster.url();
    let run = |args: &[&str]| forgemq_at(&url, args);

    let created = run(&["topic", "create", "hot.orders", "--partitions", "4"]);
    assert!(created.status.success(), "{created:?}");
    let said = String::from_utf8_lossy(&created.stderr);
    assert_eq!(said.trim(), "created hot.orders with 4 partitions");
    let again = run(&["topic", "create", "hot.orders", "--partitions", "4"]);
    assert_eq!(
        String::from_utf8_lossy(&again.stderr).trim(),
        "hot.orders already has 4 partitions; nothing changed"
    );

    let mut ids = Vec::new();
    for i in 0..8 {
        let data = format!(r#"{{"order":{i}}}"#);
        let key = format!("customer-{}", i % 4);
        let id = ok_at(
            &url,
            &["publish", "hot.orders", &data, "--partition-key", &key],
        );
        ids.push(id.trim().to_owned());
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.jsonl");
    std::fs::write(&file, "{\"order\":100}\n{\"order\":101}\n").unwrap();
    let from_file = ok_at(
        &url,
        &[
            "publish",
            "hot.orders",
            "--file",
            file.to_str().unwrap(),
            "--partition-key",
            "customer-9",
        ],
    );
    assert_eq!(from_file.lines().count(), 2);
    ok_at(&url, &["publish", "user.welcome", r#"{"user_id":"1"}"#]);

    // Ids work without naming the partition: dead-letter one, cancel another.
    let rt = runtime();
    rt.block_on(async {
        let mq = forgemq::Client::connect(&url).await.unwrap();
        mq.pop_message("hot.orders")
            .await
            .unwrap()
            .unwrap()
            .dead("card declined")
            .await
            .unwrap();
    });
    let dead = json_at(&url, &["dlq", "list", "hot.orders", "--json"]);
    assert_eq!(dead.as_array().unwrap().len(), 1, "{dead}");
    assert_eq!(dead[0]["error"], "card declined");
    let dead_id = dead[0]["id"].as_str().unwrap().to_owned();
    let cancel_id = ids.iter().find(|id| **id != dead_id).unwrap();
    ok_at(&url, &["cancel", "hot.orders", cancel_id]);

    // stats --json: the sums, with the library's per-partition breakdown.
    let stats = json_at(&url, &["stats", "hot.orders", "--json"]);
    assert_eq!(
        (stats["pending"].as_u64(), stats["dead"].as_u64()),
        (Some(8), Some(1)),
        "{stats}"
    );
    let parts = stats["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 4);
    let sum: u64 = parts.iter().map(|p| p["pending"].as_u64().unwrap()).sum();
    assert_eq!(sum, 8);
    assert!(
        parts
            .iter()
            .filter(|p| p["pending"].as_u64() > Some(0))
            .count()
            > 1,
        "four customers spread over more than one partition: {stats}"
    );
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p["partition"], i, "{p}");
    }

    // The table: one row of sums, then a row per partition.
    let table = ok_at(&url, &["stats", "hot.orders"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 6, "{table}");
    let cells = |line: &str| -> Vec<String> {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        cells(lines[1])[..3],
        ["hot.orders (4 partitions)", "8", "0"]
    );
    for (i, p) in parts.iter().enumerate() {
        let row = cells(lines[2 + i]);
        assert!(lines[2 + i].starts_with("  partition"), "{table}");
        assert_eq!(row[0], format!("partition {i}"));
        assert_eq!(row[1], p["pending"].to_string(), "{table}");
        assert_eq!(row[4], p["dead"].to_string(), "{table}");
    }

    // queues: one row per topic.
    let queues = ok_at(&url, &["queues"]);
    let rows: Vec<&str> = queues.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{queues}");
    assert!(rows[0].starts_with("hot.orders (4 partitions)"), "{queues}");
    assert!(rows[1].starts_with("user.welcome "), "{queues}");
    assert_eq!(
        json_at(&url, &["queues", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // peek across partitions.
    let peek = json_at(&url, &["peek", "hot.orders", "--limit", "100", "--json"]);
    assert_eq!(peek.as_array().unwrap().len(), 8, "{peek}");
    assert!(peek
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["id"] != *cancel_id));

    // topic ls.
    assert_eq!(
        json_at(&url, &["topic", "ls", "--json"]),
        json!([
            {"topic": "hot.orders", "partitions": 4},
            {"topic": "user.welcome", "partitions": 1}
        ])
    );
    let table = ok_at(&url, &["topic", "ls"]);
    assert_eq!(
        table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        vec![
            vec!["TOPIC", "PARTITIONS"],
            vec!["hot.orders", "4"],
            vec!["user.welcome", "1"]
        ]
    );

    // Its count can't change while it holds messages; an empty topic's can.
    let refused = run(&["topic", "create", "hot.orders", "--partitions", "8"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: could not give hot.orders 8 partitions")
            && err.contains("holds 9 message(s)"),
        "{err}"
    );
    assert_eq!(
        json_at(&url, &["topic", "ls", "--json"])[0]["partitions"],
        4
    );
    ok_at(&url, &["purge", "user.welcome", "--yes"]);
    let changed = run(&["topic", "create", "user.welcome", "--partitions", "3"]);
    assert!(changed.status.success(), "{changed:?}");
    assert_eq!(
        String::from_utf8_lossy(&changed.stderr).trim(),
        "changed user.welcome from 1 partition to 3 partitions"
    );
}

/// A bad URL, seeds where no Redis listens, a partition count out of range or a
/// replicas timeout of 0: exit 1 (2 for usage) with one line, at once, for every command
/// that connects (also `serve`, `dev` and `gateway`); no password is shown.
#[test]
fn bad_redis_urls_and_unreachable_seeds_fail_fast_with_one_line() {
    let limit = Duration::from_secs(10);
    let nobody = format!(
        "redis+cluster://127.0.0.1:{},127.0.0.1:{}",
        free_port(),
        free_port()
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[[routes]]\ntopic = \"t\"\nhttp = \"http://127.0.0.1:9/hook\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let bind = format!("127.0.0.1:{}", free_port());
    for url in [
        "redis+cluster://",
        "redis+cluster://127.0.0.1:notaport",
        "redis+cluster://127.0.0.1:7000/0",
        "redis+clutser://127.0.0.1:7000",
    ] {
        let err = fails_fast(&["--redis", url, "stats"], 1, limit);
        assert!(err.contains("bad Redis URL"), "{err}");
    }
    for args in [
        vec!["--redis", &nobody, "stats"],
        vec!["--redis", &nobody, "topic", "ls"],
        vec!["--redis", &nobody, "publish", "t", "{}"],
        vec!["--redis", &nobody, "serve", "--bind", &bind],
        vec!["--redis", &nobody, "dev", "--bind", &bind],
        vec![
            "--redis", &nobody, "gateway", "--config", config, "--listen", &bind,
        ],
    ] {
        let err = fails_fast(&args, 1, limit);
        assert!(
            err.contains("could not connect to redis+cluster://127.0.0.1:"),
            "{args:?}: {err}"
        );
    }
    let secret = format!(
        "redis+sentinel://ann:pw-user@127.0.0.1:{}/mymaster?sentinel_password=pw-sentinel",
        free_port()
    );
    let err = fails_fast(&["--redis", &secret, "queues"], 1, limit);
    assert!(!err.contains("pw-"), "a password is shown: {err}");
    assert!(err.contains("sentinel_password=***"), "{err}");
    // Malformed: the library's message quotes the URL.
    let malformed = format!("{secret}&bogus=1");
    let err = fails_fast(&["--redis", &malformed, "queues"], 1, limit);
    assert!(!err.contains("pw-"), "a password is shown: {err}");
    assert!(err.contains("bad Redis URL"), "{err}");
    for args in [
        vec!["topic", "create", "t", "--partitions", "0"],
        vec!["topic", "create", "t", "--partitions", "1025"],
        vec!["--replicas-timeout", "0s", "stats"],
        vec!["--replicas", "-1", "stats"],
        vec!["--replicas", "1", "dev", "--bind", &bind],
    ] {
        fails_fast(&args, 2, limit);
    }
}

/// `--replicas N`: a publish returns only once N replicas have it; asking for more
/// replicas than there are fails (exit 1) within `--replicas-timeout`, naming the message,
/// which is on the master. Through Sentinel.
#[test]
fn replicas_flag_waits_for_replicas() {
    let group = TestSentinel::start();
    let url = group.url();
    let id = ok_at(&url, &["--replicas", "1", "publish", "order.paid", "{}"]);
    let started = Instant::now();
    let out = forgemq_at(
        &url,
        &[
            "--replicas",
            "2",
            "--replicas-timeout",
            "300ms",
            "publish",
            "order.paid",
            "{}",
        ],
    );
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only 1 of 2 replicas confirmed it"), "{err}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    let unconfirmed = err.split_whitespace().nth(2).unwrap_or_default().to_owned();
    let peek = json_at(&url, &["peek", "order.paid", "--json"]);
    let stored: Vec<&str> = peek
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(stored, vec![id.trim(), unconfirmed.as_str()], "{err}");
    let stats = json_at(&url, &["--replicas", "1", "stats", "order.paid", "--json"]);
    assert_eq!(stats["pending"], 2);
}

/// The cell of `column` in the first row of a table.
fn cell(table: &str, column: &str) -> String {
    let mut lines = table.lines();
    // Headers may hold one space ("LEASE UNTIL"); cells are padded with two at least.
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let at = header
        .iter()
        .position(|h| *h == column)
        .unwrap_or_else(|| panic!("no {column} column: {table}"));
    row[at].to_owned()
}

/// `workers` lists a live worker with what it runs; `status` finds a message by id and
/// names the worker running it; `stats` shows queue latency and workers per topic; `peek
/// --state active` names the holder.
#[test]
fn workers_status_and_latency() {
    let server = RedisServer::start();
    let url = server.url();
    let rt = runtime();
    let mq = rt.block_on(forgemq::Client::connect(&url)).unwrap();
    let running = rt
        .block_on(mq.publish("video.transcode", json!({"file": "a.mp4"})))
        .unwrap()
        .to_string();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let worker = forgemq::Worker::builder(mq.clone())
        .name("transcoder")
        .heartbeat_interval(Duration::from_millis(200))
        .subscribe_with(
            "video.transcode",
            forgemq::Subscription::new().concurrency(2),
            move |_m: forgemq::Message<Value>| {
                let g = g.clone();
                async move {
                    let _ = g.acquire().await;
                    Ok::<(), forgemq::HandlerError>(())
                }
            },
        )
        .build()
        .unwrap();
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let handle = rt.spawn(async move { worker.run_until(s.notified()).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    let workers = loop {
        let w = json_of(&server, &["workers", "--json"]);
        if w[0]["topics"][0]["in_flight"] == 1 {
            break w;
        }
        assert!(Instant::now() < deadline, "the worker never ran it: {w}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(workers.as_array().unwrap().len(), 1);
    let w = &workers[0];
    for field in [
        "id",
        "host",
        "pid",
        "version",
        "state",
        "started_at",
        "last_heartbeat",
        "topics",
    ] {
        assert!(w.get(field).is_some(), "workers --json lacks {field}: {w}");
    }
    assert_eq!(w["name"], "transcoder");
    assert_eq!(
        w["topics"],
        json!([{"topic": "video.transcode", "concurrency": 2, "in_flight": 1}])
    );
    let id = w["id"].as_str().unwrap();
    let table = ok(&server, &["workers"]);
    assert_eq!(cell(&table, "ID"), id, "{table}");
    assert!(table.contains("video.transcode 1/2"), "{table}");
    assert_eq!(
        json_of(&server, &["workers", "--topic", "other.topic", "--json"]),
        json!([])
    );

    // status: the running one names its holder; a pending one says since when.
    let st = json_of(&server, &["status", "video.transcode", &running, "--json"]);
    assert_eq!(
        (&st["state"], &st["holder"]),
        (&json!("active"), &json!(id)),
        "{st}"
    );
    let lines = ok(&server, &["status", "video.transcode", &running]);
    assert!(lines.contains("state        active"), "{lines}");
    assert!(lines.contains(&format!("holder       {id}")), "{lines}");
    let peek = ok(&server, &["peek", "video.transcode", "--state", "active"]);
    assert_eq!(cell(&peek, "HOLDER"), id, "{peek}");
    let waiting = ok(&server, &["publish", "order.cancel", "{\"order\": 1}"]);
    let st = json_of(
        &server,
        &["status", "order.cancel", waiting.trim(), "--json"],
    );
    assert_eq!(st["state"], "pending", "{st}");
    assert!(st["timestamp"].is_string(), "{st}");
    let missing = forgemq(&server, &["status", "order.cancel", "no-such-id", "--json"]);
    assert_eq!(missing.status.code(), Some(1));
    let shown: Value = serde_json::from_slice(&missing.stdout).unwrap();
    assert_eq!(shown["state"], "unknown");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no message no-such-id"));
    // A cancelled one: its record, exit 0.
    let dropped = ok(&server, &["publish", "order.cancel", "{\"order\": 2}"]);
    ok(&server, &["cancel", "order.cancel", dropped.trim()]);
    let st = json_of(
        &server,
        &["status", "order.cancel", dropped.trim(), "--json"],
    );
    assert_eq!(st["state"], "cancelled", "{st}");
    assert!(st["finished_at"].is_string(), "{st}");
    let lines = ok(&server, &["status", "order.cancel", dropped.trim()]);
    assert!(lines.contains("state        cancelled"), "{lines}");
    assert!(lines.contains("finished at"), "{lines}");

    // stats: latency of the waiting topic, workers of the busy one.
    std::thread::sleep(Duration::from_millis(1100));
    let table = ok(&server, &["stats", "order.cancel"]);
    let latency = cell(&table, "LATENCY");
    assert!(latency.ends_with('s') && latency != "-", "{table}");
    assert_eq!(cell(&table, "WORKERS"), "0", "{table}");
    let s = json_of(&server, &["stats", "order.cancel", "--json"]);
    assert!(s["oldest_pending_age_ms"].as_u64().unwrap() >= 1000, "{s}");
    let table = ok(&server, &["stats", "video.transcode"]);
    assert_eq!(
        (
            cell(&table, "WORKERS"),
            cell(&table, "RUNNING"),
            cell(&table, "LATENCY")
        ),
        ("1".to_owned(), "1/2".to_owned(), "-".to_owned()),
        "{table}"
    );

    gate.add_permits(10);
    stop.notify_one();
    rt.block_on(handle).unwrap().unwrap();
    assert_eq!(json_of(&server, &["workers", "--json"]), json!([]));
}

/// `dlq list --error`, and bulk `dlq retry` / `dlq delete` by ids or by error text.
#[test]
fn dlq_filters_by_error_and_acts_in_bulk() {
    let server = RedisServer::start();
    let url = server.url();
    let ids: Vec<String> = runtime().block_on(async {
        let mq = forgemq::Client::connect(&url).await.unwrap();
        let mut ids = Vec::new();
        for error in [
            "SMTP 550 full",
            "timeout",
            "smtp 550 gone",
            "timeout",
            "TLS handshake",
        ] {
            ids.push(
                mq.publish("email.send", json!({}))
                    .await
                    .unwrap()
                    .to_string(),
            );
            let d = mq.pop_message("email.send").await.unwrap().unwrap();
            d.dead(error).await.unwrap();
        }
        ids
    });
    let smtp = json_of(
        &server,
        &["dlq", "list", "email.send", "--error", "smtp 550", "--json"],
    );
    let found: Vec<&str> = smtp
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(found, [&*ids[0], &*ids[2]]);
    ok(
        &server,
        &["dlq", "retry", "email.send", "--error", "SMTP 550"],
    );
    let s = json_of(&server, &["stats", "email.send", "--json"]);
    assert_eq!(
        (s["pending"].as_u64(), s["dead"].as_u64()),
        (Some(2), Some(3))
    );
    ok(&server, &["dlq", "delete", "email.send", &ids[1], &ids[3]]);
    let s = json_of(&server, &["stats", "email.send", "--json"]);
    assert_eq!(
        (s["dead"].as_u64(), s["dead_deleted"].as_u64()),
        (Some(1), Some(2))
    );
    // Conflicting selections are refused before anything changes.
    let both = forgemq(
        &server,
        &["dlq", "retry", "email.send", &ids[4], "--error", "tls"],
    );
    assert_eq!(both.status.code(), Some(2));
    ok(&server, &["dlq", "delete", "email.send", "--error", "tls"]);
    let s = json_of(&server, &["stats", "email.send", "--json"]);
    assert_eq!(s["dead"].as_u64(), Some(0));
}

/// `--log-format json` (or `FORGEMQ_LOG_FORMAT=json`) is taken by every command: even a
/// one-shot command's final error is then one JSON log object; an unknown format is a
/// usage error.
#[test]
fn log_format_json_applies_to_every_command() {
    for (flag, env) in [(Some("json"), None), (None, Some("json"))] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forgemq"));
        cmd.args(["--redis", "redis://127.0.0.1:1", "queues"])
            .env_remove("FORGEMQ_LOG_FORMAT");
        if let Some(flag) = flag {
            cmd.args(["--log-format", flag]);
        }
        if let Some(env) = env {
            cmd.env("FORGEMQ_LOG_FORMAT", env);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let event: Value = serde_json::from_str(err.trim()).unwrap();
        assert_eq!(event["level"], "ERROR", "{event}");
        assert!(event["timestamp"].is_string(), "{event}");
        assert!(
            event["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("could not connect")),
            "{event}"
        );
    }
    let bad = fails_fast(
        &["--log-format", "xml", "queues"],
        2,
        Duration::from_secs(10),
    );
    assert!(bad.contains("--log-format"), "{bad}");
}

/// `forgemq schedule set|ls|run|rm`, with the errors a user makes.
#[test]
fn schedule_commands_set_list_run_and_remove() {
    let server = RedisServer::start();
    let out = ok(
        &server,
        &[
            "schedule",
            "set",
            "cleanup",
            "--cron",
            "*/5 * * * *",
            "--tz",
            "Asia/Shanghai",
            "--topic",
            "orders.cleanup",
            "--data",
            r#"{"older_than":"30m"}"#,
            "--missed",
            "catch-up:3",
        ],
    );
    assert!(out.starts_with("schedule cleanup set: next fire "), "{out}");
    ok(
        &server,
        &[
            "schedule", "set", "ping", "--every", "1h", "--topic", "ops.ping",
        ],
    );
    let list = json_of(&server, &["schedule", "ls", "--json"]);
    assert_eq!(list[0]["name"], "cleanup");
    assert_eq!(list[0]["cron"], "*/5 * * * *");
    assert_eq!(list[0]["tz"], "Asia/Shanghai");
    assert_eq!(list[0]["missed"], "catch-up:3");
    assert_eq!(list[0]["data"], json!({"older_than": "30m"}));
    assert_eq!(list[1]["name"], "ping");
    assert_eq!(list[1]["every_ms"], 3_600_000);
    let table = ok(&server, &["schedule", "ls"]);
    assert!(
        table.contains("NAME") && table.contains("cron */5 * * * * (Asia/Shanghai)"),
        "{table}"
    );
    assert!(table.contains("every 1h"), "{table}");

    let id = ok(&server, &["schedule", "run", "cleanup"]);
    let id = id.trim();
    assert!(id.starts_with("schedule:cleanup:"), "{id}");
    let status = json_of(&server, &["status", "orders.cleanup", id, "--json"]);
    assert_eq!(status["state"], "pending", "{status}");

    for (args, needle) in [
        (
            vec![
                "schedule",
                "set",
                "x",
                "--cron",
                "61 * * * *",
                "--topic",
                "t",
            ],
            "cron",
        ),
        (
            vec![
                "schedule",
                "set",
                "x",
                "--cron",
                "* * * * *",
                "--tz",
                "Mars/Base",
                "--topic",
                "t",
            ],
            "time zone",
        ),
        (
            vec!["schedule", "set", "x", "--every", "100ms", "--topic", "t"],
            "at least 1s",
        ),
        (
            vec![
                "schedule", "set", "x", "--every", "1s", "--topic", "t", "--missed", "often",
            ],
            "missed",
        ),
        (
            vec![
                "schedule", "set", "x", "--every", "1s", "--topic", "t", "--data", "{",
            ],
            "JSON",
        ),
        (vec!["schedule", "rm", "nope"], "no schedule"),
        (vec!["schedule", "run", "nope"], "no schedule"),
    ] {
        let out = forgemq(&server, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    let out = ok(&server, &["schedule", "rm", "ping"]);
    assert_eq!(out.trim(), "schedule ping removed");
    let list = json_of(&server, &["schedule", "ls", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
}

/// `forgemq group set|pause|resume|ls|rm` and `publish --group`: fair groups, with the
/// errors a user makes.
#[test]
fn group_commands_set_list_pause_and_remove() {
    let server = RedisServer::start();
    for g in ["acme", "acme", "globex"] {
        ok(&server, &["publish", "report.build", "{}", "--group", g]);
    }
    let out = ok(
        &server,
        &[
            "group",
            "set",
            "report.build",
            "acme",
            "--max-active",
            "5",
            "--weight",
            "2",
        ],
    );
    assert_eq!(out.trim(), "report.build acme: at most 5 at once, weight 2");
    // Settings not given keep their value.
    let out = ok(
        &server,
        &["group", "set", "report.build", "acme", "--weight", "3"],
    );
    assert_eq!(out.trim(), "report.build acme: at most 5 at once, weight 3");
    ok(&server, &["group", "pause", "report.build", "globex"]);
    let list = json_of(&server, &["group", "ls", "report.build", "--json"]);
    assert_eq!(list[0]["group"], "acme");
    assert_eq!(list[0]["pending"], 2);
    assert_eq!(list[0]["max_active"], 5);
    assert_eq!(list[1]["group"], "globex");
    assert_eq!(list[1]["paused"], true);
    let table = ok(&server, &["group", "ls", "report.build"]);
    assert!(
        table.contains("acme") && table.contains("paused"),
        "{table}"
    );
    let stats = json_of(&server, &["stats", "report.build", "--json"]);
    assert_eq!(stats["pending"], 3, "{stats}");
    assert_eq!(stats["groups"].as_array().unwrap().len(), 2, "{stats}");
    ok(&server, &["group", "resume", "report.build", "globex"]);
    for (args, needle) in [
        (
            vec!["group", "set", "report.build", "acme", "--weight", "0"],
            "weight",
        ),
        (vec!["group", "set", "report.build", "a b"], "group name"),
        (
            vec!["publish", "report.build", "{}", "--group", "a b"],
            "group name",
        ),
        (vec!["group", "rm", "report.build", "nobody"], "no settings"),
    ] {
        let out = forgemq(&server, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    ok(&server, &["group", "rm", "report.build", "acme"]);
    let list = json_of(&server, &["group", "ls", "report.build", "--json"]);
    assert_eq!(list[0]["configured"], false);
}

/// `forgemq limit set|ls|rm`: a rate limit every worker shares, with the errors a user makes.
#[test]
fn limit_commands_set_list_and_remove() {
    let server = RedisServer::start();
    let out = ok(
        &server,
        &["limit", "set", "email.send", "100/s", "--burst", "20"],
    );
    assert_eq!(out.trim(), "email.send: at most 100/s (burst 20)");
    ok(&server, &["limit", "set", "report.build", "30/h"]);
    let list = json_of(&server, &["limit", "ls", "--json"]);
    assert_eq!(list[0]["topic"], "email.send");
    assert_eq!(list[0]["rate"], "100/s");
    assert_eq!(list[0]["burst"], 20);
    assert_eq!(list[1]["rate"], "30/h");
    assert_eq!(list[1]["burst"], 1);
    let table = ok(&server, &["limit", "ls"]);
    assert!(
        table.contains("email.send") && table.contains("100/s"),
        "{table}"
    );
    for (args, needle) in [
        (vec!["limit", "set", "t", "fast"], "COUNT/PERIOD"),
        (vec!["limit", "set", "t", "0/s"], "COUNT/PERIOD"),
        (vec!["limit", "set", "t", "10/s", "--burst", "0"], "burst"),
        (vec!["limit", "set", "bad topic", "10/s"], "invalid topic"),
        (vec!["limit", "rm", "nothing.here"], "no rate limit"),
    ] {
        let out = forgemq(&server, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(
        ok(&server, &["limit", "rm", "email.send"]).trim(),
        "email.send: no limit"
    );
    let list = json_of(&server, &["limit", "ls", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
}
