//! The admin HTTP endpoint (loopback by default): `GET /metrics` (Prometheus text),
//! `GET /status` (JSON), `GET /healthz`. A deliberately tiny HTTP/1.1 responder: one request
//! per connection, bounded request size and time, nothing else.

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
                ..
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
                    let (status, ctype, body) = match (method, path) {
                        ("GET", "/metrics") => (
                            "200 OK",
                            "text/plain; version=0.0.4",
                            crate::metrics::render(),
                        ),
                        ("GET", "/status") => {
                            ("200 OK", "application/json", status_json(&hub, started))
                        }
                        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
                        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                        _ => (
                            "405 Method Not Allowed",
                            "text/plain",
                            "GET only\n".to_string(),
                        ),
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
        "mapping_systems": maps.system_names().collect::<Vec<_>>(),
        "mapping_tables": maps.tables.len(),
        "mapping_digest": maps.digest,
    });
    if let Some(obj) = doc.as_object_mut() {
        for (name, value) in hub.status_sections() {
            obj.insert(name.to_string(), value);
        }
    }
    doc.to_string()
}
