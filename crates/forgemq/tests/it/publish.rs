//! Publishing: round trips, ids, batches, idempotency.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use forgemq::{HandlerError, Message, MessageId, PublishOptions, PublishOutcome, Worker};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::common::{eventually, invariants, setup, strings, Running};

/// Nested maps, arrays, floats like 299.99 and multi-dot topics arrive JSON-equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_nested_json_floats_and_multi_dot_topics() {
    let (server, mq) = setup().await;
    let topic = "order.payment.check";
    let data = json!({
        "order_id": "ORD123", "user_id": "789", "amount": 299.99, "payment_method": "alipay",
        "items": [{"sku": "a-1", "qty": 2, "price": 0.1}], "meta": {"tags": [], "empty": {}, "n": null},
        "big": 9007199254740993_u64, "neg": -1.5e-7, "text": "中文 \"quoted\" \n newline"
    });
    let before = SystemTime::now() - Duration::from_secs(1);
    let id = mq.publish(topic, &data).await.unwrap();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let worker = Worker::builder(mq.clone())
        .subscribe(topic, move |msg: Message<Value>| {
            let tx = tx.clone();
            async move {
                tx.send((
                    msg.id.clone(),
                    msg.topic.clone(),
                    msg.data.clone(),
                    msg.timestamp,
                    msg.retry,
                ))
                .unwrap();
                Ok::<(), HandlerError>(())
            }
        })
        .build()
        .unwrap();
    let running = Running::start(worker);
    let (got_id, got_topic, got_data, ts, retry) =
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(got_id, id);
    assert!(!got_id.as_str().is_empty());
    assert_eq!(got_topic, topic);
    assert_eq!(got_data, data);
    assert_eq!(retry, 0);
    assert!(
        ts >= before && ts <= SystemTime::now(),
        "timestamp {ts:?} is not the publish time"
    );
    eventually("processed", || async {
        mq.stats(topic).await.unwrap().processed == 1
    })
    .await;
    running.stop().await;
    let report = invariants(&server, topic, &strings(&[id]));
    assert_eq!(report.gone.len(), 1);
}

/// 100k publishes from 4 concurrent tasks get 100k distinct ids, all stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_unique_across_100k_publishes_from_4_tasks() {
    let (server, mq) = setup().await;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mq = mq.clone();
        tasks.push(tokio::spawn(async move {
            let items: Vec<Value> = (0..25_000).map(|i| json!({"t": t, "i": i})).collect();
            mq.publish_batch("ids.unique", items).await.unwrap()
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        for id in t.await.unwrap() {
            assert!(all.insert(id.to_string()), "duplicate id {id}");
        }
    }
    assert_eq!(all.len(), 100_000);
    assert_eq!(mq.get_queue_length("ids.unique").await.unwrap(), 100_000);
    let hlen: u64 = redis::cmd("HLEN")
        .arg("mq:{ids.unique}:msg")
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(hlen, 100_000);
    // Ids are time-sortable: generated one after another, they sort in that order.
    let a = MessageId::generate();
    std::thread::sleep(Duration::from_millis(2));
    let b = MessageId::generate();
    assert!(a < b);
}

/// `publish_batch` makes one script call per 1,000 messages, and keeps their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_batch_is_one_script_call_per_chunk() {
    let (server, mq) = setup().await;
    let before = server.command_stats();
    let ids = mq
        .publish_batch("batch.chunks", (0..2500).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let after = server.command_stats();
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    let scripts = delta("evalsha") + delta("eval");
    assert_eq!(
        scripts, 3,
        "expected 3 script calls for 2,500 messages, got {scripts}"
    );
    assert_eq!(ids.len(), 2500);
    assert_eq!(mq.get_queue_length("batch.chunks").await.unwrap(), 2500);
    // Two chunks were in flight at once; the queue still holds them in batch order.
    let mut listed = Vec::new();
    for page in [0..1000, 1000..2000, 2000..2500] {
        let found = mq
            .peek("batch.chunks", forgemq::MessageState::Pending, page)
            .await
            .unwrap();
        listed.extend(found.into_iter().map(|m| m.id));
    }
    assert_eq!(listed, ids);
    invariants(&server, "batch.chunks", &strings(&ids));
}

/// Concurrent single publishes to one topic share script calls: 2,000 publishes from 50
/// tasks take at most half as many calls, every caller gets its own id, each message is
/// stored once, each task's messages keep its order, and an oversized message among them
/// fails its own caller only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_share_script_calls() {
    let (server, mq) = setup().await;
    let topic = "web.signup";
    let first = mq.publish(topic, json!({"warm": true})).await.unwrap();
    let before = server.command_stats();
    let tasks: Vec<_> = (0..50)
        .map(|t| {
            let mq = mq.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..40 {
                    ids.push(mq.publish(topic, json!({"task": t, "n": n})).await.unwrap());
                    if t == 7 && n == 20 {
                        let big = "x".repeat(mq.max_payload() + 1);
                        let refused = mq.publish(topic, json!({"big": big})).await;
                        assert!(
                            matches!(refused, Err(forgemq::Error::PayloadTooLarge { .. })),
                            "{refused:?}"
                        );
                    }
                }
                ids
            })
        })
        .collect();
    let mut per_task = Vec::new();
    for t in tasks {
        per_task.push(t.await.unwrap());
    }
    let after = server.command_stats();
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - before.get(c).copied().unwrap_or(0);
    let calls = delta("evalsha") + delta("eval");
    assert!(
        calls <= 1000,
        "{calls} script calls for 2,000 concurrent publishes: they were not shared"
    );
    let all: Vec<MessageId> = std::iter::once(first)
        .chain(per_task.iter().flatten().cloned())
        .collect();
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 2001);
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!((stats.published, stats.pending), (2001, 2001));
    // FIFO per task: a task's messages are listed in the order it published them.
    let mut listed = Vec::new();
    for page in [0..1000, 1000..2000, 2000..2001] {
        let found = mq
            .peek(topic, forgemq::MessageState::Pending, page)
            .await
            .unwrap();
        listed.extend(found.into_iter().map(|m| m.id));
    }
    assert_eq!(listed.len(), 2001);
    let position: std::collections::HashMap<&MessageId, usize> =
        listed.iter().enumerate().map(|(i, id)| (id, i)).collect();
    for ids in &per_task {
        let at: Vec<usize> = ids.iter().map(|id| position[id]).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "out of order: {at:?}");
    }
    eprintln!("2,000 concurrent publishes in {calls} script calls");
    invariants(&server, topic, &strings(&all));

    // Callers that give up (dropped at their first wait) strand nobody: the others all
    // get their answers, and the topic still takes publishes afterwards.
    let gone = "web.impatient";
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let mq = mq.clone();
            tokio::spawn(async move {
                let publish = mq.publish(gone, json!({"i": i}));
                if i % 3 == 0 {
                    let _ = tokio::time::timeout(Duration::ZERO, publish).await;
                    None
                } else {
                    Some(publish.await.unwrap())
                }
            })
        })
        .collect();
    let mut kept = Vec::new();
    for t in tasks {
        kept.extend(
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("a publish was stranded")
                .unwrap(),
        );
    }
    assert_eq!(kept.len(), 200);
    let last = tokio::time::timeout(Duration::from_secs(20), mq.publish(gone, json!({})))
        .await
        .expect("the topic takes publishes after callers gave up")
        .unwrap();
    let stored = mq.stats(gone).await.unwrap().published;
    assert!((201..=301).contains(&stored), "{stored} stored");
    for id in kept.iter().chain([&last]) {
        assert!(
            mq.message(gone, id).await.unwrap().is_some(),
            "{id} is stored"
        );
    }
}

/// Publishing a caller-chosen id twice stores one message and says Duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_id_published_twice_is_stored_once() {
    let (server, mq) = setup().await;
    let id = MessageId::new("order-ORD123-created").unwrap();
    let first = mq
        .publish_with(
            "order.created",
            json!({"n": 1}),
            PublishOptions::new().id(id.clone()),
        )
        .await
        .unwrap();
    let second = mq
        .publish_with(
            "order.created",
            json!({"n": 2}),
            PublishOptions::new().id(id.clone()),
        )
        .await
        .unwrap();
    assert_eq!(first, PublishOutcome::Published(id.clone()));
    assert_eq!(second, PublishOutcome::Duplicate(id.clone()));
    let stats = mq.stats("order.created").await.unwrap();
    assert_eq!((stats.pending, stats.published), (1, 1));
    let delivery = mq.pop_message("order.created").await.unwrap().unwrap();
    assert_eq!(delivery.data(), &json!({"n": 1}), "the first body wins");
    delivery.ack().await.unwrap();
    invariants(&server, "order.created", &[id.to_string()]);
}

/// `get_queue_length` counts waiting messages only and drops to 0 after consumption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_length_counts_waiting_messages_and_drops_to_zero() {
    let (server, mq) = setup().await;
    let topic = "user.welcome";
    let ids = mq
        .publish_batch(topic, (0..100).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let later = mq
        .publish_with_delay(topic, json!({"later": true}), Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(
        mq.get_queue_length(topic).await.unwrap(),
        100,
        "delayed messages are not waiting"
    );
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            forgemq::Subscription::new().concurrency(8),
            |_msg: Message<Value>| async { Ok::<(), HandlerError>(()) },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all consumed", || async {
        mq.stats(topic).await.unwrap().processed == 100
    })
    .await;
    assert_eq!(mq.get_queue_length(topic).await.unwrap(), 0);
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!((stats.pending, stats.active, stats.delayed), (0, 0, 1));
    running.stop().await;
    let mut all = strings(&ids);
    all.push(later.to_string());
    let report = invariants(&server, topic, &all);
    assert_eq!((report.gone.len(), report.delayed.len()), (100, 1));
}

/// Headers travel beside the data: the handler and a manual fetch read them, the stored
/// envelope carries them, bad ones are refused with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_reach_the_handler_and_bad_ones_are_refused() {
    let (_server, mq) = setup().await;
    let topic = "order.created";
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let id = mq
        .publish_with(
            topic,
            json!({"order_id": "ORD1"}),
            PublishOptions::new()
                .header("traceparent", traceparent)
                .header("tenant", "acme"),
        )
        .await
        .unwrap()
        .id()
        .clone();
    let stored = mq.message(topic, &id).await.unwrap().unwrap();
    assert_eq!(stored.envelope["headers"]["traceparent"], traceparent);
    let d = mq.pop_message(topic).await.unwrap().unwrap();
    assert_eq!(
        d.message().headers.get("traceparent").map(String::as_str),
        Some(traceparent)
    );
    assert_eq!(
        d.message().headers.get("tenant").map(String::as_str),
        Some("acme")
    );
    // A retry keeps them.
    d.nack(Duration::ZERO, "again").await.unwrap();
    let d = mq.pop_message(topic).await.unwrap().unwrap();
    assert_eq!(d.message().retry, 1);
    assert_eq!(d.message().headers.len(), 2);
    d.ack().await.unwrap();
    // Without headers the envelope has no `headers` field (old readers see nothing new).
    let plain = mq.publish(topic, json!({})).await.unwrap();
    let stored = mq.message(topic, &plain).await.unwrap().unwrap();
    assert!(
        stored.envelope.get("headers").is_none(),
        "{}",
        stored.envelope
    );
    for bad in [
        PublishOptions::new().header("has space", "x"),
        PublishOptions::new().header("", "x"),
        PublishOptions::new().header("k", "line\nbreak"),
        PublishOptions::new().header("k", "x".repeat(1025)),
    ] {
        let e = mq.publish_with(topic, 1, bad).await.unwrap_err();
        assert!(e.is_invalid_input(), "{e}");
    }
    assert_eq!(mq.stats(topic).await.unwrap().published, 2);
}
