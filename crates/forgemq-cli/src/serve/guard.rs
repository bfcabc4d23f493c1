//! Who may call the server.
//!
//! - **Host** (DNS rebinding): a page on `evil.example` whose name is re-pointed at
//!   127.0.0.1 makes the browser send requests to a loopback server, and read the answers,
//!   with `Host: evil.example`. A server bound to loopback therefore answers only to its
//!   own names (`127.0.0.1`, `localhost`, `[::1]` with its port, and the bound address)
//!   and to names given with `--allow-host`. The probes (`/healthz`, `/readyz`,
//!   `/metrics`) are exempt: infrastructure calls them by IP or by any name.
//! - **Origin** (cross-site requests): a plain HTML form on another site can POST to any
//!   address the browser reaches; the browser says where the page came from in `Origin`.
//!   A state-changing request with an `Origin` that is not the server's own is refused,
//!   whatever the bind. Requests without `Origin` (curl, services) are not affected.
//! - **Token**: with `--token`, the API needs `Authorization: Bearer <token>`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::api::ApiError;
use super::AppState;

/// Paths that answer whatever the `Host`: load balancers and Prometheus call them by IP.
const PROBES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The names a server answers to, made once at start-up.
#[derive(Debug)]
pub(super) struct HostRules {
    /// Whether the `Host` is checked at all: only a loopback server can be reached
    /// through DNS rebinding without also being reachable directly.
    check_host: bool,
    /// `host:port` of the server's own names, lower case.
    own: Vec<String>,
    /// `--allow-host` names, lower case: `(host, Some(port))` or `(host, None)` for any port.
    allowed: Vec<(String, Option<String>)>,
    /// The port, for messages.
    port: u16,
}

impl HostRules {
    pub(super) fn new(local: SocketAddr, allow: &[String]) -> Self {
        let port = local.port();
        let mut own = vec![
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
        ];
        let bound = local.to_string().to_ascii_lowercase();
        if !own.contains(&bound) {
            own.push(bound);
        }
        let allowed = allow
            .iter()
            .map(|name| {
                let (host, port) = split_authority(name);
                (host.to_ascii_lowercase(), port.map(str::to_owned))
            })
            .collect();
        Self {
            check_host: local.ip().is_loopback(),
            own,
            allowed,
            port,
        }
    }

    /// Whether a request with this `Host` is for this server.
    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if self.own.contains(&host) {
            return true;
        }
        let (name, port) = split_authority(&host);
        self.allowed
            .iter()
            .any(|(h, p)| h == name && (p.is_none() || p.as_deref() == port))
    }

    /// Whether `origin` (the header's value) is this server's own, as reached with
    /// `host`, or one of the `--allow-host` names.
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let Some(authority) = origin_authority(origin) else {
            // `null` (sandboxed frames, file: pages) or anything unparsable.
            return false;
        };
        if host.is_some_and(|h| h.eq_ignore_ascii_case(&authority)) {
            return true;
        }
        self.host_allowed(&authority)
    }
}

/// `--allow-host` values must be a host name or address, optionally with a port.
pub(super) fn check_allowed_host(name: &str) -> anyhow::Result<()> {
    let (host, port) = split_authority(name);
    let host_ok = !host.is_empty()
        && (host.starts_with('[')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    if host_ok && port_ok && !name.contains('/') {
        Ok(())
    } else {
        anyhow::bail!(
            "--allow-host {name:?} is not a host name: give the name clients use, e.g. --allow-host mq.internal or --allow-host mq.internal:8080"
        )
    }
}

/// `host[:port]` split in two; IPv6 literals keep their brackets.
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => {
                let (host, rest) = authority.split_at(end + 1);
                (host, rest.strip_prefix(':'))
            }
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

/// `http://host:port` → `host:port`, without the scheme's default port (`Host` leaves
/// it out too). `None` for `null` and anything that is not a bare http(s) origin.
fn origin_authority(origin: &str) -> Option<String> {
    let (scheme, rest) = origin.split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let (host, port) = split_authority(rest);
    Some(match port {
        Some(p) if p != default_port => format!("{host}:{p}"),
        _ => host.to_owned(),
    })
}

/// The `Host` of a request: the header, or the URI's authority (HTTP/2).
fn request_host(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
}

/// The `Host` check (loopback binds) and the `Origin` check (state-changing requests).
pub(super) async fn check_host_and_origin(
    State(rules): State<Arc<HostRules>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request_host(&request);
    if rules.check_host
        && !PROBES.contains(&request.uri().path())
        && !host.is_some_and(|h| rules.host_allowed(h))
    {
        let shown = host.map_or_else(|| "none".to_owned(), |h| format!("{h:?}"));
        return ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "this server listens on loopback and answers only to 127.0.0.1:{port}, localhost:{port} and [::1]:{port} \
                 (Host was {shown}; other names are refused against DNS rebinding). \
                 To reach it by another name, start it with --allow-host NAME",
                port = rules.port
            ),
        )
        .into_response();
    }
    if !request.method().is_safe() {
        if let Some(origin) = request.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("(not text)");
            if !rules.origin_allowed(origin, host) {
                return ApiError(
                    StatusCode::FORBIDDEN,
                    format!(
                        "cross-site request refused: Origin {origin} is not this server's; \
                         use the dashboard served by this server, send the request without an Origin header (curl, services), \
                         or start the server with --allow-host NAME for the name your page uses"
                    ),
                )
                .into_response();
            }
        }
    }
    next.run(request).await
}

/// The token of `Authorization: Bearer <token>`, if that is what the header holds. The
/// scheme name is case-insensitive (RFC 9110, 11.1): `bearer` and `BEARER` are the same.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// `Authorization: Bearer <token>` on every route it guards when a token is set; compared
/// in constant time so that response timing does not leak it.
pub(super) async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.token else {
        return next.run(request).await;
    };
    let given = bearer(request.headers()).unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        next.run(request).await
    } else {
        let mut response = ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send `Authorization: Bearer <token>`".to_owned(),
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(bind: &str, allow: &[&str]) -> HostRules {
        let allow: Vec<String> = allow.iter().map(|s| (*s).to_owned()).collect();
        HostRules::new(bind.parse().unwrap(), &allow)
    }

    #[test]
    fn hosts() {
        let r = rules(
            "127.0.0.1:8080",
            &["mq.internal", "proxy:9000", "[fd00::1]"],
        );
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
            "mq.internal",
            "mq.internal:1234",
            "proxy:9000",
            "[fd00::1]:80",
        ] {
            assert!(r.host_allowed(ok), "{ok}");
        }
        for bad in [
            "localhost",
            "localhost:8081",
            "127.0.0.1",
            "evil.example:8080",
            "proxy",
            "proxy:9001",
            "mq.internal.evil.example",
            "[::2]:8080",
            "",
        ] {
            assert!(!r.host_allowed(bad), "{bad}");
        }
        assert!(rules("127.0.0.2:80", &[]).host_allowed("127.0.0.2:80"));
        assert!(rules("[::1]:80", &[]).host_allowed("[::1]:80"));
    }

    #[test]
    fn origins() {
        let r = rules("127.0.0.1:8080", &["mq.internal"]);
        let host = Some("127.0.0.1:8080");
        assert!(r.origin_allowed("http://127.0.0.1:8080", host));
        assert!(r.origin_allowed("HTTP://127.0.0.1:8080", host));
        assert!(r.origin_allowed("https://mq.internal", host));
        assert!(r.origin_allowed("http://mq.example", Some("mq.example")));
        assert!(r.origin_allowed("https://mq.example", Some("mq.example")));
        assert!(r.origin_allowed("http://mq.example:80", Some("mq.example")));
        for bad in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:8081",
            "http://127.0.0.1:8080.evil.example",
            "http://127.0.0.1:8080/path",
            "file://",
            "ftp://127.0.0.1:8080",
            "http://user@127.0.0.1:8080",
            "",
        ] {
            assert!(!r.origin_allowed(bad, host), "{bad}");
        }
    }

    #[test]
    fn allow_host_values() {
        for ok in [
            "mq.internal",
            "mq.internal:8080",
            "10.0.0.1",
            "[fd00::1]:80",
            "my_host",
        ] {
            assert!(check_allowed_host(ok).is_ok(), "{ok}");
        }
        for bad in ["", "http://x", "x:port", "a b", "x/y", ":80"] {
            assert!(check_allowed_host(bad).is_err(), "{bad}");
        }
    }
}
