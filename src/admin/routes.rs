//! The built-in routes of the admin endpoint (listed in the module doc of `admin`): each
//! handler renders what the hub knows now; none of them changes anything but the consent
//! lists.

use super::{text, AdminState};
use crate::gateway::Hub;
use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::Instant;

pub(super) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/alarms", get(alarms))
        .route("/healthz", get(healthz))
        .route("/policy/{*rest}", get(policy_route).post(policy_route))
        .route("/reload", axum::routing::post(reload))
        .route("/drain", get(drain_status).post(drain))
        .route(
            "/cluster/force-config-update",
            axum::routing::post(force_config_update),
        )
        .route(
            "/intercluster/force-sync",
            axum::routing::post(intercluster_force_sync),
        )
        .route(
            "/intercluster/users/{*rest}",
            axum::routing::post(intercluster_users),
        )
        .route("/intercluster/lookup/{*rest}", get(intercluster_lookup))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn metrics() -> Response {
    crate::metrics::register_all();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}

async fn status(State(s): State<AdminState>) -> Response {
    json(status_json(&s.hub, s.started))
}

async fn alarms(State(s): State<AdminState>) -> Response {
    json(format!("{}\n", s.hub.alarms().to_json()))
}

/// A `crate::node::api` answer (status code and JSON) as a response.
fn node_json((code, body): (u16, serde_json::Value)) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

/// `POST /reload` (`legate reload`): re-reads configuration, mappings and certificates. The
/// file reads run on a blocking thread, not on the endpoint's.
async fn reload(State(s): State<AdminState>) -> Response {
    let hub = s.hub.clone();
    match tokio::task::spawn_blocking(move || crate::node::api::post_reload(&hub)).await {
        Ok(answer) => node_json(answer),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed: {e}\n"),
        ),
    }
}

/// `POST /cluster/force-config-update` (`legate cluster force-config-update`).
async fn force_config_update(State(s): State<AdminState>) -> Response {
    node_json(crate::node::api::post_force_config_update(&s.hub).await)
}

/// The intercluster peering's operations, or why there are none here.
fn intercluster(hub: &Hub) -> Result<Arc<dyn crate::intercluster::AdminHook>, Box<Response>> {
    hub.node_control()
        .and_then(|c| c.intercluster().cloned())
        .ok_or_else(|| {
            Box::new(node_json((
                409,
                serde_json::json!({"error": "intercluster peering does not run on this node: \
                    intercluster.listen is not set (or this legate was built without the \
                    `cluster` feature)"}),
            )))
        })
}

/// `POST /intercluster/force-sync?peer=NAME&full=true` (`legate intercluster force-sync`).
async fn intercluster_force_sync(State(s): State<AdminState>, uri: Uri) -> Response {
    let ic = match intercluster(&s.hub) {
        Ok(ic) => ic,
        Err(r) => return *r,
    };
    let (mut peer, mut full) = (None, false);
    for pair in uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("peer", v)) => peer = percent_decode(v),
            Some(("full", v)) => full = v == "true" || v == "1",
            _ => {
                return bad_request(format!(
                    "unknown parameter `{}` (peer, full)",
                    pair.chars().take(40).collect::<String>()
                ))
            }
        }
    }
    node_json(ic.force_sync(peer, full).await)
}

/// `POST /intercluster/users/add/USER/HOME_NODE`, `POST /intercluster/users/remove/USER`.
async fn intercluster_users(State(s): State<AdminState>, uri: Uri) -> Response {
    let ic = match intercluster(&s.hub) {
        Ok(ic) => ic,
        Err(r) => return *r,
    };
    let rest = uri
        .path()
        .strip_prefix("/intercluster/users/")
        .unwrap_or_default();
    let segments: Option<Vec<String>> = rest.split('/').map(percent_decode).collect();
    match segments.as_deref() {
        Some([op, user, home]) if op == "add" => {
            node_json(ic.users(true, user.clone(), Some(home.clone())).await)
        }
        Some([op, user]) if op == "remove" => node_json(ic.users(false, user.clone(), None).await),
        _ => bad_request(
            "expected /intercluster/users/add/USER/HOME_NODE or /intercluster/users/remove/USER",
        ),
    }
}

/// `GET /intercluster/lookup/USER`: the peer cluster USER lives in, as this node knows it.
async fn intercluster_lookup(State(s): State<AdminState>, uri: Uri) -> Response {
    let ic = match intercluster(&s.hub) {
        Ok(ic) => ic,
        Err(r) => return *r,
    };
    let rest = uri
        .path()
        .strip_prefix("/intercluster/lookup/")
        .unwrap_or_default();
    match percent_decode(rest) {
        Some(user) => node_json(ic.lookup(&user)),
        None => bad_request("broken percent-escape in the path"),
    }
}

/// `POST /drain` (`legate drain`): starts draining.
async fn drain(State(s): State<AdminState>) -> Response {
    node_json(crate::node::api::post_drain(&s.hub))
}

/// `GET /drain`: what is left to drain.
async fn drain_status(State(s): State<AdminState>) -> Response {
    node_json(crate::node::api::get_drain(&s.hub))
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn page(State(s): State<AdminState>) -> Html<String> {
    let mut doc = status_value(&s.hub, s.started);
    if let (Some(a), Some(obj)) = (s.bound, doc.as_object_mut()) {
        obj.insert("admin_listen".into(), a.to_string().into());
    }
    Html(super::page::render(&doc, crate::ops::alarms::unix_now()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let allowed = match uri.path() {
        p if p.starts_with("/policy/") => "GET, or POST",
        "/drain" => "GET, or POST",
        "/reload" | "/cluster/force-config-update" | "/intercluster/force-sync" => "POST",
        p if p.starts_with("/intercluster/users/") => "POST",
        _ => "GET",
    };
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}: {allowed}\n", uri.path()),
    )
}

/// The raw path is split before percent-decoding, so an escaped `/` stays inside its
/// segment.
async fn policy_route(State(s): State<AdminState>, method: Method, uri: Uri) -> Response {
    let rest = uri.path().strip_prefix("/policy/").unwrap_or_default();
    policy(&s.hub, method.as_str(), rest)
}

fn bad_request(why: impl std::fmt::Display) -> Response {
    text(StatusCode::BAD_REQUEST, format!("{why}\n"))
}

/// `%XX` escapes of a path segment; `None` for a broken escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The consent-list routes (see the module doc); `rest` follows `/policy/`.
fn policy(hub: &Hub, method: &str, rest: &str) -> Response {
    use crate::gateway::policy::admin::{change, local_user, ChangeError, Op};
    use crate::gateway::policy::Target;
    let segments: Option<Vec<String>> = rest.split('/').map(percent_decode).collect();
    let Some(segments) = segments else {
        return bad_request("broken percent-escape in the path");
    };
    let user = match segments.first().map(|u| local_user(hub, u)) {
        Some(Ok(u)) => u,
        Some(Err(e)) => return bad_request(e),
        None => return bad_request("no user in the path"),
    };
    match (method, segments.as_slice()) {
        ("GET", [_]) => {
            let entries: Vec<serde_json::Value> = hub
                .policies()
                .lists(&user.bare_string())
                .entries()
                .into_iter()
                .map(|(t, v)| {
                    let kind = match t {
                        Target::Jid(_) => "jid",
                        Target::Domain(_) => "domain",
                    };
                    serde_json::json!({"target": t.to_string(), "kind": kind, "verdict": v.as_str()})
                })
                .collect();
            let doc = serde_json::json!({"user": user.bare_string(), "entries": entries});
            json(format!("{doc}\n"))
        }
        ("POST", [_, op, target]) => {
            let Some(op) = Op::parse(op) else {
                return bad_request(format!(
                    "unknown operation `{}` (allow, block or unblock)",
                    op.chars().take(40).collect::<String>()
                ));
            };
            let target = match Target::parse(target) {
                Ok(t) => t,
                Err(e) => return bad_request(e),
            };
            match change(hub, &user, &target, op) {
                Ok(()) => {
                    let verdict = hub
                        .policies()
                        .lists(&user.bare_string())
                        .entries()
                        .into_iter()
                        .find(|(t, _)| *t == target)
                        .map(|(_, v)| v.as_str());
                    let doc = serde_json::json!({
                        "user": user.bare_string(),
                        "target": target.to_string(),
                        "verdict": verdict,
                    });
                    json(format!("{doc}\n"))
                }
                Err(ChangeError::Bad(e)) => bad_request(e),
                Err(e @ ChangeError::Full(_)) => {
                    text(StatusCode::INSUFFICIENT_STORAGE, format!("{e}\n"))
                }
            }
        }
        ("GET", _) => bad_request("GET /policy/<user>"),
        _ => bad_request("POST /policy/<user>/<allow|block|unblock>/<jid or domain>"),
    }
}

fn status_json(hub: &Hub, started: Instant) -> String {
    status_value(hub, started).to_string()
}

/// The `/status` document (also what the HTML page shows).
pub(crate) fn status_value(hub: &Hub, started: Instant) -> serde_json::Value {
    let cfg = hub.config();
    let maps = hub.maps().current();
    let mut doc = serde_json::json!({
        "node": cfg.node.id.to_string(),
        "uptime_secs": started.elapsed().as_secs(),
        "local_domains": cfg.local_domains.iter().map(|d| d.name.to_string()).collect::<Vec<_>>(),
        "sip_federated_domains": cfg.sip.federated_domains.iter().map(|d| d.name.to_string()).collect::<Vec<_>>(),
        "xmpp_federation_mode": format!("{:?}", cfg.xmpp.federation.mode),
        "home_nodes": cfg.home_nodes.iter().map(|h| h.name.clone()).collect::<Vec<_>>(),
        "directory_users": hub.directory().len(),
        "directory_conflicts": hub.directory().conflicts().into_iter().map(|(user, placed, other)| {
            serde_json::json!({"user": user, "home_node": &*placed, "also_sent_from": &*other})
        }).collect::<Vec<_>>(),
        "consent_users": hub.policies().len(),
        "consent_pending": hub.policies().pending_len(),
        "mapping_systems": maps.system_names().collect::<Vec<_>>(),
        "mapping_tables": maps.tables.len(),
        "mapping_digest": maps.digest,
        "alarms": hub.alarms().to_json(),
    });
    if let Some(obj) = doc.as_object_mut() {
        for (name, value) in hub.status_sections() {
            obj.insert(name.to_string(), value);
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::tests::{call, hub};
    use std::sync::Arc;

    /// One request through the whole application: status line, content type, body.
    async fn respond(h: &Arc<Hub>, method: &str, path: &str) -> (String, String, String) {
        call(h, &[], method, path, None).await
    }

    #[test]
    fn percent_escapes_are_decoded_and_broken_ones_refused() {
        assert_eq!(
            percent_decode("o%27malley%40partner.com").as_deref(),
            Some("o'malley@partner.com")
        );
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("a%zz"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
    }

    #[tokio::test]
    async fn alarms_are_served_alone_and_in_status() {
        use crate::ops::alarms::AlarmName;
        let h = hub();
        let (status, ctype, body) = respond(&h, "GET", "/alarms").await;
        assert_eq!(
            (status.as_str(), ctype.as_str(), body.trim()),
            ("200 OK", "application/json", "[]")
        );
        h.alarms().raise(
            AlarmName::HomeNodeLinkDown,
            "hn1/partner.com",
            "down for 31 s",
        );
        let (_, _, body) = respond(&h, "GET", "/alarms").await;
        let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(doc[0]["name"], "HomeNodeLinkDown");
        assert_eq!(doc[0]["severity"], "critical");
        assert_eq!(doc[0]["raised"], true);
        let (_, _, body) = respond(&h, "GET", "/status").await;
        let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(doc["alarms"][0]["subject"], "hn1/partner.com");
    }

    #[tokio::test]
    async fn policy_routes_change_and_show_lists_and_refuse_bad_input() {
        let h = hub();
        let (status, _, body) =
            respond(&h, "POST", "/policy/alice@example.com/block/partner.com").await;
        assert_eq!(status, "200 OK", "{body}");
        assert!(body.contains("\"verdict\":\"block\""), "{body}");
        let (status, _, body) = respond(&h, "GET", "/policy/alice@example.com").await;
        assert_eq!(status, "200 OK");
        assert!(
            body.contains("\"target\":\"partner.com\"") && body.contains("\"kind\":\"domain\""),
            "{body}"
        );
        let (status, _, body) =
            respond(&h, "POST", "/policy/alice@example.com/unblock/partner.com").await;
        assert_eq!(status, "200 OK");
        assert!(body.contains("\"verdict\":null"), "{body}");
        for (method, path, why) in [
            (
                "POST",
                "/policy/alice@partner.com/block/x.com",
                "not a user of a local domain",
            ),
            (
                "POST",
                "/policy/alice@example.com/ban/x.com",
                "unknown operation",
            ),
            (
                "POST",
                "/policy/alice@example.com/block/bob@",
                "neither a bare JID",
            ),
            (
                "POST",
                "/policy/alice@example.com/block",
                "POST /policy/<user>",
            ),
            ("GET", "/policy/example.com", "not a user address"),
            ("GET", "/policy/a%zz@example.com", "percent-escape"),
        ] {
            let (status, _, body) = respond(&h, method, path).await;
            assert_eq!(status, "400 Bad Request", "{path}: {body}");
            assert!(body.contains(why), "{path}: {body}");
        }
        let (status, _, _) = respond(&h, "DELETE", "/policy/alice@example.com").await;
        assert_eq!(status, "405 Method Not Allowed");
    }
}
