//! The four case studies against a private redis-server each, with time scaled down;
//! every test ends with the invariant checker on the topics it used.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use forgemq::{Client, Worker};
use forgemq_examples::{data_sync, file_processing, order_timeout, registration};
use forgemq_test_support::{
    assert_none_lost, check_invariants, eventually, Layout, RedisServer, State,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts `worker` in the background; the sender stops it.
fn run(
    worker: Worker,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<forgemq::Result<()>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    (stop, task)
}

/// Every message of `topic` in exactly one state; `done` are the ids the test knows were
/// handled, the only ones allowed to be gone. Returns the report.
fn invariants(
    redis: &RedisServer,
    topic: &str,
    ids: &[String],
    done: &HashSet<String>,
) -> forgemq_test_support::StateReport {
    let report = check_invariants(&mut redis.conn(), &Layout::new("mq", topic), ids);
    assert_none_lost(&report, done);
    report
}

/// Ids of everything in a topic right now plus what was acknowledged, from Redis's own
/// view: pending, delayed, active and dead ids, for the invariant check.
async fn all_ids(mq: &Client, topic: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for state in [
        forgemq::MessageState::Pending,
        forgemq::MessageState::Delayed,
        forgemq::MessageState::Active,
        forgemq::MessageState::Dead,
    ] {
        for m in mq.peek(topic, state, 0..1000).await.unwrap() {
            ids.push(m.id.to_string());
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_timeout_cancels_unpaid_orders_and_paying_cancels_the_checks() {
    let redis = RedisServer::start();
    let mq = Client::connect(&redis.url()).await.unwrap();
    let minute = Duration::from_millis(20); // the check fires after 600 ms
    let shop = order_timeout::Shop::new(mq.clone(), minute);
    shop.add_stock("SKU", 10);
    let (stop, task) = run(shop.subscribe(Worker::builder(mq.clone())).build().unwrap());

    let t0 = Instant::now();
    let paid = shop.create_order("u1", "SKU", 2, 299.99).await.unwrap();
    let unpaid = shop.create_order("u2", "SKU", 3, 10.0).await.unwrap();
    let bounced = shop.create_order("u3", "SKU", 1, 5.0).await.unwrap();
    assert_eq!(shop.stock("SKU"), 4);
    shop.pay(&paid).await.unwrap();
    // Paid, then the payment bounces (the bank says so twice): one new check, under the
    // unique key its cancelled first check released.
    shop.pay(&bounced).await.unwrap();
    assert!(
        shop.reopen(&bounced).await.unwrap(),
        "a new check is scheduled"
    );
    assert!(
        !shop.reopen(&bounced).await.unwrap(),
        "the second notice schedules no second check"
    );
    // The seed's reminder, without a user_id.
    let seed_reminder = mq
        .publish(
            order_timeout::REMINDER,
            json!({"order_id": unpaid, "type": "payment"}),
        )
        .await
        .unwrap();

    eventually(
        "the unpaid order is cancelled",
        Duration::from_secs(20),
        || async {
            shop.order(&unpaid).map(|o| o.status) == Some(order_timeout::Status::Cancelled)
        },
    )
    .await;
    // Not before its 30 "minutes".
    assert!(
        t0.elapsed() >= minute * 30,
        "cancelled after {:?}",
        t0.elapsed()
    );
    eventually(
        "the bounced order is cancelled by its second check",
        Duration::from_secs(20),
        || async {
            shop.order(&bounced).map(|o| o.status) == Some(order_timeout::Status::Cancelled)
        },
    )
    .await;
    assert_eq!(
        shop.stock("SKU"),
        8,
        "the unpaid order's 3 and the bounced one's 1 are back"
    );
    assert_eq!(
        shop.order(&paid).unwrap().status,
        order_timeout::Status::Paid
    );
    eventually(
        "order.created handled three times",
        Duration::from_secs(10),
        || async { mq.stats(order_timeout::CREATED).await.unwrap().processed == 3 },
    )
    .await;
    eventually(
        "the seed's reminder acknowledged",
        Duration::from_secs(10),
        || async { mq.stats(order_timeout::REMINDER).await.unwrap().processed == 1 },
    )
    .await;
    let log = shop.log().join("\n");
    assert!(log.contains("without a user_id"), "{log}");
    // The paid order's check and reminder never ran: cancelled while delayed, as were the
    // cancelled order's reminder.
    let check = mq.stats(order_timeout::PAYMENT_CHECK).await.unwrap();
    assert_eq!((check.cancelled, check.processed, check.dead), (2, 2, 0));
    let reminder = mq.stats(order_timeout::REMINDER).await.unwrap();
    assert_eq!(
        (reminder.cancelled, reminder.dead, reminder.delayed),
        (3, 0, 0)
    );
    assert!(!log.contains(&format!("{paid}: payment check")), "{log}");

    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let o = |id: &str| shop.order(id).unwrap();
    let reminder_ids = vec![
        o(&paid).reminder.to_string(),
        o(&unpaid).reminder.to_string(),
        o(&bounced).reminder.to_string(),
        seed_reminder.to_string(),
    ];
    let r = invariants(
        &redis,
        order_timeout::REMINDER,
        &reminder_ids,
        &reminder_ids.iter().cloned().collect(),
    );
    assert_eq!(r.count(State::Gone), 4);
    let check_ids = vec![
        o(&paid).check.to_string(),
        o(&unpaid).check.to_string(),
        o(&bounced).check.to_string(),
    ];
    let r = invariants(
        &redis,
        order_timeout::PAYMENT_CHECK,
        &check_ids,
        &check_ids.iter().cloned().collect(),
    );
    assert_eq!(r.count(State::Gone), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_processing_branches_by_type_and_dead_letters_a_failing_transcode() {
    let redis = RedisServer::start();
    let mq = Client::connect(&redis.url()).await.unwrap();
    let files = file_processing::Files::new(mq.clone(), Duration::from_millis(50));
    let (stop, task) = run(files
        .subscribe(Worker::builder(mq.clone()))
        .build()
        .unwrap());
    let mut ids = Vec::new();
    for (file, path, kind) in [
        ("img", "/u/cat.png", "image"),
        ("vid", "/u/talk.mp4", "video"),
        ("doc", "/u/notes.pdf", "document"),
        ("bad", "/u/corrupt.mp4", "video"),
    ] {
        ids.push(files.upload(file, path, kind).await.unwrap().to_string());
    }
    eventually("one dead letter", Duration::from_secs(20), || async {
        mq.stats(file_processing::TOPIC).await.unwrap().dead == 1
    })
    .await;
    eventually("three processed", Duration::from_secs(20), || async {
        mq.stats(file_processing::TOPIC).await.unwrap().processed == 3
    })
    .await;
    let rec = |id: &str| files.record(id).unwrap();
    assert_eq!(rec("img").status, "processed");
    assert_eq!(rec("img").steps, ["thumbnail", "compress"]);
    assert_eq!(rec("vid").steps, ["transcode", "preview"]);
    assert_eq!(rec("doc").status, "processed");
    assert!(rec("doc").steps.is_empty());
    assert_eq!(rec("bad").status, "failed");
    assert_eq!(rec("bad").attempts, file_processing::MAX_RETRY + 1);
    let dead = mq
        .get_dead_letters(file_processing::TOPIC, 0..10)
        .await
        .unwrap();
    assert!(
        dead[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("transcode of /u/corrupt.mp4"),
        "{:?}",
        dead[0].error
    );
    let s = mq.stats(file_processing::TOPIC).await.unwrap();
    assert_eq!((s.retried, s.failed), (2, 3));
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    // The three good files are gone (processed), the corrupt one is dead.
    let done: HashSet<String> = ids[..3].iter().cloned().collect();
    let r = invariants(&redis, file_processing::TOPIC, &ids, &done);
    assert_eq!(r.dead, vec![ids[3].clone()]);
    assert_eq!(r.count(State::Gone), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_sync_keeps_nested_data_ignores_unknown_actions_and_syncs_a_change_once() {
    let redis = RedisServer::start();
    let mq = Client::connect(&redis.url()).await.unwrap();
    let sync = data_sync::UserSync::new(mq.clone());
    let (stop, task) = run(sync.subscribe(Worker::builder(mq.clone())).build().unwrap());
    let data = json!({"name": "John", "address": {"city": "Hangzhou", "geo": [30.27, 120.15]}, "tags": [], "vip": true, "n": 12345678901234_i64});
    assert!(sync.update_user("u1", "c1", data.clone()).await.unwrap());
    // The same change again, while it may still be pending: recognised, not stored twice.
    assert!(!sync.update_user("u1", "c1", data.clone()).await.unwrap());
    assert!(sync
        .publish("u1", "c2", "archive", json!({"why": "test"}))
        .await
        .unwrap());
    eventually("both handled", Duration::from_secs(20), || async {
        mq.stats(data_sync::TOPIC).await.unwrap().processed == 2
    })
    .await;
    // And again after it was processed: the ledger recognises it.
    assert!(!sync.update_user("u1", "c1", data.clone()).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sinks = sync.sinks();
    assert_eq!(sinks.cache["u1"], data);
    assert_eq!(sinks.search["u1"], data);
    assert_eq!(sinks.warehouse, vec![("u1".to_owned(), data.clone())]);
    assert_eq!(sinks.syncs["u1"], 1);
    assert_eq!(sinks.ignored, ["archive"]);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let ids: Vec<String> = ["user.sync:u1:c1", "user.sync:u1:c2"]
        .map(String::from)
        .to_vec();
    let r = invariants(
        &redis,
        data_sync::TOPIC,
        &ids,
        &ids.iter().cloned().collect(),
    );
    assert_eq!(r.count(State::Gone), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_welcomes_then_sends_the_gift_an_hour_later() {
    let redis = RedisServer::start();
    let mq = Client::connect(&redis.url()).await.unwrap();
    let hour = Duration::from_millis(600);
    let reg = registration::Registration::new(mq.clone(), hour);
    let (stop, task) = run(reg.subscribe(Worker::builder(mq.clone())).build().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = reg.router();
    tokio::spawn(async move { axum::serve(listener, router).await });

    let (status, body) = post(
        port,
        "/register",
        r#"{"username":"john","email":"john@example.com"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let user: serde_json::Value = serde_json::from_str(&body).unwrap();
    let user_id = user["user_id"].as_str().unwrap().to_owned();
    let (status, _) = post(port, "/register", r#"{"username":"","email":"x"}"#).await;
    assert_eq!(status, 400);
    let (status, _) = post(port, "/register", "not json").await;
    assert_eq!(status, 400);

    eventually("the gift", Duration::from_secs(20), || async {
        reg.events().iter().any(|e| e.what == "welcome gift sent")
    })
    .await;
    let events = reg.events();
    let whats: Vec<&str> = events
        .iter()
        .filter(|e| e.user_id == user_id)
        .map(|e| e.what.as_str())
        .collect();
    assert!(
        whats[0].starts_with("welcome email sent to john"),
        "{whats:?}"
    );
    assert_eq!(
        &whats[1..],
        [
            "preferences created",
            "added to the new-users group",
            "welcome gift scheduled in 1 hour",
            "welcome gift sent"
        ]
    );
    // Noted right before the delayed publish (the "scheduled" note comes after it returns).
    let scheduled = events
        .iter()
        .find(|e| e.what == "added to the new-users group")
        .unwrap()
        .at;
    let sent = events
        .iter()
        .find(|e| e.what == "welcome gift sent")
        .unwrap()
        .at;
    assert!(
        sent - scheduled >= hour,
        "gift after {:?}",
        sent - scheduled
    );
    // Only one user registered: the bad requests published nothing.
    assert_eq!(
        mq.stats(registration::REGISTERED).await.unwrap().published,
        1
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    for topic in [registration::REGISTERED, registration::GIFT] {
        let ids = all_ids(&mq, topic).await;
        assert!(ids.is_empty(), "{topic}: {ids:?} left");
        // No body left behind without a state, nothing in a state unaccounted for.
        invariants(&redis, topic, &ids, &HashSet::new());
        let s = mq.stats(topic).await.unwrap();
        assert_eq!((s.published, s.processed), (1, 1), "{topic}");
    }
}

/// A minimal HTTP/1.1 POST; the status and the body.
async fn post(port: u16, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, rest.to_owned())
}
