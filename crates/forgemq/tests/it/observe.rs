//! What operators see: the worker registry, who holds each active message, queue latency,
//! one message by id, and dead letters found by their error and handled in bulk.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use forgemq::{
    Backoff, HandlerError, Message, MessageId, MessageState, PublishOptions, Subscription, Worker,
    WorkerState,
};
use serde_json::{json, Value};

use crate::common::child::ChildProc;
use crate::common::{eventually, invariants, setup, strings, Running};

/// A worker process is listed with its topics, concurrency and running messages, each
/// active message names it as holder; killed with SIGKILL it drops out within 30 s (the
/// default heartbeat: 5 s, an entry stands 15 s), and its messages run again elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_lists_a_worker_and_drops_it_after_sigkill() {
    let (server, mq) = setup().await;
    let topic = "video.transcode";
    let ids = mq
        .publish_batch(topic, (0..3).map(|_| json!({"sleep_ms": 600_000})))
        .await
        .unwrap();
    let mut child = ChildProc::spawn_with(
        "chaos-worker",
        &server.url(),
        topic,
        &[("FORGEMQ_CHILD_LEASE_MS", "2000".to_owned())],
    );
    eventually("the worker runs all 3", || async {
        child.stdout_now().matches("started ").count() == 3
    })
    .await;
    let out = child.stdout_now();
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("worker "))
        .unwrap()
        .to_owned();
    let pid = child.pid();
    // The heartbeat after the handlers started says 3 in flight.
    eventually("the registry shows 3 in flight", || async {
        mq.workers().await.unwrap().first().map(|w| w.in_flight()) == Some(3)
    })
    .await;
    let workers = mq.workers().await.unwrap();
    assert_eq!(workers.len(), 1, "{workers:?}");
    let w = &workers[0];
    assert_eq!(w.id, id);
    assert_eq!(w.pid, pid);
    assert_eq!(w.name.as_deref(), Some("chaos-worker"));
    assert_eq!(w.state, WorkerState::Running);
    assert_eq!(w.version, env!("CARGO_PKG_VERSION"));
    assert!(id.starts_with(&format!("{}-{pid}-", w.host)), "{id}");
    assert_eq!(w.topics.len(), 1);
    assert_eq!(
        (
            w.topics[0].topic.as_str(),
            w.topics[0].concurrency,
            w.topics[0].in_flight
        ),
        (topic, 10, 3)
    );
    assert!(w.started_at <= w.last_heartbeat);
    let age = SystemTime::now()
        .duration_since(w.last_heartbeat)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(15), "last heartbeat {age:?} ago");
    // The JSON shape operators and the API get.
    let v = serde_json::to_value(w).unwrap();
    for field in [
        "id",
        "host",
        "pid",
        "version",
        "state",
        "started_at",
        "last_heartbeat",
        "topics",
    ] {
        assert!(v.get(field).is_some(), "{field} missing from {v}");
    }
    assert_eq!(v["state"], "running");
    assert_eq!(v["topics"][0]["in_flight"], 3);

    assert_eq!(mq.topic_workers(topic).await.unwrap().len(), 1);
    assert!(mq.topic_workers("other.topic").await.unwrap().is_empty());
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!(
        (stats.workers, stats.worker_slots, stats.in_flight),
        (1, 10, 3),
        "{stats:?}"
    );

    // Every active message names its holder and when its run started.
    let active = mq.peek(topic, MessageState::Active, 0..10).await.unwrap();
    assert_eq!(active.len(), 3);
    for m in &active {
        assert_eq!(m.holder.as_deref(), Some(id.as_str()), "{m:?}");
        let since = m.started_at.expect("started_at of an active message");
        assert!(since <= SystemTime::now() + Duration::from_secs(1));
    }
    let one = mq.message(topic, &ids[0]).await.unwrap().unwrap();
    assert_eq!(one.state, MessageState::Active);
    assert_eq!(one.holder.as_deref(), Some(id.as_str()));

    // SIGKILL: no goodbye. It must drop out within 30 s.
    child.kill9();
    let killed = Instant::now();
    loop {
        let gone = mq.workers().await.unwrap().is_empty();
        if gone {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "a SIGKILLed worker is still listed after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = killed.elapsed();
    eprintln!("the killed worker dropped out of the list after {took:?}");
    assert_eq!(mq.stats(topic).await.unwrap().workers, 0);

    // Its messages run again on another worker, which is listed while it runs.
    let done = Arc::new(Mutex::new(Vec::new()));
    let d = done.clone();
    let rescuer = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(3),
            move |msg: Message<Value>| {
                d.lock().unwrap().push(msg.id.to_string());
                async { Ok::<(), HandlerError>(()) }
            },
        )
        .recover_interval(Duration::from_millis(200))
        .name("rescuer")
        .build()
        .unwrap();
    let rescuer_id = rescuer.id().to_owned();
    let running = Running::start(rescuer);
    eventually("the 3 messages ran again", || async {
        done.lock().unwrap().len() == 3
    })
    .await;
    let listed = mq.workers().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, rescuer_id);
    assert_eq!(listed[0].name.as_deref(), Some("rescuer"));
    assert_eq!(mq.stats(topic).await.unwrap().recovered, 3);
    // A clean stop removes the entry at once, not after the heartbeat expires.
    running.stop().await;
    assert!(mq.workers().await.unwrap().is_empty());
    assert_eq!(mq.stats(topic).await.unwrap().workers, 0);
    invariants(&server, topic, &strings(&ids));
}

/// A worker that is shutting down says so (`draining`) while its handlers finish; the
/// heartbeat keeps the running count current, and a stopped worker is gone at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_says_so_until_it_is_gone() {
    let (server, mq) = setup().await;
    let topic = "report.build";
    let id = mq.publish(topic, json!({})).await.unwrap();
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new().concurrency(2),
            move |_msg: Message<Value>| {
                let r = r.clone();
                async move {
                    r.notified().await;
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .heartbeat_interval(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("listed with one running", || async {
        let w = mq.workers().await.unwrap();
        w.len() == 1 && w[0].in_flight() == 1 && w[0].state == WorkerState::Running
    })
    .await;
    let stop = tokio::spawn(running.stop());
    eventually("listed as draining", || async {
        let w = mq.workers().await.unwrap();
        w.len() == 1 && w[0].state == WorkerState::Draining
    })
    .await;
    release.notify_one();
    stop.await.unwrap();
    assert!(mq.workers().await.unwrap().is_empty());
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!((stats.processed, stats.workers), (1, 0), "{stats:?}");
    invariants(&server, topic, &[id.to_string()]);
}

/// Queue latency is the age of the message that has been ready longest, counted from when
/// it became ready: its publish, or when it went back to pending. The head of `pending` is
/// not always that message: a recovered message goes back to the head, ready only now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_latency_counts_from_when_a_message_became_ready() {
    let (server, mq) = setup().await;
    let topic = "order.cancel";
    let s = mq.stats(topic).await.unwrap();
    assert_eq!(
        (
            s.oldest_pending_age_ms,
            s.oldest_dead_age_ms,
            s.next_due_in_ms
        ),
        (None, None, None)
    );

    let first = mq.publish(topic, json!({"n": 1})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = mq.publish(topic, json!({"n": 2})).await.unwrap();
    let second_at = Instant::now();
    let later = mq
        .publish_with_delay(topic, json!({"n": 3}), Duration::from_secs(30))
        .await
        .unwrap();
    let s = mq.stats(topic).await.unwrap();
    let age = s.oldest_pending_age_ms.unwrap();
    assert!((400..10_000).contains(&age), "oldest pending age {age} ms");
    let due = s.next_due_in_ms.unwrap();
    // (Due times round up to the next whole ms: up to 1 ms over the delay.)
    assert!((20_000..=30_001).contains(&due), "next due in {due} ms");

    // Take the first and let its lease expire. A worker on the paused topic takes nothing
    // but its recoverer returns the first to the head of pending.
    let taken = mq
        .pop_messages_with_lease(topic, 1, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(taken[0].id(), &first);
    mq.pause(topic).await.unwrap();
    let idle = Worker::builder(mq.clone())
        .subscribe(topic, |_m: Message<Value>| async {
            Ok::<(), HandlerError>(())
        })
        .recover_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let running = Running::start(idle);
    eventually("the first is recovered", || async {
        mq.stats(topic).await.unwrap().recovered == 1
    })
    .await;
    running.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let head = mq.peek(topic, MessageState::Pending, 0..2).await.unwrap();
    assert_eq!(head[0].id, first, "recovered to the head");
    let s = mq.stats(topic).await.unwrap();
    let age = s.oldest_pending_age_ms.unwrap();
    let waited = second_at.elapsed().as_millis() as u64;
    // The latency is the second's wait since its publish, not the head's since recovery.
    assert!(
        age + 150 >= waited && age <= waited + 150,
        "latency {age} ms, the second has waited {waited} ms"
    );
    let first_ready = mq
        .message(topic, &first)
        .await
        .unwrap()
        .unwrap()
        .at
        .unwrap();
    let first_wait = SystemTime::now()
        .duration_since(first_ready)
        .unwrap_or_default();
    assert!(
        first_wait.as_millis() as u64 + 200 < age,
        "the head has been ready {first_wait:?}, less than the latency {age} ms"
    );
    mq.resume(topic).await.unwrap();
    invariants(&server, topic, &strings(&[&first, &second, &later]));
}

/// A delayed message counts its latency from its due time: due 500 ms ago, published 1.5 s
/// ago, it is 500 ms late, whether or not a fetch has moved it to pending yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_message_is_as_late_as_its_due_time_not_its_publish() {
    let (server, mq) = setup().await;
    let topic = "invoice.remind";
    let later = || PublishOptions::new().delay(Duration::from_millis(1000));
    let ids: Vec<MessageId> = mq
        .publish_batch_with(
            topic,
            [(json!({"n": 1}), later()), (json!({"n": 2}), later())],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.id().clone())
        .collect();
    let published = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = mq.stats(topic).await.unwrap();
    assert_eq!(
        (s.pending, s.delayed, s.next_due_in_ms),
        (0, 2, Some(0)),
        "{s:?}"
    );
    let age = s.oldest_pending_age_ms.unwrap();
    let since_publish = published.elapsed().as_millis() as u64;
    assert!(
        age >= 400 && age + 800 < since_publish,
        "due about 500 ms ago, published {since_publish} ms ago: latency {age} ms"
    );
    // A fetch moves both to pending and takes one; the other keeps its due time.
    let one = mq.pop_message(topic).await.unwrap().unwrap();
    let s = mq.stats(topic).await.unwrap();
    assert_eq!(
        (s.pending, s.delayed, s.next_due_in_ms),
        (1, 0, None),
        "{s:?}"
    );
    let age = s.oldest_pending_age_ms.unwrap();
    let since_publish = published.elapsed().as_millis() as u64;
    assert!(
        age >= 400 && age + 800 < since_publish,
        "latency {age} ms, published {since_publish} ms ago"
    );
    one.ack().await.unwrap();
    invariants(&server, topic, &strings(&ids));
}

/// One message by id in each of its states; an unknown id is `None`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_found_by_id_in_any_state() {
    let (server, mq) = setup().await;
    let topic = "search.sync";
    let pending = mq.publish(topic, json!({"k": "p"})).await.unwrap();
    let delayed = mq
        .publish_with_delay(topic, json!({"k": "d"}), Duration::from_secs(60))
        .await
        .unwrap();
    let m = mq.message(topic, &pending).await.unwrap().unwrap();
    assert_eq!(m.state, MessageState::Pending);
    assert_eq!(m.data, json!({"k": "p"}));
    // Published straight to pending: its readiness is counted in a run, not per id; the
    // envelope's timestamp says when it was published.
    assert_eq!(m.at, None);
    assert!(m.envelope["timestamp"].is_string(), "{:?}", m.envelope);
    assert_eq!((m.holder.as_ref(), m.started_at), (None, None));
    let m = mq.message(topic, &delayed).await.unwrap().unwrap();
    assert_eq!(m.state, MessageState::Delayed);
    let active = mq.pop_message(topic).await.unwrap().unwrap();
    let m = mq.message(topic, &pending).await.unwrap().unwrap();
    assert_eq!(m.state, MessageState::Active);
    let holder = m.holder.unwrap();
    assert!(holder.ends_with("-pop"), "{holder}");
    assert!(m.started_at.is_some());
    active.dead("bad data").await.unwrap();
    let m = mq.message(topic, &pending).await.unwrap().unwrap();
    assert_eq!(m.state, MessageState::Dead);
    assert_eq!(m.error.as_deref(), Some("bad data"));
    assert!(mq
        .message(topic, &MessageId::generate())
        .await
        .unwrap()
        .is_none());
    assert!(mq.message("bad topic!", &pending).await.is_err());
    invariants(&server, topic, &strings(&[&pending, &delayed]));
}

/// Dead letters found by their error text, then retried or deleted as a selection;
/// ids that are not dead letters are skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_filter_by_error_and_retry_or_delete_a_selection() {
    let (server, mq) = setup().await;
    let topic = "email.send";
    let ids = mq
        .publish_batch(topic, (0..6).map(|i| json!({"i": i})))
        .await
        .unwrap();
    let worker = Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new()
                .max_retry(0)
                .backoff(Backoff::fixed(Duration::from_millis(10))),
            |msg: Message<Value>| async move {
                let i = msg.data["i"].as_u64().unwrap();
                Err::<(), _>(if i.is_multiple_of(2) {
                    HandlerError::fatal(format!("SMTP 550 mailbox unavailable ({i})"))
                } else {
                    HandlerError::fatal(format!("template missing ({i})"))
                })
            },
        )
        .build()
        .unwrap();
    let running = Running::start(worker);
    eventually("all 6 dead", || async {
        mq.stats(topic).await.unwrap().dead == 6
    })
    .await;
    running.stop().await;
    let oldest = mq.stats(topic).await.unwrap().oldest_dead_age_ms.unwrap();
    assert!(oldest < 10_000, "{oldest}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let older = mq.stats(topic).await.unwrap().oldest_dead_age_ms.unwrap();
    assert!(older >= oldest + 300, "{oldest} then {older}");

    let smtp = mq
        .dead_letters_matching(topic, "smtp 550", 0..100)
        .await
        .unwrap();
    assert_eq!(smtp.len(), 3, "{smtp:?}");
    assert!(smtp
        .iter()
        .all(|d| d.error.as_deref().unwrap().contains("SMTP 550")));
    let page = mq.dead_letters_matching(topic, "smtp", 1..2).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, smtp[1].id);
    assert!(mq
        .dead_letters_matching(topic, "nothing like it", 0..100)
        .await
        .unwrap()
        .is_empty());

    // Retry the SMTP ones (plus an id that is not a dead letter): 3 moved.
    let mut selection: Vec<MessageId> = smtp.iter().map(|d| d.id.clone()).collect();
    selection.push(MessageId::generate());
    assert_eq!(
        mq.reprocess_dead_letters(topic, &selection).await.unwrap(),
        3
    );
    let s = mq.stats(topic).await.unwrap();
    assert_eq!((s.pending, s.dead), (3, 3), "{s:?}");
    // Again: nothing left to move.
    assert_eq!(
        mq.reprocess_dead_letters(topic, &selection).await.unwrap(),
        0
    );

    let templates: Vec<MessageId> = mq
        .dead_letters_matching(topic, "TEMPLATE", 0..100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(templates.len(), 3);
    assert_eq!(
        mq.delete_dead_letters(topic, &templates[..2])
            .await
            .unwrap(),
        2
    );
    let s = mq.stats(topic).await.unwrap();
    assert_eq!((s.pending, s.dead, s.dead_deleted), (3, 1, 2), "{s:?}");
    let left: Vec<String> = ids
        .iter()
        .filter(|id| !templates[..2].contains(id))
        .map(ToString::to_string)
        .collect();
    invariants(&server, topic, &left);
}
