//! Log lines on stderr, as text for people or as one JSON object per line for log
//! pipelines (`--log-format json` / `FORGEMQ_LOG_FORMAT=json`), for every command.
//!
//! `RUST_LOG` sets the levels (an `EnvFilter`). In JSON the long-running commands' status
//! lines and a command's final error are JSON objects of the same shape too, so that a
//! collector can read every line `serve`, `dev` and `gateway` write.

use std::sync::OnceLock;
use std::time::SystemTime;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// One line of text per event, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per event: `timestamp`, `level`, `fields` (`message` and the
    /// event's fields: `worker`, `topic`, `id`, `attempt`, ...), `target`.
    Json,
}

/// Levels of the long-running commands (`serve`, `dev`, `gateway`): what they do, at
/// `info`. The gateway logs each failed delivery itself, so the library's own line for it
/// is left out. redis-rs's warnings (a cluster seed that refused a connection, say) repeat
/// in its words what ForgeMQ's own logs say: only its errors are shown.
const LONG_RUNNING_LEVELS: &str = "info,forgemq::worker::runner=warn,redis=error";

/// Levels of one-shot commands: their outcome is their output and their one-line error;
/// the library's warnings about what it recovered from (a retried publish) are there with
/// `RUST_LOG=warn`.
const ONE_SHOT_LEVELS: &str = "error";

/// The format chosen at start-up, for [`say`] and [`fatal`].
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Installs the log subscriber for the whole process. Called once, before anything logs.
pub(crate) fn init(format: LogFormat, long_running: bool) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if long_running {
            LONG_RUNNING_LEVELS
        } else {
            ONE_SHOT_LEVELS
        })
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A status line of a long-running command ("listening on ..."): as is in text, an `INFO`
/// object in JSON. Always written, like the text line, whatever `RUST_LOG` says.
pub(crate) fn say(text: &str) {
    line("INFO", text, "");
}

/// A status line that reports a problem the command carries on after: as is in text, an
/// `ERROR` object in JSON.
pub(crate) fn say_error(text: &str) {
    line("ERROR", text, "");
}

/// The command's final error, one line: `error: ...` in text, an `ERROR` object in JSON.
pub(crate) fn fatal(text: &str) {
    line("ERROR", text, "error: ");
}

fn line(level: &str, text: &str, text_prefix: &str) {
    match FORMAT.get().copied().unwrap_or_default() {
        LogFormat::Text => eprintln!("{text_prefix}{text}"),
        LogFormat::Json => eprintln!("{}", json_line(SystemTime::now(), level, text)),
    }
}

/// The shape `tracing-subscriber` writes an event in, for a line written without it.
fn json_line(at: SystemTime, level: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "timestamp": humantime::format_rfc3339_micros(at).to_string(),
        "level": level,
        "fields": {"message": message},
        "target": "forgemq",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-written line has the fields tracing-subscriber's JSON events have.
    #[test]
    fn hand_written_lines_look_like_tracing_events() {
        let line = json_line(SystemTime::UNIX_EPOCH, "ERROR", "could not \"connect\"");
        assert_eq!(
            line,
            serde_json::json!({
                "timestamp": "1970-01-01T00:00:00.000000Z",
                "level": "ERROR",
                "fields": {"message": "could not \"connect\""},
                "target": "forgemq",
            })
        );
    }
}
