//! Cases with real worker processes: `process-procs` (several processes sharing one
//! topic, as replicas do in production) and `idle-procs` (what idle workers cost Redis).
//!
//! The worker processes are this binary run again as `forgemq-bench --child-worker URL
//! NAMESPACE TOPIC CONCURRENCY`; each runs until its standard input closes.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forgemq::{Client, HandlerError, Message, Subscription, Worker};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// The argument that makes this binary a worker process.
pub(crate) const CHILD_FLAG: &str = "--child-worker";

/// Runs as a worker process: `URL NAMESPACE TOPIC CONCURRENCY` follow the flag. Prints
/// `ready` once the worker runs; stops (gracefully) when standard input closes.
pub(crate) fn child_main(args: &[String]) -> anyhow::Result<()> {
    let [url, namespace, topic, concurrency] = args else {
        bail!("usage: forgemq-bench {CHILD_FLAG} URL NAMESPACE TOPIC CONCURRENCY");
    };
    let concurrency: usize = concurrency.parse().context("CONCURRENCY")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mq = Client::builder(url.clone())
            .namespace(namespace.clone())
            .build()
            .await?;
        let worker = Worker::builder(mq)
            .subscribe_with(
                topic,
                Subscription::new().concurrency(concurrency),
                |_m: Message<Value>| async { Ok::<(), HandlerError>(()) },
            )
            .build()?;
        println!("ready");
        // Standard input closing (the parent ended or let go) is the signal to stop.
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        });
        worker
            .run_until(async {
                let _ = stdin_closed.await;
            })
            .await?;
        Ok(())
    })
}

/// Worker processes, stopped (stdin closed, then killed if they linger) when dropped.
pub(crate) struct Procs {
    children: Vec<Child>,
}

impl Procs {
    /// Starts `count` worker processes, the i-th on `topic(i)`, and waits until each says
    /// it runs.
    pub(crate) fn start(
        mq: &Client,
        url: &str,
        count: usize,
        concurrency: usize,
        topic: impl Fn(usize) -> String,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this binary to re-run it")?;
        let mut procs = Procs {
            children: Vec::new(),
        };
        for i in 0..count {
            let mut child = Command::new(&exe)
                .arg(CHILD_FLAG)
                .arg(url)
                .arg(mq.namespace())
                .arg(topic(i))
                .arg(concurrency.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("cannot start a worker process")?;
            let stdout = child.stdout.take().context("no stdout")?;
            procs.children.push(child);
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("worker process {i} did not start: {line:?}");
            }
        }
        Ok(procs)
    }

    /// Stops every process: closes their stdin (a graceful stop), waits up to 10 s, then
    /// kills what is left.
    pub(crate) fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for child in &mut self.children {
            drop(child.stdin.take());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.children {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The commands clients send to these Redis servers (`host:port`) during `window`, as
/// `MONITOR` shows them: every round trip of every client, not the commands that scripts
/// run inside Redis. `FORGEMQ_BENCH_DEBUG_MONITOR=1` prints every line seen.
pub(crate) async fn round_trips(addrs: &[String], window: Duration) -> anyhow::Result<u64> {
    let counts = addrs.iter().map(|addr| async move {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr} for MONITOR"))?;
        stream.write_all(b"MONITOR\r\n").await?;
        let mut lines = tokio::io::BufReader::new(stream).lines();
        let mut count = 0u64;
        let end = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(end, lines.next_line()).await {
                Err(_) => return Ok::<u64, anyhow::Error>(count),
                Ok(line) => {
                    let Some(line) = line? else {
                        bail!("{addr} closed the MONITOR connection");
                    };
                    if std::env::var_os("FORGEMQ_BENCH_DEBUG_MONITOR").is_some() {
                        eprintln!("monitor {addr}: {line}");
                    }
                    // `+<time> [<db> <client>] "<command>" ...`; scripts' own calls
                    // show `[<db> lua]`.
                    if line.starts_with('+') && line.contains("] \"") && !line.contains(" lua]") {
                        count += 1;
                    }
                }
            }
        }
    });
    let mut total = 0;
    for count in futures::future::join_all(counts).await {
        total += count?;
    }
    Ok(total)
}
