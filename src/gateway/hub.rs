//! The running switchboard. Each link (a component connection per (home node, foreign
//! domain), each running s2s pair and the s2s manager, the SIP edge) registers a bounded
//! outbox; any link calls `submit` or `submit_wait` with what it received. Routing uses a
//! snapshot of the configuration and mapping set.
//!
//! **Backpressure, not loss.** A reader that relays what a peer sent (an s2s stream, a
//! component link) calls [`Hub::submit_wait`]: when the destination outbox is full it waits for
//! room, up to `limits.delivery_timeout_secs`, and meanwhile reads nothing more, so TCP flow
//! control slows the sender. Only a destination that stays full (a link down or stuck past the
//! deadline) makes the stanza bounce, with `remote-server-timeout`. [`Hub::submit`] never waits:
//! it is for traffic Legate generates itself (bounces, timers, the SIP core, which answers from
//! the outcome) and reports a full outbox as `Unavailable`; the SIP driver keeps its core out of
//! that case by pausing its readers while a component outbox is [`congested`](Hub::congestion).
//!
//! A task that drains an outbox must never wait on another outbox (it may `submit`, never
//! `submit_wait`): waits then always point from readers to writers and cannot form a cycle.

use super::envelope::{Body, Envelope, ErrorCondition, Subscription};
use super::policy::Policies;
use super::router::{self, Denied, Directory, Link, Origin, Route};
use crate::config::{Config, Domain};
use crate::metrics;
use crate::presence::map::MappingStore;
use arc_swap::ArcSwap;
use dashmap::DashMap;
use prometheus::IntCounterVec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// What a link's outbox receives: the envelope and, for multi-domain links, which domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub link: Link,
    pub envelope: Envelope,
    /// Told when the link is done with the envelope (see [`Handled`]).
    pub handled: Handled,
}

impl Delivery {
    pub fn new(link: Link, envelope: Envelope) -> Self {
        Delivery {
            link,
            envelope,
            handled: Handled::default(),
        }
    }
}

/// Told once a link is done with a delivery: written to its stream, or answered with an error
/// the sender sees. Dropped untold when it was lost with a broken connection. The peer link
/// waits for it before telling the node that handed the envelope over that it is taken
/// (issue 12: nothing accepted is lost when the holder is killed): until then that node keeps
/// it, and hands it to the next holder when this one dies. Only component links tell; every
/// other outbox drops it, which the peer link never asks of them.
#[derive(Clone, Default)]
pub struct Handled(Option<Arc<Tell>>);

/// Whom a [`Handled`] tells, once.
enum Tell {
    /// A waiter on a oneshot: `Ok` when done, `Err` when every copy was dropped untold.
    Once(std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>),
    /// A channel many deliveries share (the SIP edge's, one token per MESSAGE): `(token, true)`
    /// when done, `(token, false)` when every copy was dropped untold. Cheaper than a oneshot
    /// and a task per delivery, and the receiver takes the answers in batches.
    Channel {
        tx: tokio::sync::mpsc::UnboundedSender<(u64, bool)>,
        token: u64,
        told: std::sync::atomic::AtomicBool,
    },
}

impl Drop for Tell {
    fn drop(&mut self) {
        if let Tell::Channel { tx, token, told } = self {
            if !told.load(std::sync::atomic::Ordering::Acquire) {
                let _ = tx.send((*token, false));
            }
        }
    }
}

impl Handled {
    /// One to put into a delivery, and what the waiter awaits: `Ok` when done, `Err` when lost.
    pub fn pair() -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tell = Tell::Once(std::sync::Mutex::new(Some(tx)));
        (Handled(Some(Arc::new(tell))), rx)
    }

    /// One that sends `(token, true)` on `tx` when done, `(token, false)` when lost.
    pub fn channel(tx: tokio::sync::mpsc::UnboundedSender<(u64, bool)>, token: u64) -> Self {
        let told = std::sync::atomic::AtomicBool::new(false);
        Handled(Some(Arc::new(Tell::Channel { tx, token, told })))
    }

    /// Nobody will wait on it (the submitter answers at once): dropping it then tells nothing,
    /// where a dropped `Handled` otherwise says "lost".
    pub fn discard(&self) {
        if let Some(Tell::Channel { told, .. }) = self.0.as_deref() {
            told.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    pub fn done(&self) {
        let Some(tell) = &self.0 else { return };
        match &**tell {
            Tell::Once(slot) => {
                let taken = slot.lock().map(|mut s| s.take()).unwrap_or_default();
                if let Some(tx) = taken {
                    // The waiter may have given up (its own deadline): nothing to tell then.
                    let _ = tx.send(());
                }
            }
            Tell::Channel { tx, token, told } => {
                if !told.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    let _ = tx.send((*token, true));
                }
            }
        }
    }
}

impl std::fmt::Debug for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Handled(awaited)"
        } else {
            "Handled"
        })
    }
}

/// Not part of what a delivery is: two deliveries of the same envelope are the same delivery.
impl PartialEq for Handled {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Handled {}

/// Outboxes: one per component connection, i.e. per (home node, foreign domain) — a stalled
/// component never holds up another — and one each for the s2s and SIP edges.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum OutboxKey {
    /// (home node, the foreign domain the component is named after); `None` takes every
    /// domain of the home node that has no outbox of its own (a test's stand-in home node).
    Component(Arc<str>, Option<Domain>),
    /// The stream of one (local domain, remote domain) pair, registered by the s2s edge while
    /// the pair's task runs, so a slow foreign server holds up only the readers feeding it.
    S2sPair(Domain, Domain),
    /// Everything s2s that has no pair outbox (the s2s manager starts the pair).
    S2s,
    Sip,
    /// The intercluster forwarder of one peer cluster (issue 13 §3).
    Intercluster(Arc<str>),
}

impl OutboxKey {
    /// A component delivery goes to the connection named after the envelope's *sender*
    /// domain: a component may only send from its own domain (XEP-0114).
    fn of(d: &Delivery) -> Self {
        match &d.link {
            Link::Component { home_node } => {
                OutboxKey::Component(home_node.clone(), Some(d.envelope.from.domain.clone()))
            }
            Link::S2s { domain } => {
                OutboxKey::S2sPair(d.envelope.from.domain.clone(), domain.clone())
            }
            Link::Sip { .. } => OutboxKey::Sip,
            Link::Intercluster { cluster } => OutboxKey::Intercluster(cluster.clone()),
        }
    }
}

/// What became of a delivery handed over without waiting.
enum Handed {
    Sent,
    /// The outbox is full: its sender, to wait on, and the delivery back.
    Full(mpsc::Sender<Delivery>, Delivery),
    /// No live outbox for it.
    Gone(Delivery),
}

/// A component outbox that is nearly full; see [`Hub::congestion`].
#[derive(Debug, Clone)]
pub struct Congestion(mpsc::Sender<Delivery>);

impl Congestion {
    /// Waits until the outbox is at most half full again, or `limit` passed.
    pub async fn relieved(&self, limit: Duration) {
        let half = (self.0.max_capacity() / 2).max(1);
        // The permits are returned at once: this only waits for room, it takes none.
        let _ = tokio::time::timeout(limit, self.0.reserve_many(half)).await;
    }
}

static WAITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        "legate_backpressure_waits_total",
        "Submissions that found their destination outbox full and waited for room, by \
         destination link and outcome (delivered after the wait, or timeout)",
        &["destination", "outcome"],
    )
});

static ROUTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        "legate_envelopes_total",
        "Envelopes submitted to the core, by origin link, destination link, kind and outcome",
        &["origin", "destination", "kind", "outcome"],
    )
});

static DENIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        "legate_denied_total",
        "Envelopes refused by routing or policy, by reason",
        &["reason"],
    )
});

/// Outcome of one `submit`, for callers that answer synchronously (SIP requests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Delivered(Link),
    Denied(Denied),
    /// The destination link is not registered, its queue is full (`submit`), or it stayed
    /// full past `limits.delivery_timeout_secs` (`submit_wait`).
    Unavailable(Link),
}

/// A function an edge registers to show its state in the admin `/status` document.
pub type StatusProvider = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Opens the component links of a foreign domain on every home node (registering their
/// outboxes before it returns); `false` when it may not (bound reached). Registered by the
/// component-link edge in open federation.
pub type ComponentOpener = Arc<dyn Fn(&Domain) -> bool + Send + Sync>;

pub struct Hub {
    status: DashMap<&'static str, StatusProvider>,
    config: ArcSwap<Config>,
    maps: MappingStore,
    directory: Directory,
    policies: Arc<Policies>,
    outboxes: DashMap<OutboxKey, mpsc::Sender<Delivery>>,
    /// Set when a send left a component outbox less than a quarter free, so `congestion`
    /// (asked after every SIP input) scans the outboxes only when one may be crowded.
    crowded: AtomicBool,
    /// How many times a component link serving each foreign domain came up: drivers that
    /// owe the home side something after a (re)connection watch it (see `note_link_up`).
    link_ups: tokio::sync::watch::Sender<HashMap<Domain, u64>>,
    /// Set in open federation: components of unlisted domains open on their first delivery.
    opener: std::sync::OnceLock<ComponentOpener>,
    alarms: crate::ops::alarms::Alarms,
    /// Maintenance mode (`legate drain`, SIGTERM): edges refuse new sessions, subscriptions
    /// and streams while existing ones go on. Read per new request, hence an atomic.
    draining: AtomicBool,
    /// The composition root's reload and drain handle (set by `crate::node`; the admin
    /// endpoint reaches reload and drain through it).
    node: std::sync::OnceLock<Arc<crate::node::Control>>,
    /// In a cluster: the other nodes' SIP edges (see [`SipPeers`]).
    sip_peers: std::sync::OnceLock<Arc<dyn SipPeers>>,
    /// With intercluster peers: who asks them about users nobody placed (see [`PeerAsker`]).
    asker: std::sync::OnceLock<Arc<dyn PeerAsker>>,
}

/// The cluster name a [`Submitted::Delivered`] carries while the peer clusters are asked
/// about the recipient (see [`PeerAsker`]): accepted, its fate told later (a late error).
pub const ASKING_PEERS: &str = "*";

/// Asks the peer clusters about a local user neither this cluster nor the intercluster index
/// places (the router's [`Denied::AskPeers`]). The router is synchronous; the asking is not.
pub trait PeerAsker: Send + Sync {
    /// Takes `env` (received on `origin`) while the peers are asked about `user`, and submits
    /// it again once they answered (the index then places the user, or the router no longer
    /// asks). `false`: it cannot take more now; it then marks `user` as not to be asked, so
    /// the caller routes the envelope again at once.
    fn ask(&self, user: String, origin: Origin, env: Envelope) -> bool;
}

/// In a cluster, SIP dialogs live on the node that set them up; what a home node sends toward
/// SIP arrives on the node holding its component link, which may not be that node.
pub trait SipPeers: Send + Sync {
    /// Copies a delivery whose effect depends on dialogs any node may own — a local user's
    /// presence (for every watcher of that user) and consent answers (`subscribed` /
    /// `unsubscribed`, for the watcher's pending dialog) — to every other node ([`fans_out`]).
    /// Each node's SIP core acts on the dialogs it has and ignores the rest, so a copy to every
    /// node is safe; what must be acted on once (subscribe, probe, messages) is not copied.
    fn copy(&self, d: &Delivery);
    /// Hands a message for a SIP user to the live node that owns the IM session of its pair
    /// (local user, SIP user), so it goes out in that session rather than in a second one this
    /// node would open; `false` when no other node owns one (this node delivers it).
    fn hand_to_owner(&self, d: &Delivery) -> bool;
    /// This node's SIP edge set up (`owned`) or ended the IM session of (local, remote).
    fn session_changed(&self, local: &str, remote: &str, owned: bool);
    /// This node's mark, put on the local tags of the dialogs it creates.
    fn tag_mark(&self) -> String;
    /// The node an in-dialog request whose local tag is `tag` belongs to, when it is not this
    /// one: the live node that created the dialog, or — that node being dead — the leader,
    /// which takes a dead node's dialogs over. None: this node answers it.
    fn dialog_owner(&self, tag: &str) -> Option<String>;
    /// Hands a partner's in-dialog request to `owner`'s SIP edge; what it answered (provisional
    /// and final responses, in order; none for an ACK), or why it could not be handed.
    fn relay(&self, owner: String, req: SipRelay) -> RelayFuture;
}

/// A partner's SIP request handed to the node owning its dialog, with what the receiving
/// node knew of the connection it came on (the owner screens it as if it had arrived there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipRelay {
    pub message: Vec<u8>,
    pub remote: std::net::SocketAddr,
    pub tls: bool,
    /// The federated domains the connection's verified certificate speaks for.
    pub verified: Vec<Domain>,
}

/// What [`SipPeers::relay`] returns.
pub type RelayFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Vec<u8>>, String>> + Send>>;

/// What became of a [`Hub::deliver_wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    Delivered,
    /// The outbox stayed full for the whole wait.
    Timeout,
    /// No live outbox for it here.
    NoOutbox,
}

/// Whether `d` is state every node's SIP edge may act on (see [`SipPeers::copy`]).
pub fn fans_out(d: &Delivery) -> bool {
    matches!(d.link, Link::Sip { .. })
        && matches!(
            d.envelope.body,
            Body::Presence(_)
                | Body::Subscription(Subscription::Subscribed | Subscription::Unsubscribed)
        )
}

/// Whether `d` goes out in the IM session of its pair: a message for a SIP user, or an error
/// about one (told to the sender in the session, see the SIP core's `late_error`).
pub fn for_im_session(d: &Delivery) -> bool {
    matches!(d.link, Link::Sip { .. })
        && matches!(
            d.envelope.body,
            Body::Message(_)
                | Body::Error {
                    kind: super::envelope::ErrorOf::Message,
                    ..
                }
        )
}

impl Hub {
    pub fn new(config: Config, maps: MappingStore) -> Arc<Self> {
        Arc::new(Hub {
            status: DashMap::new(),
            config: ArcSwap::from_pointee(config),
            maps,
            directory: Directory::default(),
            policies: Policies::new(),
            outboxes: DashMap::new(),
            crowded: AtomicBool::new(false),
            link_ups: tokio::sync::watch::channel(HashMap::new()).0,
            opener: std::sync::OnceLock::new(),
            sip_peers: std::sync::OnceLock::new(),
            asker: std::sync::OnceLock::new(),
            alarms: Default::default(),
            draining: AtomicBool::new(false),
            node: std::sync::OnceLock::new(),
        })
    }

    /// Installs the node's control handle (once; later calls are ignored).
    pub fn set_node_control(&self, control: Arc<crate::node::Control>) {
        let _ = self.node.set(control);
    }

    /// The node's control handle; `None` for a hub without a node (in-process tests).
    pub fn node_control(&self) -> Option<&Arc<crate::node::Control>> {
        self.node.get()
    }

    /// Swaps in a reloaded configuration, whole: every later routing decision, policy check
    /// and limit lookup reads it (connections are not torn down here; each next request is
    /// screened against it). The caller validated it and kept the restart-only keys.
    pub fn replace_config(&self, config: Config) {
        self.config.store(Arc::new(config));
    }

    /// Enters maintenance mode; `false` when it was already on. There is no way back but a
    /// restart: a drain ends in a shutdown or a handover.
    pub fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::SeqCst)
    }

    /// Whether new sessions, subscriptions and s2s streams are refused (see `start_draining`).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// A component link serving foreign `domain` completed its handshake.
    pub fn note_link_up(&self, domain: &Domain) {
        self.link_ups
            .send_modify(|m| *m.entry(domain.clone()).or_default() += 1);
    }

    /// Link-up counts per foreign domain; changes whenever a link comes up.
    pub fn link_ups(&self) -> tokio::sync::watch::Receiver<HashMap<Domain, u64>> {
        self.link_ups.subscribe()
    }

    /// Installs the cluster's view of the other nodes' SIP edges (once).
    pub fn set_sip_peers(&self, p: Arc<dyn SipPeers>) {
        let _ = self.sip_peers.set(p);
    }

    /// In a cluster, the other nodes' SIP edges.
    pub fn sip_peers(&self) -> Option<&Arc<dyn SipPeers>> {
        self.sip_peers.get()
    }

    /// Installs who asks the peer clusters about unplaced users (once).
    pub fn set_peer_asker(&self, a: Arc<dyn PeerAsker>) {
        let _ = self.asker.set(a);
    }

    /// Installs the open-federation component opener (once; later calls are ignored).
    pub fn set_component_opener(&self, opener: ComponentOpener) {
        let _ = self.opener.set(opener);
    }

    /// Opens the components of `domain` now if open federation may (the domains opened before
    /// a restart are opened again at start, so local users reach them before they write).
    pub fn open_component_domain(&self, domain: &Domain) -> bool {
        let cfg = self.config.load();
        if cfg.xmpp.federation.mode != crate::config::FederationMode::DenyList
            || !cfg.xmpp_federation_allowed(domain)
        {
            return false;
        }
        self.opener.get().is_some_and(|open| open(domain))
    }

    /// A component delivery found no outbox: in open federation, a domain the policy allows
    /// but the configuration does not list gets its components now, and the outbox again.
    fn open_on_demand(&self, d: &Delivery) -> Option<mpsc::Sender<Delivery>> {
        if !matches!(d.link, Link::Component { .. }) {
            return None;
        }
        let opener = self.opener.get()?;
        let domain = &d.envelope.from.domain;
        let cfg = self.config.load();
        if cfg.xmpp.federation.mode != crate::config::FederationMode::DenyList
            || !cfg.xmpp_federation_allowed(domain)
        {
            return None;
        }
        if !opener(domain) {
            return None;
        }
        self.outbox(d)
    }

    /// The node's alarm table (see `crate::ops::alarms`).
    pub fn alarms(&self) -> &crate::ops::alarms::Alarms {
        &self.alarms
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn maps(&self) -> &MappingStore {
        &self.maps
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The consent cache (per-user allow/block lists).
    pub fn policies(&self) -> &Arc<Policies> {
        &self.policies
    }

    /// Adds (or replaces) the section `name` of the admin `/status` document.
    pub fn add_status(&self, name: &'static str, provider: StatusProvider) {
        self.status.insert(name, provider);
    }

    /// One status section, rendered now.
    pub fn status_section(&self, name: &str) -> Option<serde_json::Value> {
        // The provider is cloned out first: it may itself read other sections.
        let provider = self.status.get(name).map(|e| e.value().clone())?;
        Some(provider())
    }

    /// Every registered status section, rendered now, sorted by name.
    pub fn status_sections(&self) -> Vec<(&'static str, serde_json::Value)> {
        let providers: Vec<(&'static str, StatusProvider)> = self
            .status
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        let mut out: Vec<_> = providers.into_iter().map(|(k, f)| (k, f())).collect();
        out.sort_by_key(|(k, _)| *k);
        out
    }

    /// Registers the outbox of the component named `domain` on `home_node`; returns its
    /// receiver.
    pub fn register_component_domain(
        &self,
        home_node: &str,
        domain: &Domain,
        capacity: usize,
    ) -> mpsc::Receiver<Delivery> {
        self.register(
            OutboxKey::Component(Arc::from(home_node), Some(domain.clone())),
            capacity,
        )
    }

    /// Registers one outbox for every component of `home_node` that has none of its own.
    pub fn register_component(&self, home_node: &str, capacity: usize) -> mpsc::Receiver<Delivery> {
        self.register(OutboxKey::Component(Arc::from(home_node), None), capacity)
    }

    pub fn register_s2s(&self, capacity: usize) -> mpsc::Receiver<Delivery> {
        self.register(OutboxKey::S2s, capacity)
    }

    /// Registers the outbox of the s2s stream from `local` to `remote`; until it is
    /// unregistered (or its receiver dropped), deliveries for that pair go there instead of to
    /// the s2s manager.
    pub fn register_s2s_pair(
        &self,
        local: &Domain,
        remote: &Domain,
        capacity: usize,
    ) -> mpsc::Receiver<Delivery> {
        self.register(OutboxKey::S2sPair(local.clone(), remote.clone()), capacity)
    }

    /// Removes the pair outbox: later deliveries go to the s2s manager again.
    pub fn unregister_s2s_pair(&self, local: &Domain, remote: &Domain) {
        self.outboxes
            .remove(&OutboxKey::S2sPair(local.clone(), remote.clone()));
    }

    pub fn register_sip(&self, capacity: usize) -> mpsc::Receiver<Delivery> {
        self.register(OutboxKey::Sip, capacity)
    }

    /// Registers the outbox of the intercluster forwarder toward peer cluster `cluster`.
    pub fn register_intercluster(
        &self,
        cluster: &str,
        capacity: usize,
    ) -> mpsc::Receiver<Delivery> {
        self.register(OutboxKey::Intercluster(Arc::from(cluster)), capacity)
    }

    fn register(&self, key: OutboxKey, capacity: usize) -> mpsc::Receiver<Delivery> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.outboxes.insert(key, tx);
        rx
    }

    /// Routes `env` received on `origin` and hands it to the destination link without
    /// waiting: a full or missing outbox answers the sender with `service-unavailable`.
    pub fn submit(&self, origin: &Origin, env: Envelope) -> Submitted {
        self.submit_handled(origin, env, Handled::default()).0
    }

    /// [`submit`](Self::submit) with `handled` put into the delivery when its link tells
    /// (a component link: see [`Handled`]); `true` with a delivered outcome means it will be
    /// told. The SIP core answers a MESSAGE only then, so a 200 means the home node's stream
    /// has the message, not just a queue a crash would lose (issue 12: nothing accepted is
    /// lost). Otherwise `handled` is dropped and the outcome is final as it is.
    pub fn submit_handled(
        &self,
        origin: &Origin,
        env: Envelope,
        handled: Handled,
    ) -> (Submitted, bool) {
        let kind = env.kind_label();
        let mut delivery = match self.route(origin, env, kind) {
            Ok(d) => d,
            Err(s) => {
                handled.discard();
                return (s, false);
            }
        };
        // A component link's own outbox (per foreign domain) tells, and so does a peer
        // cluster's forwarder (at the peer's answer); the catch-all outbox of
        // `register_component` is a test's stand-in home node, which does not.
        let tells = matches!(
            delivery.link,
            Link::Component { .. } | Link::Intercluster { .. }
        ) && self.outboxes.contains_key(&OutboxKey::of(&delivery));
        if tells {
            delivery.handled = handled;
        } else {
            handled.discard();
        }
        let link = delivery.link.clone();
        match self.try_deliver(delivery) {
            Handed::Sent => (self.delivered(origin, &link, kind), tells),
            Handed::Full(_, d) | Handed::Gone(d) => {
                // Undelivered: answered here, so nobody waits for the link to tell.
                d.handled.discard();
                let s = self.unavailable(
                    origin,
                    d,
                    kind,
                    "unavailable",
                    ErrorCondition::ServiceUnavailable,
                );
                (s, false)
            }
        }
    }

    /// [`submit`](Self::submit) for a reader relaying what a peer sent: when the destination
    /// outbox is full, waits for room up to `limits.delivery_timeout_secs` (the caller reads
    /// nothing meanwhile, so the peer is slowed by TCP flow control); past that the sender gets
    /// `remote-server-timeout`. A missing outbox answers at once.
    pub async fn submit_wait(&self, origin: &Origin, env: Envelope) -> Submitted {
        let kind = env.kind_label();
        let delivery = match self.route(origin, env, kind) {
            Ok(d) => d,
            Err(s) => return s,
        };
        let link = delivery.link.clone();
        let (tx, delivery) = match self.try_deliver(delivery) {
            Handed::Sent => return self.delivered(origin, &link, kind),
            Handed::Gone(d) => {
                return self.unavailable(
                    origin,
                    d,
                    kind,
                    "unavailable",
                    ErrorCondition::ServiceUnavailable,
                )
            }
            Handed::Full(tx, d) => (tx, d),
        };
        let limit = Duration::from_secs(self.config.load().limits.delivery_timeout_secs);
        match tx.send_timeout(delivery, limit).await {
            Ok(()) => {
                self.note_room(Self::paced(&link), &tx);
                WAITS.with_label_values(&[link.label(), "delivered"]).inc();
                self.delivered(origin, &link, kind)
            }
            Err(mpsc::error::SendTimeoutError::Timeout(d)) => {
                WAITS.with_label_values(&[link.label(), "timeout"]).inc();
                self.unavailable(
                    origin,
                    d,
                    kind,
                    "timeout",
                    ErrorCondition::RemoteServerTimeout,
                )
            }
            Err(mpsc::error::SendTimeoutError::Closed(d)) => self.unavailable(
                origin,
                d,
                kind,
                "unavailable",
                ErrorCondition::ServiceUnavailable,
            ),
        }
    }

    /// The decide stage: a delivery, or what became of it already (a refusal counted and
    /// answered, or a message handed to the cluster node owning its IM session).
    fn route(
        &self,
        origin: &Origin,
        env: Envelope,
        kind: &'static str,
    ) -> Result<Delivery, Submitted> {
        let config = self.config.load();
        let maps = self.maps.current();
        let decide = |env: Envelope| {
            router::route(&config, &maps, &self.directory, origin, env).and_then(|r| {
                let env = self
                    .policies
                    .screen(&config, &maps, origin, &r.link, r.envelope)?;
                Ok(Route {
                    link: r.link,
                    envelope: env,
                })
            })
        };
        let mut routed = decide(env);
        // A local user nobody placed, with peer clusters listed: they are asked first (the
        // asker submits the envelope again once they answered). An asker that cannot take
        // more marks the user, and the envelope is routed again as without peers.
        if let Err(router::Refusal {
            denied: Denied::AskPeers(user),
            envelope,
        }) = routed
        {
            match self.asker.get() {
                Some(a) if a.ask(user.clone(), origin.clone(), (*envelope).clone()) => {
                    let link = Link::Intercluster {
                        cluster: Arc::from(ASKING_PEERS),
                    };
                    return Err(self.delivered(origin, &link, kind));
                }
                _ => {
                    routed = decide(*envelope);
                    if let Err(router::Refusal {
                        denied: Denied::AskPeers(u),
                        envelope,
                    }) = routed
                    {
                        // No asker took it and the router still asks: routed as unplaced.
                        routed = Err(router::Refusal {
                            denied: Denied::NoHomeNode(u),
                            envelope,
                        });
                    }
                }
            }
        }
        match routed {
            Ok(route) => {
                let d = Delivery::new(route.link, route.envelope);
                // What a peer cluster forwarded from its users goes out as if a home node of
                // ours had sent it, so it reaches the dialogs any node of ours owns.
                let from_home = matches!(
                    origin,
                    Origin::Component { .. } | Origin::Intercluster { .. }
                );
                if let (Some(p), true) = (self.sip_peers.get(), from_home) {
                    if fans_out(&d) {
                        p.copy(&d);
                    } else if for_im_session(&d) && p.hand_to_owner(&d) {
                        return Err(self.delivered(origin, &d.link, kind));
                    }
                }
                Ok(d)
            }
            Err(router::Refusal {
                denied,
                envelope: env,
            }) => {
                ROUTED
                    .with_label_values(&[origin.label(), "none", kind, "denied"])
                    .inc();
                DENIED.with_label_values(&[denied.label()]).inc();
                tracing::info!(from = %env.from, to = %env.to, reason = %denied, "refused");
                if denied.answered() && origin.wants_bounces() {
                    if let Some(b) = env.bounce(denied.condition(), denied.to_string()) {
                        self.deliver(Delivery::new(origin.reply_link(), b));
                    }
                }
                Err(Submitted::Denied(denied))
            }
        }
    }

    fn delivered(&self, origin: &Origin, link: &Link, kind: &'static str) -> Submitted {
        ROUTED
            .with_label_values(&[origin.label(), link.label(), kind, "delivered"])
            .inc();
        Submitted::Delivered(link.clone())
    }

    /// Counts an undeliverable envelope and bounces it to its sender with `condition`.
    fn unavailable(
        &self,
        origin: &Origin,
        d: Delivery,
        kind: &'static str,
        outcome: &'static str,
        condition: ErrorCondition,
    ) -> Submitted {
        let link = d.link;
        ROUTED
            .with_label_values(&[origin.label(), link.label(), kind, outcome])
            .inc();
        tracing::warn!(
            destination = link.label(),
            outcome,
            "destination link unavailable or full"
        );
        let text = match condition {
            ErrorCondition::RemoteServerTimeout => {
                format!("the {} link did not take the stanza in time", link.label())
            }
            _ => format!("the {} link is unavailable", link.label()),
        };
        if let Some(b) = d
            .envelope
            .bounce(condition, text)
            .filter(|_| origin.wants_bounces())
        {
            self.deliver(Delivery::new(origin.reply_link(), b));
        }
        Submitted::Unavailable(link)
    }

    fn outbox(&self, d: &Delivery) -> Option<mpsc::Sender<Delivery>> {
        let key = OutboxKey::of(d);
        if let Some(tx) = self.outboxes.get(&key) {
            // A pair whose task just ended (idle) leaves a closed sender until it unregisters:
            // its traffic goes back to the manager, which starts the pair again.
            if !(matches!(key, OutboxKey::S2sPair(..)) && tx.is_closed()) {
                return Some(tx.value().clone());
            }
        }
        let fallback = match key {
            OutboxKey::Component(home, Some(_)) => OutboxKey::Component(home, None),
            OutboxKey::S2sPair(..) => OutboxKey::S2s,
            _ => return None,
        };
        self.outboxes.get(&fallback).map(|tx| tx.value().clone())
    }

    /// Hands `d` to its outbox without waiting.
    fn try_deliver(&self, mut d: Delivery) -> Handed {
        // Twice at most: an s2s pair that ended between lookup and send has a closed outbox;
        // the second lookup skips it for the manager's.
        for _ in 0..2 {
            let Some(tx) = self.outbox(&d).or_else(|| self.open_on_demand(&d)) else {
                return Handed::Gone(d);
            };
            let component = Self::paced(&d.link);
            match tx.try_send(d) {
                Ok(()) => {
                    self.note_room(component, &tx);
                    return Handed::Sent;
                }
                Err(mpsc::error::TrySendError::Full(x)) => return Handed::Full(tx, x),
                Err(mpsc::error::TrySendError::Closed(x)) => d = x,
            }
        }
        Handed::Gone(d)
    }

    /// Puts a delivery another cluster node routed into its outbox here (an envelope for a
    /// component link this node holds, or a copy for the SIP edge, see [`SipFanout`]),
    /// waiting for room up to `limit` as a local reader would. Routing and policy were
    /// applied by the node that received it.
    pub async fn deliver_wait(&self, d: Delivery, limit: Duration) -> Waited {
        let component = Self::paced(&d.link);
        let Some(tx) = self.outbox(&d) else {
            return Waited::NoOutbox;
        };
        match tx.send_timeout(d, limit).await {
            Ok(()) => {
                self.note_room(component, &tx);
                Waited::Delivered
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Waited::Timeout,
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Waited::NoOutbox,
        }
    }

    /// Sends directly to a link without waiting (bounces, edges answering on their own link).
    pub fn deliver(&self, d: Delivery) -> bool {
        matches!(self.try_deliver(d), Handed::Sent)
    }

    /// A component (or intercluster) outbox with less than a quarter of its room left, if any. The SIP driver,
    /// whose core submits without waiting, stops reading its connections until it is
    /// [`relieved`](Congestion::relieved), so SIP traffic is slowed instead of refused.
    pub fn congestion(&self) -> Option<Congestion> {
        if !self.crowded.load(Ordering::Relaxed) {
            return None;
        }
        let found = self.outboxes.iter().find_map(|e| {
            let congested = matches!(
                e.key(),
                OutboxKey::Component(..) | OutboxKey::Intercluster(_)
            ) && Self::crowded(e.value());
            congested.then(|| Congestion(e.value().clone()))
        });
        if found.is_none() {
            // A send that crowds an outbox after this scan sets the flag again.
            self.crowded.store(false, Ordering::Relaxed);
        }
        found
    }

    /// Outboxes whose crowding pauses the SIP readers (see [`Hub::congestion`]): the home
    /// nodes' and the peer clusters' (whose forwarders carry SIP traffic for their users).
    fn paced(link: &Link) -> bool {
        matches!(link, Link::Component { .. } | Link::Intercluster { .. })
    }

    fn crowded(tx: &mpsc::Sender<Delivery>) -> bool {
        tx.capacity() < tx.max_capacity() / 4
    }

    /// Raises the `crowded` flag when a send left a component outbox crowded.
    fn note_room(&self, component: bool, tx: &mpsc::Sender<Delivery>) {
        if component && Self::crowded(tx) {
            self.crowded.store(true, Ordering::Relaxed);
        }
    }

    /// The domains the SIP edge may talk to right now.
    pub fn sip_domain_allowed(&self, d: &Domain) -> bool {
        self.config.load().sip_federated(d).is_some()
    }
}

/// Creates the hub's metric families at start (`crate::metrics::register_all`).
pub fn register_metrics() {
    for m in [&WAITS, &ROUTED, &DENIED] {
        LazyLock::force(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, BUILTIN_SYSTEMS};
    use crate::gateway::envelope::{Address, Body, MessageBody};
    use crate::presence::map::MappingStore;

    const CONFIG: &str = r#"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[[xmpp.federation.domain]]
name = "xmpp.org"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
default_system = "xmpp"
"#;

    /// A message to a local user whose home node link is not registered: the submitter hears
    /// `Unavailable`. An XMPP sender also gets an error stanza; the SIP core does not, since it
    /// answers the request with the status and an error would reach the SIP sender again as a
    /// late-error notice.
    #[test]
    fn synchronous_refusals_are_not_echoed_to_the_sip_core() {
        let cfg = config::from_toml(CONFIG, std::path::Path::new("t.toml"), BUILTIN_SYSTEMS)
            .expect("config");
        let hub = Hub::new(cfg, MappingStore::open(None).expect("maps"));
        let mut sip = hub.register_sip(8);
        let mut s2s = hub.register_s2s(8);
        let msg = |from: &str| Envelope {
            from: Address::parse(from).expect("from"),
            to: Address::parse("alice@example.com").expect("to"),
            body: Body::Message(MessageBody {
                id: Some("m1".into()),
                text: "hi".into(),
                ..Default::default()
            }),
            stanza_id: None,
            via_cluster: None,
        };
        let sip_origin = Origin::Sip {
            domain: Domain::parse("partner.com").expect("domain"),
        };
        assert!(matches!(
            hub.submit(&sip_origin, msg("bob@partner.com")),
            Submitted::Unavailable(_)
        ));
        assert!(sip.try_recv().is_err(), "no echo toward SIP");
        let s2s_origin = Origin::S2s {
            domain: Domain::parse("xmpp.org").expect("domain"),
        };
        assert!(matches!(
            hub.submit(&s2s_origin, msg("carol@xmpp.org")),
            Submitted::Unavailable(_)
        ));
        let b = s2s.try_recv().expect("the XMPP sender gets an error");
        assert!(
            matches!(&b.envelope.body, Body::Error { id: Some(i), .. } if i == "m1"),
            "{b:?}"
        );
    }

    /// A channel `Handled` tells once: done → (token, true); every copy dropped untold →
    /// (token, false); discarded (its submitter answered at once) → nothing.
    #[test]
    fn a_channel_handled_tells_once_and_a_discarded_one_never() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let h = Handled::channel(tx.clone(), 1);
        let copy = h.clone();
        h.done();
        copy.done();
        drop((h, copy));
        assert_eq!(rx.try_recv().ok(), Some((1, true)));
        assert!(rx.try_recv().is_err(), "told once");
        let lost = Handled::channel(tx.clone(), 2);
        let copy = lost.clone();
        drop(lost);
        assert!(rx.try_recv().is_err(), "a copy still holds it");
        drop(copy);
        assert_eq!(rx.try_recv().ok(), Some((2, false)));
        let answered = Handled::channel(tx, 3);
        answered.discard();
        drop(answered);
        assert!(rx.try_recv().is_err(), "a discarded one tells nothing");
    }
}
