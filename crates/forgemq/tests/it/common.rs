//! Helpers shared by the integration tests.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forgemq::{Client, Worker};
use forgemq_test_support::{check_invariants, Layout, RedisServer, StateReport};
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

/// A private Redis and a client connected to it.
pub async fn setup() -> (RedisServer, Client) {
    init_tracing();
    let server = RedisServer::start();
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
pub fn invariants(server: &RedisServer, topic: &str, ids: &[String]) -> StateReport {
    check_invariants(&mut server.conn(), &Layout::new("mq", topic), ids)
}

pub fn strings<T: ToString>(ids: &[T]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

/// Child processes: this test binary run again with a role in its environment.
pub mod child {
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use forgemq::{Client, HandlerError, Message, Subscription, Worker};
    use serde_json::{json, Value};

    /// A child process, killed when dropped.
    pub struct ChildProc(Option<Child>);

    impl ChildProc {
        pub fn spawn(role: &str, url: &str, topic: &str) -> Self {
            let exe = std::env::current_exe().unwrap();
            let child = Command::new(exe)
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
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            Self(Some(child))
        }

        fn child(&mut self) -> &mut Child {
            self.0.as_mut().expect("child already reaped")
        }

        pub fn pid(&mut self) -> u32 {
            self.child().id()
        }

        pub fn kill9(&mut self) {
            let _ = self.child().kill();
            let _ = self.child().wait();
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

        /// Waits for the child to exit by itself; returns stdout and stderr.
        pub fn wait_output(mut self) -> (String, String) {
            let child = self.0.take().expect("child already reaped");
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                out.status.success(),
                "child failed: {:?}\n{stdout}\n{stderr}",
                out.status
            );
            (stdout, stderr)
        }
    }

    impl Drop for ChildProc {
        fn drop(&mut self) {
            if let Some(mut child) = self.0.take() {
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
                other => panic!("unknown child role {other}"),
            }
        });
    }
}

/// A TCP proxy in front of Redis that can "blackhole" the connections it carries: bytes
/// stop flowing both ways with no RST, as in a network partition, while connections
/// opened afterwards work.
pub struct Proxy {
    pub port: u16,
    generation: Arc<std::sync::atomic::AtomicU64>,
    dead_before: Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let dead_before = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (g, d) = (generation.clone(), dead_before.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let my_gen = g.load(Ordering::SeqCst);
                let d = d.clone();
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
                    tokio::spawn(pump(ri, wo, a));
                    pump(ro, wi, alive).await;
                });
            }
        });
        Self {
            port,
            generation,
            dead_before,
            task,
        }
    }

    /// Every connection opened so far stops carrying bytes, for good.
    pub fn blackhole_existing(&self) {
        use std::sync::atomic::Ordering;
        let current = self.generation.fetch_add(1, Ordering::SeqCst);
        self.dead_before.store(current, Ordering::SeqCst);
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
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
