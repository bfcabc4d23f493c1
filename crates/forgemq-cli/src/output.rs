//! Human tables and the stable JSON shapes of read commands.

use std::time::SystemTime;

use anyhow::Result;
use forgemq::{Cancelled, MessageState, PeekedMessage, QueueStats, TopicInfo};
use serde_json::{json, Value};

/// Prints any value as pretty JSON on stdout.
pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The JSON shape of `peek` and `dlq list`: the stored envelope, plus `"error"` and
/// `"died_at"` for dead letters, `"due_at"` for delayed and `"lease_until"` for active ones.
pub(crate) fn envelopes(found: &[PeekedMessage]) -> Vec<Value> {
    found
        .iter()
        .map(|m| {
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
                    }
                    _ => {}
                }
            }
            v
        })
        .collect()
}

fn rfc3339(t: SystemTime) -> String {
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
            "PROCESSED",
            "FAILED",
            "RETRIED",
            "RECOVERED",
            "DUP RUNS",
        ],
        &rows,
    );
}

/// `topic ls`: every topic and its partition count.
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
            vec![
                m.id.to_string(),
                m.retry.to_string(),
                m.at.map(rfc3339).unwrap_or_default(),
                m.error.clone().unwrap_or_default(),
                data,
            ]
        })
        .collect();
    let when = match found[0].state {
        MessageState::Delayed => "DUE",
        MessageState::Active => "LEASE UNTIL",
        MessageState::Dead => "DIED",
        _ => "",
    };
    table(&["ID", "RETRY", when, "ERROR", "DATA"], &rows);
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
