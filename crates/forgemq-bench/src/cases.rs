//! The cases. Each runs once against a fresh namespace and returns its figures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use forgemq::{Client, HandlerError, Message, PublishOptions, Subscription, TopicOptions, Worker};
use forgemq_test_support::{RedisServer, TestCluster};
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::report::{CaseReport, Figures};

/// Messages per `publish_batch` call: the chunk size, and the library's own
/// largest single script call.
const CHUNK: usize = 1000;

/// How often the timer of a throughput case looks at the `processed` counter. Short next
/// to the runs it times (a second or more), and a few hundred commands a second next to
/// the hundred thousand the worker sends.
const POLL: Duration = Duration::from_millis(2);

/// Longest any case waits for its messages; a stuck worker fails the case instead of
/// hanging the benchmark.
const CASE_DEADLINE: Duration = Duration::from_secs(600);

/// The standard payload of message `i`.
pub(crate) fn payload(i: u64) -> Value {
    json!({"id": i, "to": format!("user{i}@example.com"), "subject": "hello", "n": 42})
}

/// Where the benchmark runs and what it has written.
pub(crate) struct Bench {
    url: String,
    /// The private redis-server, when neither `--redis` nor `--cluster` was given.
    server: Option<RedisServer>,
    /// The private cluster of `--cluster N`.
    cluster: Option<TestCluster>,
    /// Key-routed commands (the ceiling's list, clean-up).
    admin: Admin,
    /// One connection per master, for `INFO` (commands, CPU, memory), labelled host:port.
    masters: Vec<(String, MultiplexedConnection)>,
    smoke: bool,
    /// Namespaces and topics written since the last [`Bench::clean`].
    written: Mutex<Vec<(String, String)>>,
}

/// A connection that sends each command to the node of its key.
#[derive(Clone)]
enum Admin {
    Single(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Admin {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> anyhow::Result<T> {
        Ok(match self {
            Admin::Single(c) => cmd.query_async(c).await?,
            Admin::Cluster(c) => cmd.query_async(c).await?,
        })
    }

    async fn pipe<T: redis::FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> anyhow::Result<T> {
        Ok(match self {
            Admin::Single(c) => pipe.query_async(c).await?,
            Admin::Cluster(c) => pipe.query_async(c).await?,
        })
    }
}

impl Bench {
    /// Runs against `redis`, or a private cluster of `cluster` masters, or a private
    /// redis-server.
    pub(crate) async fn start(
        redis: Option<String>,
        cluster: Option<usize>,
        smoke: bool,
    ) -> anyhow::Result<Self> {
        let (url, server, private_cluster) = match (redis, cluster) {
            (Some(url), _) => (url, None, None),
            (None, Some(masters)) => {
                let c =
                    std::panic::catch_unwind(|| TestCluster::start(masters, 0)).map_err(|_| {
                        anyhow::anyhow!(
                            "could not start a private Redis Cluster of {masters} masters"
                        )
                    })?;
                (c.url(), None, Some(c))
            }
            (None, None) => {
                // A panic inside the support crate (no redis-server on PATH) becomes an
                // error with the fix in it.
                let server = std::panic::catch_unwind(RedisServer::start).map_err(|_| {
                    anyhow::anyhow!(
                        "could not start a private redis-server; install one (scripts/ensure-redis.sh) or pass --redis URL"
                    )
                })?;
                (server.url(), Some(server), None)
            }
        };
        let (admin, masters) = if let Some(seeds) = url
            .strip_prefix("redis+cluster://")
            .or_else(|| url.strip_prefix("rediss+cluster://"))
        {
            let nodes: Vec<String> = seeds.split(',').map(|h| format!("redis://{h}/")).collect();
            let client = redis::cluster::ClusterClient::new(nodes.clone())
                .with_context(|| format!("bad cluster URL {url}"))?;
            let conn = client
                .get_async_connection()
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            // The masters, from the first seed's view of the cluster.
            let first = redis::Client::open(nodes[0].as_str())?;
            let mut c = first.get_multiplexed_async_connection().await?;
            let text: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut c)
                .await?;
            let mut masters = Vec::new();
            for line in text
                .lines()
                .filter(|l| l.contains("master") && !l.contains("fail"))
            {
                let addr = line.split(' ').nth(1).unwrap_or_default();
                let addr = addr.split('@').next().unwrap_or_default().to_owned();
                let conn = redis::Client::open(format!("redis://{addr}/"))?
                    .get_multiplexed_async_connection()
                    .await?;
                masters.push((addr, conn));
            }
            masters.sort_by(|a, b| a.0.cmp(&b.0));
            (Admin::Cluster(conn), masters)
        } else {
            let conn = redis::Client::open(url.as_str())
                .with_context(|| format!("bad Redis URL {url}"))?
                .get_multiplexed_async_connection()
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            (
                Admin::Single(conn.clone()),
                vec![("redis".to_owned(), conn)],
            )
        };
        Ok(Self {
            url,
            server,
            cluster: private_cluster,
            admin,
            masters,
            smoke,
            written: Mutex::new(Vec::new()),
        })
    }

    /// One line about where this ran.
    pub(crate) fn describe(&self) -> String {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        match (&self.server, &self.cluster) {
            (Some(_), _) => {
                format!("private redis-server (no persistence) on loopback, {cpus} CPUs")
            }
            (_, Some(c)) => format!(
                "private Redis Cluster of {} masters (no persistence) on loopback, {cpus} CPUs",
                c.master_count()
            ),
            _ => format!("{} (given with --redis), {cpus} CPUs", self.url),
        }
    }

    /// The first JSON line: the machine and the Redis server.
    pub(crate) async fn environment(&self, runs: usize) -> anyhow::Result<String> {
        let info = self.info("server").await?;
        let memory = self.info("memory").await?;
        Ok(json!({
            "case": "environment",
            "redis_version": info.get("redis_version"),
            "redis_url": if self.server.is_some() || self.cluster.is_some() { "private" } else { self.url.as_str() },
            "masters": self.masters.len(),
            "maxmemory_policy": memory.get("maxmemory_policy"),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "runs": runs,
            "smoke": self.smoke,
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        })
        .to_string())
    }

    /// A count scaled down for `--smoke`.
    fn n(&self, full: u64) -> u64 {
        if self.smoke {
            (full / 100).max(10)
        } else {
            full
        }
    }

    pub(crate) async fn run_case(
        &self,
        case: &str,
        run: usize,
        done: &[CaseReport],
    ) -> anyhow::Result<Figures> {
        match case {
            "redis-ceiling" => self.redis_ceiling(run).await,
            "publish-batch" => self.publish_batch(run).await,
            "publish-single" => self.publish_single(run, 1).await,
            "publish-par" => self.publish_single(run, 50).await,
            "process-c1" => self.process(case, run, self.n(100_000), 1, None).await,
            "process-c10" => self.process(case, run, self.n(100_000), 10, None).await,
            "process-c50" => self.process(case, run, self.n(100_000), 50, None).await,
            "process-c50-ledger" => {
                let window = Some(Duration::from_secs(60));
                self.process(case, run, self.n(100_000), 50, window).await
            }
            "partitioned-process" => self.partitioned_process(run).await,
            "stream" => self.stream(run).await,
            "rate-limited" => self.rate_limited(run).await,
            "fair-groups" => self.fair_groups(run, done).await,
            "process-procs" => self.process_procs(run, done).await,
            "idle-procs" => self.idle_procs(run).await,
            "latency" => self.latency(run).await,
            "delayed" => self.delayed(run).await,
            "backlog" => self.backlog(run).await,
            "memory" => self.memory(run).await,
            "commands-per-message" => self.commands_per_message(run, done).await,
            #[cfg(feature = "peers")]
            "peer-bullmq-publish-batch" => {
                crate::peers::publish_batch(&self.url, run, self.n(100_000), done).await
            }
            #[cfg(feature = "peers")]
            "peer-bullmq-process-c50" => {
                crate::peers::process_c50(&self.url, run, self.n(100_000), done).await
            }
            other => bail!("unknown case {other}"),
        }
    }

    /// A client on a namespace of its own, remembered for [`Bench::clean`].
    async fn client(&self, case: &str, run: usize, topic: &str) -> anyhow::Result<Client> {
        let ns = format!("bench-{case}-{run}");
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((ns.clone(), topic.to_owned()));
        Client::builder(self.url.clone())
            .namespace(ns)
            .build()
            .await
            .with_context(|| format!("cannot connect to {}", self.url))
    }

    /// Removes what the last run wrote: a private server or cluster is flushed (so memory
    /// figures start from the same place); on a given one only the topics it wrote.
    pub(crate) async fn clean(&self) -> anyhow::Result<()> {
        let written = std::mem::take(&mut *self.written.lock().unwrap_or_else(|p| p.into_inner()));
        if self.server.is_some() || self.cluster.is_some() {
            for (_, conn) in &self.masters {
                redis::cmd("FLUSHALL")
                    .exec_async(&mut conn.clone())
                    .await
                    .context("FLUSHALL")?;
            }
            return Ok(());
        }
        let mut admin = self.admin.clone();
        for (ns, topic) in written {
            let mq = Client::builder(self.url.clone())
                .namespace(ns.clone())
                .build()
                .await?;
            mq.purge_queue(&topic).await?;
            for key in [
                format!("{ns}:topics"),
                format!("{ns}:{{{topic}}}:stats"),
                format!("{ns}:{{{topic}}}:minutes"),
            ] {
                admin.query::<()>(redis::cmd("DEL").arg(key)).await?;
            }
        }
        admin
            .query::<()>(redis::cmd("DEL").arg("bench:ceiling"))
            .await?;
        Ok(())
    }

    /// Waits until `n` messages of `topic` were acknowledged; returns how often it looked.
    /// A plain topic's counter is read directly (cheap enough to look every 2 ms); a
    /// partitioned topic's through the library's stats, every 20 ms.
    async fn wait_processed(&self, mq: &Client, topic: &str, n: u64) -> anyhow::Result<u64> {
        let partitioned = mq.topic_info(topic).await?.partitions > 1;
        let key = format!("{}:{{{topic}}}:stats", mq.namespace());
        let mut admin = self.admin.clone();
        let deadline = Instant::now() + CASE_DEADLINE;
        let mut polls = 0;
        loop {
            let processed = if partitioned {
                mq.stats(topic).await?.processed
            } else {
                admin
                    .query::<Option<u64>>(redis::cmd("HGET").arg(&key).arg("processed"))
                    .await?
                    .unwrap_or(0)
            };
            polls += 1;
            if processed >= n {
                return Ok(polls);
            }
            if Instant::now() > deadline {
                bail!("only {processed} of {n} processed after {CASE_DEADLINE:?}");
            }
            tokio::time::sleep(if partitioned { POLL * 10 } else { POLL }).await;
        }
    }

    /// 4 worker processes (concurrency 50 each) on one topic with `n` pending: the
    /// total rate, next to one process's `process-c50` of the same run when it ran, with
    /// duplicate runs and recoveries (both should be 0: the processes cooperate).
    async fn process_procs(&self, run: usize, done: &[CaseReport]) -> anyhow::Result<Figures> {
        const PROCS: usize = 4;
        let topic = "bench.procs";
        let mq = self.client("process-procs", run, topic).await?;
        let n = self.n(400_000);
        // Paused while the processes start, so that they all begin together.
        mq.pause(topic).await?;
        prefill(&mq, topic, n).await?;
        let procs = crate::procs::Procs::start(&mq, &self.url, PROCS, 50, |_| topic.to_owned())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while mq.topic_workers(topic).await?.len() < PROCS {
            if Instant::now() > deadline {
                bail!("the {PROCS} worker processes did not register within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cpu = self.cpu().await?;
        let t0 = Instant::now();
        mq.resume(topic).await?;
        self.wait_processed(&mq, topic, n).await?;
        let elapsed = t0.elapsed();
        let cpu = self.cpu().await?.since(cpu, elapsed, n);
        procs.stop();
        let stats = mq.stats(topic).await?;
        let mut figures = throughput(n, elapsed);
        figures.extend(cpu);
        figures.insert("duplicate_runs".into(), stats.duplicate_runs as f64);
        figures.insert("recovered".into(), stats.recovered as f64);
        if let Some(one) = done
            .iter()
            .find(|r| r.case == "process-c50")
            .and_then(|r| r.median.get("msgs_per_sec"))
        {
            figures.insert("vs_process_c50".into(), rate(n, elapsed) / one);
        }
        Ok(figures)
    }

    /// 8 idle worker processes, each on a topic of its own: the round trips they make
    /// (every command any client sends, as `MONITOR` counts them: recoverer, heartbeats,
    /// scheduler, wake-up waits) per second and process, over 60 s.
    async fn idle_procs(&self, run: usize) -> anyhow::Result<Figures> {
        const PROCS: usize = 8;
        let mq = self.client("idle-procs", run, "bench.idle.0").await?;
        let procs =
            crate::procs::Procs::start(&mq, &self.url, PROCS, 10, |i| format!("bench.idle.{i}"))?;
        // Past start-up (script loading, config checks, first heartbeats).
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Longer than a heartbeat interval (5 s) even in a smoke run.
        let window = if self.smoke {
            Duration::from_secs(6)
        } else {
            Duration::from_secs(60)
        };
        let addrs = self.monitor_addrs()?;
        let trips = crate::procs::round_trips(&addrs, window).await?;
        procs.stop();
        let per = trips as f64 / window.as_secs_f64() / PROCS as f64;
        Ok(Figures::from([
            ("round_trips_per_sec_per_proc".into(), per),
            ("round_trips".into(), trips as f64),
        ]))
    }

    /// `host:port` of every master, for `MONITOR`.
    fn monitor_addrs(&self) -> anyhow::Result<Vec<String>> {
        if self.masters.len() > 1 || self.cluster.is_some() {
            return Ok(self.masters.iter().map(|(addr, _)| addr.clone()).collect());
        }
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        let host = rest.split('/').next().unwrap_or_default();
        if host.contains('@') || host.is_empty() {
            bail!("idle-procs counts round trips with MONITOR, which needs a plain redis://host:port URL");
        }
        Ok(vec![host.to_owned()])
    }

    /// `INFO <section>` of the first master, as a map.
    async fn info(&self, section: &str) -> anyhow::Result<HashMap<String, String>> {
        Ok(self.info_all(section).await?.swap_remove(0).1)
    }

    /// `INFO <section>` of every master, as maps.
    async fn info_all(
        &self,
        section: &str,
    ) -> anyhow::Result<Vec<(String, HashMap<String, String>)>> {
        let mut out = Vec::new();
        for (label, conn) in &self.masters {
            let text: String = redis::cmd("INFO")
                .arg(section)
                .query_async(&mut conn.clone())
                .await
                .with_context(|| format!("INFO {section} on {label}"))?;
            out.push((
                label.clone(),
                text.lines()
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
                    .collect(),
            ));
        }
        Ok(out)
    }

    /// Calls per command since the servers started, summed over the masters.
    async fn command_calls(&self) -> anyhow::Result<HashMap<String, u64>> {
        let mut total = HashMap::new();
        for (_, calls) in self.command_calls_per_master().await? {
            for (k, v) in calls {
                *total.entry(k).or_insert(0) += v;
            }
        }
        Ok(total)
    }

    /// Calls per command, per master.
    async fn command_calls_per_master(
        &self,
    ) -> anyhow::Result<Vec<(String, HashMap<String, u64>)>> {
        Ok(self
            .info_all("commandstats")
            .await?
            .into_iter()
            .map(|(label, stats)| {
                let calls = stats
                    .into_iter()
                    .filter_map(|(k, v)| {
                        let name = k.strip_prefix("cmdstat_")?;
                        let calls = v.split(',').find_map(|f| f.strip_prefix("calls="))?;
                        Some((name.to_owned(), calls.parse().ok()?))
                    })
                    .collect();
                (label, calls)
            })
            .collect())
    }

    /// CPU seconds used so far by Redis (`INFO cpu`, every master) and by this process.
    async fn cpu(&self) -> anyhow::Result<Cpu> {
        Ok(Cpu {
            redis: self.redis_cpu_per_master().await?.iter().sum(),
            client: own_cpu_secs(),
        })
    }

    /// CPU seconds used so far by each master.
    async fn redis_cpu_per_master(&self) -> anyhow::Result<Vec<f64>> {
        Ok(self
            .info_all("cpu")
            .await?
            .into_iter()
            .map(|(_, info)| {
                let get = |k: &str| {
                    info.get(k)
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                get("used_cpu_user") + get("used_cpu_sys")
            })
            .collect())
    }

    async fn used_memory(&self) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for (label, memory) in self.info_all("memory").await? {
            total += memory
                .get("used_memory")
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("INFO memory of {label} has no used_memory"))?;
        }
        Ok(total)
    }

    /// Pipelined LPUSH, then RPOP, of the standard payload: what Redis itself does here.
    async fn redis_ceiling(&self, _run: usize) -> anyhow::Result<Figures> {
        let n = self.n(100_000) as usize;
        let mut conn = self.admin.clone();
        let body = payload(1).to_string();
        let _ = &mut conn;
        let t0 = Instant::now();
        for start in (0..n).step_by(CHUNK) {
            let mut pipe = redis::pipe();
            for _ in start..(start + CHUNK).min(n) {
                pipe.cmd("LPUSH").arg("bench:ceiling").arg(&body).ignore();
            }
            conn.pipe::<()>(&pipe).await?;
        }
        let push = t0.elapsed();
        let t1 = Instant::now();
        let mut popped = 0;
        for start in (0..n).step_by(CHUNK) {
            let mut pipe = redis::pipe();
            for _ in start..(start + CHUNK).min(n) {
                pipe.cmd("RPOP").arg("bench:ceiling");
            }
            let got: Vec<Option<String>> = conn.pipe(&pipe).await?;
            popped += got.iter().flatten().count();
        }
        let pop = t1.elapsed();
        if popped != n {
            bail!("RPOP returned {popped} of {n}");
        }
        Ok(Figures::from([
            ("lpush_per_sec".into(), rate(n as u64, push)),
            ("rpop_per_sec".into(), rate(n as u64, pop)),
            ("pair_per_sec".into(), rate(n as u64, push + pop)),
        ]))
    }

    async fn publish_batch(&self, run: usize) -> anyhow::Result<Figures> {
        let topic = "bench.publish";
        let mq = self.client("publish-batch", run, topic).await?;
        let n = self.n(100_000);
        let cpu = self.cpu().await?;
        let t0 = Instant::now();
        prefill(&mq, topic, n).await?;
        let elapsed = t0.elapsed();
        let cpu = self.cpu().await?.since(cpu, elapsed, n);
        expect_pending(&mq, topic, n).await?;
        let mut figures = throughput(n, elapsed);
        figures.extend(cpu);
        Ok(figures)
    }

    /// `n` awaited single publishes, `parallel` of them in flight at a time.
    async fn publish_single(&self, run: usize, parallel: u64) -> anyhow::Result<Figures> {
        let topic = "bench.publish";
        let case = if parallel == 1 {
            "publish-single"
        } else {
            "publish-par"
        };
        let mq = self.client(case, run, topic).await?;
        let n = self.n(20_000);
        let next = Arc::new(AtomicU64::new(0));
        let cpu = self.cpu().await?;
        let t0 = Instant::now();
        let tasks: Vec<JoinHandle<forgemq::Result<()>>> = (0..parallel)
            .map(|_| {
                let (mq, next) = (mq.clone(), Arc::clone(&next));
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        mq.publish(topic, payload(i)).await?;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        let elapsed = t0.elapsed();
        let cpu = self.cpu().await?.since(cpu, elapsed, n);
        expect_pending(&mq, topic, n).await?;
        let mut figures = throughput(n, elapsed);
        figures.extend(cpu);
        Ok(figures)
    }

    /// `n` prefilled messages (untimed), then one worker at `concurrency` with a no-op
    /// handler, timed from its start to the `n`th ack. With `ledger`, the subscription keeps
    /// the processed ledger for that long (`Subscription::deduplicate`), and the figures
    /// add what it costs in memory per processed message.
    async fn process(
        &self,
        case: &str,
        run: usize,
        n: u64,
        concurrency: usize,
        ledger: Option<Duration>,
    ) -> anyhow::Result<Figures> {
        let topic = "bench.process";
        let mq = self.client(case, run, topic).await?;
        prefill(&mq, topic, n).await?;
        let before = self.command_calls().await?;
        let cpu = self.cpu().await?;
        let t0 = Instant::now();
        let worker = Running::start_with(&mq, topic, concurrency, ledger, |_| {})?;
        let polls = self.wait_processed(&mq, topic, n).await?;
        let elapsed = t0.elapsed();
        let cpu = self.cpu().await?.since(cpu, elapsed, n);
        let after = self.command_calls().await?;
        worker.stop().await?;
        let mut figures = throughput(n, elapsed);
        figures.extend(command_figures(&before, &after, polls, n));
        figures.extend(cpu);
        if ledger.is_some() {
            let key = format!("bench-{case}-{run}:{{{topic}}}:processed");
            let bytes: Option<u64> = self
                .admin
                .clone()
                .query(redis::cmd("MEMORY").arg("USAGE").arg(&key))
                .await?;
            figures.insert(
                "ledger_bytes_per_msg".to_owned(),
                bytes.unwrap_or(0) as f64 / n as f64,
            );
        }
        Ok(figures)
    }

    /// A plain topic, then a topic of 12 partitions, on the same Redis (on a cluster the
    /// partitions spread over its masters): `n` prefilled messages each, one worker at
    /// concurrency 50, timed from its start to the `n`th ack. Per master, its share of the
    /// Redis commands and CPU seconds of each run.
    async fn partitioned_process(&self, run: usize) -> anyhow::Result<Figures> {
        let n = self.n(100_000);
        let mut figures = Figures::new();
        let mut rates = Vec::new();
        for (label, partitions) in [("plain", 1u32), ("partitioned", 12)] {
            let topic = format!("bench.{label}");
            let mq = self.client("partitioned-process", run, &topic).await?;
            if partitions > 1 {
                mq.create_topic(&topic, TopicOptions::new().partitions(partitions))
                    .await?;
            }
            prefill(&mq, &topic, n).await?;
            let calls_before = self.command_calls_per_master().await?;
            let cpu_before = self.redis_cpu_per_master().await?;
            let t0 = Instant::now();
            let worker = Running::start(&mq, &topic, 50, |_| {})?;
            self.wait_processed(&mq, &topic, n).await?;
            let elapsed = t0.elapsed();
            let calls_after = self.command_calls_per_master().await?;
            let cpu_after = self.redis_cpu_per_master().await?;
            worker.stop().await?;
            let rate = n as f64 / elapsed.as_secs_f64();
            rates.push(rate);
            figures.insert(format!("{label}_msgs_per_sec"), rate);
            let redis_secs: f64 = cpu_after.iter().sum::<f64>() - cpu_before.iter().sum::<f64>();
            figures.insert(
                format!("{label}_redis_us_per_msg"),
                redis_secs * 1e6 / n.max(1) as f64,
            );
            let calls: Vec<f64> = calls_after
                .iter()
                .zip(&calls_before)
                .map(|((_, a), (_, b))| {
                    a.iter()
                        .map(|(k, v)| v.saturating_sub(b.get(k).copied().unwrap_or(0)) as f64)
                        .sum()
                })
                .collect();
            let cpu: Vec<f64> = cpu_after
                .iter()
                .zip(&cpu_before)
                .map(|(a, b)| a - b)
                .collect();
            let (calls_total, cpu_total) = (calls.iter().sum::<f64>(), cpu.iter().sum::<f64>());
            let scripts: f64 = calls_after
                .iter()
                .zip(&calls_before)
                .map(|((_, a), (_, b))| {
                    let get = |m: &HashMap<String, u64>| m.get("evalsha").copied().unwrap_or(0);
                    get(a).saturating_sub(get(b)) as f64
                })
                .sum();
            figures.insert(format!("{label}_scripts_per_msg"), scripts / n as f64);
            figures.insert(format!("{label}_commands_per_msg"), calls_total / n as f64);
            figures.insert(format!("{label}_redis_cpu_secs"), cpu_total);
            for (i, (c, u)) in calls.iter().zip(&cpu).enumerate() {
                figures.insert(format!("{label}_m{i}_cmd_share"), c / calls_total.max(1.0));
                figures.insert(format!("{label}_m{i}_cpu_share"), u / cpu_total.max(1e-9));
            }
        }
        figures.insert("partitioned_vs_plain".to_owned(), rates[1] / rates[0]);
        Ok(figures)
    }

    /// A producer (`publish_batch`, chunks of 1000) and a worker at concurrency 50 at
    /// once, timed from the start to the last ack.
    async fn stream(&self, run: usize) -> anyhow::Result<Figures> {
        let topic = "bench.stream";
        let mq = self.client("stream", run, topic).await?;
        let n = self.n(100_000);
        let t0 = Instant::now();
        let worker = Running::start(&mq, topic, 50, |_| {})?;
        let producer = {
            let mq = mq.clone();
            tokio::spawn(async move { prefill(&mq, topic, n).await })
        };
        let cpu = self.cpu().await?;
        self.wait_processed(&mq, topic, n).await?;
        let elapsed = t0.elapsed();
        let cpu = self.cpu().await?.since(cpu, elapsed, n);
        producer.await??;
        worker.stop().await?;
        let mut figures = throughput(n, elapsed);
        figures.extend(cpu);
        Ok(figures)
    }

    /// Messages published one at a time at a modest fixed rate to an idle worker: the time
    /// from the publish call to the handler's start.
    async fn latency(&self, run: usize) -> anyhow::Result<Figures> {
        let topic = "bench.latency";
        let mq = self.client("latency", run, topic).await?;
        let n = self.n(10_000);
        // 1,000 a second: far below every throughput figure, so the worker is idle
        // (blocked) when each message arrives.
        let every = Duration::from_millis(1);
        let clock = Clock::new(n);
        let worker = {
            let clock = Arc::clone(&clock);
            Running::start(&mq, topic, 10, move |i| clock.mark_handled(i))?
        };
        // The worker reaches its blocking wait before the first message.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..n {
            tick.tick().await;
            clock.mark_sent(i);
            mq.publish(topic, payload(i)).await?;
        }
        clock.wait_all(Duration::from_secs(30)).await?;
        worker.stop().await?;
        let lat = clock.delays(|_| Duration::ZERO);
        Ok(percentiles(&lat))
    }

    /// A topic limited to 2,000/s (burst 200) with far more work waiting, one worker at
    /// concurrency 50: the rate measured against the limit, after the burst (5 s; 1 s for
    /// --smoke).
    async fn rate_limited(&self, run: usize) -> anyhow::Result<Figures> {
        let topic = "bench.limited";
        let mq = self.client("rate-limited", run, topic).await?;
        let limit = 2000.0;
        let window = if self.smoke {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        prefill(
            &mq,
            topic,
            (limit * 1.5 * window.as_secs_f64()) as u64 + 1000,
        )
        .await?;
        mq.set_rate_limit(
            topic,
            forgemq::RateLimit::new(2000, Duration::from_secs(1)).burst(200),
        )
        .await?;
        let worker = Running::start(&mq, topic, 50, |_| {})?;
        // Past the burst, then count for the window.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = mq.stats(topic).await?.processed;
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let done = mq.stats(topic).await?.processed - before;
        let elapsed = t0.elapsed();
        worker.stop().await?;
        let rate = done as f64 / elapsed.as_secs_f64();
        let mut figures = Figures::new();
        figures.insert("limit_per_s".to_owned(), limit);
        figures.insert("measured_per_s".to_owned(), rate);
        figures.insert("ratio".to_owned(), rate / limit);
        Ok(figures)
    }

    /// Fair groups: group A has 100,000 waiting (10,000 for --smoke) and one worker at
    /// concurrency 50 drains it while group B publishes 100, one every 5 ms. B's wait
    /// (publish to handler start) against A's drain time, and the rate and Redis CPU per
    /// message of grouped processing next to process-c50's (what groups cost).
    async fn fair_groups(&self, run: usize, done: &[CaseReport]) -> anyhow::Result<Figures> {
        const SMALL: u64 = 100;
        let topic = "bench.groups";
        let mq = self.client("fair-groups", run, topic).await?;
        let n = self.n(100_000);
        for start in (0..n).step_by(CHUNK) {
            let end = (start + CHUNK as u64).min(n);
            let items = (start..end).map(|i| (payload(i), PublishOptions::new().group("A")));
            mq.publish_batch_with(topic, items).await?;
        }
        let clock = Clock::new(SMALL);
        let a_done = Arc::new(AtomicU64::new(0));
        let cpu = self.cpu().await?;
        let t0 = Instant::now();
        let worker = {
            let (clock, a_done) = (Arc::clone(&clock), Arc::clone(&a_done));
            Running::start(&mq, topic, 50, move |i| {
                if i >= n {
                    clock.mark_handled(i - n);
                } else {
                    a_done.fetch_add(1, Ordering::Relaxed);
                }
            })?
        };
        for i in 0..SMALL {
            clock.mark_sent(i);
            let options = PublishOptions::new().group("B");
            mq.publish_with(topic, payload(n + i), options).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let a_left = n - a_done.load(Ordering::Relaxed).min(n);
        clock.wait_all(Duration::from_secs(60)).await?;
        self.wait_processed(&mq, topic, n + SMALL).await?;
        let elapsed = t0.elapsed();
        let cpu = self.cpu().await?.since(cpu, elapsed, n + SMALL);
        worker.stop().await?;
        let waits = percentiles(&clock.delays(|_| Duration::ZERO));
        let mut figures = throughput(n + SMALL, elapsed);
        let drain_ms = elapsed.as_secs_f64() * 1000.0;
        for (k, v) in waits {
            figures.insert(format!("b_wait_{k}"), v);
        }
        let p99 = figures.get("b_wait_p99_ms").copied().unwrap_or(0.0);
        figures.insert("a_drain_ms".into(), drain_ms);
        figures.insert("b_p99_share".into(), p99 / drain_ms);
        figures.insert("a_left_when_b_done".into(), a_left as f64);
        figures.extend(cpu);
        if let Some(one) = done
            .iter()
            .find(|c| c.case == "process-c50")
            .and_then(|r| r.median.get("msgs_per_sec"))
        {
            figures.insert("vs_process_c50".into(), rate(n + SMALL, elapsed) / one);
        }
        Ok(figures)
    }

    /// Delayed messages due across 10 s: how late each starts; any early one fails.
    async fn delayed(&self, run: usize) -> anyhow::Result<Figures> {
        let topic = "bench.delayed";
        let mq = self.client("delayed", run, topic).await?;
        let n = self.n(10_000);
        let spread = if self.smoke {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        let delay_of =
            move |i: u64| spread.mul_f64(i as f64 / n as f64) + Duration::from_millis(200);
        let clock = Clock::new(n);
        let worker = {
            let clock = Arc::clone(&clock);
            Running::start(&mq, topic, 50, move |i| clock.mark_handled(i))?
        };
        // Chunks of 100, so that the time taken before a chunk's call is within a
        // millisecond of the time Redis gives its messages (due = Redis time + delay).
        for start in (0..n).step_by(100) {
            let end = (start + 100).min(n);
            for i in start..end {
                clock.mark_sent(i);
            }
            let items =
                (start..end).map(|i| (payload(i), PublishOptions::new().delay(delay_of(i))));
            mq.publish_batch_with(topic, items).await?;
        }
        clock.wait_all(spread + Duration::from_secs(30)).await?;
        worker.stop().await?;
        let late = clock.signed_delays(delay_of);
        let early = late.iter().filter(|d| **d < 0.0).count();
        let late_ms: Vec<f64> = late.iter().map(|d| d.max(0.0)).collect();
        let mut figures = percentiles(&late_ms);
        figures.insert("early".into(), early as f64);
        if early > 0 {
            let worst = late.iter().copied().fold(f64::INFINITY, f64::min);
            bail!(
                "{early} delayed messages started before they were due (worst {:.3} ms early)",
                -worst
            );
        }
        Ok(figures)
    }

    /// Processing at concurrency 50 with a small and a large backlog; the ratio of rates.
    async fn backlog(&self, run: usize) -> anyhow::Result<Figures> {
        let small = self.n(10_000);
        let large = self.n(1_000_000);
        let a = self.process("backlog-small", run, small, 50, None).await?;
        self.clean().await?;
        let b = self.process("backlog-large", run, large, 50, None).await?;
        let (ra, rb) = (a["msgs_per_sec"], b["msgs_per_sec"]);
        Ok(Figures::from([
            ("small_backlog".into(), small as f64),
            ("large_backlog".into(), large as f64),
            ("small_msgs_per_sec".into(), ra),
            ("large_msgs_per_sec".into(), rb),
            ("ratio".into(), rb / ra),
        ]))
    }

    /// Redis `used_memory` per pending message, and the part of it beyond the stored
    /// envelope.
    async fn memory(&self, run: usize) -> anyhow::Result<Figures> {
        let topic = "bench.memory";
        let mq = self.client("memory", run, topic).await?;
        let n = self.n(100_000);
        // The topic's fixed keys (stats, registry) exist before the baseline.
        mq.publish(topic, payload(0)).await?;
        let before = self.used_memory().await?;
        prefill(&mq, topic, n).await?;
        let after = self.used_memory().await?;
        expect_pending(&mq, topic, n + 1).await?;
        let peeked = mq.peek(topic, forgemq::MessageState::Pending, 0..1).await?;
        let envelope = peeked
            .first()
            .context("nothing pending after the prefill")?
            .raw
            .len();
        let per = (after - before) / n as f64;
        Ok(Figures::from([
            ("bytes_per_msg".into(), per),
            ("envelope_bytes".into(), envelope as f64),
            (
                "payload_bytes".into(),
                payload(n / 2).to_string().len() as f64,
            ),
            ("overhead_bytes".into(), per - envelope as f64),
        ]))
    }

    /// Commands per processed message from the process cases already run, or from one
    /// process run at concurrency 10 when none was.
    async fn commands_per_message(
        &self,
        run: usize,
        done: &[CaseReport],
    ) -> anyhow::Result<Figures> {
        let mut figures = Figures::new();
        for r in done.iter().filter(|r| r.case.starts_with("process-c")) {
            let c = r.case.trim_start_matches("process-");
            for (k, v) in &r.median {
                if k.starts_with("cmd_") || k.ends_with("_per_msg") {
                    figures.insert(format!("{c}_{k}"), *v);
                }
            }
        }
        if figures.is_empty() {
            let own = self
                .process("commands-per-message", run, self.n(100_000), 10, None)
                .await?;
            figures.extend(
                own.into_iter()
                    .filter(|(k, _)| k.starts_with("cmd_") || k.ends_with("_per_msg"))
                    .map(|(k, v)| (format!("c10_{k}"), v)),
            );
        }
        Ok(figures)
    }
}

/// Publishes `n` standard messages in chunks of [`CHUNK`].
async fn prefill(mq: &Client, topic: &str, n: u64) -> anyhow::Result<()> {
    for start in (0..n).step_by(CHUNK) {
        let end = (start + CHUNK as u64).min(n);
        mq.publish_batch(topic, (start..end).map(payload)).await?;
    }
    Ok(())
}

async fn expect_pending(mq: &Client, topic: &str, n: u64) -> anyhow::Result<()> {
    let pending = mq.get_queue_length(topic).await?;
    if pending != n {
        bail!("{pending} messages pending instead of {n}");
    }
    Ok(())
}

/// A worker on one topic with a handler that calls `on_start` with the payload's `id`.
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<forgemq::Result<()>>,
}

impl Running {
    fn start(
        mq: &Client,
        topic: &str,
        concurrency: usize,
        on_start: impl Fn(u64) + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        Self::start_with(mq, topic, concurrency, None, on_start)
    }

    fn start_with(
        mq: &Client,
        topic: &str,
        concurrency: usize,
        ledger: Option<Duration>,
        on_start: impl Fn(u64) + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let on_start = Arc::new(on_start);
        let mut sub = Subscription::new().concurrency(concurrency);
        if let Some(window) = ledger {
            sub = sub.deduplicate(window);
        }
        let worker = Worker::builder(mq.clone())
            .subscribe_with(topic, sub, move |msg: Message<Value>| {
                on_start(msg.data["id"].as_u64().unwrap_or(u64::MAX));
                async { Ok::<(), HandlerError>(()) }
            })
            .build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run_until(async {
            let _ = stopped.await;
        }));
        Ok(Self { stop, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// When each message was sent and when its handler started, in µs of the system clock:
/// the clock Redis gives due times by (on this machine), so that "early" compares like
/// with like.
struct Clock {
    sent: Vec<AtomicU64>,
    handled: Vec<AtomicU64>,
    count: AtomicUsize,
}

impl Clock {
    fn new(n: u64) -> Arc<Self> {
        Arc::new(Self {
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            handled: (0..n).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicUsize::new(0),
        })
    }

    fn now(&self) -> u64 {
        // Never 0, which means "not yet".
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64)
            .max(1)
    }

    fn mark_sent(&self, i: u64) {
        self.sent[i as usize].store(self.now(), Ordering::SeqCst);
    }

    /// The first start of each message counts; a redelivery would be a second.
    fn mark_handled(&self, i: u64) {
        if let Some(slot) = self.handled.get(i as usize) {
            if slot
                .compare_exchange(0, self.now(), Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                self.count.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    async fn wait_all(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while self.count.load(Ordering::SeqCst) < self.handled.len() {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {} messages reached their handler within {limit:?}",
                    self.count.load(Ordering::SeqCst),
                    self.handled.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Milliseconds from sent + `offset(i)` to the handler's start, per message; negative
    /// when the handler started earlier than that.
    fn signed_delays(&self, offset: impl Fn(u64) -> Duration) -> Vec<f64> {
        (0..self.sent.len())
            .map(|i| {
                let sent = self.sent[i].load(Ordering::SeqCst) as f64;
                let handled = self.handled[i].load(Ordering::SeqCst) as f64;
                let due = sent + offset(i as u64).as_micros() as f64;
                (handled - due) / 1000.0
            })
            .collect()
    }

    fn delays(&self, offset: impl Fn(u64) -> Duration) -> Vec<f64> {
        self.signed_delays(offset)
    }
}

/// CPU seconds of Redis and of the benchmark process at one moment.
#[derive(Clone, Copy)]
struct Cpu {
    redis: f64,
    client: f64,
}

impl Cpu {
    /// Cores kept busy (CPU seconds per second) since `earlier`: what bounds a case.
    /// CPU used since `earlier` as cores busy, and Redis's per message (µs of
    /// redis-server CPU, all masters together, per message of the `n` the case moved).
    fn since(self, earlier: Cpu, elapsed: Duration, n: u64) -> Figures {
        let secs = elapsed.as_secs_f64();
        let redis = self.redis - earlier.redis;
        Figures::from([
            ("redis_cpu".into(), redis / secs),
            ("client_cpu".into(), (self.client - earlier.client) / secs),
            ("redis_us_per_msg".into(), redis * 1e6 / n.max(1) as f64),
        ])
    }
}

/// This process's user + system CPU seconds, from `/proc/self/stat` (0 where there is
/// no procfs); clock ticks are 100 a second on Linux.
fn own_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

fn throughput(n: u64, elapsed: Duration) -> Figures {
    Figures::from([
        ("msgs_per_sec".into(), rate(n, elapsed)),
        ("secs".into(), elapsed.as_secs_f64()),
    ])
}

/// p50 / p99 / max of a set of milliseconds.
fn percentiles(ms: &[f64]) -> Figures {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
        sorted.get(i).copied().unwrap_or(0.0)
    };
    Figures::from([
        ("p50_ms".into(), at(0.50)),
        ("p99_ms".into(), at(0.99)),
        ("max_ms".into(), sorted.last().copied().unwrap_or(0.0)),
    ])
}

/// Commands per processed message between two `INFO commandstats` readings: all of them
/// (including those run inside scripts), the round trips (script calls and blocking
/// waits), and the busiest commands. The timer's own HGETs are taken out.
fn command_figures(
    before: &HashMap<String, u64>,
    after: &HashMap<String, u64>,
    polls: u64,
    n: u64,
) -> Figures {
    let mut delta: HashMap<String, u64> = after
        .iter()
        .map(|(c, v)| (c.clone(), v - before.get(c).copied().unwrap_or(0)))
        .collect();
    // The two INFO calls bracket the run; neither is the worker's.
    for (cmd, ours) in [("hget", polls), ("info", 1)] {
        if let Some(v) = delta.get_mut(cmd) {
            *v = v.saturating_sub(ours);
        }
    }
    let total: u64 = delta.values().sum();
    let round_trips: u64 = ["evalsha", "eval", "blpop", "bzpopmin"]
        .iter()
        .map(|c| delta.get(*c).copied().unwrap_or(0))
        .sum();
    let per = |x: u64| x as f64 / n as f64;
    let mut figures = Figures::from([
        ("commands_per_msg".into(), per(total)),
        ("round_trips_per_msg".into(), per(round_trips)),
    ]);
    for (cmd, calls) in delta {
        if calls > 0 {
            figures.insert(format!("cmd_{cmd}"), per(calls));
        }
    }
    figures
}
