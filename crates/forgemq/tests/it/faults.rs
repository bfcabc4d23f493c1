//! Crashes: a worker killed mid-handler, a stale worker's late ack, Redis killed and
//! restarted with AOF. Each ends with the invariant checker.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forgemq::{Client, Error, HandlerError, Message, Subscription, Worker};
use forgemq_test_support::{assert_none_lost, Aof, RedisOptions, RedisServer};
use serde_json::{json, Value};

use crate::common::child::ChildProc;
use crate::common::single_server_only;
use crate::common::{eventually, init_tracing, invariants, setup, strings, Running, Runs};

/// A worker process killed with SIGKILL mid-handler: its messages run again on another
/// worker after the lease, each with one recovery counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_process_messages_are_redelivered_after_the_lease() {
    let (server, mq) = setup().await;
    let topic = "email.send";
    let ids = mq
        .publish_batch(topic, (0..20).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let mut child = ChildProc::spawn("sleepy-worker", &server.url(), topic);
    eventually("all 20 in flight in the child", || async {
        mq.stats(topic).await.unwrap().active == 20
    })
    .await;
    child.kill9();
    let killed_at = Instant::now();

    let runs = Runs::default();
    let r = runs.clone();
    let recoveries = Arc::new(Mutex::new(Vec::new()));
    let rec = recoveries.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(20),
            move |msg: Message<Value>| {
                let (r, rec) = (r.clone(), rec.clone());
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    rec.lock().unwrap().push(msg.recoveries);
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .recover_interval(Duration::from_millis(500))
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all redelivered", || async {
        mq.stats(topic).await.unwrap().processed == 20
    })
    .await;
    // lease 1 s + recoverer 0.5 s + 2 s of slack.
    assert!(
        killed_at.elapsed() < Duration::from_millis(3500) + Duration::from_secs(2),
        "took {:?}",
        killed_at.elapsed()
    );
    running.stop().await;
    assert_eq!(runs.len(), 20);
    assert!(recoveries.lock().unwrap().iter().all(|&r| r == 1));
    assert_eq!(mq.stats(topic).await.unwrap().recovered, 20);
    let report = invariants(&server, topic, &strings(&ids));
    assert_none_lost(&report, &runs.ids());
}

/// A stale delivery's late ack is refused with `LeaseLost`; the new owner's ack counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_late_ack_is_rejected_with_lease_lost() {
    let (server, mq) = setup().await;
    let id = mq
        .publish("order.paid", json!({"order_id": "ORD9"}))
        .await
        .unwrap();
    let stale = mq
        .pop_messages_with_lease("order.paid", 1, Duration::from_millis(200))
        .await
        .unwrap()
        .pop()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = mq
        .pop_message("order.paid")
        .await
        .unwrap()
        .expect("recovered and handed out again");
    assert_eq!(fresh.id(), &id);
    assert_eq!(fresh.message().recoveries, 1);
    let err = stale.ack().await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert!(err.is_lease_lost());
    fresh.ack().await.unwrap();
    let stats = mq.stats("order.paid").await.unwrap();
    assert_eq!(stats.processed, 1);
    invariants(&server, "order.paid", &[id.to_string()]);
}

/// A worker process frozen (SIGSTOP) past its lease: the message goes to another worker;
/// when the frozen one wakes, its handler is told the lease is lost and its ack is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_loses_its_lease_and_its_late_ack_is_refused() {
    let (server, mq) = setup().await;
    let topic = "payment.retry";
    let id = mq.publish(topic, json!({"n": 1})).await.unwrap();
    let mut child = ChildProc::spawn("slow-acker", &server.url(), topic);
    eventually("child took it", || async {
        mq.stats(topic).await.unwrap().active == 1
    })
    .await;
    child.signal("STOP");
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().lease(Duration::from_secs(1)),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .recover_interval(Duration::from_millis(300))
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("taken over and processed", || async {
        mq.stats(topic).await.unwrap().processed == 1
    })
    .await;
    child.signal("CONT");
    let (out, err) = child.wait_output();
    running.stop().await;
    assert!(
        out.contains(&format!("finished {id} lease_lost=true")),
        "stdout: {out}"
    );
    assert!(err.contains("lease lost"), "stderr: {err}");
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!((stats.processed, stats.recovered), (1, 1));
    assert_eq!(runs.len(), 1);
    invariants(&server, topic, &[id.to_string()]);
}

/// Redis killed with SIGKILL mid-stream (AOF `always`) and restarted on the same dir and
/// port: every publish that returned Ok is processed, and the worker carries on by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_with_aof_always_loses_no_acknowledged_publish() {
    single_server_only!();
    init_tracing();
    let mut server = RedisServer::start_with(RedisOptions::new().aof(Aof::Always));
    let mq = Client::builder(server.url())
        .response_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let topic = "user.registered";
    let runs = Runs::default();
    let r = runs.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new()
                .concurrency(4)
                .lease(Duration::from_secs(2)),
            move |msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.record(msg.id.as_str(), msg.retry);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .recover_interval(Duration::from_millis(500))
        .build()
        .unwrap();
    let running = Running::start(worker);

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let attempted = Arc::new(Mutex::new(Vec::new()));
    let producer = {
        let (mq, acknowledged, attempted) = (mq.clone(), acknowledged.clone(), attempted.clone());
        tokio::spawn(async move {
            for i in 0..600 {
                let id = forgemq::MessageId::generate();
                attempted.lock().unwrap().push(id.to_string());
                let opts = forgemq::PublishOptions::new().id(id.clone());
                if mq.publish_with(topic, json!({"i": i}), opts).await.is_ok() {
                    acknowledged.lock().unwrap().push(id.to_string());
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    eventually("some published", || async {
        acknowledged.lock().unwrap().len() >= 150
    })
    .await;
    server.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart();
    producer.await.unwrap();
    let acked: Vec<String> = acknowledged.lock().unwrap().clone();
    assert!(
        acked.len() >= 300,
        "most publishes should succeed; {} did",
        acked.len()
    );
    let processed_all = || {
        let ids = runs.ids();
        acked.iter().all(|id| ids.contains(id))
    };
    eventually("every acknowledged publish processed", || async {
        processed_all()
    })
    .await;
    // Outcomes recorded before the crash but after the last fsync don't exist with
    // `always`; let in-flight acks land, then check the states.
    eventually("nothing active", || async {
        mq.stats(topic)
            .await
            .map(|s| s.active == 0 && s.pending == 0)
            .unwrap_or(false)
    })
    .await;
    running.stop().await;
    let all: Vec<String> = attempted.lock().unwrap().clone();
    let report = invariants(&server, topic, &all);
    let processed: HashSet<String> = runs.ids();
    assert_none_lost(&report, &processed);
    for id in &acked {
        assert!(
            processed.contains(id),
            "acknowledged publish {id} was never processed"
        );
    }
}
