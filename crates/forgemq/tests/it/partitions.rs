//! Partitioned topics: one topic spread over many hash tags (and so, on Redis Cluster,
//! over every master), consumed as one, inspected as one.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use forgemq::{
    BatchOptions, BatchOutcome, Cancelled, Client, HandlerError, Message, MessageState,
    PublishOptions, Subscription, TopicOptions, Worker,
};
use forgemq_test_support::{check_invariants, key_slot, Layout, TestCluster};
use serde_json::{json, Value};

use crate::common::{eventually, init_tracing, setup, single_server_only, Running, Runs};

/// The layout of each partition of a topic of `n` partitions.
fn partition_layouts(topic: &str, n: u32) -> Vec<Layout> {
    (0..n)
        .map(|p| {
            let tag = partition_tag(topic, p, n);
            Layout::new("mq", tag)
        })
        .collect()
}

/// The tag rule of docs/wire-format.md, restated: `T#p`, or `T#p.k` with the smallest k
/// whose slot is in the p-th of n equal slot ranges.
fn partition_tag(topic: &str, p: u32, n: u32) -> String {
    let (lo, hi) = (p * 16384 / n, (p + 1) * 16384 / n);
    let fits = |t: &str| (lo..hi).contains(&u32::from(key_slot(t.as_bytes())));
    let base = format!("{topic}#{p}");
    if fits(&base) {
        return base;
    }
    (1..)
        .map(|k| format!("{base}.{k}"))
        .find(|t| fits(t))
        .unwrap()
}

/// Checks the invariants of every partition; returns the states of `ids` merged.
fn partition_invariants(
    conn_for_tag: impl Fn(&str) -> redis::Connection,
    topic: &str,
    n: u32,
    ids: &[String],
    processed: &HashSet<String>,
) {
    // Each partition holds some of the ids; an id is in exactly one partition, so the ids
    // are checked against each partition after removing those found elsewhere.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for p in 0..n {
        let tag = partition_tag(topic, p, n);
        let layout = Layout::new("mq", tag.clone());
        let mut conn = conn_for_tag(&tag);
        let stored: Vec<String> = redis::cmd("HKEYS")
            .arg(layout.msg())
            .query(&mut conn)
            .unwrap();
        let here: Vec<String> = ids
            .iter()
            .filter(|id| stored.contains(id))
            .cloned()
            .collect();
        let report = check_invariants(&mut conn, &layout, &here);
        for id in stored {
            *seen.entry(id).or_insert(0) += 1;
        }
        assert_eq!(report.gone.len(), 0);
    }
    assert!(
        seen.values().all(|&c| c == 1),
        "no id is stored in two partitions"
    );
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !seen.contains_key(*id) && !processed.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "lost: {:?}",
        &missing[..missing.len().min(10)]
    );
}

/// 12 partitions on 3 masters: 30,000 messages spread over every master (each holds 20–47%
/// of them), and one worker processes every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_topic_spreads_over_every_master() {
    single_server_only!(); // builds its own cluster; once is enough
    init_tracing();
    let cluster = TestCluster::start(3, 0);
    let mq = Client::connect(&cluster.url()).await.unwrap();
    let topic = "hot.orders";
    let info = mq
        .create_topic(topic, TopicOptions::new().partitions(12))
        .await
        .unwrap();
    assert_eq!(info.partitions, 12);
    let mut ids = Vec::new();
    for chunk in 0..30 {
        ids.extend(
            mq.publish_batch(topic, (0..1000).map(|i| json!({"order": chunk * 1000 + i})))
                .await
                .unwrap()
                .iter()
                .map(ToString::to_string),
        );
    }
    // Where the messages are: count bodies per master.
    let mut per_master = vec![0u64; 3];
    for p in 0..12 {
        let tag = partition_tag(topic, p, 12);
        let m = cluster.master_of(&format!("{{{tag}}}"));
        let n: u64 = redis::cmd("HLEN")
            .arg(Layout::new("mq", tag.clone()).msg())
            .query(&mut cluster.conn_for_key(&format!("{{{tag}}}")))
            .unwrap();
        per_master[m] += n;
    }
    for (m, n) in per_master.iter().enumerate() {
        let share = *n as f64 / 30_000.0;
        assert!(
            (0.20..=0.47).contains(&share),
            "master {m} holds {share:.2} of the messages ({per_master:?})"
        );
    }
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!(stats.pending, 30_000);
    assert_eq!(stats.partitions.len(), 12);
    assert_eq!(
        stats.partitions.iter().map(|p| p.pending).sum::<u64>(),
        30_000
    );

    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(50),
            move |m: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(m.id.as_str(), m.retry);
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all 30,000 processed", || async {
        mq.stats(topic).await.unwrap().processed == 30_000
    })
    .await;
    running.stop().await;
    let per_id = runs.count_per_id();
    assert_eq!(per_id.len(), 30_000);
    let extra: usize = per_id.values().map(|&c| c - 1).sum();
    let recovered = mq.stats(topic).await.unwrap().recovered;
    assert!(
        extra as u64 <= recovered,
        "{extra} extra runs, only {recovered} redeliveries"
    );
    eprintln!("partitioned_topic_spreads_over_every_master: per master {per_master:?}");
    partition_invariants(
        |tag| cluster.conn_for_key(&format!("{{{tag}}}")),
        topic,
        12,
        &ids,
        &runs.ids(),
    );
}

/// Messages with one partition key all go to one partition (and a retried publish with the
/// same id to the same one), whatever the layout of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_key_keeps_a_key_on_one_partition() {
    let (server, mq) = setup().await;
    let topic = "tenant.events";
    mq.create_topic(topic, TopicOptions::new().partitions(8))
        .await
        .unwrap();
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..400 {
        let key = format!("tenant-{}", i % 10);
        let id = mq
            .publish_with(
                topic,
                json!({"i": i}),
                PublishOptions::new().partition_key(key.clone()),
            )
            .await
            .unwrap();
        by_key.entry(key).or_default().push(id.id().to_string());
    }
    let layouts = partition_layouts(topic, 8);
    let mut conn = server.conn();
    let mut used = HashSet::new();
    for (key, ids) in &by_key {
        let homes: HashSet<usize> = ids
            .iter()
            .map(|id| {
                layouts
                    .iter()
                    .position(|l| {
                        redis::cmd("HEXISTS")
                            .arg(l.msg())
                            .arg(id)
                            .query::<bool>(&mut conn)
                            .unwrap()
                    })
                    .unwrap_or_else(|| panic!("{id} is in no partition"))
            })
            .collect();
        assert_eq!(homes.len(), 1, "{key} is in one partition: {homes:?}");
        used.extend(homes);
    }
    assert!(used.len() >= 4, "10 keys use several partitions: {used:?}");
    // The same id again (a retried publish) is a duplicate: it lands where the first did.
    let first = &by_key["tenant-3"][0];
    let again = mq
        .publish_with(
            topic,
            json!({}),
            PublishOptions::new()
                .id(forgemq::MessageId::new(first.clone()).unwrap())
                .partition_key("tenant-3"),
        )
        .await
        .unwrap();
    assert!(again.is_duplicate());
    // Without a partition key, the id decides: a retried publish stays idempotent too.
    let id = forgemq::MessageId::new("no-key-1").unwrap();
    let options = PublishOptions::new().id(id.clone());
    assert!(!mq
        .publish_with(topic, json!({}), options.clone())
        .await
        .unwrap()
        .is_duplicate());
    assert!(mq
        .publish_with(topic, json!({}), options)
        .await
        .unwrap()
        .is_duplicate());
    assert_eq!(mq.stats(topic).await.unwrap().pending, 401);
    // A unique key picks the partition itself: with a partition key too it could not hold
    // across the topic, so the pair is refused and nothing is written.
    let both = mq
        .publish_with(
            topic,
            json!({}),
            PublishOptions::new()
                .unique_key("order-9", Duration::from_secs(60))
                .partition_key("tenant-1"),
        )
        .await
        .unwrap_err();
    assert!(matches!(both, forgemq::Error::Conflict(_)), "{both}");
    assert_eq!(mq.stats(topic).await.unwrap().pending, 401);
    let unique = PublishOptions::new().unique_key("order-9", Duration::from_secs(60));
    let first = mq
        .publish_with(topic, json!({}), unique.clone())
        .await
        .unwrap();
    assert_eq!(
        mq.publish_with(topic, json!({}), unique).await.unwrap(),
        forgemq::PublishOutcome::Duplicate(first.id().clone()),
        "the unique key holds across the partitioned topic"
    );
}

/// Everything that names a message by id works on a partitioned topic without naming the
/// partition; stats, pause, purge and dead letters act on the whole topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_based_operations_find_the_partition() {
    let (_server, mq) = setup().await;
    let topic = "parted.ops";
    mq.create_topic(topic, TopicOptions::new().partitions(4))
        .await
        .unwrap();
    let delayed = mq
        .publish_with_delay(topic, json!({"d": 1}), Duration::from_secs(600))
        .await
        .unwrap();
    let pending: Vec<_> = mq
        .publish_batch(topic, (0..20).map(|i| json!({"i": i})))
        .await
        .unwrap();
    assert_eq!(
        mq.cancel(topic, &delayed).await.unwrap(),
        Cancelled::Delayed
    );
    assert_eq!(
        mq.cancel(topic, &pending[7]).await.unwrap(),
        Cancelled::Pending
    );
    assert!(mq.cancel(topic, &delayed).await.unwrap_err().is_not_found());
    let s = mq.stats(topic).await.unwrap();
    assert_eq!((s.pending, s.delayed, s.cancelled), (19, 0, 2));
    assert_eq!(s.partitions.len(), 4);
    let peeked = mq.peek(topic, MessageState::Pending, 0..100).await.unwrap();
    assert_eq!(peeked.len(), 19);
    // Take them all by hand, dead-letter five.
    let mut taken = Vec::new();
    while let Some(d) = mq.pop_message(topic).await.unwrap() {
        taken.push(d);
    }
    assert_eq!(taken.len(), 19, "manual fetch reaches every partition");
    let mut dead = Vec::new();
    for (i, d) in taken.into_iter().enumerate() {
        if i < 5 {
            dead.push(d.id().clone());
            d.dead("bad order").await.unwrap();
        } else {
            d.ack().await.unwrap();
        }
    }
    let letters = mq.get_dead_letters(topic, 0..50).await.unwrap();
    assert_eq!(letters.len(), 5);
    assert!(letters.windows(2).all(|w| w[0].died_at <= w[1].died_at));
    mq.reprocess_dead_letter(topic, &dead[0]).await.unwrap();
    mq.delete_dead_letter(topic, &dead[1]).await.unwrap();
    assert!(mq
        .delete_dead_letter(topic, &dead[1])
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(mq.reprocess_all_dead_letters(topic).await.unwrap(), 3);
    mq.pause(topic).await.unwrap();
    assert!(mq.stats(topic).await.unwrap().paused);
    assert!(
        mq.pop_message(topic).await.unwrap().is_none(),
        "paused everywhere"
    );
    assert!(mq.resume(topic).await.unwrap());
    let purged = mq.purge_queue(topic).await.unwrap();
    assert_eq!(purged.total(), 4);
    let s = mq.stats(topic).await.unwrap();
    assert_eq!((s.pending, s.dead, s.processed), (0, 0, 14));
    let throughput = mq.throughput(topic).await.unwrap();
    assert_eq!(throughput.iter().map(|m| m.processed).sum::<u64>(), 14);
}

/// A partition count changes only while the topic is empty; a producer that knew the
/// topic as plain learns the new layout at its next publish, and a running worker moves to
/// it within its recover interval, so nothing is stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_changes_only_when_empty_and_every_client_follows() {
    let (server, mq) = setup().await;
    let topic = "grows.later";
    // A producer and a worker that know the topic as plain.
    let producer = Client::connect(&server.url()).await.unwrap();
    producer
        .publish(topic, json!({"before": true}))
        .await
        .unwrap();
    let err = mq
        .create_topic(topic, TopicOptions::new().partitions(6))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("holds 1 message(s)"), "{err}");
    assert_eq!(mq.topic_info(topic).await.unwrap().partitions, 1);
    // Drain it, then partition it.
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .recover_interval(Duration::from_millis(300))
        .subscribe_with(
            topic,
            Subscription::new().concurrency(4),
            move |m: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(m.id.as_str(), m.retry);
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("drained", || async { runs.len() == 1 }).await;
    eventually("the topic is empty", || async {
        let s = mq.stats(topic).await.unwrap();
        s.pending + s.active == 0
    })
    .await;
    mq.create_topic(topic, TopicOptions::new().partitions(6))
        .await
        .unwrap();
    assert_eq!(mq.topic_info(topic).await.unwrap().partitions, 6);
    // The producer still believes it plain: its publish is refused by the script, it
    // reads the layout again, and the messages land in the partitions.
    let ids = producer
        .publish_batch(topic, (0..60).map(|i| json!({"after": i})))
        .await
        .unwrap();
    let s = mq.stats(topic).await.unwrap();
    assert_eq!(s.partitions.len(), 6);
    assert!(s.partitions.iter().filter(|p| p.published > 0).count() >= 4);
    // The worker, started on the plain layout, consumes them.
    eventually("the worker follows the new layout", || async {
        let ran = runs.ids();
        ids.iter().all(|id| ran.contains(id.as_str()))
    })
    .await;
    running.stop().await;
    // Back to plain works the same way once empty.
    mq.create_topic(topic, TopicOptions::new().partitions(1))
        .await
        .unwrap();
    producer
        .publish(topic, json!({"plain": true}))
        .await
        .unwrap();
    assert_eq!(mq.stats(topic).await.unwrap().pending, 1);
    let bad = mq
        .create_topic(topic, TopicOptions::new().partitions(0))
        .await;
    assert!(bad.unwrap_err().is_invalid_input());
}

/// Batch subscriptions, priority groups and the processed ledger work on partitioned
/// topics; each batch comes from one partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_priorities_on_partitioned_topics() {
    let (_server, mq) = setup().await;
    let (urgent, normal, bulk) = ("p.urgent", "p.normal", "p.bulk");
    for t in [urgent, bulk] {
        mq.create_topic(t, TopicOptions::new().partitions(3))
            .await
            .unwrap();
    }
    mq.publish_batch(normal, (0..30).map(|i| json!({"n": i})))
        .await
        .unwrap();
    mq.publish_batch(urgent, (0..30).map(|i| json!({"u": i})))
        .await
        .unwrap();
    mq.publish_batch(bulk, (0..300).map(|i| json!({"b": i})))
        .await
        .unwrap();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let batches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (o1, o2, b) = (order.clone(), order.clone(), batches.clone());
    let worker = Worker::builder(mq.clone())
        .subscribe(urgent, move |m: Message<Value>| {
            let o = o1.clone();
            async move {
                o.lock().unwrap().push(m.topic.clone());
                Ok::<(), HandlerError>(())
            }
        })
        .subscribe(normal, move |m: Message<Value>| {
            let o = o2.clone();
            async move {
                o.lock().unwrap().push(m.topic.clone());
                Ok::<(), HandlerError>(())
            }
        })
        .priority([urgent, normal], forgemq::Priority::Strict)
        .subscribe_batch(
            bulk,
            BatchOptions::new()
                .max_size(50)
                .max_wait(Duration::from_millis(200)),
            move |batch: Vec<Message<Value>>| {
                let b = b.clone();
                async move {
                    b.lock().unwrap().push(batch.len());
                    Ok::<_, HandlerError>(batch.iter().map(|_| BatchOutcome::done()).collect())
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("everything processed", || async {
        mq.stats(bulk).await.unwrap().processed == 300
            && mq.stats(normal).await.unwrap().processed == 30
    })
    .await;
    running.stop().await;
    let order = order.lock().unwrap().clone();
    let first_normal = order.iter().position(|t| t == normal).unwrap();
    assert_eq!(
        order[..first_normal]
            .iter()
            .filter(|t| *t == urgent)
            .count(),
        30,
        "every urgent message (from all 3 partitions) before any normal one"
    );
    let sizes = batches.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 300);
    assert!(sizes.iter().all(|&n| n <= 50));
}

/// A topic's rate limit and its schedules follow a change of its partition count: the
/// limit is split over the new partitions, a schedule's state moves to the partition its
/// name picks (run now works at once, and a scheduler fires it there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_schedules_follow_a_partition_change() {
    let (_server, mq) = setup().await;
    let topic = "tenant.sync";
    mq.set_rate_limit(topic, "120/s".parse().unwrap())
        .await
        .unwrap();
    mq.upsert_schedule(
        "sync",
        forgemq::ScheduleSpec::cron("0 0 1 1 *").topic(topic),
    )
    .await
    .unwrap();
    mq.create_topic(topic, TopicOptions::new().partitions(4))
        .await
        .unwrap();
    let limit = mq.rate_limit(topic).await.unwrap().unwrap();
    assert!((limit.per_second() - 120.0).abs() < 1e-9, "{limit:?}");
    let id = mq.run_schedule_now("sync").await.unwrap();
    assert!(mq.message(topic, &id).await.unwrap().is_some());
    let s = mq.schedule("sync").await.unwrap().unwrap();
    assert_eq!(s.fired, 1);
    assert_eq!(mq.schedules().await.unwrap().len(), 1);
    assert_eq!(mq.stats(topic).await.unwrap().pending, 1);
}
