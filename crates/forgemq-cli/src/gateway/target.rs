//! Delivering one message to a route's target: an HTTP POST or a command.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use forgemq::{HandlerError, Message};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::config::Target;

/// How much of an HTTP response body or a command's stderr goes into the error text.
const TAIL: usize = 1024;

/// Most of an error response's body read (its last [`TAIL`] bytes are kept).
const BODY_LIMIT: usize = 64 * 1024;

/// How long a command's stderr is still read after the command exited: a background
/// process it left behind may hold the pipe open for good.
const STDERR_GRACE: Duration = Duration::from_millis(200);

/// The JSON a target receives: the envelope as stored, as another language would read it
/// from Redis (`docs/wire-format.md`).
pub(crate) fn envelope(msg: &Message<Value>) -> Value {
    json!({
        "id": msg.id.as_str(),
        "topic": msg.topic,
        "data": msg.data,
        "timestamp": humantime::format_rfc3339_millis(msg.timestamp).to_string(),
        "retry": msg.retry,
        "max_retry": msg.max_retry,
        "recoveries": msg.recoveries,
    })
}

/// Delivers `msg`; `Ok` means the target took it.
/// The message headers the gateway passes on to its targets: the W3C trace context.
const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

pub(crate) async fn deliver(
    http: &reqwest::Client,
    target: &Target,
    timeout: Duration,
    msg: &Message<Value>,
) -> Result<(), HandlerError> {
    let body = envelope(msg).to_string();
    match target {
        Target::Http { url, headers } => post(http, url, headers, timeout, msg, body).await,
        Target::Exec { argv, inherit_env } => exec(argv, inherit_env, timeout, msg, body).await,
    }
}

async fn post(
    http: &reqwest::Client,
    url: &reqwest::Url,
    headers: &[(String, String)],
    timeout: Duration,
    msg: &Message<Value>,
    body: String,
) -> Result<(), HandlerError> {
    let mut request = http
        .post(url.clone())
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-ForgeMQ-Id", msg.id.as_str())
        .header("X-ForgeMQ-Topic", msg.topic.as_str())
        .header("X-ForgeMQ-Retry", msg.retry.to_string())
        .body(body);
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    // The publisher's trace context, as W3C Trace Context headers.
    // (A value HTTP cannot carry, non-ASCII say, is left out rather than fail the delivery.)
    for name in TRACE_HEADERS {
        let value = msg
            .headers
            .get(name)
            .map(|v| reqwest::header::HeaderValue::from_str(v));
        if let Some(Ok(value)) = value {
            request = request.header(name, value);
        }
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            return Err(HandlerError::retry(format!(
                "POST {url}: no response within {}",
                humantime::format_duration(timeout)
            )))
        }
        Err(e) => return Err(HandlerError::retry(format!("POST {url}: {}", chain(&e)))),
    };
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    // The body tells the operator why; read a bounded amount of it, within the timeout.
    let text = tokio::time::timeout(timeout, read_head(response))
        .await
        .unwrap_or_default();
    let mut error = format!("POST {url}: HTTP {status}");
    let text = tail(text.trim());
    if !text.is_empty() {
        error.push_str(": ");
        error.push_str(&text);
    }
    Err(match retry_after {
        // Too many requests, and for how long: back without costing an attempt, and the
        // topic's rate limit (if it has one) hands out nothing for that long.
        Some(delay) if status == reqwest::StatusCode::TOO_MANY_REQUESTS => {
            tracing::info!(url = %url, retry_after = ?delay, "{error}");
            HandlerError::rate_limited(delay)
        }
        Some(delay) => HandlerError::retry_after(error, delay),
        None => HandlerError::retry(error),
    })
}

/// The first [`BODY_LIMIT`] bytes of a response body, as text.
async fn read_head(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < BODY_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(BODY_LIMIT);
    String::from_utf8_lossy(&body).into_owned()
}

/// Longest wait a `Retry-After` can impose: a receiver (or whoever answers for it) must
/// not park a message for months; past a day the route's own backoff is the better guide.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// `Retry-After`: delay-seconds or an HTTP date, either capped at [`MAX_RETRY_AFTER`].
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        // Digits past u64: more seconds than any cap.
        Err(_) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => MAX_RETRY_AFTER,
        Err(_) => httpdate(value)?
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form HTTP/1.1 servers send.
fn httpdate(value: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = value.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == month)? + 1;
    let text = format!("{year}-{month:02}-{:0>2}T{time}Z", day);
    humantime::parse_rfc3339(&text).ok()
}

async fn exec(
    argv: &[String],
    inherit_env: &[String],
    timeout: Duration,
    msg: &Message<Value>,
    body: String,
) -> Result<(), HandlerError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(HandlerError::fatal("exec target has no program"));
    };
    let mut command = tokio::process::Command::new(
        super::config::find_program(program).unwrap_or_else(|| program.into()),
    );
    // A clean environment: the gateway's holds REDIS_URL (with its password) and often
    // FORGEMQ_TOKEN, which a handler script has no business seeing.
    command.env_clear();
    for name in inherit_env {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    let mut child = command
        .args(args)
        .env("FORGEMQ_ID", msg.id.as_str())
        .env("FORGEMQ_TOPIC", &msg.topic)
        .env("FORGEMQ_RETRY", msg.retry.to_string())
        // The publisher's trace context: TRACEPARENT and TRACESTATE, as OpenTelemetry's
        // environment-variable carriers name them.
        .envs(TRACE_HEADERS.iter().filter_map(|name| {
            msg.headers
                .get(*name)
                .map(|value| (name.to_ascii_uppercase(), value.as_str()))
        }))
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills whatever it started too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HandlerError::retry(format!("could not start {program:?}: {e}")))?;
    let pid = child.id();
    let stdin = child.stdin.take();
    // Its stderr is read on a task of its own into a bounded tail, so that a chatty
    // command cannot fill memory and a pipe held open after it exits cannot hold us.
    let err_tail = Arc::new(Mutex::new(Vec::new()));
    let reader = child.stderr.take().map(|mut stderr| {
        let err_tail = Arc::clone(&err_tail);
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let mut t = err_tail.lock().unwrap_or_else(|p| p.into_inner());
                t.extend_from_slice(&chunk[..n]);
                if t.len() > 2 * TAIL {
                    let cut = t.len() - TAIL;
                    t.drain(..cut);
                }
            }
        })
    });
    let run = async {
        // Feeding stdin and waiting run together: a command that exits without reading
        // all of it ends the write with an error, which is not a failure by itself.
        let feed = async {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(body.as_bytes()).await;
            }
        };
        let ((), status) = tokio::join!(feed, child.wait());
        status
    };
    let outcome = tokio::time::timeout(timeout, run).await;
    if outcome.is_err() {
        kill_group(pid);
    }
    if let Some(reader) = reader {
        let abort = reader.abort_handle();
        if tokio::time::timeout(STDERR_GRACE, reader).await.is_err() {
            abort.abort();
        }
    }
    let stderr = {
        let t = err_tail.lock().unwrap_or_else(|p| p.into_inner());
        tail(String::from_utf8_lossy(&t).trim())
    };
    match outcome {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => {
            let mut error = format!("{program:?} failed: {status}");
            if !stderr.is_empty() {
                error.push_str(": ");
                error.push_str(&stderr);
            }
            Err(HandlerError::retry(error))
        }
        Ok(Err(e)) => Err(HandlerError::retry(format!(
            "waiting for {program:?} failed: {e}"
        ))),
        Err(_) => Err(HandlerError::retry(format!(
            "{program:?} did not exit within {}; killed",
            humantime::format_duration(timeout)
        ))),
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The last [`TAIL`] bytes of `text`, on a character boundary.
fn tail(text: &str) -> String {
    if text.len() <= TAIL {
        return text.to_owned();
    }
    let mut start = text.len() - TAIL;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// An error with its causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        let future = SystemTime::now() + Duration::from_secs(120);
        let date = httpdate_of(future);
        let d = parse_retry_after(&date).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?} from {date}"
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    /// A date far ahead waits no longer than a huge number of seconds would: 24 h.
    #[test]
    fn retry_after_dates_are_capped_like_seconds() {
        let cap = Duration::from_secs(24 * 3600);
        assert_eq!(parse_retry_after("99999999999"), Some(cap));
        assert_eq!(parse_retry_after("99999999999999999999999"), Some(cap));
        let in_a_year = httpdate_of(SystemTime::now() + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(parse_retry_after(&in_a_year), Some(cap), "{in_a_year}");
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(cap)
        );
    }

    fn httpdate_of(t: SystemTime) -> String {
        // 2026-12-03T04:03:09Z -> Thu, 03 Dec 2026 04:03:09 GMT (the weekday is not read).
        let s = humantime::format_rfc3339_seconds(t).to_string();
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month: usize = s[5..7].parse().unwrap();
        format!(
            "Xxx, {} {} {} {} GMT",
            &s[8..10],
            MONTHS[month - 1],
            &s[0..4],
            &s[11..19]
        )
    }

    #[test]
    fn tails_are_bounded() {
        assert_eq!(tail("short"), "short");
        let long = "é".repeat(2000);
        let t = tail(&long);
        assert!(t.len() <= TAIL + 4 && t.starts_with("..."));
    }
}
