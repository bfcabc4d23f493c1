//! The dashboard in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
//! installed by scripts/ensure-test-tools.sh) against a real `forgemq serve` and Redis:
//! dead letters shown, retried, filtered by error text and retried or deleted in bulk;
//! partitions; topics that nobody consumes highlighted; the Workers tab with what each
//! worker runs; a message found by id.
//!
//! Screenshots go to `FORGEMQ_SCREENSHOT_DIR` when it is set (to look at the page), else
//! next to the other temporary files of the tests.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use forgemq::{HandlerError, Message, PublishOptions, Subscription, TopicOptions, Worker};
use forgemq_test_support::{free_port, RedisServer};
use serde_json::{json, Value};

/// How long any condition on the page may take: several polls (every 2 s) on a busy machine.
const DEADLINE: Duration = Duration::from_secs(30);

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A headless Chromium showing the dashboard of a `forgemq serve` over `redis`.
struct Dashboard {
    c: fantoccini::Client,
    _server: Killed,
    _driver: Killed,
    _profile: tempfile::TempDir,
}

impl Dashboard {
    /// Starts `forgemq serve` (with `--token` when given) and a browser on its page, its
    /// viewport 1280x900.
    async fn open(redis: &RedisServer, token: Option<&str>) -> Self {
        let web = free_port();
        let mut serve = Command::new(env!("CARGO_BIN_EXE_forgemq"));
        serve
            .args(["serve", "--bind", &format!("127.0.0.1:{web}")])
            .env("REDIS_URL", redis.url())
            .env_remove("FORGEMQ_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(token) = token {
            serve.args(["--token", token]);
        }
        let server = Killed(serve.spawn().unwrap());
        let driver_port = free_port();
        let driver = Killed(
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
        // The window's size includes the browser's frame: grow it so the page gets 1280x900.
        let frame = c
            .execute("return window.outerHeight - window.innerHeight", vec![])
            .await
            .unwrap()
            .as_u64()
            .unwrap_or(0);
        c.set_window_size(1280, 900 + u32::try_from(frame).unwrap())
            .await
            .unwrap();
        c.goto(&format!("http://127.0.0.1:{web}/")).await.unwrap();
        Dashboard {
            c,
            _server: server,
            _driver: driver,
            _profile: profile,
        }
    }

    /// Polls the text of `css` until `want(text)` holds.
    async fn wait_text(&self, css: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut last = None;
        loop {
            if let Ok(e) = self.c.find(Locator::Css(css)).await {
                if let Ok(text) = e.text().await {
                    if want(&text) {
                        return text;
                    }
                    last = Some(text);
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {css}; last text: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls the `class` attribute of `css` until `want(classes)` holds.
    async fn wait_class(&self, css: &str, want: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(e) = self.c.find(Locator::Css(css)).await {
                if let Ok(Some(class)) = e.attr("class").await {
                    if want(&class) {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {css}'s class"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `css` matches exactly `n` elements.
    async fn wait_count(&self, css: &str, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let found = self.c.find_all(Locator::Css(css)).await.map(|v| v.len());
            if found.as_ref().ok() == Some(&n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} of {css}; found {found:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Clicks `css`, once it is there (tables are redrawn when their figures change, so a
    /// row found a moment ago may have been replaced: then it finds it again).
    async fn click(&self, css: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(e) = self.c.find(Locator::Css(css)).await {
                if e.click().await.is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "could not click {css}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Replaces the text of the input `css` with `text`.
    async fn type_into(&self, css: &str, text: &str) {
        let input = self.c.find(Locator::Css(css)).await.unwrap();
        input.clear().await.unwrap();
        if !text.is_empty() {
            input.send_keys(text).await.unwrap();
        }
    }

    /// Saves what the browser shows as `name`.
    async fn screenshot(&self, name: &str) {
        let png = self.c.screenshot().await.unwrap();
        assert!(png.len() > 1000, "screenshot is empty");
        let dir = std::env::var_os("FORGEMQ_SCREENSHOT_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").into());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), png).unwrap();
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

    let page = Dashboard::open(&redis, None).await;

    // The topics table, live from the API.
    page.wait_text("tr[data-topic='email.send'] td.dead", |t| t == "1")
        .await;
    page.wait_text("tr[data-topic='user.welcome'] td.pending", |t| t == "1")
        .await;

    // Open the topic: the dead letter with its error and data.
    page.click("tr[data-topic='email.send']").await;
    let row = format!("#dead-letters tr[data-id='{id}']");
    let text = page
        .wait_text(&row, |t| t.contains("550 mailbox unavailable"))
        .await;
    assert!(text.contains("ann@example.com"), "{text}");
    page.screenshot("dashboard-dead-letter.png").await;

    // Retry it: the dead count drops and the message is pending again.
    page.click(&format!("{row} button.retry")).await;
    page.wait_text("tr[data-topic='email.send'] td.dead", |t| t == "0")
        .await;
    page.wait_text("tr[data-topic='email.send'] td.pending", |t| t == "1")
        .await;
    page.screenshot("dashboard-after-retry.png").await;

    // The partitioned topic: one row in the table (the sums), marked with its count.
    page.wait_text("tr[data-topic='hot.orders'] td.pending", |t| t == "11")
        .await;
    page.wait_text("tr[data-topic='hot.orders'] td.dead", |t| t == "1")
        .await;
    page.wait_text("tr[data-topic='hot.orders'] .partitions", |t| {
        t == "4 partitions"
    })
    .await;
    // Its detail: the count and each partition's figures, as the library reads them.
    page.click("tr[data-topic='hot.orders']").await;
    page.wait_text("#detail-partitions", |t| t == "4 partitions")
        .await;
    let parts = mq.stats("hot.orders").await.unwrap().partitions;
    assert_eq!(parts.len(), 4);
    assert!(
        parts.iter().filter(|p| p.pending > 0).count() > 1,
        "the keys spread over more than one partition: {parts:?}"
    );
    for (i, p) in parts.iter().enumerate() {
        for (state, want) in [("pending", p.pending), ("dead", p.dead)] {
            let css = format!("#partitions tr[data-partition='{i}'] td.{state}");
            page.wait_text(&css, |t| t == want.to_string()).await;
        }
    }
    page.screenshot("dashboard-partitions.png").await;

    // A plain topic shows no breakdown.
    page.click("tr[data-topic='user.welcome']").await;
    page.wait_text("#detail-partitions", |t| t.starts_with("1 partition"))
        .await;
    assert!(!page
        .c
        .find(Locator::Css("#partitions"))
        .await
        .unwrap()
        .is_displayed()
        .await
        .unwrap());

    // A delivery whose holder stopped renewing it (a killed worker): once its lease
    // expires it goes back to the queue, and the table counts the recovery.
    page.wait_text("tr[data-topic='user.welcome'] td.recovered", |t| t == "0")
        .await;
    let taken = mq
        .pop_messages_with_lease("user.welcome", 1, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A manual fetch returns expired leases first (and takes the message again).
    let again = mq.pop_message("user.welcome").await.unwrap().unwrap();
    assert_eq!(again.id(), taken[0].id());
    page.wait_text("tr[data-topic='user.welcome'] td.recovered", |t| t == "1")
        .await;
    page.c.close().await.unwrap();

    let stats = mq.stats("email.send").await.unwrap();
    assert_eq!((stats.dead, stats.pending, stats.reprocessed), (0, 1, 1));
}

/// A topic with work and no worker is highlighted, one with a live worker is not; the
/// Workers tab lists the worker and the message its handler is running; a message is
/// found by id, and a missing one says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_workers_what_they_run_and_finds_messages() {
    let redis = RedisServer::start();
    let mq = forgemq::Client::connect(&redis.url()).await.unwrap();
    // Work that nobody consumes.
    let report = mq
        .publish("report.build", json!({"month": "2026-11"}))
        .await
        .unwrap();

    // A worker whose handlers hold each message until the test lets them go.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel::<String>();
    let handler_gate = Arc::clone(&gate);
    let worker = Worker::builder(mq.clone())
        .name("thumbnailer")
        // Short, so the registry shows its running handlers within a poll.
        .heartbeat_interval(Duration::from_millis(300))
        .subscribe_with(
            "image.resize",
            // No prefetch: two messages run, the third stays pending, in plain sight.
            Subscription::new().concurrency(2).prefetch(0),
            move |m: Message<Value>| {
                let gate = Arc::clone(&handler_gate);
                let started = started_tx.clone();
                async move {
                    m.progress(json!({"percent": 40})).await?;
                    let _ = started.send(m.id.to_string());
                    drop(gate.acquire().await.unwrap());
                    Ok::<_, HandlerError>(forgemq::Done(json!({"thumb": m.data["image"]})))
                }
            },
        )
        .build()
        .unwrap();
    let worker_id = worker.id().to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    for i in 0..3 {
        mq.publish("image.resize", json!({"image": i}))
            .await
            .unwrap();
    }
    let busy = started.recv().await.unwrap();

    let page = Dashboard::open(&redis, None).await;

    // Pending work without a worker: highlighted, with the reason in a tooltip.
    page.wait_class("tr[data-topic='report.build']", |c| {
        c.contains("no-workers")
    })
    .await;
    let mark = page
        .c
        .find(Locator::Css("tr[data-topic='report.build'] .warn-mark"))
        .await
        .unwrap();
    assert_eq!(
        mark.attr("title").await.unwrap().as_deref(),
        Some("no worker is consuming this topic")
    );
    page.wait_text("tr[data-topic='report.build'] td.workers", |t| t == "0")
        .await;
    // Its queue latency, in human units.
    page.wait_text("tr[data-topic='report.build'] td.latency", |t| {
        t.ends_with(" ms") || t.ends_with(" s")
    })
    .await;
    // The consumed topic: its worker and busy slots, and no highlight.
    page.wait_text("tr[data-topic='image.resize'] td.workers", |t| t == "1")
        .await;
    page.wait_text("tr[data-topic='image.resize'] td.in-flight", |t| {
        t == "2 / 2"
    })
    .await;
    page.wait_class("tr[data-topic='image.resize']", |c| {
        !c.contains("no-workers")
    })
    .await;
    // Sorting by a column: most workers first, then the other way round.
    page.click("#topics th[data-sort='workers']").await;
    page.wait_count("#topics tbody tr", 2).await;
    page.wait_text("#topics tbody tr:first-child td.name", |t| {
        t.starts_with("image.resize")
    })
    .await;
    page.click("#topics th[data-sort='workers']").await;
    page.wait_text("#topics tbody tr:first-child td.name", |t| {
        t.starts_with("report.build")
    })
    .await;
    page.wait_text("#total-active", |t| t == "2").await;
    page.screenshot("dashboard-overview.png").await;

    // The Workers tab: the worker, its topic with in-flight / concurrency, and the
    // message its handler is running.
    page.click("nav.tabs button[data-tab='workers']").await;
    page.wait_text("#workers-count", |t| t == "1").await;
    let text = page
        .wait_text(&format!("#workers tr[data-worker='{worker_id}']"), |t| {
            t.contains("image.resize 2 / 2")
        })
        .await;
    assert!(text.contains("thumbnailer"), "{text}");
    assert!(text.contains("running"), "{text}");
    let text = page
        .wait_text(&format!("#running tr[data-id='{busy}']"), |t| {
            t.contains("image.resize")
        })
        .await;
    assert!(text.contains("thumbnailer"), "{text}");
    page.wait_count("#running tbody tr", 2).await;
    page.screenshot("dashboard-workers.png").await;

    // From there to the message: active, held by the worker.
    page.click(&format!("#running tr[data-id='{busy}'] a.id"))
        .await;
    page.wait_text("#lookup-state", |t| t == "active").await;
    page.wait_text("#lookup-result tr[data-field='holder']", |t| {
        t.contains(&worker_id)
    })
    .await;
    // ...and how far its handler got.
    page.wait_text("#lookup-result tr[data-field='progress'] td", |t| {
        t == r#"{"percent":40}"#
    })
    .await;
    // By topic and id: the report, pending.
    page.type_into("#lookup-topic", "report.build").await;
    page.type_into("#lookup-id", report.as_str()).await;
    page.click("#lookup-form button").await;
    page.wait_text("#lookup-state", |t| t == "pending").await;
    let envelope = page
        .wait_text("#lookup-envelope", |t| t.contains("2026-11"))
        .await;
    assert!(envelope.contains(&report.to_string()), "{envelope}");
    page.screenshot("dashboard-lookup.png").await;
    // An id that is not there.
    page.type_into("#lookup-id", "no-such-message").await;
    page.click("#lookup-form button").await;
    page.wait_text("#lookup-result .not-found", |t| {
        t.contains("Not found") && t.contains("no-such-message")
    })
    .await;

    // Let the handlers finish: the rate goes up (it holds until the next poll, 2 s on),
    // the page counts them, then the worker leaves the registry.
    gate.add_permits(100);
    page.click("nav.tabs button[data-tab='overview']").await;
    page.wait_text("#rate-processed", |t| {
        t.parse::<f64>().is_ok_and(|r| r > 0.0)
    })
    .await;
    page.wait_text("tr[data-topic='image.resize'] td.processed", |t| t == "3")
        .await;
    // The finished message: done, with its result and last progress.
    page.click("nav.tabs button[data-tab='lookup']").await;
    page.type_into("#lookup-topic", "image.resize").await;
    page.type_into("#lookup-id", &busy).await;
    page.click("#lookup-form button").await;
    page.wait_text("#lookup-state", |t| t == "done").await;
    page.wait_text("#lookup-result tr[data-field='result'] td", |t| {
        t.starts_with(r#"{"thumb":"#)
    })
    .await;
    page.wait_text("#lookup-result tr[data-field='progress'] td", |t| {
        t == r#"{"percent":40}"#
    })
    .await;
    page.screenshot("dashboard-lookup-done.png").await;
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    page.wait_text("#workers-count", |t| t == "0").await;
    page.wait_class("tr[data-topic='image.resize']", |c| {
        !c.contains("no-workers")
    })
    .await;
    page.c.close().await.unwrap();
}

/// Behind a token: dead letters filtered by error text (any case, and shown as text, not
/// HTML), the filtered ones retried in bulk, then one deleted in bulk after a confirmation
/// that can be declined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_filters_dead_letters_and_retries_or_deletes_a_selection() {
    let redis = RedisServer::start();
    let mq = forgemq::Client::connect(&redis.url()).await.unwrap();
    let mut ids = Vec::new();
    for (to, error) in [
        ("ann@example.com", "550 mailbox unavailable"),
        ("bob@example.com", "421 try again later"),
        ("cat@example.com", "552 MAILBOX UNAVAILABLE: over quota"),
        ("dan@example.com", "connection <b>reset</b>"),
    ] {
        ids.push(mq.publish("mail.out", json!({"to": to})).await.unwrap());
        mq.pop_message("mail.out")
            .await
            .unwrap()
            .unwrap()
            .dead(error)
            .await
            .unwrap();
    }
    let [ann, bob, cat, dan] = [0, 1, 2, 3].map(|i| ids[i].to_string());

    let page = Dashboard::open(&redis, Some("s3cret-token")).await;
    // The page asks for the token, then shows the queues.
    page.wait_text("#status", |t| t.contains("token")).await;
    page.screenshot("dashboard-token.png").await;
    page.type_into("#token", "s3cret-token").await;
    page.click("#token-save").await;
    page.wait_text("tr[data-topic='mail.out'] td.dead", |t| t == "4")
        .await;
    page.wait_text("#total-dead", |t| t == "4").await;

    page.click("tr[data-topic='mail.out']").await;
    page.wait_count("#dead-letters tbody tr", 4).await;
    // An error text is shown as written, never as markup.
    page.wait_text(
        &format!("#dead-letters tr[data-id='{dan}'] td.error"),
        |t| t == "connection <b>reset</b>",
    )
    .await;

    // Filter by error text: the server matches it in any case.
    page.type_into("#dl-filter", "mailbox unavailable").await;
    page.wait_count("#dead-letters tbody tr", 2).await;
    page.wait_text(&format!("#dead-letters tr[data-id='{ann}']"), |_| true)
        .await;
    page.wait_text(&format!("#dead-letters tr[data-id='{cat}']"), |_| true)
        .await;
    page.wait_text("#dl-count", |t| t.starts_with("2 matching"))
        .await;
    page.click("#dl-select-all").await;
    page.wait_text("#retry-selected", |t| t == "Retry selected (2)")
        .await;
    page.screenshot("dashboard-dead-letters-filtered.png").await;

    // Retry the selection: those two are pending again, the others stay dead.
    page.click("#retry-selected").await;
    page.wait_text("tr[data-topic='mail.out'] td.dead", |t| t == "2")
        .await;
    page.wait_text("tr[data-topic='mail.out'] td.pending", |t| t == "2")
        .await;
    page.wait_count("#dead-letters tbody tr", 0).await;
    let stats = mq.stats("mail.out").await.unwrap();
    assert_eq!((stats.pending, stats.dead, stats.reprocessed), (2, 2, 2));

    // Without the filter, the two left; delete one, declining first.
    page.type_into("#dl-filter", "").await;
    page.wait_count("#dead-letters tbody tr", 2).await;
    page.click(&format!("#dead-letters input.pick[data-id='{bob}']"))
        .await;
    page.wait_text("#delete-selected", |t| t == "Delete selected (1)")
        .await;
    page.click("#delete-selected").await;
    let question = page.c.get_alert_text().await.unwrap();
    assert!(question.contains("Delete 1 dead letter"), "{question}");
    page.c.dismiss_alert().await.unwrap();
    page.click("#delete-selected").await;
    page.c.accept_alert().await.unwrap();
    page.wait_text("tr[data-topic='mail.out'] td.dead", |t| t == "1")
        .await;
    page.wait_count("#dead-letters tbody tr", 1).await;
    page.wait_text(&format!("#dead-letters tr[data-id='{dan}']"), |_| true)
        .await;

    // Looked up from the topic: dead, with its error as text.
    page.type_into("#detail-lookup-id", &dan).await;
    page.click("#detail-lookup button").await;
    page.wait_text("#lookup-state", |t| t == "dead").await;
    page.wait_text("#lookup-result tr[data-field='error'] td", |t| {
        t == "connection <b>reset</b>"
    })
    .await;
    page.c.close().await.unwrap();

    let stats = mq.stats("mail.out").await.unwrap();
    assert_eq!((stats.dead, stats.dead_deleted, stats.pending), (1, 1, 2));
}

/// The Schedules tab lists every schedule with its spec and next fire; serve's own
/// scheduler fires the every-1s one (its count grows on the page), and "Run now" publishes
/// the cron one's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_schedules_and_runs_one_now() {
    let redis = RedisServer::start();
    let mq = forgemq::Client::connect(&redis.url()).await.unwrap();
    mq.upsert_schedule(
        "nightly-report",
        forgemq::ScheduleSpec::cron("30 2 * * *")
            .tz("Asia/Shanghai")
            .topic("report.nightly")
            .data(json!({"kind": "sales"})),
    )
    .await
    .unwrap();
    mq.upsert_schedule(
        "tick",
        forgemq::ScheduleSpec::every(Duration::from_secs(1)).topic("ops.tick"),
    )
    .await
    .unwrap();
    let page = Dashboard::open(&redis, None).await;
    page.wait_text("#schedules-count", |t| t == "2").await;
    page.click("button[data-tab=schedules]").await;
    let spec = page
        .wait_text("tr[data-schedule=nightly-report] td.when", |t| {
            !t.is_empty()
        })
        .await;
    assert_eq!(spec, "cron 30 2 * * * (Asia/Shanghai)");
    page.wait_text("tr[data-schedule=nightly-report] td.next", |t| {
        t.starts_with("in ")
    })
    .await;
    page.wait_text("tr[data-schedule=tick] td.when", |t| t == "every 1.0 s")
        .await;
    // serve fires it: the count on the page grows.
    page.wait_text("tr[data-schedule=tick] td.fired", |t| {
        t.parse::<u64>().is_ok_and(|n| n >= 2)
    })
    .await;
    page.click("tr[data-schedule=nightly-report] button.run")
        .await;
    page.wait_text("tr[data-schedule=nightly-report] td.fired", |t| t == "1")
        .await;
    assert_eq!(mq.stats("report.nightly").await.unwrap().pending, 1);
    page.screenshot("dashboard-schedules.png").await;

    // A rate limit shows beside its topic's name and in its detail.
    mq.set_rate_limit(
        "ops.tick",
        "100/s".parse::<forgemq::RateLimit>().unwrap().burst(20),
    )
    .await
    .unwrap();
    page.click("button[data-tab=overview]").await;
    page.wait_text("tr[data-topic='ops.tick'] td.name .limit", |t| {
        t == "≤ 100/s"
    })
    .await;
    page.wait_text("tr[data-topic='report.nightly'] td.name", |t| {
        !t.contains('≤')
    })
    .await;
    page.click("tr[data-topic='ops.tick'] td.name").await;
    page.wait_text("#detail-limit", |t| t == "rate limit 100/s, burst 20")
        .await;
    page.screenshot("dashboard-rate-limit.png").await;
}

/// A topic's fair groups show in its detail, with their counts and settings; the pause
/// button pauses one group for every worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_fair_groups_and_pauses_one() {
    let redis = RedisServer::start();
    let mq = forgemq::Client::connect(&redis.url()).await.unwrap();
    let topic = "report.build";
    for (g, n) in [("acme", 40), ("globex", 3), ("initech", 7)] {
        let batch = (0..n).map(|i| (json!({"i": i}), PublishOptions::new().group(g)));
        mq.publish_batch_with(topic, batch).await.unwrap();
    }
    mq.set_group(
        topic,
        "acme",
        forgemq::GroupSettings::new().max_active(5).weight(2),
    )
    .await
    .unwrap();
    let page = Dashboard::open(&redis, None).await;
    page.click(&format!("tr[data-topic='{topic}'] td.name"))
        .await;
    page.wait_count("#groups tbody tr", 3).await;
    page.wait_text("#groups tr[data-group=acme] td.pending", |t| t == "40")
        .await;
    let row = page
        .wait_text("#groups tr[data-group=acme]", |t| !t.is_empty())
        .await;
    assert!(row.contains('5') && row.contains('2'), "{row}");
    page.click("#groups tr[data-group=globex] button.pause")
        .await;
    page.wait_text("#groups tr[data-group=globex] td.name", |t| {
        t == "globex (paused)"
    })
    .await;
    assert!(mq.group_settings(topic, "globex").await.unwrap().paused);
    // Peek lists grouped messages too (20 of the 50).
    page.wait_count("#peek tbody tr", 20).await;
    page.screenshot("dashboard-groups.png").await;
}
