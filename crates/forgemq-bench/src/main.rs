//! `forgemq-bench`: throughput, latency and timing precision of ForgeMQ on a real Redis.
//!
//! It starts its own `redis-server` (no persistence, on a free port) unless `--redis URL`
//! is given, runs each case `--runs` times, prints one JSON line per case on stdout (the
//! median, range and every run) and then a summary table on stderr. Every case uses the
//! same standard payload, `{"id":i,"to":"user<i>@example.com","subject":"hello","n":42}`.
//!
//! ```text
//! cargo run --release -p forgemq-bench                 # every case, medians of 3 runs
//! cargo run --release -p forgemq-bench -- --case process-c50 --runs 5
//! cargo run -p forgemq-bench -- --smoke                # seconds: tiny counts, one run
//! ```
//!
//! # Layout
//! - `cases`: one function per case; each returns the figures of one run.
//! - `procs`: the cases' worker processes (this binary run again) and `MONITOR` counting.
//! - `report`: medians, ranges, the JSON lines and the table.

mod cases;
#[cfg(feature = "peers")]
mod peers;
mod procs;
mod report;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use cases::Bench;
use report::{CaseReport, Figures};

/// Every case, in the order they run. The Redis ceiling runs first so that every other
/// figure can be put next to it.
const CASES: &[&str] = &[
    "redis-ceiling",
    "publish-batch",
    "publish-single",
    "publish-par",
    "process-c1",
    "process-c10",
    "process-c50",
    "process-c50-ledger",
    "partitioned-process",
    "stream",
    "rate-limited",
    "fair-groups",
    "process-procs",
    "idle-procs",
    "latency",
    "delayed",
    "backlog",
    "memory",
    "commands-per-message",
    #[cfg(feature = "peers")]
    "peer-bullmq-publish-batch",
    #[cfg(feature = "peers")]
    "peer-bullmq-process-c50",
];

/// Benchmarks ForgeMQ against a real redis-server.
///
/// Prints one JSON line per case on stdout and a summary table on stderr.
#[derive(Parser, Debug)]
#[command(name = "forgemq-bench", version)]
struct Args {
    /// Redis to run against instead of a private redis-server. The cases use their own
    /// namespaces (`bench-<case>-<run>`) and purge what they wrote.
    #[arg(long, env = "FORGEMQ_BENCH_REDIS")]
    redis: Option<String>,
    /// Run against a private Redis Cluster of this many masters (real redis-server
    /// processes on this machine) instead of one private server.
    #[arg(long, value_name = "MASTERS", conflicts_with = "redis")]
    cluster: Option<usize>,
    /// Runs per case; the table shows the median and the range.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only these cases (repeatable): redis-ceiling, publish-batch, publish-single,
    /// publish-par, process-c1, process-c10, process-c50, process-c50-ledger (with a 60 s
    /// processed ledger, the cost of deduplicating retried publishes), partitioned-process
    /// (a plain topic against one of 12 partitions, with each master's share of the
    /// commands and CPU), stream, rate-limited (the rate measured under a 2,000/s limit),
    /// process-procs (4 worker processes on one topic), idle-procs (round trips of 8 idle
    /// worker processes),
    /// latency, delayed,
    /// backlog, memory, commands-per-message.
    #[arg(long = "case", value_name = "CASE")]
    cases: Vec<String>,
    /// A quick check that every case runs: counts divided by 100, one run. The figures
    /// mean little; CI runs this.
    #[arg(long)]
    smoke: bool,
}

fn main() -> anyhow::Result<()> {
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some(procs::CHILD_FLAG) {
        return procs::child_main(&raw[2..]);
    }
    let args = Args::parse();
    for case in &args.cases {
        if !CASES.contains(&case.as_str()) {
            bail!("unknown case {case:?}; the cases are: {}", CASES.join(", "));
        }
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let runs = if args.smoke { 1 } else { args.runs };
    let selected: Vec<&str> = CASES
        .iter()
        .copied()
        .filter(|c| args.cases.is_empty() || args.cases.iter().any(|a| a == c))
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(run(args.redis, args.cluster, args.smoke, runs, &selected))
}

async fn run(
    redis: Option<String>,
    cluster: Option<usize>,
    smoke: bool,
    runs: usize,
    selected: &[&str],
) -> anyhow::Result<()> {
    let bench = Bench::start(redis, cluster, smoke).await?;
    println!("{}", bench.environment(runs).await?);
    let mut reports: Vec<CaseReport> = Vec::new();
    for &case in selected {
        let mut samples: Vec<Figures> = Vec::new();
        for run in 0..runs {
            let figures = bench
                .run_case(case, run, &reports)
                .await
                .with_context(|| format!("case {case}, run {}", run + 1))?;
            samples.push(figures);
            bench.clean().await?;
            // Let Redis settle (lazy frees, the allocator) between runs.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let report = CaseReport::new(case, samples);
        println!("{}", report.json());
        reports.push(report);
    }
    let ceiling: BTreeMap<String, f64> = reports
        .iter()
        .find(|r| r.case == "redis-ceiling")
        .map(|r| r.median.clone())
        .unwrap_or_default();
    eprintln!(
        "{}",
        report::table(&reports, &ceiling, runs, bench.describe())
    );
    Ok(())
}
