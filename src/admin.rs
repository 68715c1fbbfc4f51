//! The admin HTTP endpoint (loopback by default): `GET /metrics` (Prometheus text),
//! `GET /status` (JSON), `GET /alarms` (JSON, also the `alarms` section of `/status`),
//! `GET /healthz`, `POST /reload`, `POST /drain` and `GET /drain` (`crate::node::api`), and the consent lists (`legate policy` talks to
//! these): `GET /policy/<user>` (JSON) and `POST /policy/<user>/<allow|block|unblock>/<target>`
//! (`<target>` a bare JID or a domain, percent-encoded where needed; POST from loopback only,
//! whatever `node.admin_allow_remote` says). A deliberately tiny
//! HTTP/1.1 responder: one request per connection, bounded request size and time, no body.

use crate::gateway::Hub;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::net::{accept_admitted, AcceptPolicy, Accepted, Admission};

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Concurrent admin connections (the endpoint serves scrapers and operators, not crowds).
const MAX_CONNECTIONS: usize = 64;

/// Serves until `shutdown` turns true. Accept errors (EMFILE...) back off through the edge
/// kit's accept loop instead of spinning; connections beyond `MAX_CONNECTIONS` are refused.
/// A non-loopback `admin_listen` is refused by the configuration check unless
/// `node.admin_allow_remote` is set.
pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    started: Instant,
    mut shutdown: watch::Receiver<bool>,
) {
    let admission = Admission::new(MAX_CONNECTIONS, MAX_CONNECTIONS);
    let policy = AcceptPolicy::new("admin");
    loop {
        {
            let Some(accepted) =
                accept_admitted(&listener, &admission, &policy, &mut shutdown).await
            else {
                return;
            };
            let Accepted {
                stream: mut sock,
                slots,
                remote,
            } = accepted;
            {
                let hub = hub.clone();
                tokio::spawn(async move {
                    let _slots = slots;
                    let mut buf = vec![0u8; MAX_REQUEST];
                    let mut n = 0;
                    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        while n < buf.len() {
                            let k = sock.read(&mut buf[n..]).await?;
                            if k == 0 {
                                break;
                            }
                            n += k;
                            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                        Ok::<_, std::io::Error>(())
                    })
                    .await;
                    if !matches!(read, Ok(Ok(()))) {
                        return;
                    }
                    let head = String::from_utf8_lossy(&buf[..n]);
                    let mut parts = head.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let (status, ctype, body) = if method == "POST" && !remote.ip().is_loopback() {
                        // Changes are an operator's, on the node itself, even when
                        // `node.admin_allow_remote` lets scrapers read from elsewhere.
                        (
                            "403 Forbidden",
                            "text/plain",
                            "changes are accepted from loopback only\n".to_string(),
                        )
                    } else {
                        respond(&hub, started, method, path)
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, sock.write_all(resp.as_bytes()))
                        .await;
                });
            }
        }
    }
}

type Response = (&'static str, &'static str, String);

fn respond(hub: &Hub, started: Instant, method: &str, path: &str) -> Response {
    match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            crate::metrics::render(),
        ),
        ("GET", "/status") => ("200 OK", "application/json", status_json(hub, started)),
        ("GET", "/alarms") => (
            "200 OK",
            "application/json",
            format!("{}\n", hub.alarms().to_json()),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("POST", "/reload") => node_json(crate::node::api::post_reload(hub)),
        ("POST", "/drain") => node_json(crate::node::api::post_drain(hub)),
        ("GET", "/drain") => node_json(crate::node::api::get_drain(hub)),
        (m, p) if p.starts_with("/policy/") && (m == "GET" || m == "POST") => {
            policy(hub, m, &p["/policy/".len()..])
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET, or POST on /policy/, /reload or /drain\n".to_string(),
        ),
    }
}

/// A `crate::node::api` answer as this responder's triple.
fn node_json((code, body): (u16, serde_json::Value)) -> Response {
    let status = match code {
        200 => "200 OK",
        422 => "422 Unprocessable Entity",
        _ => "503 Service Unavailable",
    };
    (status, "application/json", format!("{body}\n"))
}

fn bad_request(text: impl std::fmt::Display) -> Response {
    ("400 Bad Request", "text/plain", format!("{text}\n"))
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
            ("200 OK", "application/json", format!("{doc}\n"))
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
                    ("200 OK", "application/json", format!("{doc}\n"))
                }
                Err(ChangeError::Bad(e)) => bad_request(e),
                Err(e @ ChangeError::Full(_)) => {
                    ("507 Insufficient Storage", "text/plain", format!("{e}\n"))
                }
            }
        }
        ("GET", _) => bad_request("GET /policy/<user>"),
        _ => bad_request("POST /policy/<user>/<allow|block|unblock>/<jid or domain>"),
    }
}

fn status_json(hub: &Hub, started: Instant) -> String {
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
    doc.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, BUILTIN_SYSTEMS};
    use crate::presence::map::MappingStore;
    use std::path::Path;

    fn hub() -> Arc<Hub> {
        let cfg = config::from_toml(
            "[[local_domain]]\nname = \"example.com\"\n[[sip.federated_domain]]\nname = \"partner.com\"\nsystem = \"lync\"\n",
            Path::new("t.toml"),
            BUILTIN_SYSTEMS,
        )
        .expect("config");
        Hub::new(cfg, MappingStore::open(None).expect("maps"))
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

    #[test]
    fn alarms_are_served_alone_and_in_status() {
        use crate::ops::alarms::AlarmName;
        let h = hub();
        let t = Instant::now();
        let (status, ctype, body) = respond(&h, t, "GET", "/alarms");
        assert_eq!(
            (status, ctype, body.trim()),
            ("200 OK", "application/json", "[]")
        );
        h.alarms().raise(
            AlarmName::HomeNodeLinkDown,
            "hn1/partner.com",
            "down for 31 s",
        );
        let (_, _, body) = respond(&h, t, "GET", "/alarms");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(doc[0]["name"], "HomeNodeLinkDown");
        assert_eq!(doc[0]["severity"], "critical");
        assert_eq!(doc[0]["raised"], true);
        let (_, _, body) = respond(&h, t, "GET", "/status");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(doc["alarms"][0]["subject"], "hn1/partner.com");
    }

    #[test]
    fn policy_routes_change_and_show_lists_and_refuse_bad_input() {
        let h = hub();
        let t = Instant::now();
        let (status, _, body) =
            respond(&h, t, "POST", "/policy/alice@example.com/block/partner.com");
        assert_eq!(status, "200 OK", "{body}");
        assert!(body.contains("\"verdict\":\"block\""), "{body}");
        let (status, _, body) = respond(&h, t, "GET", "/policy/alice@example.com");
        assert_eq!(status, "200 OK");
        assert!(
            body.contains("\"target\":\"partner.com\"") && body.contains("\"kind\":\"domain\""),
            "{body}"
        );
        let (status, _, body) = respond(
            &h,
            t,
            "POST",
            "/policy/alice@example.com/unblock/partner.com",
        );
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
            let (status, _, body) = respond(&h, t, method, path);
            assert_eq!(status, "400 Bad Request", "{path}: {body}");
            assert!(body.contains(why), "{path}: {body}");
        }
        let (status, _, _) = respond(&h, t, "DELETE", "/policy/alice@example.com");
        assert_eq!(status, "405 Method Not Allowed");
    }
}
