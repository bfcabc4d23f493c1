//! Hostile input and security: bodies planted behind the library's back, payload limits,
//! a full Redis, risky server settings, a least-privilege ACL user and TLS.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use forgemq::{
    Backoff, Cancelled, Client, Error, GroupSettings, HandlerError, Message, MessageId,
    PublishOptions, Subscription, WarningKind, Worker,
};
use forgemq_test_support::{
    assert_none_lost, check_invariants, redis_server_binary, server_supports_tls, Layout,
    RedisOptions, RedisServer, State, TlsFiles,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::common::single_server_only;
use crate::common::{
    eventually, init_tracing, invariants, setup, strings, HoldsTopic, Running, Runs,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Panics raised outside test code (in the library or a dependency), recorded by a panic
/// hook that every test of this module installs. Handler panics and failed assertions are
/// in `tests/` or the test-support crate and are not counted. The hook is process-wide, so
/// a library panic in a test running alongside is reported too: it is a bug either way.
static LIBRARY_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static PANIC_HOOK: Once = Once::new();

fn watch_library_panics() -> usize {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            let test_code = location.contains("/tests/")
                || location.starts_with("tests/")
                || location.contains("forgemq-test-support");
            if !test_code {
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                LIBRARY_PANICS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("{location}: {payload}"));
            }
            previous(info);
        }));
    });
    library_panics().len()
}

fn library_panics() -> Vec<String> {
    LIBRARY_PANICS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

fn assert_no_library_panic_since(mark: usize) {
    let panics = library_panics();
    assert!(
        panics.len() <= mark,
        "code outside the tests panicked (in this test or one running alongside): {:?}",
        &panics[mark.min(panics.len())..]
    );
}

/// Stores `body` under `id` and makes it pending, behind the library's back, then leaves a
/// wake-up token so that an idle worker looks.
fn plant(server: &impl HoldsTopic, topic: &str, id: &[u8], body: &[u8]) {
    let layout = Layout::new("mq", topic);
    let mut conn = server.conn_for_topic(topic);
    redis::pipe()
        .cmd("HSET")
        .arg(layout.msg())
        .arg(id)
        .arg(body)
        .cmd("RPUSH")
        .arg(layout.pending())
        .arg(id)
        .cmd("RPUSH")
        .arg(format!("mq:{{{topic}}}:wake"))
        .arg("1")
        .exec(&mut conn)
        .unwrap();
}

/// A well-formed envelope around raw `data` text.
fn envelope_with_raw_data(id: &str, topic: &str, data: &str) -> String {
    format!(
        r#"{{"id":"{id}","topic":"{topic}","data":{data},"timestamp":"2025-10-15T10:30:00.000Z","retry":0}}"#
    )
}

fn hstrlen(server: &impl HoldsTopic, topic: &str, id: &str) -> usize {
    redis::cmd("HSTRLEN")
        .arg(Layout::new("mq", topic).msg())
        .arg(id)
        .query(&mut server.conn_for_topic(topic))
        .unwrap()
}

fn hlen(server: &impl HoldsTopic, topic: &str) -> usize {
    redis::cmd("HLEN")
        .arg(Layout::new("mq", topic).msg())
        .query(&mut server.conn_for_topic(topic))
        .unwrap()
}

/// Peak resident memory of this test process in KiB (`VmHWM`), if the OS reports it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resets `VmHWM` to the current RSS (Linux 4.0+); false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------------------
// 1. Malformed payloads
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Big {
    n: u64,
}

/// Planted bodies that don't decode (bytes, bad JSON, wrong schema, no id, deep nesting, out-of-range numbers) are dead-lettered once with a decode error, never block the queue, and valid u64s round-trip exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads() {
    single_server_only!();
    let panic_mark = watch_library_panics();
    let (server, mq) = setup().await;
    let topic = "hostile.malformed";
    let typed = "hostile.u64";
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));

    // Bodies that must be dead-lettered with a decode error: (id, body).
    let mut bad: Vec<(String, Vec<u8>)> = vec![
        ("non-utf8".into(), vec![0xff, 0xfe, 0x00, 0x80, b'{', 0xc3, 0x28]),
        (
            "non-utf8-in-json".into(),
            [
                br#"{"id":"non-utf8-in-json","topic":"hostile.malformed","data":""#.as_slice(),
                &[0xff, 0xfe],
                br#"","timestamp":"2025-10-15T10:30:00.000Z","retry":0}"#,
            ]
            .concat(),
        ),
        (
            "invalid-json".into(),
            br#"{"id":"invalid-json","topic":"hostile.malformed","data":{"a":1"#.to_vec(),
        ),
        ("empty".into(), Vec::new()),
        ("json-null".into(), b"null".to_vec()),
        ("json-array".into(), b"[1,2,3]".to_vec()),
        ("json-string".into(), br#""just a string""#.to_vec()),
        (
            "data-missing".into(),
            json!({"id": "data-missing", "topic": topic, "timestamp": "2025-10-15T10:30:00.000Z", "retry": 0})
                .to_string()
                .into_bytes(),
        ),
        (
            "retry-is-a-string".into(),
            json!({"id": "retry-is-a-string", "topic": topic, "data": {}, "timestamp": "2025-10-15T10:30:00.000Z", "retry": "3"})
                .to_string()
                .into_bytes(),
        ),
        (
            "retry-negative".into(),
            json!({"id": "retry-negative", "topic": topic, "data": {}, "retry": -1})
                .to_string()
                .into_bytes(),
        ),
        (
            "id-missing".into(),
            json!({"topic": topic, "data": {"x": 1}, "timestamp": "2025-10-15T10:30:00.000Z", "retry": 0})
                .to_string()
                .into_bytes(),
        ),
        (
            "id-not-a-string".into(),
            json!({"id": 42, "topic": topic, "data": {"x": 1}, "retry": 0})
                .to_string()
                .into_bytes(),
        ),
        (
            "deep-array".into(),
            envelope_with_raw_data("deep-array", topic, &deep).into_bytes(),
        ),
        (
            "deep-object".into(),
            envelope_with_raw_data("deep-object", topic, &deep_object).into_bytes(),
        ),
        (
            "number-out-of-range".into(),
            envelope_with_raw_data("number-out-of-range", topic, r#"{"x":1e400}"#).into_bytes(),
        ),
    ];
    // Integers a JSON decoder without arbitrary precision can't hold: beyond u64 / i64.
    // They must be dead-lettered with a decode error or delivered exactly, never rounded.
    let huge: Vec<(String, &str)> = vec![
        ("int-above-u64".into(), "123456789012345678901234567890"),
        ("int-below-i64".into(), "-123456789012345678901234567890"),
        ("int-u64-max-plus-1".into(), "18446744073709551616"),
    ];
    // For the typed u64 handler: one over u64::MAX (not a u64: dead), one above 2^53 (exact).
    let typed_bad = ("typed-u64-overflow", "18446744073709551616");
    let typed_good = ("typed-above-2-pow-53", "9007199254740993");

    // An id that is not UTF-8 (the library only makes ids of printable characters), ahead
    // of valid messages that a fetch of several takes together with it.
    let badid = "hostile.badid";
    plant(
        &server,
        badid,
        &[0xff, 0xfe, b'i', b'd'],
        envelope_with_raw_data("x", badid, "{}").as_bytes(),
    );
    let mut innocent = Vec::new();
    for i in 0..3 {
        innocent.push(mq.publish(badid, json!({"i": i})).await.unwrap());
    }

    // Half of them before the worker starts, the rest while it is idle (woken by the token).
    let second_half = bad.split_off(bad.len() / 2);
    for (id, body) in &bad {
        plant(&server, topic, id.as_bytes(), body);
    }
    for (id, digits) in &huge {
        let body = envelope_with_raw_data(id, topic, &format!(r#"{{"n":{digits}}}"#));
        plant(&server, topic, id.as_bytes(), body.as_bytes());
    }
    for (id, digits) in [typed_bad, typed_good] {
        let body = envelope_with_raw_data(id, typed, &format!(r#"{{"n":{digits}}}"#));
        plant(&server, typed, id.as_bytes(), body.as_bytes());
    }

    let runs = Runs::default();
    let seen: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
    let typed_seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let badid_runs = Runs::default();
    let (r, s, t, b) = (
        runs.clone(),
        seen.clone(),
        typed_seen.clone(),
        badid_runs.clone(),
    );
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(3),
            move |msg: Message<Value>| {
                r.record(msg.id.as_str(), msg.retry);
                s.lock()
                    .unwrap()
                    .insert(msg.id.to_string(), msg.data.clone());
                async { Ok::<(), HandlerError>(()) }
            },
        )
        .subscribe(typed, move |msg: Message<Big>| {
            t.lock().unwrap().insert(msg.id.to_string(), msg.data.n);
            async { Ok::<(), HandlerError>(()) }
        })
        .subscribe_with(
            badid,
            Subscription::new()
                .concurrency(4)
                .lease(Duration::from_secs(1)),
            move |msg: Message<Value>| {
                b.record(msg.id.as_str(), msg.retry);
                async { Ok::<(), HandlerError>(()) }
            },
        )
        .recover_interval(Duration::from_millis(300))
        .idle_wait(Duration::from_secs(30))
        .build()
        .unwrap();
    let running = Running::start(worker);

    let first_wave = bad.len() + huge.len();
    eventually("the first planted bodies are settled", || async {
        let s = mq.stats(topic).await.unwrap();
        s.pending == 0 && s.active == 0 && (s.dead + s.processed) as usize == first_wave
    })
    .await;
    // The worker is idle now, blocked on the wake list: the token of `plant` wakes it.
    for (id, body) in &second_half {
        plant(&server, topic, id.as_bytes(), body);
    }
    bad.extend(second_half);

    // Valid messages published through the library after all of that.
    let after = mq
        .publish(topic, json!({"after": "the junk"}))
        .await
        .unwrap();
    let u64_max = mq
        .publish(
            topic,
            json!({"n": u64::MAX, "m": 9_007_199_254_740_993_u64}),
        )
        .await
        .unwrap();
    let i64_min = mq.publish(topic, json!({"n": i64::MIN})).await.unwrap();
    let typed_max = mq.publish(typed, json!({"n": u64::MAX})).await.unwrap();
    let typed_2_53 = mq
        .publish(typed, json!({"n": 9_007_199_254_740_993_u64}))
        .await
        .unwrap();

    eventually(
        "every planted body is settled and the valid ones are processed",
        || async {
            let s = mq.stats(topic).await.unwrap();
            let t = mq.stats(typed).await.unwrap();
            s.pending + s.active + t.pending + t.active == 0
                && runs.ids().contains(after.as_str())
                && (s.dead + s.processed) as usize == bad.len() + huge.len() + 3
                && t.dead + t.processed == 4
        },
    )
    .await;
    // The valid messages behind the bad id: given a few lease expiries to get through.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while innocent
        .iter()
        .any(|id| badid_runs.of(id.as_str()).is_empty())
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;

    // The queue was not blocked, and the valid numbers arrived exactly.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[after.as_str()], json!({"after": "the junk"}));
    assert_eq!(seen[u64_max.as_str()]["n"].as_u64(), Some(u64::MAX));
    assert_eq!(
        seen[u64_max.as_str()]["m"].as_u64(),
        Some(9_007_199_254_740_993)
    );
    assert_eq!(seen[i64_min.as_str()]["n"].as_i64(), Some(i64::MIN));
    let typed_seen = typed_seen.lock().unwrap().clone();
    assert_eq!(typed_seen.get(typed_max.as_str()), Some(&u64::MAX));
    assert_eq!(
        typed_seen.get(typed_2_53.as_str()),
        Some(&9_007_199_254_740_993)
    );
    assert_eq!(
        typed_seen.get(typed_good.0),
        Some(&9_007_199_254_740_993),
        "a planted integer above 2^53 reaches a u64 handler exactly"
    );

    // Each undecodable body is in the dead-letter queue once, with a decode error, and no
    // handler ever saw it.
    let dead = mq.get_dead_letters(topic, 0..1000).await.unwrap();
    let dead_by_id: HashMap<&str, &forgemq::DeadLetter> =
        dead.iter().map(|d| (d.id.as_str(), d)).collect();
    assert_eq!(dead.len(), dead_by_id.len(), "an id is dead twice");
    for (id, _) in &bad {
        let d = dead_by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} is not in the dead-letter queue"));
        let error = d.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("decode"),
            "{id}: the dead letter says why: {error:?}"
        );
        assert!(runs.of(id).is_empty(), "{id} reached a handler");
    }
    let typed_dead = mq.get_dead_letters(typed, 0..10).await.unwrap();
    assert_eq!(typed_dead.len(), 1, "{typed_dead:?}");
    assert_eq!(typed_dead[0].id.as_str(), typed_bad.0);
    let error = typed_dead[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("does not decode"), "{error}");

    // Exactly once: the counters agree with the dead set, and nothing is left running.
    let stats = mq.stats(topic).await.unwrap();
    let huge_dead = huge
        .iter()
        .filter(|(id, _)| dead_by_id.contains_key(id.as_str()))
        .count();
    assert_eq!(stats.dead as usize, bad.len() + huge_dead, "{stats:?}");
    assert_eq!(stats.dead_lettered, stats.dead, "{stats:?}");
    assert_eq!(stats.retried, 0, "a decode error is not retried: {stats:?}");

    let mut ids: Vec<String> = bad.iter().map(|(id, _)| id.clone()).collect();
    ids.extend(huge.iter().map(|(id, _)| id.clone()));
    ids.extend(strings(&[&after, &u64_max, &i64_min]));
    invariants(&server, topic, &ids);
    invariants(
        &server,
        typed,
        &[
            typed_bad.0.to_owned(),
            typed_good.0.to_owned(),
            typed_max.to_string(),
            typed_2_53.to_string(),
        ],
    );
    assert_no_library_panic_since(panic_mark);

    // Last, the findings that do not stop the checks above.
    let mut problems = Vec::new();
    // A non-UTF-8 id must not take the valid messages fetched with it down, nor break the
    // dead-letter browser. (The invariant checker reads ids as text, so it is not run on
    // this topic.)
    let stuck = innocent
        .iter()
        .filter(|id| badid_runs.of(id.as_str()).is_empty())
        .count();
    if stuck > 0 {
        let s = mq.stats(badid).await.unwrap();
        problems.push(format!(
            "{stuck} of {} valid messages fetched together with a non-UTF-8 id never ran within 15 s: {s:?}",
            innocent.len()
        ));
    }
    if let Err(e) = mq.get_dead_letters(badid, 0..10).await {
        problems.push(format!(
            "get_dead_letters fails for a topic with a non-UTF-8 id: {e}"
        ));
    }
    // Integers out of the decoder's range are dead-lettered or delivered exactly, never
    // rounded.
    let mut rounded = Vec::new();
    for (id, digits) in &huge {
        match (dead_by_id.get(id.as_str()), seen.get(id.as_str())) {
            (Some(d), None) => assert!(
                d.error.as_deref().unwrap_or_default().contains("decode"),
                "{id}: {:?}",
                d.error
            ),
            (None, Some(data)) => {
                let got = data["n"].to_string();
                if got != *digits {
                    rounded.push(format!("{id}: published {digits}, handler got {got}"));
                }
            }
            other => panic!("{id} is both or neither dead and delivered: {other:?}"),
        }
    }
    if !rounded.is_empty() {
        problems.push(format!(
            "integers beyond u64/i64 were silently rounded and delivered instead of being dead-lettered with a decode error:\n  {}",
            rounded.join("\n  ")
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 2. Payload size limits
// ---------------------------------------------------------------------------------------

/// A message of exactly max_payload round-trips, one byte more is refused without a Redis write, and a 10 MiB body planted behind the library's back is dead-lettered without stopping the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_size_limits() {
    single_server_only!();
    let panic_mark = watch_library_panics();
    init_tracing();
    const LIMIT: usize = 4096;
    let server = RedisServer::start();
    let mq = Client::builder(server.url())
        .max_payload(LIMIT)
        .build()
        .await
        .unwrap();
    assert_eq!(mq.max_payload(), LIMIT);
    let topic = "hostile.size";
    let blob = |n: usize| json!({"blob": "x".repeat(n)});

    // Find the data size whose envelope is exactly LIMIT bytes: the envelope's overhead
    // is fixed (36-byte id, 24-byte timestamp), so one refused probe tells it.
    let overhead = match mq.publish(topic, blob(LIMIT)).await.unwrap_err() {
        Error::PayloadTooLarge { size, limit } => {
            assert_eq!(limit, LIMIT);
            size - LIMIT
        }
        other => panic!("expected PayloadTooLarge, got {other}"),
    };
    let exact = LIMIT - overhead;

    let runs = Runs::default();
    let received: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
    let (r, got) = (runs.clone(), received.clone());
    let worker = Worker::builder(mq.clone())
        .subscribe(topic, move |msg: Message<Value>| {
            r.record(msg.id.as_str(), msg.retry);
            got.lock().unwrap().insert(msg.id.to_string(), msg.data);
            async { Ok::<(), HandlerError>(()) }
        })
        .idle_wait(Duration::from_secs(30))
        .build()
        .unwrap();

    // Exactly the limit: stored as is, byte for byte, and delivered.
    let at_limit = mq.publish(topic, blob(exact)).await.unwrap();
    assert_eq!(hstrlen(&server, topic, at_limit.as_str()), LIMIT);

    // One byte more: refused, and Redis sees no write at all.
    let before = server.command_stats();
    match mq.publish(topic, blob(exact + 1)).await.unwrap_err() {
        Error::PayloadTooLarge { size, limit } => assert_eq!((size, limit), (LIMIT + 1, LIMIT)),
        other => panic!("expected PayloadTooLarge, got {other}"),
    }
    let err = mq
        .publish_batch(topic, [blob(1), blob(exact + 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    assert!(err.is_invalid_input());
    let after = server.command_stats();
    for c in ["evalsha", "eval", "sadd", "hset", "rpush", "script|load"] {
        assert_eq!(
            after.get(c),
            before.get(c),
            "{c} was sent for a refused payload"
        );
    }
    assert_eq!(
        hlen(&server, topic),
        1,
        "only the message at the limit is stored"
    );

    // A 10 MiB body planted behind the library's back, shaped to cost a lot of memory if
    // it were decoded (`{"a":0}` becomes a map allocation per 8 bytes).
    const PLANTED: usize = 10 * 1024 * 1024;
    let unit = r#"{"a":0},"#;
    let mut data = String::with_capacity(PLANTED + 16);
    data.push('[');
    while data.len() + unit.len() < PLANTED - 200 {
        data.push_str(unit);
    }
    data.push_str(r#"{"a":0}]"#);
    let huge_body = envelope_with_raw_data("planted-10mib", topic, &data);
    assert!(huge_body.len() > 10_000_000);
    plant(&server, topic, b"planted-10mib", huge_body.as_bytes());
    drop(data);

    let rss_before = rss_kib();
    let hwm_reset = reset_peak_rss();
    let running = Running::start(worker);
    eventually(
        "the message at the limit is processed and the planted body dead",
        || async {
            let s = mq.stats(topic).await.unwrap();
            s.processed == 1 && s.dead == 1 && s.pending == 0 && s.active == 0
        },
    )
    .await;
    let peak_during = peak_rss_kib();

    // The worker goes on consuming.
    let next = mq
        .publish(topic, json!({"still": "consuming"}))
        .await
        .unwrap();
    eventually("a message published afterwards is processed", || async {
        runs.ids().contains(next.as_str())
    })
    .await;
    running.stop().await;

    let received = received.lock().unwrap().clone();
    assert_eq!(received[at_limit.as_str()], blob(exact), "round trip");
    assert!(
        runs.of("planted-10mib").is_empty(),
        "the planted body reached a handler"
    );
    let dead = mq.get_dead_letters(topic, 0..10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id.as_str(), "planted-10mib");
    let error = dead[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("payload limit") && error.contains(&LIMIT.to_string()),
        "the dead letter says why: {error}"
    );
    invariants(
        &server,
        topic,
        &[
            at_limit.to_string(),
            "planted-10mib".to_owned(),
            next.to_string(),
        ],
    );

    // Memory: the stored body is read once, so a few copies of 10 MiB are expected; decoding
    // it into a `Value` costs far more (a map per 8 bytes).
    let growth_mib = match (rss_before, peak_during) {
        (Some(before), Some(peak)) if hwm_reset => Some(peak.saturating_sub(before) / 1024),
        _ => None,
    };
    eprintln!(
        "payload_size_limits: process RSS before {rss_before:?} KiB, peak while dead-lettering the 10 MiB body {peak_during:?} KiB (peak reset: {hwm_reset}), growth {growth_mib:?} MiB"
    );
    let dead_body = dead[0].envelope.clone();
    drop(dead);
    assert_no_library_panic_since(panic_mark);

    // Last, the findings about the "without decoding" promise.
    let mut problems = Vec::new();
    if let Some(growth) = growth_mib {
        if growth > 200 {
            problems.push(format!(
                "dead-lettering a 10 MiB body over the limit raised the worker's peak memory by {growth} MiB: it was decoded"
            ));
        }
    }
    if dead_body.contains(r#""errors":[{"attempt":0"#) {
        problems.push(
            "the dead-lettered body carries a failure history, so it was decoded into an Envelope and re-encoded (worker/runner.rs failure_op)".to_owned(),
        );
    }
    // The manual consumer must apply the same limit as the worker.
    plant(&server, topic, b"planted-for-pop", huge_body.as_bytes());
    match mq.pop_message(topic).await {
        Ok(Some(delivery)) => {
            problems.push(format!(
                "pop_message handed out a stored body of {} bytes, over the {LIMIT}-byte limit, decoded",
                huge_body.len()
            ));
            delivery.dead("test cleanup").await.unwrap();
        }
        Ok(None) => {}
        Err(e) => problems.push(format!("pop_message failed on an oversized body: {e}")),
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// 3. Redis out of memory
// ---------------------------------------------------------------------------------------

fn set_maxmemory(server: &RedisServer, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(value)
        .exec(&mut server.conn())
        .unwrap();
}

/// With maxmemory 8mb and noeviction, publishing ends in an out-of-memory error (never a silent Ok), writes nothing partial, acks still work, and publishing resumes after draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_oom_noeviction() {
    single_server_only!();
    let panic_mark = watch_library_panics();
    init_tracing();
    let server = RedisServer::start_with(
        RedisOptions::new()
            .maxmemory_policy("noeviction")
            .args(["--maxmemory", "8mb"]),
    );
    let mq = Client::connect(&server.url()).await.unwrap();
    let topic = "hostile.oom";
    let pad = "x".repeat(16 * 1024);

    let mut stored: Vec<MessageId> = Vec::new();
    let mut refused: Vec<MessageId> = Vec::new();
    // OOM refusals that `Error::is_out_of_memory` does not recognise (reported at the end).
    let mut unrecognised: Vec<String> = Vec::new();
    let mut is_oom = |e: &Error| {
        let text = e.to_string();
        let oom = e.is_out_of_memory() || text.contains("OOM");
        if oom && !e.is_out_of_memory() {
            unrecognised.push(text);
        }
        oom
    };
    for i in 0..4000 {
        let id = MessageId::new(format!("oom-{i}")).unwrap();
        let options = PublishOptions::new().id(id.clone());
        match mq
            .publish_with(topic, json!({"i": i, "pad": pad}), options)
            .await
        {
            Ok(outcome) => {
                assert!(!outcome.is_duplicate(), "{id}");
                stored.push(id);
            }
            Err(e) => {
                assert!(is_oom(&e), "publish {i} failed with {e:?}");
                assert!(!e.is_transient(), "{e}");
                refused.push(id);
                if refused.len() >= 20 {
                    break;
                }
            }
        }
    }
    assert!(
        refused.len() >= 20,
        "8 MiB never filled up ({} stored)",
        stored.len()
    );
    assert!(stored.len() > 100, "only {} stored", stored.len());

    // A batch while full: refused as a whole, nothing of it written.
    let batch: Vec<MessageId> = (0..10)
        .map(|i| MessageId::new(format!("oom-batch-{i}")).unwrap())
        .collect();
    let err = mq
        .publish_batch_with(
            topic,
            batch
                .iter()
                .map(|id| (json!({"pad": pad}), PublishOptions::new().id(id.clone()))),
        )
        .await
        .unwrap_err();
    assert!(is_oom(&err), "{err:?}");
    refused.extend(batch);

    // Every Ok is stored, every refusal wrote nothing.
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!(stats.published as usize, stored.len(), "{stats:?}");
    assert_eq!(stats.pending as usize, stored.len(), "{stats:?}");
    assert_eq!(hlen(&server, topic), stored.len());
    let mut all = strings(&stored);
    all.extend(strings(&refused));
    // The checker reads in MULTI/EXEC, which a full Redis refuses even for reads: lift the
    // limit for the check only (nothing else runs meanwhile).
    set_maxmemory(&server, "0");
    let report = invariants(&server, topic, &all);
    set_maxmemory(&server, "8mb");
    assert_eq!(report.count(State::Pending), stored.len());
    for id in &refused {
        assert_eq!(report.state_of(id.as_str()), Some(State::Gone), "{id}");
    }

    // Acks work while Redis is full: a manual fetch and ack, right after a refusal. The
    // check above freed its reply buffers, which can leave room for a message or two (seen
    // on Redis 6.2): fill up again until a publish is refused.
    let mut refill = 0;
    loop {
        let id = MessageId::new(format!("oom-refill-{refill}")).unwrap();
        let options = PublishOptions::new().id(id.clone());
        match mq.publish_with(topic, json!({"pad": pad}), options).await {
            Ok(_) => {
                stored.push(id);
                refill += 1;
                assert!(refill < 100, "Redis at 8 MiB took 100 more messages");
            }
            Err(err) => {
                assert!(is_oom(&err), "{err}");
                break;
            }
        }
    }
    let delivery = mq.pop_message(topic).await.unwrap().expect("a message");
    let popped = delivery.id().clone();
    delivery.ack().await.unwrap();

    // A worker drains the rest while memory is still tight.
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(4),
            move |msg: Message<Value>| {
                r.record(msg.id.as_str(), msg.retry);
                async { Ok::<(), HandlerError>(()) }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("the worker drains the full queue", || async {
        let s = mq.stats(topic).await.unwrap();
        s.pending == 0 && s.active == 0 && s.processed as usize == stored.len()
    })
    .await;

    // Publishing works again once there is room.
    let again: Arc<Mutex<Option<MessageId>>> = Arc::default();
    eventually("publishing succeeds after draining", || async {
        match mq.publish(topic, json!({"after": "drain"})).await {
            Ok(id) => {
                *again.lock().unwrap() = Some(id);
                true
            }
            Err(e) => {
                assert!(e.to_string().contains("OOM"), "{e}");
                false
            }
        }
    })
    .await;
    let again = again.lock().unwrap().clone().unwrap();
    eventually("the new message is processed", || async {
        runs.ids().contains(again.as_str())
    })
    .await;
    running.stop().await;

    let stats = mq.stats(topic).await.unwrap();
    assert_eq!(stats.published as usize, stored.len() + 1, "{stats:?}");
    assert_eq!(stats.processed as usize, stored.len() + 1, "{stats:?}");
    assert_eq!(stats.dead + stats.failed, 0, "{stats:?}");
    let mut processed = runs.ids();
    processed.insert(popped.to_string());
    for id in &refused {
        assert!(!processed.contains(id.as_str()), "refused {id} ran");
    }
    all.push(again.to_string());
    let report = invariants(&server, topic, &all);
    processed.extend(strings(&refused));
    assert_none_lost(&report, &processed);
    assert_eq!(report.count(State::Gone), all.len());
    assert_no_library_panic_since(panic_mark);

    // Last, the finding that does not stop the checks above: every OOM refusal must be
    // recognisable by `is_out_of_memory`, or callers can't tell "Redis is full" apart.
    assert!(
        unrecognised.is_empty(),
        "{} OOM refusal(s) for which Error::is_out_of_memory() is false, e.g. {:?}",
        unrecognised.len(),
        unrecognised.first()
    );
}

// ---------------------------------------------------------------------------------------
// 4. Startup configuration checks
// ---------------------------------------------------------------------------------------

fn kinds(warnings: &[forgemq::ServerWarning]) -> Vec<WarningKind> {
    warnings.iter().map(|w| w.kind).collect()
}

fn noop_worker(mq: &Client, topic: &str, runs: &Runs, strict: bool) -> Worker {
    let r = runs.clone();
    Worker::builder(mq.clone())
        .subscribe(topic, move |msg: Message<Value>| {
            r.record(msg.id.as_str(), msg.retry);
            async { Ok::<(), HandlerError>(()) }
        })
        .require_safe_redis(strict)
        .build()
        .unwrap()
}

/// Sets a configuration parameter and checks that the server took it, so that what a test
/// asserts on does not depend on the version's defaults.
fn set_config(server: &RedisServer, name: &str, value: &str) {
    let mut conn = server.conn();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .exec(&mut conn)
        .unwrap_or_else(|e| panic!("CONFIG SET {name} {value:?}: {e}"));
    let got: HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        got.get(name).map(String::as_str),
        Some(value),
        "CONFIG GET {name}"
    );
}

/// Eviction and missing persistence are warned about, require_safe_redis refuses them at once, and a user denied CONFIG gets one Unverified warning while its worker still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_config_checks() {
    single_server_only!();
    let panic_mark = watch_library_panics();
    init_tracing();
    let topic = "hostile.config";

    // allkeys-lru, no AOF, no RDB: both risks.
    let risky = RedisServer::start_with(RedisOptions::new().maxmemory_policy("allkeys-lru"));
    let mq = Client::connect(&risky.url()).await.unwrap();
    let warnings = mq.server_warnings().await.unwrap();
    assert_eq!(
        kinds(&warnings),
        [WarningKind::EvictionPolicy, WarningKind::PersistenceOff],
        "{warnings:?}"
    );
    assert!(
        warnings[0].message.contains("allkeys-lru"),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[0].message.contains("noeviction"),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[1].message.contains("appendonly yes"),
        "{}",
        warnings[1]
    );

    // Strict mode refuses at once and consumes nothing.
    let id = mq.publish(topic, json!({"x": 1})).await.unwrap();
    let runs = Runs::default();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        noop_worker(&mq, topic, &runs, true).run_until(std::future::pending()),
    )
    .await
    .expect("require_safe_redis returns at once instead of running");
    match result {
        Err(Error::UnsafeRedis(reasons)) => {
            assert_eq!(reasons.len(), 2, "{reasons:?}");
            assert!(reasons[0].contains("noeviction"), "{reasons:?}");
        }
        other => panic!("expected UnsafeRedis, got {other:?}"),
    }
    assert_eq!(runs.len(), 0);
    assert_eq!(mq.stats(topic).await.unwrap().pending, 1);
    // Without strict mode the same worker only warns, and consumes.
    let running = Running::start(noop_worker(&mq, topic, &runs, false));
    eventually("the lenient worker consumes", || async {
        runs.ids().contains(id.as_str())
    })
    .await;
    running.stop().await;
    invariants(&risky, topic, &[id.to_string()]);

    // noeviction, no AOF, no RDB (`appendonly no`, `save ""`): persistence off only.
    let volatile = RedisServer::start_with(RedisOptions::new().maxmemory_policy("noeviction"));
    let mq2 = Client::connect(&volatile.url()).await.unwrap();
    assert_eq!(
        kinds(&mq2.server_warnings().await.unwrap()),
        [WarningKind::PersistenceOff]
    );
    // RDB snapshots only: AOF off. Set with CONFIG SET, which reads `save` the same way on
    // every version (Redis 6.2 ignores a one-argument `--save "900 1"` on the command line).
    let snapshots = RedisServer::start_with(RedisOptions::new().maxmemory_policy("noeviction"));
    set_config(&snapshots, "save", "900 1");
    set_config(&snapshots, "appendonly", "no");
    let mq3 = Client::connect(&snapshots.url()).await.unwrap();
    assert_eq!(
        kinds(&mq3.server_warnings().await.unwrap()),
        [WarningKind::AofOff]
    );
    // AOF and noeviction: nothing to say, and strict mode runs.
    let safe = RedisServer::start_with(
        RedisOptions::new()
            .aof(forgemq_test_support::Aof::EverySec)
            .maxmemory_policy("noeviction"),
    );
    let mq4 = Client::connect(&safe.url()).await.unwrap();
    assert!(mq4.server_warnings().await.unwrap().is_empty());
    let id4 = mq4.publish(topic, json!({"safe": true})).await.unwrap();
    let runs4 = Runs::default();
    let running = Running::start(noop_worker(&mq4, topic, &runs4, true));
    eventually("the strict worker runs on a safe server", || async {
        runs4.ids().contains(id4.as_str())
    })
    .await;
    running.stop().await;
    drop((volatile, snapshots, safe));

    // An ACL user that may not run CONFIG, on the risky server: nothing can be checked.
    risky.acl_setuser(
        "app",
        &["reset", "on", ">app-password", "~mq:*", "+@all", "-config"],
    );
    let limited = Client::connect(&risky.url_as("app", "app-password"))
        .await
        .unwrap();
    let warnings = limited.server_warnings().await.unwrap();
    assert_eq!(kinds(&warnings), [WarningKind::Unverified], "{warnings:?}");
    assert!(
        warnings[0].message.contains("could not verify"),
        "{}",
        warnings[0]
    );
    // Strict mode does not refuse on Unverified alone: the worker runs and consumes.
    let id5 = limited.publish(topic, json!({"acl": true})).await.unwrap();
    let runs5 = Runs::default();
    let running = Running::start(noop_worker(&limited, topic, &runs5, true));
    eventually("the worker of the CONFIG-less user consumes", || async {
        runs5.ids().contains(id5.as_str())
    })
    .await;
    running.stop().await;
    invariants(&risky, topic, &[id.to_string(), id5.to_string()]);
    assert_no_library_panic_since(panic_mark);
}

/// One command of a RESP request at the start of `buf`, and the bytes it took; `None`
/// until all of it has arrived.
fn parse_resp_command(buf: &[u8]) -> Option<(Vec<String>, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(&str, usize)> {
        let end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((std::str::from_utf8(&buf[at..end]).ok()?, end + 2))
    }
    let (head, mut at) = line(buf, 0)?;
    let n: usize = head.strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        let (len, next) = line(buf, at)?;
        let len: usize = len.strip_prefix('$')?.parse().ok()?;
        let arg = buf.get(next..next + len)?;
        args.push(String::from_utf8_lossy(arg).into_owned());
        at = next + len + 2;
        if buf.len() < at {
            return None;
        }
    }
    Some((args, at))
}

/// A stand-in for an old Redis on a free port: `INFO` says `redis_version:<version>`,
/// `PING` answers `PONG`, anything else `OK`.
async fn fake_redis(version: &'static str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = socket.read(&mut chunk).await {
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some((args, used)) = parse_resp_command(&buf) {
                        buf.drain(..used);
                        let reply = match args.first().map(|c| c.to_ascii_uppercase()) {
                            Some(c) if c == "INFO" => {
                                let info = format!("# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n");
                                format!("${}\r\n{info}\r\n", info.len())
                            }
                            Some(c) if c == "PING" => "+PONG\r\n".to_owned(),
                            _ => "+OK\r\n".to_owned(),
                        };
                        if socket.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// A Redis older than 6.2 is refused at connect with an error naming its version and the
/// minimum, instead of failing at the first fetch; a user denied `INFO` still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_older_than_6_2_is_refused_at_connect() {
    single_server_only!();
    init_tracing();
    for old in ["6.0.9", "5.0.14"] {
        let port = fake_redis(old).await;
        let err = Client::connect(&format!("redis://127.0.0.1:{port}/"))
            .await
            .map(|_| ())
            .expect_err(&format!("Redis {old} was accepted"));
        let text = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(
            text.contains(&format!("Redis {old} is too old")) && text.contains("6.2 or newer"),
            "{text}"
        );
    }
    // The same stand-in saying 6.2.0 is accepted: the check is what refused the others.
    let port = fake_redis("6.2.0").await;
    Client::connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .expect("Redis 6.2.0 is new enough");

    // A real server and a user that may not run INFO: the check is skipped, nothing fails.
    let server = RedisServer::start();
    server.acl_setuser("noinfo", &["reset", "on", ">pw", "~mq:*", "+@all", "-info"]);
    let mq = Client::connect(&server.url_as("noinfo", "pw"))
        .await
        .expect("a user denied INFO connects");
    let id = mq
        .publish("hostile.version", json!({"x": 1}))
        .await
        .unwrap();
    let got = mq.pop_message("hostile.version").await.unwrap().unwrap();
    assert_eq!(got.id(), &id);
    got.ack().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. Least-privilege ACL user over TLS
// ---------------------------------------------------------------------------------------

/// Every Redis command ForgeMQ sends, directly or from its Lua scripts (`lua/*.lua`,
/// `src/store.rs`). SECURITY.md documents this exact list.
const LIBRARY_COMMANDS: &[&str] = &[
    // Sent by src/store.rs and src/conn.rs (one server; see SECURITY.md for what Cluster,
    // Sentinel and replicated acknowledgements add).
    "+evalsha",
    "+script|load",
    "+sadd",
    "+smembers",
    "+set",
    "+get",
    "+hget",
    "+llen",
    "+zcard",
    "+zrange",
    "+lrange",
    "+hgetall",
    "+hlen",
    "+hmget",
    "+exists",
    "+blpop",
    "+client|id",
    "+client|unblock",
    "+lindex",
    // The version check at connect (skipped when refused). A first-argument rule: only
    // `INFO server`, not the other sections.
    "+info|server",
    // Called inside the Lua scripts (checked by ACL too).
    "+time",
    "+hset",
    "+hsetnx",
    "+hdel",
    "+hvals",
    "+hexists",
    "+hincrby",
    "+rpush",
    "+lpush",
    "+lpop",
    "+lset",
    "+lmove",
    "+lrem",
    "+del",
    "+unlink",
    "+pexpire",
    "+pttl",
    "+sismember",
    "+zadd",
    "+zrem",
    "+zscore",
    "+zrangebyscore",
    "+zremrangebyscore",
];

/// The rules of the least-privilege user, after `ACL SETUSER <name>`.
fn least_privilege_rules(password: &str) -> Vec<String> {
    let mut rules: Vec<String> = [
        "reset",
        "on",
        &format!(">{password}"),
        "~mq:*",
        "resetchannels",
        "-@all",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    rules.extend(LIBRARY_COMMANDS.iter().map(|s| (*s).to_owned()));
    rules
}

/// A private CA, a server certificate for 127.0.0.1 and localhost, and a client
/// certificate, written as PEM files into a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new()
            .prefix("forgemq-pki-")
            .tempdir()
            .unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "ForgeMQ test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names.clone()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, names[0].clone());
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![purpose];
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert_pem, client_key_pem) = leaf(
            vec!["forgemq-client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let ca_pem = ca_cert.pem();
        for (name, pem) in [
            ("ca.pem", &ca_pem),
            ("server.pem", &server_cert),
            ("server.key", &server_key),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        Self {
            dir,
            ca_pem,
            client_cert_pem,
            client_key_pem,
        }
    }

    fn server_files(&self) -> TlsFiles {
        let p = |name: &str| self.dir.path().join(name);
        TlsFiles::new(p("server.pem"), p("server.key"), p("ca.pem"))
    }
}

fn is_noperm(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM") || e.to_string().contains("NOPERM")
}

/// Entries of `ACL LOG`: (reason, object, username).
fn acl_log(server: &RedisServer) -> Vec<(String, String, String)> {
    let entries: Vec<HashMap<String, redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .query(&mut server.conn())
        .unwrap();
    let text = |e: &HashMap<String, redis::Value>, k: &str| -> String {
        e.get(k)
            .map(|v| redis::from_redis_value_ref::<String>(v).unwrap_or_default())
            .unwrap_or_default()
    };
    entries
        .iter()
        .map(|e| (text(e, "reason"), text(e, "object"), text(e, "username")))
        .collect()
}

/// The documented least-privilege ACL user runs the whole feature set over verified TLS; a wrong CA is refused; keys outside the namespace are NOPERM; KEYS/SCAN are never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_and_tls() {
    single_server_only!();
    let panic_mark = watch_library_panics();
    init_tracing();
    // The redis crate's rustls has no crypto provider of its own: the application installs
    // one (see SECURITY.md). Ignored if another test installed it first.
    let _ = rustls::crypto::ring::default_provider().install_default();

    // The ACL half runs on every server; the TLS half only where redis-server was built
    // with TLS (the Redis 6.2 of scripts/redis62.sh is not): there the same suite runs on
    // the plain port.
    let tls = server_supports_tls();
    if !tls {
        eprintln!(
            "acl_and_tls: {} has no TLS support (`tls-port` is an unknown directive): the TLS half (verified TLS, wrong CA, mutual TLS) is skipped; the ACL half runs on the plain port",
            redis_server_binary().display()
        );
    }
    let pki = Pki::new();
    let server = if tls {
        RedisServer::start_with(RedisOptions::new().tls(pki.server_files()))
    } else {
        RedisServer::start()
    };
    let password = MessageId::generate().as_str().replace('-', "");
    let rules = least_privilege_rules(&password);
    let rule_refs: Vec<&str> = rules.iter().map(String::as_str).collect();
    server.acl_setuser("forgemq", &rule_refs);
    // As SECURITY.md advises: the redis crate sends CLIENT SETINFO when it connects, which
    // Redis 6.2 (it does not know the subcommand, but checks the ACL first) and 7.2+ log as
    // denied; Redis 7.0 rejects the rule, and answers SETINFO "unknown subcommand" before
    // any ACL check.
    let setinfo: redis::RedisResult<()> = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("forgemq")
        .arg("+client|setinfo")
        .query(&mut server.conn());
    eprintln!("acl_and_tls: ACL SETUSER forgemq +client|setinfo: {setinfo:?}");
    eprintln!(
        "acl_and_tls: ACL SETUSER forgemq {}",
        rules
            .iter()
            .map(|r| if r.starts_with('>') { ">PASSWORD" } else { r })
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query(&mut server.conn())
        .unwrap();
    let stats_before = server.command_stats();

    let url = if tls {
        server.tls_url_as("forgemq", &password)
    } else {
        server.url_as("forgemq", &password)
    };
    let mut builder = Client::builder(&url);
    if tls {
        builder = builder.tls_ca_pem(pki.ca_pem.clone());
    }
    let mq = builder
        .build()
        .await
        .expect("the least-privilege user connects (over verified TLS where there is TLS)");

    // --- The smoke suite, as that user, over TLS ---
    let topic = "smoke.jobs";
    let side = "smoke.side";
    let warnings = mq.server_warnings().await.unwrap();
    assert_eq!(
        kinds(&warnings),
        [WarningKind::Unverified],
        "the user may not run CONFIG GET: {warnings:?}"
    );

    let ok = mq.publish(topic, json!({"kind": "ok"})).await.unwrap();
    let flaky = mq.publish(topic, json!({"kind": "flaky"})).await.unwrap();
    let poison = mq.publish(topic, json!({"kind": "poison"})).await.unwrap();
    let slow = mq.publish(topic, json!({"kind": "slow"})).await.unwrap();
    let delayed = mq
        .publish_with_delay(
            topic,
            json!({"kind": "delayed"}),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    let unique = mq
        .publish_with(
            topic,
            json!({"kind": "unique"}),
            PublishOptions::new().unique_key("order-1", Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let dup = mq
        .publish_with(
            topic,
            json!({"kind": "unique"}),
            PublishOptions::new().unique_key("order-1", Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert!(dup.is_duplicate() && dup.id() == unique.id());
    let batch = mq
        .publish_batch(topic, (0..5).map(|i| json!({"kind": "batch", "i": i})))
        .await
        .unwrap();

    let runs = Runs::default();
    let poisoned_once = Arc::new(Mutex::new(HashSet::new()));
    let (r, p) = (runs.clone(), poisoned_once.clone());
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new()
                .concurrency(4)
                .max_retry(2)
                .backoff(Backoff::fixed(Duration::from_millis(50)))
                .lease(Duration::from_secs(1))
                .deduplicate(Duration::from_secs(60)),
            move |msg: Message<Value>| {
                r.record(msg.id.as_str(), msg.retry);
                let first_poison =
                    msg.data["kind"] == "poison" && p.lock().unwrap().insert(msg.id.to_string());
                async move {
                    match msg.data["kind"].as_str() {
                        Some("flaky") if msg.retry == 0 => Err(HandlerError::retry("flaky")),
                        Some("poison") if first_poison => Err(HandlerError::fatal("poison")),
                        // Outlives its 1 s lease: renewed while it runs.
                        Some("slow") => {
                            tokio::time::sleep(Duration::from_millis(2500)).await;
                            Ok(())
                        }
                        _ => Ok(()),
                    }
                }
            },
        )
        .recover_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually(
        "the smoke messages are handled and the poison one is dead",
        || async {
            let s = mq.stats(topic).await.unwrap();
            s.processed as usize == 10 && s.dead == 1 && s.pending + s.active + s.delayed == 0
        },
    )
    .await;
    let dead = mq.get_dead_letters(topic, 0..10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, poison);
    assert!(dead[0]
        .error
        .as_deref()
        .unwrap_or_default()
        .contains("poison"));
    mq.reprocess_dead_letter(topic, &poison).await.unwrap();
    eventually("the reprocessed dead letter runs again", || async {
        let s = mq.stats(topic).await.unwrap();
        s.processed == 11 && s.dead == 0
    })
    .await;
    running.stop().await;
    assert_eq!(runs.of(flaky.as_str()).len(), 2, "one retry");
    assert!(
        runs.of(slow.as_str()).len() == 1,
        "renewed, not redelivered"
    );
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!(
        (
            stats.published,
            stats.retried,
            stats.dead_lettered,
            stats.reprocessed
        ),
        (11, 1, 1, 1),
        "{stats:?}"
    );

    // Manual fetch with a lease that expires (recovered), cancel, pause/resume, and a
    // worker that stops with a handler in flight (released).
    let a = mq.publish(side, json!({"side": "a"})).await.unwrap();
    let first = mq
        .pop_messages_with_lease(side, 1, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = mq.pop_message(side).await.unwrap().expect("recovered");
    assert_eq!(again.id(), &a);
    assert_eq!(again.message().recoveries, 1);
    again.ack().await.unwrap();
    assert!(first
        .into_iter()
        .next()
        .unwrap()
        .ack()
        .await
        .unwrap_err()
        .is_lease_lost());

    // Part of a publish run taken (the queue-latency bookkeeping shortens the run with
    // LSET): deterministic here, where the worker above may or may not split a run.
    let pair = mq
        .publish_batch(side, [json!({"side": "pair"}), json!({"side": "pair"})])
        .await
        .unwrap();
    for id in &pair {
        let d = mq
            .pop_message(side)
            .await
            .unwrap()
            .expect("one of the pair");
        assert_eq!(d.id(), id);
        d.ack().await.unwrap();
    }

    let pending = mq.publish(side, json!({"side": "pending"})).await.unwrap();
    assert_eq!(mq.cancel(side, &pending).await.unwrap(), Cancelled::Pending);
    let later = mq
        .publish_with_delay(side, json!({"side": "later"}), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(mq.cancel(side, &later).await.unwrap(), Cancelled::Delayed);
    mq.pause(side).await.unwrap();
    assert!(mq.stats(side).await.unwrap().paused);
    assert!(mq.resume(side).await.unwrap());

    let held = mq.publish(side, json!({"side": "held"})).await.unwrap();
    let started = Runs::default();
    let s = started.clone();
    let stubborn = Worker::builder(mq.clone())
        .subscribe(side, move |msg: Message<Value>| {
            s.record(msg.id.as_str(), msg.retry);
            async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<(), HandlerError>(())
            }
        })
        .shutdown_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let running = Running::start(stubborn);
    eventually("the stubborn handler started", || async {
        started.len() == 1
    })
    .await;
    running.stop().await;
    let side_stats = mq.stats(side).await.unwrap();
    assert_eq!(
        side_stats.pending, 1,
        "released on shutdown: {side_stats:?}"
    );

    let all = mq.get_all_queues().await.unwrap();
    let names: Vec<&str> = all.iter().map(|q| q.topic.as_str()).collect();
    assert_eq!(names, [topic, side]);
    assert_eq!(mq.purge_queue(side).await.unwrap().total(), 1);
    assert_eq!(mq.stats(side).await.unwrap().pending, 0);

    // Fair groups under the same user: settings, the ring turning (LMOVE) and emptied
    // groups leaving it (LREM).
    mq.set_group(side, "g1", GroupSettings::new().weight(2))
        .await
        .unwrap();
    let grouped = mq
        .publish_batch_with(
            side,
            ["g1", "g1", "g2", "g2"].map(|g| (json!({"g": g}), PublishOptions::new().group(g))),
        )
        .await
        .unwrap();
    let got = mq.pop_messages(side, 4).await.unwrap();
    assert_eq!(got.len(), 4);
    for d in got {
        d.ack().await.unwrap();
    }
    assert!(mq.remove_group(side, "g1").await.unwrap());

    let mut ids = strings(&[&ok, &flaky, &poison, &slow, &delayed, unique.id()]);
    ids.extend(strings(&batch));
    let report = invariants(&server, topic, &ids);
    assert_none_lost(&report, &runs.ids());
    check_invariants(
        &mut server.conn(),
        &Layout::new("mq", side),
        &[
            strings(&[&a, &pending, &later, &held]),
            grouped.iter().map(|o| o.id().to_string()).collect(),
        ]
        .concat(),
    );

    // Nothing the library sent was denied, except CONFIG GET (by design of this user).
    let denied: Vec<_> = acl_log(&server)
        .into_iter()
        .filter(|(_, object, _)| !object.starts_with("config"))
        .collect();
    assert!(denied.is_empty(), "the ACL denied: {denied:?}");
    // KEYS and SCAN were never sent.
    let stats_after = server.command_stats();
    for c in ["keys", "scan"] {
        assert!(!stats_after.contains_key(c), "{c} was sent");
    }
    let mut used: Vec<String> = stats_after
        .iter()
        .filter(|(c, n)| stats_before.get(*c) != Some(*n) && **n > 0)
        .map(|(c, _)| c.clone())
        .collect();
    used.sort();
    eprintln!("acl_and_tls: commands run during the smoke suite: {used:?}");
    let allowed: HashSet<&str> = LIBRARY_COMMANDS
        .iter()
        .map(|c| c.trim_start_matches('+'))
        .collect();
    // `script|load` counts as used when `script|load` ran, or `script` on Redis 6.2 (whose
    // command statistics have no subcommands); `info|server` (a first-argument rule) as
    // `info`.
    let unused: Vec<&&str> = {
        let mut u: Vec<&&str> = allowed
            .iter()
            .filter(|c| {
                let container = c.split('|').next().unwrap_or(c);
                !used.iter().any(|x| x == **c || x == container)
            })
            .collect();
        u.sort();
        u
    };
    assert!(
        unused.is_empty(),
        "allowed but never used by the smoke suite (drop them from LIBRARY_COMMANDS and SECURITY.md, or exercise them): {unused:?}"
    );

    // --- Outside the namespace: NOPERM, also from inside a script ---
    let mut raw = server.conn_as("forgemq", &password);
    let e = redis::cmd("SET")
        .arg("other:secret")
        .arg("x")
        .exec(&mut raw)
        .unwrap_err();
    assert!(is_noperm(&e), "{e}");
    let e = redis::cmd("HGETALL")
        .arg("app:{orders}:msg")
        .query::<redis::Value>(&mut raw)
        .unwrap_err();
    assert!(is_noperm(&e), "{e}");
    let e = redis::cmd("EVALSHA")
        .arg(MessageId::generate().as_str().replace('-', "")[..32].to_owned() + "00000000")
        .arg(1)
        .arg("other:{x}:msg")
        .exec(&mut raw)
        .unwrap_err();
    assert!(is_noperm(&e), "{e}");
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return redis.call('GET', 'other:secret')")
        .query(&mut raw)
        .unwrap();
    let e = redis::cmd("EVALSHA")
        .arg(&sha)
        .arg(0)
        .exec(&mut raw)
        .unwrap_err();
    assert!(
        is_noperm(&e) || e.to_string().contains("can't access"),
        "a script's inner command is checked too: {e}"
    );
    for denied in [
        vec!["KEYS", "*"],
        vec!["SCAN", "0"],
        vec!["FLUSHALL"],
        vec!["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
        vec!["EVAL", "return 1", "0"],
        vec!["SCRIPT", "FLUSH"],
    ] {
        let e = redis::cmd(denied[0])
            .arg(&denied[1..])
            .exec(&mut raw)
            .unwrap_err();
        assert!(is_noperm(&e), "{denied:?}: {e}");
    }

    if !tls {
        eprintln!(
            "acl_and_tls: no TLS in this redis-server: wrong-CA and mutual-TLS checks skipped"
        );
        assert_no_library_panic_since(panic_mark);
        return;
    }

    // --- A wrong CA, or none: the connection fails, never falls back to no verification ---
    let other = Pki::new();
    for (what, url, ca) in [
        ("a wrong CA", url.clone(), Some(other.ca_pem.clone())),
        (
            "a wrong CA and #insecure",
            format!("{url}#insecure"),
            Some(other.ca_pem.clone()),
        ),
        ("the system roots", url.clone(), None),
    ] {
        let mut builder = Client::builder(&url)
            .connect_timeout(Duration::from_secs(5))
            .reconnect_retries(0);
        if let Some(ca) = ca {
            builder = builder.tls_ca_pem(ca);
        }
        let err = builder
            .build()
            .await
            .expect_err(&format!("{what}: connected without verifying the server"));
        eprintln!("acl_and_tls: {what}: {err}");
        assert!(matches!(err, Error::Redis(_)), "{what}: {err:?}");
    }

    // --- Mutual TLS: once the server requires client certificates, only a client with
    // one signed by the CA gets in ---
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("tls-auth-clients")
        .arg("yes")
        .query(&mut server.conn())
        .unwrap();
    let err = Client::builder(&url)
        .tls_ca_pem(pki.ca_pem.clone())
        .reconnect_retries(0)
        .build()
        .await
        .expect_err("no client certificate");
    eprintln!("acl_and_tls: without a client certificate: {err}");
    let mutual = Client::builder(&url)
        .tls_ca_pem(pki.ca_pem.clone())
        .tls_client_cert_pem(pki.client_cert_pem.clone(), pki.client_key_pem.clone())
        .build()
        .await
        .expect("a client certificate signed by the CA");
    let m = mutual.publish(side, json!({"mtls": true})).await.unwrap();
    assert_eq!(mutual.purge_queue(side).await.unwrap().total(), 1);
    drop(m);
    assert_no_library_panic_since(panic_mark);
}
