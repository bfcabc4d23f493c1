//! Fair groups: a big group does not delay a small one; weights, max_active and pause per
//! group; every script that moves a message keeps grouped messages in their group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forgemq::{
    Error, GroupSettings, HandlerError, Message, MessageId, PublishOptions, Subscription, Worker,
};
use serde_json::{json, Value};

use crate::common::{eventually, invariants, setup, strings, Running};

/// Ids with the group each ran in, as handlers saw them.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

fn in_group(group: &str) -> PublishOptions {
    PublishOptions::new().group(group)
}

/// Group A has 100,000 waiting; group B publishes 100 while A drains. B's messages wait
/// for one turn of the round robin, not behind A's backlog: B's p99 wait is under 5 % of
/// A's drain time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_group_does_not_delay_a_small_one() {
    let _turn = crate::common::cpu_turn().await;
    let (server, mq) = setup().await;
    let topic = "tenant.jobs";
    const BIG: usize = 100_000;
    let mut ids = Vec::with_capacity(BIG + 100);
    for chunk in 0..(BIG / 10_000) {
        let batch =
            (0..10_000).map(|i| (json!({"g": "A", "i": chunk * 10_000 + i}), in_group("A")));
        ids.extend(
            mq.publish_batch_with(topic, batch)
                .await
                .unwrap()
                .into_iter()
                .map(|o| o.id().clone()),
        );
    }
    assert_eq!(mq.stats(topic).await.unwrap().pending, BIG as u64);
    let waits: Arc<Mutex<HashMap<String, Duration>>> = Arc::default();
    let published: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let last_a: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (w, p, l) = (waits.clone(), published.clone(), last_a.clone());
    let done_a = Arc::new(AtomicUsize::new(0));
    let d = done_a.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(50),
            move |m: Message<Value>| {
                let now = Instant::now();
                if m.group.as_deref() == Some("B") {
                    let at = p.lock().unwrap().get(m.id.as_str()).copied();
                    if let Some(at) = at {
                        w.lock().unwrap().insert(m.id.to_string(), now - at);
                    }
                } else {
                    d.fetch_add(1, Ordering::Relaxed);
                    *l.lock().unwrap() = Some(now);
                }
                async { Ok::<(), HandlerError>(()) }
            },
        )
        .build()
        .unwrap();
    let begin = Instant::now();
    let running = Running::start(worker);
    // B publishes one message every few ms while A is still draining.
    let mut b_ids = Vec::new();
    for i in 0..100 {
        let id = MessageId::generate();
        published
            .lock()
            .unwrap()
            .insert(id.to_string(), Instant::now());
        mq.publish_with(
            topic,
            json!({"g": "B", "i": i}),
            in_group("B").id(id.clone()),
        )
        .await
        .unwrap();
        b_ids.push(id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained_at_b_end = done_a.load(Ordering::Relaxed);
    eventually("all of B handled", || async {
        waits.lock().unwrap().len() == 100
    })
    .await;
    eventually("A drained", || async {
        done_a.load(Ordering::Relaxed) == BIG
    })
    .await;
    let drain = last_a.lock().unwrap().unwrap() - begin;
    running.stop().await;
    let mut w: Vec<Duration> = waits.lock().unwrap().values().copied().collect();
    w.sort();
    let p99 = w[98];
    eprintln!(
        "A drained {BIG} in {drain:?} ({drained_at_b_end} done when B had published its 100); B waited p50 {:?}, p99 {p99:?}",
        w[49]
    );
    assert!(
        drained_at_b_end < BIG,
        "A had drained before B finished publishing: the test proves nothing"
    );
    assert!(
        p99 < drain / 20,
        "B's p99 wait {p99:?} is not under 5 % of A's drain time {drain:?}"
    );
    ids.extend(b_ids);
    invariants(&server, topic, &strings(&ids));
}

/// One message per fetch (concurrency 1, no prefetch): the round robin follows the
/// weights exactly, A (weight 3) three times for each B (weight 1); ungrouped messages take
/// their turn as one more group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_hold_even_for_one_message_per_fetch() {
    let (server, mq) = setup().await;
    let topic = "weighted";
    mq.set_group(topic, "A", GroupSettings::new().weight(3))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for g in ["A", "B"] {
        let batch = (0..30).map(|i| (json!({"g": g, "i": i}), in_group(g)));
        for o in mq.publish_batch_with(topic, batch).await.unwrap() {
            ids.push(o.id().clone());
        }
    }
    ids.extend(
        mq.publish_batch(topic, (0..10).map(|i| json!({"g": "-", "i": i})))
            .await
            .unwrap(),
    );
    let order: Arc<Mutex<String>> = Arc::default();
    let o = order.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(1).prefetch(0),
            move |m: Message<Value>| {
                let g = m.group.clone().unwrap_or_else(|| "-".into());
                o.lock().unwrap().push_str(&g);
                async { Ok::<(), HandlerError>(()) }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all 70 handled", || async {
        order.lock().unwrap().len() == 70
    })
    .await;
    running.stop().await;
    let order = order.lock().unwrap().clone();
    // The ring was A, B, then '' (pending, ungrouped) when the first plain message came.
    assert_eq!(&order[..25], "AAAB-AAAB-AAAB-AAAB-AAAB-", "{order}");
    invariants(&server, topic, &strings(&ids));
}

/// max_active caps a group across the worker (the others go on meanwhile); a paused group
/// waits while the others run, and runs once resumed; settings read back; bad settings are
/// refused and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_active_and_pause_hold_per_group() {
    let (server, mq) = setup().await;
    let topic = "per.group";
    mq.set_group(topic, "slow", GroupSettings::new().max_active(2))
        .await
        .unwrap();
    mq.pause_group(topic, "held").await.unwrap();
    assert!(matches!(
        mq.set_group(topic, "x", GroupSettings::new().weight(0))
            .await,
        Err(Error::Config(_))
    ));
    assert!(matches!(
        mq.publish_with(topic, json!(1), in_group("has space"))
            .await,
        Err(Error::Config(_))
    ));
    let groups = mq.groups(topic).await.unwrap();
    assert_eq!(
        groups
            .iter()
            .map(|g| (g.group.as_str(), g.max_active, g.paused))
            .collect::<Vec<_>>(),
        vec![("held", 0, true), ("slow", 2, false)]
    );

    let mut ids = Vec::new();
    for (g, n) in [("slow", 12), ("fast", 200), ("held", 20)] {
        let batch = (0..n).map(|i| (json!({"i": i}), in_group(g)));
        for o in mq.publish_batch_with(topic, batch).await.unwrap() {
            ids.push(o.id().clone());
        }
    }
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!(stats.pending, 232);
    let pending: HashMap<&str, u64> = stats
        .groups
        .iter()
        .map(|g| (g.group.as_str(), g.pending))
        .collect();
    assert_eq!(
        pending,
        HashMap::from([("slow", 12), ("fast", 200), ("held", 20)])
    );
    // Peek pages through the groups' lists as if they were one.
    let all = mq
        .peek(topic, forgemq::MessageState::Pending, 0..300)
        .await
        .unwrap();
    assert_eq!(all.len(), 232);
    let tail = mq
        .peek(topic, forgemq::MessageState::Pending, 210..300)
        .await
        .unwrap();
    assert_eq!(tail.len(), 22);
    assert_eq!(tail[0].id, all[210].id);

    let now_slow = Arc::new(AtomicUsize::new(0));
    let most_slow = Arc::new(AtomicUsize::new(0));
    let done: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let (n, m, d) = (now_slow.clone(), most_slow.clone(), done.clone());
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(20),
            move |msg: Message<Value>| {
                let g = msg.group.clone().unwrap_or_default();
                let (n, m, d) = (n.clone(), m.clone(), d.clone());
                async move {
                    if g == "slow" {
                        let k = n.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(k, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        n.fetch_sub(1, Ordering::SeqCst);
                    }
                    *d.lock().unwrap().entry(g).or_default() += 1;
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    let count = |g: &str| done.lock().unwrap().get(g).copied().unwrap_or(0);
    eventually("slow and fast handled", || async {
        count("slow") == 12 && count("fast") == 200
    })
    .await;
    assert_eq!(
        most_slow.load(Ordering::SeqCst),
        2,
        "slow ran more (or fewer) than 2 at once"
    );
    // Held stays held while everything else is done.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count("held"), 0);
    let held = mq.groups(topic).await.unwrap();
    let held = held.iter().find(|g| g.group == "held").unwrap();
    assert_eq!((held.pending, held.paused), (20, true));
    mq.resume_group(topic, "held").await.unwrap();
    eventually("held handled once resumed", || async {
        count("held") == 20
    })
    .await;
    running.stop().await;
    assert!(mq.remove_group(topic, "slow").await.unwrap());
    assert!(!mq.remove_group(topic, "slow").await.unwrap());
    assert_eq!(
        mq.group_settings(topic, "slow").await.unwrap(),
        GroupSettings::default()
    );
    invariants(&server, topic, &strings(&ids));
}

/// Grouped messages keep their group through every path that moves them: a retry with and
/// without backoff, a lease that expires, a release at shutdown, a cancel, a dead letter
/// and its reprocessing, a delayed publish; the invariant checker looks at each step, and
/// purge takes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_messages_keep_their_group_through_every_move() {
    let (server, mq) = setup().await;
    let topic = "group.moves";
    let mut ids = Vec::new();
    for g in ["a", "b"] {
        let batch = (0..6).map(|i| (json!({"i": i}), in_group(g)));
        for o in mq.publish_batch_with(topic, batch).await.unwrap() {
            ids.push(o.id().clone());
        }
    }
    let later = mq
        .publish_with(
            topic,
            json!("later"),
            in_group("a").delay(Duration::from_millis(300)),
        )
        .await
        .unwrap()
        .id()
        .clone();
    ids.push(later.clone());
    let all = strings(&ids);
    invariants(&server, topic, &all);

    // Cancel a pending one.
    mq.cancel(topic, &ids[1]).await.unwrap();
    invariants(&server, topic, &all);

    // Take four by hand: one back with a retry now, one with backoff, one dead, one left
    // to expire.
    let got = mq
        .pop_messages_with_lease(topic, 4, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(got.len(), 4);
    let groups: Vec<Option<String>> = got.iter().map(|d| d.message().group.clone()).collect();
    assert_eq!(
        groups.iter().filter(|g| g.as_deref() == Some("a")).count(),
        2
    );
    invariants(&server, topic, &all);
    let mut got = got.into_iter();
    got.next()
        .unwrap()
        .nack(Duration::ZERO, "again")
        .await
        .unwrap();
    got.next()
        .unwrap()
        .nack(Duration::from_millis(100), "later")
        .await
        .unwrap();
    let dead = got.next().unwrap();
    let dead_id = dead.id().clone();
    dead.dead("broken").await.unwrap();
    let _expiring = got.next().unwrap();
    invariants(&server, topic, &all);
    let groups = mq.groups(topic).await.unwrap();
    assert_eq!(groups.iter().map(|g| g.active).sum::<u64>(), 1);

    // The rest handled by a worker; the dead one reprocessed meanwhile.
    mq.reprocess_dead_letter(topic, &dead_id).await.unwrap();
    invariants(&server, topic, &all);
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(4),
            move |m: Message<Value>| {
                s.lock().unwrap().push((m.id.to_string(), m.group.clone()));
                async { Ok::<(), HandlerError>(()) }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all but the cancelled one done", || async {
        let st = mq.stats(topic).await.unwrap();
        st.processed == 12 && st.pending + st.active + st.delayed + st.dead == 0
    })
    .await;
    running.stop().await;
    for (id, g) in seen.lock().unwrap().iter() {
        let i = ids.iter().position(|x| x.as_str() == id).unwrap();
        let want = if i < 6 || i == 12 { "a" } else { "b" };
        assert_eq!(g.as_deref(), Some(want), "{id}");
    }
    let report = invariants(&server, topic, &all);
    assert_eq!(report.gone.len(), 13);
    let groups = mq.groups(topic).await.unwrap();
    assert!(
        groups.iter().all(|g| g.pending == 0 && g.active == 0),
        "{groups:?}"
    );

    // Purge takes grouped messages too.
    let more = mq
        .publish_batch_with(topic, (0..5).map(|i| (json!(i), in_group("c"))))
        .await
        .unwrap();
    let purged = mq.purge_queue(topic).await.unwrap();
    assert_eq!(purged.pending, 5);
    let mut all = all;
    all.extend(more.iter().map(|o| o.id().to_string()));
    invariants(&server, topic, &all);
    assert_eq!(mq.stats(topic).await.unwrap().pending, 0);
}

/// On a partitioned topic a group's messages go to one partition (the group picks it), so
/// its max_active holds for the whole topic; the groups read back summed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_topic_keeps_each_group_in_one_partition() {
    let (_server, mq) = setup().await;
    let topic = "tenant.parts";
    mq.create_topic(topic, forgemq::TopicOptions::new().partitions(3))
        .await
        .unwrap();
    mq.set_group(topic, "t1", GroupSettings::new().max_active(1))
        .await
        .unwrap();
    for g in ["t1", "t2", "t3", "t4"] {
        let batch = (0..25).map(|i| (json!({"i": i}), in_group(g)));
        mq.publish_batch_with(topic, batch).await.unwrap();
    }
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!(stats.pending, 100);
    // Each group's 25 sit in one partition.
    let per_partition: Vec<u64> = stats.partitions.iter().map(|p| p.pending).collect();
    assert!(
        per_partition.iter().all(|n| n % 25 == 0),
        "{per_partition:?}"
    );
    let groups = mq.groups(topic).await.unwrap();
    assert_eq!(
        groups
            .iter()
            .map(|g| (g.group.as_str(), g.pending))
            .collect::<Vec<_>>(),
        vec![("t1", 25), ("t2", 25), ("t3", 25), ("t4", 25)]
    );
    assert_eq!(groups[0].max_active, 1);
    let now_t1 = Arc::new(AtomicUsize::new(0));
    let most_t1 = Arc::new(AtomicUsize::new(0));
    let (n, m) = (now_t1.clone(), most_t1.clone());
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(10),
            move |msg: Message<Value>| {
                let t1 = msg.group.as_deref() == Some("t1");
                let (n, m) = (n.clone(), m.clone());
                async move {
                    if t1 {
                        let k = n.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(k, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        n.fetch_sub(1, Ordering::SeqCst);
                    }
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all 100 done", || async {
        mq.stats(topic).await.unwrap().processed == 100
    })
    .await;
    running.stop().await;
    assert_eq!(most_t1.load(Ordering::SeqCst), 1);
}

/// An id cancelled while waiting and published again, into another group or none: the
/// tombstone is used up only by the entry of the list it was left in, so the live entry
/// runs once, the group counts stay right, and the checker finds nothing at every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_id_published_again_elsewhere_runs_once() {
    let (server, mq) = setup().await;
    let topic = "group.again";
    let moved = MessageId::new("moved").unwrap();
    let ungrouped = MessageId::new("ungrouped").unwrap();
    let regrouped = MessageId::new("regrouped").unwrap();
    let all = strings(&[&moved, &ungrouped, &regrouped]);
    // moved: group a, cancelled, published again into group b.
    mq.publish_with(topic, json!(1), in_group("a").id(moved.clone()))
        .await
        .unwrap();
    // ungrouped: group a, cancelled, published again without a group.
    mq.publish_with(topic, json!(2), in_group("a").id(ungrouped.clone()))
        .await
        .unwrap();
    // regrouped: no group, cancelled, published again into group b.
    mq.publish_with(topic, json!(3), PublishOptions::new().id(regrouped.clone()))
        .await
        .unwrap();
    for id in [&moved, &ungrouped, &regrouped] {
        mq.cancel(topic, id).await.unwrap();
    }
    invariants(&server, topic, &all);
    mq.publish_with(topic, json!(1), in_group("b").id(moved.clone()))
        .await
        .unwrap();
    mq.publish_with(topic, json!(2), PublishOptions::new().id(ungrouped.clone()))
        .await
        .unwrap();
    mq.publish_with(topic, json!(3), in_group("b").id(regrouped.clone()))
        .await
        .unwrap();
    invariants(&server, topic, &all);
    assert_eq!(mq.stats(topic).await.unwrap().pending, 3);
    assert!(mq
        .stats(topic)
        .await
        .unwrap()
        .oldest_pending_age_ms
        .is_some());
    // Group a held, so that b's live entries come up before a's tombstones.
    mq.pause_group(topic, "a").await.unwrap();
    let runs: Seen = Arc::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(1).prefetch(0),
            move |m: Message<Value>| {
                r.lock().unwrap().push((m.id.to_string(), m.group.clone()));
                async { Ok::<(), HandlerError>(()) }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("the three live messages done", || async {
        let s = mq.stats(topic).await.unwrap();
        s.processed == 3 && s.pending == 0
    })
    .await;
    // a's tombstones are passed once it runs again.
    mq.resume_group(topic, "a").await.unwrap();
    eventually("group a's tombstones passed", || async {
        mq.groups(topic)
            .await
            .unwrap()
            .iter()
            .all(|g| g.pending == 0)
    })
    .await;
    running.stop().await;
    let mut runs = runs.lock().unwrap().clone();
    runs.sort();
    assert_eq!(
        runs,
        vec![
            ("moved".to_owned(), Some("b".to_owned())),
            ("regrouped".to_owned(), Some("b".to_owned())),
            ("ungrouped".to_owned(), None),
        ]
    );
    let report = invariants(&server, topic, &all);
    assert_eq!(report.gone.len(), 3);
    let groups = mq.groups(topic).await.unwrap();
    assert!(
        groups.iter().all(|g| g.active == 0 && g.pending == 0),
        "{groups:?}"
    );
}

/// More than 100 groups, the first 100 of them paused: a fetch looks past them (100 at a
/// time), so the group behind them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_behind_a_hundred_paused_ones_are_served() {
    let (server, mq) = setup().await;
    let topic = "group.many";
    let mut ids = Vec::new();
    let batch = (0..150).map(|i| (json!(i), in_group(&format!("held-{i:03}"))));
    for o in mq.publish_batch_with(topic, batch).await.unwrap() {
        ids.push(o.id().clone());
    }
    for i in 0..150 {
        mq.pause_group(topic, &format!("held-{i:03}"))
            .await
            .unwrap();
    }
    let batch = (0..5).map(|i| (json!(i), in_group("open")));
    for o in mq.publish_batch_with(topic, batch).await.unwrap() {
        ids.push(o.id().clone());
    }
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(2),
            move |_m: Message<Value>| {
                d.fetch_add(1, Ordering::SeqCst);
                async { Ok::<(), HandlerError>(()) }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("the open group's 5 done", || async {
        done.load(Ordering::SeqCst) == 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(done.load(Ordering::SeqCst), 5, "a paused group ran");
    running.stop().await;
    assert_eq!(mq.stats(topic).await.unwrap().pending, 150);
    invariants(&server, topic, &strings(&ids));
}
