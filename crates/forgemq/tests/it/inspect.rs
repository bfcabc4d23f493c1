//! Inspection: topic registry, stats, dead-letter pages, server warnings, manual fetch.

use std::time::Duration;

use forgemq::{HandlerError, Message, Subscription, Worker};
use forgemq_test_support::{Aof, RedisOptions, RedisServer};
use serde_json::{json, Value};

use crate::common::single_server_only;
use crate::common::{eventually, init_tracing, invariants, setup, strings, Running};

/// `get_all_queues` lists every topic from the registry with its waiting count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_all_queues_lists_every_topic_from_the_registry() {
    let (server, mq) = setup().await;
    mq.publish_batch("user.welcome", [json!(1), json!(2)])
        .await
        .unwrap();
    mq.publish("order.paid", json!({})).await.unwrap();
    mq.publish_with_delay("order.reminder", json!({}), Duration::from_secs(60))
        .await
        .unwrap();
    // Keys that are not ForgeMQ's do not show up: no KEYS/SCAN.
    let _: () = redis::cmd("SET")
        .arg("mq:unrelated")
        .arg("x")
        .query(&mut server.conn())
        .unwrap();
    let all = mq.get_all_queues().await.unwrap();
    let view: Vec<(String, u64, u64)> = all
        .iter()
        .map(|q| (q.topic.clone(), q.length(), q.delayed))
        .collect();
    assert_eq!(
        view,
        vec![
            ("order.paid".to_owned(), 1, 0),
            ("order.reminder".to_owned(), 0, 1),
            ("user.welcome".to_owned(), 2, 0)
        ]
    );
    let stats = server.command_stats();
    assert!(!stats.contains_key("keys") && !stats.contains_key("scan"));
}

/// Dead letters come in pages, oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_paged_oldest_first() {
    let (server, mq) = setup().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = mq.publish("sms.send", json!({"i": i})).await.unwrap();
        let d = mq.pop_message("sms.send").await.unwrap().unwrap();
        d.dead(&format!("bad number {i}")).await.unwrap();
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let first = mq.get_dead_letters("sms.send", 0..2).await.unwrap();
    let rest = mq.get_dead_letters("sms.send", 2..100).await.unwrap();
    let got: Vec<_> = first.iter().chain(&rest).map(|d| d.id.clone()).collect();
    assert_eq!(got, ids);
    assert_eq!(first[1].error.as_deref(), Some("bad number 1"));
    assert_eq!(first[1].data, json!({"i": 1}));
    assert!(first[0].died_at <= first[1].died_at);
    assert!(mq
        .get_dead_letters("sms.send", 10..20)
        .await
        .unwrap()
        .is_empty());
    invariants(&server, "sms.send", &strings(&ids));
}

/// Start-up warnings name an evicting policy and missing persistence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_warnings_name_eviction_and_missing_persistence() {
    single_server_only!();
    init_tracing();
    let risky = RedisServer::start_with(RedisOptions::new().maxmemory_policy("allkeys-lru"));
    let mq = forgemq::Client::connect(&risky.url()).await.unwrap();
    let warnings = mq.server_warnings().await.unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert_eq!(warnings[0].kind, forgemq::WarningKind::EvictionPolicy);
    assert!(
        warnings[0].message.contains("allkeys-lru") && warnings[0].message.contains("noeviction")
    );
    assert_eq!(warnings[1].kind, forgemq::WarningKind::PersistenceOff);
    assert!(warnings[1].message.contains("persistence is off"));

    let safe = RedisServer::start_with(RedisOptions::new().aof(Aof::Always));
    let mq = forgemq::Client::connect(&safe.url()).await.unwrap();
    assert_eq!(mq.server_warnings().await.unwrap(), Vec::new());
}

/// `pop_message` takes without blocking, returns None when empty; 100 calls drain at
/// most 100 messages, each delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop_message_takes_each_message_once_without_blocking() {
    let (server, mq) = setup().await;
    assert!(mq.pop_message("email.send").await.unwrap().is_none());
    let ids = mq
        .publish_batch("email.send", (0..150).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let d = mq.pop_message("email.send").await.unwrap().unwrap();
        assert!(seen.insert(d.id().clone()));
        d.ack().await.unwrap();
    }
    assert_eq!(mq.get_queue_length("email.send").await.unwrap(), 50);
    let batch = mq.pop_messages("email.send", 80).await.unwrap();
    assert_eq!(batch.len(), 50);
    for d in batch {
        d.ack().await.unwrap();
    }
    invariants(&server, "email.send", &strings(&ids));
}

/// A message whose lease keeps expiring (its worker dies every time) is dead-lettered as
/// poison after max_recoveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_whose_lease_keeps_expiring_is_dead_lettered_as_poison() {
    let (server, mq) = setup().await;
    let id = mq
        .publish("file.process", json!({"file_id": "huge"}))
        .await
        .unwrap();
    for round in 0..4 {
        let d = mq
            .pop_messages_with_lease("file.process", 1, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(d.len(), 1, "round {round}");
        assert_eq!(d[0].message().recoveries, round);
        drop(d); // the "worker" dies holding it
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    // The next fetch runs recovery: the 4th expiry is past the limit of 3.
    assert!(mq.pop_message("file.process").await.unwrap().is_none());
    let dead = mq.get_dead_letters("file.process", 0..1).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].error.as_deref().unwrap().contains("poison"),
        "{:?}",
        dead[0].error
    );
    assert_eq!(mq.stats("file.process").await.unwrap().recovered, 3);
    invariants(&server, "file.process", &[id.to_string()]);
}

/// An idle worker blocks instead of polling: at most one blocking command per wait
/// period, and almost no script calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_does_not_poll() {
    let (server, mq) = setup().await;
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "idle.topic",
            Subscription::new().concurrency(10),
            |_m: Message<Value>| async { Ok::<(), HandlerError>(()) },
        )
        .idle_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let running = Running::start(worker);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.command_stats();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = server.command_stats();
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    // 4 s with a 1 s wait period: at most 5 waits, each followed by one fetch; the
    // recoverer (every 5 s) adds at most one call.
    assert!(delta("blpop") <= 5, "blpop {}", delta("blpop"));
    assert!(delta("evalsha") <= 7, "evalsha {}", delta("evalsha"));
    // And it still wakes at once for new work.
    let id = mq.publish("idle.topic", json!({})).await.unwrap();
    eventually("processed", || async {
        mq.stats("idle.topic").await.unwrap().processed == 1
    })
    .await;
    running.stop().await;
    invariants(&server, "idle.topic", &[id.to_string()]);
}

/// Redis commands per processed message at concurrency 1, from `INFO commandstats`
/// (commands run inside scripts count one each). A guard, not a timing: a change that
/// adds a round trip, or a command per message, to the hot path fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_per_processed_message_stay_bounded() {
    let (server, mq) = setup().await;
    let n = 10_000_u64;
    let ids = mq
        .publish_batch("bench.c1", (0..n).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let before = server.command_stats();
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let h = handled.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe("bench.c1", move |_m: Message<Value>| {
            let h = h.clone();
            async move {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .unwrap();
    let running = Running::start(worker);
    // Watch a local counter, not Redis, so that the measurement is the worker's alone.
    eventually("all handled", || async {
        handled.load(std::sync::atomic::Ordering::SeqCst) == n
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = server.command_stats();
    running.stop().await;
    assert_eq!(mq.stats("bench.c1").await.unwrap().processed, n);
    let total: u64 = after
        .iter()
        .map(|(c, v)| v - before.get(c).copied().unwrap_or(0))
        .sum();
    let round_trips = ["evalsha", "blpop"]
        .iter()
        .map(|c| after.get(*c).copied().unwrap_or(0) - before.get(*c).copied().unwrap_or(0))
        .sum::<u64>();
    let per_msg = total as f64 / n as f64;
    eprintln!(
        "commands per processed message at concurrency 1: {per_msg:.2} (all commands incl. inside scripts; \
         {:.2} script calls and blocking waits per message); by command: {:?}",
        round_trips as f64 / n as f64,
        {
            let mut v: Vec<_> = after
                .iter()
                .map(|(c, v)| (c.clone(), v - before.get(c).copied().unwrap_or(0)))
                .filter(|(_, d)| *d > 0)
                .collect();
            v.sort();
            v
        }
    );
    // Measured in the debug build: 0.75-0.86 commands and 0.08-0.09 round trips per
    // message (fetches lease dozens at a time, acks are settled together, and every
    // command inside a script handles the whole call's ids at once). One more round trip
    // per message would make the second figure at least 1, and one more command per
    // message inside a script loop the first at least 1.75.
    let trips = round_trips as f64 / n as f64;
    assert!(
        trips < 0.5,
        "{trips:.2} script calls and blocking waits per message"
    );
    assert!(per_msg < 2.0, "{per_msg:.2} commands per message");
    invariants(&server, "bench.c1", &strings(&ids));
}

/// `peek` shows each state in order without taking anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_shows_each_state_without_taking_anything() {
    let (server, mq) = setup().await;
    let topic = "peek.topic";
    let pending = mq
        .publish_batch(topic, (0..3).map(|i| json!({"p": i})))
        .await
        .unwrap();
    let later = mq
        .publish_with_delay(topic, json!({"d": 1}), Duration::from_secs(60))
        .await
        .unwrap();
    let taken = mq.pop_message(topic).await.unwrap().unwrap();
    let dead_one = mq.pop_message(topic).await.unwrap().unwrap();
    let dead_id = dead_one.id().clone();
    dead_one.dead("no such user").await.unwrap();
    use forgemq::MessageState as S;
    let p = mq.peek(topic, S::Pending, 0..10).await.unwrap();
    assert_eq!(
        p.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![pending[2].clone()]
    );
    assert_eq!(p[0].data, json!({"p": 2}));
    assert_eq!(p[0].envelope["topic"], topic);
    let d = mq.peek(topic, S::Delayed, 0..10).await.unwrap();
    assert_eq!(d[0].id, later);
    assert!(d[0].at.unwrap() > std::time::SystemTime::now() + Duration::from_secs(50));
    let a = mq.peek(topic, S::Active, 0..10).await.unwrap();
    assert_eq!(a[0].id, *taken.id());
    let x = mq.peek(topic, S::Dead, 0..10).await.unwrap();
    assert_eq!(
        (x[0].id.clone(), x[0].error.as_deref()),
        (dead_id.clone(), Some("no such user"))
    );
    assert!("bogus".parse::<S>().is_err());
    // Nothing moved.
    let s = mq.stats(topic).await.unwrap();
    assert_eq!((s.pending, s.delayed, s.active, s.dead), (1, 1, 1, 1));
    taken.ack().await.unwrap();
    let mut all = strings(&pending);
    all.push(later.to_string());
    invariants(&server, topic, &all);
}

/// Dead letters: requeue all, delete one, purge the rest; other states untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_requeued_all_deleted_one_or_purged() {
    let (server, mq) = setup().await;
    let topic = "dlq.ops";
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(mq.publish(topic, json!({"i": i})).await.unwrap());
        mq.pop_message(topic)
            .await
            .unwrap()
            .unwrap()
            .dead("bad")
            .await
            .unwrap();
    }
    let waiting = mq.publish(topic, json!({"waiting": true})).await.unwrap();
    mq.delete_dead_letter(topic, &ids[0]).await.unwrap();
    assert!(mq
        .delete_dead_letter(topic, &ids[0])
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(mq.reprocess_all_dead_letters(topic).await.unwrap(), 5);
    let s = mq.stats(topic).await.unwrap();
    assert_eq!((s.dead, s.pending, s.dead_deleted), (0, 6, 1));
    // Kill them again and purge the dead-letter queue only.
    for _ in 0..5 {
        let d = mq.pop_message(topic).await.unwrap().unwrap();
        if d.id() == &waiting {
            d.nack(Duration::ZERO, "not now").await.unwrap();
            continue;
        }
        d.dead("bad again").await.unwrap();
    }
    let dead_before = mq.stats(topic).await.unwrap().dead;
    assert_eq!(mq.purge_dead_letters(topic).await.unwrap(), dead_before);
    let s = mq.stats(topic).await.unwrap();
    assert_eq!(s.dead, 0);
    assert!(s.pending >= 1, "pending untouched: {s:?}");
    let mut all = strings(&ids);
    all.push(waiting.to_string());
    let report = invariants(&server, topic, &all);
    assert_eq!(report.dead.len(), 0);
}

/// Per-minute counters kept by the scripts: published, processed and failed this minute,
/// 60 entries oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_counts_this_minute() {
    let (server, mq) = setup().await;
    let ids = mq
        .publish_batch("chart.topic", (0..5).map(|i| json!({"i": i})))
        .await
        .unwrap();
    for (n, d) in mq
        .pop_messages("chart.topic", 5)
        .await
        .unwrap()
        .into_iter()
        .enumerate()
    {
        if n < 3 {
            d.ack().await.unwrap();
        } else {
            d.dead("nope").await.unwrap();
        }
    }
    let minutes = mq.throughput("chart.topic").await.unwrap();
    assert_eq!(minutes.len(), 60);
    assert!(minutes.windows(2).all(|w| w[0].minute < w[1].minute));
    let total = |f: fn(&forgemq::MinuteCounts) -> u64| minutes.iter().map(f).sum::<u64>();
    assert_eq!(
        (
            total(|m| m.published),
            total(|m| m.processed),
            total(|m| m.failed)
        ),
        (5, 3, 2)
    );
    let now = minutes.last().unwrap();
    assert!(
        std::time::SystemTime::now()
            .duration_since(now.minute)
            .unwrap()
            < Duration::from_secs(62)
    );
    invariants(&server, "chart.topic", &strings(&ids));
}
