//! Schedules: cron and every-N messages, fired by any number of schedulers with exactly
//! one message per fire time.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use forgemq::{Client, MessageState, Missed, PublishOptions, ScheduleSpec, Subscription};
use rand::Rng;
use serde_json::json;

use crate::common::child::ChildProc;
use crate::common::{eventually, setup, single_server_only};
use forgemq_test_support::{RedisOptions, RedisServer};

fn ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The fire times (ms) of the pending messages of `schedule`, in list order.
async fn fire_times(mq: &Client, topic: &str, schedule: &str) -> Vec<i64> {
    let prefix = format!("schedule:{schedule}:");
    mq.peek(topic, MessageState::Pending, 0..100_000)
        .await
        .unwrap()
        .iter()
        .map(|m| {
            m.id.as_str()
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("unexpected id {}", m.id))
                .parse()
                .unwrap()
        })
        .collect()
}

/// Create, read, change, run now, remove; an unchanged spec keeps its next fire time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_stored_listed_changed_and_removed() {
    let (_server, mq) = setup().await;
    let spec = || {
        ScheduleSpec::cron("0 3 * * *")
            .tz("Asia/Shanghai")
            .topic("report.nightly")
            .data(json!({"kind": "sales"}))
    };
    let first = mq.upsert_schedule("nightly", spec()).await.unwrap();
    assert_eq!(first.topic, "report.nightly");
    assert_eq!(first.cron.as_deref(), Some("0 3 * * *"));
    assert_eq!(first.tz, "Asia/Shanghai");
    assert_eq!(first.missed, Missed::Once);
    assert_eq!(first.fired, 0);
    assert_eq!(first.last_fire, None);
    let next = first.next_fire.unwrap();
    // 03:00 in Shanghai is 19:00 UTC, within the next day.
    assert_eq!(ms(next) % 86_400_000, 19 * 3_600_000);
    assert!(next > SystemTime::now() && next < SystemTime::now() + Duration::from_secs(86_400));

    // The same spec again: nothing changes.
    let again = mq.upsert_schedule("nightly", spec()).await.unwrap();
    assert_eq!(again, first);
    // Another spec: the next fire time is computed again.
    let hourly = mq
        .upsert_schedule("nightly", spec().missed(Missed::CatchUp(3)))
        .await
        .unwrap();
    assert_eq!(hourly.missed, Missed::CatchUp(3));
    let every = mq
        .upsert_schedule(
            "ping",
            ScheduleSpec::every(Duration::from_secs(3600)).topic("ops.ping"),
        )
        .await
        .unwrap();
    assert_eq!(every.every_ms, Some(3_600_000));
    let until = ms(every.next_fire.unwrap()) - ms(SystemTime::now());
    assert!((3_590_000..=3_600_500).contains(&until), "{until}");

    let names: Vec<String> = mq
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["nightly", "ping"]);

    // Run now: one message with the time in its id; the regular time stays.
    let id = mq.run_schedule_now("nightly").await.unwrap();
    assert!(id.as_str().starts_with("schedule:nightly:"), "{id}");
    let msg = mq.message("report.nightly", &id).await.unwrap().unwrap();
    assert_eq!(msg.data, json!({"kind": "sales"}));
    let after = mq.schedule("nightly").await.unwrap().unwrap();
    assert_eq!(after.next_fire, hourly.next_fire);
    assert_eq!(after.fired, 1);

    // Moving a schedule to another topic leaves nothing behind in the old one.
    mq.upsert_schedule(
        "ping",
        ScheduleSpec::every(Duration::from_secs(60)).topic("ops.ping2"),
    )
    .await
    .unwrap();
    assert_eq!(
        mq.schedule("ping").await.unwrap().unwrap().topic,
        "ops.ping2"
    );
    assert!(mq.remove_schedule("ping").await.unwrap());
    assert!(!mq.remove_schedule("ping").await.unwrap());
    assert!(mq.schedule("ping").await.unwrap().is_none());
    assert!(mq.run_schedule_now("ping").await.is_err());

    // Bad input changes nothing.
    for bad in [
        ScheduleSpec::cron("61 * * * *").topic("t"),
        ScheduleSpec::cron("* * * * *")
            .tz("Nowhere/Special")
            .topic("t"),
        ScheduleSpec::cron("* * * * *")
            .topic("t")
            .data(json!("x".repeat(2 << 20))),
    ] {
        assert!(mq.upsert_schedule("bad", bad).await.is_err());
    }
    assert!(mq
        .upsert_schedule(
            "has space",
            ScheduleSpec::every(Duration::from_secs(1)).topic("t")
        )
        .await
        .is_err());
    let names: Vec<String> = mq
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["nightly"]);
}

/// A worker runs a scheduler by default: a 1 s schedule gives one message a second, with
/// its options, and the worker consumes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_fire_schedules_and_consume_them() {
    let (_server, mq) = setup().await;
    let topic = "ops.tick";
    mq.upsert_schedule(
        "tick",
        ScheduleSpec::every(Duration::from_secs(1))
            .topic(topic)
            .data(json!({"n": 1}))
            .options(PublishOptions::new().max_retry(7)),
    )
    .await
    .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let worker = forgemq::Worker::builder(mq.clone())
        .subscribe_with(
            topic,
            Subscription::new(),
            move |msg: forgemq::Message<serde_json::Value>| {
                let s = s.clone();
                async move {
                    s.lock()
                        .unwrap()
                        .push((msg.id.to_string(), msg.data.clone()));
                    Ok::<(), forgemq::HandlerError>(())
                }
            },
        )
        .build()
        .unwrap();
    let running = crate::common::Running::start(worker);
    eventually("3 fires consumed", || async {
        seen.lock().unwrap().len() >= 3
    })
    .await;
    running.stop().await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|(_, d)| d == &json!({"n": 1})));
    let times: Vec<i64> = seen
        .iter()
        .map(|(id, _)| id.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 1000, "{times:?}");
    }
    let s = mq.schedule("tick").await.unwrap().unwrap();
    assert!(s.fired >= 3);
    // A worker told not to schedule does not.
    mq.remove_schedule("tick").await.unwrap();
    mq.upsert_schedule(
        "quiet",
        ScheduleSpec::every(Duration::from_secs(1)).topic("ops.quiet"),
    )
    .await
    .unwrap();
    let worker = forgemq::Worker::builder(mq.clone())
        .scheduler(false)
        .subscribe(
            "ops.other",
            |_msg: forgemq::Message<serde_json::Value>| async {
                Ok::<(), forgemq::HandlerError>(())
            },
        )
        .build()
        .unwrap();
    let running = crate::common::Running::start(worker);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    running.stop().await;
    assert_eq!(mq.stats("ops.quiet").await.unwrap().published, 0);
    assert_eq!(mq.schedule("quiet").await.unwrap().unwrap().fired, 0);
}

/// Five scheduler processes on a 1 s schedule for 30 s, some killed with SIGKILL and
/// replaced meanwhile: exactly one message per second, the ids consecutive, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_schedulers_killed_at_random_fire_each_second_exactly_once() {
    let (server, mq) = setup().await;
    let topic = "ops.every-second";
    let schedule = mq
        .upsert_schedule(
            "every-second",
            ScheduleSpec::every(Duration::from_secs(1)).topic(topic),
        )
        .await
        .unwrap();
    let first = ms(schedule.next_fire.unwrap());
    let url = server.url();
    let mut children: Vec<ChildProc> = (0..5)
        .map(|_| ChildProc::spawn("scheduler", &url, topic))
        .collect();
    let start = Instant::now();
    let mut kills = 0;
    while start.elapsed() < Duration::from_secs(30) {
        let pause = rand::rng().random_range(500..2500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let victim = rand::rng().random_range(0..children.len());
        children[victim].kill9();
        kills += 1;
        children[victim] = ChildProc::spawn("scheduler", &url, topic);
    }
    // Every fire time up to now has come; let the survivors fire the last one.
    let end = ms(SystemTime::now());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(children);
    let times = fire_times(&mq, topic, "every-second").await;
    let distinct: HashSet<i64> = times.iter().copied().collect();
    assert_eq!(distinct.len(), times.len(), "a fire time twice: {times:?}");
    let mut sorted = times.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted.first(),
        Some(&first),
        "the first fire is missing: {sorted:?}"
    );
    for pair in sorted.windows(2) {
        assert_eq!(pair[1] - pair[0], 1000, "a fire is missing: {sorted:?}");
    }
    let last = *sorted.last().unwrap();
    assert!(last >= end - 1000, "fires stopped at {last}, end {end}");
    let stats = mq.stats(topic).await.unwrap();
    assert_eq!(stats.published, times.len() as u64);
    assert!(kills >= 10, "{kills} kills");
    eprintln!("{} fires, {kills} schedulers killed", times.len());
}

/// Missed fires: with everything down for a while, `once` publishes one message for all
/// of them, `skip` none, `catch-up:N` the N oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_fires_follow_each_policy() {
    let (_server, mq) = setup().await;
    for (name, missed) in [
        ("once", Missed::Once),
        ("skip", Missed::Skip),
        ("catch", Missed::CatchUp(2)),
    ] {
        mq.upsert_schedule(
            name,
            ScheduleSpec::every(Duration::from_secs(1))
                .topic(format!("missed.{name}"))
                .missed(missed),
        )
        .await
        .unwrap();
    }
    // No scheduler for 4.5 s: 4 fire times pass.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let before: Vec<i64> = {
        let mut v = Vec::new();
        for name in ["once", "skip", "catch"] {
            v.push(ms(mq
                .schedule(name)
                .await
                .unwrap()
                .unwrap()
                .next_fire
                .unwrap()));
        }
        v
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = {
        let mq = mq.clone();
        tokio::spawn(async move {
            mq.run_scheduler(async {
                let _ = stopped.await;
            })
            .await
        })
    };
    eventually("each schedule caught up", || async {
        let mut ok = true;
        for (name, at) in ["once", "skip", "catch"].iter().zip(&before) {
            let s = mq.schedule(name).await.unwrap().unwrap();
            ok &= ms(s.next_fire.unwrap()) > at + 3000;
        }
        ok
    })
    .await;
    let _ = stop.send(());
    scheduler.await.unwrap();
    // Regular fires may follow the catch-up before the scheduler stops, a second apart.
    let regular = |times: &[i64]| times.windows(2).all(|p| p[1] - p[0] == 1000);
    let once = fire_times(&mq, "missed.once", "once").await;
    assert!(
        once[0] >= before[0] + 3000 && regular(&once),
        "once fires only the latest missed time: {once:?}, first missed {}",
        before[0]
    );
    let skip = fire_times(&mq, "missed.skip", "skip").await;
    assert!(
        skip.iter().all(|&t| t >= before[1] + 4000) && regular(&skip),
        "skip fires none of the missed times: {skip:?}, first missed {}",
        before[1]
    );
    let catch = fire_times(&mq, "missed.catch", "catch").await;
    assert_eq!(catch[..2], [before[2], before[2] + 1000], "{catch:?}");
    assert!(
        catch[2..].iter().all(|&t| t >= before[2] + 4000) && regular(&catch[2..]),
        "catch-up:2 fires the 2 oldest, then the regular times: {catch:?}"
    );
}

/// A `redis-server` that runs under libfaketime: `$FORGEMQ_FAKETIME_REDIS`, else the
/// suite's own when it uses libc malloc. Debian's build uses jemalloc, whose start-up
/// calls `clock_gettime` before libfaketime is ready, and it hangs; scripts/test.sh sets
/// `FORGEMQ_FAKETIME_REDIS` to the Redis 6.2 of scripts/redis62.sh (libc malloc).
fn faketime_redis() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("FORGEMQ_FAKETIME_REDIS").filter(|p| !p.is_empty()) {
        return Some(path.into());
    }
    let binary = forgemq_test_support::redis_server_binary();
    let version = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&version.stdout)
        .contains("malloc=libc")
        .then_some(binary)
}

/// Starts a redis-server whose clock starts at `at` (UTC), through libfaketime.
fn redis_at(binary: &std::path::Path, at: &str) -> RedisServer {
    let lib = crate::chaos::libfaketime().expect(
        "libfaketime is not installed: run scripts/ensure-test-tools.sh (apt-get install faketime)",
    );
    RedisServer::start_with(
        RedisOptions::new()
            .binary(binary)
            .env("LD_PRELOAD", lib)
            .env("FAKETIME", format!("@{at}"))
            .env("TZ", "UTC"),
    )
}

/// Daylight saving, on Redis's clock (the server runs at a faked time): in New York a
/// daily 01:30 fires once on the night 01:30 happens twice, and a daily 02:30 fires when
/// the skipped hour ends on the night it does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daylight_saving_on_redis_clock() {
    single_server_only!();
    let Some(binary) = faketime_redis() else {
        eprintln!(
            "SKIPPED: no redis-server that runs under libfaketime (a jemalloc build hangs); \
             set FORGEMQ_FAKETIME_REDIS=$(scripts/redis62.sh), as scripts/test.sh does"
        );
        return;
    };
    for (start, pattern, fire, next) in [
        // Falls back at 06:00 UTC: 01:30 EDT (05:30 UTC), then not 01:30 EST (06:30).
        (
            "2026-11-01 05:29:57",
            "30 1 * * *",
            "2026-11-01T05:30:00Z",
            "2026-11-02T06:30:00Z",
        ),
        // Springs forward at 07:00 UTC: 02:30 does not exist; it fires at 03:00 EDT.
        (
            "2026-03-08 06:59:57",
            "30 2 * * *",
            "2026-03-08T07:00:00Z",
            "2026-03-09T06:30:00Z",
        ),
    ] {
        let server = redis_at(&binary, start);
        let mq = Client::connect(&server.url()).await.unwrap();
        let at = |s: &str| chrono_ms(s);
        let s = mq
            .upsert_schedule(
                "nightly",
                ScheduleSpec::cron(pattern)
                    .tz("America/New_York")
                    .topic("dst"),
            )
            .await
            .unwrap();
        assert_eq!(ms(s.next_fire.unwrap()), at(fire), "{start}");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let scheduler = {
            let mq = mq.clone();
            tokio::spawn(async move {
                mq.run_scheduler(async {
                    let _ = stopped.await;
                })
                .await
            })
        };
        eventually("the fire", || async {
            mq.schedule("nightly").await.unwrap().unwrap().fired == 1
        })
        .await;
        let _ = stop.send(());
        scheduler.await.unwrap();
        assert_eq!(
            fire_times(&mq, "dst", "nightly").await,
            [at(fire)],
            "{start}"
        );
        let s = mq.schedule("nightly").await.unwrap().unwrap();
        assert_eq!(ms(s.next_fire.unwrap()), at(next), "{start}");
        assert_eq!(ms(s.last_fire.unwrap()), at(fire), "{start}");
    }
}

fn chrono_ms(rfc3339: &str) -> i64 {
    let t = humantime::parse_rfc3339(rfc3339).unwrap();
    ms(t)
}
