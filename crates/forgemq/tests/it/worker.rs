//! The worker runtime: acks, retries, dead letters, panics, timeouts, leases, shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forgemq::{Backoff, HandlerError, Message, Subscription, Worker};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::common::{eventually, invariants, setup, strings, Running, Runs};

fn fast(sub: Subscription) -> Subscription {
    sub.backoff(Backoff::fixed(Duration::from_millis(50)))
}

/// A handler that returns Ok acknowledges the message: it is gone and never redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_handler_acknowledges_and_message_is_not_redelivered() {
    let (server, mq) = setup().await;
    let id = mq
        .publish("email.send", json!({"to": "a@example.com"}))
        .await
        .unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "email.send",
            Subscription::new().lease(Duration::from_millis(300)),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .recover_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("processed", || async {
        mq.stats("email.send").await.unwrap().processed == 1
    })
    .await;
    // Several lease lengths and recoverer rounds later it has still run once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(runs.len(), 1);
    running.stop().await;
    let report = invariants(&server, "email.send", &[id.to_string()]);
    assert_eq!(report.gone, vec![id.to_string()]);
}

/// A handler error redelivers the message with `retry` incremented, after the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_message_is_redelivered_with_retry_incremented_after_backoff() {
    let (server, mq) = setup().await;
    let id = mq.publish("sms.send", json!({"to": "+100"})).await.unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "sms.send",
            Subscription::new().backoff(Backoff::fixed(Duration::from_millis(500))),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    if msg.retry < 2 {
                        return Err(HandlerError::retry(format!(
                            "gateway down (attempt {})",
                            msg.retry
                        )));
                    }
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("processed after two failures", || async {
        mq.stats("sms.send").await.unwrap().processed == 1
    })
    .await;
    running.stop().await;
    let attempts = runs.of(id.as_str());
    assert_eq!(
        attempts.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for pair in attempts.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= Duration::from_millis(500),
            "retried after {gap:?}, before the 500ms backoff"
        );
    }
    let stats = mq.stats("sms.send").await.unwrap();
    assert_eq!((stats.failed, stats.retried, stats.dead), (2, 2, 0));
    invariants(&server, "sms.send", &[id.to_string()]);
}

/// The default max_retry is 3 retries: the 4th failure dead-letters with the error text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fourth_failure_dead_letters_with_the_error_text() {
    let (server, mq) = setup().await;
    let id = mq
        .publish("file.process", json!({"file_id": "f1"}))
        .await
        .unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "file.process",
            fast(Subscription::new()),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    Err::<(), _>(HandlerError::retry(format!(
                        "transcode failed on run {}",
                        msg.retry + 1
                    )))
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("dead-lettered", || async {
        mq.stats("file.process").await.unwrap().dead == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.stop().await;
    assert_eq!(runs.len(), 4, "3 retries = 4 runs");
    let dead = mq.get_dead_letters("file.process", 0..10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].retry, 4);
    assert_eq!(dead[0].data, json!({"file_id": "f1"}));
    assert_eq!(dead[0].error.as_deref(), Some("transcode failed on run 4"));
    assert!(
        dead[0].envelope.contains("transcode failed on run 1"),
        "history kept"
    );
    let report = invariants(&server, "file.process", &[id.to_string()]);
    assert_eq!(report.dead, vec![id.to_string()]);
}

/// Reprocessing moves exactly that dead letter back; it is consumed; the other stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprocess_moves_exactly_that_dead_letter_back_and_it_is_consumed() {
    let (server, mq) = setup().await;
    let a = mq
        .publish("payment.retry", json!({"n": "a"}))
        .await
        .unwrap();
    let b = mq
        .publish("payment.retry", json!({"n": "b"}))
        .await
        .unwrap();
    let healthy = Arc::new(AtomicUsize::new(0));
    let h = healthy.clone();
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "payment.retry",
            fast(Subscription::new().max_retry(0)),
            move |msg: Message<Value>| {
                let (h, r) = (h.clone(), r.clone());
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    if h.load(Ordering::SeqCst) == 0 {
                        return Err(HandlerError::retry("bank offline"));
                    }
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("both dead", || async {
        mq.stats("payment.retry").await.unwrap().dead == 2
    })
    .await;
    healthy.store(1, Ordering::SeqCst);
    mq.reprocess_dead_letter("payment.retry", &a).await.unwrap();
    eventually("a consumed", || async {
        mq.stats("payment.retry").await.unwrap().processed == 1
    })
    .await;
    running.stop().await;
    let dead = mq.get_dead_letters("payment.retry", 0..10).await.unwrap();
    assert_eq!(
        dead.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
        vec![b.clone()]
    );
    let a_runs = runs.of(a.as_str());
    assert_eq!(
        a_runs.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![0, 0],
        "fresh retries after reprocess"
    );
    let report = invariants(&server, "payment.retry", &strings(&[a.clone(), b.clone()]));
    assert_eq!(
        (report.gone.clone(), report.dead.clone()),
        (vec![a.to_string()], vec![b.to_string()])
    );
}

/// A fatal error dead-letters at once, without retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_error_dead_letters_at_once() {
    let (server, mq) = setup().await;
    let id = mq
        .publish("user.sync", json!({"user_id": "gone"}))
        .await
        .unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "user.sync",
            fast(Subscription::new()),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    Err::<(), _>(HandlerError::fatal("user was deleted"))
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("dead", || async {
        mq.stats("user.sync").await.unwrap().dead == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.stop().await;
    assert_eq!(runs.len(), 1);
    let dead = mq.get_dead_letters("user.sync", 0..1).await.unwrap();
    assert_eq!(dead[0].error.as_deref(), Some("user was deleted"));
    invariants(&server, "user.sync", &[id.to_string()]);
}

/// A panicking handler counts as a failure; the worker survives and keeps consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_does_not_stop_the_worker() {
    let (server, mq) = setup().await;
    let bad = mq
        .publish("inventory.alert", json!({"kind": "bad"}))
        .await
        .unwrap();
    let good = mq
        .publish_batch(
            "inventory.alert",
            (0..20).map(|i| json!({"kind": "good", "i": i})),
        )
        .await
        .unwrap();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "inventory.alert",
            fast(Subscription::new().max_retry(1)),
            |msg: Message<Value>| async move {
                if msg.data["kind"] == "bad" {
                    panic!("sku table corrupt");
                }
                Ok::<(), HandlerError>(())
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("good ones processed and the bad one dead", || async {
        let s = mq.stats("inventory.alert").await.unwrap();
        s.processed == 20 && s.dead == 1
    })
    .await;
    running.stop().await;
    let dead = mq.get_dead_letters("inventory.alert", 0..1).await.unwrap();
    assert_eq!(dead[0].id, bad);
    assert_eq!(dead[0].retry, 2);
    assert!(
        dead[0]
            .error
            .as_deref()
            .unwrap()
            .contains("sku table corrupt"),
        "{:?}",
        dead[0].error
    );
    let mut all = strings(&good);
    all.push(bad.to_string());
    invariants(&server, "inventory.alert", &all);
}

/// A handler that outlives its timeout counts as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_timeout_counts_as_a_failure() {
    let (server, mq) = setup().await;
    let id = mq.publish("system.cleanup", json!({})).await.unwrap();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "system.cleanup",
            fast(
                Subscription::new()
                    .max_retry(0)
                    .timeout(Duration::from_millis(200)),
            ),
            |_msg: Message<Value>| async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<(), HandlerError>(())
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("dead", || async {
        mq.stats("system.cleanup").await.unwrap().dead == 1
    })
    .await;
    running.stop().await;
    let dead = mq.get_dead_letters("system.cleanup", 0..1).await.unwrap();
    assert!(
        dead[0].error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        dead[0].error
    );
    invariants(&server, "system.cleanup", &[id.to_string()]);
}

/// A handler running 3× its lease keeps the lease by renewal: it runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_keeps_its_lease_by_renewal() {
    let (server, mq) = setup().await;
    let id = mq.publish("video.transcode", json!({})).await.unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    let sub = Subscription::new().lease(Duration::from_millis(600));
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "video.transcode",
            sub.clone(),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    tokio::time::sleep(Duration::from_millis(1800)).await;
                    assert!(!msg.is_lease_lost());
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .recover_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    // A second worker whose recoverer would take the message if the lease lapsed.
    let r2 = runs.clone();
    let other = Worker::builder(mq.clone())
        .subscribe_with("video.transcode", sub, move |msg: Message<Value>| {
            let r = r2.clone();
            async move {
                r.record(msg.id.as_str(), msg.retry);
                Ok::<(), HandlerError>(())
            }
        })
        .recover_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("started", || async { runs.len() == 1 }).await;
    let running2 = Running::start(other);
    eventually("processed", || async {
        mq.stats("video.transcode").await.unwrap().processed == 1
    })
    .await;
    running.stop().await;
    running2.stop().await;
    assert_eq!(runs.len(), 1);
    assert_eq!(mq.stats("video.transcode").await.unwrap().recovered, 0);
    invariants(&server, "video.transcode", &[id.to_string()]);
}

/// Five consumers on one topic split the load and handle each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_consumers_handle_each_message_exactly_once() {
    let (server, mq) = setup().await;
    let ids = mq
        .publish_batch("email.send", (0..500).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let runs = Runs::default();
    let per_worker: Arc<Vec<AtomicUsize>> = Arc::new((0..5).map(|_| AtomicUsize::new(0)).collect());
    let mut workers = Vec::new();
    for w in 0..5 {
        let client = forgemq::Client::connect(&server.url()).await.unwrap();
        let (r, pw) = (runs.clone(), per_worker.clone());
        let worker = Worker::builder(client)
            .subscribe("email.send", move |msg: Message<Value>| {
                let (r, pw) = (r.clone(), pw.clone());
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    pw[w].fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok::<(), HandlerError>(())
                }
            })
            .build()
            .unwrap();
        workers.push(Running::start(worker));
    }
    eventually("all processed", || async {
        mq.stats("email.send").await.unwrap().processed == 500
    })
    .await;
    for w in workers {
        w.stop().await;
    }
    let counts = runs.count_per_id();
    assert_eq!(counts.len(), 500);
    assert!(counts.values().all(|&c| c == 1), "some message ran twice");
    let busy = per_worker
        .iter()
        .filter(|c| c.load(Ordering::SeqCst) > 0)
        .count();
    assert!(busy >= 3, "the load was not split: {per_worker:?}");
    invariants(&server, "email.send", &strings(&ids));
}

/// Graceful shutdown: handlers that finish in time are acked, the rest go straight back
/// to pending (no waiting for the lease), and `run_until` returns promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_returns_unfinished_messages_to_pending_at_once() {
    let (server, mq) = setup().await;
    let quick = mq
        .publish("order.created", json!({"quick": true}))
        .await
        .unwrap();
    let slow = mq
        .publish_batch(
            "order.created",
            [json!({"quick": false}), json!({"quick": false})],
        )
        .await
        .unwrap();
    let started = Runs::default();
    let s = started.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "order.created",
            Subscription::new()
                .concurrency(3)
                .lease(Duration::from_secs(60)),
            move |msg: Message<Value>| {
                let s = s.clone();
                async move {
                    s.record(msg.id.as_str(), msg.retry);
                    let wait = if msg.data["quick"] == true {
                        300
                    } else {
                        30_000
                    };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .shutdown_timeout(Duration::from_millis(1000))
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all three started", || async { started.len() == 3 }).await;
    let t = Instant::now();
    running.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    let stats = mq.stats("order.created").await.unwrap();
    assert_eq!(
        (stats.processed, stats.pending, stats.active),
        (1, 2, 0),
        "{stats:?}"
    );
    assert_eq!(stats.failed, 0, "a stopped handler is not a failed attempt");
    let mut all = strings(&slow);
    all.push(quick.to_string());
    let report = invariants(&server, "order.created", &all);
    assert_eq!(report.gone, vec![quick.to_string()]);
}

/// Data that does not decode into the handler's type is dead-lettered with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_of_the_wrong_shape_is_dead_lettered_with_the_decode_error() {
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Order {
        order_id: String,
    }
    let (server, mq) = setup().await;
    let bad = mq
        .publish("order.reminder", json!({"type": "payment"}))
        .await
        .unwrap();
    let good = mq
        .publish("order.reminder", json!({"order_id": "ORD1"}))
        .await
        .unwrap();
    let worker = Worker::builder(mq.clone())
        .subscribe("order.reminder", |_msg: Message<Order>| async {
            Ok::<(), HandlerError>(())
        })
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("one processed, one dead", || async {
        let s = mq.stats("order.reminder").await.unwrap();
        s.processed == 1 && s.dead == 1
    })
    .await;
    running.stop().await;
    let dead = mq.get_dead_letters("order.reminder", 0..1).await.unwrap();
    assert_eq!(dead[0].id, bad);
    assert!(
        dead[0].error.as_deref().unwrap().contains("order_id"),
        "{:?}",
        dead[0].error
    );
    invariants(&server, "order.reminder", &strings(&[bad, good]));
}

/// A malformed envelope planted by hand is dead-lettered with a decode error and does
/// not block the messages behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_envelope_is_dead_lettered_and_does_not_block_the_queue() {
    let (server, mq) = setup().await;
    let mut conn = server.conn();
    let _: () = redis::cmd("HSET")
        .arg("mq:{user.notification}:msg")
        .arg("junk")
        .arg("{not json")
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("mq:{user.notification}:pending")
        .arg("junk")
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("mq:{user.notification}:msg")
        .arg("bin")
        .arg(&[0xff_u8, 0xfe, 0x00][..])
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("mq:{user.notification}:pending")
        .arg("bin")
        .query(&mut conn)
        .unwrap();
    let good = mq
        .publish("user.notification", json!({"ok": true}))
        .await
        .unwrap();
    let worker = Worker::builder(mq.clone())
        .subscribe("user.notification", |_msg: Message<Value>| async {
            Ok::<(), HandlerError>(())
        })
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("good processed, junk dead", || async {
        let s = mq.stats("user.notification").await.unwrap();
        s.processed == 1 && s.dead == 2
    })
    .await;
    running.stop().await;
    let dead = mq
        .get_dead_letters("user.notification", 0..10)
        .await
        .unwrap();
    let junk = dead.iter().find(|d| d.id.as_str() == "junk").unwrap();
    assert!(
        junk.error.as_deref().unwrap().contains("does not decode"),
        "{:?}",
        junk.error
    );
    assert!(junk.envelope.contains("{not json"), "the raw body is kept");
    invariants(
        &server,
        "user.notification",
        &["junk".into(), "bin".into(), good.to_string()],
    );
}

/// Purging while a worker runs empties every state; the worker keeps consuming new work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_queue_while_a_worker_runs() {
    let (server, mq) = setup().await;
    let topic = "data.sync";
    mq.publish_batch(topic, (0..300).map(|i| json!({"i": i})))
        .await
        .unwrap();
    mq.publish_with_delay(topic, json!({"d": 1}), Duration::from_secs(3600))
        .await
        .unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(2),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("consuming", || async { runs.len() >= 5 }).await;
    let purged = mq.purge_queue(topic).await.unwrap();
    assert!(purged.total() > 200, "purged {purged:?}");
    assert!(purged.pending > 0 && purged.active > 0, "purged {purged:?}");
    let s = mq.stats(topic).await.unwrap();
    assert_eq!((s.pending, s.delayed, s.dead), (0, 0, 0));
    let before = mq.stats(topic).await.unwrap().processed;
    let fresh = mq
        .publish_batch(topic, (0..5).map(|i| json!({"new": i})))
        .await
        .unwrap();
    eventually("new messages consumed after the purge", || async {
        mq.stats(topic).await.unwrap().processed >= before + 5
    })
    .await;
    running.stop().await;
    let ids = runs.ids();
    assert!(fresh.iter().all(|id| ids.contains(id.as_str())));
    let report = invariants(&server, topic, &strings(&fresh));
    assert_eq!(report.gone.len(), 5);
    // The handlers that were running when the topic was purged had their outcomes refused;
    // those were not duplicate runs (nothing ran twice).
    assert_eq!(mq.stats(topic).await.unwrap().duplicate_runs, 0);
}
