//! Bad input gets a clear error and writes nothing.

use std::time::Duration;

use forgemq::{Client, Error, MessageId};
use forgemq_test_support::RedisServer;
use serde_json::json;

use crate::common::single_server_only;
use crate::common::{init_tracing, setup, TestRedis};

/// Keys in Redis (every master of a cluster).
fn dbsize(server: &TestRedis) -> u64 {
    match server {
        TestRedis::Single(s) => redis::cmd("DBSIZE").query(&mut s.conn()).unwrap(),
        TestRedis::Cluster(c) => c
            .nodes()
            .iter()
            .map(|n| redis::cmd("DBSIZE").query::<u64>(&mut n.conn()).unwrap())
            .sum(),
    }
}

/// Invalid topic names are refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_topic_names_are_refused_and_nothing_is_written() {
    let (server, mq) = setup().await;
    let long = "a".repeat(201);
    for bad in [
        "",
        "a b",
        "{user}.welcome",
        "user}",
        "订单",
        "a#1",
        "tab\tname",
        long.as_str(),
    ] {
        let err = mq.publish(bad, json!({})).await.unwrap_err();
        assert!(matches!(err, Error::InvalidTopic { .. }), "{bad:?}: {err}");
        assert!(err.is_invalid_input());
        assert!(err.to_string().contains("invalid topic name"), "{err}");
        assert!(mq.get_queue_length(bad).await.is_err());
    }
    assert_eq!(dbsize(&server), 0);
    // The allowed alphabet works as is.
    mq.publish("Order_2.payment-check:v1", json!({}))
        .await
        .unwrap();
}

/// A payload over the limit is refused with `PayloadTooLarge` and no Redis write, also
/// inside a batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_is_refused_without_any_redis_write() {
    init_tracing();
    let server = TestRedis::start();
    let mq = Client::builder(server.url())
        .max_payload(1024)
        .build()
        .await
        .unwrap();
    let before = server.command_stats();
    let err = mq
        .publish("file.process", json!({"blob": "x".repeat(2000)}))
        .await
        .unwrap_err();
    match &err {
        Error::PayloadTooLarge { size, limit } => assert!(*size > 2000 && *limit == 1024),
        other => panic!("expected PayloadTooLarge, got {other}"),
    }
    assert!(
        err.to_string().contains("max_payload"),
        "the message says what to change: {err}"
    );
    let batch = vec![json!({"ok": 1}), json!({"blob": "x".repeat(2000)})];
    assert!(matches!(
        mq.publish_batch("file.process", batch).await.unwrap_err(),
        Error::PayloadTooLarge { .. }
    ));
    let after = server.command_stats();
    for c in ["evalsha", "eval", "sadd", "hset"] {
        assert_eq!(after.get(c), before.get(c), "{c} was called");
    }
    assert_eq!(dbsize(&server), 0);
    // The default limit is 1 MiB.
    let default = Client::connect(&server.url()).await.unwrap();
    let big = json!({"blob": "x".repeat(1024 * 1024)});
    assert!(matches!(
        default.publish("file.process", big).await,
        Err(Error::PayloadTooLarge { .. })
    ));
}

/// With Redis unreachable, connecting and publishing fail loudly, never a silent Ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_an_error_not_a_silent_ok() {
    single_server_only!();
    init_tracing();
    let mut server = RedisServer::start();
    let url = server.url();
    let mq = Client::builder(&url)
        .response_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    server.kill9();
    let started = std::time::Instant::now();
    let err = mq
        .publish("user.welcome", json!({"user_id": "1"}))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let err = Client::connect(&url).await.unwrap_err();
    assert!(matches!(err, Error::Redis(_)), "{err}");
}

/// Unknown ids are `NotFound`; malformed ids are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprocess_of_an_unknown_id_is_not_found() {
    let (server, mq) = setup().await;
    let id = mq.publish("user.welcome", json!({})).await.unwrap();
    let err = mq
        .reprocess_dead_letter("user.welcome", &id)
        .await
        .unwrap_err();
    assert!(
        err.is_not_found(),
        "a pending message is not a dead letter: {err}"
    );
    let missing = MessageId::new("no-such-id").unwrap();
    assert!(mq
        .reprocess_dead_letter("user.welcome", &missing)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(matches!(
        MessageId::new("has space"),
        Err(Error::InvalidId { .. })
    ));
    assert_eq!(
        mq.stats("user.welcome").await.unwrap().pending,
        1,
        "nothing changed"
    );
    drop(server);
}

/// Data nested deeper than consumers can decode is refused at publish, nothing written;
/// the deepest accepted data round-trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_nested_too_deep_is_refused_at_publish() {
    let (server, mq) = setup().await;
    let nest = |n: usize| -> serde_json::Value {
        serde_json::from_str(&format!("{}{}", "[".repeat(n), "]".repeat(n))).unwrap()
    };
    let err = mq
        .publish("deep.topic", nest(forgemq::client::MAX_NESTING + 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidData(_)) && err.is_invalid_input(),
        "{err}"
    );
    assert_eq!(dbsize(&server), 0);
    let id = mq
        .publish("deep.topic", nest(forgemq::client::MAX_NESTING))
        .await
        .unwrap();
    let d = mq
        .pop_message("deep.topic")
        .await
        .unwrap()
        .expect("the deepest accepted data decodes");
    assert_eq!(d.id(), &id);
    assert_eq!(d.data(), &nest(forgemq::client::MAX_NESTING));
    d.ack().await.unwrap();
}

/// An integer beyond 64 bits (a u128 field) is refused at publish, not stored for every
/// consumer to dead-letter; strings that look like big numbers, and 64-bit extremes, pass.
/// Nesting is counted outside strings, so brackets in text do not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integers_beyond_64_bits_are_refused_at_publish_and_text_is_not_counted() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Transfer {
        cents: u128,
        memo: String,
    }
    let (server, mq) = setup().await;
    let err = mq
        .publish(
            "big.topic",
            Transfer {
                cents: u128::from(u64::MAX) + 1,
                memo: "x".into(),
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidData(_)) && err.to_string().contains("64 bits"),
        "{err}"
    );
    assert_eq!(dbsize(&server), 0);

    // A struct is published in its field order and decodes back as it was sent.
    let memo = format!("{}\"]\\{}", "[".repeat(150), "{".repeat(150));
    let sent = Transfer {
        cents: u128::from(u64::MAX),
        memo,
    };
    let id = mq.publish("big.topic", &sent).await.unwrap();
    mq.publish(
        "big.topic",
        json!({"min": i64::MIN, "s": "123456789012345678901234567890"}),
    )
    .await
    .unwrap();
    let stored = mq
        .peek("big.topic", forgemq::MessageState::Pending, 0..1)
        .await
        .unwrap();
    assert!(
        stored[0]
            .raw
            .contains(r#""data":{"cents":18446744073709551615,"memo":"#),
        "{}",
        stored[0].raw
    );
    let d = mq.pop_message("big.topic").await.unwrap().unwrap();
    assert_eq!(d.id(), &id);
    let back: Transfer = serde_json::from_value(d.data().clone()).unwrap();
    assert_eq!(back, sent);
    d.ack().await.unwrap();
    let d = mq.pop_message("big.topic").await.unwrap().unwrap();
    assert_eq!(d.data()["min"], i64::MIN);
    d.ack().await.unwrap();
}
