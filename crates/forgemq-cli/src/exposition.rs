//! How `/metrics` answers (serve's and the gateway's): OpenMetrics to a scraper that asks
//! for it (Prometheus does), the Prometheus text format 0.0.4 to everyone else (`curl`,
//! `promtool check metrics`, older agents), as the official client libraries negotiate.
//!
//! Both carry the same series names (`forgemq_published_total`, ...): only the family
//! lines differ. `prometheus-client` writes OpenMetrics alone, so the text format is
//! derived from its output here; the rewrite is small (see [`to_text_format`]) and no
//! well-kept crate does it.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The OpenMetrics media type `prometheus-client` writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The Prometheus text format.
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The answer to a scrape: `openmetrics` (as `prometheus-client` encoded it) in the format
/// the request's `Accept` header asks for.
pub(crate) fn respond(headers: &HeaderMap, openmetrics: String) -> Response {
    if wants_openmetrics(headers.get(header::ACCEPT)) {
        ([(header::CONTENT_TYPE, OPENMETRICS)], openmetrics).into_response()
    } else {
        ([(header::CONTENT_TYPE, TEXT)], to_text_format(&openmetrics)).into_response()
    }
}

/// A scrape that could not be encoded (a formatter error: not expected in practice).
pub(crate) fn failed(e: &std::fmt::Error) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("could not encode the metrics: {e}"),
    )
        .into_response()
}

/// Whether `Accept` lists `application/openmetrics-text` with a non-zero quality.
fn wants_openmetrics(accept: Option<&HeaderValue>) -> bool {
    let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// OpenMetrics text as `prometheus-client` writes it, in the Prometheus text format 0.0.4:
/// a counter family `x` (whose samples are `x_total`) is named `x_total` in its `# HELP`
/// and `# TYPE` lines, `unknown` is `untyped`, and the `# UNIT` and `# EOF` lines go.
/// Sample lines are the same in both (no exemplars or `_created` samples are written).
pub(crate) fn to_text_format(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let family_line = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match family_line {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(if prefix == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter family is named after its samples; gauges and the end marker as the
    /// text format wants.
    #[test]
    fn openmetrics_counters_become_text_format_families() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{t=\"x\"} 3\n\
                  # HELP g A gauge.\n# TYPE g gauge\ng 1\n# TYPE u unknown\nu 2\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{t=\"x\"} 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1\n# TYPE u untyped\nu 2\n"
        );
    }

    /// Prometheus's own `Accept` gets OpenMetrics; `*/*`, none or `q=0` get the text format.
    #[test]
    fn openmetrics_only_when_asked_for() {
        let ask = |v: &str| wants_openmetrics(Some(&HeaderValue::from_str(v).unwrap()));
        assert!(ask("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"));
        assert!(!ask("*/*"));
        assert!(!ask("text/plain;version=0.0.4"));
        assert!(!ask("application/openmetrics-text;q=0"));
        assert!(!wants_openmetrics(None));
    }
}
