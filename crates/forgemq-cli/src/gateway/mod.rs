//! `forgemq gateway`: consumes topics and delivers each message to an HTTP endpoint or a
//! command, with the library's retries, backoff and dead-letter queue: the seed's "Gateway
//! Worker", for services in any language.
//!
//! One library [`Worker`] runs per consumed topic (so a reload can restart one topic without
//! touching the others). Routes naming a topic start at once; pattern routes (`order.*`)
//! look in the topic registry every `discover_interval` for topics that appeared since.
//!
//! Signals: SIGTERM or Ctrl-C drains (in-flight deliveries get their route's timeout, the
//! rest go back to pending) and exits; SIGHUP re-reads the config and restarts only the
//! topics whose route changed, each drained the same way, so nothing is lost.

mod config;
mod metrics;
mod target;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use forgemq::{Client, HandlerError, Message, Subscription, Worker};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub(crate) use config::ConfigError;
use config::{Config, Route};
use metrics::Metrics;

/// The gateway's port in the seed.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:8084";

/// Extra time the library gives a handler beyond the route's own timeout: the target
/// enforces the timeout itself (and kills a command's process group); this is a backstop.
const HANDLER_GRACE: Duration = Duration::from_secs(5);

/// Longest wait before restarting a topic's worker that ended on its own.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// Starts the gateway and runs until SIGTERM / Ctrl-C.
///
/// The config is read and checked before connecting: a bad file is refused with the line
/// at fault, and nothing is consumed.
pub(crate) async fn run(
    redis: &str,
    connect: &crate::ConnectOptions,
    config_path: &Path,
    listen: Option<SocketAddr>,
    scheduler: bool,
) -> Result<()> {
    // Before anything else: SIGHUP's default action would end the process.
    let signals = Signals::new()?;
    let config = Config::load(config_path)?;
    let listen = match listen.or(config.listen) {
        Some(l) => l,
        None => DEFAULT_LISTEN.parse().context("default listen address")?,
    };
    let mq = crate::connect_to(redis, connect).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    let http = reqwest::Client::builder()
        .user_agent(concat!("forgemq-gateway/", env!("CARGO_PKG_VERSION")))
        // A redirect is an answer other than 2xx: following one would turn the POST into
        // a bodiless GET whose 200 would count as delivered.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("could not set up the HTTP client")?;
    let shared = Arc::new(Shared {
        mq,
        http,
        metrics: Metrics::default(),
        consumers: Mutex::new(HashMap::new()),
    });
    let server = {
        let app = router(Arc::clone(&shared));
        tokio::spawn(async move { axum::serve(listener, app).await })
    };
    crate::logging::say(&format!(
        "forgemq gateway: {} route(s) from {}; health at http://{listen}/healthz, readiness at /ready (or /readyz), metrics at /metrics",
        config.routes.len(),
        config_path.display()
    ));
    // One scheduler for the process (the routes' workers run none of their own).
    let (stop_scheduler, scheduler_stopped) = watch::channel(false);
    let scheduler = scheduler.then(|| {
        let mq = shared.mq.clone();
        let mut stopped = scheduler_stopped.clone();
        tokio::spawn(async move {
            mq.run_scheduler(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        })
    });
    let result = supervise(&shared, config, config_path, signals).await;
    let _ = stop_scheduler.send(true);
    if let Some(scheduler) = scheduler {
        let _ = scheduler.await;
    }
    server.abort();
    result
}

/// State shared by the supervisor, the consumers and the HTTP endpoints.
struct Shared {
    mq: Client,
    http: reqwest::Client,
    metrics: Metrics,
    /// Consumed topics: the route each runs with and whether its worker is running now.
    consumers: Mutex<HashMap<String, Consumer>>,
}

/// One consumed topic.
struct Consumer {
    route: Route,
    running: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Consumer>> {
        self.consumers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts, reloads and stops consumers until a shutdown signal.
async fn supervise(
    shared: &Arc<Shared>,
    mut config: Config,
    path: &Path,
    mut signals: Signals,
) -> Result<()> {
    let mut discover = tokio::time::interval(config.discover_interval);
    discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = discover.tick() => reconcile(shared, &config).await,
            signal = signals.next() => match signal {
                Signal::Reload => match Config::load(path) {
                    Ok(new) => {
                        if new.listen != config.listen {
                            tracing::warn!("listen changed in the config; it takes effect at the next start");
                        }
                        if new.discover_interval != config.discover_interval {
                            discover = tokio::time::interval(new.discover_interval);
                            discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        config = new;
                        tracing::info!(routes = config.routes.len(), "config reloaded");
                        crate::logging::say(&format!("forgemq gateway: reloaded {} ({} route(s))", path.display(), config.routes.len()));
                        reconcile(shared, &config).await;
                    }
                    Err(e) => {
                        tracing::error!("config not reloaded, the running one stays: {e}");
                        crate::logging::say_error(&format!("forgemq gateway: config not reloaded, the running one stays: {e}"));
                    }
                },
                Signal::Stop => break,
            },
        }
    }
    crate::logging::say("forgemq gateway: stopping; in-flight deliveries get their route's timeout, the rest go back to pending");
    let all: Vec<(String, Consumer)> = shared.lock().drain().collect();
    stop_all(all).await;
    Ok(())
}

/// Makes the running consumers match `config`: starts topics it routes that are not
/// consumed, restarts those whose route changed, stops those it no longer routes.
async fn reconcile(shared: &Arc<Shared>, config: &Config) {
    let mut wanted: Vec<String> = config
        .routes
        .iter()
        .filter(|r| !r.is_pattern())
        .map(|r| r.topic.clone())
        .collect();
    if config.routes.iter().any(Route::is_pattern) {
        match shared.mq.topics().await {
            Ok(topics) => wanted.extend(topics),
            // Redis is down: the topics consumed now stay (with their route as the config
            // says now), and the registry is read again at the next tick.
            Err(e) => {
                tracing::warn!(error = %e, "could not read the topic registry");
                wanted.extend(shared.lock().keys().cloned());
            }
        }
    }
    let mut stopping = Vec::new();
    let mut starting = Vec::new();
    {
        let mut consumers = shared.lock();
        let keep: HashMap<&str, &Route> = wanted
            .iter()
            .filter_map(|t| config.route_for(t).map(|r| (t.as_str(), r)))
            .collect();
        let current: Vec<String> = consumers.keys().cloned().collect();
        for topic in current {
            let unchanged = keep
                .get(topic.as_str())
                .is_some_and(|r| consumers.get(&topic).is_some_and(|c| c.route == **r));
            if !unchanged {
                if let Some(c) = consumers.remove(&topic) {
                    stopping.push((topic, c));
                }
            }
        }
        for (topic, route) in keep {
            if !consumers.contains_key(topic) {
                starting.push((topic.to_owned(), route.clone()));
            }
        }
    }
    // Drain the old consumers first, so that a topic never has two at once.
    for (topic, _) in &stopping {
        tracing::info!(topic = %topic, "stopping consumer (route changed or removed)");
    }
    stop_all(stopping).await;
    for (topic, route) in starting {
        tracing::info!(topic = %topic, route = %route.topic, line = route.line, "starting consumer");
        let consumer = start(shared, topic.clone(), route);
        shared.lock().insert(topic, consumer);
    }
}

async fn stop_all(consumers: Vec<(String, Consumer)>) {
    for (_, c) in &consumers {
        let _ = c.stop.send(true);
    }
    for (topic, c) in consumers {
        if let Err(e) = c.task.await {
            tracing::error!(topic = %topic, error = %e, "consumer task failed");
        }
    }
}

/// Starts consuming `topic` with `route`, restarting the worker if it ever ends on its own.
fn start(shared: &Arc<Shared>, topic: String, route: Route) -> Consumer {
    let running = Arc::new(AtomicBool::new(false));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(consume(
        Arc::clone(shared),
        topic,
        route.clone(),
        stop_rx,
        Arc::clone(&running),
    ));
    Consumer {
        route,
        running,
        stop,
        task,
    }
}

async fn consume(
    shared: Arc<Shared>,
    topic: String,
    route: Route,
    mut stop: watch::Receiver<bool>,
    running: Arc<AtomicBool>,
) {
    let route = Arc::new(route);
    // Its series exist from the start, at zero: a rate over them, or an alert on
    // failures, works before the first delivery.
    shared.metrics.register(&route.topic, &topic);
    let mut delay = Duration::from_secs(1);
    loop {
        let worker = match build_worker(&shared, &topic, &route) {
            Ok(w) => w,
            Err(e) => {
                // Checked when the config was loaded; only a library refusal lands here.
                tracing::error!(topic = %topic, error = %e, "cannot consume this topic");
                return;
            }
        };
        running.store(true, Ordering::SeqCst);
        let mut until = stop.clone();
        let result = worker
            .run_until(async move {
                let _ = until.wait_for(|s| *s).await;
            })
            .await;
        running.store(false, Ordering::SeqCst);
        if *stop.borrow() {
            return;
        }
        match result {
            Ok(()) => tracing::warn!(topic = %topic, "consumer ended; restarting"),
            Err(e) => tracing::warn!(topic = %topic, error = %e, "consumer failed; restarting"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        delay = (delay * 2).min(MAX_RESTART_DELAY);
    }
}

fn build_worker(shared: &Arc<Shared>, topic: &str, route: &Arc<Route>) -> forgemq::Result<Worker> {
    let sub = Subscription::new()
        .concurrency(route.concurrency)
        .max_retry(route.max_retry)
        .backoff(route.backoff.to_backoff())
        .timeout(route.timeout + HANDLER_GRACE);
    let handler = {
        let shared = Arc::clone(shared);
        let route = Arc::clone(route);
        move |msg: Message<Value>| {
            let shared = Arc::clone(&shared);
            let route = Arc::clone(&route);
            async move { deliver(&shared, &route, msg).await }
        }
    };
    Worker::builder(shared.mq.clone())
        // How operators tell the gateway from other workers in `forgemq workers`.
        .name("gateway")
        // The process runs one scheduler (see `run`), not one per route.
        .scheduler(false)
        .subscribe_with(topic, sub, handler)
        // SIGTERM and reloads drain within the route's timeout, then hand the rest back.
        .shutdown_timeout(route.timeout + Duration::from_secs(1))
        .build()
}

async fn deliver(shared: &Shared, route: &Route, msg: Message<Value>) -> Result<(), HandlerError> {
    let started = Instant::now();
    let _in_flight = shared.metrics.start(&route.topic);
    let result = target::deliver(&shared.http, &route.target, route.timeout, &msg).await;
    shared
        .metrics
        .finish(&route.topic, &msg.topic, result.is_ok(), started.elapsed());
    if let Err(e) = &result {
        tracing::warn!(topic = %msg.topic, id = %msg.id, attempt = msg.retry + 1, error = %e, "delivery failed");
    }
    result
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        // The name `forgemq serve` and Kubernetes habits use; the same check.
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(shared)
}

/// 200 when Redis takes writes and every consumer is running; 503 with the reasons if not.
async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let mut problems = Vec::new();
    match tokio::time::timeout(Duration::from_secs(3), shared.mq.check_writable()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("redis is not writable: {e}")),
        Err(_) => problems.push("redis did not answer within 3s".to_owned()),
    }
    let consumers: Vec<(String, bool)> = shared
        .lock()
        .iter()
        .map(|(t, c)| (t.clone(), c.running.load(Ordering::SeqCst)))
        .collect();
    for (topic, running) in &consumers {
        if !running {
            problems.push(format!("the consumer of {topic} is not running"));
        }
    }
    let topics: Vec<&String> = consumers.iter().map(|(t, _)| t).collect();
    if problems.is_empty() {
        (
            StatusCode::OK,
            Json(json!({"status": "ready", "topics": topics})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "problems": problems, "topics": topics})),
        )
            .into_response()
    }
}

async fn metrics_text(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let running = shared
        .lock()
        .values()
        .fold(HashMap::<String, i64>::new(), |mut m, c| {
            *m.entry(c.route.topic.clone()).or_default() +=
                i64::from(c.running.load(Ordering::SeqCst));
            m
        });
    match shared.metrics.encode(&running) {
        Ok(text) => crate::exposition::respond(&headers, text),
        Err(e) => crate::exposition::failed(&e),
    }
}

/// What the supervisor is told by signals.
enum Signal {
    Reload,
    Stop,
}

/// Signal streams held for the whole run, so that a signal arriving while the supervisor
/// is busy (draining a reload) is kept for it rather than missed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}
