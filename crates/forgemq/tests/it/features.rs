//! Issue 4: manual fetch, cancel, priorities, batches, idempotency, pause/resume,
//! retention and the handler toolbox.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forgemq::{
    Backoff, BatchOptions, BatchOutcome, Cancelled, Client, Error, HandlerError, Message,
    MessageId, Priority, PublishOptions, PublishOutcome, Subscription, Worker,
};
use serde_json::{json, Value};

use crate::common::{
    eventually, init_tracing, invariants, setup, strings, Running, Runs, TestRedis,
};

fn recorder(
    runs: &Runs,
) -> impl Fn(Message<Value>) -> std::future::Ready<Result<(), HandlerError>> + Clone {
    let r = runs.clone();
    move |msg: Message<Value>| {
        r.record(msg.id.as_str(), msg.retry);
        std::future::ready(Ok(()))
    }
}

fn delta(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
    c: &str,
) -> u64 {
    after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0)
}

// ---------- 1. manual fetch ----------

/// `nack` counts a failure and makes the message available again only after the delay;
/// out of retries it is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_nack_retries_after_the_delay_then_dead_letters() {
    let (server, mq) = setup().await;
    let id = mq
        .publish_with(
            "email.send",
            json!({"to": "x"}),
            PublishOptions::new().max_retry(1),
        )
        .await
        .unwrap()
        .id()
        .clone();
    let d = mq.pop_message("email.send").await.unwrap().unwrap();
    let t = Instant::now();
    d.nack(Duration::from_millis(400), "smtp 421")
        .await
        .unwrap();
    assert!(
        mq.pop_message("email.send").await.unwrap().is_none(),
        "not before the delay"
    );
    let mut again = None;
    while again.is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
        again = mq.pop_message("email.send").await.unwrap();
    }
    assert!(t.elapsed() >= Duration::from_millis(400));
    let again = again.unwrap();
    assert_eq!(again.message().retry, 1);
    again.nack(Duration::ZERO, "smtp 421 again").await.unwrap();
    let dead = mq.get_dead_letters("email.send", 0..1).await.unwrap();
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].error.as_deref(), Some("smtp 421 again"));
    invariants(&server, "email.send", &[id.to_string()]);
}

/// `extend` keeps a manual delivery's lease; dropping a delivery unsettled is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_extend_keeps_the_lease_and_a_dropped_one_comes_back() {
    let (server, mq) = setup().await;
    let ids = mq
        .publish_batch("file.process", [json!(1), json!(2)])
        .await
        .unwrap();
    let mut got = mq
        .pop_messages_with_lease("file.process", 2, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    let kept = got.remove(0);
    kept.extend(Duration::from_secs(5)).await.unwrap();
    drop(got); // the other one is abandoned
    tokio::time::sleep(Duration::from_millis(400)).await;
    let back = mq
        .pop_message("file.process")
        .await
        .unwrap()
        .expect("the dropped one is back");
    assert_ne!(back.id(), kept.id());
    assert_eq!(back.message().recoveries, 1);
    assert!(
        mq.pop_message("file.process").await.unwrap().is_none(),
        "the extended one is still leased"
    );
    kept.ack().await.unwrap();
    back.ack().await.unwrap();
    invariants(&server, "file.process", &strings(&ids));
}

// ---------- 2. cancel ----------

/// Cancel removes a delayed or a pending message and says which state it was in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_removes_a_delayed_or_pending_message_and_says_which() {
    let (server, mq) = setup().await;
    let delayed = mq
        .publish_with_delay("order.reminder", json!({}), Duration::from_secs(60))
        .await
        .unwrap();
    let pending = mq.publish("order.reminder", json!({})).await.unwrap();
    let active = mq.publish("order.reminder", json!({})).await.unwrap();
    assert_eq!(
        mq.cancel("order.reminder", &delayed).await.unwrap(),
        Cancelled::Delayed
    );
    assert_eq!(
        mq.cancel("order.reminder", &pending).await.unwrap(),
        Cancelled::Pending
    );
    // Now only `active` is left; take it.
    let d = mq.pop_message("order.reminder").await.unwrap().unwrap();
    assert_eq!(d.id(), &active);
    let err = mq.cancel("order.reminder", &active).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotCancellable {
                state: "active",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("handler is running it"), "{err}");
    let err = mq.cancel("order.reminder", &delayed).await.unwrap_err();
    assert!(err.is_not_found(), "cancelled twice: {err}");
    d.ack().await.unwrap();
    let stats = mq.stats("order.reminder").await.unwrap();
    assert_eq!(
        (
            stats.cancelled,
            stats.delayed,
            stats.pending,
            stats.processed
        ),
        (2, 0, 0, 1)
    );
    invariants(
        &server,
        "order.reminder",
        &strings(&[delayed, pending, active]),
    );
}

/// The seed's use case: the order is paid, so its payment check and reminder are
/// cancelled by id and never run, while a running worker consumes those topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_the_order_cancels_its_payment_check_and_reminder() {
    let (server, mq) = setup().await;
    let runs = Runs::default();
    let worker = Worker::builder(mq.clone())
        .subscribe("order.payment.check", recorder(&runs))
        .subscribe("order.reminder", recorder(&runs))
        .build()
        .unwrap();
    let running = Running::start(worker);
    let check = mq
        .publish_with_delay(
            "order.payment.check",
            json!({"order_id": "ORD1"}),
            Duration::from_millis(800),
        )
        .await
        .unwrap();
    let reminder = mq
        .publish_with_delay(
            "order.reminder",
            json!({"order_id": "ORD1", "type": "payment"}),
            Duration::from_millis(1200),
        )
        .await
        .unwrap();
    let unpaid = mq
        .publish_with_delay(
            "order.payment.check",
            json!({"order_id": "ORD2"}),
            Duration::from_millis(800),
        )
        .await
        .unwrap();
    // ORD1 is paid.
    assert_eq!(
        mq.cancel("order.payment.check", &check).await.unwrap(),
        Cancelled::Delayed
    );
    assert_eq!(
        mq.cancel("order.reminder", &reminder).await.unwrap(),
        Cancelled::Delayed
    );
    eventually("the unpaid order's check ran", || async { runs.len() == 1 }).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    running.stop().await;
    assert_eq!(runs.ids(), HashSet::from([unpaid.to_string()]));
    invariants(&server, "order.payment.check", &strings(&[check, unpaid]));
    invariants(&server, "order.reminder", &[reminder.to_string()]);
}

// ---------- 3. priorities ----------

/// Strict: while both have backlog, every urgent message runs before any normal one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_priority_consumes_every_urgent_message_before_any_normal_one() {
    let (server, mq) = setup().await;
    let normal = mq
        .publish_batch("notification.normal", (0..200).map(|i| json!({"n": i})))
        .await
        .unwrap();
    let urgent = mq
        .publish_batch("notification.urgent", (0..200).map(|i| json!({"u": i})))
        .await
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let order = order.clone();
        move |msg: Message<Value>| {
            order.lock().unwrap().push(msg.topic.clone());
            std::future::ready(Ok::<(), HandlerError>(()))
        }
    };
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "notification.urgent",
            Subscription::new().concurrency(2),
            handler.clone(),
        )
        .subscribe_with(
            "notification.normal",
            Subscription::new().concurrency(2),
            handler,
        )
        .priority(
            ["notification.urgent", "notification.normal"],
            Priority::Strict,
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all done", || async { order.lock().unwrap().len() == 400 }).await;
    running.stop().await;
    let order = order.lock().unwrap().clone();
    let last_urgent = order
        .iter()
        .rposition(|t| t == "notification.urgent")
        .unwrap();
    let first_normal = order
        .iter()
        .position(|t| t == "notification.normal")
        .unwrap();
    // The last urgent fetch may share a round with the first normal ones (slots left
    // over once urgent is empty), never more than the group's 4 slots.
    assert!(
        first_normal + 4 > last_urgent,
        "normal started at {first_normal}, last urgent at {last_urgent}"
    );
    assert!(order[..first_normal]
        .iter()
        .all(|t| t == "notification.urgent"));
    assert!(first_normal >= 196, "only {first_normal} urgent ran first");
    invariants(&server, "notification.urgent", &strings(&urgent));
    invariants(&server, "notification.normal", &strings(&normal));
}

/// Weighted 3:1 over 10k messages with both backlogged lands within ±10% of 3:1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_priority_shares_slots_three_to_one() {
    let _turn = crate::common::cpu_turn().await;
    let (_server, mq) = setup().await;
    mq.publish_batch("report.heavy", (0..10_000).map(|i| json!({"i": i})))
        .await
        .unwrap();
    mq.publish_batch("report.light", (0..10_000).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let heavy = Arc::new(AtomicUsize::new(0));
    let light = Arc::new(AtomicUsize::new(0));
    let (h, l) = (heavy.clone(), light.clone());
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "report.heavy",
            Subscription::new().concurrency(4),
            move |_m: Message<Value>| {
                h.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Ok::<(), HandlerError>(()))
            },
        )
        .subscribe_with(
            "report.light",
            Subscription::new().concurrency(4),
            move |_m: Message<Value>| {
                l.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Ok::<(), HandlerError>(()))
            },
        )
        .priority(
            ["report.heavy", "report.light"],
            Priority::Weighted(vec![3, 1]),
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("10k handled", || async {
        heavy.load(Ordering::SeqCst) + light.load(Ordering::SeqCst) >= 10_000
    })
    .await;
    let (hv, lv) = (
        heavy.load(Ordering::SeqCst) as f64,
        light.load(Ordering::SeqCst) as f64,
    );
    let share = hv / (hv + lv);
    assert!(
        (0.675..=0.825).contains(&share),
        "heavy share {share:.3} ({hv} vs {lv})"
    );
    running.stop().await;
}

/// Neither policy starves a topic when the preferred one is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_groups_do_not_starve_when_the_preferred_topic_is_empty() {
    let (server, mq) = setup().await;
    for (i, priority) in [Priority::Strict, Priority::Weighted(vec![10, 1])]
        .into_iter()
        .enumerate()
    {
        let (first, second) = (format!("p{i}.first"), format!("p{i}.second"));
        let ids = mq
            .publish_batch(&second, (0..50).map(|n| json!({"n": n})))
            .await
            .unwrap();
        let runs = Runs::default();
        let worker = Worker::builder(mq.clone())
            .subscribe(&first, recorder(&runs))
            .subscribe(&second, recorder(&runs))
            .priority([first.clone(), second.clone()], priority)
            .build()
            .unwrap();
        let running = Running::start(worker);
        eventually("the second topic drained", || async { runs.len() == 50 }).await;
        // And the first still wakes the group when work arrives.
        let late = mq.publish(&first, json!({})).await.unwrap();
        eventually("first topic consumed", || async { runs.len() == 51 }).await;
        running.stop().await;
        invariants(&server, &second, &strings(&ids));
        invariants(&server, &first, &[late.to_string()]);
    }
}

// ---------- 4. batch consume ----------

/// Full batches of max_size; per-message outcomes; each batch settled by one script call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_handler_gets_full_batches_and_each_batch_is_settled_in_one_call() {
    let (server, mq) = setup().await;
    let ids = mq
        .publish_batch("email.send", (0..30).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let s = sizes.clone();
    let before = server.command_stats();
    let worker = Worker::builder(mq.clone())
        .subscribe_batch(
            "email.send",
            BatchOptions::new()
                .max_size(10)
                .max_wait(Duration::from_secs(5)),
            move |batch: Vec<Message<Value>>| {
                s.lock().unwrap().push(batch.len());
                std::future::ready(Ok::<_, HandlerError>(
                    batch.iter().map(|_| BatchOutcome::done()).collect(),
                ))
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all processed", || async {
        mq.stats("email.send").await.unwrap().processed == 30
    })
    .await;
    let after = server.command_stats();
    running.stop().await;
    assert_eq!(*sizes.lock().unwrap(), vec![10, 10, 10]);
    // settle.lua counts acks with two HINCRBYs per call (the total and the per-minute
    // counter), whatever the batch size: 6 means one call per batch (30 would be per message).
    // Batches that finish together may share a call (the runner settles everything finished
    // at once in one call), so a loaded machine can show 4 or even 2.
    let hincrby = delta(&before, &after, "hincrby");
    assert!(
        (2..=6).contains(&hincrby) && hincrby.is_multiple_of(2),
        "{hincrby} HINCRBYs for 3 batches: {after:?}"
    );
    invariants(&server, "email.send", &strings(&ids));
}

/// Outcomes apply per message: done, retry and dead in the same batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_outcomes_apply_per_message() {
    let (server, mq) = setup().await;
    let ids = mq
        .publish_batch("sms.send", (0..6).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_batch(
            "sms.send",
            BatchOptions::new().max_size(6).subscription(
                Subscription::new().backoff(Backoff::fixed(Duration::from_millis(50))),
            ),
            move |batch: Vec<Message<Value>>| {
                let outcomes = batch
                    .iter()
                    .map(|m| {
                        r.record(m.id.as_str(), m.retry);
                        match (m.data["i"].as_u64().unwrap(), m.retry) {
                            (0 | 1, _) => BatchOutcome::done(),
                            (2, 0) => BatchOutcome::retry("carrier busy"),
                            (2, _) => BatchOutcome::done(),
                            _ => BatchOutcome::dead("invalid number"),
                        }
                    })
                    .collect();
                std::future::ready(Ok::<_, HandlerError>(outcomes))
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("settled", || async {
        let s = mq.stats("sms.send").await.unwrap();
        s.processed == 3 && s.dead == 3
    })
    .await;
    running.stop().await;
    assert_eq!(
        runs.of(ids[2].as_str()).len(),
        2,
        "the retried one ran twice"
    );
    assert_eq!(runs.len(), 7);
    let dead = mq.get_dead_letters("sms.send", 0..10).await.unwrap();
    assert!(dead
        .iter()
        .all(|d| d.error.as_deref() == Some("invalid number") && d.retry == 1));
    invariants(&server, "sms.send", &strings(&ids));
}

/// A partial batch is handed over no later than max_wait after its first message arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_batch_is_flushed_after_max_wait() {
    let (server, mq) = setup().await;
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_batch(
            "log.ship",
            BatchOptions::new()
                .max_size(100)
                .max_wait(Duration::from_secs(1)),
            move |batch: Vec<Message<Value>>| {
                g.lock().unwrap().push((Instant::now(), batch.len()));
                std::future::ready(Ok::<_, HandlerError>(
                    batch.iter().map(|_| BatchOutcome::done()).collect(),
                ))
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let ids = mq
        .publish_batch("log.ship", [json!(1), json!(2), json!(3)])
        .await
        .unwrap();
    eventually("batch handled", || async {
        !got.lock().unwrap().is_empty()
    })
    .await;
    let (at, size) = got.lock().unwrap()[0];
    assert_eq!(size, 3);
    let waited = at - t0;
    assert!(
        waited <= Duration::from_millis(1500),
        "partial batch waited {waited:?}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "flushed before max_wait: {waited:?}"
    );
    eventually("acked", || async {
        mq.stats("log.ship").await.unwrap().processed == 3
    })
    .await;
    running.stop().await;
    invariants(&server, "log.ship", &strings(&ids));
}

// ---------- 5. idempotency ----------

/// A unique key admits one message per ttl; the duplicate returns the holder's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_key_admits_one_message_per_ttl() {
    let (server, mq) = setup().await;
    let opts =
        || PublishOptions::new().unique_key("order:ORD1:reminder", Duration::from_millis(500));
    let first = mq
        .publish_with("order.reminder", json!({"n": 1}), opts())
        .await
        .unwrap();
    let PublishOutcome::Published(first_id) = first else {
        panic!("{first:?}")
    };
    let second = mq
        .publish_with("order.reminder", json!({"n": 2}), opts())
        .await
        .unwrap();
    assert_eq!(second, PublishOutcome::Duplicate(first_id.clone()));
    assert_eq!(
        mq.stats("order.reminder").await.unwrap().published,
        1,
        "nothing written"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let third = mq
        .publish_with("order.reminder", json!({"n": 3}), opts())
        .await
        .unwrap();
    assert!(!third.is_duplicate(), "the key expired");
    assert!(mq
        .publish_with(
            "order.reminder",
            json!({}),
            PublishOptions::new().unique_key("", Duration::from_secs(1))
        )
        .await
        .is_err());
    invariants(
        &server,
        "order.reminder",
        &strings(&[first_id, third.id().clone()]),
    );
}

/// With `deduplicate`, processed ids are recorded by the ack's own script; a redelivery
/// of an acked id is skipped and counted, and republishing it is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplicate_skips_redelivery_of_an_already_acked_id() {
    let (server, mq) = setup().await;
    let runs = Runs::default();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "user.sync",
            Subscription::new().deduplicate(forgemq::DEFAULT_DEDUP_TTL),
            recorder(&runs),
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    let id = MessageId::new("sync-user-42-v7").unwrap();
    mq.publish_with(
        "user.sync",
        json!({"user_id": "42"}),
        PublishOptions::new().id(id.clone()),
    )
    .await
    .unwrap();
    eventually("processed", || async {
        mq.stats("user.sync").await.unwrap().processed == 1
    })
    .await;
    let mut conn = server.conn();
    let until: f64 = redis::cmd("ZSCORE")
        .arg("mq:{user.sync}:processed")
        .arg(id.as_str())
        .query(&mut conn)
        .unwrap();
    let (secs, _): (u64, u64) = redis::cmd("TIME").query(&mut conn).unwrap();
    let ttl = until / 1000.0 - secs as f64;
    assert!(
        (86_390.0..=86_401.0).contains(&ttl),
        "ledger entry lives {ttl}s, expected ~86400"
    );
    // A redelivery (as after an ack whose reply was lost): planted by hand.
    let body = r#"{"id":"sync-user-42-v7","topic":"user.sync","data":{"user_id":"42"},"timestamp":"2026-01-01T00:00:00Z","retry":0}"#;
    let _: () = redis::cmd("HSET")
        .arg("mq:{user.sync}:msg")
        .arg(id.as_str())
        .arg(body)
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("mq:{user.sync}:pending")
        .arg(id.as_str())
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("RPUSH")
        .arg("mq:{user.sync}:wake")
        .arg(1)
        .query(&mut conn)
        .unwrap();
    eventually("skipped and counted", || async {
        mq.stats("user.sync").await.unwrap().deduplicated == 1
    })
    .await;
    // A publisher retrying with the same id is told it is a duplicate.
    let again = mq
        .publish_with(
            "user.sync",
            json!({"user_id": "42"}),
            PublishOptions::new().id(id.clone()),
        )
        .await
        .unwrap();
    assert!(again.is_duplicate());
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.stop().await;
    assert_eq!(runs.len(), 1, "the side effect ran once");
    invariants(&server, "user.sync", &[id.to_string()]);
}

// ---------- 6. pause / resume ----------

/// Pausing stops workers in every process within 1 s (publishing still works); resuming
/// restarts them within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_take_effect_within_a_second_in_every_worker() {
    let (server, mq) = setup().await;
    let runs = Runs::default();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let client = Client::connect(&server.url()).await.unwrap();
        let r = runs.clone();
        let worker = Worker::builder(client)
            .subscribe_with(
                "inventory.alert",
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
        workers.push(Running::start(worker));
    }
    let mut ids = mq
        .publish_batch("inventory.alert", (0..2000).map(|i| json!({"i": i})))
        .await
        .unwrap();
    eventually("consuming", || async { runs.len() >= 20 }).await;
    mq.pause("inventory.alert").await.unwrap();
    let paused_at = Instant::now();
    ids.extend(
        mq.publish_batch("inventory.alert", (0..10).map(|i| json!({"late": i})))
            .await
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started_late: Vec<Instant> = runs
        .times()
        .into_iter()
        .filter(|t| *t > paused_at + Duration::from_secs(1))
        .collect();
    assert!(
        started_late.is_empty(),
        "{} handlers started more than 1 s after pause",
        started_late.len()
    );
    let s = mq.stats("inventory.alert").await.unwrap();
    assert!(s.paused && s.pending > 0, "{s:?}");
    let before = runs.len();
    assert!(mq.resume("inventory.alert").await.unwrap());
    let resumed_at = Instant::now();
    eventually("resumed", || async { runs.len() > before }).await;
    assert!(
        resumed_at.elapsed() < Duration::from_secs(1),
        "resumed after {:?}",
        resumed_at.elapsed()
    );
    eventually("all done", || async {
        mq.stats("inventory.alert").await.unwrap().processed == 2010
    })
    .await;
    for w in workers {
        w.stop().await;
    }
    invariants(&server, "inventory.alert", &strings(&ids));
}

// ---------- 7. retention and bounded memory ----------

/// Dead letters are capped by count and age; trimmed bodies are deleted and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_trimmed_by_count_and_age() {
    init_tracing();
    let server = TestRedis::start();
    let mq = Client::builder(server.url())
        .dead_letter_retention(5, Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(mq.publish("sms.send", json!({"i": i})).await.unwrap());
        mq.pop_message("sms.send")
            .await
            .unwrap()
            .unwrap()
            .dead("bad")
            .await
            .unwrap();
    }
    let s = mq.stats("sms.send").await.unwrap();
    assert_eq!((s.dead, s.dead_trimmed, s.dead_lettered), (5, 3, 8));
    let kept: Vec<MessageId> = mq
        .get_dead_letters("sms.send", 0..10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(kept, ids[3..].to_vec(), "the oldest go first");
    let hlen: u64 = redis::cmd("HLEN")
        .arg("mq:{sms.send}:msg")
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(hlen, 5, "trimmed bodies are deleted");
    invariants(&server, "sms.send", &strings(&ids[3..]));

    let by_age = Client::builder(server.url())
        .dead_letter_retention(0, Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let old = by_age.publish("age.test", json!({})).await.unwrap();
    by_age
        .pop_message("age.test")
        .await
        .unwrap()
        .unwrap()
        .dead("x")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let young = by_age.publish("age.test", json!({})).await.unwrap();
    by_age
        .pop_message("age.test")
        .await
        .unwrap()
        .unwrap()
        .dead("y")
        .await
        .unwrap();
    let left: Vec<MessageId> = by_age
        .get_dead_letters("age.test", 0..10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, vec![young.clone()]);
    invariants(&server, "age.test", &strings(&[young]));
    let _ = old;
}

/// After 100k messages are processed, the topic's keys hold only counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_100k_processed_only_counters_remain() {
    let _turn = crate::common::cpu_turn().await;
    let (server, mq) = setup().await;
    let topic = "bulk.done";
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.extend(mq.publish_batch(topic, (0..10_000).map(|i| json!({"id": i, "to": format!("user{i}@example.com"), "subject": "hello", "n": 42})))
            .await
            .unwrap());
    }
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(50),
            |_m: Message<Value>| std::future::ready(Ok::<(), HandlerError>(())),
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("100k processed", || async {
        mq.stats(topic).await.unwrap().processed == 100_000
    })
    .await;
    running.stop().await;
    let mut conn = server.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    // The answers of recent settle calls (for a caller whose reply was lost) expire on
    // their own within about a minute.
    let (records, mut keys): (Vec<String>, Vec<String>) = keys
        .into_iter()
        .partition(|k| k.starts_with(&format!("mq:{{{topic}}}:settled:")));
    for record in &records {
        let ttl: i64 = redis::cmd("PTTL").arg(record).query(&mut conn).unwrap();
        assert!((1..=65_000).contains(&ttl), "{record} expires in {ttl} ms");
    }
    // A wake-up token passed on while work remained may be left when the worker stops
    // before it blocks again: one entry at most, never more.
    let wake = format!("mq:{{{topic}}}:wake");
    if let Some(at) = keys.iter().position(|k| *k == wake) {
        let len: u64 = redis::cmd("LLEN").arg(&wake).query(&mut conn).unwrap();
        assert_eq!(len, 1, "{wake} holds {len} tokens");
        keys.remove(at);
    }
    // Records of finished messages: the retention's last 1,000 (trimmed in bulk once
    // there are a tenth more), expiring within an hour.
    for name in ["results", "finished"] {
        let key = format!("mq:{{{topic}}}:{name}");
        let at = keys
            .iter()
            .position(|k| *k == key)
            .expect("records are kept");
        keys.remove(at);
        let kept: u64 = redis::cmd("TYPE")
            .arg(&key)
            .query::<String>(&mut conn)
            .map(|t| if t == "hash" { "HLEN" } else { "LLEN" })
            .and_then(|cmd| redis::cmd(cmd).arg(&key).query(&mut conn))
            .unwrap();
        assert!((1000..=1100).contains(&kept), "{key} holds {kept}");
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
        assert!((1..=3_600_000).contains(&ttl), "{key} expires in {ttl} ms");
    }
    keys.sort();
    // Counters only: the totals, and the per-minute ring (at most an hour of slots).
    assert_eq!(
        keys,
        vec![
            "mq:topics".to_owned(),
            format!("mq:{{{topic}}}:minutes"),
            format!("mq:{{{topic}}}:stats")
        ],
        "left behind: {keys:?}"
    );
    let ring: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!("mq:{{{topic}}}:minutes"))
        .query(&mut conn)
        .unwrap();
    assert!(ring < 8192, "per-minute counters use {ring} bytes");
    let bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!("mq:{{{topic}}}:stats"))
        .query(&mut conn)
        .unwrap();
    assert!(bytes < 1024, "stats hash uses {bytes} bytes");
    let report = invariants(&server, topic, &strings(&ids));
    assert_eq!(report.gone.len(), 100_000);
}

// ---------- 8. handler toolbox ----------

/// The seed's registration flow: a handler publishes a delayed follow-up through the
/// client it is given (`msg.client()`); the gift arrives one (scaled) hour later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_publishes_a_delayed_follow_up_registration_flow() {
    let (server, mq) = setup().await;
    let hour = Duration::from_millis(400); // one "hour", scaled down
    let welcomed = Runs::default();
    let gifts = Runs::default();
    let w = welcomed.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe("user.registered", move |msg: Message<Value>| {
            let w = w.clone();
            async move {
                w.record(msg.id.as_str(), msg.retry);
                let producer = msg.client();
                let user_id = msg.data["user_id"]
                    .as_str()
                    .ok_or_else(|| HandlerError::fatal("no user_id"))?
                    .to_owned();
                producer
                    .publish_with_delay("user.welcome.gift", json!({"user_id": user_id}), hour)
                    .await?;
                Ok(())
            }
        })
        .subscribe("user.welcome.gift", recorder(&gifts))
        .build()
        .unwrap();
    let running = Running::start(worker);
    let t0 = Instant::now();
    let reg = mq
        .publish(
            "user.registered",
            json!({"user_id": "u1", "email": "u1@example.com"}),
        )
        .await
        .unwrap();
    eventually("gift delivered", || async { gifts.len() == 1 }).await;
    assert!(gifts.times()[0] - t0 >= hour, "gift came early");
    running.stop().await;
    assert_eq!(welcomed.len(), 1);
    invariants(&server, "user.registered", &[reg.to_string()]);
    let gift_id = gifts.ids().into_iter().next().unwrap();
    invariants(&server, "user.welcome.gift", &[gift_id]);
}

/// `retry_after` beats the backoff; a custom backoff is used; a per-message max_retry
/// beats the subscription's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_custom_backoff_and_per_message_max_retry() {
    let (server, mq) = setup().await;
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "payment.retry",
            Subscription::new()
                .max_retry(5)
                .backoff(Backoff::custom(|n| {
                    Duration::from_millis(100 * u64::from(n))
                })),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    match (msg.data["kind"].as_str(), msg.retry) {
                        (Some("after"), 0) => Err(HandlerError::retry_after(
                            "429 Too Many Requests",
                            Duration::from_millis(600),
                        )),
                        (Some("custom"), r) if r < 2 => Err(HandlerError::retry("flaky")),
                        (Some("once"), _) => Err(HandlerError::retry("always fails")),
                        _ => Ok(()),
                    }
                }
            },
        )
        .build()
        .unwrap();
    let after = mq
        .publish("payment.retry", json!({"kind": "after"}))
        .await
        .unwrap();
    let custom = mq
        .publish("payment.retry", json!({"kind": "custom"}))
        .await
        .unwrap();
    let once = mq
        .publish_with(
            "payment.retry",
            json!({"kind": "once"}),
            PublishOptions::new().max_retry(0),
        )
        .await
        .unwrap()
        .id()
        .clone();
    let running = Running::start(worker);
    eventually("settled", || async {
        let s = mq.stats("payment.retry").await.unwrap();
        s.processed == 2 && s.dead == 1
    })
    .await;
    running.stop().await;
    let a = runs.of(after.as_str());
    assert!(
        a[1].1 - a[0].1 >= Duration::from_millis(600),
        "retry_after not honoured"
    );
    let c = runs.of(custom.as_str());
    assert_eq!(c.len(), 3);
    assert!(
        c[1].1 - c[0].1 >= Duration::from_millis(100)
            && c[2].1 - c[1].1 >= Duration::from_millis(200)
    );
    assert_eq!(
        runs.of(once.as_str()).len(),
        1,
        "max_retry(0) on the message: one run"
    );
    invariants(&server, "payment.retry", &strings(&[after, custom, once]));
}
