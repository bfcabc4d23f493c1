//! A private, disposable `redis-server` process per test.
//!
//! Tests that share one Redis interfere with each other (keys, `FLUSHALL`,
//! command statistics, crashes), and crash-recovery tests need to kill and
//! restart the server, which is impossible on a shared instance. So every test
//! gets its own server, in its own temporary directory, on its own port.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to accept commands (including AOF loading)
/// before the test is failed; generous because CI machines can be slow.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// How many fresh ports to try: a port found free may be taken by another
/// test before `redis-server` binds it, so a bind failure is retried.
const MAX_PORT_ATTEMPTS: usize = 10;

/// Lines of the server log shown when a test panics while a server is alive.
const PANIC_LOG_LINES: usize = 50;

/// Name of the server's log file inside its directory.
const LOG_FILE: &str = "redis.log";

/// Where the process's own stdout/stderr go: configuration errors are printed
/// there before the log file is opened.
const STDIO_FILE: &str = "redis.stdio.log";

/// The environment variable that names the `redis-server` binary to test against (e.g.
/// a Redis 6.2 build from `scripts/redis62.sh`); without it `redis-server` is looked up
/// on `PATH`.
pub const REDIS_SERVER_ENV: &str = "REDIS_SERVER";

/// The `redis-server` binary tests start: `$REDIS_SERVER` when set, else the one on `PATH`.
/// Sentinels are started from the same binary (`--sentinel`).
pub fn redis_server_binary() -> PathBuf {
    std::env::var_os(REDIS_SERVER_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("redis-server"), PathBuf::from)
}

/// Whether [`redis_server_binary`] was built with TLS (Debian's is; the Redis 6.2 of
/// `scripts/redis62.sh` is not). Asked once per process: the binary is started with
/// `--tls-port 0` followed by an invalid `--loglevel`, so it exits at once either way,
/// complaining about `tls-port` only when it does not know the directive.
pub fn server_supports_tls() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let binary = redis_server_binary();
        let output = Command::new(&binary)
            .args(["--tls-port", "0", "--loglevel", "not-a-level"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} (is it on PATH?): {e}", binary.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        !text.contains("tls-port")
    })
}

/// Append-only-file persistence mode of a [`RedisServer`].
///
/// Crash tests need `Always` to know that everything acknowledged before a
/// `kill -9` survives; most other tests want `Off` because fsyncs are slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aof {
    /// No persistence at all (`--appendonly no --save ""`): a restart starts empty.
    #[default]
    Off,
    /// `--appendonly yes --appendfsync always`: every write is fsynced before the reply.
    Always,
    /// `--appendonly yes --appendfsync everysec`: up to ~1 s of writes may be lost on a crash.
    EverySec,
}

/// Options for [`RedisServer::start_with`], builder style.
///
/// RDB snapshots are always disabled (`--save ""`) so that the only
/// persistence a test sees is the one it chose with [`Aof`]; `extra_args`
/// come last and so can override anything.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only-file mode.
    pub aof: Aof,
    /// Value for `--maxmemory-policy`, if any (ForgeMQ requires `noeviction`).
    pub maxmemory_policy: Option<String>,
    /// Additional `redis-server` arguments, passed verbatim after all others.
    pub extra_args: Vec<String>,
    /// Also serve TLS on a second port (see [`RedisOptions::tls`]).
    pub tls: Option<TlsFiles>,
    /// Run as a Redis Cluster node (see [`RedisOptions::cluster_node`]).
    pub cluster_node: bool,
    /// Environment variables for the `redis-server` process (see [`RedisOptions::env`]).
    pub env: Vec<(String, String)>,
    /// Another `redis-server` binary than [`redis_server_binary`] (see
    /// [`RedisOptions::binary`]).
    pub binary: Option<PathBuf>,
}

/// PEM files for a TLS port: what the server presents and which CA it trusts
/// for client certificates. See [`RedisOptions::tls`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (`--tls-cert-file`).
    pub cert: PathBuf,
    /// The server's private key (`--tls-key-file`).
    pub key: PathBuf,
    /// The CA that signs client certificates (`--tls-ca-cert-file`).
    pub ca: PathBuf,
    /// `--tls-auth-clients yes` (a client certificate is required) or `no`.
    pub auth_clients: bool,
}

impl TlsFiles {
    /// TLS with these files; clients need no certificate of their own.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, ca: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
            auth_clients: false,
        }
    }

    /// Requires (`true`) or does not require a client certificate signed by the CA.
    #[must_use]
    pub fn auth_clients(mut self, required: bool) -> Self {
        self.auth_clients = required;
        self
    }
}

impl RedisOptions {
    /// Same as `RedisOptions::default()`; reads better at the start of a builder chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the append-only-file mode.
    #[must_use]
    pub fn aof(mut self, aof: Aof) -> Self {
        self.aof = aof;
        self
    }

    /// Sets `--maxmemory-policy`.
    #[must_use]
    pub fn maxmemory_policy(mut self, policy: impl Into<String>) -> Self {
        self.maxmemory_policy = Some(policy.into());
        self
    }

    /// Appends one raw argument (e.g. `"--maxmemory"`, then `"10mb"`).
    #[must_use]
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Serves TLS on a second port ([`RedisServer::tls_port`],
    /// [`RedisServer::tls_url`]) besides the plain one, which stays open for
    /// the readiness check and for test setup (ACL users, `INFO`).
    ///
    /// `redis-server` must be built with TLS support (Debian's is; ask
    /// [`server_supports_tls`]).
    #[must_use]
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Runs the server as a Redis Cluster node (`--cluster-enabled yes`, node timeout
    /// 2 s so that failovers happen within seconds), on a port whose cluster bus port
    /// (port + 10000) is free too. [`crate::TestCluster`] joins such nodes.
    #[must_use]
    pub fn cluster_node(mut self) -> Self {
        self.cluster_node = true;
        self
    }

    /// Sets an environment variable of the `redis-server` process, e.g. `LD_PRELOAD` of
    /// libfaketime and `FAKETIME`, to run the server (and so Redis's clock) at another time.
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Runs this `redis-server` binary instead of [`redis_server_binary`]'s.
    #[must_use]
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Appends several raw arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The arguments that express these options, in `redis-server` syntax;
    /// `tls_port` is where TLS is served when [`RedisOptions::tls`] is set.
    fn to_args(&self, tls_port: Option<u16>) -> Vec<String> {
        let mut args: Vec<String> = vec!["--save".into(), String::new()];
        match self.aof {
            Aof::Off => args.extend(["--appendonly".into(), "no".into()]),
            Aof::Always | Aof::EverySec => {
                let fsync = if self.aof == Aof::Always {
                    "always"
                } else {
                    "everysec"
                };
                args.extend([
                    "--appendonly".into(),
                    "yes".into(),
                    "--appendfsync".into(),
                    fsync.into(),
                ]);
            }
        }
        if let Some(policy) = &self.maxmemory_policy {
            args.extend(["--maxmemory-policy".into(), policy.clone()]);
        }
        if self.cluster_node {
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    // A replica of a failed master takes over at once, whatever its lag.
                    "--cluster-replica-validity-factor",
                    "0",
                ]
                .map(String::from),
            );
        }
        if let (Some(tls), Some(port)) = (&self.tls, tls_port) {
            let path = |p: &Path| p.to_string_lossy().into_owned();
            args.extend([
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                path(&tls.cert),
                "--tls-key-file".into(),
                path(&tls.key),
                "--tls-ca-cert-file".into(),
                path(&tls.ca),
                "--tls-auth-clients".into(),
                if tls.auth_clients { "yes" } else { "no" }.into(),
            ]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// A `redis-server` child process owned by one test.
///
/// Dropping it kills the server (SIGKILL) and deletes its directory; if the
/// test is panicking, the tail of the server log is printed first so that a
/// failure shows the server's side of the story.
#[derive(Debug)]
pub struct RedisServer {
    /// `None` once the server was killed and not restarted. Behind a mutex so
    /// that `is_running`/`pid` can reap an exited child through `&self`.
    child: Mutex<Option<Child>>,
    port: u16,
    /// The TLS port, when the options asked for TLS.
    tls_port: Option<u16>,
    options: RedisOptions,
    /// Declared after `child` only for clarity: `Drop` kills the child
    /// explicitly before the directory is removed.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server with default options (no persistence).
    ///
    /// Panics (with the server log) if it does not become ready in 10 s.
    pub fn start() -> RedisServer {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server with the given options on a free port in a fresh
    /// temporary directory, and waits until it answers commands.
    ///
    /// Panics (with the server log) if it does not become ready.
    pub fn start_with(options: RedisOptions) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("forgemq-redis-")
            .tempdir()
            .expect("cannot create a temporary directory for redis-server");
        let mut failures = Vec::new();
        for _ in 0..MAX_PORT_ATTEMPTS {
            let port = if options.cluster_node {
                free_cluster_port()
            } else {
                free_port()
            };
            let tls_port = options.tls.as_ref().map(|_| free_port_besides(port));
            let mut child = spawn(dir.path(), port, tls_port, &options);
            match wait_ready(&mut child, port, dir.path(), &options) {
                Ok(()) => {
                    return RedisServer {
                        child: Mutex::new(Some(child)),
                        port,
                        tls_port,
                        options,
                        dir,
                    };
                }
                Err(failure) => {
                    reap(&mut child);
                    // Only a lost race for the port is worth another try; any
                    // other failure would just repeat itself.
                    if !failure.port_in_use {
                        panic!("{}", failure.message);
                    }
                    failures.push(failure.message);
                }
            }
        }
        panic!(
            "redis-server could not bind a free port after {MAX_PORT_ATTEMPTS} attempts; last failure:\n{}",
            failures.last().map(String::as_str).unwrap_or("")
        );
    }

    /// Connection URL, `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port; stays the same across [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS port, if the server was started with [`RedisOptions::tls`].
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// Connection URL of the TLS port, `rediss://127.0.0.1:PORT/`.
    ///
    /// Panics if the server was started without [`RedisOptions::tls`].
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.expect_tls_port())
    }

    /// Connection URL of the plain port for an ACL user:
    /// `redis://USER:PASSWORD@127.0.0.1:PORT/`. Both must be URL-safe.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}/", self.port)
    }

    /// Connection URL of the TLS port for an ACL user:
    /// `rediss://USER:PASSWORD@127.0.0.1:PORT/`. Both must be URL-safe.
    ///
    /// Panics if the server was started without [`RedisOptions::tls`].
    pub fn tls_url_as(&self, user: &str, password: &str) -> String {
        format!(
            "rediss://{user}:{password}@127.0.0.1:{}/",
            self.expect_tls_port()
        )
    }

    fn expect_tls_port(&self) -> u16 {
        self.tls_port
            .expect("this redis-server was started without RedisOptions::tls")
    }

    /// Creates or changes an ACL user: `ACL SETUSER name rule...`, e.g.
    /// `acl_setuser("app", &["on", ">secret", "~mq:*", "+@all", "-config"])`.
    ///
    /// Panics if Redis refuses a rule (the error names it).
    pub fn acl_setuser(&self, name: &str, rules: &[&str]) {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(name)
            .arg(rules)
            .exec(&mut self.conn())
            .unwrap_or_else(|e| panic!("ACL SETUSER {name} {rules:?} failed: {e}"));
    }

    /// A synchronous connection as an ACL user, on the plain port.
    ///
    /// Panics if the server cannot be reached or refuses the credentials.
    pub fn conn_as(&self, user: &str, password: &str) -> redis::Connection {
        redis::Client::open(self.url_as(user, password))
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("cannot connect as {user} on port {}: {e}", self.port))
    }

    /// The server's working directory (AOF files, `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id of the running server, `None` if it is not running.
    pub fn pid(&self) -> Option<u32> {
        let mut child = self.lock_child();
        if refresh(&mut child) {
            child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    /// A client for this server (connections are opened lazily by the caller).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a 127.0.0.1 redis URL is always valid")
    }

    /// A synchronous connection, for setting up state and asserting on it.
    ///
    /// Panics if the server cannot be reached.
    pub fn conn(&self) -> redis::Connection {
        self.client()
            .get_connection()
            .unwrap_or_else(|e| panic!("cannot connect to redis on port {}: {e}", self.port))
    }

    /// Simulates a crash: SIGKILL, then wait until the process is gone.
    ///
    /// Nothing is flushed; with [`Aof::Always`] everything acknowledged
    /// survives a later [`restart`](Self::restart).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.lock_child().take() {
            reap(&mut child);
        }
    }

    /// Starts the server again on the same port, directory and options, and
    /// waits until it is ready (including loading the AOF).
    ///
    /// A still-running server is killed with SIGKILL first, so this is always
    /// a crash-restart. Panics if the server does not come back.
    pub fn restart(&mut self) {
        self.kill9();
        let mut child = spawn(self.dir.path(), self.port, self.tls_port, &self.options);
        if let Err(failure) = wait_ready(&mut child, self.port, self.dir.path(), &self.options) {
            reap(&mut child);
            panic!("restart failed: {}", failure.message);
        }
        *self.lock_child() = Some(child);
    }

    /// Sends a signal with the `kill` command, e.g. `"STOP"`, `"SIGCONT"` or
    /// `"-TERM"`; used to freeze a server without killing it.
    ///
    /// Panics if the server is not running or the signal cannot be sent.
    pub fn stop_signal(&mut self, sig: &str) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("cannot send {sig}: redis-server is not running"));
        let name = sig.trim_start_matches('-');
        let name = name.strip_prefix("SIG").unwrap_or(name);
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run `kill -{name} {pid}`: {e}"));
        assert!(status.success(), "`kill -{name} {pid}` failed: {status}");
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is
    /// answered, like a stalled or partitioned Redis.
    pub fn sigstop(&mut self) {
        self.stop_signal("STOP");
    }

    /// Resumes a server frozen by [`sigstop`](Self::sigstop).
    pub fn sigcont(&mut self) {
        self.stop_signal("CONT");
    }

    /// Whether the process exists (a SIGSTOPped server counts as running).
    pub fn is_running(&self) -> bool {
        refresh(&mut self.lock_child())
    }

    /// The last `n_lines` lines of the server log (empty if there is none).
    pub fn log_tail(&self, n_lines: usize) -> String {
        tail_of(&self.dir.path().join(LOG_FILE), 0, n_lines)
    }

    /// Calls per command from `INFO commandstats`, keyed by lowercase command
    /// name (`"evalsha"`, `"blpop"`, `"client|setname"`), so tests can assert
    /// how many round trips an operation costs.
    ///
    /// Panics if the server cannot be queried.
    pub fn command_stats(&self) -> HashMap<String, u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn())
            .unwrap_or_else(|e| panic!("INFO commandstats failed on port {}: {e}", self.port));
        parse_command_stats(&info)
    }

    /// Locks the child slot; a poisoned lock only means another thread
    /// panicked, and the `Option<Child>` inside is still consistent.
    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let child = self.lock_child().take();
        if let Some(mut child) = child {
            reap(&mut child);
        }
        if thread::panicking() {
            eprintln!(
                "----- last {PANIC_LOG_LINES} lines of redis-server log (port {}) -----\n{}\n----- end of redis-server log (port {}) -----",
                self.port,
                self.log_tail(PANIC_LOG_LINES),
                self.port
            );
        }
    }
}

/// Why a server did not become ready.
struct StartFailure {
    /// The process exited because the port was taken: retry on another one.
    port_in_use: bool,
    /// Human-readable explanation including the log tail.
    message: String,
}

/// Finds a port on 127.0.0.1 that is free right now by letting the OS pick one (for a
/// server a test starts itself).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}

/// A free port below 55535 whose cluster bus port (port + 10000) is free too.
pub fn free_cluster_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Spread over the range from a per-process start, so that parallel tests (and
    // processes) rarely try the same ports.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 3000) as u16 * 10;
    for _ in 0..10_000 {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % 35_000;
        let port = 20_000 + (start - 20_000 + offset) % 35_000;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair (p, p + 10000) below 55535 for a cluster node");
}

/// A free port other than `taken` (which is free too until redis binds it).
fn free_port_besides(taken: u16) -> u16 {
    loop {
        let port = free_port();
        if port != taken {
            return port;
        }
    }
}

/// Launches `redis-server` without waiting for it.
fn spawn(dir: &Path, port: u16, tls_port: Option<u16>, options: &RedisOptions) -> Child {
    let stdio = File::options()
        .create(true)
        .append(true)
        .open(dir.join(STDIO_FILE))
        .expect("cannot create redis-server stdio file");
    let stderr = stdio
        .try_clone()
        .expect("cannot duplicate redis-server stdio file");
    let binary = options.binary.clone().unwrap_or_else(redis_server_binary);
    Command::new(&binary)
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join(LOG_FILE))
        .args(["--daemonize", "no", "--protected-mode", "no"])
        .args(options.to_args(tls_port))
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdio)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot spawn {} (is it on PATH, or is ${REDIS_SERVER_ENV} right?): {e}",
                binary.display()
            )
        })
}

/// Polls until the server answers PING, has finished loading, and is really
/// *our* process (not another test's server that owns the port).
fn wait_ready(
    child: &mut Child,
    port: u16,
    dir: &Path,
    options: &RedisOptions,
) -> Result<(), StartFailure> {
    let log = dir.join(LOG_FILE);
    // Only log lines written by this attempt matter for the diagnosis.
    let log_offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let stdio = dir.join(STDIO_FILE);
    let stdio_offset = fs::metadata(&stdio).map(|m| m.len()).unwrap_or(0);
    let describe = |what: &str, last_error: &str| {
        format!(
            "redis-server on port {port} (dir {}, options {options:?}) {what}; last probe error: {last_error}\n--- redis.log ---\n{}\n--- stdout/stderr ---\n{}",
            dir.display(),
            tail_of(&log, log_offset, PANIC_LOG_LINES),
            tail_of(&stdio, stdio_offset, PANIC_LOG_LINES),
        )
    };

    let deadline = Instant::now() + READY_DEADLINE;
    let mut last_error = String::from("none yet");
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            let output = format!(
                "{}{}",
                tail_of(&log, log_offset, usize::MAX),
                tail_of(&stdio, stdio_offset, usize::MAX)
            );
            return Err(StartFailure {
                port_in_use: output.contains("Address already in use"),
                message: describe(&exited(status), &last_error),
            });
        }
        match probe(port, child.id()) {
            Ok(()) => return Ok(()),
            Err(e) => last_error = e,
        }
        if Instant::now() >= deadline {
            return Err(StartFailure {
                port_in_use: false,
                message: describe(
                    &format!("was not ready within {READY_DEADLINE:?}"),
                    &last_error,
                ),
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// One readiness check; the error says what is not ready yet.
fn probe(port: u16, pid: u32) -> Result<(), String> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(|e| e.to_string())?;
    // A stopped or wedged process must not hang the probe past the deadline.
    conn.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    // INFO is allowed while loading, so check identity and loading first.
    let info: String = redis::cmd("INFO")
        .query(&mut conn)
        .map_err(|e| e.to_string())?;
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    if field("process_id") != Some(pid.to_string().as_str()) {
        return Err(format!(
            "port {port} is served by process {:?}, not by our redis-server {pid}",
            field("process_id")
        ));
    }
    if field("loading") != Some("0") {
        return Err("still loading the dataset".into());
    }
    // PING fails with LOADING while the dataset is loading, so it confirms the above.
    let pong: String = redis::cmd("PING")
        .query(&mut conn)
        .map_err(|e| e.to_string())?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(format!("PING answered {pong:?}"))
    }
}

/// Describes how the process ended.
fn exited(status: ExitStatus) -> String {
    format!("exited before becoming ready ({status})")
}

/// Updates the child slot if the process has exited; true if it still exists.
fn refresh(child: &mut Option<Child>) -> bool {
    match child.as_mut().map(Child::try_wait) {
        Some(Ok(None)) => true,
        Some(Ok(Some(_)) | Err(_)) => {
            *child = None;
            false
        }
        None => false,
    }
}

/// SIGKILLs the process and waits for it, so no zombie or stray server is left.
fn reap(child: &mut Child) {
    // Fails only if the process already exited, which is what we want anyway.
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `n_lines` lines of the file after byte `offset` (empty if missing).
fn tail_of(path: &Path, offset: u64, n_lines: usize) -> String {
    let mut text = Vec::new();
    let read = File::open(path).and_then(|mut file| {
        file.seek(SeekFrom::Start(offset))?;
        file.read_to_end(&mut text)
    });
    if read.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n_lines)..].join("\n")
}

/// Parses `cmdstat_<name>:calls=N,usec=...` lines of `INFO commandstats`.
fn parse_command_stats(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_lowercase(), calls))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_command_stats() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=3,usec=10,usec_per_call=3.33,rejected_calls=0,failed_calls=0\r\ncmdstat_BLPOP:calls=12,usec=1\r\ncmdstat_client|setname:calls=1,usec=1\r\n";
        let stats = parse_command_stats(info);
        assert_eq!(stats.get("evalsha"), Some(&3));
        assert_eq!(stats.get("blpop"), Some(&12));
        assert_eq!(stats.get("client|setname"), Some(&1));
        assert_eq!(stats.len(), 3);
    }

    #[test]
    fn options_to_args() {
        let args = RedisOptions::new()
            .aof(Aof::Always)
            .maxmemory_policy("noeviction")
            .args(["--maxmemory", "10mb"])
            .to_args(None);
        assert_eq!(
            args,
            [
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                "noeviction",
                "--maxmemory",
                "10mb"
            ]
        );
    }

    #[test]
    fn tls_options_to_args() {
        let options = RedisOptions::new().tls(TlsFiles::new("/c.pem", "/k.pem", "/ca.pem"));
        let args = options.to_args(Some(7000));
        let tls: Vec<&str> = args.iter().skip(4).map(String::as_str).collect();
        assert_eq!(
            tls,
            [
                "--tls-port",
                "7000",
                "--tls-cert-file",
                "/c.pem",
                "--tls-key-file",
                "/k.pem",
                "--tls-ca-cert-file",
                "/ca.pem",
                "--tls-auth-clients",
                "no"
            ]
        );
        let strict = RedisOptions::new()
            .tls(TlsFiles::new("/c.pem", "/k.pem", "/ca.pem").auth_clients(true))
            .to_args(Some(7000));
        assert_eq!(strict.last().map(String::as_str), Some("yes"));
        // Without a chosen port nothing about TLS is passed.
        assert_eq!(options.to_args(None).len(), 4);
    }
}
