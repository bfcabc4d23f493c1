//! Peers in the same run (`--features peers`): the official Rust port of BullMQ
//! (`bullmq-official`) on the same private Redis, in the shapes of `publish-batch` and
//! `process-c50`, with the ratio to ForgeMQ's figure of the same run. Each peer queue is
//! obliterated afterwards.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bullmq::{BulkJob, Job, Queue, QueueOptions, Worker, WorkerOptions};

use crate::cases::payload;
use crate::report::{CaseReport, Figures};

/// Jobs per `add_bulk` call, as ForgeMQ's prefill sends per batch call.
const CHUNK: u64 = 1000;

fn connection(url: &str) -> bullmq::options::RedisConnectionOptions {
    bullmq::options::RedisConnectionOptions {
        url: url.to_owned(),
        ..Default::default()
    }
}

async fn queue(url: &str, prefix: &str) -> anyhow::Result<Queue> {
    let options = QueueOptions {
        connection: connection(url),
        prefix: prefix.to_owned(),
        ..Default::default()
    };
    Queue::with_options("bench", options)
        .await
        .context("BullMQ queue")
}

async fn add_all(queue: &Queue, n: u64) -> anyhow::Result<()> {
    for start in (0..n).step_by(CHUNK as usize) {
        let end = (start + CHUNK).min(n);
        let jobs = (start..end)
            .map(|i| BulkJob::new("job", payload(i)))
            .collect();
        queue.add_bulk(jobs).await?;
    }
    Ok(())
}

fn vs(figures: &mut Figures, done: &[CaseReport], case: &str, rate: f64) {
    if let Some(ours) = done
        .iter()
        .find(|c| c.case == case)
        .and_then(|r| r.median.get("msgs_per_sec"))
    {
        figures.insert("forgemq_vs_peer".into(), ours / rate);
    }
}

/// `publish-batch`'s shape: n jobs added in bulk calls of 1,000.
pub(crate) async fn publish_batch(
    url: &str,
    run: usize,
    n: u64,
    done: &[CaseReport],
) -> anyhow::Result<Figures> {
    let queue = queue(url, &format!("peerbatch{run}")).await?;
    let t0 = Instant::now();
    add_all(&queue, n).await?;
    let elapsed = t0.elapsed();
    let counts = queue.get_job_counts().await?;
    if counts.waiting < n {
        bail!("BullMQ holds {} of {n} jobs", counts.waiting);
    }
    queue.obliterate(true, 10_000).await?;
    queue.close().await;
    let rate = n as f64 / elapsed.as_secs_f64();
    let mut figures = Figures::from([("msgs_per_sec".into(), rate)]);
    vs(&mut figures, done, "publish-batch", rate);
    Ok(figures)
}

/// `process-c50`'s shape: n jobs waiting, one worker at concurrency 50 with a no-op
/// processor; completed jobs are removed (ForgeMQ keeps no body after an ack either).
pub(crate) async fn process_c50(
    url: &str,
    run: usize,
    n: u64,
    done: &[CaseReport],
) -> anyhow::Result<Figures> {
    let prefix = format!("peerproc{run}");
    let queue = queue(url, &prefix).await?;
    add_all(&queue, n).await?;
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    let options = WorkerOptions {
        connection: connection(url),
        prefix,
        concurrency: 50,
        remove_on_complete: Some(bullmq::types::RemoveOnFinish::Bool(true)),
        ..Default::default()
    };
    let t0 = Instant::now();
    let worker = Worker::with_options(
        "bench",
        move |_job: Job, _token| {
            c.fetch_add(1, Ordering::Relaxed);
            async { Ok(serde_json::Value::Null) }
        },
        options,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while count.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            bail!(
                "BullMQ processed {} of {n} in 600 s",
                count.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t0.elapsed();
    worker.close(5_000).await?;
    queue.obliterate(true, 10_000).await?;
    queue.close().await;
    let rate = n as f64 / elapsed.as_secs_f64();
    let mut figures = Figures::from([("msgs_per_sec".into(), rate)]);
    vs(&mut figures, done, "process-c50", rate);
    Ok(figures)
}
