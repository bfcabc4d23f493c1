//! `forgemq gateway` as a real process, delivering to a real HTTP receiver started in the
//! test and to real commands: outcomes, retries, Retry-After, timeouts, refused
//! connections, SIGTERM drain, SIGHUP reload, config errors and readiness while Redis is
//! killed and restarted. Every test ends with the invariant checker.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use forgemq::{Client, MessageId, PublishOptions, TopicOptions};
use forgemq_test_support::{
    assert_none_lost, check_invariants, eventually, free_port, Layout, RedisServer,
    State as MsgState, TestCluster,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// A receiver: an HTTP server in the test that records every request and answers by path.

#[derive(Clone, Debug)]
struct Hit {
    path: String,
    id: String,
    content_type: String,
    traceparent: Option<String>,
    body: Value,
    at: Instant,
}

#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    /// Starts on a free port; returns it and the receiver.
    async fn start() -> (u16, Receiver) {
        let receiver = Receiver::default();
        let app = Router::new()
            .route("/{behaviour}", any(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (port, receiver)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    fn hits_for(&self, path: &str) -> Vec<Hit> {
        self.hits().into_iter().filter(|h| h.path == path).collect()
    }

    fn count(&self, path: &str, id: &str) -> usize {
        self.hits()
            .iter()
            .filter(|h| h.path == path && h.id == id)
            .count()
    }
}

/// Answers by path: `ok` 200; `flaky` 500 on an id's first request, then 200; `after`
/// 503 with `Retry-After: 2` first, then 200; `redirect` 302 to `/ok`; `slow` 200 after
/// 3 s; `slowok` 200 after 1.5 s; `a` and `b` 200 (two targets to switch between).
async fn receive(
    State(r): State<Receiver>,
    UrlPath(behaviour): UrlPath<String>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let id = headers
        .get("x-forgemq-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let seen_before = r.count(&behaviour, &id);
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    r.hits.lock().unwrap().push(Hit {
        path: behaviour.clone(),
        id,
        content_type,
        traceparent,
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    });
    match behaviour.as_str() {
        "flaky" if seen_before == 0 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            HeaderMap::new(),
            "database down",
        ),
        "after" if seen_before == 0 => {
            let mut h = HeaderMap::new();
            h.insert("retry-after", "2".parse().unwrap());
            (StatusCode::SERVICE_UNAVAILABLE, h, "busy")
        }
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            (StatusCode::OK, HeaderMap::new(), "late")
        }
        "redirect" => {
            let mut h = HeaderMap::new();
            h.insert("location", "/ok".parse().unwrap());
            (StatusCode::FOUND, h, "moved")
        }
        "slowok" => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            (StatusCode::OK, HeaderMap::new(), "done")
        }
        _ => (StatusCode::OK, HeaderMap::new(), "ok"),
    }
}

// ---------------------------------------------------------------------------------------
// The gateway process.

struct Gateway {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; its exit code.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the gateway did not exit within {limit:?}; log:\n{}",
            self.log()
        );
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path)
    }
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `forgemq gateway` with `config` and waits for `/healthz`.
fn start_gateway(redis: &RedisServer, config: &str) -> Gateway {
    start_gateway_with_env(redis, config, &[])
}

/// [`start_gateway`] with extra environment variables for the gateway process.
fn start_gateway_with_env(redis: &RedisServer, config: &str, env: &[(&str, &str)]) -> Gateway {
    start_gateway_at(&redis.url(), config, env)
}

/// [`start_gateway_with_env`] with Redis at `url` (a cluster, say).
fn start_gateway_at(url: &str, config: &str, env: &[(&str, &str)]) -> Gateway {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let path = write_config(dir.path(), config);
    let port = free_port();
    let log = dir.path().join("gateway.log");
    let child = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(["gateway", "--config"])
        .arg(&path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("REDIS_URL", url)
        .env_remove("FORGEMQ_REPLICAS")
        .env_remove("FORGEMQ_REPLICAS_TIMEOUT")
        .env_remove("FORGEMQ_LOG_FORMAT")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut gateway = Gateway {
        child,
        port,
        log,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return gateway;
        }
        if let Some(status) = gateway.child.try_wait().unwrap() {
            panic!("the gateway exited with {status}; log:\n{}", gateway.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the gateway did not start; log:\n{}", gateway.log());
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, text);
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

async fn client(redis: &RedisServer) -> Client {
    Client::connect(&redis.url()).await.unwrap()
}

/// Every id of `topic` in exactly one state, and none gone from Redis without having been
/// delivered successfully (`acked`: what the test saw the target accept).
fn invariants(
    redis: &RedisServer,
    topic: &str,
    ids: &[MessageId],
    acked: &[String],
) -> forgemq_test_support::StateReport {
    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let report = check_invariants(&mut redis.conn(), &Layout::new("mq", topic), &ids);
    let acked: HashSet<String> = acked.iter().cloned().collect();
    assert_none_lost(&report, &acked);
    report
}

fn strings(ids: &[MessageId]) -> Vec<String> {
    ids.iter().map(|i| i.to_string()).collect()
}

async fn processed(mq: &Client, topic: &str) -> u64 {
    mq.stats(topic).await.unwrap().processed
}

async fn dead(mq: &Client, topic: &str) -> u64 {
    mq.stats(topic).await.unwrap().dead
}

// ---------------------------------------------------------------------------------------

/// HTTP targets: 2xx, a 500 then a 200, a timeout, a refused connection, `Retry-After`, a
/// pattern route that finds a topic published after start, and the metrics of it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_targets_deliver_retry_and_dead_letter() {
    let redis = RedisServer::start();
    let mq = client(&redis).await;
    let (port, rx) = Receiver::start().await;
    let closed = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = format!(
        r#"
discover_interval = "200ms"

[[routes]]
topic = "t.ok"
http = "{base}/ok"

[[routes]]
topic = "t.flaky"
http = "{base}/flaky"
backoff = {{ fixed = "100ms" }}

[[routes]]
topic = "t.slow"
http = "{base}/slow"
timeout = "500ms"
max_retry = 1
backoff = {{ fixed = "100ms" }}

[[routes]]
topic = "t.refused"
http = "http://127.0.0.1:{closed}/nobody"
max_retry = 1
backoff = {{ fixed = "100ms" }}

[[routes]]
topic = "t.after"
http = "{base}/after"
backoff = {{ fixed = "100ms" }}

[[routes]]
topic = "t.redirect"
http = "{base}/redirect"
max_retry = 0

[[routes]]
topic = "p.*"
http = "{base}/ok"
"#
    );
    let gw = start_gateway(&redis, &config);

    let ok: Vec<MessageId> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(
                mq.publish("t.ok", json!({"n": i, "nested": {"list": [1, 2.5, "x"]}}))
                    .await
                    .unwrap(),
            );
        }
        v
    };
    let flaky = vec![
        mq.publish("t.flaky", json!({"n": 1})).await.unwrap(),
        mq.publish("t.flaky", json!({"n": 2})).await.unwrap(),
    ];
    let slow = vec![mq.publish("t.slow", json!({})).await.unwrap()];
    let refused = vec![mq.publish("t.refused", json!({})).await.unwrap()];
    let after = vec![mq.publish("t.after", json!({})).await.unwrap()];
    let redirect = vec![mq.publish("t.redirect", json!({})).await.unwrap()];
    // Published after the gateway started: the pattern route must discover it.
    let pattern = vec![mq.publish("p.one", json!({"late": true})).await.unwrap()];

    let limit = Duration::from_secs(30);
    eventually("t.ok processed", limit, || async {
        processed(&mq, "t.ok").await == 3
    })
    .await;
    eventually("t.flaky processed", limit, || async {
        processed(&mq, "t.flaky").await == 2
    })
    .await;
    eventually("t.slow dead", limit, || async {
        dead(&mq, "t.slow").await == 1
    })
    .await;
    eventually("t.refused dead", limit, || async {
        dead(&mq, "t.refused").await == 1
    })
    .await;
    eventually("t.after processed", limit, || async {
        processed(&mq, "t.after").await == 1
    })
    .await;
    eventually("p.one processed", limit, || async {
        processed(&mq, "p.one").await == 1
    })
    .await;
    eventually("t.redirect dead", limit, || async {
        dead(&mq, "t.redirect").await == 1
    })
    .await;

    // 2xx: each delivered once, as the envelope, with the id header and JSON content type.
    for id in &ok {
        assert_eq!(rx.count("ok", id.as_str()), 1);
    }
    let first = rx
        .hits_for("ok")
        .into_iter()
        .find(|h| h.id == ok[0].as_str())
        .unwrap();
    assert_eq!(first.content_type, "application/json");
    assert_eq!(first.body["id"], ok[0].as_str());
    assert_eq!(first.body["topic"], "t.ok");
    assert_eq!(
        first.body["data"],
        json!({"n": 0, "nested": {"list": [1, 2.5, "x"]}})
    );
    assert_eq!(first.body["retry"], 0);
    assert!(first.body["timestamp"].as_str().unwrap().ends_with('Z'));

    // 500 then 200: two attempts each, the second with retry 1.
    for id in &flaky {
        let hits: Vec<Hit> = rx
            .hits_for("flaky")
            .into_iter()
            .filter(|h| h.id == id.as_str())
            .collect();
        assert_eq!(hits.len(), 2, "{hits:?}");
        assert_eq!(hits[1].body["retry"], 1);
    }
    let s = mq.stats("t.flaky").await.unwrap();
    assert_eq!((s.failed, s.retried), (2, 2));

    // Timeout: two attempts (max_retry 1), then dead with the reason.
    let d = mq.get_dead_letters("t.slow", 0..10).await.unwrap();
    assert!(
        d[0].error
            .as_deref()
            .unwrap_or("")
            .contains("no response within 500ms"),
        "{:?}",
        d[0].error
    );
    assert_eq!(rx.count("slow", slow[0].as_str()), 2);

    // Refused connection: dead with the reason.
    let d = mq.get_dead_letters("t.refused", 0..10).await.unwrap();
    let error = d[0].error.clone().unwrap_or_default();
    assert!(
        error.to_lowercase().contains("refused") || error.contains("connect"),
        "{error}"
    );

    // Retry-After: 2 wins over the 100 ms backoff.
    let hits = rx.hits_for("after");
    assert_eq!(hits.len(), 2, "{hits:?}");
    let gap = hits[1].at - hits[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "second attempt after {gap:?}"
    );

    // Pattern route.
    assert_eq!(rx.count("ok", pattern[0].as_str()), 1);

    // A redirect is not a delivery: not followed (the 302's target never saw it), a failure.
    let d = mq.get_dead_letters("t.redirect", 0..1).await.unwrap();
    assert!(
        d[0].error.as_deref().unwrap_or("").contains("HTTP 302"),
        "{:?}",
        d[0].error
    );
    assert_eq!(rx.count("ok", redirect[0].as_str()), 0);

    // Metrics: per route, deliveries by outcome, failures and a latency histogram.
    let (status, text) = gw.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        text.contains(
            r#"forgemq_gateway_deliveries_total{route="t.ok",topic="t.ok",outcome="ok"} 3"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"forgemq_gateway_failures_total{route="t.flaky",topic="t.flaky"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"forgemq_gateway_deliveries_total{route="p.*",topic="p.one",outcome="ok"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"forgemq_gateway_delivery_seconds_count{route="t.ok"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"forgemq_gateway_consumers{route="p.*"} 1"#),
        "{text}"
    );
    // Series exist at zero from the consumer's start: a failure rate is 0, not missing.
    for zero in [
        r#"forgemq_gateway_failures_total{route="t.ok",topic="t.ok"} 0"#,
        r#"forgemq_gateway_deliveries_total{route="t.ok",topic="t.ok",outcome="failed"} 0"#,
        r#"forgemq_gateway_deliveries_total{route="t.slow",topic="t.slow",outcome="ok"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == zero), "missing {zero}:\n{text}");
    }
    let (status, body) = gw.get("/ready");
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.get("/readyz").0, 200, "/readyz is /ready");
    // Each consumed topic is a worker named `gateway` in the registry.
    let workers = mq.workers().await.unwrap();
    assert!(
        !workers.is_empty() && workers.iter().all(|w| w.name.as_deref() == Some("gateway")),
        "{workers:?}"
    );
    let consumed: HashSet<&str> = workers
        .iter()
        .flat_map(|w| w.topics.iter().map(|t| t.topic.as_str()))
        .collect();
    assert!(
        consumed.contains("t.ok") && consumed.contains("p.one"),
        "{consumed:?}"
    );

    for (topic, ids, acked) in [
        ("t.ok", &ok, true),
        ("t.flaky", &flaky, true),
        ("t.slow", &slow, false),
        ("t.refused", &refused, false),
        ("t.after", &after, true),
        ("t.redirect", &redirect, false),
        ("p.one", &pattern, true),
    ] {
        let r = invariants(
            &redis,
            topic,
            ids,
            &if acked { strings(ids) } else { vec![] },
        );
        let expected = if acked {
            MsgState::Gone
        } else {
            MsgState::Dead
        };
        assert_eq!(r.count(expected), ids.len(), "{topic}: {r}");
    }
}

/// Exec targets: exit 0 with the envelope on stdin; exit 1 with the stderr tail as the
/// error; a command that hangs past its timeout is killed with whatever it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_targets_succeed_fail_and_time_out() {
    let redis = RedisServer::start();
    let mq = client(&redis).await;
    let out = tempfile::tempdir().unwrap();
    let marker = format!("sleep 31.{}", std::process::id());
    let config = format!(
        r#"
[[routes]]
topic = "e.ok"
exec = ["sh", "-c", "cat > {dir}/$FORGEMQ_ID.json"]

[[routes]]
topic = "e.fail"
exec = ["sh", "-c", "echo starting; echo boom-from-stderr >&2; exit 1"]
max_retry = 0

[[routes]]
# Exits at once, leaving a process that holds stderr open for 5 s.
topic = "e.bg"
exec = ["sh", "-c", "(sleep 5.{pid} &); exit 0"]
timeout = "3s"
max_retry = 0

[[routes]]
topic = "e.big"
exec = ["sh", "-c", "wc -c > {dir}/big.txt"]

[[routes]]
topic = "e.hang"
exec = ["sh", "-c", "{marker}; true"]
timeout = "500ms"
max_retry = 0
"#,
        dir = out.path().display(),
        pid = std::process::id()
    );
    let _gw = start_gateway(&redis, &config);
    let ok = vec![mq.publish("e.ok", json!({"file": "a.png"})).await.unwrap()];
    let fail = vec![mq.publish("e.fail", json!({})).await.unwrap()];
    let hang = vec![mq.publish("e.hang", json!({})).await.unwrap()];
    let bg = vec![mq.publish("e.bg", json!({})).await.unwrap()];
    // Well past a pipe's 64 KiB buffer.
    let big = vec![mq
        .publish("e.big", json!({"blob": "x".repeat(300_000)}))
        .await
        .unwrap()];

    let limit = Duration::from_secs(30);
    eventually("e.ok processed", limit, || async {
        processed(&mq, "e.ok").await == 1
    })
    .await;
    eventually("e.fail dead", limit, || async {
        dead(&mq, "e.fail").await == 1
    })
    .await;
    eventually("e.hang dead", limit, || async {
        dead(&mq, "e.hang").await == 1
    })
    .await;
    eventually("e.bg processed", limit, || async {
        processed(&mq, "e.bg").await == 1
    })
    .await;
    eventually("e.big processed", limit, || async {
        processed(&mq, "e.big").await == 1
    })
    .await;
    let counted: usize = std::fs::read_to_string(out.path().join("big.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        counted > 300_000,
        "the command read {counted} bytes of the envelope"
    );

    let written: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join(format!("{}.json", ok[0]))).unwrap(),
    )
    .unwrap();
    assert_eq!(written["id"], ok[0].as_str());
    assert_eq!(written["data"], json!({"file": "a.png"}));

    let d = mq.get_dead_letters("e.fail", 0..1).await.unwrap();
    let error = d[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("boom-from-stderr") && error.contains("exit status: 1"),
        "{error}"
    );

    let d = mq.get_dead_letters("e.hang", 0..1).await.unwrap();
    let error = d[0].error.clone().unwrap_or_default();
    assert!(error.contains("did not exit within 500ms"), "{error}");
    // The whole process group went: no `sleep` is left behind.
    let left = Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "still running: {}",
        String::from_utf8_lossy(&left.stdout)
    );

    assert_eq!(
        invariants(&redis, "e.ok", &ok, &strings(&ok)).count(MsgState::Gone),
        1
    );
    assert_eq!(
        invariants(&redis, "e.fail", &fail, &[]).count(MsgState::Dead),
        1
    );
    assert_eq!(
        invariants(&redis, "e.hang", &hang, &[]).count(MsgState::Dead),
        1
    );
    assert_eq!(
        invariants(&redis, "e.bg", &bg, &strings(&bg)).count(MsgState::Gone),
        1
    );
    assert_eq!(
        invariants(&redis, "e.big", &big, &strings(&big)).count(MsgState::Gone),
        1
    );
}

/// An exec target gets a clean environment: the message's `FORGEMQ_*` variables and the
/// names of its route's `inherit_env` (by default PATH, HOME, LANG, LC_ALL, TZ), never the
/// gateway's Redis URL or API token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_targets_get_a_clean_environment() {
    let redis = RedisServer::start();
    let mq = client(&redis).await;
    let out = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[routes]]
topic = "env.default"
exec = ["sh", "-c", "env > {dir}/default.env"]

[[routes]]
topic = "env.custom"
exec = ["sh", "-c", "env > {dir}/custom.env"]
inherit_env = ["MY_SETTING", "NOT_SET_ANYWHERE"]
"#,
        dir = out.path().display()
    );
    let _gw = start_gateway_with_env(
        &redis,
        &config,
        &[
            ("FORGEMQ_TOKEN", "api-secret"),
            ("AWS_SECRET_ACCESS_KEY", "cloud-secret"),
            ("MY_SETTING", "kept"),
            ("LANG", "C.UTF-8"),
        ],
    );
    let default_id = mq.publish("env.default", json!({})).await.unwrap();
    mq.publish("env.custom", json!({})).await.unwrap();
    let limit = Duration::from_secs(30);
    for topic in ["env.default", "env.custom"] {
        eventually(topic, limit, || async { processed(&mq, topic).await == 1 }).await;
    }
    let read = |name: &str| -> Vec<(String, String)> {
        std::fs::read_to_string(out.path().join(name))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    };
    let names = |env: &[(String, String)]| -> Vec<String> {
        let mut n: Vec<String> = env
            .iter()
            .map(|(k, _)| k.clone())
            // What sh itself sets.
            .filter(|k| !matches!(k.as_str(), "PWD" | "SHLVL" | "_" | "OLDPWD"))
            .collect();
        n.sort();
        n
    };
    let default = read("default.env");
    let mut want = vec!["FORGEMQ_ID", "FORGEMQ_RETRY", "FORGEMQ_TOPIC", "LANG"];
    for inherited in ["PATH", "HOME", "LC_ALL", "TZ"] {
        if std::env::var_os(inherited).is_some() {
            want.push(inherited);
        }
    }
    want.sort();
    assert_eq!(names(&default), want, "{default:?}");
    assert!(default.contains(&("FORGEMQ_ID".to_owned(), default_id.to_string())));
    let custom = read("custom.env");
    assert_eq!(
        names(&custom),
        vec!["FORGEMQ_ID", "FORGEMQ_RETRY", "FORGEMQ_TOPIC", "MY_SETTING"],
        "{custom:?}"
    );
}

/// The publisher's trace context reaches the targets: `traceparent` as an HTTP header, and
/// `TRACEPARENT` in an exec target's environment; other headers stay in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_forwards_the_trace_context() {
    let redis = RedisServer::start();
    let mq = client(&redis).await;
    let (port, rx) = Receiver::start().await;
    let out = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[[routes]]
topic = "traced.http"
http = "http://127.0.0.1:{port}/ok"

[[routes]]
topic = "traced.exec"
exec = ["sh", "-c", "env > {dir}/traced.env"]
"#,
        dir = out.path().display()
    );
    let _gw = start_gateway(&redis, &config);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = || {
        PublishOptions::new()
            .header("traceparent", traceparent)
            .header("tenant", "acme")
    };
    let id = mq
        .publish_with("traced.http", json!({}), traced())
        .await
        .unwrap()
        .id()
        .to_string();
    mq.publish_with("traced.exec", json!({}), traced())
        .await
        .unwrap();
    let limit = Duration::from_secs(30);
    for topic in ["traced.http", "traced.exec"] {
        eventually(topic, limit, || async { processed(&mq, topic).await == 1 }).await;
    }
    let hit = rx.hits_for("ok").into_iter().find(|h| h.id == id).unwrap();
    assert_eq!(hit.traceparent.as_deref(), Some(traceparent));
    let env = std::fs::read_to_string(out.path().join("traced.env")).unwrap();
    assert!(
        env.lines()
            .any(|l| l == format!("TRACEPARENT={traceparent}")),
        "{env}"
    );
    assert!(!env.contains("acme"), "{env}");
}

/// SIGTERM: deliveries in flight finish, the rest stay pending (not leased), exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_deliveries_and_leaves_the_rest_pending() {
    let redis = RedisServer::start();
    let mq = client(&redis).await;
    let (port, rx) = Receiver::start().await;
    let config = format!(
        "[[routes]]\ntopic = \"d.t\"\nhttp = \"http://127.0.0.1:{port}/slowok\"\nconcurrency = 2\ntimeout = \"10s\"\n"
    );
    let mut gw = start_gateway(&redis, &config);
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(mq.publish("d.t", json!({"n": i})).await.unwrap());
    }
    eventually(
        "two deliveries in flight",
        Duration::from_secs(20),
        || async { rx.hits_for("slowok").len() >= 2 },
    )
    .await;
    gw.signal("TERM");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(20)),
        Some(0),
        "log:\n{}",
        gw.log()
    );
    let started = rx.hits_for("slowok").len() as u64;
    let s = mq.stats("d.t").await.unwrap();
    // Everything that reached the receiver finished (1.5 s each, within the 10 s drain).
    assert_eq!(s.processed, started, "log:\n{}", gw.log());
    assert_eq!(s.active, 0);
    assert_eq!(s.pending, 6 - started);
    let delivered: Vec<String> = rx.hits().into_iter().map(|h| h.id).collect();
    let r = invariants(&redis, "d.t", &ids, &delivered);
    assert_eq!(r.count(MsgState::Pending) as u64, 6 - started);
    assert_eq!(r.count(MsgState::Gone) as u64, started);
}

/// SIGHUP: a new target takes over without losing or stranding a message published
/// during the switch; a broken file on the next SIGHUP leaves the running config alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_without_losing_a_message() {
    let redis = RedisServer::start();
    let mq = client(&redis).await;
    let (port, rx) = Receiver::start().await;
    let route = |path: &str, c: u32| {
        format!("[[routes]]\ntopic = \"r.t\"\nhttp = \"http://127.0.0.1:{port}/{path}\"\nconcurrency = {c}\n")
    };
    let gw = start_gateway(&redis, &route("a", 2));
    let config_path = gw._dir.path().join("gateway.toml");

    let publisher = {
        let mq = mq.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..300 {
                ids.push(mq.publish("r.t", json!({"n": i})).await.unwrap());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    std::fs::write(&config_path, route("b", 3)).unwrap();
    gw.signal("HUP");
    let mut ids = publisher.await.unwrap();
    eventually("all 300 processed", Duration::from_secs(30), || async {
        processed(&mq, "r.t").await == 300
    })
    .await;
    let on_a = rx.hits_for("a").len();
    let on_b = rx.hits_for("b").len();
    assert!(
        on_a > 0 && on_b > 0,
        "a={on_a} b={on_b}; log:\n{}",
        gw.log()
    );
    let delivered: HashSet<String> = rx.hits().into_iter().map(|h| h.id).collect();
    for id in &ids {
        assert!(delivered.contains(id.as_str()), "{id} never delivered");
    }
    // Never both at once: the old consumer drained before the new one started.
    let last_a = rx.hits_for("a").iter().map(|h| h.at).max().unwrap();
    let first_b = rx.hits_for("b").iter().map(|h| h.at).min().unwrap();
    assert!(
        last_a < first_b,
        "a delivery reached /a after /b had started"
    );
    // After the switch, /a gets nothing new.
    let a_before = on_a;

    // A broken config is refused; the running routes stay.
    std::fs::write(
        &config_path,
        "[[routes]]\ntopic = \"r.t\"\nhttp = \"gopher://x\"\n",
    )
    .unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = mq.publish("r.t", json!({"late": true})).await.unwrap();
    eventually(
        "the late message delivered to b",
        Duration::from_secs(20),
        || async { rx.count("b", late.as_str()) == 1 },
    )
    .await;
    assert_eq!(rx.hits_for("a").len(), a_before);
    assert!(
        gw.log().contains("config not reloaded"),
        "log:\n{}",
        gw.log()
    );
    ids.push(late);
    eventually("late processed", Duration::from_secs(20), || async {
        processed(&mq, "r.t").await == 301
    })
    .await;
    let delivered: Vec<String> = rx.hits().into_iter().map(|h| h.id).collect();
    let r = invariants(&redis, "r.t", &ids, &delivered);
    assert_eq!(r.count(MsgState::Gone), 301);
}

/// Config errors are reported at start-up with the file and line, exit 2, and nothing is
/// consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_the_line_and_consume_nothing() {
    let redis = RedisServer::start();
    let mq = client(&redis).await;
    let id = mq.publish("c.t", json!({})).await.unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "[[routes]]\ntopic = \"c.t\"\nhttp = \"http://127.0.0.1:9/\"\nconcurrenc = 2\n",
            "line 4",
            "concurrenc",
        ),
        (
            "[[routes]]\ntopic = \"c.t\"\nhttp = \"ftp://127.0.0.1/\"\n",
            "line 3",
            "scheme",
        ),
        (
            "[[routes]]\ntopic = \"c.t\"\nhttp = \"not a url\"\n",
            "line 3",
            "not a URL",
        ),
        (
            "[[routes]]\ntopic = \"order/*\"\nhttp = \"http://127.0.0.1:9/\"\n",
            "line 2",
            "never match",
        ),
        (
            "[[routes]]\ntopic = \"c.t\"\nhttp = \"http://127.0.0.1:9/\"\nexec = [\"true\"]\n",
            "line 2",
            "both",
        ),
        (
            "[[routes]]\ntopic = \"c.t\"\nexec = [\"no-such-program-here\"]\n",
            "line 3",
            "not found",
        ),
        (
            "[[routes]]\ntopic = \"c.t\"\nhttp = \"http://127.0.0.1:9/\"\ntimeout = \"fast\"\n",
            "line 4",
            "timeout",
        ),
        ("[[routes]\ntopic = \"c.t\"\n", "line 1", ""),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (text, line, words) in cases {
        let path = write_config(dir.path(), text);
        let out = Command::new(env!("CARGO_BIN_EXE_forgemq"))
            .args(["gateway", "--config"])
            .arg(&path)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .env("REDIS_URL", redis.url())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}\n{stderr}");
        assert!(
            stderr.contains("gateway.toml") && stderr.contains(line) && stderr.contains(words),
            "{text}\n{stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    let missing = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(["gateway", "--config", "/nonexistent/gateway.toml"])
        .env("REDIS_URL", redis.url())
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let s = mq.stats("c.t").await.unwrap();
    assert_eq!((s.pending, s.processed, s.active), (1, 0, 0));
    let r = invariants(&redis, "c.t", std::slice::from_ref(&id), &[]);
    assert_eq!(r.count(MsgState::Pending), 1);
}

/// `/ready` is 503 while Redis is down and 200 again after it restarts, and delivery
/// resumes; `/healthz` stays 200 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_redis_and_delivery_resumes_after_a_restart() {
    let mut redis = RedisServer::start();
    let (port, rx) = Receiver::start().await;
    let gw = start_gateway(
        &redis,
        &format!("[[routes]]\ntopic = \"h.t\"\nhttp = \"http://127.0.0.1:{port}/ok\"\n"),
    );
    let ready = |gw: &Gateway| gw.get("/ready").0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready(&gw) != 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ready(&gw), 200, "log:\n{}", gw.log());

    redis.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(&gw) != 503 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = gw.get("/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis"), "{body}");
    assert_eq!(gw.get("/healthz").0, 200);

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(&gw) != 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ready(&gw), 200, "log:\n{}", gw.log());

    let mq = client(&redis).await;
    let id = mq
        .publish("h.t", json!({"after": "restart"}))
        .await
        .unwrap();
    eventually(
        "delivered after the restart",
        Duration::from_secs(30),
        || async { rx.count("ok", id.as_str()) == 1 },
    )
    .await;
    eventually("processed", Duration::from_secs(10), || async {
        processed(&mq, "h.t").await == 1
    })
    .await;
    let r = invariants(&redis, "h.t", std::slice::from_ref(&id), &[id.to_string()]);
    assert_eq!(r.count(MsgState::Gone), 1);
}

/// `examples/gateway/gateway.toml` as shipped (only the receiver's port changed): every
/// seed topic reaches its target, and a message the receiver refuses ends in the
/// dead-letter queue after its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_gateway_config_runs_end_to_end() {
    let redis = RedisServer::start();
    let mq = client(&redis).await;
    let seen = forgemq_examples::gateway_receiver::Seen::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = forgemq_examples::gateway_receiver::router(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/gateway/gateway.toml"
    ))
    .unwrap();
    let config = shipped
        .replace("127.0.0.1:9000", &format!("127.0.0.1:{port}"))
        .replace(
            "discover_interval = \"2s\"",
            "discover_interval = \"200ms\"",
        );
    let _gw = start_gateway(&redis, &config);

    let mut published: Vec<(&str, MessageId)> = Vec::new();
    for (topic, data) in [
        (
            "order.reminder",
            json!({"order_id": "ORD123456", "user_id": "789", "message": "您的订单尚未支付，请及时完成支付"}),
        ),
        (
            "user.notification",
            json!({"user_id": "789", "text": "hello"}),
        ),
        ("system.cleanup", json!({"older_than_days": 30})),
        ("payment.retry", json!({"order_id": "ORD1"})),
        ("inventory.alert", json!({"sku": "SKU-1", "left": 2})),
        ("payment.retry", json!({"order_id": "ORD2", "fail": true})),
    ] {
        published.push((topic, mq.publish(topic, data).await.unwrap()));
    }
    let limit = Duration::from_secs(40);
    for topic in [
        "order.reminder",
        "user.notification",
        "system.cleanup",
        "inventory.alert",
    ] {
        eventually(topic, limit, || async { processed(&mq, topic).await == 1 }).await;
    }
    eventually("payment.retry: one done, one dead", limit, || async {
        let s = mq.stats("payment.retry").await.unwrap();
        s.processed == 1 && s.dead == 1
    })
    .await;
    let deliveries = seen.lock().unwrap().clone();
    let at = |path: &str| deliveries.iter().filter(|d| d.path == path).count();
    assert_eq!(at("order-reminder"), 1);
    assert_eq!(at("user-notification"), 1);
    assert_eq!(at("inventory"), 1);
    // 1 good payment + the failing one's 3 attempts (max_retry 2).
    assert_eq!(at("payment-retry"), 4);
    let reminder = deliveries
        .iter()
        .find(|d| d.path == "order-reminder")
        .unwrap();
    assert_eq!(
        reminder.envelope["data"]["message"],
        "您的订单尚未支付，请及时完成支付"
    );
    let dead = mq.get_dead_letters("payment.retry", 0..10).await.unwrap();
    assert!(
        dead[0].error.as_deref().unwrap_or("").contains("HTTP 500"),
        "{:?}",
        dead[0].error
    );
    // Everything but the refused payment was delivered; that one is dead, not gone.
    let failing = &published[5].1;
    let good: Vec<String> = published
        .iter()
        .filter(|(_, id)| id != failing)
        .map(|(_, id)| id.to_string())
        .collect();
    for topic in [
        "order.reminder",
        "user.notification",
        "system.cleanup",
        "payment.retry",
        "inventory.alert",
    ] {
        let ids: Vec<MessageId> = published
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, id)| id.clone())
            .collect();
        invariants(&redis, topic, &ids, &good);
    }
}

/// On a 3-master Redis Cluster, a topic over 6 partitions (the library spreads them over
/// the slot space, so over every master) is delivered to an HTTP target by a pattern
/// route: every message of every partition, each acknowledged once, after a first failure
/// that is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_delivers_a_partitioned_topic_on_a_cluster() {
    let cluster = TestCluster::start(3, 0);
    let mq = Client::connect(&cluster.url()).await.unwrap();
    mq.create_topic("hot.orders", TopicOptions::new().partitions(6))
        .await
        .unwrap();
    let (port, rx) = Receiver::start().await;
    let config = format!(
        r#"
discover_interval = "200ms"

[[routes]]
topic = "hot.*"
http = "http://127.0.0.1:{port}/flaky"
concurrency = 4
backoff = {{ fixed = "100ms" }}
"#
    );
    let _gw = start_gateway_at(&cluster.url(), &config, &[]);
    let mut ids = Vec::new();
    for i in 0..24 {
        let options = PublishOptions::new().partition_key(format!("customer-{i}"));
        let outcome = mq
            .publish_with("hot.orders", json!({"order": i}), options)
            .await
            .unwrap();
        ids.push(outcome.id().to_string());
    }
    let spread = mq.stats("hot.orders").await.unwrap().partitions;
    assert!(
        spread.iter().filter(|p| p.published > 0).count() >= 3,
        "{spread:?}"
    );
    eventually(
        "every message delivered",
        Duration::from_secs(40),
        || async { processed(&mq, "hot.orders").await == 24 },
    )
    .await;
    let s = mq.stats("hot.orders").await.unwrap();
    assert_eq!(
        (s.pending, s.active, s.delayed, s.dead, s.retried),
        (0, 0, 0, 0, 24),
        "{s:?}"
    );
    for id in &ids {
        // The flaky target fails each id once, then takes it.
        assert_eq!(rx.count("flaky", id), 2, "{id}");
    }
    for p in &s.partitions {
        assert_eq!(p.processed, p.published, "partition {:?}", p.partition);
    }
    let hit = rx.hits_for("flaky").pop().unwrap();
    assert_eq!(hit.body["topic"], "hot.orders");
}
