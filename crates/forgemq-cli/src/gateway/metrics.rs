//! The gateway's own metrics, per route: deliveries, failures, delivery latency, in flight.
//! (Queue depths and totals per topic are `forgemq serve`'s `/metrics`, read from Redis.)

use std::collections::HashMap;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Latency buckets, seconds: from a local endpoint's milliseconds to a slow job's minute.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

pub(crate) struct Metrics {
    deliveries: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    in_flight: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            deliveries: Family::default(),
            failures: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
            in_flight: Family::default(),
        }
    }
}

/// Counts a delivery as in flight until dropped.
pub(crate) struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Creates the series of `route` consuming `topic` at zero (a no-op for those that
    /// exist): a counter that appears only at its first increment hides that increment
    /// from `rate()` and `increase()`.
    pub(crate) fn register(&self, route: &str, topic: &str) {
        for outcome in ["ok", "failed"] {
            let _ = self
                .deliveries
                .get_or_create(&delivery_labels(route, topic, outcome));
        }
        let _ = self.failures.get_or_create(&topic_labels(route, topic));
        let _ = self.latency.get_or_create(&route_labels(route));
        let _ = self.in_flight.get_or_create(&route_labels(route));
    }

    pub(crate) fn start(&self, route: &str) -> InFlight {
        let gauge = self.in_flight.get_or_create(&route_labels(route)).clone();
        gauge.inc();
        InFlight(gauge)
    }

    pub(crate) fn finish(&self, route: &str, topic: &str, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "failed" };
        self.deliveries
            .get_or_create(&delivery_labels(route, topic, outcome))
            .inc();
        if !ok {
            self.failures
                .get_or_create(&topic_labels(route, topic))
                .inc();
        }
        self.latency
            .get_or_create(&route_labels(route))
            .observe(took.as_secs_f64());
    }

    /// OpenMetrics text, with the number of running consumers per route.
    pub(crate) fn encode(
        &self,
        consumers: &HashMap<String, i64>,
    ) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register(
            "forgemq_gateway_deliveries",
            "Delivery attempts, by route, topic and outcome (ok: the target took it)",
            self.deliveries.clone(),
        );
        registry.register(
            "forgemq_gateway_failures",
            "Failed delivery attempts (error status, timeout, refused connection, non-zero exit)",
            self.failures.clone(),
        );
        registry.register(
            "forgemq_gateway_delivery_seconds",
            "Time from the start of a delivery attempt to its outcome",
            self.latency.clone(),
        );
        registry.register(
            "forgemq_gateway_in_flight",
            "Deliveries running now",
            self.in_flight.clone(),
        );
        let running = Family::<Labels, Gauge>::default();
        for (route, n) in consumers {
            running.get_or_create(&route_labels(route)).set(*n);
        }
        registry.register(
            "forgemq_gateway_consumers",
            "Topics being consumed, by route",
            running,
        );
        let mut text = String::new();
        encode(&mut text, &registry)?;
        Ok(text)
    }
}

fn route_labels(route: &str) -> Labels {
    vec![("route", route.to_owned())]
}

fn topic_labels(route: &str, topic: &str) -> Labels {
    vec![("route", route.to_owned()), ("topic", topic.to_owned())]
}

fn delivery_labels(route: &str, topic: &str, outcome: &str) -> Labels {
    vec![
        ("route", route.to_owned()),
        ("topic", topic.to_owned()),
        ("outcome", outcome.to_owned()),
    ]
}
