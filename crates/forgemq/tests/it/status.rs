//! Results and progress: token-fenced progress reports, results kept in a bounded record
//! per finished message, `message_status` and `wait_result`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forgemq::{
    BatchOptions, BatchOutcome, Done, Error, HandlerError, Message, MessageId, PublishOptions,
    Status, Subscription, TopicOptions, Worker,
};
use redis::Commands;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::common::{eventually, invariants, setup, strings, Running};

/// One message through its whole life: pending, active with its progress (the handler
/// waits for the test), done with its result and last progress; a message that failed
/// once says retry 1; a fatal one is dead with its error; a cancelled one is cancelled; an
/// id nobody published is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_state_reads_back_with_its_progress_result_and_error() {
    let (server, mq) = setup().await;
    let topic = "video.transcode";
    let unknown = MessageId::generate();
    assert_eq!(
        mq.message_status(topic, &unknown).await.unwrap().state,
        Status::Unknown
    );
    let id = mq.publish(topic, json!({"kind": "slow"})).await.unwrap();
    let status = mq.message_status(topic, &id).await.unwrap();
    assert_eq!((status.state, status.retry), (Status::Pending, 0));
    let later = mq
        .publish_with(
            topic,
            json!({"kind": "later"}),
            PublishOptions::new().delay(Duration::from_secs(3600)),
        )
        .await
        .unwrap()
        .id()
        .clone();
    assert_eq!(
        mq.message_status(topic, &later).await.unwrap().state,
        Status::Delayed
    );
    mq.cancel(topic, &later).await.unwrap();
    let cancelled = mq.message_status(topic, &later).await.unwrap();
    assert_eq!(cancelled.state, Status::Cancelled);
    assert!(cancelled.finished_at.is_some());

    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new()
                .concurrency(4)
                .backoff(forgemq::Backoff::fixed(Duration::from_millis(50))),
            move |msg: Message<Value>| {
                let g = g.clone();
                async move {
                    match msg.data["kind"].as_str() {
                        Some("slow") => {
                            msg.progress(json!({"percent": 50})).await?;
                            g.acquire().await.unwrap().forget();
                            Ok(Done(json!({"url": "https://cdn.example/42.mp4"})))
                        }
                        Some("flaky") if msg.retry == 0 => Err(HandlerError::retry("503")),
                        Some("flaky") => Ok(Done(json!(msg.retry))),
                        Some("fatal") => Err(HandlerError::fatal("order ORD123 does not exist")),
                        _ => Ok(Done(Value::Null)),
                    }
                }
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("the slow one reports its progress", || async {
        let s = mq.message_status(topic, &id).await.unwrap();
        s.state == Status::Active && s.progress == Some(json!({"percent": 50}))
    })
    .await;
    let flaky = mq.publish(topic, json!({"kind": "flaky"})).await.unwrap();
    let fatal = mq.publish(topic, json!({"kind": "fatal"})).await.unwrap();
    gate.add_permits(1);
    let done = mq
        .wait_result(topic, &id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(done.state, Status::Done);
    assert_eq!(
        done.result,
        Some(json!({"url": "https://cdn.example/42.mp4"}))
    );
    assert_eq!(done.progress, Some(json!({"percent": 50})));
    assert_eq!(done.retry, 0);
    assert!(done.finished_at.is_some());
    let all = strings(&[id.clone(), later.clone(), flaky.clone(), fatal.clone()]);
    let flaky = mq
        .wait_result(topic, &flaky, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!((flaky.state, flaky.retry), (Status::Done, 1));
    assert_eq!(flaky.result, Some(json!(1)));
    let fatal = mq
        .wait_result(topic, &fatal, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(fatal.state, Status::Dead);
    assert_eq!(
        fatal.error.as_deref(),
        Some("order ORD123 does not exist"),
        "{fatal:?}"
    );
    running.stop().await;
    // Progress is gone once the messages finished; records stay.
    let mut conn = server.conn_for_topic(topic);
    let progress: u64 = conn.hlen(format!("mq:{{{topic}}}:progress")).unwrap();
    assert_eq!(progress, 0);
    let records: u64 = conn.hlen(format!("mq:{{{topic}}}:results")).unwrap();
    assert_eq!(records, 3, "done, flaky and cancelled");
    invariants(&server, topic, &all);
}

/// A worker whose lease was lost cannot write progress: the message's new holder can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_delivery_cannot_report_progress() {
    let (server, mq) = setup().await;
    let topic = "report.build";
    let id = mq.publish(topic, json!({})).await.unwrap();
    let stale = mq
        .pop_messages_with_lease(topic, 1, Duration::from_millis(100))
        .await
        .unwrap()
        .pop()
        .unwrap();
    stale.progress(json!("stage 1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The next fetch recovers the expired lease and takes it again.
    let fresh = eventually_pop(&mq, topic).await;
    assert_eq!(fresh.id(), &id);
    let refused = stale.progress(json!("stage 9 (stale)")).await;
    assert!(
        matches!(refused, Err(Error::LeaseLost { .. })),
        "{refused:?}"
    );
    fresh.progress(json!("stage 2")).await.unwrap();
    let status = mq.message_status(topic, &id).await.unwrap();
    assert_eq!(status.state, Status::Active);
    assert_eq!(status.progress, Some(json!("stage 2")));
    assert!(matches!(stale.ack().await, Err(Error::LeaseLost { .. })));
    fresh.ack_with(json!({"pages": 12})).await.unwrap();
    let status = mq.message_status(topic, &id).await.unwrap();
    assert_eq!(status.state, Status::Done);
    assert_eq!(status.result, Some(json!({"pages": 12})));
    assert_eq!(status.progress, Some(json!("stage 2")));
    assert_eq!(status.retry, 0);
    invariants(&server, topic, &[]);
}

async fn eventually_pop(mq: &forgemq::Client, topic: &str) -> forgemq::Delivery {
    let start = Instant::now();
    loop {
        if let Some(d) = mq.pop_message(topic).await.unwrap() {
            return d;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "nothing to pop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `wait_result` without a worker times out; three callers waiting on one message are all
/// woken when a worker finishes it, long before their deadline; a purge wakes the waiters
/// of what it deleted (their message is unknown now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_woken_by_the_finish_not_by_their_deadline() {
    let (server, mq) = setup().await;
    let topic = "order.pay";
    let id = mq.publish(topic, json!({"order": 1})).await.unwrap();
    let begin = Instant::now();
    let timed_out = mq.wait_result(topic, &id, Duration::from_millis(300)).await;
    assert!(matches!(timed_out, Err(Error::Timeout(_))), "{timed_out:?}");
    assert!(begin.elapsed() >= Duration::from_millis(300));
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let (mq, id) = (mq.clone(), id.clone());
            tokio::spawn(async move {
                let s = mq
                    .wait_result(topic, &id, Duration::from_secs(60))
                    .await
                    .unwrap();
                (s, Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let worker = Worker::builder(mq.clone())
        .subscribe(topic, |msg: Message<Value>| async move {
            Ok::<_, HandlerError>(Done(json!({"paid": msg.data["order"]})))
        })
        .build()
        .unwrap();
    let running = Running::start(worker);
    for w in waiters {
        let (status, at) = w.await.unwrap();
        assert_eq!(status.state, Status::Done);
        assert_eq!(status.result, Some(json!({"paid": 1})));
        // Woken by the finish: well before the 60 s deadline.
        assert!(at.duration_since(started) < Duration::from_secs(20));
    }
    // Finished already: answered at once (also with a timeout of "for ever").
    let again = mq.wait_result(topic, &id, Duration::MAX).await.unwrap();
    assert_eq!(again.state, Status::Done);
    running.stop().await;
    // Nobody is registered any more.
    let mut conn = server.conn_for_topic(topic);
    let left: u64 = conn.hlen(format!("mq:{{{topic}}}:waiters")).unwrap();
    assert_eq!(left, 0);

    // A purge wakes whoever waits on what it deletes.
    let doomed = mq.publish(topic, json!({"order": 2})).await.unwrap();
    let waiter = {
        let (mq, doomed) = (mq.clone(), doomed.clone());
        tokio::spawn(async move {
            mq.wait_result(topic, &doomed, Duration::from_secs(60))
                .await
        })
    };
    eventually("the waiter is registered", || async {
        let mut conn = server.conn_for_topic(topic);
        conn.hlen::<_, u64>(format!("mq:{{{topic}}}:waiters"))
            .unwrap()
            == 1
    })
    .await;
    let purged_at = Instant::now();
    mq.purge_queue(topic).await.unwrap();
    let status = waiter.await.unwrap().unwrap();
    assert_eq!(status.state, Status::Unknown);
    assert!(purged_at.elapsed() < Duration::from_secs(20));
    invariants(&server, topic, &[]);
}

/// Records are bounded: a topic keeping 5 keeps the last 5 finished messages (the older
/// ones read as unknown), and a record older than the retention's age is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_kept_to_the_retention() {
    let (server, mq) = setup().await;
    let topic = "search.sync";
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().result_retention(5, Duration::from_secs(3600)),
            |msg: Message<Value>| async move { Ok::<_, HandlerError>(Done(msg.data["i"].clone())) },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    let mut ids = Vec::new();
    // One at a time, so that "the last 5" is a known set.
    for i in 0..20 {
        let id = mq.publish(topic, json!({"i": i})).await.unwrap();
        mq.wait_result(topic, &id, Duration::from_secs(20))
            .await
            .unwrap();
        ids.push(id);
    }
    running.stop().await;
    for (i, id) in ids.iter().enumerate() {
        let status = mq.message_status(topic, id).await.unwrap();
        if i < 15 {
            assert_eq!(status.state, Status::Unknown, "message {i}");
        } else {
            assert_eq!(status.state, Status::Done, "message {i}");
            assert_eq!(status.result, Some(json!(i)));
        }
    }
    let mut conn = server.conn_for_topic(topic);
    let kept: (u64, u64) = (
        conn.hlen(format!("mq:{{{topic}}}:results")).unwrap(),
        conn.llen(format!("mq:{{{topic}}}:finished")).unwrap(),
    );
    assert_eq!(kept, (5, 5));
    assert_eq!(mq.stats(topic).await.unwrap().results_kept, 5);

    // Age: kept for 1 s, gone after it.
    let brief = "search.brief";
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            brief,
            Subscription::new().result_retention(100, Duration::from_secs(1)),
            |_msg: Message<Value>| async move { Ok::<_, HandlerError>(()) },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    let id = mq.publish(brief, json!({})).await.unwrap();
    let status = mq
        .wait_result(brief, &id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!((status.state, status.result), (Status::Done, None));
    running.stop().await;
    eventually("the record ages out", || async {
        mq.message_status(brief, &id).await.unwrap().state == Status::Unknown
    })
    .await;
    invariants(&server, topic, &strings(&ids));
}

/// A partitioned topic: statuses and waits find the message's partition by themselves,
/// and a batch handler's results are kept per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_topics_and_batch_handlers_keep_results() {
    let (server, mq) = setup().await;
    let topic = "invoice.render";
    mq.create_topic(topic, TopicOptions::new().partitions(4))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..12 {
        let out = mq
            .publish_with(
                topic,
                json!({"i": i}),
                PublishOptions::new().partition_key(format!("customer-{}", i % 5)),
            )
            .await
            .unwrap();
        ids.push(out.id().clone());
    }
    let worker = Worker::builder(mq.clone())
        .subscribe_batch(
            topic,
            BatchOptions::new()
                .max_size(5)
                .max_wait(Duration::from_millis(50)),
            |batch: Vec<Message<Value>>| async move {
                Ok::<_, HandlerError>(
                    batch
                        .iter()
                        .map(|m| BatchOutcome::done_with(json!({"rendered": m.data["i"]})))
                        .collect(),
                )
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    for (i, id) in ids.iter().enumerate() {
        let status = mq
            .wait_result(topic, id, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(status.state, Status::Done);
        assert_eq!(status.result, Some(json!({"rendered": i})));
    }
    running.stop().await;
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!((stats.processed, stats.pending, stats.active), (12, 0, 0));
    drop(server);
}
