//! The `forgemq` command against a private redis-server: outputs, JSON shapes, exit codes.

use std::process::{Command, Output, Stdio};

use forgemq_test_support::RedisServer;
use serde_json::{json, Value};

fn forgemq(server: &RedisServer, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(args)
        .env("REDIS_URL", server.url())
        .output()
        .unwrap()
}

fn ok(server: &RedisServer, args: &[&str]) -> String {
    let out = forgemq(server, args);
    assert!(
        out.status.success(),
        "forgemq {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_of(server: &RedisServer, args: &[&str]) -> Value {
    serde_json::from_str(&ok(server, args)).unwrap()
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
        mq.publish_with_delay(topic, json!({"n": 3}), std::time::Duration::from_secs(3600))
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
