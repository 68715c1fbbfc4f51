//! The peer link between the nodes of a cluster (issue 12 items 2 and 5): gRPC (tonic) over
//! mutual TLS on the clustering port, the address of this node's entry in `cluster.peers`.
//!
//! `Deliver`: a node whose hub routed envelopes to a component link another node holds (see
//! [`super::claims`]) hands them to the holder in ordered batches; the holder puts each into
//! that link's outbox, waiting for room as a local reader would
//! (`limits.delivery_timeout_secs`), and answers one outcome per envelope once the link has
//! *written* it to the home node (or answered it with an error; [`Handled`]). An envelope is
//! the sender's until then: a holder that dies or moves before writing it leaves it with the
//! sender, who hands it to the next holder — so a stanza or SIP request accepted before a node
//! is killed is delivered or bounced, not lost. (A holder that wrote it and died before
//! answering makes the sender hand it again: at least once, never lost. What the killed node
//! itself took from its own SIP or s2s peers and had not written is lost with it.)
//! `Fanout`: copies of home-node state bound for SIP, for every node's SIP edge.
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
use crate::gateway::hub::{Handled, RelayFuture, SipPeers, SipRelay, Waited};
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
        "Home-node deliveries bound for SIP exchanged with the other nodes (copies of \
         presence and consent answers, and messages for an IM session the receiver owns), by \
         direction and outcome (delivered, dropped, invalid)",
        &["direction", "outcome"],
    )
});

static SESSION_HANDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_cluster_im_session_hands_total",
        "Messages from a home node for an IM session another node owns, by outcome: handed \
         (to the owner, over the peer link), queue_full (sent from here instead), fell_back \
         (the owner could not take them: sent from here, in a new session)",
        &["outcome"],
    )
});

/// Creates the peer link's metric families at start.
pub fn register_metrics() {
    for o in ["handed", "queue_full", "fell_back"] {
        SESSION_HANDS.with_label_values(&[o]);
    }
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
    /// This node's SIP edge, once started: where requests other nodes relay go.
    sip: std::sync::OnceLock<crate::sip::edge::RelayInbox>,
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
                sip: std::sync::OnceLock::new(),
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
        let service = Service {
            hub,
            claims,
            link: link.clone(),
        };
        tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(5)))
                .add_service(PeerServer::new(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    crate::net::stopped(shutdown),
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
    /// Serves requests other nodes relay for this node's dialogs through `inbox` (this node's
    /// SIP edge, which starts after the peer link).
    pub fn serve_sip(&self, inbox: crate::sip::edge::RelayInbox) {
        let _ = self.inner.sip.set(inbox);
    }

    /// Hands a partner's in-dialog request to `peer`'s SIP edge; its answers.
    pub async fn relay(&self, peer: &str, req: SipRelay) -> Result<Vec<Vec<u8>>, String> {
        let request = proto::SipRequest {
            from_node: self.inner.me.clone(),
            message: req.message,
            remote: req.remote.to_string(),
            tls: req.tls,
            verified: req.verified.iter().map(|d| d.to_string()).collect(),
        };
        let mut client = self.client(peer).await?;
        let answer = client
            .relay(request)
            .await
            .map_err(|s| self.call_failed(peer, &s))?;
        Ok(answer.into_inner().responses)
    }

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

/// The gRPC service: envelopes from other nodes into the outboxes of links this node holds,
/// and SIP requests for this node's dialogs into its SIP edge.
struct Service {
    hub: Arc<Hub>,
    claims: super::claims::Claims,
    link: PeerLink,
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
        let started = tokio::time::Instant::now();
        let mut outcomes = Vec::with_capacity(batch.envelopes.len());
        // Per accepted envelope, what tells that the link wrote it (or answered it).
        let mut handled = Vec::with_capacity(batch.envelopes.len());
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
                        self.hub.directory().remember_via(&envelope);
                        let (h, done) = Handled::pair();
                        let d = crate::gateway::hub::Delivery {
                            link: crate::gateway::Link::Component {
                                home_node: home.clone(),
                            },
                            envelope,
                            handled: h,
                        };
                        match self.hub.deliver_wait(d, limit).await {
                            Waited::Delivered => {
                                handled.push((outcomes.len(), done));
                                Handed::Accepted
                            }
                            Waited::Timeout => Handed::Timeout,
                            Waited::NoOutbox => Handed::NotHolder,
                        }
                    }
                }
            };
            if h != Handed::Accepted && h != Handed::Invalid {
                refused = true;
            }
            outcomes.push(h);
        }
        // "Accepted" is said only once the link wrote each envelope to the home node (or
        // answered it with an error): a holder killed before that fails this call, and the
        // sender, which kept the envelopes, hands them to the next holder. An envelope lost
        // with a broken connection goes back too (NOT_HOLDER: the sender tries again). One
        // the link still holds at the deadline (its connection is down and it waits to
        // reconnect) stays the holder's, as the queue of a link that is down always is.
        let deadline = started + limit;
        for (i, done) in handled {
            if let Ok(Err(_)) = tokio::time::timeout_at(deadline, done).await {
                if let Some(h) = outcomes.get_mut(i) {
                    *h = Handed::NotHolder;
                }
            }
        }
        let outcomes = outcomes
            .into_iter()
            .map(|h| {
                HANDED.with_label_values(&["in", label(h)]).inc();
                (match h {
                    Handed::Accepted => proto::Outcome::Accepted,
                    Handed::NotHolder => proto::Outcome::NotHolder,
                    Handed::Timeout => proto::Outcome::Timeout,
                    Handed::Invalid => proto::Outcome::Invalid,
                }) as i32
            })
            .collect();
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
            let d =
                crate::gateway::hub::Delivery::new(crate::gateway::Link::Sip { domain }, envelope);
            if self.hub.deliver_wait(d, limit).await == Waited::Delivered {
                accepted += 1;
                FANNED.with_label_values(&["in", "delivered"]).inc();
            } else {
                FANNED.with_label_values(&["in", "dropped"]).inc();
            }
        }
        Ok(tonic::Response::new(proto::FanoutAck { accepted }))
    }

    async fn relay(
        &self,
        request: tonic::Request<proto::SipRequest>,
    ) -> Result<tonic::Response<proto::SipAnswers>, tonic::Status> {
        let r = request.into_inner();
        let remote: SocketAddr = r
            .remote
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("remote is not ip:port"))?;
        let verified = r
            .verified
            .iter()
            .filter_map(|d| crate::config::Domain::parse(d).ok())
            .collect();
        let Some(inbox) = self.link.inner.sip.get() else {
            return Err(tonic::Status::unavailable(
                "this node's SIP edge is not running",
            ));
        };
        let req = SipRelay {
            message: r.message,
            remote,
            tls: r.tls,
            verified,
        };
        match inbox.relay(req).await {
            Some(answers) => Ok(tonic::Response::new(proto::SipAnswers {
                responses: answers.into_iter().map(|b| b.to_vec()).collect(),
            })),
            None => Err(tonic::Status::unavailable(
                "this node's SIP edge has stopped",
            )),
        }
    }
}

/// Hands home-node deliveries bound for SIP to other nodes' SIP edges (the `Fanout` call):
/// copies of state to every other live node ([`SipPeers::copy`]), and messages to the node
/// owning their IM session ([`SipPeers::hand_to_owner`]). One queue and one sender task per
/// peer, batches in order. A copy a peer cannot take after [`FANOUT_TRIES`] tries is dropped
/// and counted: it is state, and the user's next change brings that node's watchers up to
/// date. A message is never dropped: this node delivers it itself (in a new session).
#[derive(Clone)]
pub struct Fanout {
    link: PeerLink,
    cluster: super::Cluster,
    queues: Arc<DashMap<String, mpsc::Sender<Queued>>>,
}

/// One delivery waiting for a peer.
struct Queued {
    wire: proto::SipDelivery,
    /// Delivered here when the peer cannot take it (messages).
    fallback: Option<crate::gateway::hub::Delivery>,
}

/// This node's [`SipPeers`]: the peer link's hand-overs and the IM session owners.
pub struct ClusterSip {
    pub fanout: Fanout,
    pub sessions: super::sessions::Sessions,
}

impl SipPeers for ClusterSip {
    fn copy(&self, d: &crate::gateway::hub::Delivery) {
        self.fanout.send(d);
    }

    fn hand_to_owner(&self, d: &crate::gateway::hub::Delivery) -> bool {
        let (local, remote) = (d.envelope.from.bare_string(), d.envelope.to.bare_string());
        match self.sessions.owner_elsewhere(&local, &remote) {
            Some(owner) => self.fanout.hand(&owner, d),
            None => false,
        }
    }

    fn session_changed(&self, local: &str, remote: &str, owned: bool) {
        self.sessions.changed(local, remote, owned);
    }

    fn tag_mark(&self) -> String {
        crate::sip::dialog::node_mark(&self.fanout.link.inner.me)
    }

    fn dialog_owner(&self, tag: &str) -> Option<String> {
        let mark = crate::sip::dialog::mark_of_tag(tag)?;
        let me = &self.fanout.link.inner.me;
        if mark == crate::sip::dialog::node_mark(me) {
            return None;
        }
        let creator = self
            .fanout
            .cluster
            .live_members()
            .into_iter()
            .find(|m| crate::sip::dialog::node_mark(m) == mark);
        // A dialog whose creator is gone was taken over by the leader (see `takeover`).
        let owner = creator.or_else(|| self.fanout.cluster.status()?.leader)?;
        (owner != *me).then_some(owner)
    }

    fn relay(&self, owner: String, req: SipRelay) -> RelayFuture {
        let link = self.fanout.link.clone();
        Box::pin(async move { link.relay(&owner, req).await })
    }
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
        let Some(wire) = Self::wire(d) else { return };
        let me = &self.link.inner.me;
        for peer in self.cluster.live_members() {
            if &peer == me {
                continue;
            }
            let q = Queued {
                wire: wire.clone(),
                fallback: None,
            };
            if self.queue(&peer).try_send(q).is_err() {
                FANNED.with_label_values(&["out", "dropped"]).inc();
                tracing::warn!(peer = %peer, "peer link: copy of SIP-bound presence dropped (queue full)");
            }
        }
    }

    /// Queues `d` for `peer` alone; false (the caller delivers it) when its queue is full.
    pub fn hand(&self, peer: &str, d: &crate::gateway::hub::Delivery) -> bool {
        let Some(wire) = Self::wire(d) else {
            return false;
        };
        let q = Queued {
            wire,
            fallback: Some(d.clone()),
        };
        let handed = self.queue(peer).try_send(q).is_ok();
        SESSION_HANDS
            .with_label_values(&[if handed { "handed" } else { "queue_full" }])
            .inc();
        handed
    }

    fn wire(d: &crate::gateway::hub::Delivery) -> Option<proto::SipDelivery> {
        let crate::gateway::Link::Sip { domain } = &d.link else {
            return None;
        };
        Some(proto::SipDelivery {
            domain: domain.to_string(),
            envelope: Some(wire::to_wire(&d.envelope)),
        })
    }

    fn queue(&self, peer: &str) -> mpsc::Sender<Queued> {
        self.queues
            .entry(peer.to_string())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(FANOUT_QUEUE);
                tokio::spawn(fanout_task(self.link.clone(), peer.to_string(), rx));
                tx
            })
            .clone()
    }
}

async fn fanout_task(link: PeerLink, peer: String, mut rx: mpsc::Receiver<Queued>) {
    while let Some(first) = rx.recv().await {
        let mut queued = vec![first];
        while queued.len() < 64 {
            match rx.try_recv() {
                Ok(d) => queued.push(d),
                Err(_) => break,
            }
        }
        let n = queued.len() as u64;
        let mut fallbacks = Vec::new();
        let mut deliveries = Vec::with_capacity(queued.len());
        for q in queued {
            deliveries.push(q.wire);
            fallbacks.extend(q.fallback);
        }
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
        if !sent {
            // The session's owner is gone or unreachable: the messages go out from here, in a
            // new session, rather than nowhere.
            for d in fallbacks {
                SESSION_HANDS.with_label_values(&["fell_back"]).inc();
                if !link.inner.hub.deliver(d) {
                    tracing::warn!(peer = %peer, "message for an IM session another node owned: not delivered here either (SIP outbox full)");
                }
            }
        }
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
