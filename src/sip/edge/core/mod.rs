//! The sans-IO SIP user-agent core of the federation edge: transaction tables, dialogs,
//! presence subscriptions (both roles), IM sessions and the federation policy, driven by
//! events (a message from a connection, a delivery from the gateway hub, a timer) with time
//! as a parameter, and producing actions (bytes to send on a connection or toward a domain).
//!
//! It talks to the gateway only through [`HubPort`] (submit an envelope, read the current
//! configuration and mapping set), which is synchronous and never blocks (the hub uses
//! `try_send`), so a SIP request can be answered from the submit outcome. It must not touch
//! sockets, spawn tasks or read the clock: the driver in `edge::mod` does that.
//!
//! Layout: this file holds the tables, the request pipeline (transactions, screening and
//! federation policy, method dispatch), client-transaction outcomes, deliveries and timers;
//! `notifier`, `subscriber` and `im` hold the three sub-machines (`batch` the Lync batched
//! notifier), `persist` the state file
//! form, `tests` the simulated-clock tests.

mod batch;
mod im;
mod im_persist;
mod notifier;
mod notifiers;
mod pairs;
mod persist;
mod recent;
mod subscriber;
mod timers;

pub use persist::{
    Restored, StoreOp, BATCH_PREFIX, NOTIFIER_PREFIX, SIP_PREFIX, SUBSCRIBER_PREFIX,
};

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::metrics as m;
use crate::config::{Config, Domain, Host as CfgHost};
use crate::gateway::hub::{Handled, Submitted};
use crate::gateway::interwork;
use crate::gateway::policy::Consent;
use crate::gateway::{
    Address, Body, Envelope, ErrorCondition, Hub, MessageBody, Origin, PresenceBody, Subscription,
};
use crate::net::LogSafe;
use crate::presence::aggregate::ResourceTable;
use crate::presence::convert::SipBodyKind;
use crate::presence::map::MappingSet;
use crate::sip::dialog::{build_request, response_with, Dialog, DialogId, InDialog};
use crate::sip::header::{self, HeaderName};
use crate::sip::im_session::{self, Content, ImSession, SessionState};
use crate::sip::message::SipMessage;
use crate::sip::routing::Routing;
use crate::sip::subscription::{
    self, clamp_expires, negotiate, refresh_delay, ExpiresDecision, Mono, Notifier, NotifierState,
    NotifyState, Parties, StoreMark, Subscriber, SubscriberState, TerminationReason,
};
use crate::sip::txn::{ClientTransaction, Event, ServerTransaction, Timers, TuEvent, TxnKey};
use crate::sip::validate::{refusal_of, Reject};
pub use batch::{MemberState, PersistedBatch};

/// A connection, as numbered by the driver.
pub type ConnId = u64;

/// What the driver knows about the connection a message arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub conn: ConnId,
    pub remote: SocketAddr,
    /// TLS connection (inbound or outbound).
    pub tls: bool,
    /// The federated domains the peer's verified certificate speaks for (TLS only; RFC 6125
    /// checked by `tls::check_peer` with each domain's EKU policy).
    pub verified: Vec<Domain>,
    /// Set on connections we opened toward a domain's route.
    pub outbound_to: Option<Domain>,
}

/// The edge's window on the gateway core.
pub trait HubPort {
    /// Submits an envelope received from `domain` (an `Origin::Sip`).
    fn submit(&self, domain: &Domain, env: Envelope) -> Submitted;
    fn config(&self) -> Arc<Config>;
    fn maps(&self) -> Arc<MappingSet>;
    /// The local user's consent for `watcher` (requirements §3): a blocked watcher is shown
    /// offline. Synchronous: a cache lookup.
    fn consent(&self, _user: &Address, _watcher: &Address) -> Consent {
        Consent::Undecided
    }
    /// Maintenance mode: new dialogs (INVITE, SUBSCRIBE outside a dialog) are refused.
    fn draining(&self) -> bool {
        false
    }
    /// [`submit`](Self::submit) with `handled` told once the destination link has written
    /// the envelope; the flag says whether it will be told (see `Hub::submit_handled`).
    fn submit_handled(
        &self,
        domain: &Domain,
        env: Envelope,
        handled: Handled,
    ) -> (Submitted, bool) {
        drop(handled);
        (self.submit(domain, env), false)
    }
}

impl HubPort for Hub {
    fn submit(&self, domain: &Domain, env: Envelope) -> Submitted {
        Hub::submit(
            self,
            &Origin::Sip {
                domain: domain.clone(),
            },
            env,
        )
    }
    fn submit_handled(
        &self,
        domain: &Domain,
        env: Envelope,
        handled: Handled,
    ) -> (Submitted, bool) {
        let origin = Origin::Sip {
            domain: domain.clone(),
        };
        Hub::submit_handled(self, &origin, env, handled)
    }
    fn config(&self) -> Arc<Config> {
        Hub::config(self)
    }
    fn maps(&self) -> Arc<MappingSet> {
        Hub::maps(self).current()
    }
    fn consent(&self, user: &Address, watcher: &Address) -> Consent {
        self.policies().consent(user, watcher)
    }
    fn draining(&self) -> bool {
        Hub::draining(self)
    }
}

/// How we appear in Via and Contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentity {
    /// `host:port` of our Via sent-by and Contact.
    pub sent_by: String,
    /// `TCP` or `TLS`: the transport of connections the node opens, used in Via/Contact of a
    /// request not bound to a known connection (otherwise the connection's own transport).
    pub transport: &'static str,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `bytes` on `conn` if it is still open, else on a connection to `domain` (opened if
    /// needed); a response (`domain: None`) whose connection closed is dropped (RFC 3261 §18.2.2
    /// would retry via the Via address; federation peers reconnect and retransmit instead).
    Send {
        conn: Option<ConnId>,
        domain: Option<Domain>,
        bytes: Bytes,
    },
    /// Requests from `conn` were accepted as coming from `domain`: later requests toward the
    /// domain may reuse it (Lync edges expect their own connection to be used).
    Bind { conn: ConnId, domain: Domain },
    /// This edge set up (`owned`) or ended the IM session of (local user, SIP user), both bare
    /// JIDs. Only when [`Core::publish_sessions`] is on (a cluster: the node holding the home
    /// node's link hands that pair's messages to this node).
    SessionOwner {
        local: String,
        remote: String,
        owned: bool,
    },
}

/// What an outgoing client transaction was for.
#[derive(Debug, Clone)]
enum Purpose {
    Notify {
        dialog: DialogId,
    },
    Subscribe {
        id: u64,
        expires: u32,
    },
    Invite {
        session: u64,
    },
    Message {
        session: Option<u64>,
        from: Address,
        to: Address,
        /// Boxed: the RFC 7572 facts make a message large, and most entries are NOTIFYs.
        body: Box<MessageBody>,
        retried: bool,
    },
    Bye,
}

struct ClientEntry {
    txn: ClientTransaction,
    purpose: Purpose,
    conn: Option<ConnId>,
    domain: Domain,
    /// Earliest timer queued for it in the heap (see `arm_client`).
    armed: Option<Instant>,
}

struct ServerEntry {
    txn: ServerTransaction,
    conn: ConnId,
    /// The foreign domain the request came from (for the per-domain bound).
    domain: Domain,
    /// Earliest timer queued for it in the heap (see `arm_server`).
    armed: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    /// A transaction's next deadline: no scan of the transaction tables per event.
    Server(TxnKey),
    Client(TxnKey),
    Notifier(DialogId),
    Batch(DialogId),
    Subscriber(u64),
    Session(u64),
}

/// A refusal decided by policy: status, reason phrase, metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refuse {
    pub status: u16,
    pub reason: &'static str,
    pub label: &'static str,
}

const fn refuse(status: u16, reason: &'static str, label: &'static str) -> Refuse {
    Refuse {
        status,
        reason,
        label,
    }
}

/// Live server transactions at most; beyond, requests get a stateless 503. Refusals by policy
/// never create one. Each foreign domain also has its own share
/// (`limits.sip_transactions_per_domain`), so one partner cannot fill the table for all.
pub(crate) const MAX_SERVER_TRANSACTIONS: usize = 16384;
/// Foreign watchers (notifier dialogs) on the node at most, whatever their domains: the
/// per-domain bound times the number of partners must not be the only ceiling.
pub(crate) const MAX_FOREIGN_WATCHERS: usize = 1_000_000;
/// IM sessions on the node at most (both directions, all domains).
pub(crate) const MAX_IM_SESSIONS: usize = 100_000;

/// Node-wide ceilings of the core's tables (the constants above; tests lower them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodeCaps {
    pub server_transactions: usize,
    pub foreign_watchers: usize,
    pub im_sessions: usize,
}

impl Default for NodeCaps {
    fn default() -> Self {
        NodeCaps {
            server_transactions: MAX_SERVER_TRANSACTIONS,
            foreign_watchers: MAX_FOREIGN_WATCHERS,
            im_sessions: MAX_IM_SESSIONS,
        }
    }
}
/// Retry-After (seconds) of a 503 for a full per-domain or node-wide bound (RFC 3261
/// §21.5.4: the peer may retry after it; Lync edges honour it).
pub(crate) const RETRY_AFTER_BUSY: &str = "30";
/// Notifier dialogs per (foreign watcher, local user) pair; see `on_subscribe`.
pub(crate) const MAX_DIALOGS_PER_PAIR: usize = 4;
/// Messages waiting for an outbound session's INVITE to be answered; beyond, bounced.
pub(crate) const MAX_SESSION_QUEUE: usize = 64;
/// Retry delay after a subscriber failure that may be transient (408, 5xx, transport).
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// CSeq margin added to restored dialogs: NOTIFYs sent after the last state write must not be
/// reused after a restart (RFC 3261 §12.2.1.1: CSeq strictly increases).
const RESTORE_CSEQ_MARGIN: u32 = 1000;

/// Unanswered NOTIFYs on one connection beyond which a presence update's NOTIFY waits for an
/// answer (RFC 6665 §4.2.2 lets a notifier hold and merge NOTIFYs): a storm of 100 000 to one
/// edge otherwise outran its reading by more than a connection queues
/// (`transport::OUT_QUEUE_BYTES`, 4 MiB, ~4 000 NOTIFYs) and the edge was disconnected as a
/// peer that stopped reading (issue 11 item 10). 1 024 of ~1 KB stay well under it.
pub(crate) const NOTIFY_WINDOW: u32 = 1024;

/// The persisted form of a notifier subscription (requirements §1: a restart loses none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedNotifier {
    pub dialog: Dialog,
    pub watcher: String,
    pub presentity: String,
    pub domain: String,
    pub active: bool,
    pub msrtc: bool,
    /// Expiry as Unix seconds.
    pub expires_unix: u64,
}

/// Everything written to the state file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PersistedState {
    pub version: u32,
    pub notifiers: Vec<PersistedNotifier>,
}

/// The SIP user-agent core.
pub struct Core {
    me: LocalIdentity,
    timers: Timers,
    /// Our branch prefix: `z9hG4bK` + a per-start token; loop detection (RFC 5393) looks for it.
    branch_prefix: String,
    im_idle: Duration,
    server: HashMap<TxnKey, ServerEntry>,
    client: HashMap<TxnKey, ClientEntry>,
    notifiers: notifiers::NotifierTable,
    notifier_pairs: pairs::PairIndex,
    /// Watchers (pairs in `notifier_pairs`) per local user, kept with `notifier_pairs` by
    /// `pair_add`/`pair_remove` so the per-user bound costs no scan.
    notifier_watchers: HashMap<String, usize>,
    /// Each watched user's resources (RFC 6121 §4.7.2 aggregation), one entry per presentity.
    resources: ResourceTable,
    /// Lync batched subscriptions (`batch`) with their indexes.
    batches: batch::Batches,
    /// NOTIFY transactions not yet ended, per connection (see [`NOTIFY_WINDOW`]).
    notifies_in_flight: HashMap<ConnId, u32>,
    /// Dialogs whose presence NOTIFY waits for room on their connection, oldest first; each
    /// at most once (`deferred_ids`): sent when its turn comes, with the state then.
    deferred: HashMap<ConnId, VecDeque<DialogId>>,
    deferred_ids: HashSet<DialogId>,
    subscribers: HashMap<u64, Subscriber>,
    subscriber_pairs: HashMap<(String, String), u64>,
    subscriber_calls: HashMap<(String, String), u64>,
    sessions: HashMap<u64, ImSession>,
    session_dialogs: HashMap<DialogId, u64>,
    session_pairs: HashMap<(String, String), u64>,
    /// Emit [`Action::SessionOwner`] (a cluster node).
    publish_sessions: bool,
    /// This node's mark on the local tags of new dialogs (a cluster node).
    tag_mark: Option<String>,
    /// IM session records to write or delete (see `im_persist`).
    session_ops: Vec<persist::StoreOp>,
    /// Node-wide ceilings.
    caps: NodeCaps,
    /// Live server transactions per foreign domain (`limits.sip_transactions_per_domain`).
    server_domains: HashMap<Domain, usize>,
    /// Notifier dialogs per foreign domain (`limits.foreign_watchers_per_domain`).
    notifier_domains: HashMap<Domain, usize>,
    /// Live sessions per federated domain (`limits.im_sessions_per_domain`).
    session_domains: HashMap<Domain, usize>,
    session_calls: HashMap<(String, String), u64>,
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
    /// Heap length at which `timers` next drops its no-op entries.
    compact_at: usize,
    /// Notifier expiries, apart from `heap` (see `timers`): one per foreign watcher, long
    /// lived, and 24 bytes each (a `Mono` time and the dialog by its `notifiers`
    /// fingerprint) instead of a `TimerKey` entry's 88.
    notifier_heap: BinaryHeap<Reverse<(Mono, notifiers::Fingerprint)>>,
    /// `notifier_heap` length at which it is next compacted.
    notifier_compact_at: usize,
    /// Final responses of recent non-INVITE server transactions (see `recent`).
    recent: recent::RecentAnswers,
    /// Peer address of connections that sent us requests (for `recent`).
    conn_ips: HashMap<ConnId, IpAddr>,
    /// Whether each connection we heard on is TLS (for the Via/Contact transport).
    conn_tls: HashMap<ConnId, bool>,
    actions: VecDeque<Action>,
    route_addrs: HashMap<Domain, Vec<IpAddr>>,
    next_id: u64,
    dirty: bool,
    /// What the state store holds, and what is owed to the home side after a link came up.
    persisted: persist::Persisted,
    /// MESSAGEs whose envelope is on its way to the home node: answered when its link has
    /// written it (see [`Core::handle_handover`]), by token.
    awaiting: HashMap<u64, Awaiting>,
    /// Where the home node's links tell what became of an awaited MESSAGE's envelope (the
    /// driver reads the other end, see [`Core::handover_channel`]); none: MESSAGEs are
    /// answered when the hub took them.
    handover_tx: Option<tokio::sync::mpsc::UnboundedSender<(u64, bool)>>,
    /// When each of `awaiting` is answered 202 if its link has not told by then (in order:
    /// the wait is the same for all).
    handover_deadlines: VecDeque<(Instant, u64)>,
}

/// A MESSAGE answered once its envelope is written to the home node.
struct Awaiting {
    key: TxnKey,
    req: SipMessage,
    tag: Option<String>,
}

/// What became of a MESSAGE's envelope after the hub took it (told by the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// The home node's link wrote it (or answered its sender with an error, which reaches the
    /// SIP side as a late-error notice): 200.
    Written,
    /// Lost with the link's connection before it was written: 503, the sender may retry.
    Lost,
    /// Still queued after [`HANDOVER_WAIT`] (the link is reconnecting or slow): 202, the
    /// message is accepted for delivery and an error, if any, comes later (RFC 3428 §7).
    Queued,
}

/// How long a MESSAGE's answer waits for the home node's link to write it: well under a SIP
/// client's Timer F (64·T1 = 32 s), long enough for a component link to reconnect.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// The count kept for `d` in a per-domain table.
fn count_of(t: &HashMap<Domain, usize>, d: &Domain) -> usize {
    t.get(d).copied().unwrap_or(0)
}

/// Decrements `d`'s count, forgetting the domain at zero (the table stays as small as the set
/// of domains with live state).
fn count_down(t: &mut HashMap<Domain, usize>, d: &Domain) {
    if let Some(n) = t.get_mut(d) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            t.remove(d);
        }
    }
}

impl Core {
    /// A local tag for a dialog this edge creates: random, plus this node's mark in a cluster
    /// (see [`crate::sip::dialog::node_mark`]) so another node can hand the partner's
    /// in-dialog requests to this one.
    fn dialog_tag(&self) -> String {
        match &self.tag_mark {
            Some(mark) => format!("{}-{mark}", random_token(12)),
            None => random_token(12),
        }
    }

    /// Marks the local tags of new dialogs with this node's mark (a cluster node).
    pub fn set_tag_mark(&mut self, mark: Option<String>) {
        self.tag_mark = mark;
    }
}

fn random_token(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            let i = rng.random_range(0..ALPHABET.len());
            char::from(ALPHABET.get(i).copied().unwrap_or(b'x'))
        })
        .collect()
}

/// `user@host` of a SIP URI as a core address, without GRUU (`None` for tel:, sips: or a URI
/// without user). The RFC 7247 §6 rules live in [`interwork::address`].
fn address_of_uri(uri: &crate::sip::Uri<'_>) -> Option<Address> {
    interwork::address::address_of_sip(uri.as_sip()?).ok()
}

/// RFC 7247 §7.2, through the one table.
fn condition_for_status(code: u16) -> ErrorCondition {
    interwork::errors::condition_of_status(code)
}

/// The SIP answer to what the hub did with a request's envelope: refusals through RFC 7247
/// §7.1 (the condition's row); a destination link down or full is `service-unavailable`, 503.
fn status_for_submit(s: &Submitted) -> Option<(u16, &'static str)> {
    match s {
        Submitted::Delivered(_) => None,
        Submitted::Denied(d) => Some(d.condition().sip_status()),
        Submitted::Unavailable(_) => Some(ErrorCondition::ServiceUnavailable.sip_status()),
    }
}

impl Core {
    /// A core for a node appearing as `me`; `im_idle` is `limits.im_session_idle_secs`.
    pub fn new(me: LocalIdentity, im_idle: Duration) -> Self {
        Core {
            me,
            timers: Timers::reliable(),
            branch_prefix: format!("z9hG4bKlg{}.", random_token(6)),
            im_idle,
            server: HashMap::new(),
            client: HashMap::new(),
            notifiers: notifiers::NotifierTable::default(),
            notifier_pairs: pairs::PairIndex::default(),
            notifier_watchers: HashMap::new(),
            resources: ResourceTable::new(),
            batches: batch::Batches::default(),
            notifies_in_flight: HashMap::new(),
            deferred: HashMap::new(),
            deferred_ids: HashSet::new(),
            subscribers: HashMap::new(),
            subscriber_pairs: HashMap::new(),
            subscriber_calls: HashMap::new(),
            sessions: HashMap::new(),
            session_dialogs: HashMap::new(),
            session_pairs: HashMap::new(),
            publish_sessions: false,
            tag_mark: None,
            session_ops: Vec::new(),
            session_domains: HashMap::new(),
            caps: NodeCaps::default(),
            server_domains: HashMap::new(),
            notifier_domains: HashMap::new(),
            session_calls: HashMap::new(),
            heap: BinaryHeap::new(),
            compact_at: 0,
            notifier_heap: BinaryHeap::new(),
            notifier_compact_at: 0,
            recent: recent::RecentAnswers::default(),
            conn_ips: HashMap::new(),
            conn_tls: HashMap::new(),
            actions: VecDeque::new(),
            route_addrs: HashMap::new(),
            next_id: 1,
            dirty: false,
            persisted: persist::Persisted::default(),
            awaiting: HashMap::new(),
            handover_tx: None,
            handover_deadlines: VecDeque::new(),
        }
    }

    /// From now on a MESSAGE is answered once the home node's link has written its envelope:
    /// the links send `(token, written)` on the returned channel, and the driver hands each to
    /// [`Core::handle_handover`] (`true`: `Written`, `false`: `Lost`); one not told within
    /// [`HANDOVER_WAIT`] is answered 202 by [`Core::handle_timeout`].
    pub fn handover_channel(&mut self) -> tokio::sync::mpsc::UnboundedReceiver<(u64, bool)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.handover_tx = Some(tx);
        rx
    }

    /// Answers the MESSAGE waiting under `token` (see [`Handover`]).
    pub fn handle_handover(&mut self, token: u64, outcome: Handover, now: Instant) {
        let Some(a) = self.awaiting.remove(&token) else {
            return;
        };
        // Answers come mostly in order: deadlines of answered MESSAGEs leave from the front.
        while let Some(&(_, t)) = self.handover_deadlines.front() {
            if self.awaiting.contains_key(&t) {
                break;
            }
            self.handover_deadlines.pop_front();
        }
        let (code, reason) = match outcome {
            Handover::Written => (200, "OK"),
            Handover::Queued => (202, "Accepted"),
            Handover::Lost => {
                m::refused("handover_lost");
                (503, "Service Unavailable (Home Node Link Lost)")
            }
        };
        self.reply(
            &a.key,
            &a.req,
            code,
            reason,
            a.tag.as_deref(),
            &[],
            None,
            now,
        );
    }

    /// Lowers the node-wide ceilings (machine tests reach them without 100 000 requests).
    #[cfg(test)]
    pub(crate) fn set_node_caps(&mut self, caps: NodeCaps) {
        self.caps = caps;
    }

    /// A connection closed: forget what was kept about it.
    pub fn handle_conn_closed(&mut self, conn: ConnId) {
        self.conn_ips.remove(&conn);
        self.conn_tls.remove(&conn);
    }

    /// Addresses a domain's static route resolved to (for the TCP source check).
    pub fn set_route_addrs(&mut self, addrs: HashMap<Domain, Vec<IpAddr>>) {
        self.route_addrs = addrs;
    }

    /// Next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Earliest deadline (may be early: stale heap entries cause a harmless extra wake-up).
    pub fn poll_timeout(&self) -> Option<Instant> {
        // Transaction deadlines are in the heap too (`arm_server`/`arm_client`); an entry
        // made stale by a transaction's progress only wakes the driver early.
        let n = self
            .notifier_heap
            .peek()
            .map(|Reverse((at, _))| at.instant());
        let t = self.heap.peek().map(|Reverse((at, _))| *at);
        let h = self.handover_deadlines.front().map(|(at, _)| *at);
        [t, n, h].into_iter().flatten().min()
    }

    /// Queues server transaction `key`'s next deadline unless one at or before it is queued
    /// already (that one re-arms when it fires).
    fn arm_server(&mut self, key: &TxnKey) {
        let Some(e) = self.server.get_mut(key) else {
            return;
        };
        let Some(t) = e.txn.poll_timeout() else {
            return;
        };
        if e.armed.is_some_and(|a| a <= t) {
            return;
        }
        e.armed = Some(t);
        self.schedule(TimerKey::Server(key.clone()), t);
    }

    /// As `arm_server`, for a client transaction.
    fn arm_client(&mut self, key: &TxnKey) {
        let Some(e) = self.client.get_mut(key) else {
            return;
        };
        let Some(t) = e.txn.poll_timeout() else {
            return;
        };
        if e.armed.is_some_and(|a| a <= t) {
            return;
        }
        e.armed = Some(t);
        self.schedule(TimerKey::Client(key.clone()), t);
    }

    /// `true` once since the last call if persisted state changed.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Counts for tests and status: (notifiers, subscribers, sessions).
    /// Live (server, client) transactions, for tests and status.
    pub fn txn_counts(&self) -> (usize, usize) {
        (self.server.len(), self.client.len())
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.notifiers.len(),
            self.subscribers.len(),
            self.sessions.len(),
        )
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The transport of connection `conn` as a Via token: what the message will actually
    /// travel over (RFC 3261 §18.1.1, §20.42: the Via names the transport used to send). A
    /// request with no known connection goes out on a new one of the node's default kind.
    fn transport_on(&self, conn: Option<ConnId>) -> &'static str {
        match conn.and_then(|c| self.conn_tls.get(&c)) {
            Some(true) => "TLS",
            Some(false) => "TCP",
            None => self.me.transport,
        }
    }

    fn via_on(&self, conn: Option<ConnId>) -> String {
        format!(
            "SIP/2.0/{} {};branch={}{}",
            self.transport_on(conn),
            self.me.sent_by,
            self.branch_prefix,
            random_token(12)
        )
    }

    /// Our Contact for `user` on connection `conn`; `;transport=` follows the connection like
    /// the Via (RFC 3261 §19.1.1).
    fn contact_for(&self, user: &Address, conn: Option<ConnId>) -> String {
        format!(
            "sip:{}@{};transport={}",
            interwork::address::sip_user_of(user),
            self.me.sent_by,
            self.transport_on(conn).to_ascii_lowercase()
        )
    }

    /// Queues the expiry timer of notifier `id` at `at` unless one at or before `at` is
    /// already queued (a refresh storm must not grow the heap).
    fn arm_notifier(&mut self, id: &DialogId, at: Instant) {
        // A new expiry (a refresh) changes the stored record.
        self.touch_notifier(id);
        let Some(n) = self.notifiers.get_mut(id) else {
            return;
        };
        // `armed` is NEVER (later than any time) when nothing is queued.
        let at = Mono::of(at);
        if n.armed <= at {
            return;
        }
        n.armed = at;
        self.schedule_notifier(id, at);
    }

    /// Adds dialog `id` to its (watcher, presentity) pair.
    fn pair_add(&mut self, pair: (String, String), id: DialogId) {
        let fp = self.notifiers.fingerprint(&id);
        if self.notifier_pairs.add(&pair, fp) {
            *self.notifier_watchers.entry(pair.1).or_default() += 1;
        }
    }

    /// The dialogs of `pair`, oldest first.
    fn pair_ids(&self, pair: &(String, String)) -> Vec<DialogId> {
        self.notifier_pairs
            .get(pair)
            .unwrap_or_default()
            .iter()
            .filter_map(|fp| self.notifiers.by_fingerprint(*fp))
            .map(|n| n.dialog.id.clone())
            .collect()
    }

    /// Removes dialog `id` from its pair, and the pair once it has none.
    fn pair_remove(&mut self, pair: &(String, String), id: &DialogId) {
        let fp = self.notifiers.fingerprint(id);
        if self.notifier_pairs.remove(pair, fp) == Some(true) {
            if let Some(c) = self.notifier_watchers.get_mut(&pair.1) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    self.notifier_watchers.remove(&pair.1);
                }
            }
            self.forget_if_unwatched(&pair.1);
        }
    }

    /// Publishes the gauges (the driver calls it once a second; per event it would cost a
    /// scan of the subscriber table).
    pub fn update_gauges(&self) {
        m::TXNS
            .with_label_values(&["server"])
            .set(i64::try_from(self.server.len()).unwrap_or(i64::MAX));
        m::TXNS
            .with_label_values(&["client"])
            .set(i64::try_from(self.client.len()).unwrap_or(i64::MAX));
        let n = i64::try_from(self.notifiers.len()).unwrap_or(i64::MAX);
        let s = i64::try_from(self.subscribers.len()).unwrap_or(i64::MAX);
        m::SUBS.with_label_values(&["notifier"]).set(n);
        m::SUBS.with_label_values(&["subscriber"]).set(s);
        m::SUBS
            .with_label_values(&["batched"])
            .set(i64::try_from(self.batches.members).unwrap_or(i64::MAX));
        m::DIALOGS_G.with_label_values(&["subscription_in"]).set(n);
        let sd = self
            .subscribers
            .values()
            .filter(|s| s.dialog.is_some())
            .count();
        m::DIALOGS_G
            .with_label_values(&["subscription_out"])
            .set(i64::try_from(sd).unwrap_or(i64::MAX));
        m::DIALOGS_G
            .with_label_values(&["im"])
            .set(i64::try_from(self.session_dialogs.len()).unwrap_or(i64::MAX));
    }

    fn send_request(
        &mut self,
        req: SipMessage,
        conn: Option<ConnId>,
        domain: Domain,
        purpose: Purpose,
        now: Instant,
    ) {
        let method = req.method().unwrap_or("").to_owned();
        match ClientTransaction::new(req, self.timers, now) {
            Ok(txn) => {
                m::request("out", &method);
                if let (Purpose::Notify { .. }, Some(c)) = (&purpose, conn) {
                    *self.notifies_in_flight.entry(c).or_default() += 1;
                }
                let key = txn.key().clone();
                self.client.insert(
                    key.clone(),
                    ClientEntry {
                        txn,
                        purpose,
                        conn,
                        domain,
                        armed: None,
                    },
                );
                self.drain_client_transmit(&key);
            }
            Err(e) => tracing::error!(error = %e, "cannot start client transaction"),
        }
    }

    fn drain_client_transmit(&mut self, key: &TxnKey) {
        if let Some(e) = self.client.get_mut(key) {
            while let Some(bytes) = e.txn.poll_transmit() {
                self.actions.push_back(Action::Send {
                    conn: e.conn,
                    domain: Some(e.domain.clone()),
                    bytes,
                });
            }
        }
        self.arm_client(key);
    }

    /// Answers a server transaction.
    #[allow(clippy::too_many_arguments)]
    fn reply(
        &mut self,
        key: &TxnKey,
        req: &SipMessage,
        code: u16,
        reason: &str,
        to_tag: Option<&str>,
        extra: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
        now: Instant,
    ) {
        let resp = match response_with(req, code, reason, to_tag, extra, body) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, code, "cannot build response");
                return;
            }
        };
        m::response("out", code);
        if let Some(e) = self.server.get_mut(key) {
            e.txn.handle(Event::TuResponse(Box::new(resp)), now);
            // Over TCP a non-INVITE server transaction ends with its final response (Timer J
            // = 0, RFC 3261 §17.2.2); a peer that re-sends the request anyway (after a
            // reconnect, or a sloppy stack) gets the same answer from `recent` and causes
            // nothing twice. The bytes the transaction serialized are the ones kept.
            if code >= 200 && &*key.method != "INVITE" {
                let ip = self.conn_ips.get(&e.conn).copied();
                if let (Some(ip), Some(bytes)) = (ip, e.txn.last_response()) {
                    self.recent.remember(key.fingerprint(), ip, bytes, now);
                }
            }
        }
        self.drain_server(key);
    }

    fn drain_server(&mut self, key: &TxnKey) {
        let mut done = false;
        if let Some(e) = self.server.get_mut(key) {
            while let Some(bytes) = e.txn.poll_transmit() {
                self.actions.push_back(Action::Send {
                    conn: Some(e.conn),
                    domain: None,
                    bytes,
                });
            }
            while let Some(ev) = e.txn.poll_event() {
                if ev == TuEvent::Terminated {
                    done = true;
                }
            }
        }
        if done {
            if let Some(e) = self.server.remove(key) {
                count_down(&mut self.server_domains, &e.domain);
            }
        } else {
            self.arm_server(key);
        }
    }

    /// A message whose routing headers the connection task left to [`Routing::check`] and
    /// which fails it: answered as the connection task answers any malformed message (a 400
    /// naming the header, none to an ACK or a response, RFC 3261 §8.2 / §18.1.2).
    fn refuse_malformed(&mut self, conn: ConnId, msg: &SipMessage, bad: &Reject) {
        m::refused("malformed");
        tracing::info!(status = bad.status, reason = %LogSafe(&bad.reason), "bad message");
        let answer = bad
            .status
            .and_then(|s| Some((s, refusal_of(msg, s, &bad.reason, "lgbad")?)));
        if let Some((status, bytes)) = answer {
            m::response("out", status);
            self.actions.push_back(Action::Send {
                conn: Some(conn),
                domain: None,
                bytes,
            });
        }
    }

    /// A response without a transaction (no RFC 3261 branch, ACK-less cases).
    fn reply_stateless(&mut self, conn: ConnId, req: &SipMessage, code: u16, reason: &str) {
        self.reply_stateless_with(conn, req, code, reason, &[]);
    }

    /// [`Core::reply_stateless`] with extra header lines (e.g. `Retry-After`).
    fn reply_stateless_with(
        &mut self,
        conn: ConnId,
        req: &SipMessage,
        code: u16,
        reason: &str,
        extra: &[(&str, &str)],
    ) {
        let tag = random_token(10);
        if let Ok(r) = response_with(req, code, reason, Some(&tag), extra, None) {
            m::response("out", code);
            self.actions.push_back(Action::Send {
                conn: Some(conn),
                domain: None,
                bytes: r.to_bytes(),
            });
        }
    }

    /// A message arrived on a connection.
    pub fn handle_message(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        msg: SipMessage,
        now: Instant,
    ) {
        self.conn_tls.insert(peer.conn, peer.tls);
        if msg.is_request() {
            self.on_request(hub, peer, msg, now);
        } else {
            self.on_response(hub, peer, msg, now);
        }
    }

    fn on_response(&mut self, hub: &dyn HubPort, peer: &PeerInfo, resp: SipMessage, now: Instant) {
        if let Err(bad) = Routing::of(&resp).check(&resp) {
            return self.refuse_malformed(peer.conn, &resp, &bad);
        }
        if let Some(code) = resp.status() {
            m::response("in", code);
        }
        let Ok(key) = TxnKey::client(&resp) else {
            return;
        };
        let Some(e) = self.client.get_mut(&key) else {
            // A stray or late response (RFC 3261 §18.1.2: a UA drops it).
            tracing::debug!("response matches no transaction; dropped");
            return;
        };
        if e.conn.is_none() {
            // Later requests of this dialog reuse the connection the answer came on.
            e.conn = Some(peer.conn);
        }
        e.txn.handle(Event::Message(Box::new(resp)), now);
        self.drain_client(hub, &key, Some(peer.conn), now);
    }

    fn drain_client(
        &mut self,
        hub: &dyn HubPort,
        key: &TxnKey,
        conn: Option<ConnId>,
        now: Instant,
    ) {
        self.drain_client_transmit(key);
        let (events, purpose, domain) = match self.client.get_mut(key) {
            Some(e) => {
                let mut v = Vec::new();
                while let Some(ev) = e.txn.poll_event() {
                    v.push(ev);
                }
                (v, e.purpose.clone(), e.domain.clone())
            }
            None => return,
        };
        for ev in events {
            match ev {
                TuEvent::Response(r) => self.on_client_response(hub, &purpose, &r, conn, now),
                TuEvent::Timeout => self.on_client_failure(hub, &purpose, &domain, 408, now),
                TuEvent::TransportError => self.on_client_failure(hub, &purpose, &domain, 503, now),
                TuEvent::Terminated => {
                    let ended = self.client.remove(key);
                    if let Some(ClientEntry {
                        purpose: Purpose::Notify { .. },
                        conn: Some(c),
                        ..
                    }) = ended
                    {
                        self.notify_ended(hub, c, now);
                    }
                }
                TuEvent::Request(_) => {}
            }
        }
    }

    fn on_request(&mut self, hub: &dyn HubPort, peer: &PeerInfo, req: SipMessage, now: Instant) {
        // Decode once: the routing headers travel with the request from here on.
        let r = Routing::of(&req);
        if let Err(bad) = r.check(&req) {
            return self.refuse_malformed(peer.conn, &req, &bad);
        }
        let method = r.method.unwrap_or("");
        self.conn_ips.insert(peer.conn, peer.remote.ip());
        m::request("in", method);
        if method == "ACK" {
            // An ACK for a non-2xx matches the INVITE server transaction (absorbed there); an
            // ACK for our 2xx is its own end-to-end request and confirms the session (§13.3.1.4).
            if let Ok(key) = TxnKey::server_of(r.method, &r.via) {
                if let Some(e) = self.server.get_mut(&key) {
                    e.txn.handle(Event::Message(Box::new(req)), now);
                    self.drain_server(&key);
                }
            }
            return;
        }
        if method == "BENOTIFY" {
            // Lync's best-effort NOTIFY (MS-SIPRE §3.4): never answered.
            if let Ok(domain) = self.permit(&hub.config(), peer, &r) {
                // An accepted request like any other: binds the connection (and meets its
                // first-request deadline) though it is never answered.
                self.actions.push_back(Action::Bind {
                    conn: peer.conn,
                    domain: domain.clone(),
                });
                self.on_notify(hub, peer, None, &req, &domain, now);
            }
            return;
        }
        let key = match TxnKey::server_of(r.method, &r.via) {
            Ok(k) => k,
            Err(_) => {
                m::refused("no_rfc3261_branch");
                self.reply_stateless(peer.conn, &req, 400, "Missing RFC 3261 Branch");
                return;
            }
        };
        if let Some(e) = self.server.get_mut(&key) {
            // A retransmission: the transaction re-sends its last response (§17.2.1, §17.2.2).
            e.txn.handle(Event::Message(Box::new(req)), now);
            self.drain_server(&key);
            return;
        }
        // Only the same peer address gets a remembered answer: branches are chosen by peers,
        // and one peer must never read another's response.
        let ttl = self.timers.timeout();
        if let Some(bytes) = self
            .recent
            .answer(key.fingerprint(), peer.remote.ip(), now, ttl)
        {
            self.actions.push_back(Action::Send {
                conn: Some(peer.conn),
                domain: None,
                bytes,
            });
            return;
        }
        // Policy first: a refusal is answered statelessly (RFC 3261 §8.2: a UAS may answer a
        // 4xx without a transaction), so a flood of refused requests (no certificate,
        // unfederated domain) costs no state and no Timer H/J per request. A retransmission
        // is screened and refused again the same way.
        let cfg = hub.config();
        let domain = match self.screen(&cfg, peer, &req, &r) {
            Ok(d) => d,
            Err(no) => {
                m::refused(no.label);
                // Method, From and Call-ID come from the wire: escaped (net::LogSafe) so a
                // peer cannot forge log lines or hide text.
                let from = req.header(HeaderName::From).map_or("", |h| h.value);
                tracing::info!(
                    peer = %peer.remote,
                    method = %LogSafe(method),
                    from = %LogSafe(from),
                    call_id = %LogSafe(r.call_id.unwrap_or("")),
                    status = no.status,
                    reason = no.reason,
                    "request refused"
                );
                self.reply_stateless(peer.conn, &req, no.status, no.reason);
                return;
            }
        };
        // The domain's own share first: a partner at its bound is told so (and only it), while
        // the others keep the rest of the node-wide table.
        let busy = [("Retry-After", RETRY_AFTER_BUSY)];
        if count_of(&self.server_domains, &domain) >= cfg.limits.sip_transactions_per_domain {
            m::refused("domain_transactions_full");
            tracing::info!(domain = %domain, "per-domain transaction bound reached");
            self.reply_stateless_with(
                peer.conn,
                &req,
                503,
                "Service Unavailable (Too Many Transactions From Your Domain)",
                &busy,
            );
            return;
        }
        // Draining (maintenance mode): no new session or subscription; requests inside
        // existing dialogs (refreshes, BYE, NOTIFY) and pager MESSAGEs still go through, so
        // what runs can finish. RFC 3261 §21.5.4: 503 with Retry-After sends the peer to
        // another node or back later.
        if matches!(method, "INVITE" | "SUBSCRIBE") && r.to_tag().is_none() && hub.draining() {
            m::refused("draining");
            self.reply_stateless_with(
                peer.conn,
                &req,
                503,
                "Service Unavailable (Maintenance)",
                &busy,
            );
            return;
        }
        if self.server.len() >= self.caps.server_transactions {
            m::refused("too_many_transactions");
            self.reply_stateless_with(
                peer.conn,
                &req,
                503,
                "Service Unavailable (Overloaded)",
                &busy,
            );
            return;
        }
        match ServerTransaction::with_key(&req, key.clone(), self.timers, now) {
            Ok(txn) => {
                self.server.insert(
                    key.clone(),
                    ServerEntry {
                        txn,
                        conn: peer.conn,
                        domain: domain.clone(),
                        armed: None,
                    },
                );
                *self.server_domains.entry(domain.clone()).or_default() += 1;
                self.drain_server(&key);
            }
            Err(e) => {
                tracing::debug!(error = %LogSafe(&e.to_string()), "cannot start server transaction");
                self.reply_stateless(peer.conn, &req, 400, "Bad Transaction Headers");
                return;
            }
        }
        self.actions.push_back(Action::Bind {
            conn: peer.conn,
            domain: domain.clone(),
        });
        // RFC 3261 §8.2.2.3: an extension the request requires and we do not support is
        // refused with 420 and listed in Unsupported; a SUBSCRIBE may also require the Lync
        // batched-subscription tags (`BATCH_TAGS`, see `batch`). Never for ACK/CANCEL.
        let unsupported: Vec<&str> = req
            .headers_named(HeaderName::Require)
            .flat_map(|h| h.value.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty() && !SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(t)))
            .filter(|t| {
                method != "SUBSCRIBE" || !BATCH_TAGS.iter().any(|s| s.eq_ignore_ascii_case(t))
            })
            .collect();
        if !unsupported.is_empty() && method != "CANCEL" {
            m::refused("bad_extension");
            let list = unsupported.join(", ");
            let tag = random_token(10);
            self.reply(
                &key,
                &req,
                420,
                "Bad Extension",
                Some(&tag),
                &[("Unsupported", &list)],
                None,
                now,
            );
            return;
        }
        match method {
            "SUBSCRIBE" if self.is_batch_subscribe(&req) => {
                self.on_batch_subscribe(hub, &cfg, peer, &key, &req, &domain, now)
            }
            "SUBSCRIBE" => self.on_subscribe(hub, &cfg, peer, &key, &req, &domain, now),
            "NOTIFY" => self.on_notify(hub, peer, Some(&key), &req, &domain, now),
            "INVITE" => self.on_invite(hub, peer, &key, &req, &domain, now),
            "MESSAGE" => self.on_message(hub, peer, &key, &req, &r, &domain, now),
            "BYE" => self.on_bye(&key, &req, now),
            "OPTIONS" => {
                let tag = random_token(10);
                self.reply(
                    &key,
                    &req,
                    200,
                    "OK",
                    Some(&tag),
                    &[("Allow", ALLOW), ("Accept", im_session::ACCEPT_HEADER)],
                    None,
                    now,
                )
            }
            "CANCEL" => {
                // INVITEs are answered at once, so a CANCEL always arrives too late and has no
                // effect (§9.2); it is still answered 200 when it matches the INVITE.
                let invite = key.with_method("INVITE");
                if self.server.contains_key(&invite) {
                    self.reply(&key, &req, 200, "OK", None, &[], None, now)
                } else {
                    self.reply(
                        &key,
                        &req,
                        481,
                        "Call/Transaction Does Not Exist",
                        None,
                        &[],
                        None,
                        now,
                    )
                }
            }
            "INFO" => {
                let known = DialogId::of_incoming_request(&req)
                    .ok()
                    .is_some_and(|id| self.session_dialogs.contains_key(&id));
                if known {
                    self.reply(&key, &req, 200, "OK", None, &[], None, now)
                } else {
                    self.reply(
                        &key,
                        &req,
                        481,
                        "Call/Transaction Does Not Exist",
                        None,
                        &[],
                        None,
                        now,
                    )
                }
            }
            _ => {
                m::refused("method_not_allowed");
                let tag = random_token(10);
                self.reply(
                    &key,
                    &req,
                    405,
                    "Method Not Allowed",
                    Some(&tag),
                    &[("Allow", ALLOW)],
                    None,
                    now,
                )
            }
        }
    }

    /// Federation policy and request screening (issue 6 item 7, RFC 3261 §8.2, RFC 5393).
    /// Answers the peer's domain or the refusal.
    fn screen(
        &self,
        cfg: &Config,
        peer: &PeerInfo,
        req: &SipMessage,
        r: &Routing<'_>,
    ) -> Result<Domain, Refuse> {
        let domain = self.permit(cfg, peer, r)?;
        if let Ok(Some(0)) = req.max_forwards() {
            return Err(refuse(483, "Too Many Hops", "too_many_hops"));
        }
        if self.is_loop(req) {
            return Err(refuse(482, "Loop Detected", "loop_detected"));
        }
        let in_dialog = r.to_tag().is_some();
        let ruri = match &r.request_uri {
            Some(Ok(u)) => u,
            _ => return Err(refuse(400, "Bad Request-URI", "bad_request_uri")),
        };
        let Some(sip) = ruri.as_sip() else {
            return Err(refuse(
                416,
                "Unsupported URI Scheme",
                "unsupported_uri_scheme",
            ));
        };
        // RFC 7247 §8: a `sips:` request asks for TLS on every hop, which the XMPP side
        // cannot promise; it is refused, never translated (nor is one from a `sips:` sender).
        let from_sips = r
            .from
            .as_ref()
            .ok()
            .and_then(|f| f.uri.as_sip().map(|u| u.is_secure()));
        if sip.is_secure() || from_sips == Some(true) {
            let (code, reason) = interwork::address::SIPS_REFUSED;
            return Err(refuse(code, reason, "sips_not_translated"));
        }
        // A Lync batched SUBSCRIBE targets the watcher's own (foreign) URI ([MS-SIP]
        // §3.3.4.1); `on_batch_subscribe` checks it is exactly that.
        let batched = r.method == Some("SUBSCRIBE") && batch::is_adrl(req);
        if !in_dialog && !batched {
            let host = Domain::parse(sip.host().as_str()).ok();
            if host.as_ref().is_some_and(|h| cfg.chat_node(h).is_some()) {
                // Rooms are offered to XMPP federation only: Lync and Skype for Business
                // federate no multi-party IM (seed 004), so say so instead of "not found".
                return Err(refuse(
                    403,
                    "Forbidden (Group Chat Is Not Offered Over SIP Federation)",
                    "group_chat_not_for_sip",
                ));
            }
            if !host.is_some_and(|h| cfg.is_local_domain(&h)) {
                return Err(refuse(404, "Not Found (Not A Local Domain)", "not_local"));
            }
            // OPTIONS to the domain itself (a peer probing the edge) needs no user.
            let probe = r.method == Some("OPTIONS");
            if !probe && sip.user().is_none_or(str::is_empty) {
                return Err(refuse(404, "Not Found (No User)", "no_user"));
            }
        }
        Ok(domain)
    }

    /// Who is talking: the From domain must be a configured SIP federated domain, and the
    /// connection must vouch for it (module doc of `edge` describes the TCP trust).
    fn permit(&self, cfg: &Config, peer: &PeerInfo, r: &Routing<'_>) -> Result<Domain, Refuse> {
        let from = r
            .from
            .as_ref()
            .map_err(|_| refuse(400, "Bad From", "bad_from"))?;
        let domain = from
            .uri
            .as_sip()
            .and_then(|s| Domain::parse(s.host().as_str()).ok())
            .ok_or(refuse(
                403,
                "Forbidden (Sender Domain Unknown)",
                "domain_not_federated",
            ))?;
        let Some(fed) = cfg.sip_federated(&domain) else {
            return Err(refuse(
                403,
                "Forbidden (Domain Not Federated)",
                "domain_not_federated",
            ));
        };
        // The configuration's string (equal): what the core keeps per dialog shares it.
        let domain = fed.name.clone();
        if !peer.verified.is_empty() {
            if !peer.verified.contains(&domain) {
                return Err(refuse(
                    403,
                    "Forbidden (Certificate Does Not Match Sender Domain)",
                    "identity_mismatch",
                ));
            }
            return Ok(domain);
        }
        if peer.tls && peer.outbound_to.is_none() {
            return Err(refuse(
                403,
                "Forbidden (No Verified Certificate)",
                "no_certificate",
            ));
        }
        if let Some(o) = &peer.outbound_to {
            if *o != domain {
                return Err(refuse(
                    403,
                    "Forbidden (Connection Belongs To Another Domain)",
                    "identity_mismatch",
                ));
            }
            return Ok(domain);
        }
        // Plain TCP inbound: nothing proves who the peer is, so only the address of the
        // domain's static route may speak for it; a domain without a static route can use TLS
        // only (a From header alone would let anyone on the network pose as a partner).
        let Some(route) = &fed.route else {
            return Err(refuse(
                403,
                "Forbidden (TCP Needs A Static Route For This Domain)",
                "source_not_route",
            ));
        };
        {
            let ok = match &route.host {
                CfgHost::Ip(ip) => *ip == peer.remote.ip(),
                CfgHost::Name(_) => self
                    .route_addrs
                    .get(&domain)
                    .is_some_and(|v| v.contains(&peer.remote.ip())),
            };
            if !ok {
                return Err(refuse(
                    403,
                    "Forbidden (Source Is Not The Domain's Route)",
                    "source_not_route",
                ));
            }
        }
        Ok(domain)
    }

    /// RFC 5393 §4.2: a request carrying a Via we inserted (our sent-by and our branch prefix)
    /// came back to us.
    fn is_loop(&self, req: &SipMessage) -> bool {
        // Our branches carry `branch_prefix` literally; a request whose Via lines do not
        // contain it cannot be a loop, and most requests are spared decoding every Via.
        if !req
            .headers_named(HeaderName::Via)
            .any(|h| h.value.contains(self.branch_prefix.as_str()))
        {
            return false;
        }
        let Ok(vias) = req.vias() else { return false };
        vias.iter().any(|v| {
            v.sent_by().eq_ignore_ascii_case(&self.me.sent_by)
                && v.branch()
                    .is_some_and(|b| b.starts_with(&self.branch_prefix))
        })
    }

    fn on_client_response(
        &mut self,
        hub: &dyn HubPort,
        purpose: &Purpose,
        resp: &SipMessage,
        conn: Option<ConnId>,
        now: Instant,
    ) {
        let code = resp.status().unwrap_or(500);
        if code < 200 {
            return;
        }
        match purpose {
            Purpose::Notify { dialog } => {
                // RFC 6665 §4.2.2: 481 (or any failure but a timeout-like one) to a NOTIFY
                // ends the subscription; we keep it on 408/5xx so a peer restart loses nothing.
                if code == 481 || code == 403 || code == 603 {
                    if let Some(n) = self.notifier_remove(dialog) {
                        let pair = n.parties.pair();
                        self.pair_remove(&pair, dialog);
                        self.dirty = true;
                    }
                    self.batch_remove(dialog);
                }
            }
            Purpose::Subscribe { id, expires } => {
                self.on_subscribe_response(hub, *id, *expires, resp, code, conn, now)
            }
            Purpose::Invite { session } => {
                let sid = *session;
                if (200..300).contains(&code) {
                    self.on_invite_ok(hub, sid, resp, conn, now);
                } else if let Some(s) = self.remove_session(sid) {
                    for b in &s.queue {
                        self.bounce_message(hub, &s.domain, &s.local, &s.remote, b, code);
                    }
                }
            }
            Purpose::Message {
                session,
                from,
                to,
                body,
                retried,
            } => {
                if (200..300).contains(&code) {
                    return;
                }
                let domain = to.domain.clone();
                if let (Some(sid), 481 | 408, false) = (session, code, retried) {
                    // The peer lost the session: open a new one for this message.
                    self.remove_session(*sid);
                    self.open_session(hub, from.clone(), to.clone(), domain, (**body).clone(), now);
                    return;
                }
                self.bounce_message(hub, &domain, from, to, body, code);
            }
            Purpose::Bye => {}
        }
    }

    fn on_client_failure(
        &mut self,
        hub: &dyn HubPort,
        purpose: &Purpose,
        domain: &Domain,
        code: u16,
        now: Instant,
    ) {
        tracing::info!(code, domain = %domain, "client transaction failed");
        match purpose {
            Purpose::Subscribe { id, .. } => {
                if let Some(s) = self.subscribers.get_mut(id) {
                    if s.state == SubscriberState::Unsubscribing {
                        self.remove_subscriber(*id);
                        return;
                    }
                    s.state = SubscriberState::Retrying;
                    s.dialog = None;
                    s.next_at = Some(now + RETRY_AFTER);
                    self.schedule(TimerKey::Subscriber(*id), now + RETRY_AFTER);
                }
            }
            Purpose::Invite { session } => {
                if let Some(s) = self.remove_session(*session) {
                    for b in &s.queue {
                        self.bounce_message(hub, &s.domain, &s.local, &s.remote, b, code);
                    }
                }
            }
            Purpose::Message { from, to, body, .. } => {
                self.bounce_message(hub, domain, from, to, body, code);
            }
            Purpose::Notify { .. } | Purpose::Bye => {}
        }
    }

    /// The core sent `env` toward SIP `domain`.
    pub fn handle_delivery(
        &mut self,
        hub: &dyn HubPort,
        domain: &Domain,
        env: Envelope,
        now: Instant,
    ) {
        self.batch_delivery(&env, now);
        match env.body {
            Body::Presence(p) => {
                let pair = (env.to.bare_string(), env.from.bare_string());
                let ids = self.pair_ids(&pair);
                let batched = self.batches.watches(&pair);
                if ids.is_empty() && !batched {
                    tracing::debug!("presence for a watcher without subscription dropped");
                    return;
                }
                // The home node broadcasts per resource; watchers see the user's aggregate
                // (RFC 6121 §4.7.2), so one device signing off never hides another.
                let agg =
                    self.resources
                        .update(&hub.maps(), &pair.1, env.from.resource.as_deref(), p);
                if batched {
                    self.batch_presence(&pair, now);
                }
                for id in ids {
                    let mut activated = false;
                    if let Some(n) = self.notifiers.get_mut(&id) {
                        n.last = agg.clone();
                        // Presence reaching a pending watcher means the home side lets it see
                        // the user (an XMPP server only sends presence to approved
                        // subscribers); offline presence is how polite blocking looks.
                        activated = n.state == NotifierState::Pending;
                        n.state = NotifierState::Active;
                    }
                    self.dirty |= activated;
                    if activated {
                        // Pending → active is a state change (RFC 6665 §4.2.2): always sent.
                        self.send_notify(hub, &id, None, now);
                    } else {
                        self.notify_change(hub, &id, now);
                    }
                }
            }
            // Consent of the user for a watcher (or, with an empty localpart, a whole domain):
            // the home node approved, or the admin changed the lists. A refusal never ends
            // the subscription (polite blocking): the watcher is shown offline.
            Body::Subscription(Subscription::Subscribed) => {
                self.consent_changed(hub, &env.from, &env.to, now);
            }
            Body::Subscription(Subscription::Unsubscribed) => {
                self.consent_changed(hub, &env.from, &env.to, now);
            }
            Body::Subscription(Subscription::Subscribe) => {
                let pair = (env.from.bare_string(), env.to.bare_string());
                match self.subscriber_pairs.get(&pair).copied() {
                    Some(id) => {
                        // Already subscribed: a refresh makes the peer send a fresh NOTIFY.
                        let retrying = self
                            .subscribers
                            .get(&id)
                            .is_some_and(|s| s.state == SubscriberState::Retrying);
                        if !retrying {
                            self.send_subscribe(id, now);
                        }
                    }
                    None => self.start_subscriber(hub, domain, env, now),
                }
            }
            Body::Subscription(Subscription::Unsubscribe) => {
                let pair = (env.from.bare_string(), env.to.bare_string());
                if let Some(id) = self.subscriber_pairs.get(&pair).copied() {
                    let has_dialog = self
                        .subscribers
                        .get(&id)
                        .is_some_and(|s| s.dialog.is_some());
                    if has_dialog {
                        if let Some(s) = self.subscribers.get_mut(&id) {
                            s.state = SubscriberState::Unsubscribing;
                        }
                        self.send_subscribe(id, now);
                    } else {
                        self.remove_subscriber(id);
                    }
                }
            }
            Body::Subscription(Subscription::Probe) => self.on_probe(hub, domain, env, now),
            Body::Message(body) => self.deliver_message(hub, domain, env.from, env.to, body, now),
            Body::Error { .. } => self.late_error(hub, domain, env, now),
            Body::Xmpp(_) => {}
        }
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, hub: &dyn HubPort, now: Instant) {
        while let Some(&(at, token)) = self.handover_deadlines.front() {
            if at > now {
                break;
            }
            self.handover_deadlines.pop_front();
            // Answered already when its link told (the entry stays until its deadline).
            self.handle_handover(token, Handover::Queued, now);
        }
        // A machine that re-armed a deadline at or before `now` would otherwise keep this loop
        // going forever; with a budget the rest waits for the driver's next turn (the deadline
        // is already due, so that turn comes at once) and the driver's other inputs get a turn.
        let mut budget = (self.heap.len() + self.notifier_heap.len())
            .saturating_mul(2)
            .saturating_add(64);
        while budget > 0 {
            let Some((at, key)) = self.pop_due(now) else {
                break;
            };
            budget -= 1;
            match key {
                TimerKey::Server(k) => {
                    let Some(e) = self.server.get_mut(&k) else {
                        continue;
                    };
                    if e.armed == Some(at) {
                        e.armed = None;
                    }
                    if e.txn.poll_timeout().is_some_and(|t| t <= now) {
                        e.txn.handle(Event::Timer, now);
                    }
                    // Forwards what the timer produced and re-arms the next deadline.
                    self.drain_server(&k);
                }
                TimerKey::Client(k) => {
                    let Some(e) = self.client.get_mut(&k) else {
                        continue;
                    };
                    if e.armed == Some(at) {
                        e.armed = None;
                    }
                    if e.txn.poll_timeout().is_some_and(|t| t <= now) {
                        e.txn.handle(Event::Timer, now);
                        self.drain_client(hub, &k, None, now);
                    } else {
                        self.arm_client(&k);
                    }
                }
                TimerKey::Notifier(id) => {
                    let Some(n) = self.notifiers.get_mut(&id) else {
                        continue;
                    };
                    if n.expires_at.instant() <= now {
                        self.end_notifier(hub, &id, TerminationReason::Timeout, true, now);
                    } else if n.armed == Mono::of(at) {
                        // Refreshed since: the one queued timer moves to the new expiry.
                        n.armed = Mono::NEVER;
                        let e = n.expires_at.instant();
                        self.arm_notifier(&id, e);
                    }
                }
                TimerKey::Batch(id) => self.batch_timer(hub, &id, at, now),
                TimerKey::Subscriber(id) => {
                    let due = self
                        .subscribers
                        .get(&id)
                        .is_some_and(|s| s.next_at.is_some_and(|t| t <= now));
                    if due {
                        if let Some(s) = self.subscribers.get_mut(&id) {
                            s.next_at = None;
                            if s.state == SubscriberState::Retrying {
                                s.state = SubscriberState::Subscribing;
                            }
                        }
                        self.send_subscribe(id, now);
                    }
                }
                TimerKey::Session(sid) => {
                    let idle_until = self
                        .sessions
                        .get(&sid)
                        .map(|s| s.last_activity + self.im_idle);
                    match idle_until {
                        Some(t) if t <= now => self.close_session(hub, sid, now),
                        Some(t) => self.schedule(TimerKey::Session(sid), t),
                        None => {}
                    }
                }
            }
        }
    }

    /// A connection toward `domain` could not be opened: fail what waits on it.
    pub fn handle_transport_error(&mut self, hub: &dyn HubPort, domain: &Domain, now: Instant) {
        let keys: Vec<TxnKey> = self
            .client
            .iter()
            .filter(|(_, e)| {
                e.domain == *domain && matches!(e.txn.state_name(), "Calling" | "Trying")
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(e) = self.client.get_mut(&k) {
                e.txn.handle(Event::TransportError, now);
            }
            self.drain_client(hub, &k, None, now);
        }
    }
}

/// Option tags we accept in `Require` (RFC 3261 §20.32).
const SUPPORTED: &[&str] = &["ms-benotify", "ms-text-format"];
/// Option tags a SUBSCRIBE may also require: Lync batched subscriptions ([MS-PRES] §2.2.2.4)
/// and resource lists (RFC 4662 §4.1).
const BATCH_TAGS: &[&str] = &["adhoclist", "categoryList", "eventlist"];

/// Methods we answer (RFC 3261 §20.5).
pub const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, MESSAGE, SUBSCRIBE, NOTIFY, INFO";

#[cfg(test)]
mod im_tests;
#[cfg(test)]
mod persist_tests;
#[cfg(test)]
mod tests;
