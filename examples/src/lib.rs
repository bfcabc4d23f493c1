//! The seed's case studies as small programs with tests, and the receiver the gateway demo
//! delivers to. Each module is one scenario; `src/bin/` runs it against a real Redis
//! (`--redis URL`, else `$REDIS_URL`, else `redis://127.0.0.1:6379`), and `tests/` checks
//! it against a private one. See `examples/README.md` (English and Chinese).
//!
//! Time is scaled so the demos finish: `--minute 100ms` makes the order's 30-minute payment
//! check fire after 3 s, and `--hour 2s` makes the welcome gift arrive 2 s after sign-up.

// Example code: each module's doc explains its scenario; its public fields and methods are
// named for what they are and left undocumented.
#![allow(missing_docs)]

pub mod data_sync;
pub mod file_processing;
pub mod gateway_receiver;
pub mod order_timeout;
pub mod registration;

use std::time::Duration;

/// The Redis to use: `--redis URL`, else `$REDIS_URL`, else the local default.
pub fn redis_url(args: &[String]) -> String {
    flag(args, "--redis")
        .or_else(|| std::env::var("REDIS_URL").ok())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// A duration flag such as `--minute 100ms`, or `default`.
pub fn duration_flag(args: &[String], name: &str, default: Duration) -> anyhow::Result<Duration> {
    match flag(args, name) {
        Some(text) => humantime::parse_duration(&text)
            .map_err(|e| anyhow::anyhow!("{name} {text:?}: {e} (write e.g. 100ms or 2s)")),
        None => Ok(default),
    }
}

/// The value after `name` in `args`.
pub fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Log lines on stderr (`RUST_LOG` overrides the level).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
