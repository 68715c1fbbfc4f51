//! The peer link between the nodes of a cluster (issue 12 items 2 and 5): gRPC (tonic) over
//! mutual TLS on the clustering port, the address of this node's entry in `cluster.peers`.
//!
//! One call today, `Deliver`: a node whose hub routed envelopes to a component link another
//! node holds (see [`super::claims`]) hands them to the holder in ordered batches; the holder
//! puts each into that link's outbox, waiting for room as a local reader would
//! (`limits.delivery_timeout_secs`), and answers one outcome per envelope. An envelope is the
//! sender's until the holder accepted it: a holder that dies or moves leaves it with the
//! sender, who hands it to the next holder — so a stanza or SIP request accepted before a node
//! is killed is delivered or bounced, not lost (what the dead holder had already accepted but
//! not written is the exception; it is bounded by its outbox).
//!
//! The clustering port accepts connections only from the addresses of listed peers
//! (`cluster.peers`, names through `cluster.address_map` first, then DNS at start), then TLS as
//! [`tls`] describes; everything else is closed and counted.

pub mod tls;
pub mod wire;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("legate.peer.v1");
}

use crate::config::{Config, Host, HostPort};
use crate::gateway::envelope::Envelope;
use crate::gateway::hub::Waited;
use crate::gateway::Hub;
use crate::net::LogSafe;
use crate::xmpp::link::placement::{HandFuture, Handed, Holder, Placement};
use dashmap::DashMap;
use prometheus::IntCounterVec;
use proto::peer_client::PeerClient;
use proto::peer_server::{Peer, PeerServer};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};

pub use tls::{PeerTls, PeerTlsError};

/// TLS handshake on the clustering port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Dialling a peer (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections waiting for the gRPC server.
const ACCEPT_QUEUE: usize = 64;

static CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_cluster_peer_connections_total",
        "Connections to this node's clustering port, by outcome (accepted, not_a_peer, \
         tls_failed, refused_certificate)",
        &["outcome"],
    )
});
static HANDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_cluster_handed_total",
        "Envelopes handed over the peer link, by direction (out: to the holder of a component \
         link, in: from another node) and outcome (accepted, not_holder, timeout, invalid, \
         failed: the peer could not be asked)",
        &["direction", "outcome"],
    )
});

static FANNED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_cluster_sip_copies_total",
        "Copies of home-node presence and consent answers bound for SIP exchanged with the \
         other nodes, by direction and outcome (delivered, dropped, invalid)",
        &["direction", "outcome"],
    )
});

/// Creates the peer link's metric families at start.
pub fn register_metrics() {
    for d in ["in", "out"] {
        for o in ["delivered", "dropped"] {
            FANNED.with_label_values(&[d, o]);
        }
    }
    FANNED.with_label_values(&["in", "invalid"]);
    for o in [
        "accepted",
        "not_a_peer",
        "tls_failed",
        "refused_certificate",
    ] {
        CONNECTIONS.with_label_values(&[o]);
    }
    for d in ["in", "out"] {
        for o in ["accepted", "not_holder", "timeout", "invalid"] {
            HANDED.with_label_values(&[d, o]);
        }
    }
    HANDED.with_label_values(&["out", "failed"]);
}

/// Why the peer link cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PeerLinkError {
    #[error("node.id `{0}` has no entry in cluster.peers, so it has no clustering address")]
    NoAddress(String),
    #[error("cannot bind the clustering port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot resolve this node's clustering address {0}: {1}")]
    Resolve(String, String),
    #[error("peer link TLS: {0}")]
    Tls(#[from] PeerTlsError),
}

/// Where `hp` is: an IP address, the address map, then DNS.
async fn resolve(hp: &HostPort, cfg: &Config) -> Result<Vec<SocketAddr>, String> {
    match &hp.host {
        Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, hp.port)]),
        Host::Name(d) => {
            if let Some((_, ip)) = cfg.cluster.address_map.iter().find(|(n, _)| n == d) {
                return Ok(vec![SocketAddr::new(*ip, hp.port)]);
            }
            tokio::net::lookup_host((d.as_str(), hp.port))
                .await
                .map(|a| a.collect())
                .map_err(|e| e.to_string())
        }
    }
}

/// The running peer link of this node: its server, and clients to the others.
#[derive(Clone)]
pub struct PeerLink {
    inner: Arc<LinkInner>,
}

struct LinkInner {
    hub: Arc<Hub>,
    me: String,
    tls: PeerTls,
    clients: DashMap<String, PeerClient<Channel>>,
}

impl PeerLink {
    /// Binds the clustering port (this node's `cluster.peers` address) and serves it until
    /// `shutdown`; returns the link and the bound address.
    pub async fn start(
        hub: Arc<Hub>,
        claims: super::claims::Claims,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(PeerLink, SocketAddr), PeerLinkError> {
        let cfg = hub.config();
        let me = cfg.node.id.to_string();
        let entry =
            super::peer_entry(&cfg, &me).ok_or_else(|| PeerLinkError::NoAddress(me.clone()))?;
        let tls = PeerTls::from_config(&cfg)?;
        if tls.self_signed {
            tracing::info!("peer link: no tls.cert, presenting a self-signed certificate (cluster.tls_verify = permissive)");
        }
        // Bind the port of our entry on every address (the listed host may be a public
        // name or a NAT address that is not local).
        let port = entry.address.port;
        let bind = match &entry.address.host {
            Host::Ip(ip) => SocketAddr::new(*ip, port),
            Host::Name(_) => SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
        };
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| PeerLinkError::Bind { addr: bind, source })?;
        let bound = listener.local_addr().unwrap_or(bind);
        let mut allowed = HashSet::new();
        for p in &cfg.cluster.peers {
            match resolve(&p.address, &cfg).await {
                Ok(addrs) => allowed.extend(addrs.into_iter().map(|a| a.ip())),
                Err(e) => {
                    tracing::warn!(peer = %p.name, address = %p.address, error = %e, "peer link: a listed peer's address does not resolve; connections from it are refused until a restart")
                }
            }
        }
        let link = PeerLink {
            inner: Arc::new(LinkInner {
                hub: hub.clone(),
                me,
                tls: tls.clone(),
                clients: DashMap::new(),
            }),
        };
        let (tx, rx) = mpsc::channel::<Result<PeerStream, std::io::Error>>(ACCEPT_QUEUE);
        tokio::spawn(accept_loop(
            listener,
            tls,
            Arc::new(allowed),
            tx,
            shutdown.clone(),
        ));
        let service = Service { hub, claims };
        let mut stop = shutdown;
        tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(5)))
                .add_service(PeerServer::new(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    async move {
                        while !*stop.borrow() {
                            if stop.changed().await.is_err() {
                                break;
                            }
                        }
                    },
                )
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "peer link server stopped");
            }
        });
        Ok((link, bound))
    }

    /// What a failed call to `peer` says; a broken connection is dropped so that the next
    /// call dials again.
    fn call_failed(&self, peer: &str, s: &tonic::Status) -> String {
        if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
            self.inner.clients.remove(peer);
        }
        format!("{}: {}", s.code(), s.message())
    }

    /// A client to node `peer` (its address from `cluster.peers`), connected on first use.
    async fn client(&self, peer: &str) -> Result<PeerClient<Channel>, String> {
        if let Some(c) = self.inner.clients.get(peer) {
            return Ok(c.clone());
        }
        let cfg = self.inner.hub.config();
        let entry = super::peer_entry(&cfg, peer)
            .ok_or_else(|| format!("node `{peer}` is not in cluster.peers"))?;
        let hp = entry.address.clone();
        let name = tls::server_name(&hp.host);
        let connector = tokio_rustls::TlsConnector::from(self.inner.tls.client.clone());
        let cfg2 = cfg.clone();
        let dial = tower::service_fn(move |_: tonic::transport::Uri| {
            let (hp, name, connector, cfg) =
                (hp.clone(), name.clone(), connector.clone(), cfg2.clone());
            async move {
                let addrs = resolve(&hp, &cfg).await.map_err(std::io::Error::other)?;
                let mut last = std::io::Error::other("no address");
                for a in addrs {
                    let attempt = async {
                        let tcp = TcpStream::connect(a).await?;
                        let _ = tcp.set_nodelay(true);
                        connector.connect(name.clone(), tcp).await
                    };
                    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                        Ok(Ok(s)) => return Ok(hyper_util::rt::TokioIo::new(s)),
                        Ok(Err(e)) => last = e,
                        Err(_) => {
                            last = std::io::Error::other(format!(
                                "{a}: no answer within {CONNECT_TIMEOUT:?}"
                            ))
                        }
                    }
                }
                Err(last)
            }
        });
        let limit = Duration::from_secs(cfg.limits.delivery_timeout_secs) + Duration::from_secs(5);
        let channel = Endpoint::from_shared(format!("http://{peer}.peer.invalid"))
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(limit)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector_lazy(dial);
        let client = PeerClient::new(channel);
        self.inner.clients.insert(peer.to_string(), client.clone());
        Ok(client)
    }
}

/// The component links' placement in a cluster: claims say who holds what, the peer link
/// carries deliveries to the holder.
pub struct ClusterPlacement {
    pub claims: super::claims::Claims,
    pub link: PeerLink,
}

impl Placement for ClusterPlacement {
    fn follow(&self, home_node: &str, domain: &crate::config::Domain) -> watch::Receiver<Holder> {
        self.claims.follow(home_node, domain.as_str())
    }

    fn hand(&self, peer: Arc<str>, home_node: Arc<str>, batch: &[&Envelope]) -> HandFuture {
        let request = proto::Batch {
            from_node: self.link.inner.me.clone(),
            home_node: home_node.to_string(),
            envelopes: batch.iter().map(|e| wire::to_wire(e)).collect(),
        };
        let link = self.link.clone();
        Box::pin(async move {
            let mut client = link.client(&peer).await?;
            let answer = client.deliver(request).await.map_err(|s| {
                HANDED.with_label_values(&["out", "failed"]).inc();
                link.call_failed(&peer, &s)
            })?;
            Ok(answer
                .into_inner()
                .outcomes
                .into_iter()
                .map(|o| {
                    let h = match proto::Outcome::try_from(o) {
                        Ok(proto::Outcome::Accepted) => Handed::Accepted,
                        Ok(proto::Outcome::Timeout) => Handed::Timeout,
                        Ok(proto::Outcome::Invalid) => Handed::Invalid,
                        Ok(proto::Outcome::NotHolder) | Err(_) => Handed::NotHolder,
                    };
                    HANDED.with_label_values(&["out", label(h)]).inc();
                    h
                })
                .collect())
        })
    }
}

fn label(h: Handed) -> &'static str {
    match h {
        Handed::Accepted => "accepted",
        Handed::NotHolder => "not_holder",
        Handed::Timeout => "timeout",
        Handed::Invalid => "invalid",
    }
}

/// The gRPC service: envelopes from other nodes into the outboxes of links this node holds.
struct Service {
    hub: Arc<Hub>,
    claims: super::claims::Claims,
}

#[tonic::async_trait]
impl Peer for Service {
    async fn deliver(
        &self,
        request: tonic::Request<proto::Batch>,
    ) -> Result<tonic::Response<proto::Outcomes>, tonic::Status> {
        let batch = request.into_inner();
        let home: Arc<str> = Arc::from(batch.home_node.as_str());
        let limit = Duration::from_secs(self.hub.config().limits.delivery_timeout_secs);
        let mut outcomes = Vec::with_capacity(batch.envelopes.len());
        // After the first envelope not taken, the rest are not tried: they go back to the
        // sender in order, so one slow or moved link cannot reorder a conversation.
        let mut refused = false;
        for w in batch.envelopes {
            let h = if refused {
                Handed::NotHolder
            } else {
                match wire::from_wire(w) {
                    Err(e) => {
                        tracing::warn!(from_node = %batch.from_node, error = %e, "peer link: envelope refused");
                        Handed::Invalid
                    }
                    Ok(env) if !self.claims.holds(&home, env.from.domain.as_str()) => {
                        Handed::NotHolder
                    }
                    Ok(envelope) => {
                        let d = crate::gateway::hub::Delivery {
                            link: crate::gateway::Link::Component {
                                home_node: home.clone(),
                            },
                            envelope,
                        };
                        match self.hub.deliver_wait(d, limit).await {
                            Waited::Delivered => Handed::Accepted,
                            Waited::Timeout => Handed::Timeout,
                            Waited::NoOutbox => Handed::NotHolder,
                        }
                    }
                }
            };
            if h != Handed::Accepted && h != Handed::Invalid {
                refused = true;
            }
            HANDED.with_label_values(&["in", label(h)]).inc();
            outcomes.push(match h {
                Handed::Accepted => proto::Outcome::Accepted,
                Handed::NotHolder => proto::Outcome::NotHolder,
                Handed::Timeout => proto::Outcome::Timeout,
                Handed::Invalid => proto::Outcome::Invalid,
            } as i32);
        }
        Ok(tonic::Response::new(proto::Outcomes { outcomes }))
    }

    async fn fanout(
        &self,
        request: tonic::Request<proto::SipBatch>,
    ) -> Result<tonic::Response<proto::FanoutAck>, tonic::Status> {
        let batch = request.into_inner();
        let limit = Duration::from_secs(self.hub.config().limits.delivery_timeout_secs);
        let mut accepted = 0u32;
        for d in batch.deliveries {
            let (Ok(domain), Some(w)) = (crate::config::Domain::parse(&d.domain), d.envelope)
            else {
                FANNED.with_label_values(&["in", "invalid"]).inc();
                continue;
            };
            let envelope = match wire::from_wire(w) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(from_node = %batch.from_node, error = %e, "peer link: copied SIP delivery refused");
                    FANNED.with_label_values(&["in", "invalid"]).inc();
                    continue;
                }
            };
            let d = crate::gateway::hub::Delivery {
                link: crate::gateway::Link::Sip { domain },
                envelope,
            };
            if self.hub.deliver_wait(d, limit).await == Waited::Delivered {
                accepted += 1;
                FANNED.with_label_values(&["in", "delivered"]).inc();
            } else {
                FANNED.with_label_values(&["in", "dropped"]).inc();
            }
        }
        Ok(tonic::Response::new(proto::FanoutAck { accepted }))
    }
}

/// Copies home-node state bound for SIP to every other live node (see
/// [`crate::gateway::hub::SipFanout`]): one queue and one sender task per peer, batches in
/// order. A copy a peer cannot take after [`FANOUT_TRIES`] tries is dropped and counted: it is
/// state, and the user's next change brings that node's watchers up to date.
#[derive(Clone)]
pub struct Fanout {
    link: PeerLink,
    cluster: super::Cluster,
    queues: Arc<DashMap<String, mpsc::Sender<proto::SipDelivery>>>,
}

/// Copies waiting per peer before new ones are dropped.
const FANOUT_QUEUE: usize = 10_000;
/// Attempts per batch before it is dropped.
const FANOUT_TRIES: u32 = 5;

impl Fanout {
    pub fn new(link: PeerLink, cluster: super::Cluster) -> Fanout {
        Fanout {
            link,
            cluster,
            queues: Arc::new(DashMap::new()),
        }
    }

    /// Queues a copy of `d` for every other live node.
    pub fn send(&self, d: &crate::gateway::hub::Delivery) {
        let crate::gateway::Link::Sip { domain } = &d.link else {
            return;
        };
        let me = &self.link.inner.me;
        let wire = proto::SipDelivery {
            domain: domain.to_string(),
            envelope: Some(wire::to_wire(&d.envelope)),
        };
        for peer in self.cluster.live_members() {
            if &peer == me {
                continue;
            }
            let tx = self
                .queues
                .entry(peer.clone())
                .or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(FANOUT_QUEUE);
                    tokio::spawn(fanout_task(self.link.clone(), peer.clone(), rx));
                    tx
                })
                .clone();
            if tx.try_send(wire.clone()).is_err() {
                FANNED.with_label_values(&["out", "dropped"]).inc();
                tracing::warn!(peer = %peer, "peer link: copy of SIP-bound presence dropped (queue full)");
            }
        }
    }
}

async fn fanout_task(link: PeerLink, peer: String, mut rx: mpsc::Receiver<proto::SipDelivery>) {
    while let Some(first) = rx.recv().await {
        let mut deliveries = vec![first];
        while deliveries.len() < 64 {
            match rx.try_recv() {
                Ok(d) => deliveries.push(d),
                Err(_) => break,
            }
        }
        let n = deliveries.len() as u64;
        let batch = proto::SipBatch {
            from_node: link.inner.me.clone(),
            deliveries,
        };
        let mut sent = false;
        for attempt in 0..FANOUT_TRIES {
            let result = match link.client(&peer).await {
                Ok(mut c) => c
                    .fanout(batch.clone())
                    .await
                    .map_err(|s| link.call_failed(&peer, &s)),
                Err(e) => Err(e),
            };
            match result {
                Ok(_) => {
                    sent = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(peer = %peer, attempt, error = %LogSafe(&e), "peer link: copy to a node failed");
                    tokio::time::sleep(Duration::from_millis(200 << attempt.min(4))).await;
                }
            }
        }
        FANNED
            .with_label_values(&["out", if sent { "delivered" } else { "dropped" }])
            .inc_by(n);
    }
}

/// Accepts on the clustering port: listed peers only, then mutual TLS; hands each ready
/// stream to the gRPC server.
async fn accept_loop(
    listener: TcpListener,
    tls: PeerTls,
    allowed: Arc<HashSet<IpAddr>>,
    tx: mpsc::Sender<Result<PeerStream, std::io::Error>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    loop {
        let (tcp, from) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "peer link: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => if *shutdown.borrow() { return } else { continue },
        };
        if !allowed.contains(&from.ip()) {
            CONNECTIONS.with_label_values(&["not_a_peer"]).inc();
            tracing::warn!(%from, "peer link: connection from an address that is not a listed peer refused");
            continue;
        }
        let (acceptor, tls, tx) = (acceptor.clone(), tls.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    CONNECTIONS.with_label_values(&["tls_failed"]).inc();
                    tracing::warn!(%from, error = %e, "peer link: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    CONNECTIONS.with_label_values(&["tls_failed"]).inc();
                    tracing::warn!(%from, "peer link: TLS handshake timed out");
                    return;
                }
            };
            if let Err(why) = tls.client_allowed(stream.get_ref().1) {
                CONNECTIONS
                    .with_label_values(&["refused_certificate"])
                    .inc();
                tracing::warn!(%from, reason = %why, "peer link: client certificate refused");
                return;
            }
            CONNECTIONS.with_label_values(&["accepted"]).inc();
            let _ = tx
                .send(Ok(Served {
                    inner: stream,
                    info: from,
                }))
                .await;
        });
    }
}

/// An accepted connection as a tonic server takes it: the stream, and what the handlers learn
/// of its peer (`ConnectInfo`). The clustering port's are TLS streams with the peer's address;
/// the intercluster link uses it too.
pub(crate) struct Served<S, I> {
    pub inner: S,
    pub info: I,
}

/// A TLS connection on the clustering port.
type PeerStream = Served<tokio_rustls::server::TlsStream<TcpStream>, SocketAddr>;

impl<S: Send + 'static, I: Clone + Send + Sync + 'static> tonic::transport::server::Connected
    for Served<S, I>
{
    type ConnectInfo = I;

    fn connect_info(&self) -> I {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin, I: Unpin> AsyncRead for Served<S, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, I: Unpin> AsyncWrite for Served<S, I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
