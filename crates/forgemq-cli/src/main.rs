//! `forgemq`: the operator's command line for ForgeMQ queues on Redis.
//!
//! Every command takes `--redis URL` (else `$REDIS_URL`, else `redis://127.0.0.1:6379`; also
//! `redis+cluster://` and `redis+sentinel://`), `--namespace NS` (default `mq`) and
//! `--replicas N` / `--replicas-timeout DUR`; read commands take `--json` for stable
//! machine output.
//! Errors are one line on stderr; the exit code is 2 for usage errors, 1 for runtime errors.
//!
//! # Layout
//! - `main.rs`: the command-line grammar (clap) and dispatch.
//! - `output.rs`: aligned tables and the JSON shapes of read commands.
//! - `serve/`: `forgemq serve`, the HTTP API, its OpenAPI contract, the dashboard, metrics,
//!   health endpoints and who may call them (token, `Host`, `Origin`).
//! - `dev.rs`: `forgemq dev`, a private redis-server (its data folder locked) plus `serve`,
//!   with no configuration.
//! - `gateway/`: `forgemq gateway`, delivery of messages to HTTP endpoints and commands.
//! - `exposition.rs`: `/metrics` as OpenMetrics or the Prometheus text format, as asked.
//! - `logging.rs`: log lines on stderr, as text or JSON (`--log-format`).

mod dev;
mod exposition;
mod gateway;
mod logging;
mod output;
mod serve;

use std::io::{BufRead, Read};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use forgemq::{
    Client, MessageId, MessageState, Missed, PublishOptions, PublishOutcome, RateLimit,
    ScheduleSpec, TopicOptions, UniqueUntil, MAX_PARTITIONS,
};
use futures::StreamExt;
use serde_json::Value;

/// Most messages `publish --file` sends per round trip.
const FILE_CHUNK: usize = 1000;

/// Why a message id may be unknown, for `status` and `GET .../messages/{id}`.
pub(crate) const UNKNOWN_MESSAGE: &str = "never published, purged, or finished longer ago than the topic keeps records of finished messages (by default the last 1,000 for an hour)";

/// ForgeMQ: a reliable message queue on Redis.
///
/// Publish messages, look at queues, browse and replay the dead-letter queue, pause topics.
/// Topics are names like `user.welcome` or `order.payment.check`.
#[derive(Debug, Parser)]
#[command(name = "forgemq", version, propagate_version = true)]
struct Cli {
    /// Redis to use: redis://HOST:PORT, redis+cluster://HOST:PORT,HOST:PORT (Redis
    /// Cluster), redis+sentinel://HOST:PORT,HOST:PORT/MASTER (Sentinel); rediss… for TLS
    /// [default: redis://127.0.0.1:6379; `dev` starts its own].
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    redis: Option<String>,
    /// Key namespace (the prefix of every key ForgeMQ writes).
    #[arg(long, global = true, default_value = "mq")]
    namespace: String,
    /// Count a publish (and a worker's acknowledgement) as done only once N replicas of
    /// the master confirmed it (Redis WAIT), so that a failover loses none; 0: don't wait.
    #[arg(
        long,
        global = true,
        env = "FORGEMQ_REPLICAS",
        default_value_t = 0,
        value_name = "N"
    )]
    replicas: usize,
    /// How long --replicas waits for the replicas before the write counts as not
    /// replicated (an error; the message is on the master), e.g. `500ms`, `2s`.
    #[arg(
        long,
        global = true,
        env = "FORGEMQ_REPLICAS_TIMEOUT",
        default_value = "1s",
        value_parser = parse_replicas_timeout,
        value_name = "DUR"
    )]
    replicas_timeout: Duration,
    /// How log lines on stderr are written: `text`, or `json` (one object per line, for
    /// log pipelines; the status lines and the final error too). `RUST_LOG` sets levels.
    #[arg(
        long,
        global = true,
        env = "FORGEMQ_LOG_FORMAT",
        value_enum,
        default_value_t = logging::LogFormat::Text,
        value_name = "FORMAT"
    )]
    log_format: logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--header NAME=VALUE`.
fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

/// `--replicas-timeout`: a humantime duration of at least 1 ms (`WAIT` counts whole
/// milliseconds, and `WAIT n 0` would wait forever).
fn parse_replicas_timeout(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(1) {
        return Err("must be at least 1ms (0 would wait forever)".to_owned());
    }
    Ok(d)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish one message (prints its id), or many from a JSON-lines file.
    Publish {
        /// The topic, e.g. `user.welcome`.
        topic: String,
        /// The message data as JSON, or `-` to read it from stdin.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        data: Option<String>,
        /// Deliver no earlier than this from now, e.g. `30s`, `15m`, `24h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Option<Duration>,
        /// Retries before the dead-letter queue (default: the consumer's setting, 3).
        #[arg(long)]
        max_retry: Option<u32>,
        /// Publish at most one message with this key per `--unique-ttl`.
        #[arg(long)]
        unique_key: Option<String>,
        /// How long a unique key holds at most.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h", requires = "unique_key")]
        unique_ttl: Duration,
        /// When the unique key is released: `final` when the message is processed,
        /// cancelled, purged or dead-lettered (or the ttl ends, if sooner); `ttl` only when
        /// the ttl ends.
        #[arg(long, value_enum, default_value_t = UniqueUntilArg::Final, requires = "unique_key")]
        unique_until: UniqueUntilArg,
        /// Which partition of a partitioned topic it goes to: messages with the same key go
        /// to the same one (default: the unique key, else the id, hashed).
        #[arg(long, value_name = "KEY")]
        partition_key: Option<String>,
        /// Publish every line of this JSON-lines file as one message (prints the ids).
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// A header NAME=VALUE the consumer reads beside the data (e.g. a W3C
        /// `traceparent`); repeatable.
        #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// The fair group it waits in, e.g. a tenant: workers take from the groups in
        /// turn, so one group's backlog does not delay another (see `forgemq group`).
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
    },
    /// Counts per state and counters of one topic, or of all topics.
    Stats {
        /// The topic; all topics when omitted.
        topic: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// All topics with their counts per state.
    Queues {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What happened to one message: its state (pending, delayed, active, done, dead,
    /// cancelled), retries, progress, result and last error; for a running one which
    /// worker holds it and since when. Finished messages are kept for the topic's result
    /// retention (default: the last 1,000 for an hour). Exits 1 when the id is unknown.
    Status {
        /// The topic.
        topic: String,
        /// The message id.
        id: String,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// The live workers: host, pid, state, topics with running handlers and slots.
    /// A worker that stops heartbeating drops out after three heartbeat intervals.
    Workers {
        /// Only the workers of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Look at messages of one state without taking them.
    Peek {
        /// The topic.
        topic: String,
        /// Which state.
        #[arg(long, value_enum, default_value_t = StateArg::Pending)]
        state: StateArg,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The dead-letter queue: list, retry, delete, purge.
    #[command(subcommand)]
    Dlq(Dlq),
    /// Partitioned topics: create one (or change its partition count), list them.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Cancel a delayed or pending message (e.g. the payment check of a paid order).
    Cancel {
        /// The topic.
        topic: String,
        /// The message id.
        id: String,
    },
    /// Pause a topic: workers everywhere stop taking its messages; publishing still works.
    Pause {
        /// The topic.
        topic: String,
    },
    /// Resume a paused topic.
    Resume {
        /// The topic.
        topic: String,
    },
    /// Delete every message of a topic in every state, and its record of processed ids
    /// (counters stay). Asks first on a terminal; needs --yes without one.
    Purge {
        /// The topic.
        topic: String,
        /// Don't ask: needed when stdin is not a terminal (scripts, CI).
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Serve the HTTP API (`/api/v1`, OpenAPI at `/api/v1/openapi.json`), the dashboard,
    /// `/metrics`, `/healthz` and `/readyz`.
    Serve {
        /// Address to listen on. Anything but loopback requires a token.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: std::net::SocketAddr,
        /// Require `Authorization: Bearer <token>` on the API.
        #[arg(long, env = "FORGEMQ_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Zero-configuration start on one machine: starts a private redis-server (AOF on,
    /// data under ./.forgemq/) unless --redis or REDIS_URL is given, then serves the API.
    Dev {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: std::net::SocketAddr,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// Deliver messages to HTTP endpoints or commands, by route (the seed's Gateway
    /// Worker): retries with backoff, then the dead-letter queue. SIGHUP reloads the config;
    /// SIGTERM drains. See docs/gateway.md.
    Gateway {
        /// The routes file (TOML), e.g. examples/gateway/gateway.toml.
        #[arg(long)]
        config: std::path::PathBuf,
        /// Address of /healthz, /ready and /metrics [default: the config's `listen`, else
        /// 127.0.0.1:8084].
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Don't run a scheduler here (one runs by default; see `forgemq schedule`).
        #[arg(long)]
        no_scheduler: bool,
    },
    /// Schedules: a message published on a cron pattern or every N (HA: every worker,
    /// serve, dev and gateway fire them, and each fire time gives exactly one message).
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Global rate limits per topic: at most RATE deliveries, across every worker.
    #[command(subcommand)]
    Limit(LimitCommand),
    /// Fair groups of a topic (`publish --group`): per group the most handled at once,
    /// the weight in the round robin, and a pause.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Print shell completions, e.g. `forgemq completions bash > /etc/bash_completion.d/forgemq`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Who may reach `serve` and `dev` besides the defaults.
#[derive(Debug, Clone, clap::Args)]
struct AccessArgs {
    /// On a loopback bind, also answer requests whose Host is NAME or NAME:PORT (a reverse
    /// proxy's name, say); other names get 403 against DNS rebinding. Repeatable.
    #[arg(long = "allow-host", value_name = "NAME")]
    allow_hosts: Vec<String>,
    /// Serve /metrics without the token (for a Prometheus that can't send one); the API
    /// still needs it. /healthz and /readyz are always open.
    #[arg(long)]
    metrics_public: bool,
    /// Don't run a scheduler here (by default serve, dev, the gateway and every worker
    /// fire the namespace's schedules; any number may, each fire still gives one message).
    #[arg(long)]
    no_scheduler: bool,
}

/// `--unique-until`: how long a unique key holds.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum UniqueUntilArg {
    Final,
    Ttl,
}

impl From<UniqueUntilArg> for UniqueUntil {
    fn from(u: UniqueUntilArg) -> Self {
        match u {
            UniqueUntilArg::Final => UniqueUntil::Final,
            UniqueUntilArg::Ttl => UniqueUntil::Ttl,
        }
    }
}

/// The states `peek` can look into.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StateArg {
    Pending,
    Delayed,
    Active,
    Dead,
}

impl From<StateArg> for MessageState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => MessageState::Pending,
            StateArg::Delayed => MessageState::Delayed,
            StateArg::Active => MessageState::Active,
            StateArg::Dead => MessageState::Dead,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Dlq {
    /// List dead letters, oldest first, with the error that killed each.
    List {
        /// The topic.
        topic: String,
        /// How many to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only those whose error contains TEXT (any case), among the 10,000 oldest.
        #[arg(long, value_name = "TEXT")]
        error: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to the queue with fresh retries: the ids given, those whose
    /// error contains TEXT, or all of them.
    Retry {
        /// The topic.
        topic: String,
        /// Message ids.
        #[arg(required_unless_present_any = ["all", "error"], conflicts_with_all = ["all", "error"])]
        ids: Vec<String>,
        /// Every dead letter of the topic.
        #[arg(long, conflicts_with = "error")]
        all: bool,
        /// Those whose error contains TEXT (any case), among the 10,000 oldest.
        #[arg(long, value_name = "TEXT")]
        error: Option<String>,
    },
    /// Delete dead letters for good: the ids given, or those whose error contains TEXT.
    Delete {
        /// The topic.
        topic: String,
        /// Message ids.
        #[arg(required_unless_present = "error", conflicts_with = "error")]
        ids: Vec<String>,
        /// Those whose error contains TEXT (any case), among the 10,000 oldest.
        #[arg(long, value_name = "TEXT")]
        error: Option<String>,
    },
    /// Delete every dead letter of the topic for good. Asks first on a terminal; needs
    /// --yes without one.
    Purge {
        /// The topic.
        topic: String,
        /// Don't ask: needed when stdin is not a terminal (scripts, CI).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Set how workers treat GROUP of TOPIC, for every worker from now on; settings not
    /// given keep their current value.
    Set {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// Most of its messages handled at once across every worker (0: no cap).
        #[arg(long)]
        max_active: Option<u32>,
        /// Messages it gives per turn of the round robin (1-1000; default 1).
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Pause GROUP: its messages wait, the other groups go on.
    Pause {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// Resume a paused GROUP.
    Resume {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// Remove the settings of GROUP (back to no cap, weight 1, not paused). Exits 1 if it
    /// had none.
    Rm {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
    },
    /// The groups of TOPIC: waiting, active, settings.
    Ls {
        /// The topic.
        topic: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LimitCommand {
    /// Limit how many messages of TOPIC start per unit of time, across every worker of
    /// every process, from now on (a token bucket in Redis: no burst at window edges).
    Set {
        /// The topic.
        topic: String,
        /// COUNT/PERIOD: `100/s`, `6000/m`, `10/h`, `5/500ms`.
        rate: String,
        /// How many may start at once after a quiet spell [default: a tenth of a second's
        /// worth, at least 1].
        #[arg(long)]
        burst: Option<u32>,
    },
    /// Remove the limit of TOPIC. Exits 1 if it had none.
    Rm {
        /// The topic.
        topic: String,
    },
    /// Every topic with a limit.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ScheduleCommand {
    /// Create or change a schedule. An unchanged spec keeps its next fire time.
    ///
    /// Its messages have the ids `schedule:<NAME>:<fire time in ms>`.
    Set {
        /// The schedule's name: 1-176 bytes, no spaces or control characters.
        name: String,
        /// A cron pattern: 5 fields (minute hour day month weekday), or 6 with seconds
        /// first, e.g. `*/5 * * * *` or `0 30 2 * * MON-FRI`.
        #[arg(long, required_unless_present = "every", conflicts_with = "every")]
        cron: Option<String>,
        /// The IANA time zone the cron pattern is read in, e.g. Asia/Shanghai.
        #[arg(long, default_value = "UTC", requires = "cron")]
        tz: String,
        /// Fire every DUR instead (at least 1s), e.g. `30s`, `15m`, counted from now.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DUR")]
        every: Option<Duration>,
        /// The topic its messages go to.
        #[arg(long)]
        topic: String,
        /// The data of its messages as JSON (default null).
        #[arg(long)]
        data: Option<String>,
        /// Fire times missed while no scheduler ran: `once` (one message now), `skip`
        /// (none), or `catch-up:N` (up to N, oldest first).
        #[arg(long, default_value = "once", value_name = "POLICY")]
        missed: String,
        /// Retries of each message before the dead-letter queue.
        #[arg(long)]
        max_retry: Option<u32>,
    },
    /// Remove a schedule (the messages it published stay). Exits 1 if there is none.
    Rm {
        /// The schedule's name.
        name: String,
    },
    /// Publish the schedule's message now (its regular times stay); prints the id.
    Run {
        /// The schedule's name.
        name: String,
    },
    /// Every schedule: spec, topic, next and last fire.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic with N partitions, or change its count while it holds no message.
    ///
    /// A partitioned topic spreads over N hash tags, so that on Redis Cluster it uses every
    /// master. There is no order across partitions; messages with the same
    /// `publish --partition-key` go to the same one. Workers, stats, peek, cancel and the
    /// dead-letter commands take the topic's name as for a plain one.
    Create {
        /// The topic.
        topic: String,
        /// How many partitions: 1 (a plain topic) to 1024.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PARTITIONS)))]
        partitions: u32,
    },
    /// Every topic with its partition count (1: a plain topic).
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print them as clap does.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other error; --help has the rest.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid usage");
            eprintln!("{first} (see `forgemq --help`)");
            return ExitCode::from(2);
        }
    };
    // Long-running commands use every core; one-shot commands need one thread.
    let long_running = matches!(
        cli.command,
        Command::Gateway { .. } | Command::Serve { .. } | Command::Dev { .. }
    );
    logging::init(cli.log_format, long_running);
    let mut builder = if long_running {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            logging::fatal(&format!("could not start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let url = cli.redis.clone().unwrap_or_default();
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the cause chain joined, so scripts can log it as is. A cause may
            // hold line breaks of its own (a redis-rs parse error quoting what a non-Redis
            // port answered, say): they are folded too.
            let text = format!("{e:#}");
            let one_line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            logging::fatal(&hide_sentinel_password(&one_line.join(" "), &url));
            // A config file that cannot be used is a usage error, like a bad flag.
            if e.downcast_ref::<gateway::ConfigError>().is_some()
                || e.downcast_ref::<UsageError>().is_some()
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A command used in a way it can't work (exit code 2, like a bad flag).
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The topic a destructive command deletes from, when it still has to be confirmed:
/// `None` for every other command and with `--yes`.
fn unconfirmed_purge(command: &Command) -> Option<(&'static str, &str)> {
    match command {
        Command::Purge { topic, yes: false } => Some(("purge", topic)),
        Command::Dlq(Dlq::Purge { topic, yes: false }) => Some(("dlq purge", topic)),
        _ => None,
    }
}

/// Asks on the terminal (prompt on stderr) to type the topic name back; an error unless
/// the answer is exactly that. A y/N would be answered by reflex; the name makes the
/// operator read which topic goes.
fn confirm(what: &str, topic: &str) -> Result<()> {
    use std::io::Write;
    eprint!("{what}\nType the topic name ({topic}) to confirm: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("could not read the answer")?;
    let answer = answer.trim();
    if answer == topic {
        Ok(())
    } else {
        bail!("not confirmed ({answer:?} is not {topic:?}); nothing was deleted")
    }
}

/// The data of `publish`: JSON from the argument, or from stdin for `-`.
fn parse_data(arg: &str) -> Result<Value> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("could not read the data from stdin")?;
        s
    } else {
        arg.to_owned()
    };
    serde_json::from_str(&text).context("the data is not valid JSON (quote strings: '\"text\"')")
}

/// Redis when neither `--redis` nor `REDIS_URL` says otherwise.
const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379";

/// What every connection is made with besides its URL: the global flags.
#[derive(Debug, Clone)]
pub(crate) struct ConnectOptions {
    /// `--namespace`.
    pub(crate) namespace: String,
    /// `--replicas`: 0 when writes don't wait for replicas.
    pub(crate) replicas: usize,
    /// `--replicas-timeout`.
    pub(crate) replicas_timeout: Duration,
}

impl Cli {
    fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            namespace: self.namespace.clone(),
            replicas: self.replicas,
            replicas_timeout: self.replicas_timeout,
        }
    }
}

async fn connect(cli: &Cli) -> Result<Client> {
    connect_to(
        cli.redis.as_deref().unwrap_or(DEFAULT_REDIS),
        &cli.connect_options(),
    )
    .await
}

/// Connects as the global flags say. The library bounds the time it takes (a dead seed
/// list or sentinel group fails within seconds) and names what is wrong.
pub(crate) async fn connect_to(url: &str, options: &ConnectOptions) -> Result<Client> {
    Client::builder(url)
        .namespace(&options.namespace)
        .replicas(options.replicas, options.replicas_timeout)
        .build()
        .await
        .with_context(|| {
            format!(
                "could not connect to {} (set --redis or REDIS_URL)",
                redact(url)
            )
        })
}

/// The URL without its passwords, for messages: the user's (`user:pass@`) and the
/// sentinels' (`?sentinel_password=`).
pub(crate) fn redact(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((u, q)) => (u, Some(q)),
        None => (url, None),
    };
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.contains("password") => format!("{name}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// `text` with the sentinel password of `url` shown as `***`: the library's message for a
/// malformed URL quotes the URL with it. Only `sentinel_password=<that value>` is
/// replaced, so the rest of the message stays as written.
fn hide_sentinel_password(text: &str, url: &str) -> String {
    let Some((_, query)) = url.split_once('?') else {
        return text.to_owned();
    };
    let mut text = text.to_owned();
    for pair in query.split('&') {
        if let Some(("sentinel_password", value)) = pair.split_once('=') {
            if !value.is_empty() {
                text = text.replace(
                    &format!("sentinel_password={value}"),
                    "sentinel_password=***",
                );
            }
        }
    }
    text
}

/// `forgemq schedule ...`.
async fn group(mq: &Client, command: GroupCommand) -> Result<()> {
    match command {
        GroupCommand::Set {
            topic,
            group,
            max_active,
            weight,
        } => {
            let mut settings = mq.group_settings(&topic, &group).await?;
            if let Some(n) = max_active {
                settings = settings.max_active(n);
            }
            if let Some(w) = weight {
                settings = settings.weight(w);
            }
            mq.set_group(&topic, &group, settings).await?;
            println!("{}", output::group_line(&topic, &group, &settings));
        }
        GroupCommand::Pause { topic, group } => {
            mq.pause_group(&topic, &group).await?;
            println!("{topic} {group}: paused");
        }
        GroupCommand::Resume { topic, group } => {
            mq.resume_group(&topic, &group).await?;
            println!("{topic} {group}: resumed");
        }
        GroupCommand::Rm { topic, group } => {
            if !mq.remove_group(&topic, &group).await? {
                bail!("group {group:?} of {topic:?} has no settings");
            }
            println!("{topic} {group}: no settings (no cap, weight 1)");
        }
        GroupCommand::Ls { topic, json } => {
            let all = mq.groups(&topic).await?;
            if json {
                return output::print_json(&all);
            }
            output::groups_table(&topic, &all);
        }
    }
    Ok(())
}

async fn schedule(mq: &Client, command: ScheduleCommand) -> Result<()> {
    match command {
        ScheduleCommand::Set {
            name,
            cron,
            tz,
            every,
            topic,
            data,
            missed,
            max_retry,
        } => {
            let mut spec = match (cron, every) {
                (Some(cron), _) => ScheduleSpec::cron(cron).tz(tz),
                (None, Some(every)) => ScheduleSpec::every(every),
                (None, None) => bail!("give --cron EXPR or --every DUR"),
            };
            spec = spec.topic(topic).missed(
                missed
                    .parse::<Missed>()
                    .map_err(|e| UsageError(e.to_string()))?,
            );
            if let Some(data) = data {
                spec = spec.data(parse_data(&data)?);
            }
            if let Some(n) = max_retry {
                spec = spec.options(PublishOptions::new().max_retry(n));
            }
            let s = mq.upsert_schedule(&name, spec).await?;
            let next = s
                .next_fire
                .map_or_else(|| "never".to_owned(), output::rfc3339);
            println!("schedule {} set: next fire {next}", s.name);
            Ok(())
        }
        ScheduleCommand::Rm { name } => {
            if mq.remove_schedule(&name).await? {
                println!("schedule {name} removed");
                Ok(())
            } else {
                bail!("no schedule named {name:?}")
            }
        }
        ScheduleCommand::Run { name } => {
            println!("{}", mq.run_schedule_now(&name).await?);
            Ok(())
        }
        ScheduleCommand::Ls { json } => {
            let all = mq.schedules().await?;
            if json {
                output::print_json(&all)
            } else {
                output::schedules_table(&all);
                Ok(())
            }
        }
    }
}

fn parse_id(id: &str) -> Result<MessageId> {
    MessageId::new(id).with_context(|| format!("{id:?} is not a message id"))
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "forgemq",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    // Check the data before connecting: bad input is refused the same way with Redis down.
    let data = match &cli.command {
        Command::Publish {
            data: Some(data), ..
        } => Some(parse_data(data)?),
        _ => None,
    };
    if let Command::Gateway {
        config,
        listen,
        no_scheduler,
    } = &cli.command
    {
        return gateway::run(
            cli.redis.as_deref().unwrap_or(DEFAULT_REDIS),
            &cli.connect_options(),
            config,
            *listen,
            !*no_scheduler,
        )
        .await;
    }
    if let Command::Dev { bind, access } = &cli.command {
        let options = serve::Options {
            token: None,
            allow_hosts: access.allow_hosts.clone(),
            metrics_public: access.metrics_public,
            scheduler: !access.no_scheduler,
        };
        return dev::run(cli.redis.as_deref(), &cli.connect_options(), *bind, options).await;
    }
    // Settings that would expose the queues are refused before anything starts.
    let serving = match &cli.command {
        Command::Serve {
            bind,
            token,
            access,
        } => {
            let options = serve::Options {
                token: token.clone(),
                allow_hosts: access.allow_hosts.clone(),
                metrics_public: access.metrics_public,
                scheduler: !access.no_scheduler,
            };
            options.check(*bind)?;
            Some((*bind, options))
        }
        _ => None,
    };
    // Without a terminal there is nobody to ask: refuse before connecting, so that a
    // script gets the same answer whatever the state of Redis.
    if let Some((command, topic)) = unconfirmed_purge(&cli.command) {
        if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            return Err(UsageError(format!(
                "`forgemq {command} {topic}` deletes messages for good and stdin is not a terminal to confirm on: pass --yes"
            ))
            .into());
        }
    }
    let mq = connect(&cli).await?;
    if let Some((bind, options)) = serving {
        let listener = serve::bind(bind).await?;
        logging::say(&format!("forgemq serve: API at http://{bind}/api/v1 (OpenAPI: /api/v1/openapi.json), dashboard at /, metrics at /metrics, health at /healthz and /readyz"));
        return serve::serve(mq, listener, options).await;
    }
    match cli.command {
        Command::Publish {
            topic,
            data: _,
            delay,
            max_retry,
            unique_key,
            unique_ttl,
            unique_until,
            partition_key,
            file,
            headers,
            group,
        } => {
            let mut options = PublishOptions::new();
            if let Some(g) = group {
                options = options.group(g);
            }
            for (name, value) in headers {
                options = options.header(name, value);
            }
            if let Some(k) = partition_key {
                options = options.partition_key(k);
            }
            if let Some(d) = delay {
                options = options.delay(d);
            }
            if let Some(n) = max_retry {
                options = options.max_retry(n);
            }
            if let Some(k) = unique_key {
                options = options
                    .unique_key(k, unique_ttl)
                    .unique_until(unique_until.into());
            }
            match (file, data) {
                (Some(path), _) => publish_file(&mq, &topic, &path, &options).await,
                (None, Some(value)) => {
                    // The id is made here rather than in the library (the same kind of
                    // id, placed the same way) so that an error after the write can name it.
                    let id = MessageId::generate();
                    let outcome = mq
                        .publish_with(&topic, value, options.id(id.clone()))
                        .await
                        .map_err(|e| {
                            if e.is_not_replicated() {
                                anyhow::Error::new(e).context(format!(
                                    "message {id} is stored on the master of {topic}, but not yet on enough replicas"
                                ))
                            } else {
                                e.into()
                            }
                        })?;
                    match outcome {
                        PublishOutcome::Duplicate(id) => {
                            eprintln!("duplicate: message {id} already holds this unique key or id; nothing published");
                            println!("{id}");
                        }
                        outcome => println!("{}", outcome.id()),
                    }
                    Ok(())
                }
                (None, None) => bail!("give the data as an argument, `-` for stdin, or --file"),
            }
        }
        Command::Stats { topic, json } => {
            // The JSON shape follows the arguments, never the data: one object for one
            // topic, an array without one.
            match (topic, json) {
                (Some(t), true) => output::print_json(&mq.stats(&t).await?),
                (None, true) => output::print_json(&mq.get_all_queues().await?),
                (Some(t), false) => {
                    output::stats_table(&[mq.stats(&t).await?], output::Partitions::Each);
                    Ok(())
                }
                (None, false) => {
                    output::stats_table(&mq.get_all_queues().await?, output::Partitions::Sum);
                    Ok(())
                }
            }
        }
        Command::Queues { json } => {
            let all = mq.get_all_queues().await?;
            if json {
                output::print_json(&all)
            } else {
                output::stats_table(&all, output::Partitions::Sum);
                Ok(())
            }
        }
        Command::Topic(TopicCommand::Create { topic, partitions }) => {
            create_topic(&mq, &topic, partitions).await
        }
        Command::Schedule(command) => schedule(&mq, command).await,
        Command::Limit(LimitCommand::Set { topic, rate, burst }) => {
            let mut limit: RateLimit = rate
                .parse()
                .map_err(|e: forgemq::Error| UsageError(e.to_string()))?;
            if let Some(b) = burst {
                limit = limit.burst(b);
            }
            mq.set_rate_limit(&topic, limit).await?;
            println!("{topic}: at most {limit} (burst {})", limit.burst_size());
            Ok(())
        }
        Command::Group(command) => group(&mq, command).await,
        Command::Limit(LimitCommand::Rm { topic }) => {
            if mq.remove_rate_limit(&topic).await? {
                println!("{topic}: no limit");
                Ok(())
            } else {
                bail!("{topic:?} has no rate limit")
            }
        }
        Command::Limit(LimitCommand::Ls { json }) => {
            let all = mq.rate_limits().await?;
            if json {
                output::print_json(&all)
            } else {
                output::limits_table(&all);
                Ok(())
            }
        }
        Command::Topic(TopicCommand::Ls { json }) => {
            let all = mq.topic_infos().await?;
            if json {
                output::print_json(&all)
            } else {
                output::topics_table(&all);
                Ok(())
            }
        }
        Command::Peek {
            topic,
            state,
            limit,
            json,
        } => {
            let found = mq.peek(&topic, state.into(), 0..limit).await?;
            if json {
                output::print_json(&output::envelopes(&found))
            } else {
                output::peek_table(&found);
                Ok(())
            }
        }
        Command::Dlq(Dlq::List {
            topic,
            limit,
            error,
            json,
        }) => {
            let found = match error {
                Some(text) => mq.dead_letters_matching(&topic, &text, 0..limit).await?,
                None => mq.peek(&topic, MessageState::Dead, 0..limit).await?,
            };
            if json {
                output::print_json(&output::envelopes(&found))
            } else {
                output::peek_table(&found);
                Ok(())
            }
        }
        Command::Dlq(Dlq::Retry {
            topic,
            ids,
            all,
            error,
        }) => {
            if all {
                let n = mq.reprocess_all_dead_letters(&topic).await?;
                eprintln!("requeued {n} dead letters of {topic}");
            } else if let [id] = ids.as_slice() {
                // One id: a typed "no such dead letter" when it is not one.
                mq.reprocess_dead_letter(&topic, &parse_id(id)?).await?;
                eprintln!("requeued {id}");
            } else {
                let ids = selection(&mq, &topic, &ids, error.as_deref()).await?;
                let n = mq.reprocess_dead_letters(&topic, &ids).await?;
                eprintln!("requeued {n} of {} dead letters of {topic}", ids.len());
            }
            Ok(())
        }
        Command::Dlq(Dlq::Delete { topic, ids, error }) => {
            if let [id] = ids.as_slice() {
                mq.delete_dead_letter(&topic, &parse_id(id)?).await?;
                eprintln!("deleted dead letter {id}");
            } else {
                let ids = selection(&mq, &topic, &ids, error.as_deref()).await?;
                let n = mq.delete_dead_letters(&topic, &ids).await?;
                eprintln!("deleted {n} of {} dead letters of {topic}", ids.len());
            }
            Ok(())
        }
        Command::Status { topic, id, json } => {
            let id = parse_id(&id)?;
            let stored = mq.message(&topic, &id).await?;
            let status = mq.message_status(&topic, &id).await?;
            if stored.is_none() && status.state == forgemq::Status::Unknown {
                if json {
                    output::print_json(
                        &serde_json::json!({"id": id, "topic": topic, "state": "unknown"}),
                    )?;
                }
                bail!("no message {id} in {topic}: {UNKNOWN_MESSAGE}")
            }
            if json {
                output::print_json(&output::status(&topic, &id, stored.as_ref(), &status))
            } else {
                output::status_lines(&topic, &id, stored.as_ref(), &status);
                Ok(())
            }
        }
        Command::Workers { topic, json } => {
            let workers = match topic {
                Some(t) => mq.topic_workers(&t).await?,
                None => mq.workers().await?,
            };
            if json {
                output::print_json(&workers)
            } else {
                output::workers_table(&workers);
                Ok(())
            }
        }
        Command::Dlq(Dlq::Purge { topic, yes }) => {
            if !yes {
                let dead = mq.stats(&topic).await?.dead;
                confirm(
                    &format!(
                        "About to delete the {dead} dead letters of {topic} for good (they can't be retried after)."
                    ),
                    &topic,
                )?;
            }
            let n = mq.purge_dead_letters(&topic).await?;
            eprintln!("deleted {n} dead letters of {topic}");
            Ok(())
        }
        Command::Cancel { topic, id } => {
            let from = mq.cancel(&topic, &parse_id(&id)?).await?;
            eprintln!("cancelled {id} (it was {})", output::cancelled(from));
            Ok(())
        }
        Command::Pause { topic } => {
            mq.pause(&topic).await?;
            eprintln!("paused {topic}: workers stop taking its messages; publishing still works");
            Ok(())
        }
        Command::Resume { topic } => {
            let was = mq.resume(&topic).await?;
            eprintln!(
                "{}",
                if was {
                    format!("resumed {topic}")
                } else {
                    format!("{topic} was not paused")
                }
            );
            Ok(())
        }
        Command::Purge { topic, yes } => {
            if !yes {
                let s = mq.stats(&topic).await?;
                confirm(
                    &format!(
                        "About to delete every message of {topic}: {} pending, {} active, {} delayed, {} dead, \
                         and its record of processed ids. Active ones are being handled now; their outcome will be refused. \
                         This can't be undone.",
                        s.pending, s.active, s.delayed, s.dead
                    ),
                    &topic,
                )?;
            }
            let n = mq.purge_queue(&topic).await?;
            eprintln!(
                "deleted {} pending, {} active, {} delayed, {} dead messages of {topic}",
                n.pending, n.active, n.delayed, n.dead
            );
            Ok(())
        }
        Command::Completions { .. }
        | Command::Dev { .. }
        | Command::Gateway { .. }
        | Command::Serve { .. } => Ok(()),
    }
}

/// `topic create`: sets the partition count and says what changed, on stderr.
/// The dead letters a bulk `dlq retry` or `dlq delete` acts on: the ids given, or those
/// whose error contains `error`.
async fn selection(
    mq: &Client,
    topic: &str,
    ids: &[String],
    error: Option<&str>,
) -> Result<Vec<MessageId>> {
    let Some(text) = error else {
        return ids.iter().map(|id| parse_id(id)).collect();
    };
    let mut found = Vec::new();
    loop {
        let page = mq
            .dead_letters_matching(topic, text, found.len()..found.len() + 1000)
            .await?;
        let last = page.len() < 1000;
        found.extend(page.into_iter().map(|m| m.id));
        if last {
            return Ok(found);
        }
    }
}

async fn create_topic(mq: &Client, topic: &str, partitions: u32) -> Result<()> {
    // Read first only to say what happened; the library decides and checks.
    let before = mq.topic_info(topic).await?.partitions;
    let known = mq.topics().await?.iter().any(|t| t == topic);
    let info = mq
        .create_topic(topic, TopicOptions::new().partitions(partitions))
        .await
        .with_context(|| format!("could not give {topic} {}", output::partitions(partitions)))?;
    let now = output::partitions(info.partitions);
    if known && before == info.partitions {
        eprintln!("{topic} already has {now}; nothing changed");
    } else if known {
        eprintln!(
            "changed {topic} from {} to {now}",
            output::partitions(before)
        );
    } else {
        eprintln!("created {topic} with {now}");
    }
    Ok(())
}

/// Publishes every line of a JSON-lines file, 1,000 per round trip, with a progress bar
/// on stderr; prints the ids on stdout. Every line is checked before anything is sent.
async fn publish_file(
    mq: &Client,
    topic: &str,
    path: &std::path::Path,
    options: &PublishOptions,
) -> Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("could not open {}", path.display()))?;
    let mut items = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("could not read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not valid JSON", path.display(), n + 1))?;
        // Every line is checked before the first is sent: a bad line writes nothing.
        mq.validate_message(topic, &value, options)
            .with_context(|| format!("{}:{}", path.display(), n + 1))?;
        items.push(value);
    }
    let bar = indicatif::ProgressBar::new(items.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} messages {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut published = 0;
    let mut chunks = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        let chunk: Vec<(Value, PublishOptions)> = items
            .by_ref()
            .take(FILE_CHUNK)
            .map(|v| (v, options.clone()))
            .collect();
        chunks.push(chunk);
    }
    // Two chunks in flight: Redis stores one while the next is sent. Ids are printed in
    // file order.
    let mut sent = futures::stream::iter(chunks)
        .map(|chunk| mq.publish_batch_with(topic, chunk))
        .buffered(2);
    // After a failed chunk, the other one in flight may still have been stored: its ids
    // are printed too (so that a retry with them stores nothing twice), then the error.
    let mut failed = None;
    while let Some(outcomes) = sent.next().await {
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(e) => {
                failed.get_or_insert(e);
                continue;
            }
        };
        for outcome in &outcomes {
            if !outcome.is_duplicate() {
                published += 1;
            }
            println!("{}", outcome.id());
        }
        bar.inc(outcomes.len() as u64);
        if failed.is_some() {
            break;
        }
    }
    if let Some(e) = failed {
        bar.finish_and_clear();
        eprintln!("published {published} messages to {topic} before the error");
        return Err(e.into());
    }
    bar.finish_and_clear();
    eprintln!("published {published} messages to {topic}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{hide_sentinel_password, redact};

    /// Passwords never reach a message: the user's, and the sentinels' wherever the
    /// library quotes the URL.
    #[test]
    fn passwords_are_hidden_in_urls_and_messages() {
        let url = "redis+sentinel://ann:pw1@h:1,h:2/m?sentinel_password=pw2&bogus=1";
        assert_eq!(
            redact(url),
            "redis+sentinel://***@h:1,h:2/m?sentinel_password=***&bogus=1"
        );
        assert_eq!(redact("redis+cluster://h:1,h:2"), "redis+cluster://h:1,h:2");
        assert_eq!(
            hide_sentinel_password(
                "bad Redis URL redis+sentinel://***@h:1,h:2/m?sentinel_password=pw2&bogus=1: \
                 unknown option \"bogus=1\"; use ...[?sentinel_password=P] (rediss…)",
                url
            ),
            "bad Redis URL redis+sentinel://***@h:1,h:2/m?sentinel_password=***&bogus=1: \
             unknown option \"bogus=1\"; use ...[?sentinel_password=P] (rediss…)"
        );
    }
}
