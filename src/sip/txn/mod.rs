//! RFC 3261 §17 transactions as pure state machines (quinn-proto style).
//!
//! Each transaction is driven by `handle(event, now)`; the driver then drains
//! `poll_transmit()` (bytes to send on the transaction's flow), `poll_event()` (what the
//! transaction user must learn) and arms a timer for `poll_timeout()`, feeding
//! `Event::Timer` when it fires. Time is only ever a parameter, so tests run on a simulated
//! clock. No I/O, no tokio.
//!
//! Timers follow RFC 3261 §17 and Table 4: over a reliable transport (TCP/TLS, all Legate
//! federation links) there is no retransmission (A, E, G not armed), Timer B/F/H = 64·T1 =
//! 32 s, and D, I, J, K are zero, so Completed/Confirmed are left at once. Unreliable values
//! are implemented too (for tests and an optional UDP listener).
//!
//! INVITE machines include the RFC 6026 "Accepted" state (it updates RFC 3261 §17): after a
//! 2xx the transaction lingers for Timer L/M = 64·T1 so 2xx retransmissions and forked 2xx
//! reach the TU (client) and INVITE retransmissions are absorbed while ACKs go up (server).
//!
//! Matching (§17.1.3, §17.2.3) is by [`TxnKey`]: branch + sent-by + method, ACK and CANCEL
//! handled as the RFC says (an ACK matches the INVITE transaction; CANCEL is its own). RFC 2543
//! matching (no `z9hG4bK` branch) is not supported: such requests get no key and the caller
//! answers them statelessly.

pub mod client;
pub mod server;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use client::ClientTransaction;
pub use server::ServerTransaction;

use super::message::SipMessage;

/// RFC 3261 §17.1.1.1 magic cookie.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// Timer base values and transport reliability (RFC 3261 §17, Table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// RTT estimate (default 500 ms).
    pub t1: Duration,
    /// Maximum retransmit interval for non-INVITE requests and INVITE responses (4 s).
    pub t2: Duration,
    /// Maximum time a message stays in the network (5 s).
    pub t4: Duration,
    /// `true` for TCP/TLS: no retransmissions, zero linger timers.
    pub reliable: bool,
}

impl Timers {
    /// TCP/TLS defaults.
    pub const fn reliable() -> Self {
        Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            reliable: true,
        }
    }
    /// UDP defaults.
    pub const fn unreliable() -> Self {
        Timers {
            reliable: false,
            ..Self::reliable()
        }
    }
    /// Timer B, F, H: 64·T1.
    pub fn timeout(&self) -> Duration {
        self.t1 * 64
    }
    /// Timer D: ≥ 32 s unreliable, 0 reliable (§17.1.1.2).
    pub fn timer_d(&self) -> Duration {
        if self.reliable {
            Duration::ZERO
        } else {
            Duration::from_secs(32).max(self.t1 * 64)
        }
    }
    /// Timer I and K: T4 unreliable, 0 reliable (§17.2.1, §17.1.2.2).
    pub fn timer_i_k(&self) -> Duration {
        if self.reliable {
            Duration::ZERO
        } else {
            self.t4
        }
    }
    /// Timer L and M: 64·T1 on any transport (RFC 6026 §8.4, §8.7).
    pub fn timer_l_m(&self) -> Duration {
        self.t1 * 64
    }
    /// Timer J: 64·T1 unreliable, 0 reliable (§17.2.2).
    pub fn timer_j(&self) -> Duration {
        if self.reliable {
            Duration::ZERO
        } else {
            self.t1 * 64
        }
    }
}

impl Default for Timers {
    fn default() -> Self {
        Self::reliable()
    }
}

/// Transaction kind (§17: the INVITE machines differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// INVITE transaction.
    Invite,
    /// Any other method.
    NonInvite,
}

/// What a transaction tells its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TuEvent {
    /// A response to pass up (client transactions; retransmissions are absorbed).
    Response(Box<SipMessage>),
    /// A request to pass up: an ACK that matched an INVITE server transaction in Accepted
    /// (RFC 6026 §8.7).
    Request(Box<SipMessage>),
    /// Timer B/F/H fired: no (final response | ACK) in time.
    Timeout,
    /// The transport reported a failure (§17.1.4, §17.2.4).
    TransportError,
    /// The transaction reached Terminated and can be dropped.
    Terminated,
}

/// Input events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message from the network that matched this transaction (response for a client
    /// transaction; retransmitted request or ACK for a server transaction).
    Message(Box<SipMessage>),
    /// A response from the TU to send (server transactions only).
    TuResponse(Box<SipMessage>),
    /// The transport failed.
    TransportError,
    /// A timer deadline passed (from `poll_timeout`).
    Timer,
}

/// Why a transaction could not be created or keyed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// A header needed for matching did not decode.
    #[error("cannot key transaction: {0}")]
    BadHeader(&'static str),
    /// Top Via branch missing or without the magic cookie (RFC 2543 peer).
    #[error("top Via branch lacks the RFC 3261 magic cookie")]
    NoRfc3261Branch,
    /// A response was given where a request was expected, or the reverse.
    #[error("wrong message type for this transaction")]
    WrongMessage,
    /// The method cannot start a transaction (ACK, §17).
    #[error("ACK does not create a transaction")]
    AckNotTransaction,
}

/// Transaction matching key (§17.1.3, §17.2.3). The parts are shared strings: one key is
/// held by the transaction, its table, its timer and the remembered answer, and a clone must
/// not allocate for each of them. The hash of the three parts is computed once, when the key
/// is made (keyed per process, as `RandomState` is, since branches are chosen by peers): a
/// request looks its key up in several tables, and re-hashing ~60 bytes of strings for each
/// lookup cost more than the lookups.
#[derive(Debug, Clone)]
pub struct TxnKey {
    /// Top Via branch, as sent (compared exactly).
    pub branch: Arc<str>,
    /// Top Via sent-by, host lowercased (empty for client-side keys, which match on branch
    /// and CSeq method only).
    pub sent_by: Arc<str>,
    /// Method; ACK is keyed as INVITE so it finds the INVITE server transaction.
    pub method: Arc<str>,
    hash: u64,
    /// A second hash under other keys: with `hash`, the key's [`TxnKey::fingerprint`].
    hash2: u64,
}

/// The per-process hash keys of [`TxnKey`] (two independent sets).
fn key_hashers() -> &'static [std::collections::hash_map::RandomState; 2] {
    static KEYS: std::sync::OnceLock<[std::collections::hash_map::RandomState; 2]> =
        std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        [
            std::collections::hash_map::RandomState::new(),
            std::collections::hash_map::RandomState::new(),
        ]
    })
}

impl PartialEq for TxnKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && self.branch == other.branch
            && self.sent_by == other.sent_by
            && self.method == other.method
    }
}

impl Eq for TxnKey {}

impl std::hash::Hash for TxnKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for TxnKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TxnKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.branch, &self.sent_by, &self.method).cmp(&(
            &other.branch,
            &other.sent_by,
            &other.method,
        ))
    }
}

impl TxnKey {
    /// A key from its parts.
    pub fn new(branch: Arc<str>, sent_by: Arc<str>, method: Arc<str>) -> Self {
        let [k1, k2] = key_hashers();
        let parts = (&*branch, &*sent_by, &*method);
        let hash = std::hash::BuildHasher::hash_one(k1, parts);
        let hash2 = std::hash::BuildHasher::hash_one(k2, parts);
        TxnKey {
            branch,
            sent_by,
            method,
            hash,
            hash2,
        }
    }

    /// 128 bits of keyed hash (SipHash under two per-process random keys) standing for the
    /// key where only equality is needed and the key's strings should not be kept: two
    /// different keys share a fingerprint with probability ~2^-128 per pair, and a peer
    /// cannot aim at one without the keys.
    pub fn fingerprint(&self) -> u128 {
        (u128::from(self.hash) << 64) | u128::from(self.hash2)
    }

    /// The same branch and sent-by with another method (a CANCEL's INVITE, §9.2).
    pub fn with_method(&self, method: &str) -> Self {
        Self::new(self.branch.clone(), self.sent_by.clone(), method.into())
    }

    /// Server-side key of an incoming request (§17.2.3).
    pub fn server(req: &SipMessage) -> Result<Self, TxnError> {
        Self::server_of(req.method(), &req.via_top())
    }

    /// [`TxnKey::server`] from a method and top Via already decoded (a
    /// [`crate::sip::routing::Routing`] view), so the Via is not lexed again.
    pub fn server_of(
        method: Option<&str>,
        via: &crate::sip::header::DecodeResult<crate::sip::header::Via<'_>>,
    ) -> Result<Self, TxnError> {
        let method = method.ok_or(TxnError::WrongMessage)?;
        let via = via.as_ref().map_err(|e| TxnError::BadHeader(e))?;
        let branch = via.branch().ok_or(TxnError::NoRfc3261Branch)?;
        if !branch.starts_with(MAGIC_COOKIE) || branch.len() == MAGIC_COOKIE.len() {
            return Err(TxnError::NoRfc3261Branch);
        }
        let host = via.host.as_str();
        // Built in one buffer (`host[:port]`, host lowercased): this runs once per request.
        let mut sent_by = String::with_capacity(host.len() + 6);
        sent_by.extend(host.chars().map(|c| c.to_ascii_lowercase()));
        if let Some(p) = via.port {
            use std::fmt::Write as _;
            let _ = write!(sent_by, ":{p}");
        }
        let method = if method == "ACK" { "INVITE" } else { method };
        Ok(TxnKey::new(branch.into(), sent_by.into(), method.into()))
    }

    /// Client-side key of an outgoing request or an incoming response (§17.1.3): top Via
    /// branch and CSeq method.
    pub fn client(msg: &SipMessage) -> Result<Self, TxnError> {
        let via = msg.via_top().map_err(TxnError::BadHeader)?;
        let branch = via.branch().ok_or(TxnError::NoRfc3261Branch)?;
        let cseq = msg.cseq().map_err(TxnError::BadHeader)?;
        let method = if cseq.method == "ACK" {
            "INVITE"
        } else {
            cseq.method
        };
        Ok(TxnKey::new(branch.into(), "".into(), method.into()))
    }
}

/// A retransmission timer: next deadline and current interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retransmit {
    pub(crate) at: Instant,
    pub(crate) interval: Duration,
}

impl Retransmit {
    pub(crate) fn start(now: Instant, interval: Duration) -> Self {
        Retransmit {
            at: now + interval,
            interval,
        }
    }
    /// Fires and re-arms with `next(interval)`.
    pub(crate) fn rearm(&mut self, now: Instant, next: Duration) {
        self.interval = next;
        self.at = now + next;
    }
}

pub(crate) fn min_deadline(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

pub(crate) fn due(t: Option<Instant>, now: Instant) -> bool {
    t.is_some_and(|t| t <= now)
}

#[cfg(test)]
mod tests {
    //! Machine tests on a simulated clock: `t0` plus durations, never the wall clock.
    use super::*;
    use crate::sip::parse::parse_datagram;

    fn req(method: &str, branch: &str, sent_by: &str) -> SipMessage {
        let cseq_method = if method == "ACK" { "ACK" } else { method };
        let raw = format!(
            "{method} sip:alice@contoso.com SIP/2.0\r\n\
Via: SIP/2.0/TLS {sent_by};branch={branch}\r\n\
Max-Forwards: 70\r\n\
From: <sip:bob@fabrikam.com>;tag=f1\r\n\
To: <sip:alice@contoso.com>\r\n\
Call-ID: c1\r\n\
CSeq: 7 {cseq_method}\r\n\
Route: <sip:edge.contoso.com;lr>\r\n\
Content-Length: 0\r\n\r\n"
        );
        match parse_datagram(raw.as_bytes()) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    fn resp(to: &SipMessage, code: u16) -> Box<SipMessage> {
        match to.build_response(code, "Whatever", Some("t9")) {
            Ok(m) => Box::new(m),
            Err(e) => panic!("{e}"),
        }
    }

    fn drain_tx(t: &mut ClientTransaction) -> Vec<Bytes> {
        std::iter::from_fn(|| t.poll_transmit()).collect()
    }
    fn drain_ev(t: &mut ClientTransaction) -> Vec<TuEvent> {
        std::iter::from_fn(|| t.poll_event()).collect()
    }
    fn drain_stx(t: &mut ServerTransaction) -> Vec<Bytes> {
        std::iter::from_fn(|| t.poll_transmit()).collect()
    }
    fn drain_sev(t: &mut ServerTransaction) -> Vec<TuEvent> {
        std::iter::from_fn(|| t.poll_event()).collect()
    }
    fn first_line(b: &Bytes) -> String {
        String::from_utf8_lossy(b)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }

    use bytes::Bytes;
    use std::time::Duration;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn client(method: &str, timers: Timers, t0: Instant) -> (ClientTransaction, SipMessage) {
        let r = req(method, "z9hG4bKc1", "192.0.2.1:5061");
        match ClientTransaction::new(r.clone(), timers, t0) {
            Ok(t) => (t, r),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn reliable_invite_client_non2xx_acks_and_terminates() {
        let t0 = Instant::now();
        let (mut t, r) = client("INVITE", Timers::reliable(), t0);
        assert_eq!(drain_tx(&mut t).len(), 1);
        assert_eq!(t.poll_timeout(), Some(t0 + S(32)), "Timer B = 64*T1");
        // No Timer A over TCP/TLS.
        t.handle(Event::Timer, t0 + S(1));
        assert!(drain_tx(&mut t).is_empty());
        t.handle(Event::Message(resp(&r, 180)), t0 + S(2));
        assert_eq!(t.state_name(), "Proceeding");
        assert_eq!(t.poll_timeout(), None);
        t.handle(Event::Message(resp(&r, 486)), t0 + S(3));
        let tx = drain_tx(&mut t);
        assert_eq!(tx.len(), 1);
        let ack = parse_datagram(&tx[0]);
        let Ok(ack) = ack else {
            panic!("ACK must parse")
        };
        assert_eq!(ack.method(), Some("ACK"));
        assert_eq!(ack.cseq().map(|c| (c.seq, c.method)), Ok((7, "ACK")));
        assert_eq!(ack.to().map(|t| t.tag()), Ok(Some("t9")));
        assert_eq!(ack.via_top().map(|v| v.branch()), Ok(Some("z9hG4bKc1")));
        assert_eq!(ack.routes().map(|r| r.len()), Ok(1));
        // Timer D = 0 on a reliable transport.
        assert!(t.is_terminated());
        let ev = drain_ev(&mut t);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[2], TuEvent::Terminated);
    }

    #[test]
    fn reliable_invite_client_2xx_and_timeout() {
        let t0 = Instant::now();
        let (mut t, r) = client("INVITE", Timers::reliable(), t0);
        t.handle(Event::Message(resp(&r, 200)), t0 + S(1));
        // RFC 6026: Accepted for Timer M; every 2xx (retransmitted or forked) goes up.
        assert_eq!(t.state_name(), "Accepted");
        assert_eq!(t.poll_timeout(), Some(t0 + S(1) + S(32)));
        t.handle(Event::Message(resp(&r, 200)), t0 + S(2));
        assert_eq!(
            drain_tx(&mut t).len(),
            1,
            "no ACK for 2xx from the transaction"
        );
        let ups = drain_ev(&mut t)
            .into_iter()
            .filter(|e| matches!(e, TuEvent::Response(_)))
            .count();
        assert_eq!(ups, 2);
        t.handle(Event::Timer, t0 + S(33));
        assert!(t.is_terminated());

        let (mut t, _) = client("INVITE", Timers::reliable(), t0);
        t.handle(Event::Timer, t0 + S(31));
        assert!(!t.is_terminated());
        t.handle(Event::Timer, t0 + S(32));
        assert!(t.is_terminated());
        assert!(drain_ev(&mut t).contains(&TuEvent::Timeout));
    }

    #[test]
    fn unreliable_invite_client_timer_a_doubles() {
        let t0 = Instant::now();
        let (mut t, r) = client("INVITE", Timers::unreliable(), t0);
        drain_tx(&mut t);
        let mut sent = Vec::new();
        let mut now = t0;
        while let Some(d) = t.poll_timeout() {
            if d > t0 + S(10) {
                break;
            }
            now = d;
            t.handle(Event::Timer, now);
            if !drain_tx(&mut t).is_empty() {
                sent.push(now - t0);
            }
        }
        assert_eq!(sent, vec![MS(500), MS(1500), MS(3500), MS(7500)]);
        // Final response: ACK, Completed for Timer D (32 s), retransmission re-sends ACK.
        t.handle(Event::Message(resp(&r, 404)), now);
        assert_eq!(drain_tx(&mut t).len(), 1);
        t.handle(Event::Message(resp(&r, 404)), now + S(1));
        assert_eq!(drain_tx(&mut t).len(), 1);
        let ev = drain_ev(&mut t);
        assert_eq!(ev.len(), 1, "retransmitted final is not passed up");
        assert_eq!(t.poll_timeout(), Some(now + S(32)));
        t.handle(Event::Timer, now + S(32));
        assert!(t.is_terminated());
    }

    #[test]
    fn unreliable_non_invite_client_timer_e_caps_at_t2() {
        let t0 = Instant::now();
        let (mut t, r) = client("MESSAGE", Timers::unreliable(), t0);
        drain_tx(&mut t);
        let mut sent = Vec::new();
        while let Some(d) = t.poll_timeout() {
            if d > t0 + S(16) {
                break;
            }
            t.handle(Event::Timer, d);
            if !drain_tx(&mut t).is_empty() {
                sent.push(d - t0);
            }
        }
        assert_eq!(
            sent,
            vec![MS(500), MS(1500), MS(3500), MS(7500), MS(11500), MS(15500)]
        );
        let now = t0 + MS(15600);
        t.handle(Event::Message(resp(&r, 100)), now);
        assert_eq!(t.state_name(), "Proceeding");
        assert_eq!(
            t.poll_timeout(),
            Some(now + S(4)),
            "Proceeding retransmits every T2"
        );
        t.handle(Event::Message(resp(&r, 200)), now + S(1));
        assert_eq!(t.state_name(), "Completed");
        t.handle(Event::Message(resp(&r, 200)), now + S(2));
        let ev = drain_ev(&mut t);
        assert_eq!(
            ev.len(),
            2,
            "1xx and one 200 go up; the retransmission is absorbed"
        );
        assert_eq!(t.poll_timeout(), Some(now + S(1) + S(5)), "Timer K = T4");
        t.handle(Event::Timer, now + S(6));
        assert!(t.is_terminated());
        // Timer F still bounds a transaction stuck in Proceeding.
        let (mut t, r) = client("MESSAGE", Timers::unreliable(), t0);
        t.handle(Event::Message(resp(&r, 100)), t0 + S(1));
        t.handle(Event::Timer, t0 + S(32));
        assert!(t.is_terminated());
        assert!(drain_ev(&mut t).contains(&TuEvent::Timeout));
    }

    #[test]
    fn reliable_non_invite_client_k_is_zero() {
        let t0 = Instant::now();
        let (mut t, r) = client("SUBSCRIBE", Timers::reliable(), t0);
        assert_eq!(t.poll_timeout(), Some(t0 + S(32)), "Timer F = 64*T1");
        // A response of another transaction is ignored.
        let other = req("SUBSCRIBE", "z9hG4bKother", "192.0.2.1:5061");
        t.handle(Event::Message(resp(&other, 200)), t0 + S(1));
        assert_eq!(t.state_name(), "Trying");
        t.handle(Event::Message(resp(&r, 202)), t0 + S(1));
        assert!(t.is_terminated());
    }

    fn server(method: &str, timers: Timers, t0: Instant) -> (ServerTransaction, SipMessage) {
        let r = req(method, "z9hG4bKs1", "[2001:db8::9]:5061");
        match ServerTransaction::new(&r, timers, t0) {
            Ok(t) => (t, r),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn reliable_invite_server_absorbs_and_confirms() {
        let t0 = Instant::now();
        let (mut t, r) = server("INVITE", Timers::reliable(), t0);
        let tx = drain_stx(&mut t);
        assert_eq!(tx.len(), 1);
        assert_eq!(first_line(&tx[0]), "SIP/2.0 100 Trying");
        // Retransmitted INVITE: re-send the last provisional.
        t.handle(Event::Message(Box::new(r.clone())), t0 + S(1));
        assert_eq!(first_line(&drain_stx(&mut t)[0]), "SIP/2.0 100 Trying");
        t.handle(Event::TuResponse(resp(&r, 180)), t0 + S(2));
        assert_eq!(drain_stx(&mut t).len(), 1);
        t.handle(Event::Message(Box::new(r.clone())), t0 + S(3));
        assert_eq!(first_line(&drain_stx(&mut t)[0]), "SIP/2.0 180 Whatever");
        t.handle(Event::TuResponse(resp(&r, 486)), t0 + S(4));
        assert_eq!(drain_stx(&mut t).len(), 1);
        assert_eq!(t.state_name(), "Completed");
        assert_eq!(
            t.poll_timeout(),
            Some(t0 + S(4) + S(32)),
            "Timer H = 64*T1, no G"
        );
        t.handle(Event::Message(Box::new(r.clone())), t0 + S(5));
        assert_eq!(first_line(&drain_stx(&mut t)[0]), "SIP/2.0 486 Whatever");
        // ACK (same branch) → Confirmed → Timer I = 0 → Terminated.
        let ack = req("ACK", "z9hG4bKs1", "[2001:db8::9]:5061");
        t.handle(Event::Message(Box::new(ack)), t0 + S(6));
        assert!(t.is_terminated());
        assert_eq!(drain_sev(&mut t), vec![TuEvent::Terminated]);
    }

    #[test]
    fn invite_server_accepted_rfc6026() {
        let t0 = Instant::now();
        let (mut t, r) = server("INVITE", Timers::reliable(), t0);
        drain_stx(&mut t);
        t.handle(Event::TuResponse(resp(&r, 200)), t0 + S(1));
        assert_eq!(drain_stx(&mut t).len(), 1);
        assert_eq!(t.state_name(), "Accepted");
        assert_eq!(t.poll_timeout(), Some(t0 + S(33)), "Timer L = 64*T1");
        // Retransmitted INVITE absorbed (the TU retransmits 2xx itself, §13.3.1.4).
        t.handle(Event::Message(Box::new(r.clone())), t0 + S(2));
        assert!(drain_stx(&mut t).is_empty());
        // The TU's 2xx retransmission is sent.
        t.handle(Event::TuResponse(resp(&r, 200)), t0 + S(3));
        assert_eq!(drain_stx(&mut t).len(), 1);
        // A matching ACK goes up.
        let ack = req("ACK", "z9hG4bKs1", "[2001:db8::9]:5061");
        t.handle(Event::Message(Box::new(ack)), t0 + S(4));
        assert!(matches!(
            drain_sev(&mut t).as_slice(),
            [TuEvent::Request(_)]
        ));
        t.handle(Event::Timer, t0 + S(33));
        assert!(t.is_terminated());
    }

    #[test]
    fn invite_server_timer_h_and_g() {
        let t0 = Instant::now();
        let (mut t, r) = server("INVITE", Timers::reliable(), t0);
        t.handle(Event::TuResponse(resp(&r, 603)), t0);
        t.handle(Event::Timer, t0 + S(32));
        assert!(t.is_terminated());
        assert_eq!(
            drain_sev(&mut t),
            vec![TuEvent::Timeout, TuEvent::Terminated]
        );

        let (mut t, r) = server("INVITE", Timers::unreliable(), t0);
        drain_stx(&mut t);
        t.handle(Event::TuResponse(resp(&r, 500)), t0);
        drain_stx(&mut t);
        let mut sent = Vec::new();
        while let Some(d) = t.poll_timeout() {
            if d > t0 + S(12) {
                break;
            }
            t.handle(Event::Timer, d);
            if !drain_stx(&mut t).is_empty() {
                sent.push(d - t0);
            }
        }
        assert_eq!(sent, vec![MS(500), MS(1500), MS(3500), MS(7500), MS(11500)]);
        let ack = req("ACK", "z9hG4bKs1", "[2001:db8::9]:5061");
        t.handle(Event::Message(Box::new(ack.clone())), t0 + S(12));
        assert_eq!(t.state_name(), "Confirmed");
        assert_eq!(t.poll_timeout(), Some(t0 + S(17)), "Timer I = T4");
        t.handle(Event::Message(Box::new(ack)), t0 + S(13));
        assert!(drain_stx(&mut t).is_empty(), "ACKs absorbed in Confirmed");
        t.handle(Event::Timer, t0 + S(17));
        assert!(t.is_terminated());
    }

    #[test]
    fn non_invite_server() {
        let t0 = Instant::now();
        let (mut t, r) = server("MESSAGE", Timers::reliable(), t0);
        assert!(drain_stx(&mut t).is_empty(), "no 100 for non-INVITE");
        t.handle(Event::Message(Box::new(r.clone())), t0 + S(1));
        assert!(drain_stx(&mut t).is_empty(), "Trying absorbs silently");
        t.handle(Event::TuResponse(resp(&r, 200)), t0 + S(1));
        assert_eq!(drain_stx(&mut t).len(), 1);
        assert!(t.is_terminated(), "Timer J = 0 on reliable transports");

        let (mut t, r) = server("MESSAGE", Timers::unreliable(), t0);
        t.handle(Event::TuResponse(resp(&r, 100)), t0);
        t.handle(Event::Message(Box::new(r.clone())), t0 + S(1));
        assert_eq!(drain_stx(&mut t).len(), 2, "1xx sent, then re-sent");
        t.handle(Event::TuResponse(resp(&r, 200)), t0 + S(2));
        t.handle(Event::Message(Box::new(r.clone())), t0 + S(3));
        let tx = drain_stx(&mut t);
        assert_eq!(tx.len(), 2);
        assert_eq!(first_line(&tx[1]), "SIP/2.0 200 Whatever");
        assert_eq!(t.poll_timeout(), Some(t0 + S(2) + S(32)), "Timer J = 64*T1");
        t.handle(Event::Timer, t0 + S(34));
        assert!(t.is_terminated());
    }

    #[test]
    fn transport_error_terminates() {
        let t0 = Instant::now();
        let (mut t, _) = server("INVITE", Timers::reliable(), t0);
        t.handle(Event::TransportError, t0);
        assert_eq!(
            drain_sev(&mut t),
            vec![TuEvent::TransportError, TuEvent::Terminated]
        );
        let (mut c, _) = client("OPTIONS", Timers::reliable(), t0);
        c.handle(Event::TransportError, t0);
        assert!(c.is_terminated());
    }

    #[test]
    fn keys() {
        let inv = req("INVITE", "z9hG4bKk", "Edge.Example.com:5061");
        let ack = req("ACK", "z9hG4bKk", "edge.example.com:5061");
        let cancel = req("CANCEL", "z9hG4bKk", "edge.example.com:5061");
        let other_host = req("INVITE", "z9hG4bKk", "edge2.example.com:5061");
        let k = TxnKey::server(&inv);
        assert!(k.is_ok());
        assert_eq!(TxnKey::server(&ack), k, "ACK matches the INVITE (§17.2.3)");
        assert_ne!(TxnKey::server(&cancel), k);
        assert_ne!(TxnKey::server(&other_host), k);
        assert_eq!(
            TxnKey::server(&req("INVITE", "1234", "h")),
            Err(TxnError::NoRfc3261Branch)
        );
        assert_eq!(
            TxnKey::server(&req("INVITE", "z9hG4bK", "h")),
            Err(TxnError::NoRfc3261Branch)
        );
        assert!(ServerTransaction::new(&ack, Timers::reliable(), Instant::now()).is_err());
    }
}
