//! Soak: many messages through several worker processes while workers and Redis are killed.
//!
//! A producer task in the test process publishes every message in batches with ids it
//! chose (so a batch whose outcome was unknown is retried without duplicates). Worker
//! processes (this test binary re-run through [`soak_child_entry`]) handle them with a
//! small handler that records each run in Redis (`soak:runs`, outside the `mq:`
//! namespace) before returning `Ok`. Meanwhile worker processes are killed with SIGKILL
//! (and replaced) and Redis is killed with SIGKILL and restarted on its AOF (`always`).
//! At the end every message must be handled or dead, the invariant checker must pass over
//! every id, and one summary line says how many ran twice.
//!
//! `soak_50k` runs with the suite; `soak_1m` is run by name, in release:
//! `cargo test --release -p forgemq --test it soak::soak_1m -- --ignored --nocapture`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgemq::{Client, HandlerError, Message, MessageId, PublishOptions, Subscription, Worker};
use forgemq_test_support::{assert_none_lost, Aof, RedisOptions, RedisServer};
use rand::Rng;
use serde_json::{json, Value};

use crate::common::single_server_only;
use crate::common::{init_tracing, invariants};

const TOPIC: &str = "soak.events";

/// HASH id → one `token,` per recorded run. Outside the `mq:` namespace on purpose.
const RUNS_KEY: &str = "soak:runs";

/// Set (to the Redis URL) in the environment of a soak worker process.
const CHILD_URL_ENV: &str = "FORGEMQ_SOAK_URL";
/// Handler concurrency of a soak worker process.
const CHILD_CONCURRENCY_ENV: &str = "FORGEMQ_SOAK_CONCURRENCY";

/// Lease of the soak workers: short, so that a killed worker's messages run again soon.
const LEASE: Duration = Duration::from_secs(2);
const RECOVER_INTERVAL: Duration = Duration::from_millis(500);

/// Records one run of `id`, idempotently per run: each run has a random token, and a
/// retry of the same run (after Redis died before answering) finds its token already
/// there. So duplicates counted at the end are real extra runs, not retried records.
const RECORD_SCRIPT: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
local entry = ARGV[2] .. ','
if not v then
  redis.call('HSET', KEYS[1], ARGV[1], entry)
  return 1
end
if string.find(v, entry, 1, true) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], v .. entry)
return 1
";

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillWorker,
    KillRedis,
}

struct Plan {
    name: &'static str,
    messages: usize,
    workers: usize,
    concurrency: usize,
    batch: usize,
    /// Most published-but-unhandled messages: keeps publishing going through the run (so
    /// Redis kills also hit publishes) and the backlog bounded.
    backlog: usize,
    /// Faults, each at a fraction of the messages handled.
    faults: &'static [(f64, Fault)],
    /// The whole run must finish within this.
    deadline: Duration,
}

/// 50,000 messages, 4 worker processes, 2 worker kills and 1 Redis kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_50k() {
    single_server_only!();
    soak(Plan {
        name: "soak_50k",
        messages: 50_000,
        workers: 4,
        concurrency: 16,
        batch: 500,
        backlog: 10_000,
        faults: &[
            (0.2, Fault::KillWorker),
            (0.45, Fault::KillRedis),
            (0.7, Fault::KillWorker),
        ],
        deadline: Duration::from_secs(110),
    })
    .await;
}

/// 1,000,000 messages, 4 worker processes, 5 worker kills and 2 Redis kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long soak (minutes); run by name in release: cargo test --release -p forgemq --test it soak::soak_1m -- --ignored --nocapture"]
async fn soak_1m() {
    single_server_only!();
    soak(Plan {
        name: "soak_1m",
        messages: 1_000_000,
        workers: 4,
        concurrency: 32,
        batch: 1000,
        backlog: 50_000,
        faults: &[
            (0.08, Fault::KillWorker),
            (0.2, Fault::KillWorker),
            (0.3, Fault::KillRedis),
            (0.45, Fault::KillWorker),
            (0.6, Fault::KillWorker),
            (0.7, Fault::KillRedis),
            (0.85, Fault::KillWorker),
        ],
        deadline: Duration::from_secs(60 * 60),
    })
    .await;
}

async fn soak(plan: Plan) {
    init_tracing();
    let started = Instant::now();
    let mut server = RedisServer::start_with(RedisOptions::new().aof(Aof::Always));
    let url = server.url();
    let mq = Client::builder(&url)
        .response_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let mut redis = control_conn(&url);
    let ids: Arc<Vec<MessageId>> =
        Arc::new((0..plan.messages).map(|_| MessageId::generate()).collect());

    let logs = tempfile::Builder::new()
        .prefix("forgemq-soak-")
        .tempdir()
        .unwrap();
    let mut spawned = 0;
    let mut workers: Vec<SoakWorker> = (0..plan.workers)
        .map(|_| {
            spawned += 1;
            SoakWorker::spawn(&url, plan.concurrency, logs.path(), spawned)
        })
        .collect();

    let handled = Arc::new(AtomicUsize::new(0));
    let published = Arc::new(AtomicUsize::new(0));
    let producer_done = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(produce(
        mq.clone(),
        ids.clone(),
        plan.batch,
        plan.backlog,
        handled.clone(),
        published.clone(),
        producer_done.clone(),
    ));

    // Faults at their points of progress; progress = ids recorded at least once.
    let mut faults = plan.faults.iter().peekable();
    let (mut worker_kills, mut redis_kills) = (0, 0);
    let mut last_report = Instant::now();
    loop {
        assert!(
            started.elapsed() < plan.deadline,
            "{}: not done after {:?}: handled {} of {}, published {}",
            plan.name,
            plan.deadline,
            handled.load(Ordering::SeqCst),
            plan.messages,
            published.load(Ordering::SeqCst)
        );
        if let Ok(n) = redis::cmd("HLEN")
            .arg(RUNS_KEY)
            .query_async::<usize>(&mut redis)
            .await
        {
            handled.store(n, Ordering::SeqCst);
        }
        let done = handled.load(Ordering::SeqCst);
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "{}: {:>6.1}s published {} handled {}",
                plan.name,
                started.elapsed().as_secs_f64(),
                published.load(Ordering::SeqCst),
                done
            );
        }
        if let Some(&&(at, fault)) = faults.peek() {
            if done as f64 >= at * plan.messages as f64 {
                faults.next();
                match fault {
                    Fault::KillWorker => {
                        let victim = worker_kills % workers.len();
                        workers[victim].kill9();
                        spawned += 1;
                        workers[victim] =
                            SoakWorker::spawn(&url, plan.concurrency, logs.path(), spawned);
                        worker_kills += 1;
                    }
                    Fault::KillRedis => {
                        tokio::task::block_in_place(|| {
                            server.kill9();
                            std::thread::sleep(Duration::from_millis(500));
                            server.restart();
                        });
                        redis_kills += 1;
                    }
                }
                eprintln!(
                    "{}: {:>6.1}s {fault:?} at {done} handled",
                    plan.name,
                    started.elapsed().as_secs_f64()
                );
                continue;
            }
        }
        if producer_done.load(Ordering::SeqCst) && faults.peek().is_none() {
            if let Ok(s) = mq.stats(TOPIC).await {
                if s.pending == 0 && s.active == 0 && s.delayed == 0 {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    producer.await.unwrap();
    let run_time = started.elapsed();
    for w in &mut workers {
        w.kill9();
    }

    // Count runs per id, then check states.
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let (runs, memory, runs_memory) = tokio::task::block_in_place(|| {
        let mut conn = server.conn();
        let runs: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(RUNS_KEY)
            .query(&mut conn)
            .unwrap();
        let info: String = redis::cmd("INFO").arg("memory").query(&mut conn).unwrap();
        let runs_memory: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(RUNS_KEY)
            .query(&mut conn)
            .unwrap();
        (runs, info, runs_memory.unwrap_or(0))
    });
    let stats = mq.stats(TOPIC).await.unwrap();
    let report = tokio::task::block_in_place(|| invariants(&server, TOPIC, &ids));
    let count_of = |id: &str| runs.get(id).map_or(0, |v| v.matches(',').count());
    let handled: HashSet<String> = runs.keys().cloned().collect();
    let duplicates = ids.iter().filter(|id| count_of(id) > 1).count();
    let extra_runs: usize = ids.iter().map(|id| count_of(id).saturating_sub(1)).sum();
    let lost: Vec<&String> = report.gone.iter().filter(|id| count_of(id) == 0).collect();
    let id_set: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let unknown = runs.keys().filter(|k| !id_set.contains(k.as_str())).count();
    let mem = |field: &str| {
        memory
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or("?")
            .trim()
            .to_owned()
    };
    println!(
        "{}: published={} processed={} dead={} duplicates={} (extra runs {}) lost={} | handled_ids={} acked={} recovered={} published_counter={} worker_kills={worker_kills} redis_kills={redis_kills} | used_memory={} ({}) peak={} soak_runs_key={:.1}MB | {:.1}s",
        plan.name,
        ids.len(),
        handled.len(),
        report.dead.len(),
        duplicates,
        extra_runs,
        lost.len(),
        handled.len(),
        stats.processed,
        stats.recovered,
        stats.published,
        mem("used_memory"),
        mem("used_memory_human"),
        mem("used_memory_peak_human"),
        runs_memory as f64 / 1e6,
        run_time.as_secs_f64(),
    );
    assert_eq!(unknown, 0, "runs recorded for ids never published");
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_none_lost(&report, &handled);
    assert_eq!(
        report.gone.len() + report.dead.len(),
        ids.len(),
        "states at the end: {report}"
    );
    assert_eq!((worker_kills, redis_kills), fault_counts(plan.faults));
}

fn fault_counts(faults: &[(f64, Fault)]) -> (usize, usize) {
    let workers = faults
        .iter()
        .filter(|(_, f)| matches!(f, Fault::KillWorker))
        .count();
    (workers, faults.len() - workers)
}

/// Publishes every id, in batches, retrying a failed batch with the same ids until it is
/// stored; keeps at most `backlog` messages published but not yet handled.
async fn produce(
    mq: Client,
    ids: Arc<Vec<MessageId>>,
    batch: usize,
    backlog: usize,
    handled: Arc<AtomicUsize>,
    published: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
) {
    for (n, chunk) in ids.chunks(batch).enumerate() {
        while published.load(Ordering::SeqCst) > handled.load(Ordering::SeqCst) + backlog {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = n * batch;
        let give_up = Instant::now() + Duration::from_secs(120);
        loop {
            let items = chunk.iter().enumerate().map(|(k, id)| {
                (
                    json!({"i": first + k, "payload": "x".repeat(64)}),
                    PublishOptions::new().id(id.clone()),
                )
            });
            match mq.publish_batch_with(TOPIC, items).await {
                Ok(outcomes) => {
                    assert_eq!(outcomes.len(), chunk.len());
                    break;
                }
                Err(e) => {
                    assert!(
                        Instant::now() < give_up,
                        "publishing batch {n} failed for 2 minutes: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        published.fetch_add(chunk.len(), Ordering::SeqCst);
    }
    done.store(true, Ordering::SeqCst);
}

/// A Redis connection for the test's own reads; it reconnects by itself after a restart.
fn control_conn(url: &str) -> redis::aio::ConnectionManager {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(2);
    redis::aio::ConnectionManager::new_lazy_with_config(redis::Client::open(url).unwrap(), config)
        .unwrap()
}

/// A soak worker process (this binary, running [`soak_child_entry`]); SIGKILLed on drop.
struct SoakWorker {
    child: Option<Child>,
    log: PathBuf,
}

impl SoakWorker {
    fn spawn(url: &str, concurrency: usize, dir: &Path, n: usize) -> Self {
        // Output goes to a file: an unread pipe would fill up and stall the worker.
        let log = dir.join(format!("worker-{n}.log"));
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "soak::soak_child_entry",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_URL_ENV, url)
            .env(CHILD_CONCURRENCY_ENV, concurrency.to_string())
            .env("RUST_LOG", "forgemq=warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            log,
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SoakWorker {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            eprintln!("----- tail of {} -----\n{tail}", self.log.display());
        }
    }
}

/// Entry point of a soak worker process; does nothing unless `FORGEMQ_SOAK_URL` is set.
#[test]
#[ignore = "entry point for the soak's worker processes"]
fn soak_child_entry() {
    let Ok(url) = std::env::var(CHILD_URL_ENV) else {
        return;
    };
    let concurrency: usize = std::env::var(CHILD_CONCURRENCY_ENV)
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(16);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Redis may be down (killed by the soak) right when this process starts.
        let mq = loop {
            match Client::builder(&url)
                .response_timeout(Duration::from_secs(2))
                .build()
                .await
            {
                Ok(mq) => break mq,
                Err(e) => {
                    eprintln!("soak worker: cannot connect yet: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let conn = control_conn(&url);
        let script = Arc::new(redis::Script::new(RECORD_SCRIPT));
        Worker::builder(mq)
            .subscribe_with(
                TOPIC,
                Subscription::new().concurrency(concurrency).lease(LEASE),
                move |msg: Message<Value>| {
                    let (mut conn, script) = (conn.clone(), script.clone());
                    async move {
                        // The "work": 0–1 ms.
                        let work = rand::rng().random_range(0..=1000);
                        tokio::time::sleep(Duration::from_micros(work)).await;
                        let token = format!("{:08x}", rand::random::<u32>());
                        let give_up = Instant::now() + Duration::from_secs(30);
                        loop {
                            match script
                                .key(RUNS_KEY)
                                .arg(msg.id.as_str())
                                .arg(&token)
                                .invoke_async::<i64>(&mut conn)
                                .await
                            {
                                Ok(_) => return Ok(()),
                                Err(e) if Instant::now() > give_up => {
                                    return Err(HandlerError::retry(format!(
                                        "cannot record the run: {e}"
                                    )))
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                            }
                        }
                    }
                },
            )
            .recover_interval(RECOVER_INTERVAL)
            .build()
            .unwrap()
            .run_until(std::future::pending())
            .await
            .unwrap();
    });
}
