//! The intercluster link's wire: the gRPC service this node answers on `intercluster.listen`
//! (`Hello`, `Users`) and the client side of one sync. Each sync dials a fresh connection, so
//! the certificate status shown per peer is the one of that sync's handshake.

pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("legate.intercluster.v1");
}

use super::changelog::{ChangeLog, Cursor};
use super::tls::IcTls;
use crate::config::{Config, Host, HostPort, InterclusterTransport};
use crate::gateway::Address;
use crate::store::SharedStore;
use proto::intercluster_client::InterclusterClient;
use proto::intercluster_server::{Intercluster, InterclusterServer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::transport::Endpoint;

/// Dialling a peer (TCP, then TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TLS handshake of a caller.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the peer's next answer (its hello, or the next batch of users): a peer
/// that stops answering fails the sync instead of holding it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Users per streamed batch.
pub const BATCH: usize = 1_000;
/// Callers waiting for the gRPC server.
const ACCEPT_QUEUE: usize = 32;
/// Users one answer may carry: far above a cluster's size, below what would exhaust memory.
pub const MAX_USERS: usize = 5_000_000;

/// Bytes both ways, over TLS or not.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// What the answering side knows of a caller's connection.
#[derive(Debug, Clone)]
pub struct Caller {
    pub from: SocketAddr,
    /// What its certificate names; `None` over plaintext TCP.
    pub names: Option<super::tls::Presented>,
}

/// A caller's connection, as the gRPC server takes it.
type Conn = crate::cluster::peer::Served<Box<dyn Io>, Caller>;

/// Unlisted callers recorded for the status at most: a name is the caller's word, so a
/// flood of names must not grow the store.
const MAX_CALLERS: usize = 64;

/// Refusals of callers kept for the status, per node (the newest last).
const MAX_REFUSALS: usize = 16;

/// The callers this node's listener refused lately (a failed TLS handshake, a certificate
/// that does not name the address we list, a cluster we do not list), for the status: the
/// dialling side sees its own failure, and this is where the answering side's admin sees it.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<std::collections::VecDeque<serde_json::Value>>);

impl Refusals {
    /// Records one (`peer`: the listed peer it is, when known) and counts it by `reason`.
    pub fn record(&self, from: SocketAddr, peer: Option<&str>, reason: &'static str, detail: &str) {
        super::CALLERS_REFUSED.with_label_values(&[reason]).inc();
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_REFUSALS {
            q.pop_front();
        }
        q.push_back(serde_json::json!({
            "at": crate::ops::alarms::unix_now(),
            "from": from.to_string(),
            "peer": peer,
            "reason": reason,
            "detail": detail.chars().take(300).collect::<String>(),
        }));
    }

    pub fn json(&self) -> serde_json::Value {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::Value::Array(q.iter().cloned().collect())
    }
}

/// The listed peer whose address is `ip` (peers listed by name are not resolved for this:
/// a flood of failed handshakes must not become a flood of DNS queries).
fn peer_at(cfg: &Config, ip: std::net::IpAddr) -> Option<String> {
    cfg.intercluster
        .peers
        .iter()
        .find(|p| p.address.host == Host::Ip(ip))
        .map(|p| p.name.clone())
}

/// The answering side: our users' log, and who we list.
pub struct Service {
    pub config: Arc<dyn Fn() -> Arc<Config> + Send + Sync>,
    pub log: Arc<Mutex<ChangeLog>>,
    pub store: SharedStore,
    /// What is recorded already (unlisted callers).
    pub index: Arc<super::index::Index>,
    /// Where forwarded envelopes are routed (weak: the hub owns the tasks that own us).
    pub hub: std::sync::Weak<crate::gateway::Hub>,
    /// Per-peer counts for the status.
    pub routing: Arc<super::routes::Routing>,
    /// Callers refused lately, for the status.
    pub refusals: Arc<Refusals>,
}

/// Envelopes one `Forward` call may carry (the sender batches at most
/// [`super::forward::BATCH`]).
pub const MAX_FORWARD: usize = 1_000;

impl Service {
    fn not_listed(&self, from: &str) -> tonic::Status {
        tonic::Status::permission_denied(format!(
            "cluster `{from}` is not listed in [[intercluster.peer]] of cluster `{}`: add it \
             there (a peer is removed on both sides, or listed on both)",
            self.me()
        ))
    }

    fn me(&self) -> String {
        (self.config)()
            .intercluster
            .name
            .clone()
            .unwrap_or_default()
    }

    /// The listed peer `from` claims to be, after checking its certificate; `Ok(None)`: we do
    /// not list it (recorded, so our status shows it).
    async fn identify(
        &self,
        from: &str,
        caller: Option<&Caller>,
    ) -> Result<Option<HostPort>, tonic::Status> {
        if !super::valid_name(from) {
            return Err(tonic::Status::invalid_argument(format!(
                "`{}` is not a cluster name (lowercase letters, digits, `-`, `_`, `.`)",
                from.chars().take(64).collect::<String>()
            )));
        }
        let cfg = (self.config)();
        let Some(peer) = cfg.intercluster.peers.iter().find(|p| p.name == from) else {
            let callers = self.index.callers();
            if !callers.contains_key(from) && callers.len() >= MAX_CALLERS {
                return Ok(None);
            }
            let doc = serde_json::json!({
                "last_seen": crate::ops::alarms::unix_now(),
                "from": caller.map(|c| c.from.to_string()),
            });
            if let Some(c) = caller {
                self.refusals
                    .record(c.from, None, "not_listed", &format!("says it is `{from}`"));
            }
            let key = format!("{}{from}", super::keys::CALLERS);
            if let Err(e) = self.store.put(&key, doc.to_string().into_bytes()).await {
                tracing::warn!(error = %e, "intercluster: cannot record an unlisted caller");
            }
            return Ok(None);
        };
        if let Some(names) = caller.and_then(|c| c.names.as_ref()) {
            super::tls::caller_allowed(&peer.address.host, names).map_err(|why| {
                tracing::warn!(peer = %from, reason = %why, "intercluster: caller refused");
                if let Some(c) = caller {
                    self.refusals
                        .record(c.from, Some(from), "certificate_names", &why);
                }
                tonic::Status::permission_denied(why)
            })?;
        }
        Ok(Some(peer.address.clone()))
    }
}

type UserStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::UserBatch, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Intercluster for Service {
    async fn hello(
        &self,
        request: tonic::Request<proto::HelloRequest>,
    ) -> Result<tonic::Response<proto::HelloReply>, tonic::Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let from = request.into_inner().from_cluster;
        let listed = self.identify(&from, caller.as_ref()).await?;
        Ok(tonic::Response::new(proto::HelloReply {
            cluster: self.me(),
            lists_you: listed.is_some(),
        }))
    }

    type UsersStream = UserStream;

    async fn forward(
        &self,
        request: tonic::Request<proto::ForwardBatch>,
    ) -> Result<tonic::Response<proto::ForwardOutcomes>, tonic::Status> {
        use crate::gateway::hub::Submitted;
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        if self
            .identify(&req.from_cluster, caller.as_ref())
            .await?
            .is_none()
        {
            super::FORWARDED
                .with_label_values(&["in", "refused_caller"])
                .inc_by(req.envelopes.len() as u64);
            return Err(self.not_listed(&req.from_cluster));
        }
        if req.envelopes.len() > MAX_FORWARD {
            return Err(tonic::Status::invalid_argument(format!(
                "at most {MAX_FORWARD} envelopes per call"
            )));
        }
        let hub = self
            .hub
            .upgrade()
            .ok_or_else(|| tonic::Status::unavailable("this node is stopping"))?;
        let from: Arc<str> = Arc::from(req.from_cluster.as_str());
        let origin = crate::gateway::Origin::Intercluster {
            cluster: from.clone(),
        };
        let mut outcomes = Vec::with_capacity(req.envelopes.len());
        for w in req.envelopes {
            let o = match crate::cluster::peer::wire::from_wire(w) {
                Err(e) => {
                    tracing::warn!(peer = %req.from_cluster, error = %e, "intercluster: forwarded envelope refused");
                    proto::ForwardOutcome {
                        result: proto::ForwardResult::Invalid as i32,
                        condition: crate::gateway::envelope::ErrorCondition::BadRequest
                            .as_str()
                            .into(),
                        reason: format!("unreadable envelope: {e}"),
                        answered: true,
                    }
                }
                // Routed as if it had arrived on our edge; a reader's wait for room, so a
                // peer that floods us is slowed by its own call, not by dropped stanzas.
                Ok(env) => match hub.submit_wait(&origin, env).await {
                    Submitted::Delivered(_) => proto::ForwardOutcome {
                        result: proto::ForwardResult::Delivered as i32,
                        ..Default::default()
                    },
                    Submitted::Denied(d) => proto::ForwardOutcome {
                        result: proto::ForwardResult::Refused as i32,
                        condition: d.condition().as_str().into(),
                        reason: d.to_string(),
                        answered: d.answered(),
                    },
                    Submitted::Unavailable(l) => proto::ForwardOutcome {
                        result: proto::ForwardResult::Unavailable as i32,
                        condition: crate::gateway::envelope::ErrorCondition::ServiceUnavailable
                            .as_str()
                            .into(),
                        reason: format!(
                            "the {} link of cluster `{}` is unavailable",
                            l.label(),
                            self.me()
                        ),
                        answered: true,
                    },
                },
            };
            let label = super::forward::result_label(o.result);
            super::FORWARDED.with_label_values(&["in", label]).inc();
            self.routing
                .count(&from, super::routes::Way::In, label == "delivered");
            outcomes.push(o);
        }
        Ok(tonic::Response::new(proto::ForwardOutcomes { outcomes }))
    }

    async fn lookup(
        &self,
        request: tonic::Request<proto::LookupRequest>,
    ) -> Result<tonic::Response<proto::LookupReply>, tonic::Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        if self
            .identify(&req.from_cluster, caller.as_ref())
            .await?
            .is_none()
        {
            return Err(self.not_listed(&req.from_cluster));
        }
        let cfg = (self.config)();
        if !local_user(&cfg, &req.user) {
            return Err(tonic::Status::invalid_argument(
                "not a bare JID of a local domain",
            ));
        }
        // Our users as we contribute them to syncs: configured, learned, pinned.
        let lives_here = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&req.user);
        super::LOOKUPS
            .with_label_values(&["in", if lives_here { "yes" } else { "no" }])
            .inc();
        Ok(tonic::Response::new(proto::LookupReply { lives_here }))
    }

    async fn users(
        &self,
        request: tonic::Request<proto::SyncRequest>,
    ) -> Result<tonic::Response<UserStream>, tonic::Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let req = request.into_inner();
        if self
            .identify(&req.from_cluster, caller.as_ref())
            .await?
            .is_none()
        {
            super::SERVED.with_label_values(&["refused"]).inc();
            return Err(self.not_listed(&req.from_cluster));
        }
        let since = (req.since_epoch != 0).then_some(Cursor {
            epoch: req.since_epoch,
            version: req.since_version,
        });
        let answer = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .answer(since, req.full);
        super::SERVED
            .with_label_values(&[if answer.complete {
                "complete"
            } else {
                "incremental"
            }])
            .inc();
        let (complete, cursor) = (answer.complete, answer.cursor);
        let mut batches: Vec<Result<proto::UserBatch, tonic::Status>> = answer
            .changes
            .chunks(BATCH)
            .map(|c| {
                Ok(proto::UserBatch {
                    changes: c
                        .iter()
                        .map(|c| proto::UserChange {
                            user: c.user.clone(),
                            removed: c.removed,
                        })
                        .collect(),
                    complete,
                    epoch: cursor.epoch,
                    version: cursor.version,
                    last: false,
                })
            })
            .collect();
        if batches.is_empty() {
            batches.push(Ok(proto::UserBatch {
                changes: vec![],
                complete,
                epoch: cursor.epoch,
                version: cursor.version,
                last: false,
            }));
        }
        if let Some(Ok(b)) = batches.last_mut() {
            b.last = true;
        }
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(batches))))
    }
}

/// Why the link cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot bind intercluster.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("intercluster TLS: {0}")]
    Tls(#[from] super::tls::IcTlsError),
}

/// Binds `addr` and serves the link until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    tls: Option<IcTls>,
    service: Service,
    shutdown: watch::Receiver<bool>,
) -> Result<SocketAddr, LinkError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| LinkError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let (tx, rx) = mpsc::channel::<Result<Conn, std::io::Error>>(ACCEPT_QUEUE);
    let refused = Refused {
        config: service.config.clone(),
        refusals: service.refusals.clone(),
    };
    tokio::spawn(accept_loop(listener, tls, refused, tx, shutdown.clone()));
    tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(InterclusterServer::new(service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                crate::net::stopped(shutdown),
            )
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "intercluster link server stopped");
        }
    });
    Ok(bound)
}

/// What the accept loop needs to record a refused handshake.
#[derive(Clone)]
struct Refused {
    config: Arc<dyn Fn() -> Arc<Config> + Send + Sync>,
    refusals: Arc<Refusals>,
}

impl Refused {
    fn record(&self, from: SocketAddr, reason: &'static str, detail: &str) {
        let peer = peer_at(&(self.config)(), from.ip());
        self.refusals.record(from, peer.as_deref(), reason, detail);
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<IcTls>,
    refused: Refused,
    tx: mpsc::Sender<Result<Conn, std::io::Error>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.server.clone()));
    loop {
        let (tcp, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "intercluster: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => if *shutdown.borrow() { return } else { continue },
        };
        let (acceptor, tx, refused) = (acceptor.clone(), tx.clone(), refused.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let conn = match acceptor {
                None => Conn {
                    inner: Box::new(tcp),
                    info: Caller { from, names: None },
                },
                Some(a) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, a.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let names = super::tls::presented(s.get_ref().1.peer_certificates());
                        Conn {
                            inner: Box::new(s),
                            info: Caller {
                                from,
                                names: Some(names),
                            },
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%from, error = %e, "intercluster: TLS handshake with a caller failed");
                        refused.record(from, "tls_handshake", &e.to_string());
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%from, "intercluster: TLS handshake with a caller timed out");
                        refused.record(from, "tls_timeout", "no TLS handshake within 5 s");
                        return;
                    }
                },
            };
            let _ = tx.send(Ok(conn)).await;
        });
    }
}

/// What one sync with a peer brought back.
#[derive(Debug, Default)]
pub struct Fetched {
    /// The peer answered `Hello` (TCP, TLS and gRPC all worked).
    pub reachable: bool,
    /// `plaintext`, `valid: … expires …`, `failed: why`, or `unknown` (not reached).
    pub certificate: String,
    pub listed_by_peer: Option<bool>,
    /// The answer: complete or not, the changes (user, removed), the cursor; or why none.
    pub answer: Option<Result<Received, String>>,
}

#[derive(Debug, Default)]
pub struct Received {
    pub complete: bool,
    pub changes: Vec<(String, bool)>,
    pub cursor: Option<Cursor>,
    /// Entries refused (not a bare JID of one of our local domains).
    pub invalid: usize,
}

/// Where `hp` is: an IP address or DNS (an IP address survives a DNS outage).
async fn resolve(hp: &HostPort) -> Result<Vec<SocketAddr>, String> {
    match &hp.host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, hp.port)]),
        Host::Name(d) => tokio::net::lookup_host((d.as_str(), hp.port))
            .await
            .map(|a| a.collect())
            .map_err(|e| format!("{d} does not resolve: {e}")),
    }
}

/// Dials `peer`, says hello and asks for its users from `cursor` (`None` or `full`: all).
pub async fn fetch(
    cfg: &Config,
    tls: Option<&IcTls>,
    peer: &HostPort,
    cursor: Option<Cursor>,
    full: bool,
) -> Fetched {
    let mut out = Fetched {
        certificate: match cfg.intercluster.transport {
            InterclusterTransport::Tcp => "plaintext".into(),
            InterclusterTransport::Tls => "unknown (not reached)".into(),
        },
        ..Fetched::default()
    };
    let io = match dial(peer, tls, &mut out.certificate).await {
        Ok(io) => io,
        Err(e) => {
            out.answer = Some(Err(e));
            return out;
        }
    };
    let slot = Arc::new(Mutex::new(Some(io)));
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let slot = slot.clone();
        async move {
            slot.lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .map(hyper_util::rt::TokioIo::new)
                .ok_or_else(|| std::io::Error::other("the sync's connection is gone"))
        }
    });
    let channel = match Endpoint::from_static("http://intercluster.invalid")
        .connect_with_connector(connector)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            out.answer = Some(Err(format!("HTTP/2 with the peer failed: {e}")));
            return out;
        }
    };
    let me = cfg.intercluster.name.clone().unwrap_or_default();
    let mut client = InterclusterClient::new(channel).max_decoding_message_size(16 << 20);
    let hello = client.hello(proto::HelloRequest {
        from_cluster: me.clone(),
    });
    let Ok(hello) = tokio::time::timeout(ANSWER_TIMEOUT, hello).await else {
        out.answer = Some(Err(format!("no answer to Hello within {ANSWER_TIMEOUT:?}")));
        return out;
    };
    match hello {
        Ok(r) => {
            out.reachable = true;
            let r = r.into_inner();
            out.listed_by_peer = Some(r.lists_you);
            if !r.lists_you {
                out.answer = Some(Err(format!(
                    "the peer (cluster `{}`) does not list this cluster `{me}` in its \
                     [[intercluster.peer]]: add it there, or remove the peer here",
                    r.cluster.chars().take(64).collect::<String>()
                )));
                return out;
            }
        }
        Err(s) => {
            out.answer = Some(Err(format!("Hello refused: {}: {}", s.code(), s.message())));
            return out;
        }
    }
    let req = proto::SyncRequest {
        from_cluster: me,
        since_epoch: cursor.map_or(0, |c| c.epoch),
        since_version: cursor.map_or(0, |c| c.version),
        full,
    };
    out.answer = Some(receive(cfg, &mut client, req).await);
    out
}

async fn receive(
    cfg: &Config,
    client: &mut InterclusterClient<tonic::transport::Channel>,
    req: proto::SyncRequest,
) -> Result<Received, String> {
    let mut stream = tokio::time::timeout(ANSWER_TIMEOUT, client.users(req))
        .await
        .map_err(|_| format!("no answer to Users within {ANSWER_TIMEOUT:?}"))?
        .map_err(|s| format!("Users refused: {}: {}", s.code(), s.message()))?
        .into_inner();
    let mut got = Received::default();
    let mut first = true;
    loop {
        let next = tokio::time::timeout(ANSWER_TIMEOUT, stream.message())
            .await
            .map_err(|_| format!("the peer sent nothing for {ANSWER_TIMEOUT:?}"))?;
        let batch = match next {
            Ok(Some(b)) => b,
            Ok(None) => return Err("the peer's answer was cut (no last batch)".into()),
            Err(s) => {
                return Err(format!(
                    "the peer's answer failed: {}: {}",
                    s.code(),
                    s.message()
                ))
            }
        };
        if first {
            got.complete = batch.complete;
            got.cursor = Some(Cursor {
                epoch: batch.epoch,
                version: batch.version,
            });
            first = false;
        }
        if got.changes.len() + batch.changes.len() > MAX_USERS {
            return Err(format!("the peer sent more than {MAX_USERS} users"));
        }
        for c in batch.changes {
            if local_user(cfg, &c.user) {
                got.changes.push((c.user, c.removed));
            } else {
                got.invalid += 1;
            }
        }
        if batch.last {
            return Ok(got);
        }
    }
}

/// Whether `user` (from a peer) is a bare JID of one of our local domains: a peer cluster
/// serves the same domains, and anything else must not enter our store.
pub fn local_user(cfg: &Config, user: &str) -> bool {
    user.len() <= 512
        && Address::parse(user).is_ok_and(|a| {
            a.resource.is_none()
                && a.bare_string() == user
                && cfg.local_domains.iter().any(|d| d.name == a.domain)
        })
}

pub(super) async fn dial(
    peer: &HostPort,
    tls: Option<&IcTls>,
    certificate: &mut String,
) -> Result<Box<dyn Io>, String> {
    let addrs = resolve(peer).await?;
    let mut last = format!("{peer}: no address");
    for a in addrs {
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                last = format!("{a}: {e}");
                continue;
            }
            Err(_) => {
                last = format!("{a}: no answer within {CONNECT_TIMEOUT:?}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = tls else {
            return Ok(Box::new(tcp));
        };
        let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
        let name = crate::cluster::peer::tls::server_name(&peer.host);
        return match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(s)) => {
                *certificate = super::tls::describe(
                    s.get_ref().1.peer_certificates(),
                    crate::ops::alarms::unix_now() as i64,
                );
                Ok(Box::new(s))
            }
            Ok(Err(e)) => {
                *certificate = format!("failed: {e}");
                Err(format!("TLS with {a} failed: {e}"))
            }
            Err(_) => {
                *certificate = "failed: handshake timed out".into();
                Err(format!(
                    "TLS with {a}: no handshake within {CONNECT_TIMEOUT:?}"
                ))
            }
        };
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_jids_of_our_local_domains_enter_the_store() {
        let cfg = crate::config::from_toml(
            "[[local_domain]]\nname = \"example.com\"\n",
            std::path::Path::new("t.toml"),
            crate::config::BUILTIN_SYSTEMS,
        )
        .unwrap_or_else(|d| panic!("{d}"));
        assert!(local_user(&cfg, "bob@example.com"));
        for bad in [
            "bob@example.com/phone",
            "bob@other.com",
            "bob@sub.example.com",
            "example.com",
            "",
            "bob@EXAMPLE.com",
            &format!("{}@example.com", "x".repeat(600)),
        ] {
            assert!(!local_user(&cfg, bad), "{bad}");
        }
    }
}
