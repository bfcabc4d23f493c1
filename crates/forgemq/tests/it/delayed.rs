//! Delayed messages: never early, soon after due, exactly once, independent of the
//! producer.

use std::time::{Duration, Instant};

use forgemq::{HandlerError, Message, Subscription, Worker};
use serde_json::{json, Value};

use crate::common::child::ChildProc;
use crate::common::single_server_only;
use crate::common::{eventually, invariants, setup, strings, Running, Runs};

fn recording_worker(mq: &forgemq::Client, topic: &str, runs: &Runs) -> Worker {
    let r = runs.clone();
    Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(4),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .build()
        .unwrap()
}

/// A delayed message is never delivered before its due time, and within 1 s after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_is_not_delivered_before_due_and_soon_after() {
    let (server, mq) = setup().await;
    let runs = Runs::default();
    // The worker is idle and blocked before the publish: the publish must wake it up to
    // recompute its wait.
    let running = Running::start(recording_worker(&mq, "order.payment.check", &runs));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let id = mq
        .publish_with_delay(
            "order.payment.check",
            json!({"order_id": "ORD1"}),
            Duration::from_millis(2000),
        )
        .await
        .unwrap();
    let soon = mq
        .publish("order.payment.check", json!({"now": true}))
        .await
        .unwrap();
    eventually("delivered", || async { runs.of(id.as_str()).len() == 1 }).await;
    let at = runs.of(id.as_str())[0].1 - t0;
    assert!(
        at >= Duration::from_millis(2000),
        "delivered {at:?} after publish: early"
    );
    assert!(
        at <= Duration::from_millis(3000),
        "delivered {at:?} after publish: over 1 s late"
    );
    running.stop().await;
    invariants(&server, "order.payment.check", &strings(&[id, soon]));
}

/// Delayed delivery works when the producer process exits right after publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_fires_after_the_producer_process_exited() {
    let (server, mq) = setup().await;
    let t0 = Instant::now();
    let child = ChildProc::spawn("publish-delayed", &server.url(), "user.welcome.gift");
    let (out, _) = child.wait_output();
    let id = out
        .lines()
        .find_map(|l| l.split("published ").nth(1))
        .unwrap_or_else(|| panic!("child printed no id: {out}"))
        .trim()
        .to_owned();
    assert_eq!(mq.stats("user.welcome.gift").await.unwrap().delayed, 1);
    let runs = Runs::default();
    let running = Running::start(recording_worker(&mq, "user.welcome.gift", &runs));
    eventually("delivered", || async { runs.of(&id).len() == 1 }).await;
    assert!(
        runs.of(&id)[0].1 - t0 >= Duration::from_millis(1500),
        "early"
    );
    running.stop().await;
    invariants(&server, "user.welcome.gift", &[id]);
}

/// Delayed delivery works when the task that published is dropped right after `Ok`
/// (the seed's request-context case) and its client is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_fires_after_the_publishing_task_was_dropped() {
    let (server, mq) = setup().await;
    let url = server.url();
    let publisher = tokio::spawn(async move {
        let producer = forgemq::Client::connect(&url).await.unwrap();
        producer
            .publish_with_delay(
                "user.welcome.gift",
                json!({"user_id": "42"}),
                Duration::from_millis(800),
            )
            .await
            .unwrap()
    });
    let id = publisher.await.unwrap();
    let runs = Runs::default();
    let running = Running::start(recording_worker(&mq, "user.welcome.gift", &runs));
    eventually("delivered", || async { runs.of(id.as_str()).len() == 1 }).await;
    running.stop().await;
    invariants(&server, "user.welcome.gift", &[id.to_string()]);
}

/// Three workers racing for the same due messages deliver each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_are_delivered_exactly_once_with_three_racing_workers() {
    let (server, mq) = setup().await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(
            mq.publish_with_delay(
                "order.reminder",
                json!({"i": i}),
                Duration::from_millis(1000),
            )
            .await
            .unwrap(),
        );
    }
    let runs = Runs::default();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let client = forgemq::Client::connect(&server.url()).await.unwrap();
        workers.push(Running::start(recording_worker(
            &client,
            "order.reminder",
            &runs,
        )));
    }
    eventually("all delivered", || async {
        mq.stats("order.reminder").await.unwrap().processed == 50
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for w in workers {
        w.stop().await;
    }
    let counts = runs.count_per_id();
    assert_eq!(counts.len(), 50);
    assert!(
        counts.values().all(|&c| c == 1),
        "a delayed message ran twice: {counts:?}"
    );
    invariants(&server, "order.reminder", &strings(&ids));
}

/// A delayed message fires on the worker's own timer, not when Redis times out its
/// blocking wait: Redis does that only on its cron tick (here `hz 1`, once a second), so
/// a worker relying on it would start these messages up to a second late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_fires_on_time_whatever_the_redis_tick() {
    single_server_only!();
    let server = forgemq_test_support::RedisServer::start_with(
        forgemq_test_support::RedisOptions::new().args(["--hz", "1"]),
    );
    let mq = forgemq::Client::connect(&server.url()).await.unwrap();
    let runs = Runs::default();
    let running = Running::start(recording_worker(&mq, "order.reminder", &runs));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sent = Vec::new();
    for i in 0..5_u64 {
        let delay = Duration::from_millis(200 + 150 * i);
        let t0 = Instant::now();
        let id = mq
            .publish_with_delay("order.reminder", json!({"i": i}), delay)
            .await
            .unwrap();
        sent.push((id, t0, delay));
    }
    eventually("all delivered", || async { runs.len() == 5 }).await;
    running.stop().await;
    for (id, t0, delay) in &sent {
        let at = runs.of(id.as_str())[0].1 - *t0;
        assert!(
            at >= *delay,
            "{id} started {at:?} after publish, before its {delay:?}"
        );
        // Generous for a noisy machine, yet well under the one-second tick.
        assert!(
            at < *delay + Duration::from_millis(400),
            "{id} started {at:?} after publish for a {delay:?} delay: waited for the Redis tick"
        );
    }
    invariants(
        &server,
        "order.reminder",
        &strings(&sent.iter().map(|s| s.0.clone()).collect::<Vec<_>>()),
    );
}
