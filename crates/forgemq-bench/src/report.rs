//! Medians, ranges, the JSON line of a case and the summary table.

use std::collections::BTreeMap;

use serde_json::json;

/// The figures of one run of one case, by name.
pub(crate) type Figures = BTreeMap<String, f64>;

/// Every run of one case, with the median, minimum and maximum of each figure.
pub(crate) struct CaseReport {
    pub(crate) case: String,
    pub(crate) samples: Vec<Figures>,
    pub(crate) median: Figures,
    min: Figures,
    max: Figures,
}

impl CaseReport {
    pub(crate) fn new(case: &str, samples: Vec<Figures>) -> Self {
        let mut median = Figures::new();
        let mut min = Figures::new();
        let mut max = Figures::new();
        let names: std::collections::BTreeSet<&String> =
            samples.iter().flat_map(|s| s.keys()).collect();
        for name in names {
            let mut values: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.get(name))
                .copied()
                .collect();
            values.sort_by(f64::total_cmp);
            let mid = values.len() / 2;
            let m = if !values.len().is_multiple_of(2) {
                values[mid]
            } else {
                (values[mid - 1] + values[mid]) / 2.0
            };
            median.insert(name.clone(), m);
            min.insert(name.clone(), values[0]);
            max.insert(name.clone(), values[values.len() - 1]);
        }
        Self {
            case: case.to_owned(),
            samples,
            median,
            min,
            max,
        }
    }

    /// One JSON line: the case, its medians, ranges and every run.
    pub(crate) fn json(&self) -> String {
        json!({
            "case": self.case,
            "runs": self.samples.len(),
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "samples": self.samples,
        })
        .to_string()
    }
}

/// A target from the performance issue.
#[derive(Clone, Copy)]
enum Target {
    None,
    AtLeast(f64),
    Below(f64),
    AtMost(f64),
}

impl Target {
    fn describe(self) -> String {
        match self {
            Target::None => String::new(),
            Target::AtLeast(x) => format!(">= {}", num(x)),
            Target::Below(x) => format!("< {}", num(x)),
            Target::AtMost(x) => format!("<= {}", num(x)),
        }
    }

    fn verdict(self, v: f64) -> &'static str {
        let met = match self {
            Target::None => return "",
            Target::AtLeast(x) => v >= x,
            Target::Below(x) => v < x,
            Target::AtMost(x) => v <= x,
        };
        if met {
            "met"
        } else {
            "MISSED"
        }
    }
}

/// The rows of the table: case, figure, unit, target and the ceiling figure it is a
/// fraction of (LPUSH for what goes in, RPOP for what comes out, both for a stream).
const ROWS: &[(&str, &str, &str, Target, &str)] = &[
    ("redis-ceiling", "lpush_per_sec", "ops/s", Target::None, ""),
    ("redis-ceiling", "rpop_per_sec", "ops/s", Target::None, ""),
    ("redis-ceiling", "pair_per_sec", "msg/s", Target::None, ""),
    (
        "publish-batch",
        "msgs_per_sec",
        "msg/s",
        Target::AtLeast(200_000.0),
        "lpush_per_sec",
    ),
    ("publish-batch", "redis_us_per_msg", "µs", Target::None, ""),
    (
        "publish-single",
        "msgs_per_sec",
        "msg/s",
        Target::None,
        "lpush_per_sec",
    ),
    ("publish-single", "redis_us_per_msg", "µs", Target::None, ""),
    (
        "publish-par",
        "msgs_per_sec",
        "msg/s",
        Target::None,
        "lpush_per_sec",
    ),
    ("publish-par", "redis_us_per_msg", "µs", Target::None, ""),
    (
        "process-c1",
        "msgs_per_sec",
        "msg/s",
        Target::AtLeast(10_000.0),
        "rpop_per_sec",
    ),
    ("process-c1", "redis_us_per_msg", "µs", Target::None, ""),
    (
        "process-c10",
        "msgs_per_sec",
        "msg/s",
        Target::AtLeast(50_000.0),
        "rpop_per_sec",
    ),
    ("process-c10", "redis_us_per_msg", "µs", Target::None, ""),
    (
        "process-c50",
        "msgs_per_sec",
        "msg/s",
        Target::AtLeast(100_000.0),
        "rpop_per_sec",
    ),
    (
        "process-c50",
        "redis_us_per_msg",
        "µs",
        Target::AtMost(4.0),
        "",
    ),
    (
        "stream",
        "msgs_per_sec",
        "msg/s",
        Target::AtLeast(75_000.0),
        "pair_per_sec",
    ),
    ("stream", "redis_us_per_msg", "µs", Target::None, ""),
    (
        "process-c50-ledger",
        "msgs_per_sec",
        "msg/s",
        Target::None,
        "rpop_per_sec",
    ),
    (
        "process-c50-ledger",
        "redis_us_per_msg",
        "µs",
        Target::None,
        "",
    ),
    (
        "process-c50-ledger",
        "ledger_bytes_per_msg",
        "bytes",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "plain_msgs_per_sec",
        "msg/s",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "plain_redis_us_per_msg",
        "µs",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "partitioned_msgs_per_sec",
        "msg/s",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "partitioned_redis_us_per_msg",
        "µs",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "partitioned_vs_plain",
        "x",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "plain_m0_cmd_share",
        "",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "plain_m1_cmd_share",
        "",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "plain_m2_cmd_share",
        "",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "partitioned_m0_cmd_share",
        "",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "partitioned_m1_cmd_share",
        "",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "partitioned_m2_cmd_share",
        "",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "partitioned_m0_cpu_share",
        "",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "partitioned_m1_cpu_share",
        "",
        Target::None,
        "",
    ),
    (
        "partitioned-process",
        "partitioned_m2_cpu_share",
        "",
        Target::None,
        "",
    ),
    ("publish-batch", "redis_cpu", "cores", Target::None, ""),
    ("publish-batch", "client_cpu", "cores", Target::None, ""),
    ("process-c1", "redis_cpu", "cores", Target::None, ""),
    ("process-c1", "client_cpu", "cores", Target::None, ""),
    ("process-c50", "redis_cpu", "cores", Target::None, ""),
    ("process-c50", "client_cpu", "cores", Target::None, ""),
    ("stream", "redis_cpu", "cores", Target::None, ""),
    ("stream", "client_cpu", "cores", Target::None, ""),
    ("fair-groups", "b_wait_p99_ms", "ms", Target::None, ""),
    ("fair-groups", "b_p99_share", "x", Target::Below(0.05), ""),
    ("fair-groups", "msgs_per_sec", "msg/s", Target::None, ""),
    ("fair-groups", "vs_process_c50", "x", Target::None, ""),
    ("fair-groups", "redis_us_per_msg", "µs", Target::None, ""),
    (
        "peer-bullmq-publish-batch",
        "msgs_per_sec",
        "msg/s",
        Target::None,
        "",
    ),
    (
        "peer-bullmq-publish-batch",
        "forgemq_vs_peer",
        "x",
        Target::None,
        "",
    ),
    (
        "peer-bullmq-process-c50",
        "msgs_per_sec",
        "msg/s",
        Target::None,
        "",
    ),
    (
        "peer-bullmq-process-c50",
        "forgemq_vs_peer",
        "x",
        Target::None,
        "",
    ),
    ("latency", "p50_ms", "ms", Target::Below(1.0), ""),
    ("latency", "p99_ms", "ms", Target::Below(5.0), ""),
    ("latency", "max_ms", "ms", Target::None, ""),
    (
        "process-procs",
        "msgs_per_sec",
        "msg/s",
        Target::None,
        "rpop_per_sec",
    ),
    (
        "process-procs",
        "vs_process_c50",
        "x",
        Target::AtLeast(0.9),
        "",
    ),
    ("process-procs", "redis_us_per_msg", "µs", Target::None, ""),
    (
        "process-procs",
        "duplicate_runs",
        "runs",
        Target::AtMost(0.0),
        "",
    ),
    (
        "process-procs",
        "recovered",
        "msgs",
        Target::AtMost(0.0),
        "",
    ),
    (
        "idle-procs",
        "round_trips_per_sec_per_proc",
        "/s",
        Target::AtMost(2.0),
        "",
    ),
    ("delayed", "early", "msgs", Target::AtMost(0.0), ""),
    ("delayed", "p50_ms", "ms late", Target::None, ""),
    ("delayed", "p99_ms", "ms late", Target::Below(50.0), ""),
    ("delayed", "max_ms", "ms late", Target::None, ""),
    (
        "backlog",
        "small_msgs_per_sec",
        "msg/s",
        Target::None,
        "rpop_per_sec",
    ),
    (
        "backlog",
        "large_msgs_per_sec",
        "msg/s",
        Target::None,
        "rpop_per_sec",
    ),
    ("backlog", "ratio", "large/small", Target::AtLeast(0.9), ""),
    ("memory", "bytes_per_msg", "bytes", Target::None, ""),
    ("memory", "envelope_bytes", "bytes", Target::None, ""),
    (
        "memory",
        "overhead_bytes",
        "bytes",
        Target::AtMost(350.0),
        "",
    ),
    (
        "commands-per-message",
        "c1_commands_per_msg",
        "cmds",
        Target::None,
        "",
    ),
    (
        "commands-per-message",
        "c1_round_trips_per_msg",
        "calls",
        Target::None,
        "",
    ),
    (
        "commands-per-message",
        "c10_commands_per_msg",
        "cmds",
        Target::None,
        "",
    ),
    (
        "commands-per-message",
        "c10_round_trips_per_msg",
        "calls",
        Target::None,
        "",
    ),
    (
        "commands-per-message",
        "c50_commands_per_msg",
        "cmds",
        Target::None,
        "",
    ),
    (
        "commands-per-message",
        "c50_round_trips_per_msg",
        "calls",
        Target::None,
        "",
    ),
];

/// The summary table: one row per headline figure, with its median, range, target and
/// fraction of the Redis ceiling measured in the same run.
pub(crate) fn table(reports: &[CaseReport], ceiling: &Figures, runs: usize, env: String) -> String {
    let mut out = format!(
        "\nforgemq-bench: {env}; median of {runs} run{}\n",
        if runs == 1 { "" } else { "s" }
    );
    out.push_str(&format!(
        "{:<21} {:<24} {:>10} {:>21} {:<12} {:>12} {:<7} {:>8}\n",
        "case", "figure", "median", "range", "unit", "target", "", "ceiling"
    ));
    for (case, figure, unit, target, of) in ROWS {
        let Some(report) = reports.iter().find(|r| r.case == *case) else {
            continue;
        };
        let Some(&median) = report.median.get(*figure) else {
            continue;
        };
        let range = format!(
            "{} - {}",
            num(report.min[*figure]),
            num(report.max[*figure])
        );
        let fraction = ceiling
            .get(*of)
            .map(|c| format!("{:.1}%", 100.0 * median / c))
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<21} {:<24} {:>10} {:>21} {:<12} {:>12} {:<7} {:>8}\n",
            case,
            figure,
            num(median),
            range,
            unit,
            target.describe(),
            target.verdict(median),
            fraction
        ));
    }
    out
}

/// A number for the table: thousands grouped, small ones with three significant digits.
fn num(x: f64) -> String {
    if x.abs() >= 1000.0 {
        let whole = x.round() as i64;
        let digits = whole.abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if whole < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if x == 0.0 || x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}
