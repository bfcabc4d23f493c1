//! Human tables and the stable JSON shapes of read commands.

use std::time::SystemTime;

use anyhow::Result;
use forgemq::{
    Cancelled, MessageId, MessageState, MessageStatus, PeekedMessage, QueueStats, TopicInfo,
    WorkerInfo,
};
use serde_json::{json, Value};

/// Prints any value as pretty JSON on stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The JSON shape of `peek` and `dlq list`: the stored envelope, plus `"error"` and
/// `"died_at"` for dead letters, `"due_at"` for delayed ones, and `"lease_until"`,
/// `"holder"` (the worker running it) and `"started_at"` for active ones.
pub(crate) fn envelopes(found: &[PeekedMessage]) -> Vec<Value> {
    found.iter().map(envelope).collect()
}

/// One message's envelope with the fields of its state (see [`envelopes`]).
fn envelope(m: &PeekedMessage) -> Value {
    let mut v = match &m.envelope {
        Value::Object(_) => m.envelope.clone(),
        _ => json!({"id": m.id, "topic": m.topic, "data": null, "raw": m.raw}),
    };
    if let Value::Object(obj) = &mut v {
        let at = m.at.map(rfc3339);
        match m.state {
            MessageState::Dead => {
                obj.insert("error".into(), json!(m.error));
                obj.insert("died_at".into(), json!(at));
            }
            MessageState::Delayed => {
                obj.insert("due_at".into(), json!(at));
            }
            MessageState::Active => {
                obj.insert("lease_until".into(), json!(at));
                obj.insert("holder".into(), json!(m.holder));
                obj.insert("started_at".into(), json!(m.started_at.map(rfc3339)));
            }
            _ => {}
        }
    }
    v
}

/// The JSON shape of one message found by id (`status`, `GET .../messages/{id}`): its
/// envelope with the fields of its state (as [`envelopes`]), plus `"state"` and, for a
/// pending one, `"ready_since"`: when it became ready to run, for one that went back to
/// the head of the queue (recovered or released); else null, and `timestamp` says when it
/// was published.
pub(crate) fn message(m: &PeekedMessage) -> Value {
    let mut v = envelope(m);
    if let Value::Object(obj) = &mut v {
        obj.insert("state".into(), json!(state_name(m.state)));
        if m.state == MessageState::Pending {
            obj.insert("ready_since".into(), json!(m.at.map(rfc3339)));
        }
    }
    v
}

/// The JSON shape of a message's status (`status --json`, `GET .../messages/{id}`): for a
/// stored message its [`message`] shape; for a finished one whose body is gone (done,
/// cancelled) `{"id", "topic", "data": null, "state", "retry"}`; either with `progress`,
/// `result`, `error` (its last failure) and `finished_at` (done and cancelled ones).
pub(crate) fn status(
    topic: &str,
    id: &MessageId,
    stored: Option<&PeekedMessage>,
    s: &MessageStatus,
) -> Value {
    let mut v = match stored {
        Some(m) => message(m),
        None => json!({
            "id": id, "topic": topic, "data": null, "state": s.state.as_str(), "retry": s.retry,
        }),
    };
    if let Value::Object(obj) = &mut v {
        obj.insert("progress".into(), json!(s.progress));
        obj.insert("result".into(), json!(s.result));
        if !obj.contains_key("error") {
            obj.insert("error".into(), json!(s.error));
        }
        obj.insert("finished_at".into(), json!(s.finished_at.map(rfc3339)));
    }
    v
}

/// `status` for people: the stored message's lines (see [`message_lines`]), or those of
/// a finished one, then its progress and result.
pub(crate) fn status_lines(
    topic: &str,
    id: &MessageId,
    stored: Option<&PeekedMessage>,
    s: &MessageStatus,
) {
    let mut lines: Vec<(&str, String)> = Vec::new();
    match stored {
        Some(m) => message_lines(m),
        None => {
            lines.push(("id", id.to_string()));
            lines.push(("topic", topic.to_owned()));
            lines.push(("state", s.state.as_str().to_owned()));
            lines.push(("retry", s.retry.to_string()));
            if let Some(at) = s.finished_at {
                lines.push(("finished at", rfc3339(at)));
            }
            if let Some(e) = &s.error {
                lines.push(("error", e.clone()));
            }
        }
    }
    if let Some(p) = &s.progress {
        lines.push(("progress", p.to_string()));
    }
    if let Some(r) = &s.result {
        lines.push(("result", r.to_string()));
    }
    for (label, value) in lines {
        println!("{label:<12} {}", printable(&value));
    }
}

/// The lowercase name of a state, as the API and `--state` spell it.
pub(crate) fn state_name(state: MessageState) -> &'static str {
    match state {
        MessageState::Pending => "pending",
        MessageState::Delayed => "delayed",
        MessageState::Active => "active",
        MessageState::Dead => "dead",
        _ => "unknown",
    }
}

/// A duration for people, without spaces so that a table row splits on them:
/// `350ms`, `4.2s`, `3m10s`, `2h5m`, `3d4h`.
pub(crate) fn age(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{s}.{}s", ms % 1000 / 100),
        60_000..=3_599_999 => format!("{}m{}s", s / 60, s % 60),
        3_600_000..=86_399_999 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Queue latency for a table: the age of the oldest ready message, `-` when none waits.
fn latency(s: &QueueStats) -> String {
    s.oldest_pending_age_ms.map_or_else(|| "-".to_owned(), age)
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `text` with every character that could steer a terminal shown as an escape instead:
/// C0 and C1 controls (ESC starts colour, cursor and title sequences, BEL rings, CR and
/// LF break the row) and the bidirectional overrides that reorder what is shown. Error
/// texts come from remote endpoints through the gateway, so they are not trusted.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(steers) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if steers(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out.into()
}

/// Controls, and the bidirectional marks, embeddings, overrides and isolates.
fn steers(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Prints rows as columns padded to their widest cell; numbers align right. Cells are
/// shown with [`printable`]: a table is for a terminal (`--json` keeps text exact).
fn table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| {
                if c.parse::<f64>().is_ok() {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// How [`stats_table`] shows a partitioned topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Partitions {
    /// One row: the sums.
    Sum,
    /// The sums, then one indented row per partition.
    Each,
}

/// "1 partition", "4 partitions".
pub(crate) fn partitions(n: u32) -> String {
    if n == 1 {
        "1 partition".to_owned()
    } else {
        format!("{n} partitions")
    }
}

pub(crate) fn stats_table(stats: &[QueueStats], show: Partitions) {
    if stats.is_empty() {
        eprintln!("no topics yet: publish a message to create one");
        return;
    }
    let row = |name: String, s: &QueueStats| {
        vec![
            name,
            s.pending.to_string(),
            s.active.to_string(),
            s.delayed.to_string(),
            s.dead.to_string(),
            latency(s),
            s.workers.to_string(),
            running(s),
            s.processed.to_string(),
            s.failed.to_string(),
            s.retried.to_string(),
            s.recovered.to_string(),
            s.duplicate_runs.to_string(),
        ]
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    for s in stats {
        let mut notes = Vec::new();
        if !s.partitions.is_empty() {
            notes.push(partitions(s.partitions.len() as u32));
        }
        if s.paused {
            notes.push("paused".to_owned());
        }
        let name = if notes.is_empty() {
            s.topic.clone()
        } else {
            format!("{} ({})", s.topic, notes.join(", "))
        };
        rows.push(row(name, s));
        if show == Partitions::Each {
            for (i, p) in s.partitions.iter().enumerate() {
                let n = p.partition.unwrap_or(i as u32);
                let paused = if p.paused { " (paused)" } else { "" };
                rows.push(row(format!("  partition {n}{paused}"), p));
            }
        }
    }
    table(
        &[
            "TOPIC",
            "PENDING",
            "ACTIVE",
            "DELAYED",
            "DEAD",
            "LATENCY",
            "WORKERS",
            "RUNNING",
            "PROCESSED",
            "FAILED",
            "RETRIED",
            "RECOVERED",
            "DUP RUNS",
        ],
        &rows,
    );
}

/// What the workers of a topic run over their slots, `3/10`; `-` without a worker.
fn running(s: &QueueStats) -> String {
    if s.workers == 0 {
        "-".to_owned()
    } else {
        format!("{}/{}", s.in_flight, s.worker_slots)
    }
}

/// `limit ls`: every topic with a rate limit.
pub(crate) fn limits_table(limits: &[forgemq::TopicLimit]) {
    if limits.is_empty() {
        eprintln!("no rate limits: set one with `forgemq limit set TOPIC 100/s`");
        return;
    }
    let rows: Vec<Vec<String>> = limits
        .iter()
        .map(|l| vec![l.topic.clone(), l.rate.clone(), l.burst.to_string()])
        .collect();
    table(&["TOPIC", "RATE", "BURST"], &rows);
}

/// `group set`: what a group's settings now are.
pub(crate) fn group_line(topic: &str, group: &str, s: &forgemq::GroupSettings) -> String {
    let cap = match s.max_active {
        0 => "no cap".to_owned(),
        n => format!("at most {n} at once"),
    };
    let paused = if s.paused { ", paused" } else { "" };
    format!("{topic} {group}: {cap}, weight {}{paused}", s.weight)
}

/// `group ls`: the groups of one topic.
pub(crate) fn groups_table(topic: &str, groups: &[forgemq::GroupInfo]) {
    if groups.is_empty() {
        eprintln!("{topic} has no groups: publish with `--group NAME`");
        return;
    }
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.group.clone(),
                g.pending.to_string(),
                g.active.to_string(),
                match g.max_active {
                    0 => "-".to_owned(),
                    n => n.to_string(),
                },
                g.weight.to_string(),
                if g.paused { "paused" } else { "" }.to_owned(),
            ]
        })
        .collect();
    table(
        &[
            "GROUP",
            "PENDING",
            "ACTIVE",
            "MAX ACTIVE",
            "WEIGHT",
            "STATE",
        ],
        &rows,
    );
}

/// `schedule ls`: every schedule, its spec, and its next and last fire.
pub(crate) fn schedules_table(schedules: &[forgemq::Schedule]) {
    if schedules.is_empty() {
        eprintln!(
            "no schedules yet: create one with `forgemq schedule set NAME --cron EXPR --topic T`"
        );
        return;
    }
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|s| {
            let spec = match (&s.cron, s.every_ms) {
                (Some(cron), _) if s.tz == "UTC" => format!("cron {cron}"),
                (Some(cron), _) => format!("cron {cron} ({})", s.tz),
                (None, Some(ms)) => format!(
                    "every {}",
                    humantime::format_duration(std::time::Duration::from_millis(ms))
                ),
                (None, None) => "?".to_owned(),
            };
            vec![
                printable(&s.name).into_owned(),
                spec,
                s.topic.clone(),
                s.missed.to_string(),
                s.next_fire.map_or_else(|| "never".to_owned(), rfc3339),
                s.last_fire.map_or_else(|| "-".to_owned(), rfc3339),
                s.fired.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "SCHEDULE", "TOPIC", "MISSED", "NEXT", "LAST", "FIRED",
        ],
        &rows,
    );
}

pub(crate) fn topics_table(topics: &[TopicInfo]) {
    if topics.is_empty() {
        eprintln!("no topics yet: publish a message or run `forgemq topic create` to create one");
        return;
    }
    let rows: Vec<Vec<String>> = topics
        .iter()
        .map(|t| vec![t.topic.clone(), t.partitions.to_string()])
        .collect();
    table(&["TOPIC", "PARTITIONS"], &rows);
}

pub(crate) fn peek_table(found: &[PeekedMessage]) {
    if found.is_empty() {
        eprintln!("no messages in that state");
        return;
    }
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|m| {
            let mut data = m.data.to_string();
            if data.chars().count() > 60 {
                data = data.chars().take(57).collect::<String>() + "...";
            }
            let mut row = vec![
                m.id.to_string(),
                m.retry.to_string(),
                m.at.map(rfc3339).unwrap_or_default(),
            ];
            if m.state == MessageState::Active {
                row.push(m.holder.clone().unwrap_or_else(|| "-".to_owned()));
                row.push(m.started_at.map_or_else(|| "-".to_owned(), since));
            }
            row.extend([m.error.clone().unwrap_or_default(), data]);
            row
        })
        .collect();
    match found[0].state {
        MessageState::Active => table(
            &[
                "ID",
                "RETRY",
                "LEASE UNTIL",
                "HOLDER",
                "RUNNING",
                "ERROR",
                "DATA",
            ],
            &rows,
        ),
        state => {
            let when = match state {
                MessageState::Delayed => "DUE",
                MessageState::Dead => "DIED",
                _ => "",
            };
            table(&["ID", "RETRY", when, "ERROR", "DATA"], &rows);
        }
    }
}

/// How long ago `t` was, for people (`4.2 s`); `0 ms` for a time ahead of this clock.
fn since(t: SystemTime) -> String {
    age(SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
}

/// `workers`: the live workers, what they consume and how busy they are.
pub(crate) fn workers_table(workers: &[WorkerInfo]) {
    if workers.is_empty() {
        eprintln!("no live workers: none has sent a heartbeat in the last few intervals");
        return;
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let topics: Vec<String> = w
                .topics
                .iter()
                .map(|t| format!("{} {}/{}", t.topic, t.in_flight, t.concurrency))
                .collect();
            vec![
                w.id.clone(),
                w.name.clone().unwrap_or_else(|| "-".to_owned()),
                w.host.clone(),
                w.pid.to_string(),
                format!("{:?}", w.state).to_lowercase(),
                since(w.started_at),
                since(w.last_heartbeat),
                topics.join(", "),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "HOST",
            "PID",
            "STATE",
            "UP",
            "LAST BEAT",
            "TOPICS (RUNNING/SLOTS)",
        ],
        &rows,
    );
}

/// `status`: one message found by id, as label: value lines.
pub(crate) fn message_lines(m: &PeekedMessage) {
    let mut lines: Vec<(&str, String)> = vec![
        ("id", m.id.to_string()),
        ("topic", m.topic.clone()),
        ("state", state_name(m.state).to_owned()),
        ("retry", m.retry.to_string()),
    ];
    let at = m.at.map(rfc3339).unwrap_or_else(|| "-".to_owned());
    match m.state {
        MessageState::Pending => lines.push(("ready since", at)),
        MessageState::Delayed => lines.push(("due at", at)),
        MessageState::Active => {
            lines.push(("lease until", at));
            lines.push(("holder", m.holder.clone().unwrap_or_else(|| "-".to_owned())));
            lines.push((
                "running for",
                m.started_at.map_or_else(|| "-".to_owned(), since),
            ));
        }
        MessageState::Dead => lines.push(("died at", at)),
        _ => {}
    }
    if let Some(e) = &m.error {
        lines.push(("error", e.clone()));
    }
    lines.push(("data", m.data.to_string()));
    for (label, value) in lines {
        println!("{label:<12} {}", printable(&value));
    }
}

pub(crate) fn cancelled(from: Cancelled) -> &'static str {
    match from {
        Cancelled::Delayed => "delayed",
        _ => "pending",
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn ages_read_like_people_say_them() {
        let cases = [
            (0, "0ms"),
            (999, "999ms"),
            (1000, "1.0s"),
            (4_249, "4.2s"),
            (59_999, "59.9s"),
            (60_000, "1m0s"),
            (190_000, "3m10s"),
            (7_500_000, "2h5m"),
            (90_000_000, "1d1h"),
        ];
        for (ms, text) in cases {
            assert_eq!(super::age(ms), text, "{ms}");
        }
    }

    #[test]
    fn printable_escapes_what_steers_a_terminal() {
        assert_eq!(
            printable("plain text, ünïcödé 中文"),
            "plain text, ünïcödé 中文"
        );
        assert_eq!(
            printable("\u{1b}[31mred\u{7}\r\n\t\u{9b}2J\u{202e}txt"),
            r"\u{1b}[31mred\u{7}\r\n\t\u{9b}2J\u{202e}txt"
        );
    }
}
