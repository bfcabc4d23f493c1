//! Regression tests for faults found in review: oversized calls, a silently dead
//! connection, the same id in flight twice, thousands of leases to renew.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forgemq::{
    BatchOptions, BatchOutcome, Client, HandlerError, Message, MessageId, PublishOptions,
    Subscription, Worker,
};
use serde_json::{json, Value};

use crate::common::single_server_only;
use crate::common::{eventually, invariants, setup, strings, Proxy, Running, Runs};

/// Asking for more than one call's worth (1,000) returns 1,000 and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn popping_more_than_one_call_allows_loses_nothing() {
    let (server, mq) = setup().await;
    let ids = mq
        .publish_batch("big.pop", (0..5000).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let got = mq.pop_messages("big.pop", 5000).await.unwrap();
    assert_eq!(got.len(), 1000);
    let s = mq.stats("big.pop").await.unwrap();
    assert_eq!((s.pending, s.active), (4000, 1000));
    invariants(&server, "big.pop", &strings(&ids));
    let too_big = Worker::builder(mq.clone())
        .subscribe_batch(
            "big.pop",
            BatchOptions::new().max_size(5000),
            |b: Vec<Message<Value>>| async move {
                Ok::<_, HandlerError>(b.iter().map(|_| BatchOutcome::done()).collect())
            },
        )
        .build();
    assert!(too_big.unwrap_err().to_string().contains("at most 1000"));
}

/// Thousands of messages in flight at once keep their leases (renewal is chunked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_in_flight_keep_their_leases() {
    let (server, mq) = setup().await;
    let n = 4500;
    let ids = mq
        .publish_batch("wide.topic", (0..n).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "wide.topic",
            Subscription::new()
                .concurrency(n)
                .lease(Duration::from_millis(900)),
            move |_m: Message<Value>| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .recover_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all processed", || async {
        mq.stats("wide.topic").await.unwrap().processed == n as u64
    })
    .await;
    running.stop().await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        n,
        "some ran twice: leases lapsed"
    );
    assert_eq!(mq.stats("wide.topic").await.unwrap().recovered, 0);
    invariants(&server, "wide.topic", &strings(&ids));
}

/// The same id in flight twice in one worker: the stale run's refused outcome must not
/// stop the renewal of the fresh run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_run_does_not_cancel_the_lease_of_a_fresh_run_of_the_same_id() {
    let (server, mq) = setup().await;
    let id = mq.publish("twice.topic", json!({})).await.unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "twice.topic",
            Subscription::new()
                .concurrency(2)
                .lease(Duration::from_millis(600)),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    // First run: 1 s; second run: 3 s, i.e. 5 leases, kept only by renewal.
                    let ms = if r.len() == 1 { 1000 } else { 3000 };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .recover_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("first run started", || async { runs.len() == 1 }).await;
    // Take the message away from the first run, as a recovery would, and hand it out again.
    let mut conn = server.conn();
    let _: () = redis::pipe()
        .cmd("ZREM")
        .arg("mq:{twice.topic}:active")
        .arg(id.as_str())
        .ignore()
        .cmd("HDEL")
        .arg("mq:{twice.topic}:lease")
        .arg(id.as_str())
        .ignore()
        .cmd("RPUSH")
        .arg("mq:{twice.topic}:pending")
        .arg(id.as_str())
        .ignore()
        .cmd("RPUSH")
        .arg("mq:{twice.topic}:wake")
        .arg(1)
        .ignore()
        .query(&mut conn)
        .unwrap();
    eventually("processed", || async {
        mq.stats("twice.topic").await.unwrap().processed == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.stop().await;
    assert_eq!(runs.len(), 2, "the fresh run lost its lease and ran again");
    assert_eq!(mq.stats("twice.topic").await.unwrap().recovered, 0);
    invariants(&server, "twice.topic", &[id.to_string()]);
}

/// A connection that silently stops answering (no RST) is replaced: the worker goes on
/// consuming through a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_connection_is_replaced() {
    single_server_only!();
    let (server, direct) = setup().await;
    let proxy = Proxy::start(server.port()).await;
    let mq = Client::builder(proxy.url())
        .response_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            "partition.topic",
            Subscription::new().lease(Duration::from_secs(2)),
            move |msg: Message<Value>| {
                r.record(msg.id.as_str(), msg.retry);
                std::future::ready(Ok::<(), HandlerError>(()))
            },
        )
        .idle_wait(Duration::from_millis(500))
        .build()
        .unwrap();
    let running = Running::start(worker);
    let first = direct
        .publish("partition.topic", json!({"n": 1}))
        .await
        .unwrap();
    eventually("first processed", || async {
        direct.stats("partition.topic").await.unwrap().processed == 1
    })
    .await;
    proxy.blackhole_existing();
    let second = direct
        .publish("partition.topic", json!({"n": 2}))
        .await
        .unwrap();
    eventually("second processed through a new connection", || async {
        direct.stats("partition.topic").await.unwrap().processed == 2
    })
    .await;
    running.stop().await;
    assert_eq!(runs.len(), 2);
    invariants(&server, "partition.topic", &strings(&[first, second]));
}

/// A batch with caller-chosen ids can be published again after an error: nothing is
/// stored twice. Durations too large for Redis are clamped, not an error mid-script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_with_ids_is_safe_to_retry_and_huge_durations_are_clamped() {
    let (server, mq) = setup().await;
    let items = || {
        (0..1500).map(|i| {
            (
                json!({"i": i}),
                PublishOptions::new().id(MessageId::new(format!("m-{i}")).unwrap()),
            )
        })
    };
    let first = mq.publish_batch_with("retry.batch", items()).await.unwrap();
    assert!(first.iter().all(|o| !o.is_duplicate()));
    let again = mq.publish_batch_with("retry.batch", items()).await.unwrap();
    assert!(again.iter().all(|o| o.is_duplicate()));
    assert_eq!(mq.stats("retry.batch").await.unwrap().published, 1500);
    let huge = mq
        .publish_with(
            "retry.batch",
            json!({}),
            PublishOptions::new()
                .delay(Duration::MAX)
                .unique_key("k", Duration::MAX),
        )
        .await
        .unwrap();
    assert!(!huge.is_duplicate());
    assert_eq!(mq.stats("retry.batch").await.unwrap().delayed, 1);
    let mut ids: Vec<String> = (0..1500).map(|i| format!("m-{i}")).collect();
    ids.push(huge.id().to_string());
    invariants(&server, "retry.batch", &ids);
}
