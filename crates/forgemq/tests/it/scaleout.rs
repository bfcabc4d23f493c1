//! Scale-out on real topologies: Redis Cluster (masters killed, slots moved) and Sentinel
//! (manual failover, master killed), with producers and workers running throughout. Each
//! test ends with the invariant checker: every acknowledged message processed or still in
//! exactly one state.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forgemq::{Client, HandlerError, Message, MessageId, PublishOptions, Subscription, Worker};
use forgemq_test_support::{assert_none_lost, check_invariants, Layout, TestCluster, TestSentinel};
use serde_json::{json, Value};

use crate::common::{init_tracing, single_server_only, Running, Runs};

/// Deadline for everything to be processed after a fault.
const SETTLE: Duration = Duration::from_secs(90);

/// Publishes to `topics` in turn until told to stop, each message with its own id; a
/// publish that fails (the master is gone, a replica did not confirm in time) is sent
/// again with the same id until it is acknowledged. Records the acknowledged ids per
/// topic and the longest time between two acknowledged publishes after `mark`.
struct Producer {
    acked: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    gaps: Arc<Mutex<Vec<(Instant, Duration)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Producer {
    fn start(mq: Client, topics: Vec<String>, pace: Duration) -> Self {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let gaps = Arc::new(Mutex::new(Vec::new()));
        let (a, s, g) = (acked.clone(), stop.clone(), gaps.clone());
        let task = tokio::spawn(async move {
            let mut last = Instant::now();
            let mut n = 0u64;
            while !s.load(Ordering::SeqCst) {
                let topic = &topics[(n as usize) % topics.len()];
                let id = MessageId::new(format!("m-{n}")).unwrap();
                let options = PublishOptions::new().id(id.clone());
                loop {
                    match mq
                        .publish_with(topic, json!({"n": n}), options.clone())
                        .await
                    {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::info!(error = %e, "publish failed; sending it again");
                            if s.load(Ordering::SeqCst) {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                let now = Instant::now();
                g.lock().unwrap().push((now, now - last));
                last = now;
                a.lock().unwrap().push((topic.clone(), id.to_string()));
                n += 1;
                tokio::time::sleep(pace).await;
            }
        });
        Self {
            acked,
            stop,
            gaps,
            task,
        }
    }

    /// Stops and returns every acknowledged (topic, id).
    async fn stop(self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.acked.lock().unwrap().clone()
    }

    /// The longest wait between two acknowledged publishes that ended after `since`.
    fn longest_gap_after(&self, since: Instant) -> Duration {
        self.gaps
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, gap)| *gap)
            .max()
            .unwrap_or_default()
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

/// A worker on every topic that records each run (and when it happened).
fn recording_worker(mq: &Client, topics: &[String], runs: &Runs) -> Worker {
    let mut builder = Worker::builder(mq.clone())
        .recover_interval(Duration::from_millis(500))
        .idle_wait(Duration::from_secs(2));
    for topic in topics {
        let r = runs.clone();
        builder = builder.subscribe_with(
            topic,
            Subscription::new()
                .concurrency(8)
                .lease(Duration::from_secs(3)),
            move |m: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(m.id.as_str(), m.retry);
                    Ok::<(), HandlerError>(())
                }
            },
        );
    }
    builder.build().unwrap()
}

/// The longest time between two handler runs that started after `since`.
fn longest_run_gap_after(runs: &Runs, since: Instant) -> Duration {
    let mut times: Vec<Instant> = runs.times().into_iter().filter(|t| *t >= since).collect();
    times.sort();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// Waits until every acknowledged id ran, then checks each topic's invariants.
async fn all_processed_and_consistent(
    acked: &[(String, String)],
    runs: &Runs,
    conn_for_topic: impl Fn(&str) -> redis::Connection,
) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let ran = runs.ids();
        let missing = acked.iter().filter(|(_, id)| !ran.contains(id)).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acknowledged messages never ran",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let topics: HashSet<&String> = acked.iter().map(|(t, _)| t).collect();
    let processed = runs.ids();
    for topic in topics {
        let ids: Vec<String> = acked
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, id)| id.clone())
            .collect();
        let report = tokio::task::block_in_place(|| {
            check_invariants(&mut conn_for_topic(topic), &Layout::new("mq", topic), &ids)
        });
        assert_none_lost(&report, &processed);
    }
}

/// Topic names whose slots fall on different masters (3 masters: every master gets some).
fn topics_on_every_master(cluster: &TestCluster, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut per_master = vec![0usize; cluster.master_count()];
    let want = n.div_ceil(cluster.master_count());
    for i in 0.. {
        let t = format!("scale.t{i}");
        let m = cluster.master_of(&format!("{{{t}}}"));
        if m < per_master.len() && per_master[m] < want {
            per_master[m] += 1;
            out.push(t);
        }
        if out.len() == n {
            break;
        }
    }
    out
}

/// 3 masters with a replica each, acknowledged means replicated (`replicas(1)`): a master
/// is killed with SIGKILL while producers and workers run; its replica takes over, the
/// same client and worker carry on without a restart, and no acknowledged message is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_kill9_during_publish_and_consume() {
    single_server_only!(); // builds its own cluster; once is enough
    init_tracing();
    let mut cluster = TestCluster::start(3, 1);
    let mq = Client::builder(cluster.url())
        .replicas(1, Duration::from_secs(1))
        .response_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let topics = topics_on_every_master(&cluster, 6);
    let runs = Runs::default();
    let worker = Running::start(recording_worker(&mq, &topics, &runs));
    let producer = Producer::start(mq.clone(), topics.clone(), Duration::from_millis(2));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = producer.count();
    assert!(before > 50, "publishing runs before the fault: {before}");

    let victim = cluster.master_of(&format!("{{{}}}", topics[0]));
    let killed_at = Instant::now();
    cluster.node_mut(victim).kill9();
    // The replica takes over after the node timeout (2 s) and an election.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.master_of(&format!("{{{}}}", topics[0])) == victim {
        assert!(Instant::now() < deadline, "no failover within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed_over = killed_at.elapsed();
    // The promoted replica has no replica of its own, so nothing written to its slots can
    // be acknowledged as replicated until the killed node, restarted (as an orchestrator
    // would), rejoins as its replica.
    tokio::task::block_in_place(|| cluster.node_mut(victim).restart());
    // Publishing and consuming go on for a while on the new topology.
    let at_failover = producer.count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while producer.count() < at_failover + 200 {
        assert!(
            Instant::now() < deadline,
            "publishing carried on after the failover: {} since",
            producer.count() - at_failover
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let publish_gap = producer.longest_gap_after(killed_at);
    let acked = producer.stop().await;
    all_processed_and_consistent(&acked, &runs, |t| cluster.conn_for_key(&format!("{{{t}}}")))
        .await;
    let consume_gap = longest_run_gap_after(&runs, killed_at);
    worker.stop().await;
    eprintln!(
        "cluster_master_kill9: failover after {failed_over:?}; longest publish gap {publish_gap:?}, longest consume gap {consume_gap:?}; {} acknowledged, {} runs",
        acked.len(),
        runs.len()
    );
}

/// A slot of a busy topic is migrated to another master (`CLUSTER SETSLOT` and `MIGRATE`,
/// as `redis-cli --cluster reshard` does) while workers run: the workers follow the move
/// and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_slot_during_consume() {
    single_server_only!(); // builds its own cluster; once is enough
    init_tracing();
    let cluster = TestCluster::start(3, 0);
    let mq = Client::connect(&cluster.url()).await.unwrap();
    let topic = "scale.moving".to_owned();
    let runs = Runs::default();
    let worker = Running::start(recording_worker(&mq, std::slice::from_ref(&topic), &runs));
    let producer = Producer::start(mq.clone(), vec![topic.clone()], Duration::from_millis(1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let slot = forgemq_test_support::key_slot(format!("{{{topic}}}").as_bytes());
    let from = cluster.master_of_slot(slot);
    let to = (from + 1) % 3;
    let moved_at = Instant::now();
    tokio::task::block_in_place(|| cluster.move_slot(slot, to));
    assert_eq!(cluster.master_of_slot(slot), to);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_move = runs.times().iter().filter(|t| **t > moved_at).count();
    let acked = producer.stop().await;
    all_processed_and_consistent(&acked, &runs, |t| cluster.conn_for_key(&format!("{{{t}}}")))
        .await;
    worker.stop().await;
    assert!(after_move > 0, "the worker consumed after the move");
    eprintln!(
        "moved_slot_during_consume: {} acknowledged, {} runs, longest consume gap {:?}",
        acked.len(),
        runs.len(),
        longest_run_gap_after(&runs, moved_at)
    );
}

/// Sentinel: a manual failover (the old master keeps running and, for a while, accepting
/// writes) while a producer and a worker run; with `replicas(1)` no acknowledged message
/// is lost, and both follow the new master without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_manual_failover_with_workers_running() {
    single_server_only!(); // builds its own sentinel group; once is enough
    sentinel_failover(false).await;
}

/// Sentinel: the master is killed with SIGKILL; the sentinels promote the replica and the
/// client follows it. No acknowledged message is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_kill9() {
    single_server_only!(); // builds its own sentinel group; once is enough
    sentinel_failover(true).await;
}

async fn sentinel_failover(kill: bool) {
    init_tracing();
    // Two replicas: after the failover the new master still has one, so writes can go on
    // being acknowledged as replicated.
    let mut group = TestSentinel::start_with(2, forgemq_test_support::RedisOptions::new());
    let mq = Client::builder(group.url())
        .replicas(1, Duration::from_secs(1))
        .response_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let topics = vec!["sentinel.a".to_owned(), "sentinel.b".to_owned()];
    let runs = Runs::default();
    let worker = Running::start(recording_worker(&mq, &topics, &runs));
    let producer = Producer::start(mq.clone(), topics.clone(), Duration::from_millis(2));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(producer.count() > 50, "publishing runs before the failover");
    let old = group.master();
    let started = Instant::now();
    if kill {
        group.node_mut(old).kill9();
    } else {
        group.failover();
    }
    let new =
        tokio::task::block_in_place(|| group.wait_for_new_master(old, Duration::from_secs(30)));
    let failed_over = started.elapsed();
    let at_failover = producer.count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while producer.count() < at_failover + 200 {
        assert!(
            Instant::now() < deadline,
            "publishing carried on after the failover: {} since",
            producer.count() - at_failover
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let publish_gap = producer.longest_gap_after(started);
    let acked = producer.stop().await;
    let node = &group.nodes()[new];
    all_processed_and_consistent(&acked, &runs, |_| node.conn()).await;
    let consume_gap = longest_run_gap_after(&runs, started);
    worker.stop().await;
    eprintln!(
        "sentinel_{}: new master after {failed_over:?}; longest publish gap {publish_gap:?}, longest consume gap {consume_gap:?}; {} acknowledged, {} runs",
        if kill { "master_kill9" } else { "manual_failover" },
        acked.len(),
        runs.len()
    );
}

/// Connecting fails at once, naming what is wrong, for a malformed URL, seeds nobody
/// answers on, and a cluster that is not `cluster_state:ok`: never a hang, never a client
/// that only fails at its first publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_connect_errors_name_what_is_wrong() {
    single_server_only!(); // builds its own cluster; once is enough
    init_tracing();
    for (url, says) in [
        ("redis+cluster://", "empty host"),
        ("redis+cluster://127.0.0.1:notaport", "not a port number"),
        ("redis+cluster://127.0.0.1:7000/0", "no database number"),
        ("redis+sentinel://127.0.0.1:26379", "name the master"),
        ("redis+clustr://127.0.0.1:7000", "unknown scheme"),
    ] {
        let err = Client::connect(url).await.unwrap_err();
        assert!(err.is_invalid_input(), "{url}: {err}");
        assert!(err.to_string().contains(says), "{url}: {err}");
    }
    // Seeds where nothing listens.
    let dead: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", forgemq_test_support::free_port()))
        .collect();
    let started = Instant::now();
    let err = Client::builder(format!("redis+cluster://{}", dead.join(",")))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failed in {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains(&dead[0]), "names the seeds: {err}");
    // A master down, no replica to take over: the cluster says fail.
    let mut cluster = TestCluster::start(3, 0);
    cluster.node_mut(2).kill9();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut cluster.nodes()[0].conn())
            .unwrap();
        if info.contains("cluster_state:fail") {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seeds = format!(
        "redis+cluster://127.0.0.1:{},127.0.0.1:{}",
        cluster.nodes()[0].port(),
        cluster.nodes()[1].port()
    );
    let err = Client::connect(&seeds).await.unwrap_err();
    assert!(err.to_string().contains("cluster_state"), "{err}");
}
