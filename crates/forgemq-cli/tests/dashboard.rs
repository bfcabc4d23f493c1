//! The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
//! installed by scripts/ensure-test-tools.sh): a seeded dead letter is shown with its
//! error, the retry button requeues it, and the counts change on the page; a partitioned
//! topic shows its partition count and each partition's counts.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use forgemq::{PublishOptions, TopicOptions};
use forgemq_test_support::{free_port, RedisServer};
use serde_json::json;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls the text of `css` until `want(text)` holds.
async fn wait_text(c: &fantoccini::Client, css: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(text) = e.text().await {
                if want(&text) {
                    return text;
                }
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting for {css}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Loads the page with a seeded dead letter, sees it, clicks retry, sees the counts change;
/// opens a 4-partition topic and sees each partition's counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_dead_letters_retries_them_and_partitions() {
    let redis = RedisServer::start();
    let mq = forgemq::Client::connect(&redis.url()).await.unwrap();
    let id = mq
        .publish("email.send", json!({"to": "ann@example.com"}))
        .await
        .unwrap();
    mq.pop_message("email.send")
        .await
        .unwrap()
        .unwrap()
        .dead("550 mailbox unavailable")
        .await
        .unwrap();
    mq.publish("user.welcome", json!({"user_id": "1"}))
        .await
        .unwrap();
    // A topic over 4 partitions: 12 messages by customer, one of them dead.
    mq.create_topic("hot.orders", TopicOptions::new().partitions(4))
        .await
        .unwrap();
    for i in 0..12 {
        mq.publish_with(
            "hot.orders",
            json!({"order": i}),
            PublishOptions::new().partition_key(format!("customer-{i}")),
        )
        .await
        .unwrap();
    }
    mq.pop_message("hot.orders")
        .await
        .unwrap()
        .unwrap()
        .dead("card declined")
        .await
        .unwrap();

    let web = free_port();
    let _server = Killed(
        Command::new(env!("CARGO_BIN_EXE_forgemq"))
            .args(["serve", "--bind", &format!("127.0.0.1:{web}")])
            .env("REDIS_URL", redis.url())
            .env_remove("FORGEMQ_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let driver_port = free_port();
    let _driver = Killed(
        Command::new("chromedriver")
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is missing: run scripts/ensure-test-tools.sh (apt-get install chromium chromium-driver)"),
    );
    wait_for_port(web, "forgemq serve");
    wait_for_port(driver_port, "chromedriver");

    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display())]
        }),
    );
    // chromedriver listens on plain HTTP on localhost: no TLS needed.
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .unwrap();
    c.goto(&format!("http://127.0.0.1:{web}/")).await.unwrap();

    // The topics table, live from the API.
    wait_text(&c, "tr[data-topic='email.send'] td.dead", |t| t == "1").await;
    wait_text(&c, "tr[data-topic='user.welcome'] td.pending", |t| t == "1").await;

    // Open the topic: the dead letter with its error and data.
    c.find(Locator::Css("tr[data-topic='email.send']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let row = format!("#dead-letters tr[data-id='{id}']");
    let text = wait_text(&c, &row, |t| t.contains("550 mailbox unavailable")).await;
    assert!(text.contains("ann@example.com"), "{text}");

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(
        shots.join("dashboard-dead-letter.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();

    // Retry it: the dead count drops and the message is pending again.
    c.find(Locator::Css(&format!("{row} button.retry")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "tr[data-topic='email.send'] td.dead", |t| t == "0").await;
    wait_text(&c, "tr[data-topic='email.send'] td.pending", |t| t == "1").await;
    let png = c.screenshot().await.unwrap();
    assert!(png.len() > 1000, "screenshot is empty");
    std::fs::write(shots.join("dashboard-after-retry.png"), png).unwrap();

    // The partitioned topic: one row in the table (the sums), marked with its count.
    wait_text(&c, "tr[data-topic='hot.orders'] td.pending", |t| t == "11").await;
    wait_text(&c, "tr[data-topic='hot.orders'] td.dead", |t| t == "1").await;
    wait_text(&c, "tr[data-topic='hot.orders'] .partitions", |t| {
        t == "4 partitions"
    })
    .await;
    // Its detail: the count and each partition's figures, as the library reads them.
    c.find(Locator::Css("tr[data-topic='hot.orders']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "#detail-partitions", |t| t == "4 partitions").await;
    let parts = mq.stats("hot.orders").await.unwrap().partitions;
    assert_eq!(parts.len(), 4);
    assert!(
        parts.iter().filter(|p| p.pending > 0).count() > 1,
        "the keys spread over more than one partition: {parts:?}"
    );
    for (i, p) in parts.iter().enumerate() {
        for (state, want) in [("pending", p.pending), ("dead", p.dead)] {
            let css = format!("#partitions tr[data-partition='{i}'] td.{state}");
            wait_text(&c, &css, |t| t == want.to_string()).await;
        }
    }
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots.join("dashboard-partitions.png"), png).unwrap();

    // A plain topic shows no breakdown.
    c.find(Locator::Css("tr[data-topic='user.welcome']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(&c, "#detail-partitions", |t| t.starts_with("1 partition")).await;
    assert!(!c
        .find(Locator::Css("#partitions"))
        .await
        .unwrap()
        .is_displayed()
        .await
        .unwrap());
    c.close().await.unwrap();

    let stats = mq.stats("email.send").await.unwrap();
    assert_eq!((stats.dead, stats.pending, stats.reprocessed), (0, 1, 1));
}
