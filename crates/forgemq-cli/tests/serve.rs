//! `forgemq serve` as a real process: routes, status codes, auth, health, OpenAPI.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgemq::{HandlerError, Message, Subscription, Worker};
use forgemq_test_support::{free_port, RedisServer, TestCluster};
use serde_json::{json, Value};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    /// SIGTERM first, so that a `forgemq dev` stops its private redis-server too (SIGKILL
    /// would leave that running after the test); SIGKILL if it is still there after 5 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(redis: &RedisServer, extra: &[&str]) -> Server {
    start_on(redis, "127.0.0.1", extra)
}

/// Starts `forgemq serve` bound to `ip` on a free port; connections go to 127.0.0.1.
fn start_on(redis: &RedisServer, ip: &str, extra: &[&str]) -> Server {
    start_at(&redis.url(), ip, extra)
}

/// [`start_on`] with Redis at `url` (a cluster, say). Ready when `/healthz` answers: a
/// bare TCP connect could reach another process that took the same free port in the
/// meantime (a parallel test's redis-server, which resets an HTTP request), while this
/// server failed to bind; then it starts again on another port.
fn start_at(url: &str, ip: &str, extra: &[&str]) -> Server {
    for _ in 0..5 {
        let port = free_port();
        let bind = format!("{ip}:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_forgemq"))
            .args(["serve", "--bind", &bind])
            .args(extra)
            .env("REDIS_URL", url)
            .env_remove("FORGEMQ_REPLICAS")
            .env_remove("FORGEMQ_REPLICAS_TIMEOUT")
            .env_remove("FORGEMQ_TOKEN")
            .env_remove("FORGEMQ_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if server.child.try_wait().unwrap().is_some() {
                break;
            }
            if healthz_answers(port) {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = server.child.try_wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = server.child.stderr.take() {
            if status.is_some() {
                let _ = e.read_to_string(&mut err);
            }
        }
        match status {
            // The port was taken after free_port() found it: try another.
            Some(_) if err.contains("in use") || err.contains("could not listen") => continue,
            Some(status) => panic!("forgemq serve {extra:?} exited with {status}: {err}"),
            None => panic!("forgemq serve did not start"),
        }
    }
    panic!("forgemq serve found no free port in 5 attempts");
}

/// Whether an HTTP server on `port` answers `GET /healthz` with 200; never panics.
fn healthz_answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let head =
        format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    raw.starts_with(b"HTTP/1.1 200")
}

/// What [`request`] got back.
struct Reply {
    status: u16,
    /// Response headers, names in lower case.
    headers: Vec<(String, String)>,
    /// The body parsed as JSON, or as a JSON string when it is not JSON.
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client. `Host` is `127.0.0.1:PORT` unless `headers` has one (an
/// empty value leaves it out); `Content-Type: application/json` goes with a body.
fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (name, value) in headers {
        if !value.is_empty() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    write!(s, "{head}\r\n{}", body.unwrap_or("")).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
    Reply {
        status,
        headers,
        body,
    }
}

/// [`request`] with an optional bearer token; the status and the body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}")).unwrap_or_default();
    let reply = request(port, method, path, &[("Authorization", &auth)], body);
    (reply.status, reply.body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Publish, stats, peek, cancel, pause/resume and purge through the API.
#[test]
fn api_publishes_inspects_and_manages_topics() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    let (status, body) = http(
        p,
        "POST",
        "/api/v1/topics/user.welcome/messages",
        None,
        Some(r#"{"data":{"user_id":"1","amount":299.99}}"#),
    );
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let (status, body) = http(
        p,
        "POST",
        "/api/v1/topics/order.reminder/messages",
        None,
        Some(r#"{"data":{},"delay_ms":60000,"max_retry":5,"unique_key":"r1"}"#),
    );
    assert_eq!(status, 201);
    let reminder = body["id"].as_str().unwrap().to_owned();
    let (status, dup) = http(
        p,
        "POST",
        "/api/v1/topics/order.reminder/messages",
        None,
        Some(r#"{"data":{},"unique_key":"r1"}"#),
    );
    assert_eq!((status, dup["duplicate"].as_bool()), (200, Some(true)));
    assert_eq!(dup["id"], reminder.as_str());
    let (status, batch) = http(
        p,
        "POST",
        "/api/v1/topics/user.welcome/messages/batch",
        None,
        Some(r#"[{"data":1},{"data":2}]"#),
    );
    assert_eq!(status, 201);
    assert_eq!(batch["ids"].as_array().unwrap().len(), 2);
    let (_, stats) = http(p, "GET", "/api/v1/topics/user.welcome", None, None);
    assert_eq!(
        (stats["topic"].as_str(), stats["pending"].as_u64()),
        (Some("user.welcome"), Some(3))
    );
    let (_, topics) = http(p, "GET", "/api/v1/topics", None, None);
    assert_eq!(topics.as_array().unwrap().len(), 2);
    let (_, peeked) = http(
        p,
        "GET",
        "/api/v1/topics/user.welcome/messages?state=pending&limit=1",
        None,
        None,
    );
    assert_eq!(peeked[0]["id"], id.as_str());
    assert_eq!(peeked[0]["data"], json!({"user_id": "1", "amount": 299.99}));
    let (status, cancelled) = http(
        p,
        "DELETE",
        &format!("/api/v1/topics/order.reminder/messages/{reminder}"),
        None,
        None,
    );
    assert_eq!((status, cancelled["was"].as_str()), (200, Some("delayed")));
    let (status, _) = http(
        p,
        "DELETE",
        &format!("/api/v1/topics/order.reminder/messages/{reminder}"),
        None,
        None,
    );
    assert_eq!(status, 404);
    // Its record is kept: cancelled, when, and no body any more.
    let (status, gone) = http(
        p,
        "GET",
        &format!("/api/v1/topics/order.reminder/messages/{reminder}"),
        None,
        None,
    );
    assert_eq!(
        (status, &gone["state"]),
        (200, &json!("cancelled")),
        "{gone}"
    );
    assert!(gone["finished_at"].is_string(), "{gone}");
    assert_eq!(
        (&gone["data"], &gone["result"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(
        http(p, "POST", "/api/v1/topics/user.welcome/pause", None, None).0,
        200
    );
    assert_eq!(
        http(p, "GET", "/api/v1/topics/user.welcome", None, None).1["paused"],
        true
    );
    assert_eq!(
        http(p, "POST", "/api/v1/topics/user.welcome/resume", None, None).1["was_paused"],
        true
    );
    let (_, chart) = http(
        p,
        "GET",
        "/api/v1/topics/user.welcome/throughput",
        None,
        None,
    );
    let chart = chart.as_array().unwrap();
    assert_eq!(chart.len(), 60);
    assert_eq!(
        chart
            .iter()
            .map(|m| m["published"].as_u64().unwrap())
            .sum::<u64>(),
        3
    );
    let (_, purged) = http(p, "POST", "/api/v1/topics/user.welcome/purge", None, None);
    assert_eq!(
        purged,
        json!({"deleted": {"pending": 3, "active": 0, "delayed": 0, "dead": 0}})
    );
}

/// Dead letters: list with the error, retry one, retry all, delete one, purge.
#[test]
fn api_manages_dead_letters() {
    let redis = RedisServer::start();
    let url = redis.url();
    let ids: Vec<String> = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mq = forgemq::Client::connect(&url).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..4 {
            ids.push(
                mq.publish("email.send", json!({"i": i}))
                    .await
                    .unwrap()
                    .to_string(),
            );
            mq.pop_message("email.send")
                .await
                .unwrap()
                .unwrap()
                .dead(&format!("bounce {i}"))
                .await
                .unwrap();
        }
        ids
    });
    let server = start(&redis, &[]);
    let p = server.port;
    let (_, dead) = http(
        p,
        "GET",
        "/api/v1/topics/email.send/dead-letters",
        None,
        None,
    );
    assert_eq!(dead.as_array().unwrap().len(), 4);
    assert_eq!(
        (dead[0]["error"].as_str(), dead[0]["id"].as_str()),
        (Some("bounce 0"), Some(ids[0].as_str()))
    );
    assert!(dead[0]["died_at"].is_string());
    assert_eq!(
        http(
            p,
            "POST",
            &format!("/api/v1/topics/email.send/dead-letters/{}/retry", ids[0]),
            None,
            None
        )
        .0,
        200
    );
    assert_eq!(
        http(
            p,
            "POST",
            &format!("/api/v1/topics/email.send/dead-letters/{}/retry", ids[0]),
            None,
            None
        )
        .0,
        404
    );
    assert_eq!(
        http(
            p,
            "DELETE",
            &format!("/api/v1/topics/email.send/dead-letters/{}", ids[1]),
            None,
            None
        )
        .0,
        200
    );
    assert_eq!(
        http(
            p,
            "POST",
            "/api/v1/topics/email.send/dead-letters/retry",
            None,
            None
        )
        .1["requeued"],
        2
    );
    let (_, stats) = http(p, "GET", "/api/v1/topics/email.send", None, None);
    assert_eq!(
        (stats["dead"].as_u64(), stats["pending"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(
        http(
            p,
            "DELETE",
            "/api/v1/topics/email.send/dead-letters",
            None,
            None
        )
        .1["deleted"],
        0
    );
}

/// Bad input: 400 for a bad topic or malformed JSON, 413 over the payload limit, 404 for
/// an unknown id; each with `{"error"}` and nothing written.
#[test]
fn api_refuses_bad_input_with_4xx_and_writes_nothing() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    for (path, body, want) in [
        ("/api/v1/topics/bad%20topic/messages", r#"{"data":1}"#, 400),
        ("/api/v1/topics/a%7Bb%7D/messages", r#"{"data":1}"#, 400),
        ("/api/v1/topics/ok.topic/messages", r#"{"data":"#, 400),
        ("/api/v1/topics/ok.topic/messages", r#"{"dta":1}"#, 400),
        (
            "/api/v1/topics/ok.topic/messages",
            r#"{"data":1,"delay_ms":"soon"}"#,
            400,
        ),
        // A struct's fields as an array: serde reads it, the API does not offer it.
        ("/api/v1/topics/ok.topic/messages", "[1, null]", 400),
        ("/api/v1/topics/ok.topic/messages/batch", "[[1, null]]", 400),
        ("/api/v1/topics/ok.topic/messages/batch", "[{}]", 400),
        (
            "/api/v1/topics/ok.topic/messages",
            r#"{"data":1,"unique_ttl_ms":0}"#,
            400,
        ),
        (
            "/api/v1/topics/ok.topic/messages",
            r#"{"data":1,"delay_ms":-1}"#,
            400,
        ),
    ] {
        let (status, err) = http(p, "POST", path, None, Some(body));
        assert_eq!(status, want, "{path} {body}: {err}");
        assert!(
            err["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{err}"
        );
    }
    let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(1024 * 1024 + 10));
    let (status, err) = http(
        p,
        "POST",
        "/api/v1/topics/ok.topic/messages",
        None,
        Some(&big),
    );
    assert_eq!(status, 413, "{err}");
    let (status, _) = http(
        p,
        "POST",
        "/api/v1/topics/ok.topic/dead-letters/nope/retry",
        None,
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = http(
        p,
        "GET",
        "/api/v1/topics/ok.topic/messages?state=sideways",
        None,
        None,
    );
    assert_eq!(status, 400);
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut redis.conn()).unwrap();
    assert_eq!(dbsize, 0);
}

/// With a token, the API needs `Authorization: Bearer`; health stays open.
#[test]
fn token_guards_the_api() {
    let redis = RedisServer::start();
    let server = start(&redis, &["--token", "s3cret"]);
    let p = server.port;
    assert_eq!(http(p, "GET", "/api/v1/topics", None, None).0, 401);
    assert_eq!(http(p, "GET", "/api/v1/topics", Some("wrong"), None).0, 401);
    assert_eq!(
        http(p, "GET", "/api/v1/topics", Some("s3cret"), None).0,
        200
    );
    assert_eq!(http(p, "GET", "/healthz", None, None).0, 200);
}

/// An empty token is refused (it would let anyone in), and paging past anything is empty.
#[test]
fn empty_token_is_refused_and_huge_offsets_are_harmless() {
    let redis = RedisServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(["serve", "--bind", "0.0.0.0:0", "--token", ""])
        .env("REDIS_URL", redis.url())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = start(&redis, &[]);
    let (status, body) = http(
        server.port,
        "GET",
        "/api/v1/topics/t.x/messages?offset=9007199254740991&limit=1000",
        None,
        None,
    );
    assert_eq!((status, body), (200, json!([])));
    // Past the documented maximum (2^53 - 1) is a clear 400, not a wrapped number.
    let (status, body) = http(
        server.port,
        "GET",
        "/api/v1/topics/t.x/messages?offset=18446744073709551615",
        None,
        None,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("9007199254740991"),
        "{body}"
    );
}

/// A non-loopback bind without a token is refused at start-up, saying why.
#[test]
fn non_loopback_bind_without_token_is_refused() {
    let redis = RedisServer::start();
    let out = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(["serve", "--bind", "0.0.0.0:0"])
        .env("REDIS_URL", redis.url())
        .env_remove("FORGEMQ_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without a token") && err.contains("--token"),
        "{err}"
    );
}

/// `/healthz` is the process; `/readyz` is Redis reachable and writable (503 otherwise),
/// within a second (its answer is cached that long).
#[test]
fn readyz_follows_redis() {
    let mut redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    assert_eq!(http(p, "GET", "/readyz", None, None).0, 200);
    redis.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http(p, "GET", "/readyz", None, None);
        if status == 503 {
            assert!(body["error"].is_string(), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "still {status} with Redis down");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http(p, "GET", "/healthz", None, None).0, 200);
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(p, "GET", "/readyz", None, None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again after Redis came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `/metrics` has per-topic depth by state and the totals, `forgemq_` prefixed.
#[test]
fn metrics_report_depth_and_totals_per_topic() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    for _ in 0..3 {
        http(
            p,
            "POST",
            "/api/v1/topics/user.welcome/messages",
            None,
            Some(r#"{"data":1}"#),
        );
    }
    http(
        p,
        "POST",
        "/api/v1/topics/order.reminder/messages",
        None,
        Some(r#"{"data":1,"delay_ms":60000}"#),
    );
    let (status, body) = http(p, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    let text = body.as_str().unwrap().to_owned();
    // Every sample line parses as `name{labels} value`.
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
        assert!(
            series.starts_with("forgemq_") && value.parse::<f64>().is_ok(),
            "bad line {l}"
        );
    }
    // Without an `Accept` asking for OpenMetrics (curl, promtool): the Prometheus text
    // format, where a counter family is named like its samples.
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.lines()
            .any(|l| l == "# TYPE forgemq_published_total counter"),
        "{text}"
    );
    // Prometheus asks for OpenMetrics, and gets it, with the same series.
    let open = request(
        p,
        "GET",
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )],
        None,
    );
    assert_eq!(
        open.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let open = open.body.as_str().unwrap().to_owned();
    assert!(
        open.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    assert!(open.contains("\nforgemq_published_total{topic=\"user.welcome\"} 3\n"));
    for line in [
        r#"forgemq_messages{topic="user.welcome",state="pending"} 3"#,
        r#"forgemq_messages{topic="order.reminder",state="delayed"} 1"#,
        r#"forgemq_published_total{topic="user.welcome"} 3"#,
        r#"forgemq_processed_total{topic="user.welcome"} 0"#,
        r#"forgemq_dead_total{topic="order.reminder"} 0"#,
        r#"forgemq_recovered_total{topic="user.welcome"} 0"#,
        r#"forgemq_deduplicated_total{topic="user.welcome"} 0"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line} in:\n{text}"
        );
    }
}

/// `/metrics` as text, and the value of the sample named `series` in it (`None` when
/// there is no such sample).
fn metrics_text(port: u16) -> String {
    let (status, body) = http(port, "GET", "/metrics", None, None);
    assert_eq!(status, 200, "{body}");
    body.as_str().unwrap().to_owned()
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `/metrics` shows who consumes a topic and how far behind it is: live workers, their
/// slots, what they run now, and the queue latency (the oldest pending message's age).
#[test]
fn metrics_show_workers_in_flight_and_queue_latency() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mq = rt.block_on(forgemq::Client::connect(&redis.url())).unwrap();
    for n in 0..5 {
        rt.block_on(mq.publish("user.welcome", json!(n))).unwrap();
    }
    let text = metrics_text(p);
    assert_eq!(
        sample(&text, r#"forgemq_workers{topic="user.welcome"}"#),
        Some(0.0)
    );
    assert!(
        sample(
            &text,
            r#"forgemq_oldest_pending_age_seconds{topic="user.welcome"}"#
        )
        .is_some_and(|age| age >= 0.0),
        "{text}"
    );
    // Handlers that hold their message until released: two at a time.
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let worker = Worker::builder(mq.clone())
        .name("welcomer")
        .subscribe_with("user.welcome", Subscription::new().concurrency(2), {
            let release = Arc::clone(&release);
            move |_msg: Message<Value>| {
                let release = Arc::clone(&release);
                async move {
                    release.acquire().await.unwrap().forget();
                    Ok::<(), HandlerError>(())
                }
            }
        })
        .heartbeat_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = rt.spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = metrics_text(p);
        if sample(&text, r#"forgemq_in_flight{topic="user.welcome"}"#) == Some(2.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "never 2 in flight:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        sample(&text, r#"forgemq_workers{topic="user.welcome"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"forgemq_worker_slots{topic="user.welcome"}"#),
        Some(2.0)
    );
    // Some are still waiting (the worker may hold a few fetched ahead, as active), and
    // they have waited since they were published, before the worker started.
    let pending = sample(
        &text,
        r#"forgemq_messages{topic="user.welcome",state="pending"}"#,
    );
    assert!(pending.is_some_and(|n| n >= 1.0), "{text}");
    let age = sample(
        &text,
        r#"forgemq_oldest_pending_age_seconds{topic="user.welcome"}"#,
    );
    assert!(age.is_some_and(|a| a > 0.0 && a < 60.0), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"forgemq_oldest_dead_age_seconds{topic="user.welcome"}"#
        ),
        Some(0.0),
        "no dead letters: 0"
    );
    // All done and the worker stopped: nothing pending, nobody consuming.
    release.add_permits(5);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sample(
        &metrics_text(p),
        r#"forgemq_processed_total{topic="user.welcome"}"#,
    ) != Some(5.0)
    {
        assert!(Instant::now() < deadline, "not all processed");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.send(()).unwrap();
    rt.block_on(running).unwrap().unwrap();
    let text = metrics_text(p);
    for (series, value) in [
        (r#"forgemq_workers{topic="user.welcome"}"#, 0.0),
        (r#"forgemq_worker_slots{topic="user.welcome"}"#, 0.0),
        (r#"forgemq_in_flight{topic="user.welcome"}"#, 0.0),
        (
            r#"forgemq_oldest_pending_age_seconds{topic="user.welcome"}"#,
            0.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series}:\n{text}");
    }
}

/// With Redis gone, a scrape still succeeds (200) and says so with `forgemq_redis_up 0`,
/// rather than failing the scrape; `--log-format json` writes every stderr line as a JSON
/// object, the start-up line and the warning about that scrape included.
#[test]
fn metrics_say_redis_is_down_and_logs_are_json() {
    let mut redis = RedisServer::start();
    let mut server = start(&redis, &["--log-format", "json"]);
    let p = server.port;
    http(
        p,
        "POST",
        "/api/v1/topics/user.welcome/messages",
        None,
        Some(r#"{"data":1}"#),
    );
    let text = metrics_text(p);
    assert_eq!(sample(&text, "forgemq_redis_up"), Some(1.0), "{text}");
    redis.kill9();
    let text = metrics_text(p);
    assert_eq!(sample(&text, "forgemq_redis_up"), Some(0.0), "{text}");
    assert!(
        !text.contains("forgemq_messages{"),
        "no stale per-topic series: {text}"
    );
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let mut err = String::new();
    server
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let events: Vec<Value> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let message = |e: &Value| {
        e["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "INFO" && message(e).starts_with("forgemq serve: API at")),
        "{err}"
    );
    assert!(
        events.iter().any(|e| e["level"] == "WARN"
            && message(e).contains("/metrics")
            && e["timestamp"].is_string()),
        "{err}"
    );
}

/// The OpenAPI document lists every route the server has.
#[test]
fn openapi_matches_the_routes() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let (status, doc) = http(server.port, "GET", "/api/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/topics/{topic}/messages", "post"),
        ("/topics/{topic}/messages", "get"),
        ("/topics/{topic}/messages/batch", "post"),
        ("/topics", "get"),
        ("/topics/{topic}", "get"),
        ("/topics/{topic}/messages/{id}", "delete"),
        ("/topics/{topic}/dead-letters", "get"),
        ("/topics/{topic}/dead-letters", "delete"),
        ("/topics/{topic}/dead-letters/{id}/retry", "post"),
        ("/topics/{topic}/dead-letters/{id}", "delete"),
        ("/topics/{topic}/dead-letters/retry", "post"),
        ("/topics/{topic}/pause", "post"),
        ("/topics/{topic}/resume", "post"),
        ("/topics/{topic}/purge", "post"),
        ("/topics/{topic}/throughput", "get"),
        ("/topics/{topic}/messages/{id}", "get"),
        ("/topics/{topic}/dead-letters/delete", "post"),
        ("/topics/{topic}/workers", "get"),
        ("/workers", "get"),
        ("/throughput", "get"),
        ("/schedules", "get"),
        ("/schedules/{name}", "get"),
        ("/schedules/{name}", "put"),
        ("/schedules/{name}", "delete"),
        ("/schedules/{name}/run", "post"),
        ("/limits", "get"),
        ("/topics/{topic}/limit", "get"),
        ("/topics/{topic}/limit", "put"),
        ("/topics/{topic}/limit", "delete"),
        ("/topics/{topic}/groups", "get"),
        ("/topics/{topic}/groups/{group}", "put"),
        ("/topics/{topic}/groups/{group}", "delete"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "openapi lacks {method} {path}"
        );
    }
    // And every documented route answers (not 404/405) on this server.
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{topic}", "doc.check")
                .replace("{id}", "x")
                .replace("{name}", "x")
                .replace("{group}", "x");
            let (status, _) = http(
                server.port,
                &method.to_uppercase(),
                &format!("/api/v1{concrete}"),
                None,
                Some("{\"data\":1}"),
            );
            assert!(
                // A 404 is only acceptable for the made-up id `x`, and for the limit of a
                // topic that has none.
                status != 405
                    && (status != 404 || concrete.contains("/x") || concrete.ends_with("/limit")),
                "{method} {concrete}: {status}"
            );
        }
    }
}

/// `forgemq dev` with no Redis given starts its own (AOF on, under ./.forgemq/), serves
/// the API, and stops that Redis when it is stopped.
#[test]
fn dev_starts_a_private_redis_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(["dev", "--bind", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .env_remove("REDIS_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "forgemq dev did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        http(port, "GET", "/", None, None).0,
        200,
        "the dashboard is served"
    );
    assert_eq!(http(port, "GET", "/readyz", None, None).0, 200);
    let (status, _) = http(
        port,
        "POST",
        "/api/v1/topics/user.welcome/messages",
        None,
        Some(r#"{"data":{"hello":"dev"}}"#),
    );
    assert_eq!(status, 201);
    assert_eq!(
        request(
            port,
            "GET",
            "/api/v1/topics",
            &[("Host", "rebind.example")],
            None
        )
        .status,
        403,
        "dev has the Host check too"
    );
    assert!(dir.path().join(".forgemq").exists());
    let ok = Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // It says where the dashboard is and gives a publish line that works as printed.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("http://127.0.0.1:{port}/")),
        "{said}"
    );
    let line = said
        .lines()
        .find(|l| l.contains(" publish user.welcome "))
        .unwrap_or_else(|| panic!("no publish line in: {said}"));
    assert!(line.contains("--redis redis://127.0.0.1:"), "{line}");
    let redis_port: u16 = log
        .split("private redis-server on port ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in: {log}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", redis_port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the private redis-server outlived forgemq dev"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Rebinding a name to 127.0.0.1 does not make a loopback server answer it: a foreign
/// `Host` gets 403 with a JSON error naming `--allow-host`, everywhere but the probes.
#[test]
fn foreign_host_is_refused_on_loopback() {
    let redis = RedisServer::start();
    let server = start(&redis, &["--allow-host", "mq.internal"]);
    let p = server.port;
    let evil = format!("rebind.example:{p}");
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/api/v1/topics"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/topics/user.welcome/messages"),
        ("POST", "/api/v1/topics/user.welcome/messages"),
        ("POST", "/api/v1/topics/user.welcome/purge"),
    ] {
        let reply = request(
            p,
            method,
            path,
            &[("Host", &evil)],
            (method == "POST").then_some(r#"{"data":1}"#),
        );
        assert_eq!(reply.status, 403, "{method} {path}: {}", reply.body);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let error = reply.body["error"].as_str().unwrap_or_default();
        assert!(error.contains("--allow-host"), "{error}");
    }
    // A request without Host at all is not this server's either.
    let reply = request(p, "GET", "/api/v1/topics", &[("Host", "")], None);
    assert_eq!(reply.status, 403, "{}", reply.body);
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut redis.conn()).unwrap();
    assert_eq!(dbsize, 0, "a refused request wrote something");
    // Infrastructure probes by IP or any name.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = request(p, "GET", path, &[("Host", &evil)], None);
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
    }
    // Its own names, and the allowed one with or without a port.
    let allowed = [
        format!("127.0.0.1:{p}"),
        format!("localhost:{p}"),
        format!("LocalHost:{p}"),
        format!("[::1]:{p}"),
        "mq.internal".to_owned(),
        format!("mq.internal:{p}"),
    ];
    for host in &allowed {
        let reply = request(p, "GET", "/api/v1/topics", &[("Host", host)], None);
        assert_eq!(reply.status, 200, "{host}: {}", reply.body);
    }
    // The right name on another port is not this server.
    let reply = request(
        p,
        "GET",
        "/api/v1/topics",
        &[("Host", &format!("localhost:{}", p.wrapping_add(1)))],
        None,
    );
    assert_eq!(reply.status, 403);
}

/// A page on another site cannot make a browser change anything: a POST, PUT or DELETE
/// with a foreign `Origin` gets 403, whatever the bind; the server's own origin works.
#[test]
fn cross_origin_writes_are_refused() {
    let redis = RedisServer::start();
    let local = start(&redis, &[]);
    // Bound to every interface (so no Host check), with a token: the Origin check holds.
    let wide = start_on(&redis, "0.0.0.0", &["--token", "s3cret"]);
    for (server, auth) in [(&local, ""), (&wide, "Bearer s3cret")] {
        let p = server.port;
        let own = format!("http://127.0.0.1:{p}");
        let id = request(
            p,
            "POST",
            "/api/v1/topics/order.paid/messages",
            &[("Authorization", auth)],
            Some(r#"{"data":1}"#),
        );
        assert_eq!(id.status, 201, "{}", id.body);
        for (method, path) in [
            ("POST", "/api/v1/topics/order.paid/purge"),
            ("POST", "/api/v1/topics/order.paid/pause"),
            ("POST", "/api/v1/topics/order.paid/dead-letters/retry"),
            ("POST", "/api/v1/topics/order.paid/messages"),
            ("DELETE", "/api/v1/topics/order.paid/dead-letters"),
            ("PUT", "/api/v1/topics/order.paid/messages"),
        ] {
            for origin in [
                "http://evil.example",
                "null",
                &format!("http://127.0.0.1:{p}.evil.example"),
            ] {
                let reply = request(
                    p,
                    method,
                    path,
                    &[("Authorization", auth), ("Origin", origin)],
                    None,
                );
                assert_eq!(
                    reply.status, 403,
                    "{method} {path} from {origin}: {}",
                    reply.body
                );
                assert!(reply.body["error"].is_string(), "{}", reply.body);
            }
        }
        let stats = request(
            p,
            "GET",
            "/api/v1/topics/order.paid",
            &[("Authorization", auth), ("Origin", "http://evil.example")],
            None,
        );
        assert_eq!(stats.status, 200, "reads carry no Origin check");
        assert_eq!(
            (
                stats.body["pending"].as_u64(),
                stats.body["paused"].as_bool()
            ),
            (Some(1), Some(false)),
            "a refused request changed something: {}",
            stats.body
        );
        let reply = request(
            p,
            "POST",
            "/api/v1/topics/order.paid/purge",
            &[("Authorization", auth), ("Origin", &own)],
            None,
        );
        assert_eq!(reply.status, 200, "same origin: {}", reply.body);
        assert_eq!(reply.body["deleted"]["pending"], 1);
    }
}

/// With a token, `/metrics` needs it too (it names every topic); `--metrics-public`
/// leaves it open; the health probes stay open.
#[test]
fn metrics_need_the_token_when_one_is_set() {
    let redis = RedisServer::start();
    let guarded = start(&redis, &["--token", "s3cret"]);
    let p = guarded.port;
    let (status, body) = http(p, "GET", "/metrics", None, None);
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(http(p, "GET", "/metrics", Some("wrong"), None).0, 401);
    assert_eq!(http(p, "GET", "/metrics", Some("s3cret"), None).0, 200);
    assert_eq!(http(p, "GET", "/healthz", None, None).0, 200);
    assert_eq!(http(p, "GET", "/readyz", None, None).0, 200);
    let public = start(&redis, &["--token", "s3cret", "--metrics-public"]);
    assert_eq!(http(public.port, "GET", "/metrics", None, None).0, 200);
    assert_eq!(
        http(public.port, "GET", "/api/v1/topics", None, None).0,
        401,
        "--metrics-public opens /metrics only"
    );
}

/// `/readyz` answers from a cache for a second: probes every few milliseconds do not
/// each write to Redis.
#[test]
fn readyz_writes_to_redis_at_most_once_a_second() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let sets = || -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut redis.conn())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_set:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    };
    assert_eq!(http(server.port, "GET", "/readyz", None, None).0, 200);
    let before = sets();
    let started = Instant::now();
    for _ in 0..40 {
        assert_eq!(http(server.port, "GET", "/readyz", None, None).0, 200);
    }
    let elapsed = started.elapsed();
    let writes = sets() - before;
    // One write per started second, plus one for the window the loop began in.
    let allowed = elapsed.as_secs() + 1;
    assert!(
        writes <= allowed,
        "{writes} writes for 40 probes in {elapsed:?}"
    );
}

/// The scheme of `Authorization` is case-insensitive (RFC 9110): `bearer` works.
#[test]
fn bearer_scheme_is_case_insensitive() {
    let redis = RedisServer::start();
    let server = start(&redis, &["--token", "s3cret"]);
    for auth in [
        "Bearer s3cret",
        "bearer s3cret",
        "BEARER s3cret",
        "Bearer   s3cret",
    ] {
        let reply = request(
            server.port,
            "GET",
            "/api/v1/topics",
            &[("Authorization", auth)],
            None,
        );
        assert_eq!(reply.status, 200, "{auth}: {}", reply.body);
    }
    for auth in ["Basic s3cret", "Bearers3cret", "s3cret", "Bearer s3cret2"] {
        let reply = request(
            server.port,
            "GET",
            "/api/v1/topics",
            &[("Authorization", auth)],
            None,
        );
        assert_eq!(reply.status, 401, "{auth}");
    }
}

/// Bad query strings and path parameters get the same JSON `{"error"}` as any other 400,
/// not axum's plain-text rejection.
#[test]
fn query_string_errors_are_json() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    for path in [
        "/api/v1/topics/t.x/messages?limit=-1",
        "/api/v1/topics/t.x/messages?offset=soon",
        "/api/v1/topics/t.x/messages?state=sideways",
        "/api/v1/topics/t.x/messages?state=",
        "/api/v1/topics/t.x/dead-letters?limit=1.5",
        "/api/v1/topics/%FF/messages",
    ] {
        let reply = request(server.port, "GET", path, &[], None);
        assert_eq!(reply.status, 400, "{path}: {}", reply.body);
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{path}"
        );
        assert!(reply.body["error"].is_string(), "{path}: {}", reply.body);
    }
    // Integral numbers written as floats are numbers all the same.
    let reply = request(
        server.port,
        "POST",
        "/api/v1/topics/t.x/messages",
        &[],
        Some(r#"{"data":1,"max_retry":5.0,"delay_ms":1e3}"#),
    );
    assert_eq!(reply.status, 201, "{}", reply.body);
    let reply = request(server.port, "GET", "/api/v1/nothing/here", &[], None);
    assert_eq!(reply.status, 404);
    assert!(reply.body["error"].is_string(), "{}", reply.body);
}

/// The OpenAPI document says what the server does: where it is, how to authenticate,
/// every status an operation answers, real response schemas, the rules of parameters.
#[test]
fn openapi_describes_what_the_server_does() {
    let redis = RedisServer::start();
    let server = start(&redis, &["--token", "s3cret"]);
    let (status, doc) = http(
        server.port,
        "GET",
        "/api/v1/openapi.json",
        Some("s3cret"),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(doc["servers"][0]["url"], "/api/v1", "{}", doc["servers"]);
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["scheme"].as_str()),
        (Some("http"), Some("bearer")),
        "{scheme}"
    );
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    let resolve = |v: &Value| -> Value {
        match v["$ref"].as_str() {
            Some(r) => {
                let pointer = r.trim_start_matches('#');
                doc.pointer(pointer).cloned().unwrap_or(Value::Null)
            }
            None => v.clone(),
        }
    };
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let responses = op["responses"].as_object().unwrap();
            for code in ["401", "403", "503"] {
                assert!(responses.contains_key(code), "{method} {path} lacks {code}");
            }
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            if path.contains("{topic}") {
                assert!(responses.contains_key("400"), "{method} {path} lacks 400");
                let topic = params.iter().find(|p| p["name"] == "topic").unwrap();
                assert_eq!(
                    topic["schema"]["pattern"], "^[A-Za-z0-9._:-]{1,200}$",
                    "{method} {path}"
                );
            }
            for (code, response) in responses {
                let response = resolve(response);
                let schema = &response["content"]["application/json"]["schema"];
                let schema = resolve(schema);
                let bare = schema == json!({"type": "object"})
                    || schema["items"] == json!({"type": "object"});
                assert!(!bare, "{method} {path} {code}: bare object schema");
                assert!(!schema.is_null(), "{method} {path} {code}: no JSON schema");
            }
            for p in &params {
                if p["schema"]["type"] == "integer" {
                    assert_eq!(p["schema"]["minimum"], 0, "{method} {path} {}", p["name"]);
                    assert_ne!(
                        p["schema"]["format"], "int64",
                        "{method} {path} {}",
                        p["name"]
                    );
                }
            }
        }
    }
    assert_eq!(operations, 33);
    let peek = &doc["paths"]["/topics/{topic}/messages"]["get"]["parameters"];
    let state = peek
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "state")
        .unwrap();
    let state = resolve(&state["schema"]);
    let state = if state["oneOf"].is_array() {
        resolve(&state["oneOf"][0])
    } else {
        state
    };
    assert_eq!(
        state["enum"],
        json!(["pending", "delayed", "active", "dead"]),
        "{state}"
    );
    let dead = &doc["paths"]["/topics/{topic}/dead-letters"]["get"]["parameters"];
    assert!(
        !dead
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "state"),
        "the dead-letter list has no state parameter: {dead}"
    );
    let stats = resolve(
        &doc["paths"]["/topics/{topic}"]["get"]["responses"]["200"]["content"]["application/json"]
            ["schema"],
    );
    for field in [
        "topic",
        "pending",
        "dead",
        "duplicate_runs",
        "paused",
        "oldest_pending_age_ms",
        "oldest_dead_age_ms",
        "next_due_in_ms",
        "workers",
        "worker_slots",
        "in_flight",
        "partition",
        "partitions",
    ] {
        assert!(
            stats["properties"][field].is_object(),
            "stats schema lacks {field}: {stats}"
        );
    }
    let create = &doc["paths"]["/topics"]["post"]["responses"];
    for code in ["200", "201", "400", "409"] {
        assert!(
            create[code].is_object(),
            "POST /topics lacks {code}: {create}"
        );
    }
}

/// `"unique_until": "ttl"` keeps the key for its whole ttl, also after the message was
/// processed; the default (`final`) frees it then.
#[test]
fn publish_takes_unique_until() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    let url = redis.url();
    let settle = || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let mq = forgemq::Client::connect(&url).await.unwrap();
            while let Some(d) = mq.pop_message("order.reminder").await.unwrap() {
                d.ack().await.unwrap();
            }
        })
    };
    for (until, batch, again) in [
        ("ttl", false, 200),
        ("final", false, 201),
        ("ttl", true, 201),
        ("final", true, 201),
    ] {
        let key = format!("r-{until}-{batch}");
        let one = format!(r#"{{"data":1,"unique_key":"{key}","unique_until":"{until}"}}"#);
        let (path, body) = if batch {
            (
                "/api/v1/topics/order.reminder/messages/batch",
                format!("[{one}]"),
            )
        } else {
            ("/api/v1/topics/order.reminder/messages", one)
        };
        let (status, first) = http(p, "POST", path, None, Some(&body));
        assert_eq!(status, 201, "{first}");
        settle();
        let (status, second) = http(p, "POST", path, None, Some(&body));
        let duplicate = second["duplicate"] == true || second["duplicates"] == 1;
        let want_duplicate = until == "ttl";
        assert_eq!(duplicate, want_duplicate, "{until} batch={batch}: {second}");
        if !batch {
            assert_eq!(status, again, "{until}: {second}");
        }
    }
    let (status, body) = http(
        p,
        "POST",
        "/api/v1/topics/order.reminder/messages",
        None,
        Some(r#"{"data":1,"unique_key":"k","unique_until":"forever"}"#),
    );
    assert_eq!(status, 400, "{body}");
}

/// `/metrics` has the duplicate runs of each topic (DESIGN rule 7: each one counted).
#[test]
fn metrics_count_duplicate_runs() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    http(
        server.port,
        "POST",
        "/api/v1/topics/user.welcome/messages",
        None,
        Some(r#"{"data":1}"#),
    );
    let _: i64 = redis::cmd("HINCRBY")
        .arg("mq:{user.welcome}:stats")
        .arg("duplicate_runs")
        .arg(2)
        .query(&mut redis.conn())
        .unwrap();
    let (status, body) = http(server.port, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    let text = body.as_str().unwrap();
    let line = r#"forgemq_duplicate_runs_total{topic="user.welcome"} 2"#;
    assert!(
        text.lines().any(|l| l == line),
        "missing {line} in:\n{text}"
    );
}

/// Starts `forgemq dev` in `dir` on `port`; stdout and stderr piped.
fn spawn_dev(dir: &std::path::Path, port: u16, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args(["dev", "--bind", &format!("127.0.0.1:{port}")])
        .args(extra)
        .current_dir(dir)
        .env_remove("REDIS_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit within `limit` (killing it past that); its output.
fn finish(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}; stdout: {} stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A second `forgemq dev` in the same folder would append to the same AOF from a second
/// redis-server: it is refused, saying why, and the first keeps running.
#[test]
fn second_dev_in_the_same_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let first = Server {
        child: spawn_dev(dir.path(), port, &[]),
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err()
        || http(port, "GET", "/readyz", None, None).0 != 200
    {
        assert!(
            Instant::now() < deadline,
            "the first forgemq dev did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = finish(
        spawn_dev(dir.path(), free_port(), &[]),
        Duration::from_secs(20),
    );
    let err = String::from_utf8_lossy(&second.stderr);
    let said = String::from_utf8_lossy(&second.stdout);
    assert_eq!(second.status.code(), Some(1), "{said}{err}");
    assert!(err.contains(".forgemq") && err.contains("already"), "{err}");
    assert!(!said.contains("ForgeMQ is running"), "{said}");
    assert!(
        !err.contains("private redis-server"),
        "a second redis-server was started: {err}"
    );
    assert_eq!(http(first.port, "GET", "/readyz", None, None).0, 200);
}

/// `forgemq dev` on a port that is taken fails before it starts redis-server or says that
/// anything is running.
#[test]
fn dev_binds_the_port_before_announcing_or_starting_redis() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = finish(spawn_dev(dir.path(), port, &[]), Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!said.contains("ForgeMQ is running"), "{said}");
    assert!(!err.contains("private redis-server"), "{err}");
    assert!(
        !dir.path().join(".forgemq").join("redis.log").exists(),
        "redis-server was started"
    );
}

/// On a 3-master Redis Cluster: a topic is created over 4 partitions (201, then 200 for
/// the same count), published to by partition key (one and a batch), read as one topic
/// with its partitions, cancelled by id, shown once in /metrics; changing the count while
/// it holds messages is 409, bad input 400, and nothing changes.
#[test]
fn api_works_on_a_redis_cluster() {
    let cluster = TestCluster::start(3, 0);
    let server = start_at(&cluster.url(), "127.0.0.1", &[]);
    let p = server.port;
    let create = |body: &str| http(p, "POST", "/api/v1/topics", None, Some(body));

    let (status, body) = create(r#"{"topic":"hot.orders","partitions":4}"#);
    assert_eq!(
        (status, body.clone()),
        (201, json!({"topic": "hot.orders", "partitions": 4}))
    );
    let (status, body) = create(r#"{"topic":"hot.orders","partitions":4}"#);
    assert_eq!(
        (status, body),
        (200, json!({"topic": "hot.orders", "partitions": 4}))
    );
    assert_eq!(create(r#"{"topic":"plain.one"}"#).0, 201);
    for bad in [
        r#"{"topic":"hot.orders","partitions":0}"#,
        r#"{"topic":"hot.orders","partitions":1025}"#,
        r#"{"topic":"hot#orders","partitions":2}"#,
        r#"{"topic":"hot.orders","partitions":"2"}"#,
        r#"{"topic":"hot.orders","partitions":2,"extra":1}"#,
        r#"{"partitions":2}"#,
        r#"[]"#,
    ] {
        let (status, body) = create(bad);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].is_string(), "{bad}: {body}");
    }

    let (status, one) = http(
        p,
        "POST",
        "/api/v1/topics/hot.orders/messages",
        None,
        Some(r#"{"data":{"order":1},"partition_key":"customer-1"}"#),
    );
    assert_eq!(status, 201, "{one}");
    let items: Vec<Value> = (0..8)
        .map(|i| json!({"data": {"order": i}, "partition_key": format!("customer-{}", i % 4)}))
        .collect();
    let (status, batch) = http(
        p,
        "POST",
        "/api/v1/topics/hot.orders/messages/batch",
        None,
        Some(&Value::from(items).to_string()),
    );
    assert_eq!(status, 201, "{batch}");

    let (_, stats) = http(p, "GET", "/api/v1/topics/hot.orders", None, None);
    assert_eq!(stats["pending"], 9, "{stats}");
    let parts = stats["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 4, "{stats}");
    assert!(
        parts
            .iter()
            .filter(|p| p["pending"].as_u64() > Some(0))
            .count()
            > 1,
        "{stats}"
    );
    let (_, all) = http(p, "GET", "/api/v1/topics", None, None);
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["topic"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hot.orders", "plain.one"]);

    // Same count: 200 even with messages; another count: 409, and nothing changes.
    assert_eq!(create(r#"{"topic":"hot.orders","partitions":4}"#).0, 200);
    let (status, body) = create(r#"{"topic":"hot.orders","partitions":2}"#);
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("holds 9 message(s)"),
        "{body}"
    );
    let (_, stats) = http(p, "GET", "/api/v1/topics/hot.orders", None, None);
    assert_eq!(stats["partitions"].as_array().unwrap().len(), 4);

    // An id-based operation without naming the partition.
    let id = one["id"].as_str().unwrap();
    let (status, cancelled) = http(
        p,
        "DELETE",
        &format!("/api/v1/topics/hot.orders/messages/{id}"),
        None,
        None,
    );
    assert_eq!((status, cancelled["was"].as_str()), (200, Some("pending")));
    let (_, peeked) = http(
        p,
        "GET",
        "/api/v1/topics/hot.orders/messages?limit=100",
        None,
        None,
    );
    assert_eq!(peeked.as_array().unwrap().len(), 8, "{peeked}");

    // /metrics: the topic once, with its sums and its partition count.
    let (_, text) = http(p, "GET", "/metrics", None, None);
    let text = text.as_str().unwrap();
    for line in [
        r#"forgemq_messages{topic="hot.orders",state="pending"} 8"#,
        r#"forgemq_published_total{topic="hot.orders"} 9"#,
        r#"forgemq_partitions{topic="hot.orders"} 4"#,
        r#"forgemq_partitions{topic="plain.one"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line} in:\n{text}"
        );
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with(r#"forgemq_messages{topic="hot.orders""#))
            .count(),
        4,
        "one series per state, none per partition:\n{text}"
    );
    assert_eq!(http(p, "GET", "/readyz", None, None).0, 200);
}

/// With `--replicas 1` on a Redis without replicas, a publish is stored on the master but
/// not confirmed: 503, naming the id to send it again with; a batch says the same.
#[test]
fn publish_not_confirmed_by_replicas_is_503_naming_the_id() {
    let redis = RedisServer::start();
    let server = start(&redis, &["--replicas", "1", "--replicas-timeout", "50ms"]);
    let p = server.port;
    let (status, body) = http(
        p,
        "POST",
        "/api/v1/topics/order.paid/messages",
        None,
        Some(r#"{"data":{"order":1}}"#),
    );
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("only 0 of 1 replicas"), "{error}");
    let (_, peeked) = http(p, "GET", "/api/v1/topics/order.paid/messages", None, None);
    let id = peeked[0]["id"].as_str().unwrap();
    assert!(
        error.starts_with(&format!("message {id} is stored on the master"))
            && error.contains(&format!(r#""id": "{id}""#)),
        "{error}"
    );
    let (status, body) = http(
        p,
        "POST",
        "/api/v1/topics/order.paid/messages/batch",
        None,
        Some(r#"[{"data":2},{"data":3}]"#),
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not yet on enough replicas"),
        "{body}"
    );
    // Reads and health don't wait for replicas.
    assert_eq!(http(p, "GET", "/readyz", None, None).0, 200);
}

/// Polls `GET path` until `want(body)` holds (20 s), and returns that body.
fn http_until(port: u16, path: &str, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http(port, "GET", path, None, None);
        if status == 200 && want(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last answer {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The operator's view: live workers with what they run, queue latency and worker counts
/// per topic, a message found by id in any state, and the holder of a running one.
#[test]
fn api_shows_workers_latency_and_finds_messages() {
    let redis = RedisServer::start();
    let url = redis.url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mq = rt.block_on(forgemq::Client::connect(&url)).unwrap();
    let (running, waiting) = rt.block_on(async {
        let running = mq
            .publish_batch("email.send", (0..3).map(|i| json!({"i": i})))
            .await
            .unwrap();
        let waiting = mq
            .publish("order.cancel", json!({"order": 7}))
            .await
            .unwrap();
        (running, waiting)
    });
    // A worker whose handlers hold their messages until the test ends.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let worker = Worker::builder(mq.clone())
        .name("mailer")
        .heartbeat_interval(Duration::from_millis(300))
        .subscribe_with(
            "email.send",
            Subscription::new().concurrency(4),
            move |_m: Message<Value>| {
                let g = g.clone();
                async move {
                    let _ = g.acquire().await;
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .build()
        .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let handle = rt.spawn(async move { worker.run_until(s.notified()).await });
    let server = start(&redis, &[]);
    let port = server.port;

    let workers = http_until(port, "/api/v1/workers", "the worker runs 3", |b| {
        b[0]["running"].as_array().map(Vec::len) == Some(3) && b[0]["topics"][0]["in_flight"] == 3
    });
    let w = &workers[0];
    assert_eq!(workers.as_array().unwrap().len(), 1, "{workers}");
    assert_eq!(w["name"], "mailer");
    assert_eq!(w["state"], "running");
    assert_eq!(w["pid"], std::process::id());
    assert_eq!(
        w["topics"],
        json!([{"topic": "email.send", "concurrency": 4, "in_flight": 3}])
    );
    let holder = w["id"].as_str().unwrap().to_owned();
    let mut ids: Vec<&str> = w["running"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["topic"], "email.send");
            assert!(r["started_at"].is_string(), "{r}");
            r["id"].as_str().unwrap()
        })
        .collect();
    ids.sort_unstable();
    let mut want: Vec<String> = running.iter().map(ToString::to_string).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    let (status, of_topic) = http(port, "GET", "/api/v1/topics/email.send/workers", None, None);
    assert_eq!((status, of_topic[0]["id"].as_str()), (200, Some(&*holder)));
    let (status, none) = http(
        port,
        "GET",
        "/api/v1/topics/order.cancel/workers",
        None,
        None,
    );
    assert_eq!((status, none), (200, json!([])));

    // Per topic: workers and queue latency.
    std::thread::sleep(Duration::from_millis(300));
    let (_, topics) = http(port, "GET", "/api/v1/topics", None, None);
    let by_name = |name: &str| {
        topics
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["topic"] == name)
            .cloned()
            .unwrap()
    };
    let busy = by_name("email.send");
    assert_eq!(
        (&busy["workers"], &busy["worker_slots"], &busy["in_flight"]),
        (&json!(1), &json!(4), &json!(3)),
        "{busy}"
    );
    assert_eq!(busy["oldest_pending_age_ms"], Value::Null, "{busy}");
    let idle = by_name("order.cancel");
    assert_eq!((&idle["workers"], &idle["pending"]), (&json!(0), &json!(1)));
    let latency = idle["oldest_pending_age_ms"].as_u64().unwrap();
    assert!(latency >= 300, "waited at least 300 ms: {idle}");

    // A running message by id: its holder; a pending one: since when it is ready.
    let (status, m) = http(
        port,
        "GET",
        &format!("/api/v1/topics/email.send/messages/{}", running[0]),
        None,
        None,
    );
    assert_eq!((status, &m["state"]), (200, &json!("active")), "{m}");
    assert_eq!(m["holder"], holder.as_str());
    assert!(
        m["started_at"].is_string() && m["lease_until"].is_string(),
        "{m}"
    );
    assert_eq!(m["data"], json!({"i": 0}));
    let (status, m) = http(
        port,
        "GET",
        &format!("/api/v1/topics/order.cancel/messages/{waiting}"),
        None,
        None,
    );
    assert_eq!((status, &m["state"]), (200, &json!("pending")), "{m}");
    assert!(m["timestamp"].is_string(), "{m}");
    let (status, m) = http(
        port,
        "GET",
        "/api/v1/topics/order.cancel/messages/no-such-id",
        None,
        None,
    );
    assert_eq!(status, 404, "{m}");
    assert!(m["error"].as_str().unwrap().contains("no-such-id"), "{m}");
    let (status, _) = http(
        port,
        "GET",
        "/api/v1/topics/bad%20topic/messages/x",
        None,
        None,
    );
    assert_eq!(status, 400);
    // Peeking the running ones names the holder too.
    let (_, active) = http(
        port,
        "GET",
        "/api/v1/topics/email.send/messages?state=active",
        None,
        None,
    );
    assert_eq!(active.as_array().unwrap().len(), 3);
    assert!(active
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["holder"] == holder.as_str()));

    // Across all topics, per minute: 4 published in this one.
    let (status, minutes) = http(port, "GET", "/api/v1/throughput", None, None);
    assert_eq!(status, 200);
    assert_eq!(minutes.as_array().unwrap().len(), 60);
    let published: u64 = minutes
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["published"].as_u64().unwrap())
        .sum();
    assert_eq!(published, 4);

    // A stopped worker leaves the list.
    gate.add_permits(100);
    stop.notify_one();
    rt.block_on(handle).unwrap().unwrap();
    http_until(port, "/api/v1/workers", "the worker leaves", |b| {
        b == &json!([])
    });
}

/// Dead letters filtered by error text, and a selection retried or deleted in bulk.
#[test]
fn api_filters_dead_letters_and_acts_on_a_selection() {
    let redis = RedisServer::start();
    let url = redis.url();
    let ids: Vec<String> = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mq = forgemq::Client::connect(&url).await.unwrap();
        let mut ids = Vec::new();
        for error in [
            "SMTP 550 mailbox full",
            "timeout",
            "smtp 550 no such user",
            "timeout",
        ] {
            ids.push(
                mq.publish("email.send", json!({}))
                    .await
                    .unwrap()
                    .to_string(),
            );
            mq.pop_message("email.send")
                .await
                .unwrap()
                .unwrap()
                .dead(error)
                .await
                .unwrap();
        }
        ids
    });
    let server = start(&redis, &[]);
    let port = server.port;
    let (status, smtp) = http(
        port,
        "GET",
        "/api/v1/topics/email.send/dead-letters?error=SMTP%20550",
        None,
        None,
    );
    assert_eq!(status, 200);
    let found: Vec<&str> = smtp
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(found, [&*ids[0], &*ids[2]]);
    // Bad bodies change nothing.
    for bad in [
        r#"{"ids": ["has space"]}"#,
        r#"{"ids": "x"}"#,
        r#"{"ids": [], "all": true}"#,
        r#"[1]"#,
    ] {
        for action in ["retry", "delete"] {
            let (status, body) = http(
                port,
                "POST",
                &format!("/api/v1/topics/email.send/dead-letters/{action}"),
                None,
                Some(bad),
            );
            assert_eq!(status, 400, "{action} {bad}: {body}");
        }
    }
    let (status, body) = http(
        port,
        "POST",
        "/api/v1/topics/email.send/dead-letters/delete",
        None,
        None,
    );
    assert_eq!(status, 400, "delete needs ids: {body}");
    let (_, stats) = http(port, "GET", "/api/v1/topics/email.send", None, None);
    assert_eq!((&stats["dead"], &stats["pending"]), (&json!(4), &json!(0)));
    assert!(stats["oldest_dead_age_ms"].is_u64(), "{stats}");

    // Retry the SMTP ones plus an id that is not a dead letter: 2 go back.
    let body = json!({"ids": [ids[0], ids[2], "not-a-dead-letter"]}).to_string();
    let (status, r) = http(
        port,
        "POST",
        "/api/v1/topics/email.send/dead-letters/retry",
        None,
        Some(&body),
    );
    assert_eq!((status, r), (200, json!({"requeued": 2})));
    let body = json!({"ids": [ids[1]]}).to_string();
    let (status, r) = http(
        port,
        "POST",
        "/api/v1/topics/email.send/dead-letters/delete",
        None,
        Some(&body),
    );
    assert_eq!((status, r), (200, json!({"deleted": 1})));
    let (_, stats) = http(port, "GET", "/api/v1/topics/email.send", None, None);
    assert_eq!(
        (&stats["dead"], &stats["pending"], &stats["dead_deleted"]),
        (&json!(1), &json!(2), &json!(1)),
        "{stats}"
    );
    // Without a body, retry takes all that are left.
    let (status, r) = http(
        port,
        "POST",
        "/api/v1/topics/email.send/dead-letters/retry",
        None,
        None,
    );
    assert_eq!((status, r), (200, json!({"requeued": 1})));
}

/// Waits until the `forgemq dev` on `port` answers `/readyz` with 200.
fn wait_dev_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err()
        || http(port, "GET", "/readyz", None, None).0 != 200
    {
        assert!(Instant::now() < deadline, "forgemq dev did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `forgemq dev` killed with SIGKILL leaves its redis-server running on `.forgemq/` (and
/// its lock goes with it). The next `forgemq dev` in that folder stops that redis-server
/// (SIGTERM: the AOF is flushed) before it starts its own, so two never append to one AOF,
/// and what was published before is still there.
#[test]
fn dev_stops_the_redis_server_a_killed_dev_left_running() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join(".forgemq").join("redis.pid");
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let port = free_port();
    let mut first = spawn_dev(dir.path(), port, &[]);
    wait_dev_ready(port);
    let (status, _) = http(
        port,
        "POST",
        "/api/v1/topics/user.welcome/messages",
        None,
        Some(r#"{"data": {"user_id": "1"}}"#),
    );
    assert_eq!(status, 201);
    let old = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        alive(&old),
        "the killed dev's redis-server {old} is left running"
    );

    let port = free_port();
    let second = spawn_dev(dir.path(), port, &[]);
    wait_dev_ready(port);
    assert!(!alive(&old), "the leftover redis-server {old} was stopped");
    let new = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    assert_ne!(new, old);
    let (status, stats) = http(port, "GET", "/api/v1/topics/user.welcome", None, None);
    assert_eq!((status, &stats["pending"]), (200, &json!(1)), "{stats}");

    // Stopped the normal way, dev stops its own redis-server too.
    Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    let out = finish(second, Duration::from_secs(20));
    assert!(out.status.success() || out.status.code().is_none());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(&new) {
        assert!(
            Instant::now() < deadline,
            "dev's redis-server {new} outlived it"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Schedules over HTTP: create, list, change, run now, remove; bad specs are 400 and
/// change nothing; `serve` runs a scheduler itself, so an every-1s schedule fires with no
/// worker anywhere.
#[test]
fn api_manages_schedules_and_serve_fires_them() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    let (status, body) = http(
        p,
        "PUT",
        "/api/v1/schedules/nightly",
        None,
        Some(
            r#"{"cron":"30 2 * * *","tz":"Asia/Shanghai","topic":"report.nightly","data":{"kind":"sales"},"missed":"skip"}"#,
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "nightly");
    assert_eq!(body["cron"], "30 2 * * *");
    assert_eq!(body["tz"], "Asia/Shanghai");
    assert_eq!(body["missed"], "skip");
    assert_eq!(body["data"], json!({"kind": "sales"}));
    assert!(
        body["next_fire"].as_str().unwrap().contains("T18:30:00"),
        "{body}"
    );
    // The same spec again keeps its next fire time.
    let (_, again) = http(
        p,
        "PUT",
        "/api/v1/schedules/nightly",
        None,
        Some(
            r#"{"cron":"30 2 * * *","tz":"Asia/Shanghai","topic":"report.nightly","data":{"kind":"sales"},"missed":"skip"}"#,
        ),
    );
    assert_eq!(again, body);
    for bad in [
        r#"{"cron":"61 * * * *","topic":"t"}"#,
        r#"{"cron":"* * * * *","tz":"Nowhere/Special","topic":"t"}"#,
        r#"{"every":"500ms","topic":"t"}"#,
        r#"{"every":"soon","topic":"t"}"#,
        r#"{"cron":"* * * * *","every":"1s","topic":"t"}"#,
        r#"{"topic":"t"}"#,
        r#"{"every":"1s","topic":"bad topic"}"#,
        r#"{"every":"1s","topic":"t","missed":"sometimes"}"#,
        r#"{"every":"1s","topic":"t","colour":"red"}"#,
    ] {
        let (status, body) = http(p, "PUT", "/api/v1/schedules/bad", None, Some(bad));
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    let (status, _) = http(p, "GET", "/api/v1/schedules/bad", None, None);
    assert_eq!(status, 404);

    // An every-1s schedule fires with only serve running.
    let (status, body) = http(
        p,
        "PUT",
        "/api/v1/schedules/tick",
        None,
        Some(r#"{"every":"1s","topic":"ops.tick"}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["every_ms"], 1000);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = http(p, "GET", "/api/v1/schedules/tick", None, None);
        if s["fired"].as_u64().unwrap_or(0) >= 2 {
            assert!(s["last_fire"].is_string(), "{s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve's scheduler did not fire: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, stats) = http(p, "GET", "/api/v1/topics/ops.tick", None, None);
    assert!(stats["published"].as_u64().unwrap() >= 2, "{stats}");

    let (status, list) = http(p, "GET", "/api/v1/schedules", None, None);
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["nightly", "tick"]);

    let (status, run) = http(p, "POST", "/api/v1/schedules/nightly/run", None, None);
    assert_eq!(status, 201, "{run}");
    let id = run["id"].as_str().unwrap();
    assert!(id.starts_with("schedule:nightly:"), "{id}");
    let (status, msg) = http(
        p,
        "GET",
        &format!("/api/v1/topics/report.nightly/messages/{id}"),
        None,
        None,
    );
    assert_eq!(status, 200, "{msg}");

    let (status, _) = http(p, "DELETE", "/api/v1/schedules/tick", None, None);
    assert_eq!(status, 200);
    let (status, _) = http(p, "DELETE", "/api/v1/schedules/tick", None, None);
    assert_eq!(status, 404);
    let (status, _) = http(p, "POST", "/api/v1/schedules/tick/run", None, None);
    assert_eq!(status, 404);
}

/// Rate limits over HTTP: set, read, list, remove; bad rates are 400.
#[test]
fn api_sets_and_removes_rate_limits() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    let (status, body) = http(
        p,
        "PUT",
        "/api/v1/topics/email.send/limit",
        None,
        Some(r#"{"rate":"6000/m","burst":20}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"topic": "email.send", "rate": "100/s", "per_second": 100.0, "burst": 20})
    );
    let (status, got) = http(p, "GET", "/api/v1/topics/email.send/limit", None, None);
    assert_eq!((status, &got), (200, &body));
    let (_, list) = http(p, "GET", "/api/v1/limits", None, None);
    assert_eq!(list, json!([body]));
    for bad in [
        r#"{"rate":"lots"}"#,
        r#"{"rate":"10/s","burst":0}"#,
        r#"{"burst":5}"#,
        r#"{"rate":"10/s","x":1}"#,
    ] {
        let (status, e) = http(p, "PUT", "/api/v1/topics/email.send/limit", None, Some(bad));
        assert_eq!(status, 400, "{bad}: {e}");
    }
    let (status, _) = http(p, "DELETE", "/api/v1/topics/email.send/limit", None, None);
    assert_eq!(status, 200);
    let (status, _) = http(p, "GET", "/api/v1/topics/email.send/limit", None, None);
    assert_eq!(status, 404);
    let (status, _) = http(p, "DELETE", "/api/v1/topics/email.send/limit", None, None);
    assert_eq!(status, 404);
}

/// Fair groups over HTTP: publish with a group, read the groups (also in the stats and
/// /metrics), set and remove settings; bad ones are 400 and change nothing.
#[test]
fn api_publishes_to_groups_and_sets_their_settings() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    for g in ["acme", "acme", "globex"] {
        let body = format!(r#"{{"data":{{"g":"{g}"}},"group":"{g}"}}"#);
        let (status, got) = http(
            p,
            "POST",
            "/api/v1/topics/report.build/messages",
            None,
            Some(&body),
        );
        assert_eq!(status, 201, "{got}");
    }
    let (status, body) = http(
        p,
        "PUT",
        "/api/v1/topics/report.build/groups/acme",
        None,
        Some(r#"{"max_active":2,"weight":3}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"group": "acme", "pending": 2, "active": 0, "max_active": 2, "weight": 3, "paused": false, "configured": true})
    );
    let (status, body) = http(
        p,
        "PUT",
        "/api/v1/topics/report.build/groups/acme",
        None,
        Some(r#"{"paused":true}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["paused"].clone(), body["weight"].clone()),
        (json!(true), json!(3))
    );
    let (_, list) = http(p, "GET", "/api/v1/topics/report.build/groups", None, None);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[1]["group"], "globex");
    assert_eq!(list[1]["pending"], 1);
    let (_, stats) = http(p, "GET", "/api/v1/topics/report.build", None, None);
    assert_eq!(stats["pending"], 3, "{stats}");
    assert_eq!(stats["groups"][0]["group"], "acme", "{stats}");
    let metrics = metrics_text(p);
    for line in [
        r#"forgemq_group_messages{topic="report.build",group="acme",state="pending"} 2"#,
        r#"forgemq_group_paused{topic="report.build",group="acme"} 1"#,
        r#"forgemq_group_max_active{topic="report.build",group="acme"} 2"#,
        r#"forgemq_results_kept{topic="report.build"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    for bad in [
        r#"{"weight":0}"#,
        r#"{"weight":1001}"#,
        r#"{"x":1}"#,
        r#"{"max_active":-1}"#,
    ] {
        let (status, e) = http(
            p,
            "PUT",
            "/api/v1/topics/report.build/groups/acme",
            None,
            Some(bad),
        );
        assert_eq!(status, 400, "{bad}: {e}");
    }
    let (status, e) = http(
        p,
        "POST",
        "/api/v1/topics/report.build/messages",
        None,
        Some(r#"{"data":1,"group":"has space"}"#),
    );
    assert_eq!(status, 400, "{e}");
    let (_, stats) = http(p, "GET", "/api/v1/topics/report.build", None, None);
    assert_eq!(stats["pending"], 3, "a refused publish wrote nothing");
    let (status, body) = http(
        p,
        "DELETE",
        "/api/v1/topics/report.build/groups/acme",
        None,
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["configured"].clone(), body["weight"].clone()),
        (json!(false), json!(1))
    );
    let (status, _) = http(
        p,
        "DELETE",
        "/api/v1/topics/report.build/groups/acme",
        None,
        None,
    );
    assert_eq!(status, 404);
}

/// Headers over HTTP and from the CLI: stored in the envelope, shown by the lookup; a bad
/// one is a 400 that writes nothing.
#[test]
fn headers_travel_over_http_and_the_cli() {
    let redis = RedisServer::start();
    let server = start(&redis, &[]);
    let p = server.port;
    let (status, body) = http(
        p,
        "POST",
        "/api/v1/topics/order.created/messages",
        None,
        Some(
            r#"{"data":{},"headers":{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}"#,
        ),
    );
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap();
    let (_, msg) = http(
        p,
        "GET",
        &format!("/api/v1/topics/order.created/messages/{id}"),
        None,
        None,
    );
    assert_eq!(
        msg["headers"]["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "{msg}"
    );
    for bad in [
        r#"{"data":{},"headers":{"a b":"x"}}"#,
        r#"{"data":{},"headers":{"k":1}}"#,
    ] {
        let (status, e) = http(
            p,
            "POST",
            "/api/v1/topics/order.created/messages",
            None,
            Some(bad),
        );
        assert_eq!(status, 400, "{bad}: {e}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_forgemq"))
        .args([
            "publish",
            "order.created",
            "{}",
            "--header",
            "tenant=acme",
            "--header",
            "x=1=2",
        ])
        .env("REDIS_URL", redis.url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (_, msg) = http(
        p,
        "GET",
        &format!("/api/v1/topics/order.created/messages/{id}"),
        None,
        None,
    );
    assert_eq!(
        msg["headers"],
        json!({"tenant": "acme", "x": "1=2"}),
        "{msg}"
    );
    let (_, stats) = http(p, "GET", "/api/v1/topics/order.created", None, None);
    assert_eq!(stats["published"], 2);
}
