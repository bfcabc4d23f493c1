//! The gateway's configuration file: routes from topics (or patterns) to targets.
//!
//! Everything is checked at start-up (and on reload), before a single message is taken:
//! unknown keys, a route with no target or two, a pattern no topic name can match, a URL
//! that is not http(s), a command that is not on `PATH`. Each error names the line.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Bounds of the settings that are durations.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const MAX_BACKOFF: Duration = Duration::from_secs(30 * 24 * 3600);
const MIN_DISCOVER: Duration = Duration::from_millis(100);
const MAX_DISCOVER: Duration = Duration::from_secs(3600);

/// The whole file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Config {
    /// Address of `/healthz`, `/ready` and `/metrics` (`--listen` wins).
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// How often pattern routes look for topics that appeared since.
    pub(crate) discover_interval: Duration,
    pub(crate) routes: Vec<Route>,
}

/// One route: which topics, where to, and how. Two routes are equal when their settings
/// are (the line is not a setting: moving a route in the file restarts nothing).
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The topic name or pattern as written (also the `route` label of the metrics).
    pub(crate) topic: String,
    pub(crate) target: Target,
    /// Deliveries running at once, per topic the route matches.
    pub(crate) concurrency: usize,
    /// Longest one delivery may take: the HTTP request, or the command until it exits.
    pub(crate) timeout: Duration,
    /// Retries before the dead-letter queue, for messages published without their own.
    pub(crate) max_retry: u32,
    pub(crate) backoff: BackoffSpec,
    /// Line of the route in the file, for messages.
    pub(crate) line: usize,
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        let Route {
            topic,
            target,
            concurrency,
            timeout,
            max_retry,
            backoff,
            line: _,
        } = self;
        *topic == other.topic
            && *target == other.target
            && *concurrency == other.concurrency
            && *timeout == other.timeout
            && *max_retry == other.max_retry
            && *backoff == other.backoff
    }
}

/// Where a route delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// POST of the envelope to this URL, with these extra headers.
    Http {
        url: reqwest::Url,
        headers: Vec<(String, String)>,
    },
    /// Runs this program with these arguments, the envelope on stdin, in a clean
    /// environment: the `FORGEMQ_*` variables of the message plus the gateway's values of
    /// the names in `inherit_env`.
    Exec {
        argv: Vec<String>,
        inherit_env: Vec<String>,
    },
}

/// What an exec target inherits from the gateway's environment unless its route says
/// otherwise: enough to find programs and read text, and nothing secret. The gateway's
/// own environment holds `REDIS_URL` (with its password) and often `FORGEMQ_TOKEN`.
pub(crate) const DEFAULT_INHERIT_ENV: [&str; 5] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ"];

/// Delay between failed attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackoffSpec {
    /// `base`, doubling per failure up to `max`, with jitter.
    Exponential { base: Duration, max: Duration },
    /// The same delay every time.
    Fixed(Duration),
}

impl BackoffSpec {
    pub(crate) fn to_backoff(self) -> forgemq::Backoff {
        match self {
            BackoffSpec::Exponential { base, max } => forgemq::Backoff::exponential(base, max),
            BackoffSpec::Fixed(d) => forgemq::Backoff::fixed(d),
        }
    }
}

impl Route {
    /// Whether `topic` is one of this route's.
    pub(crate) fn matches(&self, topic: &str) -> bool {
        glob_matches(self.topic.as_bytes(), topic.as_bytes())
    }

    /// A pattern (`order.*`) rather than one topic name.
    pub(crate) fn is_pattern(&self) -> bool {
        self.topic.contains('*')
    }
}

impl Config {
    /// The route that handles `topic`: a route naming it exactly, else the first pattern
    /// (in file order) that matches it.
    pub(crate) fn route_for(&self, topic: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| !r.is_pattern() && r.topic == topic)
            .or_else(|| {
                self.routes
                    .iter()
                    .find(|r| r.is_pattern() && r.matches(topic))
            })
    }

    /// Reads and checks the file.
    pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: None,
            message: format!("cannot read it: {e}"),
        })?;
        Config::parse(&text).map_err(|(line, message)| ConfigError {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// Parses and checks the text of a config file; errors carry their line.
    pub(crate) fn parse(text: &str) -> Result<Config, (Option<usize>, String)> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(s.start));
            // The line itself names the key, which toml's message may not.
            let quoted = line
                .and_then(|l| text.lines().nth(l - 1))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| format!(" (in `{l}`)"))
                .unwrap_or_default();
            (line, format!("{}{quoted}", e.message().trim_end()))
        })?;
        if raw.routes.is_empty() {
            return Err((
                None,
                "no routes: add at least one [[routes]] table with a topic and an http or exec target"
                    .to_owned(),
            ));
        }
        let mut routes = Vec::new();
        let mut exact = HashSet::new();
        for r in raw.routes {
            let line = line_of(r.topic.span().start);
            let fail = |message: String| Err((Some(line), message));
            let topic = r.topic.into_inner();
            if let Err(why) = check_pattern(&topic) {
                return fail(format!("route {topic:?} can never match a topic: {why}"));
            }
            if !topic.contains('*') && !exact.insert(topic.clone()) {
                return fail(format!("topic {topic:?} has two routes; keep one"));
            }
            let target = match (r.http, r.exec) {
                (Some(_), Some(_)) => {
                    return fail(format!(
                        "route {topic:?} has both http and exec; give it one target"
                    ))
                }
                (None, None) => {
                    return fail(format!(
                        "route {topic:?} has no target: add http = \"http://...\" or exec = [\"program\", \"arg\"]"
                    ))
                }
                (Some(url), None) => {
                    if let Some(names) = &r.inherit_env {
                        return Err((
                            Some(line_of(names.span().start)),
                            format!("route {topic:?}: inherit_env only applies to exec targets"),
                        ));
                    }
                    let line = line_of(url.span().start);
                    let url = url.into_inner();
                    let parsed = check_url(&url).map_err(|why| (Some(line), why))?;
                    let mut headers = Vec::new();
                    for (name, value) in r.headers {
                        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                            || reqwest::header::HeaderValue::from_str(&value).is_err()
                        {
                            return fail(format!("route {topic:?}: header {name:?} is not a valid HTTP header"));
                        }
                        headers.push((name, value));
                    }
                    Target::Http {
                        url: parsed,
                        headers,
                    }
                }
                (None, Some(argv)) => {
                    let line = line_of(argv.span().start);
                    let argv = argv.into_inner();
                    if !r.headers.is_empty() {
                        return fail(format!(
                            "route {topic:?}: headers only apply to http targets"
                        ));
                    }
                    check_program(&argv).map_err(|why| (Some(line), why))?;
                    let inherit_env = match r.inherit_env {
                        None => DEFAULT_INHERIT_ENV.map(str::to_owned).to_vec(),
                        Some(names) => {
                            let line = line_of(names.span().start);
                            let names = names.into_inner();
                            if let Some(bad) = names.iter().find(|n| {
                                n.is_empty() || n.contains(['=', '\0'])
                            }) {
                                return Err((
                                    Some(line),
                                    format!("route {topic:?}: inherit_env has {bad:?}, which is not an environment variable name"),
                                ));
                            }
                            names
                        }
                    };
                    Target::Exec { argv, inherit_env }
                }
            };
            if r.concurrency == 0 || r.concurrency > 10_000 {
                return fail(format!(
                    "route {topic:?}: concurrency must be 1 to 10000, not {}",
                    r.concurrency
                ));
            }
            if r.timeout.is_zero() || r.timeout > MAX_TIMEOUT {
                return fail(format!(
                    "route {topic:?}: timeout must be more than 0 and at most 24h"
                ));
            }
            let backoff = match r.backoff {
                None => BackoffSpec::Exponential {
                    base: Duration::from_secs(1),
                    max: Duration::from_secs(600),
                },
                Some(b) => match (b.base, b.max, b.fixed) {
                    (None, None, Some(d)) => BackoffSpec::Fixed(d),
                    (base, max, None) => {
                        let base = base.unwrap_or(Duration::from_secs(1));
                        let max = max.unwrap_or(Duration::from_secs(600)).max(base);
                        BackoffSpec::Exponential { base, max }
                    }
                    _ => {
                        return fail(format!(
                            "route {topic:?}: backoff is either {{ fixed = \"5s\" }} or {{ base = \"1s\", max = \"10m\" }}"
                        ))
                    }
                },
            };
            let longest = match backoff {
                BackoffSpec::Exponential { max, .. } => max,
                BackoffSpec::Fixed(d) => d,
            };
            if longest > MAX_BACKOFF {
                return fail(format!(
                    "route {topic:?}: backoff delays are at most 30 days"
                ));
            }
            routes.push(Route {
                topic,
                target,
                concurrency: r.concurrency,
                timeout: r.timeout,
                max_retry: r.max_retry,
                backoff,
                line,
            });
        }
        if raw.discover_interval < MIN_DISCOVER || raw.discover_interval > MAX_DISCOVER {
            let line = text
                .lines()
                .position(|l| l.trim_start().starts_with("discover_interval"))
                .map(|i| i + 1);
            return Err((
                line,
                "discover_interval must be between 100ms and 1h".to_owned(),
            ));
        }
        Ok(Config {
            listen: raw.listen,
            discover_interval: raw.discover_interval,
            routes,
        })
    }
}

/// A config file that cannot be used, and why.
#[derive(Debug)]
pub(crate) struct ConfigError {
    path: PathBuf,
    line: Option<usize>,
    message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}, line {line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<std::net::SocketAddr>,
    #[serde(default = "default_discover", with = "humantime_serde")]
    discover_interval: Duration,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    topic: Spanned<String>,
    http: Option<Spanned<String>>,
    exec: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
    #[serde(default = "default_max_retry")]
    max_retry: u32,
    backoff: Option<RawBackoff>,
    inherit_env: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    #[serde(default, with = "humantime_serde")]
    base: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    fixed: Option<Duration>,
}

fn default_discover() -> Duration {
    Duration::from_secs(2)
}

fn default_concurrency() -> usize {
    4
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_retry() -> u32 {
    3
}

/// Why no topic name could ever match `pattern`, by the library's own naming rules: the
/// shortest name it matches (each `*` matching nothing) must be a valid topic.
fn check_pattern(pattern: &str) -> Result<(), String> {
    let mut shortest = pattern.replace('*', "");
    if shortest.is_empty() && !pattern.is_empty() {
        shortest.push('a');
    }
    match forgemq::validate_topic(&shortest) {
        Ok(()) => Ok(()),
        Err(forgemq::Error::InvalidTopic { reason, .. }) => {
            Err(format!("{reason} (and * for any run of them)"))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn check_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("http = {url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "http = {url:?}: the scheme must be http or https, not {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("http = {url:?} has no host"));
    }
    Ok(parsed)
}

/// Where `program` is: itself when it names a path, else the first match on the
/// gateway's `PATH` (the command's own environment may have no `PATH` at all).
pub(crate) fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.is_file());
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The program of an exec target must exist now, not fail on every delivery later.
fn check_program(argv: &[String]) -> Result<(), String> {
    let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
        return Err("exec is empty: give the program and its arguments, e.g. exec = [\"sh\", \"-c\", \"handle\"]".into());
    };
    if find_program(program).is_some() {
        Ok(())
    } else {
        Err(format!(
            "exec program {program:?} was not found{}",
            if program.contains('/') {
                ""
            } else {
                " on PATH"
            }
        ))
    }
}

/// `*` matches any run of bytes (dots included); everything else matches itself.
fn glob_matches(pattern: &[u8], name: &[u8]) -> bool {
    // Iterative with one backtrack point: linear enough for 200-byte names.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_matches(b"order.*", b"order.created"));
        assert!(glob_matches(b"order.*", b"order.payment.check"));
        assert!(!glob_matches(b"order.*", b"order"));
        assert!(!glob_matches(b"order.*", b"user.order.x"));
        assert!(glob_matches(b"*", b"anything"));
        assert!(glob_matches(b"*.retry", b"payment.retry"));
        assert!(glob_matches(b"a*b*c", b"axxbyyc"));
        assert!(!glob_matches(b"a*b*c", b"axxbyy"));
        assert!(glob_matches(b"user.welcome", b"user.welcome"));
        assert!(!glob_matches(b"user.welcome", b"user.welcomes"));
    }

    fn err(text: &str) -> (Option<usize>, String) {
        Config::parse(text).expect_err("should be refused")
    }

    #[test]
    fn errors_name_the_line() {
        let (line, msg) = err("[[routes]]\ntopic = \"a\"\nhttp = \"http://x/\"\nconcurency = 2\n");
        assert_eq!(line, Some(4), "{msg}");
        assert!(msg.contains("concurency"), "{msg}");

        let (line, msg) = err("[[routes]]\ntopic = \"a\"\nhttp = \"ftp://x/\"\n");
        assert_eq!(line, Some(3), "{msg}");
        assert!(msg.contains("scheme"), "{msg}");

        let (line, msg) = err("[[routes]]\ntopic = \"a\"\nhttp = \"http://x/\"\n\n[[routes]]\ntopic = \"order/*\"\nhttp = \"http://x/\"\n");
        assert_eq!(line, Some(6), "{msg}");
        assert!(msg.contains("never match"), "{msg}");

        let (line, msg) = err("[[routes]]\ntopic = \"a\"\n");
        assert_eq!(line, Some(2), "{msg}");
        assert!(msg.contains("no target"), "{msg}");

        let (_, msg) = err("[[routes]]\ntopic = \"a\"\nexec = [\"no-such-program-xyz\"]\n");
        assert!(msg.contains("not found"), "{msg}");

        let (line, msg) =
            err("[[routes]]\ntopic = \"a\"\nhttp = \"http://x/\"\ntimeout = \"soon\"\n");
        assert_eq!(line, Some(4), "{msg}");

        let (_, msg) = err("");
        assert!(msg.contains("no routes"), "{msg}");

        let (line, msg) =
            err("discover_interval = \"0s\"\n[[routes]]\ntopic = \"a\"\nhttp = \"http://x/\"\n");
        assert_eq!(line, Some(1), "{msg}");
        let (line, msg) =
            err("[[routes]]\ntopic = \"a\"\nhttp = \"http://x/\"\ntimeout = \"10000000000s\"\n");
        assert_eq!(line, Some(2), "{msg}");
        assert!(msg.contains("24h"), "{msg}");
    }

    #[test]
    fn exact_routes_win_over_patterns() {
        let c = Config::parse(
            "[[routes]]\ntopic = \"order.*\"\nhttp = \"http://a/\"\n\n[[routes]]\ntopic = \"order.reminder\"\nexec = [\"sh\", \"-c\", \"true\"]\nconcurrency = 1\ntimeout = \"5s\"\nbackoff = { fixed = \"2s\" }\n",
        )
        .unwrap();
        assert_eq!(c.route_for("order.reminder").unwrap().line, 6);
        assert_eq!(c.route_for("order.created").unwrap().line, 2);
        assert!(c.route_for("user.welcome").is_none());
        let r = c.route_for("order.reminder").unwrap();
        assert_eq!(r.timeout, Duration::from_secs(5));
        assert_eq!(r.backoff, BackoffSpec::Fixed(Duration::from_secs(2)));
    }

    #[test]
    fn inherit_env_defaults_and_checks() {
        let c = Config::parse(
            "[[routes]]\ntopic = \"a\"\nexec = [\"sh\"]\n\n[[routes]]\ntopic = \"b\"\nexec = [\"sh\"]\ninherit_env = [\"PATH\", \"MY_VAR\"]\n",
        )
        .unwrap();
        let inherited = |topic: &str| match &c.route_for(topic).unwrap().target {
            Target::Exec { inherit_env, .. } => inherit_env.clone(),
            Target::Http { .. } => panic!("exec route"),
        };
        assert_eq!(
            inherited("a"),
            DEFAULT_INHERIT_ENV.map(str::to_owned).to_vec()
        );
        assert_eq!(inherited("b"), vec!["PATH", "MY_VAR"]);
        let (line, msg) =
            err("[[routes]]\ntopic = \"a\"\nhttp = \"http://x/\"\ninherit_env = [\"PATH\"]\n");
        assert_eq!(line, Some(4), "{msg}");
        assert!(msg.contains("only applies to exec"), "{msg}");
        let (line, msg) =
            err("[[routes]]\ntopic = \"a\"\nexec = [\"sh\"]\ninherit_env = [\"A=B\"]\n");
        assert_eq!(line, Some(4), "{msg}");
        assert!(msg.contains("A=B"), "{msg}");
    }

    #[test]
    fn moving_a_route_in_the_file_changes_nothing() {
        let a = Config::parse("[[routes]]\ntopic = \"a\"\nhttp = \"http://x/\"\n").unwrap();
        let b = Config::parse("# a comment\n\n[[routes]]\ntopic = \"a\"\nhttp = \"http://x/\"\n")
            .unwrap();
        assert_ne!(a.routes[0].line, b.routes[0].line);
        assert_eq!(a.routes[0], b.routes[0]);
    }
}
