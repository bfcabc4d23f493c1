//! Fault tests: worker processes killed, stopped and clock-skewed, Redis killed, paused
//! and frozen, connections killed and partitioned. Each ends with the invariant checker.
//!
//! Leases and intervals are short (1–2 s) so the module stays fast; every wait for
//! something to happen polls with a generous deadline, and the few time bounds asserted
//! say in a comment which slack they allow on a shared, loaded machine.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forgemq::{
    Backoff, Client, HandlerError, Message, MessageId, PublishOptions, Subscription, Worker,
    DEFAULT_DEDUP_TTL,
};
use forgemq_test_support::{
    assert_none_lost, check_invariants, Aof, Layout, RedisOptions, RedisServer,
};
use serde_json::{json, Value};

use crate::common::child::ChildProc;
use crate::common::single_server_only;
use crate::common::{init_tracing, invariants, setup, strings, Proxy, Running};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Polls `check` every 20 ms until it returns true; panics with `what` after `within`.
async fn eventually_within<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if check().await {
            return;
        }
        tokio::time::sleep(ms(20)).await;
    }
    panic!("timed out after {within:?} waiting for: {what}");
}

/// Generous deadline for the waits of this module (CI machines are shared).
const WITHIN: Duration = Duration::from_secs(30);

/// Stats of `topic`, or `None` while Redis is unreachable (the tests kill it).
async fn stats(mq: &Client, topic: &str) -> Option<forgemq::QueueStats> {
    mq.stats(topic).await.ok()
}

/// Waits until nothing of `topic` is pending, active or delayed.
async fn drained(mq: &Client, topic: &str) {
    eventually_within("nothing pending, active or delayed", WITHIN, || async {
        stats(mq, topic)
            .await
            .is_some_and(|s| s.pending == 0 && s.active == 0 && s.delayed == 0)
    })
    .await;
}

/// One handler run as an in-process worker saw it.
#[derive(Clone, Debug)]
struct Run {
    id: String,
    retry: u32,
    recoveries: u32,
    at: Instant,
}

/// Records handler runs with the message's retry and recovery counts.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Run>>>);

impl Log {
    fn record(&self, msg: &Message<Value>) {
        self.0.lock().unwrap().push(Run {
            id: msg.id.to_string(),
            retry: msg.retry,
            recoveries: msg.recoveries,
            at: Instant::now(),
        });
    }

    fn runs(&self) -> Vec<Run> {
        self.0.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn ids(&self) -> HashSet<String> {
        self.runs().into_iter().map(|r| r.id).collect()
    }

    fn per_id(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in self.runs() {
            *m.entry(r.id).or_insert(0) += 1;
        }
        m
    }

    /// A worker whose handler records the run, sleeps `sleep`, and succeeds.
    fn worker(&self, mq: &Client, topic: &str, sub: Subscription, recover: Duration) -> Worker {
        self.worker_sleeping(mq, topic, sub, recover, Duration::ZERO)
    }

    fn worker_sleeping(
        &self,
        mq: &Client,
        topic: &str,
        sub: Subscription,
        recover: Duration,
        sleep: Duration,
    ) -> Worker {
        let log = self.clone();
        Worker::builder(mq.clone())
            .subscribe_with(topic, sub, move |msg: Message<Value>| {
                let log = log.clone();
                async move {
                    log.record(&msg);
                    if !sleep.is_zero() {
                        tokio::time::sleep(sleep).await;
                    }
                    Ok::<(), HandlerError>(())
                }
            })
            .recover_interval(recover)
            .build()
            .unwrap()
    }
}

/// Extra handler runs: every run of an id beyond its first.
fn extra_runs(per_id: &HashMap<String, usize>) -> usize {
    per_id.values().map(|n| n - 1).sum()
}

/// Waits (polling, never blocking the runtime) until `child` exits by itself within
/// `within`; returns how long that took and its output. Panics, killing it, otherwise.
async fn wait_exit(mut child: ChildProc, within: Duration) -> (Duration, String, String) {
    let start = Instant::now();
    while !child.has_exited() {
        if start.elapsed() > within {
            panic!(
                "child did not exit within {within:?}\nstdout:\n{}\nstderr:\n{}",
                child.stdout_now(),
                child.stderr_now()
            );
        }
        tokio::time::sleep(ms(20)).await;
    }
    let took = start.elapsed();
    let (out, err) = child.wait_output();
    (took, out, err)
}

/// Waits (polling) up to `within` for `child` to exit by itself; how long it took, or
/// `None` if it is still running.
async fn exit_within(child: &mut ChildProc, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while !child.has_exited() {
        if start.elapsed() > within {
            return None;
        }
        tokio::time::sleep(ms(20)).await;
    }
    let took = start.elapsed();
    child.finish_reading();
    Some(took)
}

/// Counts the lines of a chaos-worker's stdout that start with `what` (e.g. "started")
/// per message id.
fn lines_per_id(out: &str, what: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some(what) {
            if let Some(id) = words.next() {
                *m.entry(id.to_owned()).or_insert(0) += 1;
            }
        }
    }
    m
}

fn env(pairs: &[(&str, u64)]) -> Vec<(&'static str, String)> {
    pairs
        .iter()
        .map(|(k, v)| {
            let key: &'static str = match *k {
                "concurrency" => "FORGEMQ_CHILD_CONCURRENCY",
                "lease_ms" => "FORGEMQ_CHILD_LEASE_MS",
                "recover_ms" => "FORGEMQ_CHILD_RECOVER_MS",
                "shutdown_ms" => "FORGEMQ_CHILD_SHUTDOWN_MS",
                "response_timeout_ms" => "FORGEMQ_CHILD_RESPONSE_TIMEOUT_MS",
                other => panic!("unknown chaos-worker setting {other}"),
            };
            (key, v.to_string())
        })
        .collect()
}

/// What the invariant checks of a [`Killer`] look at.
struct Check {
    topic: String,
    ids: Vec<String>,
    /// Whether ids may be gone (acknowledged) while the killer runs.
    allow_gone: bool,
}

/// `CLIENT KILL TYPE normal SKIPME yes` in a loop from its own plain connection, and
/// after each kill (optionally) the invariant checker, on a thread of its own.
struct Killer {
    stop: Arc<AtomicBool>,
    gate: Arc<tokio::sync::Mutex<()>>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl Killer {
    fn start(url: String, every: Duration, check: Option<Check>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let (s, g) = (stop.clone(), gate.clone());
        let thread = std::thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let mut conn: Option<redis::Connection> = None;
            let (mut kills, mut checks) = (0u64, 0u64);
            while !s.load(Ordering::SeqCst) {
                {
                    let _held = g.blocking_lock();
                    if conn.is_none() {
                        conn = client.get_connection_with_timeout(ms(500)).ok();
                    }
                    if let Some(c) = conn.as_mut() {
                        let killed: redis::RedisResult<u64> = redis::cmd("CLIENT")
                            .arg("KILL")
                            .arg("TYPE")
                            .arg("normal")
                            .arg("SKIPME")
                            .arg("yes")
                            .query(c);
                        match killed {
                            Ok(n) => {
                                kills += n;
                                if let Some(check) = &check {
                                    let layout = Layout::new("mq", &check.topic);
                                    let report = check_invariants(c, &layout, &check.ids);
                                    checks += 1;
                                    assert!(
                                        check.allow_gone || report.gone.is_empty(),
                                        "ids vanished mid-run: {:?}; states: {report}",
                                        &report.gone[..report.gone.len().min(10)]
                                    );
                                }
                            }
                            Err(_) => conn = None,
                        }
                    }
                }
                std::thread::sleep(every);
            }
            (kills, checks)
        });
        Self {
            stop,
            gate,
            thread: Some(thread),
        }
    }

    /// Held while Redis is down, so that the killer neither kills nor checks meanwhile.
    async fn hold(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    /// Stops the loop; returns (connections killed, invariant checks run). A failed
    /// check fails the test here.
    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().unwrap().join() {
            Ok(counts) => counts,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// SIGKILLed worker holding 100: all rerun elsewhere within lease + recoverer + 2 s, recoveries 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_worker_with_100_in_flight() {
    let (server, mq) = setup().await;
    let topic = "chaos.sigkill";
    let ids = strings(
        &mq.publish_batch(topic, (0..100).map(|i| json!({"i": i})))
            .await
            .unwrap(),
    );
    // Concurrency 100, lease 1 s, handler sleeps until killed.
    let mut child = ChildProc::spawn("sleepy-worker", &server.url(), topic);
    eventually_within("all 100 in flight in the child", WITHIN, || async {
        mq.stats(topic).await.unwrap().active == 100
    })
    .await;
    child.kill9();
    let killed_at = Instant::now();

    let log = Log::default();
    let sub = Subscription::new().concurrency(100).lease(ms(1000));
    let running = Running::start(log.worker(&mq, topic, sub, ms(500)));
    eventually_within("all 100 redelivered", WITHIN, || async {
        log.ids().len() == 100
    })
    .await;
    let took = log.runs().iter().map(|r| r.at).max().unwrap() - killed_at;
    eprintln!("sigkill_worker_with_100_in_flight: all 100 redelivered {took:?} after kill -9");
    // The row's bound: lease 1 s + recoverer interval 0.5 s (+10% jitter) + 2 s = 3.55 s.
    // Allowed slack on top for a shared 2-core machine: 3 s.
    assert!(
        took < ms(3550) + ms(3000),
        "redelivery took {took:?}, over lease + recoverer interval + 2 s (+3 s slack)"
    );
    eventually_within("all 100 processed", WITHIN, || async {
        mq.stats(topic).await.unwrap().processed == 100
    })
    .await;
    running.stop().await;
    let runs = log.runs();
    assert_eq!(runs.len(), 100, "each message ran once after the crash");
    for r in &runs {
        assert_eq!(r.recoveries, 1, "{} recovered {} times", r.id, r.recoveries);
        assert_eq!(r.retry, 0, "a crash is not a failed attempt");
    }
    assert_eq!(mq.stats(topic).await.unwrap().recovered, 100);
    let report = invariants(&server, topic, &ids);
    assert_none_lost(&report, &log.ids());
}

/// SIGTERM: handlers done within the shutdown timeout are acked, the rest pending at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_requeues() {
    let (server, mq) = setup().await;
    let topic = "chaos.sigterm";
    let short = strings(
        &mq.publish_batch(topic, (0..5).map(|i| json!({"i": i, "sleep_ms": 1000})))
            .await
            .unwrap(),
    );
    let long = strings(
        &mq.publish_batch(topic, (5..10).map(|i| json!({"i": i, "sleep_ms": 60_000})))
            .await
            .unwrap(),
    );
    // A 10 s lease: anything back in pending within it was handed back, not recovered.
    let settings = env(&[
        ("concurrency", 10),
        ("lease_ms", 10_000),
        ("recover_ms", 60_000),
        ("shutdown_ms", 3000),
    ]);
    let mut child = ChildProc::spawn_with("chaos-worker", &server.url(), topic, &settings);
    eventually_within("all 10 in flight in the child", WITHIN, || async {
        mq.stats(topic).await.unwrap().active == 10
    })
    .await;
    child.signal("TERM");
    let (took, out, err) = wait_exit(child, Duration::from_secs(30)).await;

    // Right after the exit, no waiting for any lease.
    let s = mq.stats(topic).await.unwrap();
    assert!(
        took < Duration::from_secs(10),
        "shutdown took {took:?}, longer than the lease: the test can't tell hand-back from recovery"
    );
    assert_eq!(
        (s.active, s.pending, s.processed, s.recovered),
        (0, 5, 5, 0),
        "after exit: {s:?}\nstdout:\n{out}\nstderr:\n{err}"
    );
    let all: Vec<String> = short.iter().chain(&long).cloned().collect();
    let report = invariants(&server, topic, &all);
    let mut sorted_long = long.clone();
    sorted_long.sort();
    let mut sorted_short = short.clone();
    sorted_short.sort();
    assert_eq!(
        report.pending, sorted_long,
        "the unfinished ones are pending"
    );
    assert_eq!(
        report.gone, sorted_short,
        "the finished ones are acknowledged"
    );
    let finished = lines_per_id(&out, "finished");
    for id in &short {
        assert_eq!(finished.get(id), Some(&1), "{id} finished in the child");
    }
    for id in &long {
        assert!(!finished.contains_key(id), "{id} can't have finished");
    }

    let log = Log::default();
    let sub = Subscription::new().concurrency(10).lease(ms(1000));
    let running = Running::start(log.worker(&mq, topic, sub, ms(500)));
    eventually_within("the handed-back ones processed", WITHIN, || async {
        mq.stats(topic).await.unwrap().processed == 10
    })
    .await;
    tokio::time::sleep(ms(500)).await;
    running.stop().await;
    let mut rerun: Vec<String> = log.ids().into_iter().collect();
    rerun.sort();
    assert_eq!(rerun, sorted_long, "only the unfinished ones ran again");
    for r in log.runs() {
        assert_eq!(
            (r.retry, r.recoveries),
            (0, 0),
            "a hand-back is neither a failure nor a recovery"
        );
    }
    let report = invariants(&server, topic, &all);
    let processed: HashSet<String> = log.ids().into_iter().chain(short).collect();
    assert_none_lost(&report, &processed);
}

/// What a producer/worker run across a Redis crash saw.
struct CrashRun {
    server: RedisServer,
    mq: Client,
    log: Log,
    attempted: Vec<String>,
    acknowledged: Vec<String>,
    /// Publishes that failed at least once and were retried with the same id.
    retried: usize,
    /// Publishes answered `Duplicate`: a retry with the same id (the client's own or
    /// ours) found an earlier attempt stored. Every id is fresh, so nothing else can.
    duplicates: usize,
    restarted_at: Instant,
}

/// Two producers (each retrying a failed publish with the same id) and a worker run while
/// Redis is frozen for a moment, then killed with SIGKILL halfway and restarted on the
/// same dir and port.
async fn produce_through_redis_crash(aof: Aof, topic: &'static str) -> CrashRun {
    init_tracing();
    let mut server = RedisServer::start_with(RedisOptions::new().aof(aof));
    let mq = Client::builder(server.url())
        .response_timeout(ms(1000))
        .build()
        .await
        .unwrap();
    let log = Log::default();
    // HSETNX makes a retried publish a no-op while the first copy is stored; the ledger
    // of processed ids covers a retry that lands after the first copy already ran.
    let sub = Subscription::new()
        .concurrency(4)
        .lease(ms(2000))
        .deduplicate(DEFAULT_DEDUP_TTL);
    let running = Running::start(log.worker_sleeping(&mq, topic, sub, ms(500), ms(2)));

    #[derive(Default)]
    struct Tally {
        attempted: Vec<String>,
        acknowledged: Vec<String>,
        retried: usize,
        duplicates: usize,
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let producers: Vec<_> = (0..2)
        .map(|p| {
            let (mq, tally) = (mq.clone(), tally.clone());
            tokio::spawn(async move {
                for i in 0..300 {
                    let id = MessageId::generate();
                    tally.lock().unwrap().attempted.push(id.to_string());
                    let mut failures = 0;
                    let started = Instant::now();
                    loop {
                        let opts = PublishOptions::new().id(id.clone());
                        match mq.publish_with(topic, json!({"p": p, "i": i}), opts).await {
                            Ok(outcome) => {
                                let mut t = tally.lock().unwrap();
                                t.acknowledged.push(id.to_string());
                                t.retried += usize::from(failures > 0);
                                t.duplicates += usize::from(outcome.is_duplicate());
                                break;
                            }
                            Err(e) => {
                                assert!(e.is_transient(), "publish failed for good: {e}");
                                assert!(started.elapsed() < WITHIN, "Redis never came back");
                                failures += 1;
                                tokio::time::sleep(ms(100)).await;
                            }
                        }
                    }
                    tokio::time::sleep(ms(3)).await;
                }
            })
        })
        .collect();
    // First Redis freezes for 2.5 s: publishes time out on the client but are applied
    // when it resumes, so their retries with the same id find the first copy stored.
    eventually_within("a sixth published", WITHIN, || async {
        tally.lock().unwrap().acknowledged.len() >= 100
    })
    .await;
    server.sigstop();
    tokio::time::sleep(ms(2500)).await;
    server.sigcont();
    // Then, halfway, it is killed and stays down for 4 s: publishes fail and are retried.
    eventually_within("half published", WITHIN, || async {
        tally.lock().unwrap().acknowledged.len() >= 300
    })
    .await;
    server.kill9();
    tokio::time::sleep(ms(4000)).await;
    server.restart();
    let restarted_at = Instant::now();
    for p in producers {
        p.await.unwrap();
    }
    let t = std::mem::take(&mut *tally.lock().unwrap());
    if aof == Aof::Always {
        let acked: HashSet<String> = t.acknowledged.iter().cloned().collect();
        eventually_within("every acknowledged publish processed", WITHIN, || async {
            let ran = log.ids();
            acked.iter().all(|id| ran.contains(id))
        })
        .await;
    }
    drained(&mq, topic).await;
    running.stop().await;
    CrashRun {
        server,
        mq,
        log,
        attempted: t.attempted,
        acknowledged: t.acknowledged,
        retried: t.retried,
        duplicates: t.duplicates,
        restarted_at,
    }
}

/// Redis frozen, then SIGKILLed (AOF always): acked publishes processed, same-id retries stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_restart_aof_always() {
    single_server_only!();
    let topic = "chaos.aof.always";
    let run = produce_through_redis_crash(Aof::Always, topic).await;
    assert_eq!(
        run.acknowledged.len(),
        600,
        "every publish succeeded in the end"
    );
    assert!(
        run.retried > 0,
        "Redis down for 4 s made no publish fail: the retry path was not exercised"
    );
    let ran = run.log.ids();
    for id in &run.acknowledged {
        assert!(
            ran.contains(id),
            "acknowledged publish {id} never processed"
        );
    }
    // A second stored copy would run as a fresh delivery; a redelivery after a lost ack
    // or an expired lease carries `recoveries >= 1`.
    let mut fresh: HashMap<String, usize> = HashMap::new();
    for r in run.log.runs() {
        if r.recoveries == 0 {
            *fresh.entry(r.id).or_insert(0) += 1;
        }
    }
    let fresh_twice: Vec<_> = fresh.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        fresh_twice.is_empty(),
        "stored and run twice: {fresh_twice:?}"
    );
    assert!(
        run.log.runs().iter().any(|r| r.at > run.restarted_at),
        "the same worker went on after the restart"
    );
    let s = run.mq.stats(topic).await.unwrap();
    let per_id = run.log.per_id();
    let extra = extra_runs(&per_id);
    eprintln!(
        "redis_kill9_restart_aof_always: {} publishes retried with the same id after an error; {} publishes answered Duplicate (a same-id retry found the first copy); {extra} duplicate runs; recovered {}, deduplicated {}",
        run.retried, run.duplicates, s.recovered, s.deduplicated
    );
    assert!(
        per_id.values().all(|&n| n <= 2),
        "an id ran 3 times or more"
    );
    // A second run is allowed only as a counted redelivery (an expired lease).
    assert!(
        extra as u64 <= s.recovered,
        "{extra} duplicate runs but only {} recoveries counted",
        s.recovered
    );
    assert_eq!(s.processed, 600, "each message acknowledged once: {s:?}");
    let report = invariants(&run.server, topic, &run.attempted);
    assert_none_lost(&report, &ran);
}

/// As the AOF-always test with `everysec`: prints how many acknowledged publishes a SIGKILL lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_aof_everysec() {
    single_server_only!();
    let topic = "chaos.aof.everysec";
    let run = produce_through_redis_crash(Aof::EverySec, topic).await;
    let ran = run.log.ids();
    let lost = run
        .acknowledged
        .iter()
        .filter(|id| !ran.contains(*id))
        .count();
    let extra = extra_runs(&run.log.per_id());
    eprintln!(
        "redis_restart_aof_everysec: {lost} of {} acknowledged publishes lost after kill -9 with appendfsync everysec; {extra} duplicate runs",
        run.acknowledged.len()
    );
    let report = invariants(&run.server, topic, &run.attempted);
    // Ids that never ran must not linger anywhere: they are gone with the crash.
    assert_eq!(
        report.gone.len(),
        run.attempted.len(),
        "everything drained: {report}"
    );
}

/// `CLIENT KILL` loop while 1,000 are consumed: each acked once, nothing left, reruns counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_racing_acks() {
    single_server_only!();
    let (server, mq) = setup().await;
    let topic = "chaos.clientkill";
    let ids = strings(
        &mq.publish_batch(topic, (0..1000).map(|i| json!({"i": i})))
            .await
            .unwrap(),
    );
    let log = Log::default();
    // 30 ms per handler, 10 at a time: about 3 s of acks for the killer to race.
    let sub = Subscription::new().concurrency(10).lease(ms(1000));
    let worker = log.worker_sleeping(&mq, topic, sub, ms(300), ms(30));
    let killer = Killer::start(
        server.url(),
        ms(50),
        Some(Check {
            topic: topic.to_owned(),
            ids: ids.clone(),
            allow_gone: true,
        }),
    );
    let running = Running::start(worker);
    eventually_within("all 1000 processed", Duration::from_secs(60), || async {
        stats(&mq, topic).await.is_some_and(|s| s.processed >= 1000)
    })
    .await;
    let (kills, checks) = killer.stop();
    drained(&mq, topic).await;
    running.stop().await;

    let s = mq.stats(topic).await.unwrap();
    assert_eq!(s.processed, 1000, "each message acknowledged exactly once");
    let bodies: u64 = redis::cmd("HLEN")
        .arg(Layout::new("mq", topic).msg())
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(bodies, 0, "no body left");
    let per_id = log.per_id();
    let extra = extra_runs(&per_id);
    eprintln!(
        "client_kill_racing_acks: {kills} connections killed, {checks} invariant checks, {extra} duplicate runs, recovered {}",
        s.recovered
    );
    assert!(
        per_id.values().all(|&n| n <= 2),
        "an id ran 3 times or more"
    );
    assert!(
        extra as u64 <= s.recovered,
        "{extra} duplicate runs but only {} counted as redelivered",
        s.recovered
    );
    assert!(
        checks >= 20 && kills >= 20,
        "the killer ran alongside the consumers ({checks} rounds, {kills} kills)"
    );
    let report = invariants(&server, topic, &ids);
    assert_eq!(report.gone.len(), 1000, "{report}");
    assert_none_lost(&report, &log.ids());
}

/// Partitioned worker: others take over, its acks are refused after healing, its stop is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_then_heal() {
    single_server_only!();
    let (server, mq) = setup().await;
    let proxy = Proxy::start(server.port()).await;
    let topic = "chaos.blackhole";
    let lease = ms(1000);
    let hold = json!({"until_lost": true, "sleep_ms": 20_000});
    let first = strings(
        &mq.publish_batch(topic, (0..5).map(|_| hold.clone()))
            .await
            .unwrap(),
    );
    let settings = env(&[
        ("concurrency", 5),
        ("lease_ms", 1000),
        ("recover_ms", 60_000),
        ("shutdown_ms", 2000),
        ("response_timeout_ms", 500),
    ]);
    let mut stale = ChildProc::spawn_with("chaos-worker", &proxy.url(), topic, &settings);
    eventually_within("the proxied worker holds all 5", WITHIN, || async {
        mq.stats(topic).await.unwrap().active == 5
    })
    .await;

    proxy.partition();
    let cut_at = Instant::now();
    let log = Log::default();
    let sub = Subscription::new().concurrency(5).lease(lease);
    let direct = Running::start(log.worker(&mq, topic, sub.clone(), ms(300)));
    eventually_within(
        "the direct worker recovered and processed all 5",
        WITHIN,
        || async { mq.stats(topic).await.unwrap().processed == 5 },
    )
    .await;
    let partition = lease * 3;
    tokio::time::sleep(partition.saturating_sub(cut_at.elapsed())).await;
    proxy.heal();
    eventually_within("the stale worker's 5 acks refused", WITHIN, || async {
        stale
            .stderr_now()
            .matches("outcome refused: the lease was taken by another worker")
            .count()
            >= 5
    })
    .await;
    direct.stop().await;
    let err = stale.stderr_now();
    assert!(
        err.contains("timed out") || err.contains("did not answer in time"),
        "the stale worker's commands timed out while partitioned:\n{err}"
    );

    // Partitioned again, this time while it holds work, and told to stop: no hang.
    let second = strings(
        &mq.publish_batch(topic, (0..2).map(|_| hold.clone()))
            .await
            .unwrap(),
    );
    eventually_within("the proxied worker holds the next 2", WITHIN, || async {
        mq.stats(topic).await.unwrap().active == 2
    })
    .await;
    proxy.partition();
    stale.signal("TERM");
    let stop_sent = Instant::now();
    // Meanwhile a direct worker takes the 2 over once their leases lapse.
    let log2 = Log::default();
    let direct = Running::start(log2.worker(&mq, topic, sub, ms(300)));
    // The bound: shutdown timeout 2 s (handlers) + 2 s (recording outcomes) + 5 hand-back
    // attempts at the 0.5 s response timeout with their backoff (< 3.1 s) + one renewal
    // in flight (0.5 s) ≈ 8 s; 20 s allows for a loaded machine.
    let bound = Duration::from_secs(20);
    let exited = exit_within(&mut stale, bound).await;
    let (out, err) = (stale.stdout_now(), stale.stderr_now());
    drop(stale);
    eprintln!(
        "blackhole_then_heal: the partitioned worker's run_until returned {:?} after SIGTERM",
        exited.map_or(format!("not within {bound:?}"), |t| format!("{t:?}"))
    );
    eventually_within("the direct worker took over the last 2", WITHIN, || async {
        mq.stats(topic).await.unwrap().processed == 7
    })
    .await;
    proxy.heal();
    // Let the held commands of the stopped worker reach Redis and be refused.
    tokio::time::sleep(ms(500)).await;
    direct.stop().await;

    let s = mq.stats(topic).await.unwrap();
    assert_eq!(s.processed, 7, "never more acks than messages: {s:?}");
    let started = lines_per_id(&out, "started");
    let mut direct_runs = log.per_id();
    for (id, n) in log2.per_id() {
        *direct_runs.entry(id).or_insert(0) += n;
    }
    let all: Vec<String> = first.iter().chain(&second).cloned().collect();
    for id in &all {
        let total =
            started.get(id).copied().unwrap_or(0) + direct_runs.get(id).copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&total),
            "{id} ran {total} times (stale {:?}, direct {:?})",
            started.get(id),
            direct_runs.get(id)
        );
    }
    let report = invariants(&server, topic, &all);
    let processed: HashSet<String> = log.ids().into_iter().chain(log2.ids()).collect();
    assert_none_lost(&report, &processed);
    // Last, so that the checks above run either way.
    assert!(
        exited.is_some() && out.contains("stopped after"),
        "a worker stopped while partitioned must return from run_until within {bound:?} of SIGTERM (shutdown timeout 2 s, response timeout 0.5 s); it did not (it is killed after {:?}):\n{err}",
        stop_sent.elapsed()
    );
}

/// The first handler run that started at or after `t`.
fn first_run_after(log: &Log, t: Instant) -> Option<Instant> {
    log.runs().iter().map(|r| r.at).filter(|&at| at >= t).min()
}

/// `CLIENT PAUSE 4000 ALL`, then SIGSTOP of Redis for 4 s: nothing lost, work resumes within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused() {
    single_server_only!();
    init_tracing();
    let mut server = RedisServer::start();
    let mq = Client::builder(server.url())
        .response_timeout(ms(1000))
        .build()
        .await
        .unwrap();
    let topic = "chaos.paused";
    let log = Log::default();
    let sub = Subscription::new().concurrency(4).lease(ms(2000));
    let running = Running::start(log.worker_sleeping(&mq, topic, sub, ms(500), ms(20)));
    let mut ids = strings(
        &mq.publish_batch(topic, (0..600).map(|i| json!({"i": i})))
            .await
            .unwrap(),
    );
    // A producer publishing all along, retrying with the same id when Redis doesn't answer.
    let stop_producing = Arc::new(AtomicBool::new(false));
    let producer = {
        let (mq, stop) = (mq.clone(), stop_producing.clone());
        tokio::spawn(async move {
            let mut published = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let id = MessageId::generate();
                published.push(id.to_string());
                while mq
                    .publish_with(
                        topic,
                        json!({"live": true}),
                        PublishOptions::new().id(id.clone()),
                    )
                    .await
                    .is_err()
                {
                    tokio::time::sleep(ms(100)).await;
                }
                tokio::time::sleep(ms(50)).await;
            }
            published
        })
    };
    eventually_within("work flowing", WITHIN, || async { log.len() >= 50 }).await;

    let mut admin = server.conn();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(4000)
        .arg("ALL")
        .exec(&mut admin)
        .unwrap();
    let pause_end = Instant::now() + ms(4000);
    tokio::time::sleep(ms(4000)).await;
    eventually_within("work after CLIENT PAUSE", WITHIN, || async {
        first_run_after(&log, pause_end).is_some()
    })
    .await;
    let resumed = first_run_after(&log, pause_end).unwrap() - pause_end;

    ids.extend(strings(
        &mq.publish_batch(topic, (0..600).map(|i| json!({"j": i})))
            .await
            .unwrap(),
    ));
    let before = log.len();
    eventually_within("work flowing again", WITHIN, || async {
        log.len() >= before + 50
    })
    .await;
    server.sigstop();
    tokio::time::sleep(ms(4000)).await;
    server.sigcont();
    let cont_at = Instant::now();
    eventually_within("work after SIGCONT", WITHIN, || async {
        first_run_after(&log, cont_at).is_some()
    })
    .await;
    let resumed_cont = first_run_after(&log, cont_at).unwrap() - cont_at;
    eprintln!(
        "redis_paused: work resumed {resumed:?} after CLIENT PAUSE ended, {resumed_cont:?} after SIGCONT"
    );

    stop_producing.store(true, Ordering::SeqCst);
    ids.extend(producer.await.unwrap());
    let wanted: HashSet<String> = ids.iter().cloned().collect();
    eventually_within(
        "every message processed",
        Duration::from_secs(60),
        || async { wanted.is_subset(&log.ids()) },
    )
    .await;
    drained(&mq, topic).await;
    running.stop().await;
    assert!(
        resumed <= ms(2000),
        "resumed {resumed:?} after CLIENT PAUSE"
    );
    assert!(
        resumed_cont <= ms(2000),
        "resumed {resumed_cont:?} after SIGCONT"
    );
    let report = invariants(&server, topic, &ids);
    assert_none_lost(&report, &log.ids());
}

/// A handler running 5× its lease with healthy renewal runs exactly once, never recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_keeps_lease() {
    let (server, mq) = setup().await;
    let topic = "chaos.slow";
    let id = mq.publish(topic, json!({"report": "Q3"})).await.unwrap();
    let log = Log::default();
    let lost = Arc::new(AtomicBool::new(false));
    let l = (log.clone(), lost.clone());
    let slow = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().lease(ms(1000)),
            move |msg: Message<Value>| {
                let (log, lost) = l.clone();
                async move {
                    log.record(&msg);
                    tokio::time::sleep(ms(5000)).await;
                    lost.store(msg.is_lease_lost(), Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .recover_interval(ms(200))
        .build()
        .unwrap();
    let running = Running::start(slow);
    eventually_within("taken", WITHIN, || async { log.len() == 1 }).await;
    // A second worker with an eager recoverer, ready to take the message if it lapsed.
    let other =
        Running::start(log.worker(&mq, topic, Subscription::new().lease(ms(1000)), ms(200)));
    eventually_within("processed", WITHIN, || async {
        mq.stats(topic).await.unwrap().processed == 1
    })
    .await;
    tokio::time::sleep(ms(500)).await;
    running.stop().await;
    other.stop().await;
    assert_eq!(log.len(), 1, "exactly one run");
    assert!(!lost.load(Ordering::SeqCst), "the lease was never lost");
    let s = mq.stats(topic).await.unwrap();
    assert_eq!((s.processed, s.recovered), (1, 0), "{s:?}");
    let report = invariants(&server, topic, &[id.to_string()]);
    assert_none_lost(&report, &log.ids());
}

/// Worker SIGSTOPped for 3× its lease: its messages run elsewhere, its late acks are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_worker_past_lease() {
    let (server, mq) = setup().await;
    let topic = "chaos.sigstop";
    let lease = ms(1000);
    let ids = strings(
        &mq.publish_batch(topic, (0..5).map(|i| json!({"i": i, "sleep_ms": 2000})))
            .await
            .unwrap(),
    );
    let settings = env(&[
        ("concurrency", 5),
        ("lease_ms", 1000),
        ("recover_ms", 60_000),
    ]);
    let mut child = ChildProc::spawn_with("chaos-worker", &server.url(), topic, &settings);
    eventually_within("the child holds all 5", WITHIN, || async {
        mq.stats(topic).await.unwrap().active == 5
    })
    .await;
    child.signal("STOP");
    let stopped_at = Instant::now();
    let log = Log::default();
    let other = Running::start(log.worker(
        &mq,
        topic,
        Subscription::new().concurrency(5).lease(lease),
        ms(300),
    ));
    eventually_within("taken over and processed", WITHIN, || async {
        mq.stats(topic).await.unwrap().processed == 5
    })
    .await;
    tokio::time::sleep((lease * 3).saturating_sub(stopped_at.elapsed())).await;
    child.signal("CONT");
    eventually_within(
        "the frozen worker's 5 late acks refused",
        WITHIN,
        || async {
            child
                .stderr_now()
                .matches("outcome refused: the lease was taken by another worker")
                .count()
                >= 5
        },
    )
    .await;
    child.signal("TERM");
    let (_, out, _) = wait_exit(child, WITHIN).await;
    other.stop().await;

    let s = mq.stats(topic).await.unwrap();
    assert_eq!((s.processed, s.recovered), (5, 5), "{s:?}");
    // Each late outcome was a duplicate run, and is counted as one (DESIGN.md rule 7).
    assert_eq!(s.duplicate_runs, 5, "{s:?}");
    let started = lines_per_id(&out, "started");
    let finished = lines_per_id(&out, "finished");
    let took_over = log.per_id();
    for id in &ids {
        assert_eq!(
            started.get(id),
            Some(&1),
            "{id} started in the frozen worker"
        );
        assert_eq!(finished.get(id), Some(&1), "{id} finished late there");
        assert_eq!(
            took_over.get(id),
            Some(&1),
            "{id} ran once on the other worker"
        );
    }
    for r in log.runs() {
        assert_eq!(r.recoveries, 1);
    }
    let report = invariants(&server, topic, &ids);
    assert_none_lost(&report, &log.ids());
}

/// Where Debian's `faketime` package (or a local build) put libfaketime.
pub(crate) fn libfaketime() -> Option<String> {
    let arch = std::env::consts::ARCH;
    [
        format!("/usr/lib/{arch}-linux-gnu/faketime/libfaketime.so.1"),
        "/usr/lib/faketime/libfaketime.so.1".to_owned(),
        "/usr/lib64/faketime/libfaketime.so.1".to_owned(),
        "/usr/local/lib/faketime/libfaketime.so.1".to_owned(),
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

/// Workers 5 min ahead/behind (libfaketime): no early recovery, no early delayed delivery, none stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew() {
    let libfaketime = libfaketime().expect(
        "libfaketime is not installed: run scripts/ensure-test-tools.sh (apt-get install faketime)",
    );
    let (server, mq) = setup().await;
    let topic = "chaos.skew";
    let mut settings = env(&[("concurrency", 10), ("lease_ms", 1000), ("recover_ms", 200)]);
    // Preloaded into the worker itself (no `faketime` wrapper process in between, so
    // signals reach it). Only the wall clock is shifted; timers run on the monotonic one.
    settings.push(("LD_PRELOAD", libfaketime));
    settings.push(("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()));
    let mut workers = Vec::new();
    for (offset, skew) in [("+5m", 300_000i64), ("-5m", -300_000)] {
        let mut env = settings.clone();
        env.push(("FAKETIME", offset.to_owned()));
        let w = ChildProc::spawn_with("chaos-worker", &server.url(), topic, &env);
        workers.push((w, skew));
    }
    for (w, skew) in &workers {
        eventually_within("the skewed worker reports its clock", WITHIN, || async {
            w.stdout_now().contains("clock ")
        })
        .await;
        let out = w.stdout_now();
        // The first line may follow the test harness's "test child_process_entry ... ".
        let theirs: i64 = out
            .lines()
            .find_map(|l| l.split("clock ").nth(1))
            .unwrap()
            .parse()
            .unwrap();
        let ours = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let seen = theirs - ours;
        assert!(
            (seen - skew).abs() < 30_000,
            "faketime did not shift the worker's clock by {skew} ms (saw {seen} ms)"
        );
    }

    // Four handlers of 4 s, four times the lease, with both workers' recoverers every 200 ms.
    let slow = strings(
        &mq.publish_batch(topic, (0..4).map(|i| json!({"slow": i, "sleep_ms": 4000})))
            .await
            .unwrap(),
    );
    // Twenty delayed messages, 0.5 s to 3 s; due times measured on this process's clock.
    let mut delayed = Vec::new();
    for i in 0..20u64 {
        let delay = ms(500 + i * 125);
        let published_at = Instant::now();
        let id = mq
            .publish_with_delay(topic, json!({"delayed": i}), delay)
            .await
            .unwrap();
        delayed.push((id.to_string(), published_at + delay));
    }
    eventually_within("all 24 processed", WITHIN, || async {
        mq.stats(topic).await.unwrap().processed == 24
    })
    .await;
    let mut starts: HashMap<String, Vec<Instant>> = HashMap::new();
    let mut outs = String::new();
    for (mut w, _) in workers {
        for (at, line) in w.stdout_lines() {
            let mut words = line.split_whitespace();
            if words.next() == Some("started") {
                let id = words.next().unwrap().to_owned();
                starts.entry(id).or_default().push(at);
            }
        }
        w.signal("TERM");
        let (_, out, _) = wait_exit(w, WITHIN).await;
        outs.push_str(&out);
    }
    let s = mq.stats(topic).await.unwrap();
    assert_eq!(s.recovered, 0, "a live lease was recovered: {s:?}");
    for id in &slow {
        assert_eq!(starts[id].len(), 1, "slow message {id} ran more than once");
    }
    assert_eq!(
        outs.matches("lease_lost=true").count(),
        0,
        "a lease was lost:\n{outs}"
    );
    let mut worst_late = Duration::ZERO;
    for (id, due) in &delayed {
        // The start is stamped when its line reaches this process: a few ms after the
        // handler really started, never before, so an early delivery cannot hide.
        let first = *starts[id].iter().min().unwrap();
        assert!(
            first >= *due,
            "{id} delivered {:?} before it was due",
            *due - first
        );
        worst_late = worst_late.max(first - *due);
    }
    eprintln!("clock_skew: latest delayed delivery {worst_late:?} after due");
    // None stuck: each within 2 s of due (+2 s of slack for a loaded machine).
    assert!(
        worst_late < ms(4000),
        "a delayed message was {worst_late:?} late"
    );
    let all: Vec<String> = slow
        .iter()
        .cloned()
        .chain(delayed.iter().map(|(id, _)| id.clone()))
        .collect();
    let report = invariants(&server, topic, &all);
    let processed: HashSet<String> = lines_per_id(&outs, "finished").into_keys().collect();
    assert_none_lost(&report, &processed);
}

/// A handler panicking on every attempt: worker survives, backoff kept, dead after max_retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panics_every_time() {
    let (server, mq) = setup().await;
    let topic = "chaos.panics";
    let bad = mq.publish(topic, json!({"poison": true})).await.unwrap();
    let mut ids = strings(
        &mq.publish_batch(topic, (0..50).map(|i| json!({"i": i})))
            .await
            .unwrap(),
    );
    let backoff = ms(300);
    let log = Log::default();
    let l = log.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new()
                .concurrency(4)
                .max_retry(3)
                .backoff(Backoff::fixed(backoff)),
            move |msg: Message<Value>| {
                let log = l.clone();
                async move {
                    log.record(&msg);
                    if msg.data["poison"] == json!(true) {
                        panic!("ledger row {} is corrupt", msg.id);
                    }
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually_within(
        "the good ones processed and the bad one dead",
        WITHIN,
        || async {
            let s = mq.stats(topic).await.unwrap();
            s.processed == 50 && s.dead == 1
        },
    )
    .await;
    // Still consuming after four panics.
    ids.extend(strings(
        &mq.publish_batch(topic, (50..60).map(|i| json!({"i": i})))
            .await
            .unwrap(),
    ));
    eventually_within("later messages processed", WITHIN, || async {
        mq.stats(topic).await.unwrap().processed == 60
    })
    .await;
    running.stop().await;

    let attempts: Vec<Run> = log
        .runs()
        .into_iter()
        .filter(|r| r.id == bad.as_str())
        .collect();
    assert_eq!(
        attempts.iter().map(|r| r.retry).collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "max_retry 3 = 4 runs"
    );
    for pair in attempts.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= backoff, "retried after {gap:?}, before the backoff");
    }
    let dead = mq.get_dead_letters(topic, 0..10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, bad);
    assert_eq!(dead[0].retry, 4);
    let error = dead[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("panicked") && error.contains(&format!("ledger row {bad} is corrupt")),
        "{error}"
    );
    ids.push(bad.to_string());
    let report = invariants(&server, topic, &ids);
    assert_eq!(report.dead, vec![bad.to_string()]);
    assert_none_lost(&report, &log.ids());
}

/// A message that aborts its worker process: dead-lettered after max_recoveries, others flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_crash_loop() {
    let (server, mq) = setup().await;
    let topic = "chaos.poison";
    // The abort waits 200 ms so that the previous message's ack is recorded first
    // (concurrency 1): only the poison message is in flight when the process dies.
    let poison = mq
        .publish(topic, json!({"abort": true, "sleep_ms": 200}))
        .await
        .unwrap();
    let mut goods = strings(
        &mq.publish_batch(topic, (0..20).map(|i| json!({"i": i})))
            .await
            .unwrap(),
    );
    let settings = env(&[("concurrency", 1), ("lease_ms", 1000), ("recover_ms", 300)]);
    let spawn = || ChildProc::spawn_with("chaos-worker", &server.url(), topic, &settings);
    let mut child = spawn();
    let mut outputs = String::new();
    let mut restarts = 0;
    let started = Instant::now();
    let mut next_publish = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "crash loop did not settle; restarts {restarts}\n{outputs}"
        );
        if child.has_exited() {
            outputs.push_str(&child.stdout_now());
            child = spawn();
            restarts += 1;
        }
        // More work keeps arriving during the crash loop.
        if goods.len() < 40 && Instant::now() >= next_publish {
            let id = mq
                .publish(topic, json!({"late": goods.len()}))
                .await
                .unwrap();
            goods.push(id.to_string());
            next_publish = Instant::now() + ms(250);
        }
        let s = mq.stats(topic).await.unwrap();
        if goods.len() == 40 && s.dead == 1 && s.processed == 40 {
            break;
        }
        tokio::time::sleep(ms(50)).await;
    }
    child.signal("TERM");
    let (_, out, _) = wait_exit(child, WITHIN).await;
    outputs.push_str(&out);

    let aborts = lines_per_id(&outputs, "aborting");
    eprintln!("poison_crash_loop: {restarts} restarts");
    assert_eq!(aborts.len(), 1, "only the poison message crashed a worker");
    assert_eq!(
        aborts.get(poison.as_str()),
        Some(&4),
        "max_recoveries 3: the fourth expiry dead-letters it"
    );
    assert_eq!(restarts, 4);
    let dead = mq.get_dead_letters(topic, 0..10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, poison);
    let error = dead[0].error.clone().unwrap_or_default();
    assert!(error.contains("worker crashed"), "{error}");
    let finished = lines_per_id(&outputs, "finished");
    for id in &goods {
        assert!(finished.contains_key(id), "{id} was never processed");
    }
    let mut all = goods.clone();
    all.push(poison.to_string());
    let report = invariants(&server, topic, &all);
    assert_eq!(report.dead, vec![poison.to_string()]);
    assert_none_lost(&report, &finished.into_keys().collect());
}

/// 1,000 delayed 0–10 s across a Redis SIGKILL at 5 s: none early, all by due + 2 s, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_across_restart() {
    single_server_only!();
    init_tracing();
    let mut server = RedisServer::start_with(RedisOptions::new().aof(Aof::Always));
    let mq = Client::builder(server.url())
        .response_timeout(ms(1000))
        .build()
        .await
        .unwrap();
    let topic = "chaos.delayed";
    let delays: HashMap<String, Duration> = (0..1000u64)
        .map(|i| (MessageId::generate().to_string(), ms(i * 10)))
        .collect();
    let items: Vec<(Value, PublishOptions)> = delays
        .iter()
        .map(|(id, d)| {
            let opts = PublishOptions::new()
                .id(MessageId::new(id.clone()).unwrap())
                .delay(*d);
            (json!({"delay_ms": d.as_millis() as u64}), opts)
        })
        .collect();
    let log = Log::default();
    let sub = Subscription::new().concurrency(50).lease(ms(2000));
    let running = Running::start(log.worker(&mq, topic, sub, ms(500)));
    // Before the call: Redis computes each due time later than this, so `published +
    // delay` is never after the real due time.
    let published = Instant::now();
    mq.publish_batch_with(topic, items).await.unwrap();
    tokio::time::sleep((published + ms(5000)).saturating_duration_since(Instant::now())).await;
    server.kill9();
    tokio::time::sleep(ms(300)).await;
    server.restart();
    eventually_within("all 1000 delivered", WITHIN, || async {
        log.ids().len() == 1000
    })
    .await;
    drained(&mq, topic).await;
    running.stop().await;

    let mut early = Vec::new();
    let mut worst_late = Duration::ZERO;
    let mut first: HashMap<String, Instant> = HashMap::new();
    for r in log.runs() {
        let due = published + delays[&r.id];
        if r.at < due {
            early.push((r.id.clone(), due - r.at));
        }
        let f = first.entry(r.id.clone()).or_insert(r.at);
        *f = (*f).min(r.at);
    }
    for (id, at) in &first {
        worst_late = worst_late.max(at.saturating_duration_since(published + delays[id]));
    }
    let extra = extra_runs(&log.per_id());
    eprintln!(
        "delayed_across_restart: latest first delivery {worst_late:?} after due; {extra} duplicate runs"
    );
    assert!(
        early.is_empty(),
        "delivered early: {:?}",
        &early[..early.len().min(10)]
    );
    // The row's bound is due + 2 s; 2 s more of slack for a loaded machine.
    assert!(worst_late <= ms(4000), "a message was {worst_late:?} late");
    let ids: Vec<String> = delays.into_keys().collect();
    let report = invariants(&server, topic, &ids);
    assert_none_lost(&report, &log.ids());
}

/// 1,000 dead-letter moves under CLIENT KILL and a Redis SIGKILL: atomic, then reprocessed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_moves_atomic() {
    single_server_only!();
    init_tracing();
    let mut server = RedisServer::start_with(RedisOptions::new().aof(Aof::Always));
    let mq = Client::builder(server.url())
        .response_timeout(ms(1000))
        .build()
        .await
        .unwrap();
    let topic = "chaos.deadletter";
    let ids = strings(
        &mq.publish_batch(topic, (0..1000).map(|i| json!({"invoice": i})))
            .await
            .unwrap(),
    );
    let failing = Arc::new(AtomicBool::new(true));
    let (fails, succeeds) = (Log::default(), Log::default());
    let state = (failing.clone(), fails.clone(), succeeds.clone());
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(10).lease(ms(1000)),
            move |msg: Message<Value>| {
                let (failing, fails, succeeds) = state.clone();
                async move {
                    if failing.load(Ordering::SeqCst) {
                        fails.record(&msg);
                        tokio::time::sleep(ms(5)).await;
                        return Err(HandlerError::fatal(format!(
                            "invoice {} rejected by the ledger",
                            msg.data["invoice"]
                        )));
                    }
                    succeeds.record(&msg);
                    Ok(())
                }
            },
        )
        .recover_interval(ms(300))
        // Connection kills can cost a message a few lease expiries; the reason asserted
        // below is the handler's, so it must not be dead-lettered as poison instead.
        .max_recoveries(50)
        .build()
        .unwrap();
    let check = |allow_gone| Check {
        topic: topic.to_owned(),
        ids: ids.clone(),
        allow_gone,
    };
    let killer = Killer::start(server.url(), ms(100), Some(check(false)));
    let running = Running::start(worker);
    eventually_within("a third dead", WITHIN, || async {
        stats(&mq, topic).await.is_some_and(|s| s.dead >= 300)
    })
    .await;
    {
        let _quiet = killer.hold().await;
        server.kill9();
        tokio::time::sleep(ms(300)).await;
        server.restart();
    }
    eventually_within("all 1000 dead", Duration::from_secs(60), || async {
        stats(&mq, topic).await.is_some_and(|s| s.dead == 1000)
    })
    .await;
    let (kills, checks) = killer.stop();
    let s = mq.stats(topic).await.unwrap();
    assert_eq!(
        s.dead_lettered, 1000,
        "each moved to the dead letters once: {s:?}"
    );
    let report = invariants(&server, topic, &ids);
    assert_eq!(report.dead.len(), 1000, "{report}");
    let dead = mq.get_dead_letters(topic, 0..2000).await.unwrap();
    assert_eq!(dead.len(), 1000);
    for d in &dead {
        let reason = format!("invoice {} rejected by the ledger", d.data["invoice"]);
        assert_eq!(d.error.as_deref(), Some(reason.as_str()), "reason kept");
        assert!(d.envelope.contains(&reason), "history kept: {}", d.envelope);
        assert_eq!(d.retry, 1);
    }

    failing.store(false, Ordering::SeqCst);
    let killer = Killer::start(server.url(), ms(100), Some(check(true)));
    let mut unknown_outcomes = 0;
    for id in &ids {
        let id = MessageId::new(id.clone()).unwrap();
        let mut failed_before = false;
        loop {
            match mq.reprocess_dead_letter(topic, &id).await {
                Ok(()) => break,
                // The earlier attempt was applied; only its reply was lost.
                Err(e) if e.is_not_found() && failed_before => {
                    unknown_outcomes += 1;
                    break;
                }
                Err(e) if e.is_transient() => {
                    failed_before = true;
                    tokio::time::sleep(ms(50)).await;
                }
                Err(e) => panic!("reprocess {id}: {e}"),
            }
        }
    }
    eventually_within("all 1000 processed", Duration::from_secs(60), || async {
        stats(&mq, topic).await.is_some_and(|s| s.processed == 1000)
    })
    .await;
    let (kills2, checks2) = killer.stop();
    drained(&mq, topic).await;
    running.stop().await;

    let s = mq.stats(topic).await.unwrap();
    let per_id = succeeds.per_id();
    let extra = extra_runs(&per_id);
    eprintln!(
        "dead_letter_moves_atomic: {} connections killed, {} invariant checks; {unknown_outcomes} reprocess replies lost; {extra} duplicate runs; {} failing runs",
        kills + kills2,
        checks + checks2,
        fails.len()
    );
    assert_eq!(
        (s.reprocessed, s.processed, s.dead),
        (1000, 1000, 0),
        "each requeued once and processed: {s:?}"
    );
    assert_eq!(per_id.len(), 1000);
    assert!(
        per_id.values().all(|&n| n <= 2),
        "an id ran 3 times or more"
    );
    assert!(
        extra as u64 <= s.recovered,
        "{extra} uncounted duplicate runs"
    );
    for r in succeeds.runs() {
        assert_eq!(r.retry, 0, "reprocessed with a fresh set of retries");
    }
    let report = invariants(&server, topic, &ids);
    assert_eq!(report.gone.len(), 1000, "{report}");
    assert_none_lost(&report, &succeeds.ids());
}
