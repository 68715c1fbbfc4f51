//! The admin HTTP endpoint (loopback by default), on axum routing over hyper's HTTP/1.1
//! server (RFC 9112: keep-alive, pipelining, proper 404/405 answers).
//!
//! Routes (see `routes`): `GET /` (the HTML status page, `page`), `GET /metrics`
//! (Prometheus text), `GET /status` (JSON), `GET /alarms` (JSON, also the `alarms` section of
//! `/status`), `GET /healthz`, and the consent lists (`legate policy` talks to these):
//! `GET /policy/<user>` (JSON) and `POST /policy/<user>/<allow|block|unblock>/<target>`.
//!
//! Two rules hold for every route, those added by the composition root included:
//! - with `node.admin_token_file` set, every request but `GET /healthz` must carry
//!   `Authorization: Bearer <token>` (RFC 6750 §2.1), else 401 with `WWW-Authenticate`;
//! - a request that changes something (any method but GET/HEAD) is accepted from loopback
//!   only, whatever `node.admin_allow_remote` says: changes are an operator's, on the node.
//!
//! **Action routes** (POST `/reload`, `/drain`, ...) are not defined here: the composition
//! root builds them as an `axum::Router` of its own and hands it over with
//! [`Admin::with_actions`], which merges it under the same two rules. This module owns the
//! HTTP side only; it never reaches into reload or drain machinery.
//!
//! Connections are accepted by the edge kit (`net::accept_admitted`: admission bound, accept
//! error backoff) and served with a header-read timeout, so an idle or slow client holds a
//! slot for `REQUEST_TIMEOUT` at most. On `shutdown` the listener closes, requests in flight
//! finish (bounded by `SHUTDOWN_GRACE`) and idle keep-alive connections are closed.

mod auth;
pub mod page;
mod routes;

use crate::gateway::Hub;
use crate::net::{accept_admitted, AcceptPolicy, Accepted, Admission};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use auth::TokenError;

/// Time a client has to send a request's headers (also the idle time of a keep-alive
/// connection between two requests).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Concurrent admin connections (the endpoint serves scrapers and operators, not crowds).
const MAX_CONNECTIONS: usize = 64;

/// How long requests in flight may take to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What every handler reads: the hub (status, alarms, consent lists) and the start instant.
#[derive(Clone)]
pub struct AdminState {
    pub hub: Arc<Hub>,
    pub started: Instant,
    /// The address the endpoint is bound to (shown on the status page), once bound.
    pub bound: Option<SocketAddr>,
}

/// The admin endpoint of one node, built before anything binds (the token file is read
/// here, so a missing one stops the node at start).
pub struct Admin {
    state: AdminState,
    token: Option<Arc<auth::Token>>,
    actions: Router,
}

impl Admin {
    pub fn new(hub: Arc<Hub>, started: Instant) -> Result<Admin, TokenError> {
        let token = match &hub.config().node.admin_token_file {
            Some(path) => Some(Arc::new(auth::Token::load(path.clone())?)),
            None => None,
        };
        Ok(Admin {
            state: AdminState {
                hub,
                started,
                bound: None,
            },
            token,
            actions: Router::new(),
        })
    }

    /// Adds the composition root's action routes (e.g. `POST /reload`, `POST /drain`): a
    /// router with its state already applied (`Router::with_state`), merged beside the
    /// built-in routes and under the same token and loopback rules (module doc). A path
    /// that clashes with a built-in route is a programming error: axum panics on it at
    /// start, which the first test that starts a node catches.
    ///
    /// ```ignore
    /// let actions = axum::Router::new()
    ///     .route("/reload", axum::routing::post(reload))
    ///     .route("/drain", axum::routing::post(drain))
    ///     .with_state(node.clone());
    /// let admin = admin::Admin::new(hub.clone(), started)?.with_actions(actions);
    /// tasks.spawn(admin.serve(listener, shutdown.clone()));
    /// ```
    pub fn with_actions(mut self, actions: Router) -> Admin {
        self.actions = self.actions.merge(actions);
        self
    }

    /// The whole application: built-in routes, action routes, fallbacks, then the rules.
    pub fn router(&self) -> Router {
        routes::router(self.state.clone())
            .merge(self.actions.clone())
            .fallback(not_found)
            .layer(middleware::from_fn(changes_from_loopback_only))
            .layer(middleware::from_fn_with_state(
                self.token.clone(),
                require_token,
            ))
    }

    /// Serves until `shutdown` turns true (see the module doc).
    pub async fn serve(mut self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        self.state.bound = listener.local_addr().ok();
        let app = self.router();
        let admission = Admission::new(MAX_CONNECTIONS, MAX_CONNECTIONS);
        let policy = AcceptPolicy::new("admin");
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        while let Some(Accepted {
            stream,
            remote,
            slots,
        }) = accept_admitted(&listener, &admission, &policy, &mut shutdown).await
        {
            let app = app.clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(ConnectInfo(remote));
                let mut app = app.clone();
                async move {
                    use tower_service::Service;
                    app.call(req).await
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .keep_alive(true)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _slots = slots;
                if let Err(e) = conn.await {
                    tracing::debug!(peer = %remote, error = %e, "admin connection ended");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("admin requests still running after the shutdown grace; dropped");
        }
    }
}

pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// 401 unless the request carries the token (module doc); `/healthz` is open so a load
/// balancer or systemd can probe liveness without the secret.
async fn require_token(
    State(token): State<Option<Arc<auth::Token>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return next.run(req).await;
    };
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme name is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t);
    if given.is_some_and(|g| token.matches(g.trim())) {
        return next.run(req).await;
    }
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "a bearer token is required (node.admin_token_file): send Authorization: Bearer <token>\n",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"legate\""),
    );
    r
}

/// 403 for a change (any method but GET/HEAD) from another host.
async fn changes_from_loopback_only(req: Request, next: Next) -> Response {
    let read_only = req.method() == Method::GET || req.method() == Method::HEAD;
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    // No peer address means an in-process call (tests), which is local by definition.
    if read_only || remote.is_none_or(|r| r.ip().is_loopback()) {
        return next.run(req).await;
    }
    text(
        StatusCode::FORBIDDEN,
        "changes are accepted from loopback only\n",
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{self, BUILTIN_SYSTEMS};
    use crate::presence::map::MappingStore;
    use axum::body::Body;
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub(crate) fn hub_with(node: &str) -> Arc<Hub> {
        let cfg = config::from_toml(
            &format!(
                "[node]\n{node}\n[[local_domain]]\nname = \"example.com\"\n\
                 [[sip.federated_domain]]\nname = \"partner.com\"\nsystem = \"lync\"\n"
            ),
            Path::new("t.toml"),
            BUILTIN_SYSTEMS,
        )
        .unwrap_or_else(|d| panic!("{d}"));
        Hub::new(
            cfg,
            MappingStore::open(None).unwrap_or_else(|d| panic!("{d}")),
        )
    }

    pub(crate) fn hub() -> Arc<Hub> {
        hub_with("")
    }

    /// One request through `app`: status line, content type, body.
    async fn send(
        app: &Router,
        headers: &[(&str, &str)],
        method: &str,
        path: &str,
        remote: Option<SocketAddr>,
    ) -> (String, String, String) {
        use tower_service::Service;
        let mut req = axum::http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(Body::empty()).unwrap_or_else(|e| panic!("{e}"));
        if let Some(r) = remote {
            req.extensions_mut().insert(ConnectInfo(r));
        }
        let resp = app.clone().call(req).await.unwrap_or_else(|e| match e {});
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (
            format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or_default()
            ),
            ctype,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    pub(crate) async fn call(
        h: &Arc<Hub>,
        headers: &[(&str, &str)],
        method: &str,
        path: &str,
        remote: Option<SocketAddr>,
    ) -> (String, String, String) {
        let admin = Admin::new(h.clone(), Instant::now()).unwrap_or_else(|e| panic!("{e}"));
        send(&admin.router(), headers, method, path, remote).await
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_wrong_methods_405() {
        let h = hub();
        let (s, _, b) = call(&h, &[], "GET", "/nope", None).await;
        assert_eq!(s, "404 Not Found", "{b}");
        let (s, _, b) = call(&h, &[], "POST", "/metrics", None).await;
        assert_eq!(s, "405 Method Not Allowed");
        assert!(b.contains("POST is not allowed on /metrics"), "{b}");
        let (s, ctype, b) = call(&h, &[], "GET", "/", None).await;
        assert_eq!(s, "200 OK");
        assert!(ctype.starts_with("text/html"), "{ctype}");
        assert!(b.contains("<h2>Alarms</h2>"), "{b}");
        let (s, _, b) = call(&h, &[], "GET", "/healthz", None).await;
        assert_eq!((s.as_str(), b.as_str()), ("200 OK", "ok\n"));
    }

    #[tokio::test]
    async fn a_token_guards_every_path_but_healthz() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let tok = dir.path().join("token");
        std::fs::write(&tok, "s3cret-token-0123456789\n").unwrap_or_else(|e| panic!("{e}"));
        let h = hub_with(&format!("admin_token_file = \"{}\"", tok.display()));
        for path in [
            "/",
            "/metrics",
            "/status",
            "/alarms",
            "/policy/alice@example.com",
        ] {
            let (s, _, b) = call(&h, &[], "GET", path, None).await;
            assert_eq!(s, "401 Unauthorized", "{path}: {b}");
            let (s, _, _) = call(
                &h,
                &[("authorization", "bearer wrong-token-0123456789")],
                "GET",
                path,
                None,
            )
            .await;
            assert_eq!(s, "401 Unauthorized", "{path}");
            let (s, _, b) = call(
                &h,
                &[("authorization", "Bearer s3cret-token-0123456789")],
                "GET",
                path,
                None,
            )
            .await;
            assert_eq!(s, "200 OK", "{path}: {b}");
        }
        let (s, _, _) = call(&h, &[], "GET", "/healthz", None).await;
        assert_eq!(s, "200 OK");
        let lower = [("authorization", "bearer s3cret-token-0123456789")];
        let (s, _, _) = call(&h, &lower, "GET", "/status", None).await;
        assert_eq!(s, "200 OK", "the scheme name is case-insensitive");
        // An unknown path is not revealed before authentication either.
        let (s, _, _) = call(&h, &[], "GET", "/nope", None).await;
        assert_eq!(s, "401 Unauthorized");
        let missing = hub_with(&format!(
            "admin_token_file = \"{}\"",
            dir.path().join("missing").display()
        ));
        assert!(matches!(
            Admin::new(missing, Instant::now()),
            Err(TokenError::Read { .. })
        ));
    }

    #[tokio::test]
    async fn changes_come_from_loopback_only_action_routes_included() {
        use axum::routing::post;
        let h = hub();
        let admin = Admin::new(h, Instant::now())
            .unwrap_or_else(|e| panic!("{e}"))
            .with_actions(Router::new().route("/test-action", post(|| async { "done\n" })));
        let app = admin.router();
        let remote: SocketAddr = "192.0.2.7:40000".parse().unwrap_or_else(|e| panic!("{e}"));
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap_or_else(|e| panic!("{e}"));
        for path in [
            "/test-action",
            "/policy/alice@example.com/block/partner.com",
        ] {
            let (s, _, b) = send(&app, &[], "POST", path, Some(remote)).await;
            assert_eq!(s, "403 Forbidden", "{path}: {b}");
            let (s, _, b) = send(&app, &[], "POST", path, Some(local)).await;
            assert_eq!(s, "200 OK", "{path}: {b}");
        }
        let (s, _, _) = send(&app, &[], "GET", "/status", Some(remote)).await;
        assert_eq!(s, "200 OK", "reads are allowed from elsewhere");
        for path in ["/test-action", "/reload"] {
            let (s, _, _) = send(&app, &[], "GET", path, Some(local)).await;
            assert_eq!(s, "405 Method Not Allowed", "{path}");
        }
        // The built-in actions obey the same rule.
        for path in ["/reload", "/drain"] {
            let (s, _, b) = send(&app, &[], "POST", path, Some(remote)).await;
            assert_eq!(s, "403 Forbidden", "{path}: {b}");
        }
    }

    /// Over a real socket: two requests on one keep-alive connection, then shutdown closes
    /// the idle connection and the listener.
    #[tokio::test]
    async fn keep_alive_serves_several_requests_and_shutdown_closes() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (tx, rx) = watch::channel(false);
        let admin = Admin::new(hub(), Instant::now()).unwrap_or_else(|e| panic!("{e}"));
        let server = tokio::spawn(admin.serve(listener, rx));
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        s.write_all(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /alarms HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while !(got.contains("ok\n") && got.contains("[]\n")) {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no answer: {got}"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(n > 0, "closed early: {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 2, "{got}");
        tx.send_replace(true);
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the idle connection stayed open after shutdown"))
            .unwrap_or(0);
        assert_eq!(n, 0);
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap_or_else(|_| panic!("serve did not return"))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A connection that sends nothing (or stops between requests) holds its slot for
    /// `REQUEST_TIMEOUT` at most.
    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_request_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (_tx, rx) = watch::channel(false);
        let admin = Admin::new(hub(), Instant::now()).unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(admin.serve(listener, rx));
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        s.write_all(b"GET /hea")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let t0 = Instant::now();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(REQUEST_TIMEOUT * 3, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("a half-sent request kept the connection open"))
            .unwrap_or(0);
        let waited = t0.elapsed();
        assert!(
            waited >= REQUEST_TIMEOUT - Duration::from_millis(500),
            "closed too early: {waited:?}"
        );
        // hyper may answer 408 before closing; either way the connection ends.
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
}
