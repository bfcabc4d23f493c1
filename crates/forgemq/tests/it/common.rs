//! Helpers shared by the integration tests.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forgemq::{Client, Worker};
use forgemq_test_support::{check_invariants, Layout, RedisServer, StateReport, TestCluster};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Deadline for things that must eventually happen. Generous: CI machines are shared.
pub const EVENTUALLY: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "forgemq=info".into()),
        )
        .try_init();
}

/// Which Redis the suite runs against: `FORGEMQ_TEST_TOPOLOGY=cluster` runs every test
/// that [`setup`] starts on a private 3-master Redis Cluster instead of one server.
pub fn cluster_mode() -> bool {
    std::env::var("FORGEMQ_TEST_TOPOLOGY").is_ok_and(|t| t == "cluster")
}

/// Returns from a test that needs one server of its own (it kills, freezes, proxies or
/// reconfigures it) when the suite runs on a cluster; the test runs in the single-server
/// run.
macro_rules! single_server_only {
    () => {
        if crate::common::cluster_mode() {
            eprintln!("single-server test: runs in the single-server suite, skipped on a cluster");
            return;
        }
    };
}
pub(crate) use single_server_only;

/// The Redis of one test: a private server, or a private 3-master cluster.
// One per test, never moved around in bulk: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum TestRedis {
    Single(RedisServer),
    Cluster(TestCluster),
}

impl TestRedis {
    /// A private Redis of the suite's topology.
    pub fn start() -> Self {
        if cluster_mode() {
            TestRedis::Cluster(TestCluster::start(3, 0))
        } else {
            TestRedis::Single(RedisServer::start())
        }
    }

    pub fn url(&self) -> String {
        match self {
            TestRedis::Single(s) => s.url(),
            TestRedis::Cluster(c) => c.url(),
        }
    }

    /// A connection for setting up and checking state: on a cluster, every command goes
    /// to the master of its key.
    pub fn conn(&self) -> AnyConn {
        match self {
            TestRedis::Single(s) => AnyConn::Single(s.conn()),
            TestRedis::Cluster(c) => AnyConn::Cluster(Box::new(c.conn())),
        }
    }

    /// A plain connection to the node that holds `topic`'s keys (for a `MULTI`).
    pub fn conn_for_topic(&self, topic: &str) -> redis::Connection {
        match self {
            TestRedis::Single(s) => s.conn(),
            TestRedis::Cluster(c) => c.conn_for_key(&format!("{{{topic}}}")),
        }
    }

    /// Calls per command (summed over the masters of a cluster).
    pub fn command_stats(&self) -> std::collections::HashMap<String, u64> {
        match self {
            TestRedis::Single(s) => s.command_stats(),
            TestRedis::Cluster(c) => c.command_stats(),
        }
    }

    /// The one server (tests that kill, freeze, proxy or reconfigure it are single-server
    /// only: they start with `single_server_only!()`).
    pub fn single(&self) -> &RedisServer {
        match self {
            TestRedis::Single(s) => s,
            TestRedis::Cluster(_) => panic!("this test needs a single server"),
        }
    }

    pub fn port(&self) -> u16 {
        self.single().port()
    }
}

/// Something that holds a topic's keys: a plain connection to that node.
pub trait HoldsTopic {
    fn conn_for_topic(&self, topic: &str) -> redis::Connection;
}

impl HoldsTopic for RedisServer {
    fn conn_for_topic(&self, _topic: &str) -> redis::Connection {
        self.conn()
    }
}

impl HoldsTopic for TestRedis {
    fn conn_for_topic(&self, topic: &str) -> redis::Connection {
        TestRedis::conn_for_topic(self, topic)
    }
}

/// A connection to either topology, usable wherever a `redis::ConnectionLike` is.
pub enum AnyConn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl redis::ConnectionLike for AnyConn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        match self {
            AnyConn::Single(c) => c.req_packed_command(cmd),
            AnyConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        match self {
            AnyConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            AnyConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn req_command(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value> {
        match self {
            AnyConn::Single(c) => c.req_command(cmd),
            AnyConn::Cluster(c) => c.req_command(cmd),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AnyConn::Single(c) => c.get_db(),
            AnyConn::Cluster(c) => c.get_db(),
        }
    }

    fn check_connection(&mut self) -> bool {
        match self {
            AnyConn::Single(c) => c.check_connection(),
            AnyConn::Cluster(c) => c.check_connection(),
        }
    }

    fn is_open(&self) -> bool {
        match self {
            AnyConn::Single(c) => c.is_open(),
            AnyConn::Cluster(c) => c.is_open(),
        }
    }
}

/// A private Redis of the suite's topology and a client connected to it.
pub async fn setup() -> (TestRedis, Client) {
    init_tracing();
    let server = TestRedis::start();
    let client = Client::connect(&server.url()).await.unwrap();
    (server, client)
}

/// Polls `check` until it returns true or `EVENTUALLY` passes; panics with `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < EVENTUALLY {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {EVENTUALLY:?} waiting for: {what}");
}

/// A worker running in the background, stopped by [`Running::stop`].
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<forgemq::Result<()>>,
}

impl Running {
    pub fn start(worker: Worker) -> Self {
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(worker.run_until(async {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            handle,
        }
    }

    /// Triggers shutdown and waits for `run_until` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.handle).await.unwrap().unwrap();
    }
}

/// Records handler runs: `(id, retry, when)`.
#[derive(Clone, Default)]
pub struct Runs(Arc<Mutex<Vec<(String, u32, Instant)>>>);

impl Runs {
    pub fn record(&self, id: &str, retry: u32) {
        self.0
            .lock()
            .unwrap()
            .push((id.to_owned(), retry, Instant::now()));
    }
    /// When each run started.
    pub fn times(&self) -> Vec<Instant> {
        self.0.lock().unwrap().iter().map(|r| r.2).collect()
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub fn of(&self, id: &str) -> Vec<(u32, Instant)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _, _)| i == id)
            .map(|(_, r, t)| (*r, *t))
            .collect()
    }
    pub fn ids(&self) -> HashSet<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(i, _, _)| i.clone())
            .collect()
    }
    pub fn count_per_id(&self) -> std::collections::HashMap<String, usize> {
        let mut m = std::collections::HashMap::new();
        for (i, _, _) in self.0.lock().unwrap().iter() {
            *m.entry(i.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// Runs the invariant checker for `topic` in the default namespace.
pub fn invariants(server: &impl HoldsTopic, topic: &str, ids: &[String]) -> StateReport {
    check_invariants(
        &mut server.conn_for_topic(topic),
        &Layout::new("mq", topic),
        ids,
    )
}

pub fn strings<T: ToString>(ids: &[T]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

/// Child processes: this test binary run again with a role in its environment.
pub mod child {
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use forgemq::{Client, HandlerError, Message, Subscription, Worker};
    use serde_json::{json, Value};

    /// A child process, killed when dropped. Its stdout and stderr are read as they come
    /// (each stdout line stamped with the parent's clock when it arrived), so a test can
    /// watch what the child says while it runs.
    pub struct ChildProc {
        child: Option<Child>,
        out: Arc<Mutex<Vec<(Instant, String)>>>,
        err: Arc<Mutex<String>>,
        readers: Vec<std::thread::JoinHandle<()>>,
    }

    impl ChildProc {
        pub fn spawn(role: &str, url: &str, topic: &str) -> Self {
            Self::spawn_with(role, url, topic, &[])
        }

        /// As [`ChildProc::spawn`], with extra environment variables (e.g. `LD_PRELOAD`
        /// of libfaketime, so that signals still reach the child itself, not a wrapper).
        pub fn spawn_with(role: &str, url: &str, topic: &str, env: &[(&str, String)]) -> Self {
            let exe = std::env::current_exe().unwrap();
            let mut command = Command::new(exe);
            command
                .args([
                    "child_process_entry",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("FORGEMQ_CHILD_ROLE", role)
                .env("FORGEMQ_CHILD_URL", url)
                .env("FORGEMQ_CHILD_TOPIC", topic)
                .env("RUST_LOG", "forgemq=warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in env {
                command.env(k, v);
            }
            let mut child = command
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start child {role}: {e}"));
            let out = Arc::new(Mutex::new(Vec::new()));
            let err = Arc::new(Mutex::new(String::new()));
            let stdout = child.stdout.take().unwrap();
            let stderr = child.stderr.take().unwrap();
            let o = out.clone();
            let e = err.clone();
            let readers = vec![
                std::thread::spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        o.lock().unwrap().push((Instant::now(), line));
                    }
                }),
                std::thread::spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        let mut e = e.lock().unwrap();
                        e.push_str(&line);
                        e.push('\n');
                    }
                }),
            ];
            Self {
                child: Some(child),
                out,
                err,
                readers,
            }
        }

        fn child(&mut self) -> &mut Child {
            self.child.as_mut().expect("child already reaped")
        }

        pub fn pid(&mut self) -> u32 {
            self.child().id()
        }

        pub fn kill9(&mut self) {
            let _ = self.child().kill();
            let _ = self.child().wait();
        }

        /// True once the child has exited (it is reaped then).
        pub fn has_exited(&mut self) -> bool {
            self.child().try_wait().ok().flatten().is_some()
        }

        pub fn signal(&mut self, sig: &str) {
            let ok = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(self.pid().to_string())
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill -{sig} failed");
        }

        /// After the child exited: waits until all it wrote has been read.
        pub fn finish_reading(&mut self) {
            for r in self.readers.drain(..) {
                let _ = r.join();
            }
        }

        /// Stdout lines so far, each with the parent's time of arrival.
        pub fn stdout_lines(&self) -> Vec<(Instant, String)> {
            self.out.lock().unwrap().clone()
        }

        /// Stdout so far.
        pub fn stdout_now(&self) -> String {
            let lines = self.out.lock().unwrap();
            lines.iter().map(|(_, l)| format!("{l}\n")).collect()
        }

        /// Stderr so far.
        pub fn stderr_now(&self) -> String {
            self.err.lock().unwrap().clone()
        }

        /// Waits for the child to exit by itself; returns stdout and stderr.
        pub fn wait_output(mut self) -> (String, String) {
            let mut child = self.child.take().expect("child already reaped");
            let status = child.wait().unwrap();
            self.finish_reading();
            let (stdout, stderr) = (self.stdout_now(), self.stderr_now());
            assert!(
                status.success(),
                "child failed: {status:?}\n{stdout}\n{stderr}"
            );
            (stdout, stderr)
        }
    }

    impl Drop for ChildProc {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Runs the role named in the environment; returns at once when there is none.
    pub fn run_from_env() {
        let Ok(role) = std::env::var("FORGEMQ_CHILD_ROLE") else {
            return;
        };
        let url = std::env::var("FORGEMQ_CHILD_URL").unwrap();
        let topic = std::env::var("FORGEMQ_CHILD_TOPIC").unwrap();
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mq = Client::connect(&url).await.unwrap();
            match role.as_str() {
                // Takes messages and sleeps on them until killed: a worker that crashes
                // (or freezes) mid-handler.
                "sleepy-worker" => {
                    Worker::builder(mq)
                        .subscribe_with(
                            &topic,
                            Subscription::new()
                                .concurrency(100)
                                .lease(Duration::from_secs(1)),
                            |msg: Message<Value>| async move {
                                println!("started {}", msg.id);
                                tokio::time::sleep(Duration::from_secs(600)).await;
                                Ok::<(), HandlerError>(())
                            },
                        )
                        .recover_interval(Duration::from_millis(500))
                        .build()
                        .unwrap()
                        .run_until(std::future::pending())
                        .await
                        .unwrap();
                }
                // Handles each message for 3 s, then acks; prints what happened.
                "slow-acker" => {
                    Worker::builder(mq)
                        .subscribe_with(
                            &topic,
                            Subscription::new().lease(Duration::from_secs(1)),
                            |msg: Message<Value>| async move {
                                println!("started {}", msg.id);
                                tokio::time::sleep(Duration::from_secs(3)).await;
                                println!("finished {} lease_lost={}", msg.id, msg.is_lease_lost());
                                Ok::<(), HandlerError>(())
                            },
                        )
                        .recover_interval(Duration::from_secs(60))
                        .build()
                        .unwrap()
                        .run_until(tokio::time::sleep(Duration::from_secs(8)))
                        .await
                        .unwrap();
                }
                // Runs a scheduler (no worker) until killed.
                "scheduler" => {
                    println!("scheduling");
                    mq.run_scheduler(std::future::pending()).await;
                }
                // Publishes one delayed message and exits at once.
                "publish-delayed" => {
                    let id = mq
                        .publish_with_delay(
                            &topic,
                            json!({"from": "child"}),
                            Duration::from_millis(1500),
                        )
                        .await
                        .unwrap();
                    println!("published {id}");
                }
                // A worker configured through the environment whose handler does what
                // each message's data says: `sleep_ms` (sleep), `until_lost` (sleep until
                // the lease is lost, at most `sleep_ms`), `abort` (crash the process).
                // SIGTERM stops it gracefully. Prints its wall clock, each start and
                // finish, and how long the shutdown took.
                "chaos-worker" => chaos_worker(&url, &topic).await,
                other => panic!("unknown child role {other}"),
            }
        });
    }

    fn env_u64(name: &str, default: u64) -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn env_ms(name: &str, default: u64) -> Duration {
        Duration::from_millis(env_u64(name, default))
    }

    async fn chaos_worker(url: &str, topic: &str) {
        use tokio::signal::unix::{signal, SignalKind};
        // First of all, so that a SIGTERM sent as soon as the parent sees work in flight
        // starts a graceful shutdown instead of killing the process.
        let mut term = signal(SignalKind::terminate()).unwrap();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        println!("clock {wall}");
        let mq = Client::builder(url)
            .response_timeout(env_ms("FORGEMQ_CHILD_RESPONSE_TIMEOUT_MS", 5000))
            .build()
            .await
            .unwrap();
        let concurrency = env_u64("FORGEMQ_CHILD_CONCURRENCY", 10) as usize;
        let sub = Subscription::new()
            .concurrency(concurrency)
            .lease(env_ms("FORGEMQ_CHILD_LEASE_MS", 1000))
            .backoff(forgemq::Backoff::fixed(Duration::from_millis(200)));
        let stop_at = Arc::new(Mutex::new(None::<Instant>));
        let s = stop_at.clone();
        let worker = Worker::builder(mq)
            .subscribe_with(topic, sub, |msg: Message<Value>| async move {
                println!(
                    "started {} retry={} recoveries={}",
                    msg.id, msg.retry, msg.recoveries
                );
                let sleep = Duration::from_millis(msg.data["sleep_ms"].as_u64().unwrap_or(0));
                if msg.data["until_lost"] == json!(true) {
                    let t0 = Instant::now();
                    while !msg.is_lease_lost() && t0.elapsed() < sleep {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                } else {
                    tokio::time::sleep(sleep).await;
                }
                if msg.data["abort"] == json!(true) {
                    println!("aborting {}", msg.id);
                    std::process::abort();
                }
                println!("finished {} lease_lost={}", msg.id, msg.is_lease_lost());
                Ok::<(), HandlerError>(())
            })
            .recover_interval(env_ms("FORGEMQ_CHILD_RECOVER_MS", 500))
            .shutdown_timeout(env_ms("FORGEMQ_CHILD_SHUTDOWN_MS", 10_000))
            .heartbeat_interval(env_ms("FORGEMQ_CHILD_HEARTBEAT_MS", 5000))
            .name("chaos-worker")
            .build()
            .unwrap();
        println!("worker {}", worker.id());
        worker
            .run_until(async move {
                term.recv().await;
                *s.lock().unwrap() = Some(Instant::now());
            })
            .await
            .unwrap();
        let took = stop_at.lock().unwrap().map(|t| t.elapsed().as_millis());
        println!("stopped after {} ms", took.unwrap_or(0));
    }
}

/// A TCP proxy in front of Redis that can "blackhole" the connections it carries: bytes
/// stop flowing both ways with no RST, as in a network partition, while connections
/// opened afterwards work. It can also [`partition`](Proxy::partition) every connection,
/// old and new, holding what was sent, until [`heal`](Proxy::heal) lets it all through.
pub struct Proxy {
    pub port: u16,
    generation: Arc<std::sync::atomic::AtomicU64>,
    dead_before: Arc<std::sync::atomic::AtomicU64>,
    /// Connections of a generation below this carry requests but lose every reply.
    mute_before: Arc<std::sync::atomic::AtomicU64>,
    /// `true` while partitioned; every pump holds its bytes until it turns `false`.
    partitioned: Arc<tokio::sync::watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let dead_before = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mute_before = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let partitioned = Arc::new(tokio::sync::watch::Sender::new(false));
        let (g, d, p) = (generation.clone(), dead_before.clone(), partitioned.clone());
        let m = mute_before.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let my_gen = g.load(Ordering::SeqCst);
                let d = d.clone();
                let m = m.clone();
                let (gate_in, gate_out) = (p.subscribe(), p.subscribe());
                tokio::spawn(async move {
                    let Ok(outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let alive = move || d.load(Ordering::SeqCst) < my_gen;
                    let a = alive.clone();
                    let replies = move || alive() && m.load(Ordering::SeqCst) < my_gen;
                    tokio::spawn(pump(ri, wo, a, gate_in));
                    pump(ro, wi, replies, gate_out).await;
                });
            }
        });
        Self {
            port,
            generation,
            dead_before,
            mute_before,
            partitioned,
            task,
        }
    }

    /// Every connection opened so far still carries requests to Redis, but its replies
    /// are lost from now on: a call that Redis applied looks failed to the client.
    pub fn lose_replies_of_existing(&self) {
        use std::sync::atomic::Ordering;
        let current = self.generation.fetch_add(1, Ordering::SeqCst);
        self.mute_before.store(current, Ordering::SeqCst);
    }

    /// Every connection opened so far stops carrying bytes, for good.
    pub fn blackhole_existing(&self) {
        use std::sync::atomic::Ordering;
        let current = self.generation.fetch_add(1, Ordering::SeqCst);
        self.dead_before.store(current, Ordering::SeqCst);
    }

    /// Every connection, open or opened from now on, stops forwarding (no RST, no error):
    /// what is sent either way is held, until [`heal`](Proxy::heal).
    pub fn partition(&self) {
        self.partitioned.send_replace(true);
    }

    /// Ends a [`partition`](Proxy::partition): held bytes are delivered, in order, and
    /// traffic flows again.
    pub fn heal(&self) {
        self.partitioned.send_replace(false);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    alive: impl Fn() -> bool,
    mut gate: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        if !alive() {
            // Swallow everything from now on, never closing: a silent partition.
            std::future::pending::<()>().await;
        }
        // Partitioned: hold these bytes (and read no more) until healed.
        if gate.wait_for(|partitioned| !partitioned).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Taken by the tests that measure shares of time (weighted priority) and by the tests
/// that keep both cores busy for seconds (100k-message drains), so that the two never
/// overlap: on a 2-core machine a drain beside a share measurement skews the share.
pub async fn cpu_turn() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    TURN.get_or_init(Default::default).lock().await
}
