//! `forgemq serve`: the HTTP API under `/api/v1`, its OpenAPI document, `/metrics`,
//! `/healthz` and `/readyz`, and the dashboard at `/`, for services in any language and
//! for operators. `forgemq dev` serves the same.
//!
//! # Layout
//! - `mod.rs`: options, start-up, the router, the dashboard, health and metrics.
//! - `api.rs`: the routes under `/api/v1`, each declared once with `#[utoipa::path]`; the
//!   router is built from those declarations, so `/api/v1/openapi.json` always matches.
//! - `guard.rs`: who may call: the `Host` and `Origin` checks and the token.
//! - `schema.rs`: the contract: answer schemas, how numbers are read, shared statuses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use forgemq::Client;
use serde_json::json;
use tokio::net::TcpListener;

mod api;
mod guard;
mod schema;

use api::ApiError;

/// Who may call the server, besides the routes themselves.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    /// `Authorization: Bearer <token>` required on the API.
    pub(crate) token: Option<String>,
    /// Extra names (`--allow-host`) a loopback server answers to besides its own.
    pub(crate) allow_hosts: Vec<String>,
    /// `/metrics` without the token (`--metrics-public`): it names every topic and its
    /// traffic, so by default it is guarded like the API.
    pub(crate) metrics_public: bool,
    /// Run a scheduler beside the server (fires the namespace's schedules); off with
    /// `--no-scheduler`.
    pub(crate) scheduler: bool,
}

impl Options {
    /// Refuses settings that would expose the queues: an empty token, or a bind that
    /// others can reach without a token. Checked before anything starts.
    pub(crate) fn check(&self, bind: SocketAddr) -> anyhow::Result<()> {
        if self.token.as_deref().is_some_and(str::is_empty) {
            bail!("the token is empty: pass a non-empty --token (or FORGEMQ_TOKEN), or none");
        }
        if !bind.ip().is_loopback() && self.token.is_none() {
            bail!(
                "refusing to listen on {bind} without a token: anyone who can reach it could read and delete messages; \
                 pass --token (or FORGEMQ_TOKEN), or bind to 127.0.0.1"
            );
        }
        for name in &self.allow_hosts {
            guard::check_allowed_host(name)?;
        }
        Ok(())
    }
}

/// Takes the port, so that a port in use is reported before anything else starts.
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("could not listen on {addr} (is another forgemq serve or dev running? choose another port with --bind)")
    })
}

/// Serves on `listener` until Ctrl-C / SIGTERM.
pub(crate) async fn serve(
    mq: Client,
    listener: TcpListener,
    options: Options,
) -> anyhow::Result<()> {
    let local = listener
        .local_addr()
        .context("could not read the listening address")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let scheduler = options.scheduler.then(|| {
        let mq = mq.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            mq.run_scheduler(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
        })
    });
    let app = router(mq, local, options);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            shutdown_signal().await;
        })
        .await
        .context("the HTTP server failed");
    let _ = stop.send(true);
    if let Some(scheduler) = scheduler {
        let _ = scheduler.await;
    }
    served
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What every handler can reach.
#[derive(Clone)]
struct AppState {
    mq: Client,
    token: Option<String>,
    /// The last `/readyz` check, reused for [`READY_CACHE`].
    readiness: Arc<tokio::sync::Mutex<Option<Readiness>>>,
}

/// The whole application, as served on `local`: the API and `/metrics` (behind the token
/// when one is set, unless `metrics_public`), OpenAPI, health and the dashboard, all
/// behind the `Host` and `Origin` checks. Health stays open: probes carry no token.
fn router(mq: Client, local: SocketAddr, options: Options) -> Router {
    let state = AppState {
        mq,
        token: options.token.filter(|t| !t.is_empty()),
        readiness: Arc::default(),
    };
    let api = api::router(state.clone())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::require_token,
        ))
        .with_state(state.clone());
    let mut metrics = Router::new().route("/metrics", axum::routing::get(metrics));
    if !options.metrics_public {
        metrics = metrics.layer(middleware::from_fn_with_state(
            state.clone(),
            guard::require_token,
        ));
    }
    let rules = guard::HostRules::new(local, &options.allow_hosts);
    Router::new()
        .route("/", axum::routing::get(dashboard))
        .nest("/api/v1", api)
        .merge(metrics)
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(readyz))
        .fallback(api::not_found)
        .with_state(state)
        .layer(middleware::from_fn_with_state(
            Arc::new(rules),
            guard::check_host_and_origin,
        ))
}

/// The dashboard: one self-contained page (no CDN, works offline) served from the
/// binary. It holds no data: everything it shows comes from the API, which asks for the
/// token when one is set.
async fn dashboard() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../../assets/dashboard.html"),
    )
}

/// How long a `/readyz` answer is reused. Each check writes to Redis (readiness means
/// "accepts writes"); probes every few milliseconds, or many replicas' probes, must not
/// each cost a write. One second is shorter than any probe period worth having.
const READY_CACHE: Duration = Duration::from_secs(1);

/// Longest a readiness check waits for Redis.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The last readiness check: when it finished and what was wrong, if anything.
#[derive(Debug, Clone)]
struct Readiness {
    at: Instant,
    problem: Option<String>,
}

/// Redis reachable and writable: 200, else 503 with the reason. At most one check runs
/// at a time, and its answer serves every probe for [`READY_CACHE`].
async fn readyz(State(state): State<AppState>) -> Response {
    let problem = {
        let mut last = state.readiness.lock().await;
        match &*last {
            Some(r) if r.at.elapsed() < READY_CACHE => r.problem.clone(),
            _ => {
                let problem =
                    match tokio::time::timeout(READY_TIMEOUT, state.mq.check_writable()).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(format!("redis is not writable: {e}")),
                        Err(_) => Some(format!(
                            "redis did not answer within {}",
                            humantime::format_duration(READY_TIMEOUT)
                        )),
                    };
                *last = Some(Readiness {
                    at: Instant::now(),
                    problem: problem.clone(),
                });
                problem
            }
        }
    };
    match problem {
        None => (StatusCode::OK, Json(json!({"status": "ready"}))).into_response(),
        Some(problem) => ApiError(StatusCode::SERVICE_UNAVAILABLE, problem).into_response(),
    }
}

/// Longest a scrape waits for Redis before it answers with `forgemq_redis_up 0`: well
/// inside Prometheus's default 10 s scrape timeout, so that the scrape itself succeeds and
/// says what is wrong.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// `/metrics`, read from Redis at each scrape: the counters live in Redis (kept by the Lua
/// scripts), so every ForgeMQ process reports the same totals. A partitioned topic is one
/// `topic` (the sums of its partitions). With Redis unreachable the scrape still answers,
/// with `forgemq_redis_up 0` and no per-topic series.
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let topics = match tokio::time::timeout(METRICS_TIMEOUT, state.mq.get_all_queues()).await {
        Ok(Ok(t)) => Some(t),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "/metrics: could not read the queues from redis");
            None
        }
        Err(_) => {
            tracing::warn!(
                "/metrics: redis did not answer within {}",
                humantime::format_duration(METRICS_TIMEOUT)
            );
            None
        }
    };
    // Schedules only when the queues could be read (Redis answers), within the same bound.
    let schedules = match topics {
        Some(_) => tokio::time::timeout(METRICS_TIMEOUT, state.mq.schedules())
            .await
            .ok()
            .and_then(|r| {
                r.inspect_err(
                    |e| tracing::warn!(error = %e, "/metrics: could not read the schedules"),
                )
                .ok()
            }),
        None => None,
    };
    let limits = match topics {
        Some(_) => tokio::time::timeout(METRICS_TIMEOUT, state.mq.rate_limits())
            .await
            .ok()
            .and_then(|r| {
                r.inspect_err(
                    |e| tracing::warn!(error = %e, "/metrics: could not read the rate limits"),
                )
                .ok()
            }),
        None => None,
    };
    match encode_metrics(
        topics.as_deref(),
        schedules.as_deref().unwrap_or_default(),
        limits.as_deref().unwrap_or_default(),
    ) {
        Ok(text) => crate::exposition::respond(&headers, text),
        Err(e) => crate::exposition::failed(&e),
    }
}

/// OpenMetrics text for `topics` (`None`: Redis could not be read) and `schedules`.
fn encode_metrics(
    topics: Option<&[forgemq::QueueStats]>,
    schedules: &[forgemq::Schedule],
    limits: &[forgemq::TopicLimit],
) -> Result<String, std::fmt::Error> {
    use std::sync::atomic::AtomicU64;

    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    type Labels = Vec<(&'static str, String)>;
    type Seconds = Gauge<f64, AtomicU64>;

    let mut registry = prometheus_client::registry::Registry::default();
    let up = Gauge::<i64>::default();
    registry.register(
        "forgemq_redis_up",
        "1 when this scrape could read the queues from Redis, 0 when not (then no per-topic series follow)",
        up.clone(),
    );
    up.set(i64::from(topics.is_some()));
    let gauge = |registry: &mut prometheus_client::registry::Registry, name, help| {
        let family = Family::<Labels, Gauge>::default();
        registry.register(name, help, family.clone());
        family
    };
    let seconds = |registry: &mut prometheus_client::registry::Registry, name, help| {
        let family = Family::<Labels, Seconds>::default();
        registry.register(name, help, family.clone());
        family
    };
    let depth = gauge(
        &mut registry,
        "forgemq_messages",
        "Messages per topic and state",
    );
    let paused = gauge(
        &mut registry,
        "forgemq_paused",
        "1 while the topic is paused",
    );
    // A partitioned topic is reported as one topic (its sums); its partition count says
    // how far its work can spread.
    let partitions = gauge(
        &mut registry,
        "forgemq_partitions",
        "Partitions of the topic (1: a plain topic)",
    );
    // The worker registry: who consumes the topic now, as of their last heartbeats.
    let workers = gauge(
        &mut registry,
        "forgemq_workers",
        "Live workers consuming the topic (a worker killed without a word drops out within three heartbeats, 15 s by default)",
    );
    let slots = gauge(
        &mut registry,
        "forgemq_worker_slots",
        "Handler slots of those workers for the topic: the sum of their concurrency",
    );
    let in_flight = gauge(
        &mut registry,
        "forgemq_in_flight",
        "Messages of the topic being handled by those workers, at their last heartbeats",
    );
    let results_kept = gauge(
        &mut registry,
        "forgemq_results_kept",
        "Records of finished messages kept for the message lookup (state, result, progress), within the retention",
    );
    let oldest_pending = seconds(
        &mut registry,
        "forgemq_oldest_pending_age_seconds",
        "Queue latency: how long the message waiting longest has been ready to run (0: nothing pending)",
    );
    let oldest_dead = seconds(
        &mut registry,
        "forgemq_oldest_dead_age_seconds",
        "How long ago the oldest dead letter died (0: no dead letters)",
    );
    // Fair groups: a series per group would grow with the tenants; the 100 groups of a
    // topic with the most waiting messages are shown.
    let group_depth = gauge(
        &mut registry,
        "forgemq_group_messages",
        "Messages per fair group and state (pending, active), for the 100 groups of each topic with the most waiting",
    );
    let group_paused = gauge(
        &mut registry,
        "forgemq_group_paused",
        "1 while the fair group is paused",
    );
    let group_max = gauge(
        &mut registry,
        "forgemq_group_max_active",
        "Most messages of the fair group handled at once (0: no cap)",
    );
    let counters: Vec<Family<Labels, Counter>> = [
        ("forgemq_published", "Messages published"),
        (
            "forgemq_processed",
            "Messages acknowledged (handler succeeded)",
        ),
        ("forgemq_failed", "Failed attempts"),
        ("forgemq_retried", "Failed attempts scheduled to run again"),
        ("forgemq_dead", "Messages moved to the dead-letter queue"),
        (
            "forgemq_recovered",
            "Deliveries whose lease expired and that were handed out again",
        ),
        (
            "forgemq_deduplicated",
            "Redeliveries of already-processed ids that were skipped",
        ),
        (
            "forgemq_duplicate_runs",
            "Handler runs whose outcome was refused because the lease had expired and the message was handed out again: the message ran twice",
        ),
    ]
    .into_iter()
    .map(|(name, help)| {
        let family = Family::<Labels, Counter>::default();
        registry.register(name, help, family.clone());
        family
    })
    .collect();
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    // Milliseconds are exact in an f64 for far longer than any queue lives.
    let age = |ms: Option<u64>| ms.map_or(0.0, |ms| ms as f64 / 1000.0);
    for s in topics.unwrap_or_default() {
        let topic = || vec![("topic", s.topic.clone())];
        for (name, value) in [
            ("pending", s.pending),
            ("active", s.active),
            ("delayed", s.delayed),
            ("dead", s.dead),
        ] {
            let mut labels = topic();
            labels.push(("state", name.to_owned()));
            depth.get_or_create(&labels).set(count(value));
        }
        paused.get_or_create(&topic()).set(i64::from(s.paused));
        partitions.get_or_create(&topic()).set(count(
            u64::try_from(s.partitions.len().max(1)).unwrap_or(u64::MAX),
        ));
        workers.get_or_create(&topic()).set(count(s.workers));
        slots.get_or_create(&topic()).set(count(s.worker_slots));
        in_flight.get_or_create(&topic()).set(count(s.in_flight));
        results_kept
            .get_or_create(&topic())
            .set(count(s.results_kept));
        oldest_pending
            .get_or_create(&topic())
            .set(age(s.oldest_pending_age_ms));
        oldest_dead
            .get_or_create(&topic())
            .set(age(s.oldest_dead_age_ms));
        let totals = [
            s.published,
            s.processed,
            s.failed,
            s.retried,
            s.dead_lettered,
            s.recovered,
            s.deduplicated,
            s.duplicate_runs,
        ];
        for (family, value) in counters.iter().zip(totals) {
            family.get_or_create(&topic()).inc_by(value);
        }
        let mut groups: Vec<&forgemq::GroupInfo> = s.groups.iter().collect();
        groups.sort_by(|a, b| b.pending.cmp(&a.pending).then(a.group.cmp(&b.group)));
        for g in groups.into_iter().take(100) {
            let labels = vec![("topic", s.topic.clone()), ("group", g.group.clone())];
            for (state, value) in [("pending", g.pending), ("active", g.active)] {
                let mut l = labels.clone();
                l.push(("state", state.to_owned()));
                group_depth.get_or_create(&l).set(count(value));
            }
            group_paused.get_or_create(&labels).set(i64::from(g.paused));
            group_max
                .get_or_create(&labels)
                .set(i64::from(g.max_active));
        }
    }
    let next_fire = seconds(
        &mut registry,
        "forgemq_schedule_next_fire_timestamp_seconds",
        "When the schedule fires next (Unix time, Redis clock); a time well in the past means no scheduler is running",
    );
    let last_fire = seconds(
        &mut registry,
        "forgemq_schedule_last_fire_timestamp_seconds",
        "The fire time of the schedule's last message (Unix time; absent before its first)",
    );
    let fired = Family::<Labels, Counter>::default();
    registry.register(
        "forgemq_schedule_fired",
        "Messages the schedule published",
        fired.clone(),
    );
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_millis() as f64 / 1000.0)
    };
    for s in schedules {
        let labels = vec![("schedule", s.name.clone()), ("topic", s.topic.clone())];
        if let Some(t) = s.next_fire {
            next_fire.get_or_create(&labels).set(unix(t));
        }
        if let Some(t) = s.last_fire {
            last_fire.get_or_create(&labels).set(unix(t));
        }
        fired.get_or_create(&labels).inc_by(s.fired);
    }
    let limit_rate = seconds(
        &mut registry,
        "forgemq_rate_limit_per_second",
        "The topic's rate limit: most deliveries per second across every worker (absent: no limit)",
    );
    let limit_burst = gauge(
        &mut registry,
        "forgemq_rate_limit_burst",
        "How many of the topic's messages may start at once after a quiet spell",
    );
    for l in limits {
        let labels = vec![("topic", l.topic.clone())];
        limit_rate.get_or_create(&labels).set(l.per_second);
        limit_burst.get_or_create(&labels).set(i64::from(l.burst));
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}
