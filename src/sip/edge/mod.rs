//! The running SIP federation edge: listeners, connection tasks, the connection table, and
//! the one task that owns the sans-IO [`core::Core`] and connects it to the gateway hub.
//!
//! Layout: `core` decides (transactions, dialogs, subscriptions, IM sessions, policy),
//! `transport` moves bytes (one task per connection, framing, keep-alives, bounds), this module
//! wires them: it binds the listeners, keeps the table of open connections (so responses and
//! in-dialog requests reuse the connection the peer opened, as Lync edges expect), opens
//! outbound connections to a domain's static route, drives the core's timers, and writes the
//! notifier subscriptions to `node.data_dir` so a restart loses none (requirements §1).
//!
//! **Peer identity.** Over TLS the peer is the federated domain its verified certificate
//! names; a TLS connection whose certificate proves no configured federated domain is closed
//! right after the handshake. Over plain TCP nothing is verified: a connection is accepted only
//! from an address of some federated domain's static `route` (others are closed at accept),
//! and a request on it only for the domain whose route that address is (the core's check).
//! Both refusals are counted (`legate_sip_connections_refused_total`, reasons
//! `unauthenticated_tls`, `not_a_static_route`).
//!
//! **Deadlines** (issue 10): the TLS handshake (`limits.handshake_timeout_secs`), the first
//! request on an inbound connection (`limits.first_request_timeout_secs`), each message from
//! its first byte (`limits.sip_message_timeout_secs`), and idle time, which only whole
//! messages reset. Admission (per listener, per IPv4 address / IPv6 /64) and the accept loop
//! come from the edge kit (`crate::net`).
//!
//! **Dialing.** A domain whose dial failed is in backoff (1 s doubling with jitter, up to
//! `limits.sip_dial_backoff_max_secs`): meanwhile requests to it fail at once (the core bounces
//! them as for a transport error) instead of each starting DNS + TCP + TLS again.
//!
//! With neither `listeners.sip_tls` (with a certificate) nor `listeners.sip_tcp` on, the edge
//! does not start and registers no outbox: SIP federation is off and the hub bounces
//! SIP-bound traffic at once.
//!
//! **State.** Both roles' subscriptions live in the state store (`crate::store`), one record
//! each under `sip/`, written when they changed (at most once a second, coalesced into one
//! fsync by the embedded store, and at shutdown) and read back at start: a foreign watcher's
//! dialog still matches its refresh after our restart, and a local user's subscription to a
//! Lync contact is refreshed in its old dialog. What restored subscriptions owe (probes,
//! pending requests, contacts' presence, the refreshes) is sent when the home node's component
//! link comes up (`Hub::link_ups`), never into a link that does not exist yet. The state file
//! of earlier versions (`sip-subscriptions.json`) is read once, moved into the store and
//! renamed `sip-subscriptions.json.migrated`.

pub mod core;
pub mod metrics;
#[cfg(test)]
mod store_tests;
pub mod transport;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use self::core::{
    Action, ConnId, Core, LocalIdentity, PeerInfo, PersistedState, Restored, StoreOp,
};
use self::transport::{ConnLimits, Input};
use crate::config::{Config, Domain, Host as CfgHost};
use crate::gateway::hub::Delivery;
use crate::gateway::{Hub, Link};
use crate::net::{self, accept_admitted, AcceptPolicy, Admission, DestinationBackoff, Slots};
use crate::sip::SipMessage;
use crate::store::{SharedStore, StoreError};

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("SIP TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot read the SIP state file {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// A running SIP edge.
pub struct SipEdge {
    tcp: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    adopt: mpsc::Sender<Adoption>,
    relay: mpsc::Sender<Relayed>,
}

/// SIP subscription records another (dead) cluster node owned, already moved to this node's
/// part of the store; the edge restores them as it restores its own at start.
pub struct Adoption {
    /// (key as the SIP core writes it, `sip/...`; the record).
    pub records: Vec<(String, Vec<u8>)>,
    /// How many were restored (the rest were expired, for a domain no longer federated, or
    /// unreadable, and are deleted at the next write).
    pub done: tokio::sync::oneshot::Sender<usize>,
}

/// A partner's in-dialog request another cluster node received for a dialog this node owns
/// (see [`crate::gateway::hub::SipPeers::relay`]), and where its answers go.
pub struct Relayed {
    pub req: crate::gateway::hub::SipRelay,
    /// The responses the core sent (provisional ones and the final one; none for an ACK).
    pub reply: tokio::sync::oneshot::Sender<Vec<Bytes>>,
}

/// Hands relayed requests to a running SIP edge.
#[derive(Clone)]
pub struct RelayInbox(mpsc::Sender<Relayed>);

impl RelayInbox {
    /// The edge's answers to `req`, or None if the edge has stopped or is not running.
    pub async fn relay(&self, req: crate::gateway::hub::SipRelay) -> Option<Vec<Bytes>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.0.send(Relayed { req, reply }).await.ok()?;
        rx.await.ok()
    }
}

/// How long a relayed request waits for the core's final answer (RFC 3261 Timer F's 32 s is
/// the most a non-INVITE transaction may take; the core answers in-dialog requests at once).
const RELAYED_ANSWER_WAIT: Duration = Duration::from_secs(32);

/// Hands adopted records to a running SIP edge (see [`Adoption`]).
#[derive(Clone)]
pub struct Adopter(mpsc::Sender<Adoption>);

impl Adopter {
    /// Restores `records` in the edge; the number restored, or None if the edge has stopped.
    pub async fn adopt(&self, records: Vec<(String, Vec<u8>)>) -> Option<usize> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.0.send(Adoption { records, done }).await.ok()?;
        rx.await.ok()
    }
}

impl SipEdge {
    /// Binds the SIP listeners of `hub`'s configuration, registers the SIP outbox with the hub
    /// and starts the tasks; they stop when `shutdown` turns true.
    pub async fn start(
        hub: Arc<Hub>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<SipEdge, EdgeError> {
        Self::start_with(hub, shutdown, None).await
    }

    /// [`SipEdge::start`] with a given DNS resolver for outbound targets (tests point one at a
    /// loopback DNS server); `None` builds one from the configuration (system DNS). The state
    /// store is the embedded one in `node.data_dir`, opened here and owned by the edge.
    pub async fn start_with(
        hub: Arc<Hub>,
        shutdown: watch::Receiver<bool>,
        resolver: Option<Arc<crate::dns::Resolver>>,
    ) -> Result<SipEdge, EdgeError> {
        let dir = hub.config().node.data_dir.clone();
        let store =
            tokio::task::spawn_blocking(move || crate::store::embedded::Embedded::open(&dir))
                .await
                .map_err(|e| crate::store::StoreError::Unavailable(e.to_string()))??;
        Self::start_with_store(hub, shutdown, resolver, Arc::new(store)).await
    }

    /// [`SipEdge::start_with`] on a given state store (the node's, shared with other parts).
    pub async fn start_with_store(
        hub: Arc<Hub>,
        shutdown: watch::Receiver<bool>,
        resolver: Option<Arc<crate::dns::Resolver>>,
        store: SharedStore,
    ) -> Result<SipEdge, EdgeError> {
        // TLS material is loaded before any port is bound (style practice 6).
        let server_tls = match hub.config().listeners.sip_tls {
            None => None,
            Some(_) => match crate::tls::ServerTls::from_config(&hub.config()) {
                Ok(s) => Some(s),
                Err(crate::tls::TlsError::NoServerCertificate) => None,
                Err(e) => return Err(e.into()),
            },
        };
        Self::start_with_tls(hub, shutdown, resolver, store, server_tls, None).await
    }

    /// [`SipEdge::start_with_store`] with the TLS material the node built: `server_tls`
    /// (`None`: no certificate configured) and `client_tls` (`None`: built here from the
    /// configuration). The node keeps clones to rotate certificates on reload.
    pub async fn start_with_tls(
        hub: Arc<Hub>,
        shutdown: watch::Receiver<bool>,
        resolver: Option<Arc<crate::dns::Resolver>>,
        store: SharedStore,
        server_tls: Option<crate::tls::ServerTls>,
        client_tls: Option<crate::tls::ClientTls>,
    ) -> Result<SipEdge, EdgeError> {
        let cfg = hub.config();
        let limits = ConnLimits {
            max_header: cfg.limits.sip_max_header_bytes,
            max_message: cfg.limits.sip_max_message_bytes,
            idle: Duration::from_secs(cfg.limits.idle_timeout_secs),
            message: Duration::from_secs(cfg.limits.sip_message_timeout_secs),
            first_request: Some(Duration::from_secs(cfg.limits.first_request_timeout_secs)),
            write: Duration::from_secs(cfg.limits.handshake_timeout_secs),
        };
        let mut tasks = Vec::new();
        let (core_tx, core_rx) = mpsc::channel::<Input>(1024);
        let ids = Arc::new(AtomicU64::new(1));
        let tls_server = match (cfg.listeners.sip_tls, server_tls) {
            (None, _) => None,
            (Some(addr), Some(s)) => Some((addr, s)),
            // The embedded development default enables the TLS listener without any
            // certificate: say so and run without it rather than refuse to start.
            (Some(addr), None) => {
                tracing::error!(%addr, "SIP TLS listener not started: no certificate configured (tls.cert/tls.key or local_domain cert/key)");
                None
            }
        };
        if tls_server.is_none() && cfg.listeners.sip_tcp.is_none() {
            // No SIP listener: SIP federation is off on this node. No outbox is registered,
            // so the hub answers SIP-bound traffic at once with "service unavailable" instead
            // of this node trying peers that could never answer it.
            tracing::info!("no SIP listener: the SIP edge is not started");
            return Ok(SipEdge {
                tcp: None,
                tls: None,
                tasks: Vec::new(),
                // Nobody restores: an adoption answers None (this node takes over none).
                adopt: mpsc::channel(1).0,
                relay: mpsc::channel(1).0,
            });
        }
        // Static routes are resolved before any SIP port is bound: the TCP listener admits
        // only their addresses (plain TCP proves nothing else about a peer).
        let route_addrs = resolve_routes(&cfg).await;
        let mut tcp = None;
        if let Some(addr) = cfg.listeners.sip_tcp {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| EdgeError::Bind {
                    what: "sip_tcp",
                    addr,
                    source,
                })?;
            let bound = l.local_addr().unwrap_or(addr);
            crate::node::announce("sip_tcp", bound);
            tcp = Some(bound);
            let bounds = Admission::new(
                cfg.limits.max_connections_per_listener,
                cfg.limits.max_connections_per_peer,
            );
            tasks.push(tokio::spawn(accept_loop(
                l,
                bounds,
                route_ips(&cfg, &route_addrs),
                limits,
                core_tx.clone(),
                ids.clone(),
                shutdown.clone(),
            )));
        }
        let mut tls = None;
        let mut server_tls = None;
        if let Some((addr, server)) = tls_server {
            if !server.requests_client_cert() {
                tracing::warn!("no tls.trust_bundle: SIP peers cannot be authenticated by certificate and every TLS request will be refused");
            }
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| EdgeError::Bind {
                    what: "sip_tls",
                    addr,
                    source,
                })?;
            let bound = l.local_addr().unwrap_or(addr);
            crate::node::announce("sip_tls", bound);
            tls = Some(bound);
            let bounds = Admission::new(
                cfg.limits.max_connections_per_listener,
                cfg.limits.max_connections_per_peer,
            );
            server_tls = Some(server.clone());
            tasks.push(tokio::spawn(accept_tls_loop(
                l,
                server,
                hub.clone(),
                bounds,
                limits,
                core_tx.clone(),
                ids.clone(),
                shutdown.clone(),
            )));
        }
        // Outbound: TLS whenever the node does TLS federation (the normal case); a TCP-only
        // node (trusted links) connects over TCP, never sending plaintext to a TLS target by
        // accident of configuration.
        let client_tls = match (
            &server_tls,
            client_tls.map_or_else(|| crate::tls::ClientTls::from_config(&cfg), Ok),
        ) {
            (Some(_), Ok(c)) => Some(c),
            (Some(_), Err(e)) => {
                tracing::warn!(error = %e, "no TLS client configuration: outbound SIP connections will fail");
                None
            }
            (None, _) => None,
        };
        let resolver = match resolver {
            Some(r) => Some(r),
            None => match crate::dns::Resolver::from_config(&cfg) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::warn!(error = %e, "DNS resolver unavailable: only static routes work");
                    None
                }
            },
        };
        let (host, port) = match (tls.or(tcp), cfg.local_domains.first()) {
            (Some(a), Some(d)) => (d.name.to_string(), a.port()),
            (None, Some(d)) => (d.name.to_string(), 5061),
            (_, None) => ("legate.invalid".to_string(), 5061),
        };
        // `node.sip_host`: this node's own name, so in-dialog requests come back to it.
        let host = match &cfg.node.sip_host {
            Some(crate::config::Host::Ip(std::net::IpAddr::V6(ip))) => format!("[{ip}]"),
            Some(h) => h.to_string(),
            None => host,
        };
        let outbound = Outbound {
            tls: client_tls,
            resolver,
            use_tls: server_tls.is_some(),
        };
        let me = LocalIdentity {
            sent_by: format!("{host}:{port}"),
            transport: if outbound.use_tls { "TLS" } else { "TCP" },
        };
        let mut core = Core::new(me, Duration::from_secs(cfg.limits.im_session_idle_secs));
        core.set_route_addrs(route_addrs);
        restore(&mut core, &hub, &store, &cfg.node.data_dir).await?;
        let outbox = hub.register_sip(cfg.limits.outbound_queue_per_domain.max(64));
        let status = Arc::new(EdgeStatus::default());
        let shown = status.clone();
        hub.add_status(
            "sip",
            Arc::new(move || {
                let n = |a: &AtomicUsize| a.load(Ordering::Relaxed);
                serde_json::json!({
                    "listeners": {
                        "tcp": tcp.map(|a| a.to_string()),
                        "tls": tls.map(|a| a.to_string()),
                    },
                    "foreign_watchers": n(&shown.foreign_watchers),
                    "local_subscriptions": n(&shown.local_subscriptions),
                    "im_sessions": n(&shown.im_sessions),
                    "connections": n(&shown.connections),
                })
            }),
        );
        let driver = Driver {
            hub,
            core,
            conns: HashMap::new(),
            infos: HashMap::new(),
            by_domain: HashMap::new(),
            pending: HashMap::new(),
            core_tx,
            ids,
            limits,
            shutdown: shutdown.clone(),
            store,
            outbound: Arc::new(outbound),
            status,
            dial_backoff: DestinationBackoff::new(
                DIAL_BACKOFF_MIN,
                Duration::from_secs(cfg.limits.sip_dial_backoff_max_secs),
                DIAL_BACKOFF_ENTRIES,
            ),
            outbound_opened: HashMap::new(),
            peers: None,
        };
        let (adopt, adopt_rx) = mpsc::channel::<Adoption>(4);
        let (relay, relay_rx) = mpsc::channel::<Relayed>(256);
        tasks.push(tokio::spawn(
            driver.run(core_rx, outbox, adopt_rx, relay_rx),
        ));
        Ok(SipEdge {
            tcp,
            tls,
            tasks,
            adopt,
            relay,
        })
    }

    /// A handle that restores records adopted from a dead cluster node.
    pub fn adopter(&self) -> Adopter {
        Adopter(self.adopt.clone())
    }

    /// A handle through which other cluster nodes hand this edge requests for its dialogs.
    pub fn relay_inbox(&self) -> RelayInbox {
        RelayInbox(self.relay.clone())
    }

    /// The bound TCP listener address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The bound TLS listener address.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// Waits (bounded) for the tasks after shutdown was signalled.
    pub async fn join(self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            for t in self.tasks {
                let _ = t.await;
            }
        })
        .await;
    }
}

/// Counts the admin `/status` document shows (section `sip`), refreshed once a second.
#[derive(Debug, Default)]
pub struct EdgeStatus {
    pub foreign_watchers: AtomicUsize,
    pub local_subscriptions: AtomicUsize,
    pub im_sessions: AtomicUsize,
    pub connections: AtomicUsize,
}

/// The state file of earlier versions under `node.data_dir` (read once, then renamed).
pub const STATE_FILE: &str = "sip-subscriptions.json";

fn load_state(path: &Path) -> Result<Option<PersistedState>, EdgeError> {
    match std::fs::read(path) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                // A damaged file must not stop the node: start without it and say so.
                tracing::error!(path = %path.display(), error = %e, "SIP state file unreadable; starting without it");
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(EdgeError::State {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Loads the SIP records of the store into the core, then migrates an old state file.
async fn restore(
    core: &mut Core,
    hub: &Hub,
    store: &SharedStore,
    data_dir: &Path,
) -> Result<(), EdgeError> {
    let (now, wall) = (Instant::now(), SystemTime::now());
    let listing = store.list(core::SIP_PREFIX).await?;
    let (mut notifiers, mut subscribers, mut batches, mut sessions, mut dropped) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    for e in &listing.entries {
        match core.restore_record(hub, &e.key, &e.value, now, wall) {
            Restored::Notifier => notifiers += 1,
            Restored::Subscriber => subscribers += 1,
            Restored::Batch => batches += 1,
            Restored::Session => sessions += 1,
            Restored::Dropped => dropped += 1,
        }
    }
    if notifiers + subscribers + batches + sessions + dropped > 0 {
        tracing::info!(
            notifiers,
            subscribers,
            batches,
            im_sessions = sessions,
            dropped,
            "SIP subscriptions and IM sessions restored from the state store"
        );
    }
    let legacy = data_dir.join(STATE_FILE);
    if let Some(state) = load_state(&legacy)? {
        let n = core.restore(hub, state, now, wall);
        let failed = apply_ops(store, core.take_store_ops(now, wall, true)).await;
        if !failed.is_empty() {
            // The file stays where it is: the next start migrates it again.
            core.store_failed(&failed);
            return Ok(());
        }
        let moved = legacy.with_extension("json.migrated");
        if let Err(e) = std::fs::rename(&legacy, &moved) {
            tracing::warn!(path = %legacy.display(), error = %e, "cannot rename the migrated SIP state file");
        }
        tracing::info!(notifiers = n, path = %legacy.display(), "SIP state file moved into the state store");
    }
    Ok(())
}

/// Records `apply_ops` has in flight at most: enough for the embedded store to take a
/// second's worth of setup (~20 000 records) in a few group commits, few enough that what is
/// in flight stays small.
const STORE_IN_FLIGHT: usize = 1024;

/// Writes `ops` to the store from this one task, `STORE_IN_FLIGHT` at a time, and returns the
/// keys not written. Concurrent, so a store that commits in groups (the embedded journal: one
/// fsync for all that is waiting) takes many in one commit. Not a task per record: while
/// 100 000 subscriptions are set up that was some 20 000 tasks and their futures alive at
/// once each second, freed a moment later, room the allocator then keeps (issue 11 item 10).
async fn apply_ops(store: &SharedStore, ops: Vec<StoreOp>) -> Vec<String> {
    type Write = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), (String, StoreError)>> + Send>,
    >;
    let write = |op: StoreOp| -> Write {
        let store = store.clone();
        Box::pin(async move {
            let (key, r) = match op {
                StoreOp::Put { key, value } => {
                    let r = store.put(&key, value).await.map(|_| ());
                    (key, r)
                }
                StoreOp::Delete { key } => {
                    let r = store.delete(&key).await.map(|_| ());
                    (key, r)
                }
            };
            r.map_err(|e| (key, e))
        })
    };
    let mut ops = ops.into_iter();
    let mut in_flight: Vec<Write> = Vec::with_capacity(STORE_IN_FLIGHT.min(ops.len()));
    let mut failed = Vec::new();
    let mut first: Option<StoreError> = None;
    loop {
        while in_flight.len() < STORE_IN_FLIGHT {
            match ops.next() {
                Some(op) => in_flight.push(write(op)),
                None => break,
            }
        }
        if in_flight.is_empty() {
            break;
        }
        // Until at least one finished: every write is polled, the finished ones dropped.
        std::future::poll_fn(|cx| {
            let before = in_flight.len();
            in_flight.retain_mut(|w| match w.as_mut().poll(cx) {
                std::task::Poll::Ready(r) => {
                    if let Err((key, e)) = r {
                        failed.push(key);
                        first.get_or_insert(e);
                    }
                    false
                }
                std::task::Poll::Pending => true,
            });
            if in_flight.len() < before {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }
    if let Some(e) = first {
        tracing::error!(failed = failed.len(), error = %e, "SIP subscriptions not written to the state store; retried later");
    }
    failed
}

/// Static routes given by name are resolved once at start for the TCP source check.
async fn resolve_routes(cfg: &Config) -> HashMap<Domain, Vec<IpAddr>> {
    let mut out = HashMap::new();
    for d in &cfg.sip.federated_domains {
        let Some(r) = &d.route else { continue };
        if let CfgHost::Name(n) = &r.host {
            let q = format!("{n}:{}", r.port);
            match tokio::time::timeout(Duration::from_secs(3), tokio::net::lookup_host(q)).await {
                Ok(Ok(addrs)) => {
                    out.insert(d.name.clone(), addrs.map(|a| a.ip()).collect());
                }
                _ => tracing::warn!(domain = %d.name, route = %r, "static route does not resolve"),
            }
        }
    }
    out
}

/// Every address a federated domain's static route names or resolved to: the only sources
/// a plain TCP connection is accepted from.
fn route_ips(cfg: &Config, resolved: &HashMap<Domain, Vec<IpAddr>>) -> Arc<HashSet<IpAddr>> {
    let mut out: HashSet<IpAddr> = resolved.values().flatten().copied().collect();
    for d in &cfg.sip.federated_domains {
        if let Some(CfgHost::Ip(ip)) = d.route.as_ref().map(|r| &r.host) {
            out.insert(*ip);
        }
    }
    Arc::new(out)
}

/// Whether `ip` is one of the route addresses (an IPv4-mapped IPv6 source is its IPv4).
fn is_route_source(routes: &HashSet<IpAddr>, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    routes.contains(&ip)
}

async fn accept_loop(
    listener: TcpListener,
    bounds: Admission,
    routes: Arc<HashSet<IpAddr>>,
    limits: ConnLimits,
    core: mpsc::Sender<Input>,
    ids: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let policy = AcceptPolicy::new("sip_tcp");
    while let Some(a) = accept_admitted(&listener, &bounds, &policy, &mut shutdown).await {
        // Plain TCP is unauthenticated: only a federated domain's static route may use it
        // (module doc). Anything else is closed here, before it costs a task or a byte read.
        if !is_route_source(&routes, a.remote.ip()) {
            net::accept::count_refusal(policy.edge, "not_a_static_route", a.remote);
            metrics::CONNS_REFUSED
                .with_label_values(&["not_a_static_route"])
                .inc();
            continue;
        }
        let info = PeerInfo {
            conn: ids.fetch_add(1, Ordering::Relaxed),
            remote: a.remote,
            tls: false,
            verified: Vec::new(),
            outbound_to: None,
        };
        tokio::spawn(transport::run_connection(
            a.stream,
            info,
            "tcp_in",
            core.clone(),
            limits,
            shutdown.clone(),
            a.slots,
        ));
    }
}

#[allow(clippy::too_many_arguments)]
async fn accept_tls_loop(
    listener: TcpListener,
    server: crate::tls::ServerTls,
    hub: Arc<Hub>,
    bounds: Admission,
    limits: ConnLimits,
    core: mpsc::Sender<Input>,
    ids: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let policy = AcceptPolicy::new("sip_tls");
    while let Some(a) = accept_admitted(&listener, &bounds, &policy, &mut shutdown).await {
        let (stream, remote, slots) = (a.stream, a.remote, a.slots);
        let server = server.clone();
        let core = core.clone();
        let shutdown = shutdown.clone();
        let conn = ids.fetch_add(1, Ordering::Relaxed);
        let hub = hub.clone();
        // The handshake runs in the connection's own task, bounded by handshake_timeout_secs,
        // so a slow peer never holds up the accept loop.
        tokio::spawn(async move {
            let timeout = Duration::from_secs(hub.config().limits.handshake_timeout_secs);
            let tls = match server.accept(stream, timeout).await {
                Ok(t) => t,
                Err(e) => {
                    metrics::TLS_FAILURES
                        .with_label_values(&[e.failure.label()])
                        .inc();
                    e.log(remote);
                    return;
                }
            };
            let verified = verified_domains(&hub.config(), tls.get_ref().1, remote);
            if verified.is_empty() {
                // No configured federated domain is proven by the certificate: nothing this
                // peer sends could be accepted, so the connection is closed now instead of
                // holding a slot until the idle timeout (counted in verified_domains).
                metrics::CONNS_REFUSED
                    .with_label_values(&["unauthenticated_tls"])
                    .inc();
                let mut tls = tls;
                let _ = tokio::time::timeout(
                    limits.write,
                    tokio::io::AsyncWriteExt::shutdown(&mut tls),
                )
                .await;
                return;
            }
            let info = PeerInfo {
                conn,
                remote,
                tls: true,
                verified,
                outbound_to: None,
            };
            transport::run_connection(tls, info, "tls_in", core, limits, shutdown, slots).await;
        });
    }
}

/// The configured SIP federated domains the peer's verified certificate speaks for, each
/// with its own clientAuth-EKU tolerance (`tls::check_peer`).
fn verified_domains(cfg: &Config, conn: &rustls::CommonState, remote: SocketAddr) -> Vec<Domain> {
    let cert = match crate::tls::peer_identity(conn) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(peer = %remote, error = %e, "peer certificate unreadable");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    let mut last_denial = None;
    for d in &cfg.sip.federated_domains {
        match crate::tls::check_peer(cert.as_ref(), &d.name, d.tolerate_no_client_auth_eku) {
            Ok(p) => {
                if p.eku_tolerated {
                    tracing::info!(peer = %remote, domain = %d.name, "certificate without clientAuth accepted by policy");
                }
                out.push(d.name.clone());
            }
            Err(e) => last_denial = Some(e),
        }
    }
    if out.is_empty() {
        let reason = last_denial
            .as_ref()
            .map_or("no_federated_domain", |e| e.label());
        metrics::REFUSED.with_label_values(&[reason]).inc();
        tracing::info!(peer = %remote, reason, "TLS peer speaks for no federated domain");
    }
    out
}

struct ConnEntry {
    tx: transport::OutTx,
    /// Shared with the connection task: set once the core accepted a request on it.
    authenticated: Arc<std::sync::atomic::AtomicBool>,
}

struct Driver {
    hub: Arc<Hub>,
    core: Core,
    conns: HashMap<ConnId, ConnEntry>,
    infos: HashMap<ConnId, PeerInfo>,
    by_domain: HashMap<Domain, Vec<ConnId>>,
    /// Bytes waiting for an outbound connection to a domain (present = connecting).
    pending: HashMap<Domain, Vec<Bytes>>,
    core_tx: mpsc::Sender<Input>,
    ids: Arc<AtomicU64>,
    limits: ConnLimits,
    shutdown: watch::Receiver<bool>,
    store: SharedStore,
    outbound: Arc<Outbound>,
    status: Arc<EdgeStatus>,
    /// Domains whose last dials failed: while one is blocked, requests to it fail at once
    /// (the core bounces them) instead of each starting DNS + TCP + TLS again.
    dial_backoff: DestinationBackoff<Domain>,
    /// Outbound connections and when they opened (for the backoff's "stable" reset).
    outbound_opened: HashMap<ConnId, (Domain, Instant)>,
    /// In a cluster, the other nodes' SIP edges.
    peers: Option<Arc<dyn crate::gateway::hub::SipPeers>>,
}

/// How the driver reaches a domain: DNS targets (or the static route) and TLS.
struct Outbound {
    tls: Option<crate::tls::ClientTls>,
    resolver: Option<Arc<crate::dns::Resolver>>,
    use_tls: bool,
}

/// How often the driver has the core compare every subscription with the store (a safety net
/// for a change noted only by the `dirty` flag; the per-second pass sees touched ones only).
const FULL_SCAN_EVERY: Duration = Duration::from_secs(60);

/// Envelopes owed after a link came up that are sent per driver turn (the link's queue must
/// not overflow with a large restored table).
const LINK_UP_SLICE: usize = 256;

/// Most connection inputs the driver handles before flushing the core's actions.
const INPUT_BATCH: usize = 32;

/// Most MESSAGE answers (links telling they wrote) the driver takes before flushing.
const HANDOVER_BATCH: usize = 256;

/// Most deliveries from the home side (presence, consent, messages) the driver handles before
/// flushing: a storm's NOTIFYs then leave in batches (issue 11 item 10).
const DELIVERY_BATCH: usize = 32;

/// Waits until `c` has room again or `limit_secs` passed (then the core's next submit to it
/// may be refused with 480, which is an answer, not a loss).
async fn relieved(c: Option<&crate::gateway::hub::Congestion>, limit_secs: u64) {
    match c {
        Some(c) => c.relieved(Duration::from_secs(limit_secs)).await,
        None => std::future::pending().await,
    }
}
/// First delay after a failed dial to a domain (then doubling, with jitter, up to
/// `limits.sip_dial_backoff_max_secs`).
const DIAL_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// An outbound connection up this long resets its domain's dial backoff; one that drops
/// sooner leaves the delay growing.
const DIAL_STABLE: Duration = Duration::from_secs(30);
/// Domains whose dial failures are remembered at once (bounds the table; see
/// `DestinationBackoff`).
const DIAL_BACKOFF_ENTRIES: usize = 10_000;

impl Driver {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut outbox: mpsc::Receiver<Delivery>,
        mut adoptions: mpsc::Receiver<Adoption>,
        mut relayed: mpsc::Receiver<Relayed>,
    ) {
        self.peers = self.hub.sip_peers().cloned();
        self.core.publish_sessions(self.peers.is_some());
        // Sessions restored before the cluster hook was known: their owner is this node.
        self.core.announce_sessions();
        self.core
            .set_tag_mark(self.peers.as_ref().map(|p| p.tag_mark()));
        let mut persist = tokio::time::interval(Duration::from_secs(1));
        persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();
        // The store write in flight (one batch at a time, so changes to a key never reorder);
        // it returns the keys it could not write.
        let mut writing: Option<tokio::task::JoinHandle<Vec<String>>> = None;
        let mut last_full = Instant::now();
        // Component links that came up: what restored subscriptions owe the home side is sent
        // then (a link already up before this task started counts too).
        let mut link_ups = self.hub.link_ups();
        let mut seen_ups: HashMap<Domain, u64> = HashMap::new();
        self.on_link_ups(&link_ups.borrow_and_update(), &mut seen_ups);
        // A home node's outbox is nearly full: the core submits without waiting, so instead of
        // letting it answer 480 the driver stops taking requests from the connections until
        // there is room (their readers then block and TCP slows the partners). Deliveries to
        // SIP keep flowing meanwhile: the component links may be waiting on them.
        let mut congested: Option<crate::gateway::hub::Congestion> = None;
        // MESSAGEs are answered once the home node's link wrote them (see `core::Handover`).
        let mut handovers = self.core.handover_channel();
        loop {
            let deadline = self
                .core
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                input = rx.recv(), if congested.is_none() => match input {
                    Some(i) => {
                        self.on_input(i);
                        // What else is already waiting is handled before the actions are
                        // flushed: the answers then reach each connection task together (one
                        // wake-up, one coalesced write) and the stanzas reach the component link
                        // in a burst it writes at once. Bounded, and it stops at congestion.
                        for _ in 1..INPUT_BATCH {
                            if self.hub.congestion().is_some() {
                                break;
                            }
                            match rx.try_recv() {
                                Ok(i) => self.on_input(i),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                _ = relieved(congested.as_ref(), self.hub.config().limits.delivery_timeout_secs), if congested.is_some() => {
                    congested = None;
                }
                d = outbox.recv() => match d {
                    Some(first) => {
                        // A presence storm arrives as one delivery per watcher: what is already
                        // queued is handled in the same turn, so the turn's fixed cost (timer,
                        // select, flush) is paid once per batch and each connection gets the
                        // batch's NOTIFYs in one wake-up and one coalesced write. Bounded, like
                        // the inputs, so connections and timers wait at most one batch.
                        let mut next = Some(first);
                        let mut n = 0;
                        while let Some(d) = next.take() {
                            if let Delivery { link: Link::Sip { domain }, envelope, .. } = d {
                                self.core.handle_delivery(&*self.hub, &domain, envelope, Instant::now());
                            }
                            n += 1;
                            if n < DELIVERY_BATCH {
                                next = outbox.try_recv().ok();
                            }
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.core.handle_timeout(&*self.hub, Instant::now());
                }
                Ok(()) = link_ups.changed() => {
                    let ups = link_ups.borrow_and_update().clone();
                    self.on_link_ups(&ups, &mut seen_ups);
                }
                Some((token, written)) = handovers.recv() => {
                    // Links tell in bursts (a write covers many MESSAGEs): the answers are
                    // taken together, so each connection gets them in one write.
                    let now = Instant::now();
                    let mut told = Some((token, written));
                    let mut n = 0;
                    while let Some((token, written)) = told.take() {
                        let outcome = if written {
                            core::Handover::Written
                        } else {
                            core::Handover::Lost
                        };
                        self.core.handle_handover(token, outcome, now);
                        n += 1;
                        if n < HANDOVER_BATCH {
                            told = handovers.try_recv().ok();
                        }
                    }
                }
                Some(r) = relayed.recv() => self.on_relayed(r),
                Some(a) = adoptions.recv() => {
                    let (now, wall) = (Instant::now(), SystemTime::now());
                    let mut restored = 0usize;
                    for (key, value) in &a.records {
                        if !matches!(
                            self.core.restore_record(&*self.hub, key, value, now, wall),
                            Restored::Dropped
                        ) {
                            restored += 1;
                        }
                    }
                    // The home links are up already: what the adopted subscriptions owe the
                    // home side (probes, pending requests) is sent now.
                    for domain in seen_ups.keys() {
                        self.core.handle_link_up(domain, now);
                    }
                    tracing::info!(records = a.records.len(), restored, "SIP subscriptions of a dead cluster node taken over");
                    let _ = a.done.send(restored);
                }
                // A slice at a time, and only while the home links have room.
                _ = tokio::task::yield_now(), if congested.is_none() && self.core.has_link_up_work() => {
                    self.core.pump_link_up(&*self.hub, LINK_UP_SLICE);
                }
                // Touched notifiers a pass left for later (`Core::take_store_ops_upto`): the
                // next chunk as soon as the previous one is written (awaited here, so the
                // backlog drains while the node is otherwise idle too).
                failed = async {
                    match writing.as_mut() {
                        Some(h) => h.await.ok(),
                        None => None,
                    }
                }, if self.core.has_store_backlog() => {
                    // The finished handle (never polled again) is replaced below.
                    if let Some(failed) = failed {
                        self.core.store_failed(&failed);
                    }
                    let ops = self.core.take_store_backlog(
                        Instant::now(),
                        SystemTime::now(),
                        STORE_IN_FLIGHT,
                    );
                    writing = self.write(ops);
                }
                _ = persist.tick() => {
                    self.core.update_gauges();
                    let (n, s, x) = self.core.counts();
                    self.status.foreign_watchers.store(n, Ordering::Relaxed);
                    self.status.local_subscriptions.store(s, Ordering::Relaxed);
                    self.status.im_sessions.store(x, Ordering::Relaxed);
                    self.status.connections.store(self.conns.len(), Ordering::Relaxed);
                    // Changed records, at most once a second; the previous batch first.
                    if writing.as_ref().is_none_or(|h| h.is_finished()) {
                        if let Some(h) = writing.take() {
                            if let Ok(failed) = h.await {
                                self.core.store_failed(&failed);
                            }
                        }
                        let full = last_full.elapsed() >= FULL_SCAN_EVERY;
                        if full {
                            last_full = Instant::now();
                        }
                        writing = self.persist(full);
                    }
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
            }
            self.flush_actions();
            if congested.is_none() {
                congested = self.hub.congestion();
                if congested.is_some() {
                    metrics::BACKPRESSURE_PAUSES
                        .with_label_values(&["component"])
                        .inc();
                }
            }
        }
        if let Some(h) = writing.take() {
            if let Ok(failed) = h.await {
                self.core.store_failed(&failed);
            }
        }
        // Everything, backlog included, before the task ends.
        let ops = self
            .core
            .take_store_ops(Instant::now(), SystemTime::now(), true);
        if let Some(h) = self.write(ops) {
            let _ = h.await;
        }
    }

    /// Hands the records that changed to a task that writes them to the store (`full`: compare
    /// every subscription, see `Core::take_store_ops`).
    /// A pass encodes at most `STORE_IN_FLIGHT` touched notifiers (one group commit's worth);
    /// the loop hands the rest to the store a chunk at a time (`take_store_backlog`).
    fn persist(&mut self, full: bool) -> Option<tokio::task::JoinHandle<Vec<String>>> {
        let ops =
            self.core
                .take_store_ops_upto(Instant::now(), SystemTime::now(), full, STORE_IN_FLIGHT);
        self.write(ops)
    }

    /// Hands `ops` to a task that writes them to the store.
    fn write(&mut self, ops: Vec<StoreOp>) -> Option<tokio::task::JoinHandle<Vec<String>>> {
        if ops.is_empty() {
            return None;
        }
        let store = self.store.clone();
        Some(tokio::spawn(async move { apply_ops(&store, ops).await }))
    }

    /// Tells the core about every foreign domain whose link came up since the last look.
    fn on_link_ups(&mut self, ups: &HashMap<Domain, u64>, seen: &mut HashMap<Domain, u64>) {
        for (domain, n) in ups {
            if seen.get(domain) != Some(n) {
                seen.insert(domain.clone(), *n);
                tracing::debug!(domain = %domain, "component link up: restored subscriptions catch up");
                self.core.handle_link_up(domain, Instant::now());
            }
        }
    }

    fn on_input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Opened {
                info,
                tx,
                authenticated,
            } => {
                let conn = info.conn;
                self.conns.insert(conn, ConnEntry { tx, authenticated });
                for d in info.verified.clone() {
                    self.bind(conn, d);
                }
                if let Some(d) = info.outbound_to.clone() {
                    // The backoff is reset only once this connection proved stable (on close).
                    self.outbound_opened.insert(conn, (d.clone(), now));
                    self.hub.alarms().partner_connected(d.as_str());
                    self.bind(conn, d.clone());
                    if let Some(q) = self.pending.remove(&d) {
                        for b in q {
                            self.send_on(conn, b);
                        }
                    }
                }
                self.infos.insert(conn, info);
            }
            Input::Message { conn, msg } => {
                if let Some(owner) = self.dialog_elsewhere(&msg) {
                    return self.relay(conn, owner, *msg);
                }
                // Borrowed, not cloned: this runs once per message.
                let Some(info) = self.infos.get(&conn) else {
                    return;
                };
                self.core.handle_message(&*self.hub, info, *msg, now);
            }
            Input::Unrelayed { conn, msg } => {
                let Some(info) = self.infos.get(&conn) else {
                    return;
                };
                self.core.handle_message(&*self.hub, info, *msg, now);
            }

            Input::Closed { conn } => {
                if let Some((d, since)) = self.outbound_opened.remove(&conn) {
                    self.dial_backoff.connection_lasted(
                        &d,
                        now.saturating_duration_since(since),
                        DIAL_STABLE,
                    );
                }
                self.core.handle_conn_closed(conn);
                self.conns.remove(&conn);
                self.infos.remove(&conn);
                for v in self.by_domain.values_mut() {
                    v.retain(|c| *c != conn);
                }
            }
            Input::ConnectFailed { domain } => {
                self.pending.remove(&domain);
                let delay = self
                    .dial_backoff
                    .failed(&domain, now, rand::random::<f64>());
                metrics::DIALS.with_label_values(&["failed"]).inc();
                self.hub.alarms().partner_failed(
                    domain.as_str(),
                    false,
                    "outbound SIP connection failed (TCP or TLS)",
                );
                tracing::info!(domain = %domain, ?delay, "dial failed; domain in backoff");
                self.core.handle_transport_error(&*self.hub, &domain, now);
            }
        }
    }

    fn bind(&mut self, conn: ConnId, domain: Domain) {
        let v = self.by_domain.entry(domain).or_default();
        if !v.contains(&conn) {
            v.push(conn);
        }
    }

    /// Queues `bytes` on `conn`. A full queue (`transport::OUT_QUEUE_BYTES` unwritten) means the
    /// peer stopped reading: the connection is given up (dropping its sender makes its task close it) rather than silently losing
    /// what it was sent, and the caller falls back to another connection where it can.
    fn send_on(&mut self, conn: ConnId, bytes: Bytes) -> bool {
        let full = match self.conns.get(&conn) {
            Some(c) => match c.tx.try_send(bytes) {
                Ok(()) => return true,
                Err(transport::OutRefused::Full) => true,
                Err(transport::OutRefused::Closed) => false,
            },
            None => return false,
        };
        if full {
            metrics::CONNS_REFUSED
                .with_label_values(&["queue_full"])
                .inc();
            tracing::warn!(conn, "peer is not reading its answers: connection closed");
            self.conns.remove(&conn);
        }
        false
    }

    fn flush_actions(&mut self) {
        while let Some(a) = self.core.poll_action() {
            match a {
                Action::Bind { conn, domain } => {
                    // The core binds a connection only for a request that passed its peer
                    // screen: that is the connection's first authenticated request.
                    if let Some(c) = self.conns.get(&conn) {
                        c.authenticated.store(true, Ordering::Relaxed);
                    }
                    if self.conns.contains_key(&conn) {
                        self.bind(conn, domain);
                    }
                }
                Action::Send {
                    conn,
                    domain,
                    bytes,
                } => {
                    if let Some(c) = conn {
                        if self.send_on(c, bytes.clone()) {
                            continue;
                        }
                    }
                    let Some(d) = domain else {
                        tracing::debug!("response for a closed connection dropped");
                        continue;
                    };
                    let live = self
                        .by_domain
                        .get(&d)
                        .and_then(|v| v.iter().rev().find(|c| self.conns.contains_key(c)).copied());
                    if let Some(c) = live {
                        if self.send_on(c, bytes.clone()) {
                            continue;
                        }
                    }
                    self.connect(d, bytes);
                }
                Action::SessionOwner {
                    local,
                    remote,
                    owned,
                } => {
                    if let Some(p) = self.hub.sip_peers() {
                        p.session_changed(&local, &remote, owned);
                    }
                }
            }
        }
    }

    /// In a cluster: the node owning the dialog of a partner's in-dialog request, when that is
    /// another node (told by the mark on our local tag, its To tag; RFC 3261 §12.2.2).
    fn dialog_elsewhere(&self, msg: &SipMessage) -> Option<String> {
        let peers = self.peers.as_ref()?;
        if !msg.is_request() || msg.method() == Some("CANCEL") {
            return None;
        }
        let to = msg.to().ok()?;
        peers.dialog_owner(to.tag()?)
    }

    /// Hands `msg` to `owner` and writes its answers on `conn`; if it cannot be handed, the
    /// request is answered here (an unknown dialog: 481, so the partner starts over).
    fn relay(&self, conn: ConnId, owner: String, msg: SipMessage) {
        let (Some(peers), Some(info), Some(c)) = (
            self.peers.clone(),
            self.infos.get(&conn),
            self.conns.get(&conn),
        ) else {
            return;
        };
        let req = crate::gateway::hub::SipRelay {
            message: msg.to_bytes().to_vec(),
            remote: info.remote,
            tls: info.tls,
            verified: info.verified.clone(),
        };
        let (tx, core_tx) = (c.tx.clone(), self.core_tx.clone());
        metrics::RELAYED.with_label_values(&["out"]).inc();
        tokio::spawn(async move {
            match peers.relay(owner.clone(), req).await {
                Ok(answers) => {
                    for a in answers {
                        if tx.try_send(Bytes::from(a)).is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    metrics::RELAYED.with_label_values(&["failed"]).inc();
                    tracing::info!(owner = %owner, error = %e, "in-dialog request not handed to the node owning its dialog; answered here");
                    let _ = core_tx
                        .send(Input::Unrelayed {
                            conn,
                            msg: Box::new(msg),
                        })
                        .await;
                }
            }
        });
    }

    /// A request another node handed over: the core handles it on a connection of its own
    /// whose answers go back to that node, then the connection is forgotten.
    fn on_relayed(&mut self, r: Relayed) {
        let Relayed { req, reply } = r;
        let msg = match crate::sip::parse::parse_exact(Bytes::from(req.message)) {
            Ok(m) if m.is_request() => m,
            _ => {
                metrics::RELAYED.with_label_values(&["invalid"]).inc();
                let _ = reply.send(Vec::new());
                return;
            }
        };
        metrics::RELAYED.with_label_values(&["in"]).inc();
        let conn = self.ids.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = transport::out_queue();
        self.conns.insert(
            conn,
            ConnEntry {
                tx,
                authenticated: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            },
        );
        self.infos.insert(
            conn,
            PeerInfo {
                conn,
                remote: req.remote,
                tls: req.tls,
                verified: req.verified,
                outbound_to: None,
            },
        );
        let ack = msg.method() == Some("ACK");
        let core_tx = self.core_tx.clone();
        tokio::spawn(async move {
            let mut answers = Vec::new();
            if !ack {
                let _ = tokio::time::timeout(RELAYED_ANSWER_WAIT, async {
                    while let Some(b) = rx.recv().await {
                        let is_final = b
                            .get(..12)
                            .and_then(|l| std::str::from_utf8(l.get(8..11)?).ok())
                            .and_then(|c| c.parse::<u16>().ok())
                            .is_some_and(|c| c >= 200);
                        answers.push(b);
                        if is_final {
                            break;
                        }
                    }
                })
                .await;
            }
            let _ = reply.send(answers);
            let _ = core_tx.send(Input::Closed { conn }).await;
        });
        if let Some(info) = self.infos.get(&conn) {
            self.core
                .handle_message(&*self.hub, info, msg, Instant::now());
        }
    }

    /// Queues `bytes` for `domain` and opens a connection to it if none is being opened: the
    /// static route, else `_sipfederationtls._tcp` / RFC 3263 targets from `dns.rs`, tried in
    /// order until one connects (and, over TLS, presents a certificate for the domain).
    fn connect(&mut self, domain: Domain, bytes: Bytes) {
        if let Some(q) = self.pending.get_mut(&domain) {
            if q.len() < self.hub.config().limits.outbound_queue_per_domain {
                q.push(bytes);
            } else {
                // Not a silent loss: the request's client transaction is still running and
                // ends at Timer F (RFC 3261 §17.1.2.2), which bounces to the home side; counted
                // so an admin sees a domain whose connection takes too long to open.
                metrics::refused("dial_queue_full");
                tracing::warn!(domain = %domain, "queue toward a domain being dialled is full");
            }
            return;
        }
        let now = Instant::now();
        if let Err(until) = self.dial_backoff.check(&domain, now) {
            // Fail fast: the core's transactions toward the domain end with a transport
            // error, which it maps to the home side's bounce (RFC 3261 §8.1.3.1 treats a
            // transport failure as a 503 from the next hop).
            metrics::DIALS.with_label_values(&["blocked"]).inc();
            tracing::debug!(domain = %domain, wait = ?until.saturating_duration_since(now), "domain in dial backoff; not dialing");
            self.core.handle_transport_error(&*self.hub, &domain, now);
            return;
        }
        self.pending.insert(domain.clone(), vec![bytes]);
        let cfg = self.hub.config();
        let route = cfg.sip_federated(&domain).and_then(|f| f.route.clone());
        let local = cfg.local_domains.first().map(|d| d.name.clone());
        let core = self.core_tx.clone();
        let ids = self.ids.clone();
        let limits = self.limits.outbound();
        let shutdown = self.shutdown.clone();
        let timeout = Duration::from_secs(cfg.limits.handshake_timeout_secs);
        let out = self.outbound.clone();
        tokio::spawn(async move {
            let targets: Vec<(SocketAddr, bool)> = match (&out.resolver, &route) {
                (Some(r), _) => match r.sip_targets(&domain, route.as_ref()).await {
                    Ok(t) => t
                        .into_iter()
                        .map(|t| (t.addr, t.transport == crate::dns::Transport::Tls))
                        .collect(),
                    Err(e) => {
                        tracing::warn!(domain = %domain, error = %e, "no SIP target");
                        Vec::new()
                    }
                },
                (None, Some(r)) => {
                    let q = r.to_string();
                    match tokio::time::timeout(timeout, tokio::net::lookup_host(q)).await {
                        Ok(Ok(a)) => a.map(|a| (a, true)).collect(),
                        Ok(Err(e)) => {
                            tracing::warn!(domain = %domain, error = %e, "cannot resolve route");
                            Vec::new()
                        }
                        Err(_) => {
                            tracing::warn!(domain = %domain, "route lookup timed out");
                            Vec::new()
                        }
                    }
                }
                (None, None) => Vec::new(),
            };
            for (addr, tls_target) in targets {
                let stream = match crate::net::connect_bounded(addr, timeout).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(domain = %domain, error = %e, "cannot connect; trying the next target");
                        continue;
                    }
                };
                let mut info = PeerInfo {
                    conn: ids.fetch_add(1, Ordering::Relaxed),
                    remote: addr,
                    tls: false,
                    verified: Vec::new(),
                    outbound_to: Some(domain.clone()),
                };
                let no_slots = Slots::none;
                if !out.use_tls {
                    transport::run_connection(
                        stream,
                        info,
                        "tcp_out",
                        core,
                        limits,
                        shutdown,
                        no_slots(),
                    )
                    .await;
                    return;
                }
                let Some(client) = &out.tls else {
                    tracing::warn!(domain = %domain, "no TLS client configuration");
                    continue;
                };
                if !tls_target {
                    // Never plain TCP from a TLS node (requirements §7: no plaintext fallback).
                    tracing::info!(domain = %domain, %addr, "TCP-only target skipped");
                    continue;
                }
                // The server certificate is verified against the *domain* (RFC 5922 §7.3),
                // not the target host.
                match client
                    .connect(stream, local.as_ref(), &domain, timeout)
                    .await
                {
                    Ok(s) => {
                        info.tls = true;
                        info.verified = vec![domain.clone()];
                        transport::run_connection(
                            s,
                            info,
                            "tls_out",
                            core,
                            limits,
                            shutdown,
                            no_slots(),
                        )
                        .await;
                        return;
                    }
                    Err(e) => {
                        metrics::TLS_FAILURES
                            .with_label_values(&[e.failure.label()])
                            .inc();
                        e.log(addr);
                    }
                }
            }
            let _ = core.send(Input::ConnectFailed { domain }).await;
        });
    }
}
