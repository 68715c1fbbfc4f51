//! The sans-IO SIP user-agent core of the federation edge: transaction tables, dialogs,
//! presence subscriptions (both roles), IM sessions and the federation policy, driven by
//! events (a message from a connection, a delivery from the gateway hub, a timer) with time
//! as a parameter, and producing actions (bytes to send on a connection or toward a domain).
//!
//! It talks to the gateway only through [`HubPort`] (submit an envelope, read the current
//! configuration and mapping set), which is synchronous and never blocks (the hub uses
//! `try_send`), so a SIP request can be answered from the submit outcome. It must not touch
//! sockets, spawn tasks or read the clock: the driver in `edge::mod` does that.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::metrics as m;
use crate::config::{Config, Domain, Host as CfgHost};
use crate::gateway::hub::Submitted;
use crate::gateway::{
    Address, Body, Envelope, ErrorCondition, Hub, MessageBody, Origin, Subscription,
};
use crate::presence::convert::SipBodyKind;
use crate::presence::map::MappingSet;
use crate::sip::dialog::{build_request, response_with, Dialog, DialogId, InDialog};
use crate::sip::header::{self, HeaderName};
use crate::sip::im_session::{self, Content, ImSession, SessionState};
use crate::sip::message::SipMessage;
use crate::sip::subscription::{
    self, clamp_expires, negotiate, refresh_delay, ExpiresDecision, Notifier, NotifierState,
    NotifyState, Subscriber, SubscriberState, TerminationReason,
};
use crate::sip::txn::{ClientTransaction, Event, ServerTransaction, Timers, TuEvent, TxnKey};

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
    fn config(&self) -> Arc<Config> {
        Hub::config(self)
    }
    fn maps(&self) -> Arc<MappingSet> {
        Hub::maps(self).current()
    }
}

/// How we appear in Via and Contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentity {
    /// `host:port` of our Via sent-by and Contact.
    pub sent_by: String,
    /// `TCP` or `TLS` (Via transport).
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
        body: MessageBody,
        retried: bool,
    },
    Bye,
}

struct ClientEntry {
    txn: ClientTransaction,
    purpose: Purpose,
    conn: Option<ConnId>,
    domain: Domain,
}

struct ServerEntry {
    txn: ServerTransaction,
    conn: ConnId,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    Notifier(DialogId),
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

/// Most remembered final responses (see `Core::remember`).
const RECENT_LIMIT: usize = 8192;
/// Retry delay after a subscriber failure that may be transient (408, 5xx, transport).
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// CSeq margin added to restored dialogs: NOTIFYs sent after the last state write must not be
/// reused after a restart (RFC 3261 §12.2.1.1: CSeq strictly increases).
const RESTORE_CSEQ_MARGIN: u32 = 1000;

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
    notifiers: HashMap<DialogId, Notifier>,
    notifier_pairs: HashMap<(String, String), Vec<DialogId>>,
    subscribers: HashMap<u64, Subscriber>,
    subscriber_pairs: HashMap<(String, String), u64>,
    subscriber_calls: HashMap<(String, String), u64>,
    sessions: HashMap<u64, ImSession>,
    session_dialogs: HashMap<DialogId, u64>,
    session_pairs: HashMap<(String, String), u64>,
    session_calls: HashMap<(String, String), u64>,
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
    /// Final responses of recent non-INVITE server transactions (see `remember`).
    recent: HashMap<TxnKey, (IpAddr, Bytes)>,
    recent_order: VecDeque<(Instant, TxnKey)>,
    /// Peer address of connections that sent us requests (for `recent`).
    conn_ips: HashMap<ConnId, IpAddr>,
    actions: VecDeque<Action>,
    route_addrs: HashMap<Domain, Vec<IpAddr>>,
    next_id: u64,
    dirty: bool,
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

/// `user@host` of a SIP URI as a core address (`None` for tel: or a URI without user).
fn address_of_uri(uri: &crate::sip::Uri<'_>) -> Option<Address> {
    let s = uri.as_sip()?;
    let user = s.user()?;
    Address::parse(&format!("{user}@{}", s.host().as_str())).ok()
}

fn condition_for_status(code: u16) -> ErrorCondition {
    match code {
        403 | 603 => ErrorCondition::Forbidden,
        404 | 410 | 484 | 604 => ErrorCondition::ItemNotFound,
        408 | 504 => ErrorCondition::RemoteServerTimeout,
        _ => ErrorCondition::ServiceUnavailable,
    }
}

fn status_for_submit(s: &Submitted) -> Option<(u16, &'static str)> {
    match s {
        Submitted::Delivered(_) => None,
        Submitted::Denied(d) => Some(d.condition().sip_status()),
        Submitted::Unavailable(_) => Some((480, "Temporarily Unavailable")),
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
            notifiers: HashMap::new(),
            notifier_pairs: HashMap::new(),
            subscribers: HashMap::new(),
            subscriber_pairs: HashMap::new(),
            subscriber_calls: HashMap::new(),
            sessions: HashMap::new(),
            session_dialogs: HashMap::new(),
            session_pairs: HashMap::new(),
            session_calls: HashMap::new(),
            heap: BinaryHeap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            conn_ips: HashMap::new(),
            actions: VecDeque::new(),
            route_addrs: HashMap::new(),
            next_id: 1,
            dirty: false,
        }
    }

    /// A connection closed: forget what was kept about it.
    pub fn handle_conn_closed(&mut self, conn: ConnId) {
        self.conn_ips.remove(&conn);
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
        let mut t = self.heap.peek().map(|Reverse((at, _))| *at);
        for e in self.server.values() {
            t = min_opt(t, e.txn.poll_timeout());
        }
        for e in self.client.values() {
            t = min_opt(t, e.txn.poll_timeout());
        }
        t
    }

    /// `true` once since the last call if persisted state changed.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Counts for tests and status: (notifiers, subscribers, sessions).
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

    fn via(&self) -> String {
        format!(
            "SIP/2.0/{} {};branch={}{}",
            self.me.transport,
            self.me.sent_by,
            self.branch_prefix,
            random_token(12)
        )
    }

    fn contact_for(&self, user: &Address) -> String {
        format!(
            "sip:{}@{};transport={}",
            user.local,
            self.me.sent_by,
            self.me.transport.to_ascii_lowercase()
        )
    }

    fn schedule(&mut self, key: TimerKey, at: Instant) {
        self.heap.push(Reverse((at, key)));
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

    // ------------------------------------------------------------------ sending

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
                let key = txn.key().clone();
                self.client.insert(
                    key.clone(),
                    ClientEntry {
                        txn,
                        purpose,
                        conn,
                        domain,
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
        if code >= 200 && key.method != "INVITE" {
            if let Some(ip) = self
                .server
                .get(key)
                .and_then(|e| self.conn_ips.get(&e.conn))
            {
                let ip = *ip;
                self.remember(key, ip, resp.to_bytes(), now);
            }
        }
        if let Some(e) = self.server.get_mut(key) {
            e.txn.handle(Event::TuResponse(Box::new(resp)), now);
        }
        self.drain_server(key);
    }

    /// Over TCP a non-INVITE server transaction ends with its final response (Timer J = 0,
    /// RFC 3261 §17.2.2). A peer that re-sends the request anyway (after a reconnect, or a
    /// sloppy stack) must get the same answer and cause nothing twice, so the final response
    /// is kept for 64·T1, bounded in count.
    fn remember(&mut self, key: &TxnKey, ip: IpAddr, bytes: Bytes, now: Instant) {
        let ttl = self.timers.timeout();
        while let Some((at, k)) = self.recent_order.front() {
            if *at + ttl > now && self.recent_order.len() < RECENT_LIMIT {
                break;
            }
            let k = k.clone();
            self.recent_order.pop_front();
            self.recent.remove(&k);
        }
        if self.recent.insert(key.clone(), (ip, bytes)).is_none() {
            self.recent_order.push_back((now, key.clone()));
        }
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
            self.server.remove(key);
        }
    }

    /// A response without a transaction (no RFC 3261 branch, ACK-less cases).
    fn reply_stateless(&mut self, conn: ConnId, req: &SipMessage, code: u16, reason: &str) {
        if let Ok(r) = req.build_response(code, reason, Some(&random_token(10))) {
            m::response("out", code);
            self.actions.push_back(Action::Send {
                conn: Some(conn),
                domain: None,
                bytes: r.to_bytes(),
            });
        }
    }

    // ------------------------------------------------------------------ inbound messages

    /// A message arrived on a connection.
    pub fn handle_message(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        msg: SipMessage,
        now: Instant,
    ) {
        if msg.is_request() {
            self.on_request(hub, peer, msg, now);
        } else {
            self.on_response(hub, peer, msg, now);
        }
    }

    fn on_response(&mut self, hub: &dyn HubPort, peer: &PeerInfo, resp: SipMessage, now: Instant) {
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
                    self.client.remove(key);
                }
                TuEvent::Request(_) => {}
            }
        }
    }

    fn on_request(&mut self, hub: &dyn HubPort, peer: &PeerInfo, req: SipMessage, now: Instant) {
        let method = req.method().unwrap_or("").to_owned();
        self.conn_ips.insert(peer.conn, peer.remote.ip());
        m::request("in", &method);
        if method == "ACK" {
            // An ACK for a non-2xx matches the INVITE server transaction (absorbed there); an
            // ACK for our 2xx is its own end-to-end request and confirms the session (§13.3.1.4).
            if let Ok(key) = TxnKey::server(&req) {
                if let Some(e) = self.server.get_mut(&key) {
                    e.txn.handle(Event::Message(Box::new(req)), now);
                    self.drain_server(&key);
                }
            }
            return;
        }
        if method == "BENOTIFY" {
            // Lync's best-effort NOTIFY (MS-SIPRE §3.4): never answered.
            if let Ok(domain) = self.permit(&hub.config(), peer, &req) {
                self.on_notify(hub, peer, None, &req, &domain, now);
            }
            return;
        }
        let key = match TxnKey::server(&req) {
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
        if let Some((_, b)) = self
            .recent
            .get(&key)
            .filter(|(ip, _)| *ip == peer.remote.ip())
        {
            self.actions.push_back(Action::Send {
                conn: Some(peer.conn),
                domain: None,
                bytes: b.clone(),
            });
            return;
        }
        match ServerTransaction::new(&req, self.timers, now) {
            Ok(txn) => {
                self.server.insert(
                    key.clone(),
                    ServerEntry {
                        txn,
                        conn: peer.conn,
                    },
                );
                self.drain_server(&key);
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot start server transaction");
                self.reply_stateless(peer.conn, &req, 400, "Bad Transaction Headers");
                return;
            }
        }
        let cfg = hub.config();
        let domain = match self.screen(&cfg, peer, &req) {
            Ok(d) => d,
            Err(r) => {
                m::refused(r.label);
                tracing::info!(peer = %peer.remote, method = %method, status = r.status, reason = r.reason, "request refused");
                let tag = random_token(10);
                self.reply(&key, &req, r.status, r.reason, Some(&tag), &[], None, now);
                return;
            }
        };
        self.actions.push_back(Action::Bind {
            conn: peer.conn,
            domain: domain.clone(),
        });
        // RFC 3261 §8.2.2.3: an extension the request requires and we do not support is
        // refused with 420 and listed in Unsupported (e.g. Lync's batched `adhoclist`
        // subscriptions, which this edge does not implement). Never for ACK/CANCEL.
        let unsupported: Vec<&str> = req
            .headers_named(HeaderName::Require)
            .flat_map(|h| h.value.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty() && !SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(t)))
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
        match method.as_str() {
            "SUBSCRIBE" => self.on_subscribe(hub, &cfg, peer, &key, &req, &domain, now),
            "NOTIFY" => self.on_notify(hub, peer, Some(&key), &req, &domain, now),
            "INVITE" => self.on_invite(hub, peer, &key, &req, &domain, now),
            "MESSAGE" => self.on_message(hub, peer, &key, &req, &domain, now),
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
                let invite = TxnKey {
                    method: "INVITE".into(),
                    ..key.clone()
                };
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
    fn screen(&self, cfg: &Config, peer: &PeerInfo, req: &SipMessage) -> Result<Domain, Refuse> {
        let domain = self.permit(cfg, peer, req)?;
        if let Ok(Some(0)) = req.max_forwards() {
            return Err(refuse(483, "Too Many Hops", "too_many_hops"));
        }
        if self.is_loop(req) {
            return Err(refuse(482, "Loop Detected", "loop_detected"));
        }
        let in_dialog = req.to().ok().and_then(|t| t.tag()).is_some();
        let ruri = match req.request_uri() {
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
        if !in_dialog {
            let host = Domain::parse(sip.host().as_str()).ok();
            if !host.is_some_and(|h| cfg.is_local_domain(&h)) {
                return Err(refuse(404, "Not Found (Not A Local Domain)", "not_local"));
            }
            // OPTIONS to the domain itself (a peer probing the edge) needs no user.
            let probe = req.method() == Some("OPTIONS");
            if !probe && sip.user().is_none_or(str::is_empty) {
                return Err(refuse(404, "Not Found (No User)", "no_user"));
            }
        }
        Ok(domain)
    }

    /// Who is talking: the From domain must be a configured SIP federated domain, and the
    /// connection must vouch for it (module doc of `edge` describes the TCP trust).
    fn permit(&self, cfg: &Config, peer: &PeerInfo, req: &SipMessage) -> Result<Domain, Refuse> {
        let from = req
            .from()
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
        // Plain TCP inbound: only the static route's address may speak for the domain.
        if let Some(route) = &fed.route {
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
        let Ok(vias) = req.vias() else { return false };
        vias.iter().any(|v| {
            v.sent_by().eq_ignore_ascii_case(&self.me.sent_by)
                && v.branch()
                    .is_some_and(|b| b.starts_with(&self.branch_prefix))
        })
    }

    // ------------------------------------------------------------------ notifier

    #[allow(clippy::too_many_arguments)]
    fn on_subscribe(
        &mut self,
        hub: &dyn HubPort,
        cfg: &Config,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        domain: &Domain,
        now: Instant,
    ) {
        let is_presence =
            matches!(req.event(), Ok(Some(e)) if e.value.eq_ignore_ascii_case("presence"));
        if !is_presence {
            m::refused("bad_event");
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                489,
                "Bad Event",
                Some(&tag),
                &[("Allow-Events", "presence")],
                None,
                now,
            );
        }
        let decision = clamp_expires(req.expires().ok().flatten());
        let min = subscription::MIN_EXPIRES.to_string();
        if decision == ExpiresDecision::TooBrief {
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                423,
                "Interval Too Brief",
                Some(&tag),
                &[("Min-Expires", &min)],
                None,
                now,
            );
        }
        if req.to().ok().and_then(|t| t.tag()).is_some() {
            return self.on_resubscribe(hub, peer, key, req, decision, now);
        }
        let (Some(watcher), Some(presentity)) = (
            req.from().ok().and_then(|f| address_of_uri(&f.uri)),
            req.request_uri()
                .and_then(Result::ok)
                .and_then(|u| address_of_uri(&u)),
        ) else {
            return self.reply(key, req, 400, "Bad Addresses", None, &[], None, now);
        };
        let format = cfg
            .sip_federated(domain)
            .map_or(crate::config::PresenceFormat::Auto, |f| f.presence_format);
        let accept = req.accept().unwrap_or_default();
        let Some(kind) = negotiate(format, &accept) else {
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                406,
                "Not Acceptable",
                Some(&tag),
                &[(
                    "Accept",
                    "application/pidf+xml, application/msrtc-event-categories+xml",
                )],
                None,
                now,
            );
        };
        let pair = (watcher.bare_string(), presentity.bare_string());
        // Bound: foreign watchers per local user (limits.max_subscriptions_per_user). Counted
        // on demand: only a new SUBSCRIBE pays for it.
        let watchers = self
            .notifier_pairs
            .iter()
            .filter(|((_, p), ids)| *p == pair.1 && !ids.is_empty())
            .count();
        if !self.notifier_pairs.contains_key(&pair)
            && watchers >= cfg.limits.max_subscriptions_per_user
        {
            m::refused("too_many_subscriptions");
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                503,
                "Service Unavailable (Too Many Watchers)",
                Some(&tag),
                &[("Retry-After", "3600")],
                None,
                now,
            );
        }
        let grant = match decision {
            ExpiresDecision::Grant(g) => g,
            _ => 0,
        };
        // A fetch (Expires 0, RFC 6665 §4.4.3) asks the home side for presence, not consent.
        let ask = if grant == 0 {
            Subscription::Probe
        } else {
            Subscription::Subscribe
        };
        let submitted = hub.submit(
            domain,
            Envelope {
                from: watcher.clone(),
                to: presentity.clone(),
                body: Body::Subscription(ask),
            },
        );
        if let Some((code, reason)) = status_for_submit(&submitted) {
            let tag = random_token(10);
            return self.reply(key, req, code, reason, Some(&tag), &[], None, now);
        }
        let tag = random_token(12);
        let dialog = match Dialog::uas(req, &tag) {
            Ok(d) => d,
            Err(_) => return self.reply(key, req, 400, "Bad Dialog Headers", None, &[], None, now),
        };
        // Another dialog of the same pair already approved (Lync re-subscribing after our
        // 481, or from a second endpoint): the consent is the user's, not the dialog's.
        let sibling = self
            .notifier_pairs
            .get(&pair)
            .and_then(|ids| {
                ids.iter()
                    .filter_map(|i| self.notifiers.get(i))
                    .find(|n| n.state == NotifierState::Active)
            })
            .map(|n| n.last.clone());
        let (state, last) = match sibling {
            Some(last) => (NotifierState::Active, last),
            None => (NotifierState::Pending, None),
        };
        let id = dialog.id.clone();
        let expires_s = grant.to_string();
        let contact = format!("<{}>", self.contact_for(&presentity));
        self.reply(
            key,
            req,
            200,
            "OK",
            Some(&tag),
            &[("Expires", &expires_s), ("Contact", &contact)],
            None,
            now,
        );
        let n = Notifier {
            dialog,
            watcher,
            presentity,
            domain: domain.clone(),
            state,
            format: kind,
            expires_at: now + Duration::from_secs(u64::from(grant)),
            last,
            conn: Some(peer.conn),
        };
        self.notifiers.insert(id.clone(), n);
        if grant == 0 {
            self.send_notify(hub, &id, Some(TerminationReason::Timeout), now);
            return;
        }
        self.notifier_pairs
            .entry(pair)
            .or_default()
            .push(id.clone());
        self.schedule(
            TimerKey::Notifier(id.clone()),
            now + Duration::from_secs(u64::from(grant)),
        );
        self.dirty = true;
        self.send_notify(hub, &id, None, now);
    }

    fn on_resubscribe(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        decision: ExpiresDecision,
        now: Instant,
    ) {
        let id = match DialogId::of_incoming_request(req) {
            Ok(id) if self.notifiers.contains_key(&id) => id,
            _ => {
                m::refused("unknown_dialog");
                return self.reply(
                    key,
                    req,
                    481,
                    "Subscription Does Not Exist",
                    None,
                    &[],
                    None,
                    now,
                );
            }
        };
        let seq = req.cseq().map(|c| c.seq).unwrap_or(0);
        let contact = match self.notifiers.get(&id) {
            Some(n) => format!("<{}>", self.contact_for(&n.presentity)),
            None => return,
        };
        let Some(n) = self.notifiers.get_mut(&id) else {
            return;
        };
        if !n.dialog.accept_remote_cseq(seq) {
            return self.reply(key, req, 500, "CSeq Out Of Order", None, &[], None, now);
        }
        n.dialog.refresh_target(req);
        n.conn = Some(peer.conn);
        match decision {
            ExpiresDecision::Grant(g) => {
                n.expires_at = now + Duration::from_secs(u64::from(g));
                let gs = g.to_string();
                self.reply(
                    key,
                    req,
                    200,
                    "OK",
                    None,
                    &[("Expires", &gs), ("Contact", &contact)],
                    None,
                    now,
                );
                self.schedule(
                    TimerKey::Notifier(id.clone()),
                    now + Duration::from_secs(u64::from(g)),
                );
                self.dirty = true;
                // RFC 6665 §4.2.1.2: a refresh is answered with a NOTIFY of the current state.
                self.send_notify(hub, &id, None, now);
            }
            _ => {
                self.reply(
                    key,
                    req,
                    200,
                    "OK",
                    None,
                    &[("Expires", "0"), ("Contact", &contact)],
                    None,
                    now,
                );
                self.end_notifier(hub, &id, TerminationReason::Unsubscribed, true, now);
            }
        }
    }

    /// Sends a terminated NOTIFY, forgets the subscription and, when the peer or time ended
    /// it, tells the home side.
    fn end_notifier(
        &mut self,
        hub: &dyn HubPort,
        id: &DialogId,
        reason: TerminationReason,
        tell_home: bool,
        now: Instant,
    ) {
        self.send_notify(hub, id, Some(reason), now);
        if let Some(n) = self.notifiers.remove(id) {
            let pair = (n.watcher.bare_string(), n.presentity.bare_string());
            if let Some(v) = self.notifier_pairs.get_mut(&pair) {
                v.retain(|d| d != id);
                if v.is_empty() {
                    self.notifier_pairs.remove(&pair);
                }
            }
            let others = self.notifier_pairs.contains_key(&pair);
            if tell_home && !others {
                hub.submit(
                    &n.domain,
                    Envelope {
                        from: n.watcher,
                        to: n.presentity,
                        body: Body::Subscription(Subscription::Unsubscribe),
                    },
                );
            }
            self.dirty = true;
        }
    }

    fn send_notify(
        &mut self,
        hub: &dyn HubPort,
        id: &DialogId,
        terminated: Option<TerminationReason>,
        now: Instant,
    ) {
        let via = self.via();
        let maps = hub.maps();
        let cfg = hub.config();
        let Some(n) = self.notifiers.get(id) else {
            return;
        };
        let contact = self.contact_for(&n.presentity);
        let state = match terminated {
            Some(r) => format!("terminated;reason={}", r.token()),
            None => n.state_header(now),
        };
        let system = cfg
            .sip_federated(&n.domain)
            .map_or("lync", |f| f.system.as_str());
        let body = match (terminated, n.state) {
            (None, NotifierState::Active) => subscription::encode_body(
                &maps,
                system,
                n.last.as_ref(),
                n.format,
                &format!("sip:{}", n.presentity.bare_string()),
            ),
            _ => None,
        };
        let ct = n.format.content_type();
        let (conn, domain) = (n.conn, n.domain.clone());
        let Some(n) = self.notifiers.get_mut(id) else {
            return;
        };
        let req = n.dialog.request(&InDialog {
            method: "NOTIFY",
            via: &via,
            contact: Some(&contact),
            extra: &[("Event", "presence"), ("Subscription-State", &state)],
            body: body.as_deref().map(|b| (ct, b)),
            cseq_override: None,
        });
        // A NOTIFY alone does not mark the state dirty: restored dialogs add
        // RESTORE_CSEQ_MARGIN to the CSeq instead of persisting every increment.
        match req {
            Ok(r) => {
                self.send_request(r, conn, domain, Purpose::Notify { dialog: id.clone() }, now)
            }
            Err(e) => tracing::error!(error = %e, "cannot build NOTIFY"),
        }
    }

    // ------------------------------------------------------------------ subscriber

    fn on_notify(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        key: Option<&TxnKey>,
        req: &SipMessage,
        domain: &Domain,
        now: Instant,
    ) {
        let call_id = req.call_id().unwrap_or("").to_owned();
        let local_tag = req.to().ok().and_then(|t| t.tag()).unwrap_or("").to_owned();
        let remote_tag = req
            .from()
            .ok()
            .and_then(|f| f.tag())
            .unwrap_or("")
            .to_owned();
        let Some(&sid) = self.subscriber_calls.get(&(call_id, local_tag)) else {
            if let Some(k) = key {
                m::refused("unknown_dialog");
                self.reply(
                    k,
                    req,
                    481,
                    "Subscription Does Not Exist",
                    None,
                    &[],
                    None,
                    now,
                );
            }
            return;
        };
        let state = match req
            .subscription_state()
            .ok()
            .flatten()
            .and_then(|t| NotifyState::from_header(&t))
        {
            Some(s) => s,
            None => {
                if let Some(k) = key {
                    self.reply(k, req, 400, "Bad Subscription-State", None, &[], None, now);
                }
                return;
            }
        };
        let seq = req.cseq().map(|c| c.seq).unwrap_or(0);
        let Some(s) = self.subscribers.get_mut(&sid) else {
            return;
        };
        s.conn = Some(peer.conn);
        match &mut s.dialog {
            Some(d) => {
                if !d.accept_remote_cseq(seq) {
                    if let Some(k) = key {
                        self.reply(k, req, 500, "CSeq Out Of Order", None, &[], None, now);
                    }
                    return;
                }
                d.refresh_target(req);
            }
            None => {
                // RFC 6665 §4.1.2.4: the NOTIFY may overtake the 2xx and create the dialog.
                let local_uri = format!("sip:{}", s.watcher.bare_string());
                let remote_uri = format!("sip:{}", s.presentity.bare_string());
                if let Ok(d) = Dialog::uac(
                    &s.call_id,
                    &s.local_tag,
                    &local_uri,
                    &remote_uri,
                    s.cseq,
                    req,
                    &remote_tag,
                ) {
                    s.dialog = Some(d);
                }
                if s.state == SubscriberState::Subscribing {
                    s.state = SubscriberState::Established { approved: false };
                }
            }
        }
        if let Some(k) = key {
            self.reply(k, req, 200, "OK", None, &[], None, now);
        }
        let cfg = hub.config();
        let system = cfg
            .sip_federated(domain)
            .map_or("lync", |f| f.system.as_str())
            .to_owned();
        let Some(s) = self.subscribers.get(&sid) else {
            return;
        };
        let (watcher, presentity, dom) =
            (s.watcher.clone(), s.presentity.clone(), s.domain.clone());
        let unsubscribing = s.state == SubscriberState::Unsubscribing;
        let approved = matches!(s.state, SubscriberState::Established { approved: true });
        let tell = |body: Body| Envelope {
            from: presentity.clone(),
            to: watcher.clone(),
            body,
        };
        let presence = if req.body().is_empty() {
            None
        } else {
            let ct = req
                .header(HeaderName::ContentType)
                .map(|h| h.value)
                .unwrap_or("");
            match subscription::decode_body(&hub.maps(), &system, ct, req.body()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::info!(error = %e, "NOTIFY body ignored");
                    None
                }
            }
        };
        match state {
            NotifyState::Pending => {}
            NotifyState::Active { .. } => {
                if !approved && !unsubscribing {
                    if let Some(s) = self.subscribers.get_mut(&sid) {
                        s.state = SubscriberState::Established { approved: true };
                    }
                    hub.submit(&dom, tell(Body::Subscription(Subscription::Subscribed)));
                }
                if let Some(p) = presence {
                    if let Some(s) = self.subscribers.get_mut(&sid) {
                        s.last = Some(p.clone());
                    }
                    hub.submit(&dom, tell(Body::Presence(p)));
                }
            }
            NotifyState::Terminated { reason } => {
                self.remove_subscriber(sid);
                if unsubscribing {
                    return;
                }
                match reason.as_deref() {
                    // RFC 8048 §5.2.2: rejected / noresource mean the subscription is refused.
                    Some("rejected") | Some("noresource") => {
                        hub.submit(&dom, tell(Body::Subscription(Subscription::Unsubscribed)));
                    }
                    // RFC 6665 §4.1.3: deactivated / timeout: re-subscribe at once; probation /
                    // giveup: later (the subscriber record is re-created by the retry).
                    Some("probation") | Some("giveup") => {
                        let id = self.new_subscriber(watcher, presentity, dom);
                        if let Some(s) = self.subscribers.get_mut(&id) {
                            s.state = SubscriberState::Retrying;
                            s.next_at = Some(now + RETRY_AFTER);
                        }
                        self.schedule(TimerKey::Subscriber(id), now + RETRY_AFTER);
                    }
                    _ => {
                        let id = self.new_subscriber(watcher, presentity, dom);
                        self.send_subscribe(id, now);
                    }
                }
            }
        }
    }

    fn new_subscriber(&mut self, watcher: Address, presentity: Address, domain: Domain) -> u64 {
        let id = self.id();
        let host = self
            .me
            .sent_by
            .split(':')
            .next()
            .unwrap_or("legate")
            .to_owned();
        let s = Subscriber {
            id,
            watcher: watcher.bare(),
            presentity: presentity.bare(),
            domain,
            call_id: format!("{}@{host}", random_token(20)),
            local_tag: random_token(12),
            cseq: 0,
            state: SubscriberState::Subscribing,
            dialog: None,
            next_at: None,
            expires: subscription::SUBSCRIBE_EXPIRES,
            last: None,
            conn: None,
        };
        self.subscriber_pairs
            .insert((s.watcher.bare_string(), s.presentity.bare_string()), id);
        self.subscriber_calls
            .insert((s.call_id.clone(), s.local_tag.clone()), id);
        self.subscribers.insert(id, s);
        id
    }

    fn remove_subscriber(&mut self, id: u64) {
        if let Some(s) = self.subscribers.remove(&id) {
            self.subscriber_calls.remove(&(s.call_id, s.local_tag));
            let pair = (s.watcher.bare_string(), s.presentity.bare_string());
            if self.subscriber_pairs.get(&pair) == Some(&id) {
                self.subscriber_pairs.remove(&pair);
            }
        }
    }

    /// Sends SUBSCRIBE (initial, refresh or, in state Unsubscribing, `Expires: 0`).
    fn send_subscribe(&mut self, id: u64, now: Instant) {
        let via = self.via();
        let Some(s) = self.subscribers.get(&id) else {
            return;
        };
        let contact = self.contact_for(&s.watcher);
        let expires = if s.state == SubscriberState::Unsubscribing {
            0
        } else {
            s.expires
        };
        let es = expires.to_string();
        let extra: [(&str, &str); 4] = [
            ("Event", "presence"),
            (
                "Accept",
                "application/msrtc-event-categories+xml, application/pidf+xml",
            ),
            ("Supported", "eventlist"),
            ("Expires", &es),
        ];
        let (conn, domain) = (s.conn, s.domain.clone());
        let Some(s) = self.subscribers.get_mut(&id) else {
            return;
        };
        let req = match &mut s.dialog {
            Some(d) => d.request(&InDialog {
                method: "SUBSCRIBE",
                via: &via,
                contact: Some(&contact),
                extra: &extra,
                body: None,
                cseq_override: None,
            }),
            None => {
                s.cseq += 1;
                let mut headers: Vec<(&str, String)> = vec![
                    ("Via", via.clone()),
                    ("Max-Forwards", "70".into()),
                    (
                        "From",
                        format!("<sip:{}>;tag={}", s.watcher.bare_string(), s.local_tag),
                    ),
                    ("To", format!("<sip:{}>", s.presentity.bare_string())),
                    ("Call-ID", s.call_id.clone()),
                    ("CSeq", format!("{} SUBSCRIBE", s.cseq)),
                    ("Contact", format!("<{contact}>")),
                ];
                headers.extend(extra.iter().map(|(n, v)| (*n, (*v).to_owned())));
                build_request(
                    "SUBSCRIBE",
                    &format!("sip:{}", s.presentity.bare_string()),
                    &headers,
                    None,
                )
            }
        };
        match req {
            Ok(r) => self.send_request(r, conn, domain, Purpose::Subscribe { id, expires }, now),
            Err(e) => tracing::error!(error = %e, "cannot build SUBSCRIBE"),
        }
    }

    // ------------------------------------------------------------------ IM

    fn on_invite(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        domain: &Domain,
        now: Instant,
    ) {
        let host = self
            .me
            .sent_by
            .split(':')
            .next()
            .unwrap_or("legate")
            .to_owned();
        if req.to().ok().and_then(|t| t.tag()).is_some() {
            // re-INVITE (a session refresh): answer with the same SDP if we know the dialog.
            let known = DialogId::of_incoming_request(req)
                .ok()
                .and_then(|id| self.session_dialogs.get(&id).copied());
            return match known {
                Some(sid) => {
                    if let Some(s) = self.sessions.get_mut(&sid) {
                        s.last_activity = now;
                        s.conn = Some(peer.conn);
                    }
                    let sdp = im_session::sdp(&host, sid);
                    self.reply(
                        key,
                        req,
                        200,
                        "OK",
                        None,
                        &[],
                        Some(("application/sdp", &sdp)),
                        now,
                    )
                }
                None => self.reply(
                    key,
                    req,
                    481,
                    "Call/Transaction Does Not Exist",
                    None,
                    &[],
                    None,
                    now,
                ),
            };
        }
        let is_sdp = matches!(req.content_type(), Ok(Some(ct)) if ct.is("application", "sdp"));
        if !is_sdp || !im_session::sdp_offers_im(req.body()) {
            m::refused("not_im_session");
            let tag = random_token(10);
            return self.reply(
                key,
                req,
                488,
                "Not Acceptable Here (IM Sessions Only)",
                Some(&tag),
                &[],
                None,
                now,
            );
        }
        let (Some(remote), Some(local)) = (
            req.from().ok().and_then(|f| address_of_uri(&f.uri)),
            req.request_uri()
                .and_then(Result::ok)
                .and_then(|u| address_of_uri(&u)),
        ) else {
            return self.reply(key, req, 400, "Bad Addresses", None, &[], None, now);
        };
        if let Some(text) = im_session::first_message(req) {
            let env = Envelope {
                from: remote.clone(),
                to: local.clone(),
                body: Body::Message(MessageBody {
                    id: None,
                    text,
                    thread: None,
                }),
            };
            if let Some((code, reason)) = status_for_submit(&hub.submit(domain, env)) {
                let tag = random_token(10);
                return self.reply(key, req, code, reason, Some(&tag), &[], None, now);
            }
        }
        let tag = random_token(12);
        let Ok(dialog) = Dialog::uas(req, &tag) else {
            return self.reply(key, req, 400, "Bad Dialog Headers", None, &[], None, now);
        };
        let sid = self.id();
        let did = dialog.id.clone();
        let contact = format!("<{}>", self.contact_for(&local));
        let sdp = im_session::sdp(&host, sid);
        self.reply(
            key,
            req,
            200,
            "OK",
            Some(&tag),
            &[("Contact", &contact)],
            Some(("application/sdp", &sdp)),
            now,
        );
        let pair = (local.bare_string(), remote.bare_string());
        let s = ImSession {
            id: sid,
            local: local.bare(),
            remote: remote.bare(),
            domain: domain.clone(),
            state: SessionState::Established,
            dialog: Some(dialog),
            call_id: did.call_id.clone(),
            local_tag: tag,
            invite_cseq: 0,
            queue: VecDeque::new(),
            last_activity: now,
            conn: Some(peer.conn),
        };
        self.sessions.insert(sid, s);
        self.session_dialogs.insert(did, sid);
        self.session_pairs.insert(pair, sid);
        self.schedule(TimerKey::Session(sid), now + self.im_idle);
    }

    fn on_message(
        &mut self,
        hub: &dyn HubPort,
        peer: &PeerInfo,
        key: &TxnKey,
        req: &SipMessage,
        domain: &Domain,
        now: Instant,
    ) {
        let in_dialog = req.to().ok().and_then(|t| t.tag()).is_some();
        let mut session = None;
        if in_dialog {
            let sid = DialogId::of_incoming_request(req)
                .ok()
                .and_then(|id| self.session_dialogs.get(&id).copied());
            let Some(sid) = sid else {
                m::refused("unknown_dialog");
                return self.reply(
                    key,
                    req,
                    481,
                    "Call/Transaction Does Not Exist",
                    None,
                    &[],
                    None,
                    now,
                );
            };
            let seq = req.cseq().map(|c| c.seq).unwrap_or(0);
            if let Some(s) = self.sessions.get_mut(&sid) {
                if let Some(d) = &mut s.dialog {
                    if !d.accept_remote_cseq(seq) {
                        return self.reply(
                            key,
                            req,
                            500,
                            "CSeq Out Of Order",
                            None,
                            &[],
                            None,
                            now,
                        );
                    }
                }
                s.last_activity = now;
                s.conn = Some(peer.conn);
                session = Some((s.remote.clone(), s.local.clone()));
            }
        }
        let ct = req.content_type().ok().flatten();
        let text = match im_session::text_of(ct.as_ref(), req.body()) {
            Content::Text(t) => t,
            Content::Ignore => {
                let tag = (!in_dialog).then(|| random_token(10));
                return self.reply(key, req, 200, "OK", tag.as_deref(), &[], None, now);
            }
            Content::Unsupported => {
                m::refused("unsupported_media_type");
                let tag = (!in_dialog).then(|| random_token(10));
                return self.reply(
                    key,
                    req,
                    415,
                    "Unsupported Media Type",
                    tag.as_deref(),
                    &[("Accept", im_session::ACCEPT_HEADER)],
                    None,
                    now,
                );
            }
        };
        let (from, to) = match session {
            Some(p) => p,
            None => match (
                req.from().ok().and_then(|f| address_of_uri(&f.uri)),
                req.request_uri()
                    .and_then(Result::ok)
                    .and_then(|u| address_of_uri(&u)),
            ) {
                (Some(f), Some(t)) => (f, t),
                _ => return self.reply(key, req, 400, "Bad Addresses", None, &[], None, now),
            },
        };
        let env = Envelope {
            from,
            to,
            body: Body::Message(MessageBody {
                id: None,
                text,
                thread: None,
            }),
        };
        let tag = (!in_dialog).then(|| random_token(10));
        match status_for_submit(&hub.submit(domain, env)) {
            None => self.reply(key, req, 200, "OK", tag.as_deref(), &[], None, now),
            Some((code, reason)) => {
                self.reply(key, req, code, reason, tag.as_deref(), &[], None, now)
            }
        }
    }

    fn on_bye(&mut self, key: &TxnKey, req: &SipMessage, now: Instant) {
        let sid = DialogId::of_incoming_request(req)
            .ok()
            .and_then(|id| self.session_dialogs.get(&id).copied());
        match sid {
            Some(sid) => {
                self.reply(key, req, 200, "OK", None, &[], None, now);
                self.remove_session(sid);
            }
            None => self.reply(
                key,
                req,
                481,
                "Call/Transaction Does Not Exist",
                None,
                &[],
                None,
                now,
            ),
        }
    }

    fn remove_session(&mut self, sid: u64) -> Option<ImSession> {
        let s = self.sessions.remove(&sid)?;
        if let Some(d) = &s.dialog {
            self.session_dialogs.remove(&d.id);
        }
        self.session_calls
            .remove(&(s.call_id.clone(), s.local_tag.clone()));
        let pair = (s.local.bare_string(), s.remote.bare_string());
        if self.session_pairs.get(&pair) == Some(&sid) {
            self.session_pairs.remove(&pair);
        }
        Some(s)
    }

    fn open_session(
        &mut self,
        local: Address,
        remote: Address,
        domain: Domain,
        first: MessageBody,
        now: Instant,
    ) {
        let sid = self.id();
        let host = self
            .me
            .sent_by
            .split(':')
            .next()
            .unwrap_or("legate")
            .to_owned();
        let s = ImSession {
            id: sid,
            local: local.bare(),
            remote: remote.bare(),
            domain: domain.clone(),
            state: SessionState::Inviting,
            dialog: None,
            call_id: format!("{}@{host}", random_token(20)),
            local_tag: random_token(12),
            invite_cseq: 1,
            queue: VecDeque::from([first]),
            last_activity: now,
            conn: None,
        };
        let via = self.via();
        let contact = self.contact_for(&s.local);
        let headers: Vec<(&str, String)> = vec![
            ("Via", via),
            ("Max-Forwards", "70".into()),
            (
                "From",
                format!("<sip:{}>;tag={}", s.local.bare_string(), s.local_tag),
            ),
            ("To", format!("<sip:{}>", s.remote.bare_string())),
            ("Call-ID", s.call_id.clone()),
            ("CSeq", "1 INVITE".into()),
            ("Contact", format!("<{contact}>")),
            ("Supported", "ms-text-format".into()),
        ];
        let sdp = im_session::sdp(&host, sid);
        let req = build_request(
            "INVITE",
            &format!("sip:{}", s.remote.bare_string()),
            &headers,
            Some(("application/sdp", &sdp)),
        );
        self.session_pairs
            .insert((s.local.bare_string(), s.remote.bare_string()), sid);
        self.session_calls
            .insert((s.call_id.clone(), s.local_tag.clone()), sid);
        self.sessions.insert(sid, s);
        match req {
            Ok(r) => self.send_request(r, None, domain, Purpose::Invite { session: sid }, now),
            Err(e) => tracing::error!(error = %e, "cannot build INVITE"),
        }
    }

    fn send_session_message(&mut self, sid: u64, body: MessageBody, now: Instant) {
        let via = self.via();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.last_activity = now;
        let (conn, domain, from, to) =
            (s.conn, s.domain.clone(), s.local.clone(), s.remote.clone());
        let Some(d) = &mut s.dialog else {
            s.queue.push_back(body);
            return;
        };
        let req = d.request(&InDialog {
            method: "MESSAGE",
            via: &via,
            contact: None,
            extra: &[],
            body: Some(("text/plain;charset=UTF-8", body.text.as_bytes())),
            cseq_override: None,
        });
        match req {
            Ok(r) => self.send_request(
                r,
                conn,
                domain,
                Purpose::Message {
                    session: Some(sid),
                    from,
                    to,
                    body,
                    retried: false,
                },
                now,
            ),
            Err(e) => tracing::error!(error = %e, "cannot build MESSAGE"),
        }
    }

    fn bounce_message(
        &self,
        hub: &dyn HubPort,
        domain: &Domain,
        from: &Address,
        to: &Address,
        body: &MessageBody,
        code: u16,
    ) {
        let condition = condition_for_status(code);
        let env = Envelope {
            from: to.clone(),
            to: from.clone(),
            body: Body::Error {
                id: body.id.clone(),
                condition,
                text: format!("the SIP peer answered {code}"),
                kind: crate::gateway::envelope::ErrorOf::Message,
            },
        };
        hub.submit(domain, env);
    }

    // ------------------------------------------------------------------ client responses

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
                    if let Some(n) = self.notifiers.remove(dialog) {
                        let pair = (n.watcher.bare_string(), n.presentity.bare_string());
                        if let Some(v) = self.notifier_pairs.get_mut(&pair) {
                            v.retain(|d| d != dialog);
                            if v.is_empty() {
                                self.notifier_pairs.remove(&pair);
                            }
                        }
                        self.dirty = true;
                    }
                }
            }
            Purpose::Subscribe { id, expires } => {
                self.on_subscribe_response(hub, *id, *expires, resp, code, conn, now)
            }
            Purpose::Invite { session } => {
                let sid = *session;
                if (200..300).contains(&code) {
                    self.on_invite_ok(sid, resp, conn, now);
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
                    self.open_session(from.clone(), to.clone(), domain, body.clone(), now);
                    return;
                }
                self.bounce_message(hub, &domain, from, to, body, code);
            }
            Purpose::Bye => {}
        }
    }

    fn on_invite_ok(&mut self, sid: u64, resp: &SipMessage, conn: Option<ConnId>, now: Instant) {
        let via = self.via();
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let Some(tag) = resp.to().ok().and_then(|t| t.tag()).map(str::to_owned) else {
            return;
        };
        if s.dialog.is_none() {
            let local_uri = format!("sip:{}", s.local.bare_string());
            let remote_uri = format!("sip:{}", s.remote.bare_string());
            match Dialog::uac(
                &s.call_id,
                &s.local_tag,
                &local_uri,
                &remote_uri,
                s.invite_cseq,
                resp,
                &tag,
            ) {
                Ok(d) => s.dialog = Some(d),
                Err(e) => {
                    tracing::info!(error = %e, "unusable 2xx to INVITE");
                    return;
                }
            }
        }
        if conn.is_some() {
            s.conn = conn;
        }
        s.state = SessionState::Established;
        s.last_activity = now;
        let cseq = s.invite_cseq;
        let (sconn, domain) = (s.conn, s.domain.clone());
        let Some(d) = &mut s.dialog else { return };
        let did = d.id.clone();
        // §13.2.2.4: the ACK for a 2xx is sent by the dialog, outside any transaction.
        if let Ok(ack) = d.request(&InDialog {
            method: "ACK",
            via: &via,
            contact: None,
            extra: &[],
            body: None,
            cseq_override: Some(cseq),
        }) {
            m::request("out", "ACK");
            self.actions.push_back(Action::Send {
                conn: sconn,
                domain: Some(domain),
                bytes: ack.to_bytes(),
            });
        }
        let queue: Vec<MessageBody> = s.queue.drain(..).collect();
        self.session_dialogs.insert(did, sid);
        self.schedule(TimerKey::Session(sid), now + self.im_idle);
        for b in queue {
            self.send_session_message(sid, b, now);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_subscribe_response(
        &mut self,
        hub: &dyn HubPort,
        id: u64,
        asked: u32,
        resp: &SipMessage,
        code: u16,
        conn: Option<ConnId>,
        now: Instant,
    ) {
        let Some(s) = self.subscribers.get_mut(&id) else {
            return;
        };
        if conn.is_some() {
            s.conn = conn;
        }
        let tell = |s: &Subscriber, body: Body| {
            (
                s.domain.clone(),
                Envelope {
                    from: s.presentity.clone(),
                    to: s.watcher.clone(),
                    body,
                },
            )
        };
        if (200..300).contains(&code) {
            if asked == 0 || s.state == SubscriberState::Unsubscribing {
                self.remove_subscriber(id);
                return;
            }
            if s.dialog.is_none() {
                if let Some(tag) = resp.to().ok().and_then(|t| t.tag()) {
                    let local_uri = format!("sip:{}", s.watcher.bare_string());
                    let remote_uri = format!("sip:{}", s.presentity.bare_string());
                    if let Ok(d) = Dialog::uac(
                        &s.call_id,
                        &s.local_tag,
                        &local_uri,
                        &remote_uri,
                        s.cseq,
                        resp,
                        tag,
                    ) {
                        s.dialog = Some(d);
                    }
                }
            } else if let Some(d) = &mut s.dialog {
                d.refresh_target(resp);
            }
            if matches!(
                s.state,
                SubscriberState::Subscribing | SubscriberState::Retrying
            ) {
                s.state = SubscriberState::Established { approved: false };
            }
            let granted = resp
                .expires()
                .ok()
                .flatten()
                .unwrap_or(asked)
                .min(asked.max(1));
            let at = now + refresh_delay(granted.max(1));
            s.next_at = Some(at);
            self.schedule(TimerKey::Subscriber(id), at);
            return;
        }
        match code {
            423 => {
                // RFC 6665 §4.1.2.1: retry with at least Min-Expires.
                let min = resp
                    .header(HeaderName::MinExpires)
                    .and_then(|h| header::parse_u32(h.value).ok())
                    .unwrap_or(subscription::SUBSCRIBE_EXPIRES);
                if min <= s.expires || min > 86_400 {
                    tracing::info!(min, "unusable Min-Expires; giving up");
                    self.remove_subscriber(id);
                    return;
                }
                s.expires = min;
                self.send_subscribe(id, now);
            }
            481 if s.dialog.is_some() && s.state != SubscriberState::Unsubscribing => {
                // RFC 6665 §4.1.2.2: the dialog is gone; start a new subscription.
                let (w, p, d) = (s.watcher.clone(), s.presentity.clone(), s.domain.clone());
                self.remove_subscriber(id);
                let nid = self.new_subscriber(w, p, d);
                self.send_subscribe(nid, now);
            }
            489 => {
                tracing::warn!(code, "peer does not support the presence event; giving up");
                self.remove_subscriber(id);
            }
            408 | 480 | 500..=599 if s.state != SubscriberState::Unsubscribing => {
                s.state = SubscriberState::Retrying;
                s.dialog = None;
                s.next_at = Some(now + RETRY_AFTER);
                self.schedule(TimerKey::Subscriber(id), now + RETRY_AFTER);
            }
            _ => {
                // 403/603 (RFC 8048 §5.2.2) and every other refusal: the subscription is denied.
                let unsubscribing = s.state == SubscriberState::Unsubscribing;
                let (d, env) = tell(s, Body::Subscription(Subscription::Unsubscribed));
                self.remove_subscriber(id);
                if !unsubscribing {
                    hub.submit(&d, env);
                }
            }
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

    // ------------------------------------------------------------------ deliveries

    /// The core sent `env` toward SIP `domain`.
    pub fn handle_delivery(
        &mut self,
        hub: &dyn HubPort,
        domain: &Domain,
        env: Envelope,
        now: Instant,
    ) {
        match env.body {
            Body::Presence(p) => {
                let pair = (env.to.bare_string(), env.from.bare_string());
                let ids = self.notifier_pairs.get(&pair).cloned().unwrap_or_default();
                if ids.is_empty() {
                    tracing::debug!("presence for a watcher without subscription dropped");
                }
                for id in ids {
                    let mut activated = false;
                    if let Some(n) = self.notifiers.get_mut(&id) {
                        n.last = Some(p.clone());
                        // Presence reaching a pending watcher means the home side lets it see
                        // the user (an XMPP server only sends presence to approved
                        // subscribers); offline presence is how polite blocking looks.
                        activated = n.state == NotifierState::Pending;
                        n.state = NotifierState::Active;
                    }
                    self.dirty |= activated;
                    self.send_notify(hub, &id, None, now);
                }
            }
            Body::Subscription(Subscription::Subscribed) => {
                let pair = (env.to.bare_string(), env.from.bare_string());
                for id in self.notifier_pairs.get(&pair).cloned().unwrap_or_default() {
                    let changed = match self.notifiers.get_mut(&id) {
                        Some(n) if n.state == NotifierState::Pending => {
                            n.state = NotifierState::Active;
                            true
                        }
                        _ => false,
                    };
                    if changed {
                        self.dirty = true;
                        self.send_notify(hub, &id, None, now);
                    }
                }
            }
            Body::Subscription(Subscription::Unsubscribed) => {
                let pair = (env.to.bare_string(), env.from.bare_string());
                for id in self.notifier_pairs.get(&pair).cloned().unwrap_or_default() {
                    self.end_notifier(hub, &id, TerminationReason::Rejected, false, now);
                }
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
                    None => {
                        // Bound: outbound subscriptions per local user.
                        let watcher = env.from.bare_string();
                        let n = self
                            .subscriber_pairs
                            .keys()
                            .filter(|(w, _)| *w == watcher)
                            .count();
                        if n >= hub.config().limits.max_subscriptions_per_user {
                            m::refused("too_many_subscriptions");
                            if let Some(b) = env.bounce(
                                ErrorCondition::ResourceConstraint,
                                "too many presence subscriptions for this user",
                            ) {
                                hub.submit(domain, b);
                            }
                            return;
                        }
                        let id = self.new_subscriber(env.from, env.to, domain.clone());
                        self.send_subscribe(id, now);
                    }
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
            Body::Subscription(Subscription::Probe) => {
                let pair = (env.from.bare_string(), env.to.bare_string());
                let last = self
                    .subscriber_pairs
                    .get(&pair)
                    .and_then(|id| self.subscribers.get(id))
                    .and_then(|s| s.last.clone());
                if let Some(p) = last {
                    hub.submit(
                        domain,
                        Envelope {
                            from: env.to,
                            to: env.from,
                            body: Body::Presence(p),
                        },
                    );
                }
            }
            Body::Message(body) => {
                let pair = (env.from.bare_string(), env.to.bare_string());
                match self.session_pairs.get(&pair).copied() {
                    Some(sid) => self.send_session_message(sid, body, now),
                    None => self.open_session(env.from, env.to, domain.clone(), body, now),
                }
            }
            Body::Error { condition, .. } => {
                tracing::debug!(
                    condition = condition.label(),
                    "error for a SIP peer dropped (requests are answered synchronously)"
                );
            }
            Body::Xmpp(_) => {}
        }
    }

    // ------------------------------------------------------------------ timers

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, hub: &dyn HubPort, now: Instant) {
        let due_server: Vec<TxnKey> = self
            .server
            .iter()
            .filter(|(_, e)| e.txn.poll_timeout().is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in due_server {
            if let Some(e) = self.server.get_mut(&k) {
                e.txn.handle(Event::Timer, now);
            }
            self.drain_server(&k);
        }
        let due_client: Vec<TxnKey> = self
            .client
            .iter()
            .filter(|(_, e)| e.txn.poll_timeout().is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in due_client {
            if let Some(e) = self.client.get_mut(&k) {
                e.txn.handle(Event::Timer, now);
            }
            self.drain_client(hub, &k, None, now);
        }
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, key))) = self.heap.pop() else {
                break;
            };
            match key {
                TimerKey::Notifier(id) => {
                    let expired = self.notifiers.get(&id).is_some_and(|n| n.expires_at <= now);
                    if expired {
                        self.end_notifier(hub, &id, TerminationReason::Timeout, true, now);
                    }
                }
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
                        Some(t) if t <= now => self.close_session(sid, now),
                        Some(t) => self.schedule(TimerKey::Session(sid), t),
                        None => {}
                    }
                }
            }
        }
    }

    /// Idle session: BYE (Lync closes idle IM sessions after 10 minutes as well).
    fn close_session(&mut self, sid: u64, now: Instant) {
        let via = self.via();
        let Some(mut s) = self.remove_session(sid) else {
            return;
        };
        for b in s.queue.drain(..) {
            tracing::debug!(
                len = b.text.len(),
                "queued message dropped with idle session"
            );
        }
        let Some(d) = &mut s.dialog else { return };
        if let Ok(bye) = d.request(&InDialog {
            method: "BYE",
            via: &via,
            contact: None,
            extra: &[],
            body: None,
            cseq_override: None,
        }) {
            self.send_request(bye, s.conn, s.domain.clone(), Purpose::Bye, now);
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

    // ------------------------------------------------------------------ persistence

    /// The state to write (notifier subscriptions; see `edge` module doc).
    pub fn snapshot(&self, now: Instant, wall: SystemTime) -> PersistedState {
        let base = wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut notifiers: Vec<PersistedNotifier> = self
            .notifiers
            .values()
            .map(|n| PersistedNotifier {
                dialog: n.dialog.clone(),
                watcher: n.watcher.bare_string(),
                presentity: n.presentity.bare_string(),
                domain: n.domain.to_string(),
                active: n.state == NotifierState::Active,
                msrtc: n.format == SipBodyKind::Msrtc,
                expires_unix: base + n.expires_at.saturating_duration_since(now).as_secs(),
            })
            .collect();
        notifiers.sort_by(|a, b| a.dialog.id.cmp(&b.dialog.id));
        PersistedState {
            version: 1,
            notifiers,
        }
    }

    /// Writes the same state as [`Core::snapshot`] as JSON into `out` without cloning the
    /// dialogs (a large table must not double its memory once a second).
    pub fn write_snapshot(
        &self,
        now: Instant,
        wall: SystemTime,
        out: &mut impl std::io::Write,
    ) -> serde_json::Result<()> {
        #[derive(Serialize)]
        struct NotifierRef<'a> {
            dialog: &'a Dialog,
            watcher: String,
            presentity: String,
            domain: &'a str,
            active: bool,
            msrtc: bool,
            expires_unix: u64,
        }
        #[derive(Serialize)]
        struct StateRef<'a> {
            version: u32,
            notifiers: Vec<NotifierRef<'a>>,
        }
        let base = wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut notifiers: Vec<NotifierRef<'_>> = self
            .notifiers
            .values()
            .map(|n| NotifierRef {
                dialog: &n.dialog,
                watcher: n.watcher.bare_string(),
                presentity: n.presentity.bare_string(),
                domain: n.domain.as_str(),
                active: n.state == NotifierState::Active,
                msrtc: n.format == SipBodyKind::Msrtc,
                expires_unix: base + n.expires_at.saturating_duration_since(now).as_secs(),
            })
            .collect();
        notifiers.sort_by(|a, b| a.dialog.id.cmp(&b.dialog.id));
        serde_json::to_writer(
            out,
            &StateRef {
                version: 1,
                notifiers,
            },
        )
    }

    /// Reloads notifier subscriptions written before a restart. Expired entries are dropped;
    /// active ones ask the home side for current presence (a Probe) so the next NOTIFY is right.
    pub fn restore(
        &mut self,
        hub: &dyn HubPort,
        state: PersistedState,
        now: Instant,
        wall: SystemTime,
    ) -> usize {
        let base = wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let cfg = hub.config();
        let mut n_restored = 0;
        for p in state.notifiers {
            if p.expires_unix <= base {
                continue;
            }
            let (Ok(watcher), Ok(presentity), Ok(domain)) = (
                Address::parse(&p.watcher),
                Address::parse(&p.presentity),
                Domain::parse(&p.domain),
            ) else {
                continue;
            };
            if cfg.sip_federated(&domain).is_none() || !cfg.is_local_domain(&presentity.domain) {
                continue;
            }
            let mut dialog = p.dialog;
            dialog.local_cseq = dialog.local_cseq.saturating_add(RESTORE_CSEQ_MARGIN);
            let id = dialog.id.clone();
            let expires_at = now + Duration::from_secs(p.expires_unix - base);
            let active = p.active;
            let n = Notifier {
                dialog,
                watcher: watcher.clone(),
                presentity: presentity.clone(),
                domain: domain.clone(),
                state: if active {
                    NotifierState::Active
                } else {
                    NotifierState::Pending
                },
                format: if p.msrtc {
                    SipBodyKind::Msrtc
                } else {
                    SipBodyKind::Pidf
                },
                expires_at,
                last: None,
                conn: None,
            };
            self.notifier_pairs
                .entry((watcher.bare_string(), presentity.bare_string()))
                .or_default()
                .push(id.clone());
            self.notifiers.insert(id.clone(), n);
            self.schedule(TimerKey::Notifier(id), expires_at);
            n_restored += 1;
            let ask = if active {
                Subscription::Probe
            } else {
                Subscription::Subscribe
            };
            hub.submit(
                &domain,
                Envelope {
                    from: watcher,
                    to: presentity,
                    body: Body::Subscription(ask),
                },
            );
        }
        n_restored
    }
}

/// Option tags we accept in `Require` (RFC 3261 §20.32).
const SUPPORTED: &[&str] = &["ms-benotify", "ms-text-format"];

/// Methods we answer (RFC 3261 §20.5).
pub const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, MESSAGE, SUBSCRIBE, NOTIFY, INFO";

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, BUILTIN_SYSTEMS};
    use crate::gateway::Link;
    use crate::presence::map;
    use crate::sip::parse::{parse_datagram, parse_exact};
    use std::cell::RefCell;
    use std::path::Path;

    const CONFIG: &str = r#"routing_node = "hn1"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
default_system = "xmpp"
"#;

    struct FakeHub {
        cfg: Arc<Config>,
        maps: Arc<MappingSet>,
        got: RefCell<Vec<Envelope>>,
    }

    impl HubPort for FakeHub {
        fn submit(&self, _domain: &Domain, env: Envelope) -> Submitted {
            self.got.borrow_mut().push(env);
            Submitted::Delivered(Link::Component {
                home_node: "hn1".into(),
            })
        }
        fn config(&self) -> Arc<Config> {
            self.cfg.clone()
        }
        fn maps(&self) -> Arc<MappingSet> {
            self.maps.clone()
        }
    }

    fn hub() -> FakeHub {
        FakeHub {
            cfg: Arc::new(
                config::from_toml(CONFIG, Path::new("t.toml"), BUILTIN_SYSTEMS).expect("config"),
            ),
            maps: Arc::new(map::embedded().expect("maps")),
            got: RefCell::new(Vec::new()),
        }
    }

    fn core() -> Core {
        Core::new(
            LocalIdentity {
                sent_by: "example.com:5061".into(),
                transport: "TLS",
            },
            Duration::from_secs(600),
        )
    }

    fn peer() -> PeerInfo {
        PeerInfo {
            conn: 1,
            remote: "192.0.2.1:5061".parse().expect("addr"),
            tls: true,
            verified: vec![Domain::parse("partner.com").expect("domain")],
            outbound_to: None,
        }
    }

    fn dom() -> Domain {
        Domain::parse("partner.com").expect("domain")
    }

    /// Drains the actions into the messages sent.
    fn sent(c: &mut Core) -> Vec<SipMessage> {
        let mut out = Vec::new();
        while let Some(a) = c.poll_action() {
            if let Action::Send { bytes, .. } = a {
                out.push(parse_exact(bytes).expect("we send valid SIP"));
            }
        }
        out
    }

    fn msg(text: &str) -> SipMessage {
        parse_datagram(text.replace('\n', "\r\n").as_bytes()).expect("test message parses")
    }

    fn subscribe_text(expires: u32) -> String {
        format!(
            "SUBSCRIBE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKs1\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=b\n\
To: <sip:alice@example.com>\n\
Call-ID: c1\n\
CSeq: 1 SUBSCRIBE\n\
Contact: <sip:bob@10.0.0.1:5061;transport=tls>\n\
Event: presence\n\
Expires: {expires}\n\
Content-Length: 0\n\n"
        )
    }

    fn env(from: &str, to: &str, body: Body) -> Envelope {
        Envelope {
            from: Address::parse(from).expect("addr"),
            to: Address::parse(to).expect("addr"),
            body,
        }
    }

    #[test]
    fn notifier_expires_with_timeout_notify() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        c.handle_message(&h, &peer(), msg(&subscribe_text(60)), t0);
        let out = sent(&mut c);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].status(), Some(200));
        assert_eq!(out[1].method(), Some("NOTIFY"));
        assert_eq!(h.got.borrow().len(), 1);
        assert!(c
            .poll_timeout()
            .is_some_and(|t| t <= t0 + Duration::from_secs(60)));
        c.handle_timeout(&h, t0 + Duration::from_secs(59));
        assert!(sent(&mut c).is_empty());
        c.handle_timeout(&h, t0 + Duration::from_secs(61));
        let out = sent(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].header_value_by_raw_name("Subscription-State"),
            Some("terminated;reason=timeout")
        );
        assert_eq!(
            h.got.borrow().last().map(|e| e.body.clone()),
            Some(Body::Subscription(Subscription::Unsubscribe))
        );
        assert_eq!(c.counts().0, 0);
    }

    #[test]
    fn notify_is_answered_481_for_unknown_and_refresh_cseq_must_grow() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
        let out = sent(&mut c);
        let tag = out[0]
            .to()
            .ok()
            .and_then(|t| t.tag())
            .unwrap_or("")
            .to_owned();
        // Same CSeq again inside the dialog: out of order (§12.2.2).
        let refresh = subscribe_text(3600)
            .replace(
                "To: <sip:alice@example.com>",
                &format!("To: <sip:alice@example.com>;tag={tag}"),
            )
            .replace("z9hG4bKs1", "z9hG4bKs2");
        c.handle_message(&h, &peer(), msg(&refresh), t0);
        assert_eq!(sent(&mut c)[0].status(), Some(500));
        let refresh = refresh
            .replace("CSeq: 1 SUBSCRIBE", "CSeq: 2 SUBSCRIBE")
            .replace("z9hG4bKs2", "z9hG4bKs3");
        c.handle_message(&h, &peer(), msg(&refresh), t0);
        let out = sent(&mut c);
        assert_eq!(out[0].status(), Some(200));
        assert_eq!(out[1].method(), Some("NOTIFY"));
    }

    #[test]
    fn subscriber_refreshes_before_expiry_and_honours_423() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        c.handle_delivery(
            &h,
            &dom(),
            env(
                "alice@example.com",
                "bob@partner.com",
                Body::Subscription(Subscription::Subscribe),
            ),
            t0,
        );
        let out = sent(&mut c);
        assert_eq!(out.len(), 1);
        let sub = &out[0];
        assert_eq!(sub.expires(), Ok(Some(3600)));
        // 423: retry with Min-Expires.
        let mut r = sub
            .build_response(423, "Interval Too Brief", Some("bt"))
            .expect("resp");
        r.push_header("Min-Expires", "7200").expect("hdr");
        c.handle_message(&h, &peer(), r, t0);
        let out = sent(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].expires(), Ok(Some(7200)));
        // 200 with a shorter grant: refresh at 9/10 of it.
        let mut ok = out[0].build_response(200, "OK", Some("bt")).expect("resp");
        ok.push_header("Expires", "600").expect("hdr");
        ok.push_header("Contact", "<sip:bob@10.0.0.1>")
            .expect("hdr");
        c.handle_message(&h, &peer(), ok, t0);
        assert!(sent(&mut c).is_empty());
        c.handle_timeout(&h, t0 + Duration::from_secs(539));
        assert!(sent(&mut c).is_empty());
        c.handle_timeout(&h, t0 + Duration::from_secs(540));
        let out = sent(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].request_uri_str(), Some("sip:bob@10.0.0.1"));
        assert_eq!(out[0].to().ok().and_then(|t| t.tag()), Some("bt"));
        // Nothing was told to the home side yet (no NOTIFY active).
        assert!(h.got.borrow().is_empty());
    }

    #[test]
    fn subscriber_follows_rfc8048_on_notify_states_and_403() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        let sub_env = env(
            "alice@example.com",
            "bob@partner.com",
            Body::Subscription(Subscription::Subscribe),
        );
        c.handle_delivery(&h, &dom(), sub_env.clone(), t0);
        let sub = sent(&mut c).remove(0);
        let call = sub.call_id().expect("call-id").to_owned();
        let tag = sub
            .from()
            .ok()
            .and_then(|f| f.tag())
            .unwrap_or("")
            .to_owned();
        let notify = |cseq: u32, state: &str| {
            msg(&format!(
                "NOTIFY sip:alice@example.com:5061 SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKn{cseq}\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=bt\n\
To: <sip:alice@example.com>;tag={tag}\n\
Call-ID: {call}\n\
CSeq: {cseq} NOTIFY\n\
Event: presence\n\
Subscription-State: {state}\n\
Content-Length: 0\n\n"
            ))
        };
        // NOTIFY before the 200 creates the dialog (RFC 6665 §4.1.2.4); pending says nothing.
        c.handle_message(&h, &peer(), notify(1, "pending"), t0);
        assert_eq!(sent(&mut c)[0].status(), Some(200));
        assert!(h.got.borrow().is_empty());
        c.handle_message(&h, &peer(), notify(2, "active;expires=3600"), t0);
        assert_eq!(sent(&mut c)[0].status(), Some(200));
        assert_eq!(
            h.got.borrow().last().map(|e| e.body.clone()),
            Some(Body::Subscription(Subscription::Subscribed))
        );
        c.handle_message(&h, &peer(), notify(3, "terminated;reason=rejected"), t0);
        assert_eq!(sent(&mut c)[0].status(), Some(200));
        assert_eq!(
            h.got.borrow().last().map(|e| e.body.clone()),
            Some(Body::Subscription(Subscription::Unsubscribed))
        );
        assert_eq!(c.counts().1, 0);
        // A NOTIFY for a dialog we do not know: 481.
        c.handle_message(&h, &peer(), notify(4, "active"), t0);
        assert_eq!(sent(&mut c)[0].status(), Some(481));
        // 403 to a new SUBSCRIBE: refused (RFC 8048 §5.2.2).
        c.handle_delivery(&h, &dom(), sub_env, t0);
        let sub = sent(&mut c).remove(0);
        let r = sub
            .build_response(403, "Forbidden", Some("x"))
            .expect("resp");
        c.handle_message(&h, &peer(), r, t0);
        assert_eq!(
            h.got.borrow().last().map(|e| e.body.clone()),
            Some(Body::Subscription(Subscription::Unsubscribed))
        );
    }

    #[test]
    fn idle_session_gets_bye() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        let sdp = "v=0\r\nm=message 5061 sip null\r\n";
        let inv = format!(
            "INVITE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKi1\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=b\n\
To: <sip:alice@example.com>\n\
Call-ID: im1\n\
CSeq: 1 INVITE\n\
Contact: <sip:bob@10.0.0.1;transport=tls>\n\
Content-Type: application/sdp\n\
Content-Length: {}\n\n",
            sdp.len()
        );
        let mut raw = inv.replace('\n', "\r\n").into_bytes();
        raw.extend_from_slice(sdp.as_bytes());
        c.handle_message(&h, &peer(), parse_datagram(&raw).expect("parses"), t0);
        let out = sent(&mut c);
        assert_eq!(
            out.iter()
                .filter_map(SipMessage::status)
                .collect::<Vec<_>>(),
            [100, 200]
        );
        assert_eq!(c.counts().2, 1);
        c.handle_timeout(&h, t0 + Duration::from_secs(599));
        assert!(sent(&mut c).is_empty());
        c.handle_timeout(&h, t0 + Duration::from_secs(601));
        let out = sent(&mut c);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].method(), Some("BYE"));
        assert_eq!(
            out[0].request_uri_str(),
            Some("sip:bob@10.0.0.1;transport=tls")
        );
        assert_eq!(c.counts().2, 0);
    }

    #[test]
    fn invite_timeout_timer_b_bounces_queued_messages() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        c.handle_delivery(
            &h,
            &dom(),
            env(
                "alice@example.com",
                "bob@partner.com",
                Body::Message(MessageBody {
                    id: Some("m1".into()),
                    text: "hello".into(),
                    thread: None,
                }),
            ),
            t0,
        );
        let out = sent(&mut c);
        assert_eq!(out[0].method(), Some("INVITE"));
        // Timer B = 64·T1 = 32 s.
        c.handle_timeout(&h, t0 + Duration::from_secs(31));
        assert!(h.got.borrow().is_empty());
        c.handle_timeout(&h, t0 + Duration::from_secs(33));
        let got = h.got.borrow();
        let Some(Body::Error { id, condition, .. }) = got.last().map(|e| e.body.clone()) else {
            panic!("expected an error back: {got:?}");
        };
        assert_eq!(id.as_deref(), Some("m1"));
        assert_eq!(condition, ErrorCondition::RemoteServerTimeout);
        assert_eq!(
            got.last().map(|e| e.to.bare_string()),
            Some("alice@example.com".into())
        );
    }

    #[test]
    fn message_timeout_timer_f_on_pager_like_session_message() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        // Build an established inbound session, then send into it and let Timer F fire.
        let sdp = "v=0\r\nm=message 5061 sip null\r\n";
        let inv = format!(
            "INVITE sip:alice@example.com SIP/2.0\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKi2\nMax-Forwards: 70\nFrom: <sip:bob@partner.com>;tag=b\nTo: <sip:alice@example.com>\nCall-ID: im2\nCSeq: 1 INVITE\nContact: <sip:bob@10.0.0.1>\nContent-Type: application/sdp\nContent-Length: {}\n\n",
            sdp.len()
        );
        let mut raw = inv.replace('\n', "\r\n").into_bytes();
        raw.extend_from_slice(sdp.as_bytes());
        c.handle_message(&h, &peer(), parse_datagram(&raw).expect("parses"), t0);
        sent(&mut c);
        c.handle_delivery(
            &h,
            &dom(),
            env(
                "alice@example.com",
                "bob@partner.com",
                Body::Message(MessageBody {
                    id: Some("m2".into()),
                    text: "in session".into(),
                    thread: None,
                }),
            ),
            t0,
        );
        let out = sent(&mut c);
        assert_eq!(out[0].method(), Some("MESSAGE"));
        assert_eq!(out[0].call_id().ok(), Some("im2"));
        c.handle_timeout(&h, t0 + Duration::from_secs(33));
        let got = h.got.borrow();
        assert!(matches!(
            got.last().map(|e| &e.body),
            Some(Body::Error {
                condition: ErrorCondition::RemoteServerTimeout,
                ..
            })
        ));
    }

    #[test]
    fn cancel_after_the_answer_and_options_to_the_domain() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        let sdp = "v=0\r\nm=message 5061 sip null\r\n";
        let inv = format!(
            "INVITE sip:alice@example.com SIP/2.0\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKc1\nMax-Forwards: 70\nFrom: <sip:bob@partner.com>;tag=b\nTo: <sip:alice@example.com>\nCall-ID: cc1\nCSeq: 1 INVITE\nContent-Type: application/sdp\nContent-Length: {}\n\n",
            sdp.len()
        );
        let mut raw = inv.replace('\n', "\r\n").into_bytes();
        raw.extend_from_slice(sdp.as_bytes());
        c.handle_message(&h, &peer(), parse_datagram(&raw).expect("parses"), t0);
        sent(&mut c);
        let cancel = |branch: &str| {
            msg(&format!(
                "CANCEL sip:alice@example.com SIP/2.0\nVia: SIP/2.0/TLS sip.partner.com:5061;branch={branch}\nMax-Forwards: 70\nFrom: <sip:bob@partner.com>;tag=b\nTo: <sip:alice@example.com>\nCall-ID: cc1\nCSeq: 1 CANCEL\nContent-Length: 0\n\n"
            ))
        };
        c.handle_message(&h, &peer(), cancel("z9hG4bKc1"), t0);
        assert_eq!(sent(&mut c)[0].status(), Some(200));
        c.handle_message(&h, &peer(), cancel("z9hG4bKzz"), t0);
        assert_eq!(sent(&mut c)[0].status(), Some(481));
        let opt = msg("OPTIONS sip:example.com SIP/2.0\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKo1\nMax-Forwards: 70\nFrom: <sip:bob@partner.com>;tag=b\nTo: <sip:example.com>\nCall-ID: o1\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n");
        c.handle_message(&h, &peer(), opt, t0);
        assert_eq!(sent(&mut c)[0].status(), Some(200));
    }

    #[test]
    fn loops_and_hops_are_refused() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        let ours = c.via();
        let text = subscribe_text(3600).replace(
            "Max-Forwards: 70\n",
            &format!("Via: {ours}\nMax-Forwards: 70\n"),
        );
        c.handle_message(&h, &peer(), msg(&text), t0);
        assert_eq!(sent(&mut c)[0].status(), Some(482));
        let text = subscribe_text(3600)
            .replace("Max-Forwards: 70", "Max-Forwards: 0")
            .replace("z9hG4bKs1", "z9hG4bKs9");
        c.handle_message(&h, &peer(), msg(&text), t0);
        assert_eq!(sent(&mut c)[0].status(), Some(483));
        assert!(h.got.borrow().is_empty());
    }

    #[test]
    fn persisted_notifiers_restore_with_higher_cseq() {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        let wall = SystemTime::now();
        c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
        let out = sent(&mut c);
        let cseq = out[1].cseq().map(|x| x.seq).unwrap_or(0);
        assert!(c.take_dirty());
        let snap = c.snapshot(t0, wall);
        let json = serde_json::to_string(&snap).expect("json");
        let mut streamed = Vec::new();
        c.write_snapshot(t0, wall, &mut streamed).expect("write");
        assert_eq!(
            json.as_bytes(),
            &streamed[..],
            "both forms write the same file"
        );
        let back: PersistedState = serde_json::from_str(&json).expect("back");
        let mut c2 = core();
        assert_eq!(c2.restore(&h, back, t0, wall), 1);
        // A pending subscription is re-announced to the home side.
        assert_eq!(
            h.got.borrow().last().map(|e| e.body.clone()),
            Some(Body::Subscription(Subscription::Subscribe))
        );
        c2.handle_delivery(
            &h,
            &dom(),
            env(
                "alice@example.com",
                "bob@partner.com",
                Body::Subscription(Subscription::Subscribed),
            ),
            t0,
        );
        let out = sent(&mut c2);
        assert_eq!(out.len(), 1);
        assert!(out[0].cseq().map(|x| x.seq).unwrap_or(0) > cseq);
        // Expired entries are not restored.
        let snap = c.snapshot(t0, wall);
        assert_eq!(
            core().restore(&h, snap, t0, wall + Duration::from_secs(7200)),
            0
        );
    }
}
