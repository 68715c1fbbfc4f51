//! Sans-IO server-to-server stream negotiation (RFC 6120 §4–§6, §9.2; XEP-0178; XEP-0220).
//!
//! One [`S2sNegotiator`] per TCP connection, in either role. It writes our stream headers and
//! features, answers or issues STARTTLS, SASL EXTERNAL and dialback, checks stanzas against what
//! the peer authenticated, and reports verdicts. It never touches a socket, TLS, DNS or the
//! clock: the driver feeds it framer events, TLS outcomes (with the domains the peer
//! certificate was verified for, RFC 6125 matching done by the caller), dialback verification
//! answers and the current time, and carries out the [`S2sAction`]s in order. What is allowed
//! (TLS required, EXTERNAL, dialback) comes from [`S2sPolicy`], decided by the caller per peer.

use std::time::{Duration, Instant};

use base64::Engine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::dialback::{verify_key, DbKind, DbType, Dialback};
use super::error::{parse_stream_error, StanzaErrorCondition, StreamErrorCondition};
use super::jid::normalise_domain;
use super::stanza::{
    children, root_text, Stanza, StanzaKind, NS_DIALBACK, NS_SASL, NS_SERVER, NS_STREAMS, NS_TLS,
};
use super::stream::{StreamError, StreamEvent, StreamHeader};

/// Dialback stream feature (XEP-0220 §2.3.1).
pub const NS_DIALBACK_FEATURE: &str = "urn:xmpp:features:dialback";

/// What the caller allows for this peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S2sPolicy {
    /// Refuse to authenticate or exchange stanzas without TLS.
    pub tls_required: bool,
    /// Offer/use SASL EXTERNAL when TLS is up and the certificate matches (XEP-0178).
    pub sasl_external_allowed: bool,
    /// Offer/use server dialback (XEP-0220).
    pub dialback_allowed: bool,
}

impl Default for S2sPolicy {
    fn default() -> Self {
        S2sPolicy {
            tls_required: true,
            sasl_external_allowed: true,
            dialback_allowed: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We opened the connection (outbound, stanzas from us).
    Initiating,
    /// The peer connected to us (inbound, stanzas to us).
    Receiving,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    SaslExternal,
    Dialback,
}

/// Configuration of one negotiation.
#[derive(Debug, Clone)]
pub struct S2sConfig {
    pub role: Role,
    /// Initiating: our sending domain. Receiving: unused (see `local_domains`).
    pub local_domain: String,
    /// Initiating: the domain we connect to.
    pub remote_domain: String,
    /// Receiving: domains we serve (normalised).
    pub local_domains: Vec<String>,
    pub policy: S2sPolicy,
    /// XEP-0185 secret for dialback keys.
    pub dialback_secret: String,
    /// Whether we can do TLS at all on this connection (a certificate for the domain, or an
    /// outbound TLS client config).
    pub tls_available: bool,
    /// Initiating: whether we presented a client certificate (EXTERNAL only then).
    pub have_client_certificate: bool,
    /// Whole negotiation must finish within this time.
    pub timeout: Duration,
    /// Seed for stream ids (tests); `None` draws from the OS.
    pub id_seed: Option<u64>,
    /// Initiating only: this connection exists to ask the authoritative server `<db:verify/>`
    /// questions (XEP-0220 §2.2). It does STARTTLS if offered but never authenticates; queued
    /// requests ([`S2sNegotiator::queue_verify`]) go out once the features have arrived.
    pub verify_only: bool,
    /// Receiving only: per-peer policy (issue 4 §4). Called with the peer's claimed domain
    /// when its header arrives and with each domain a `<db:result/>` asks to authenticate; an
    /// `Err` closes the stream with that condition and text. `None`: `policy` for everyone.
    pub policy_lookup: Option<PolicyLookup>,
}

/// Answer of a per-peer policy lookup: the policy, or why the domain is refused
/// (`policy-violation` / `not-authorized` and a text for the peer).
pub type PolicyAnswer = Result<S2sPolicy, (StreamErrorCondition, String)>;

/// Per-peer policy lookup; must be cheap and non-blocking (an in-memory table snapshot).
#[derive(Clone)]
pub struct PolicyLookup(pub std::sync::Arc<dyn Fn(&str) -> PolicyAnswer + Send + Sync>);

impl std::fmt::Debug for PolicyLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicyLookup(..)")
    }
}

impl S2sConfig {
    pub fn initiating(local: &str, remote: &str, secret: &str) -> Self {
        S2sConfig {
            role: Role::Initiating,
            local_domain: local.into(),
            remote_domain: remote.into(),
            local_domains: vec![local.into()],
            policy: S2sPolicy::default(),
            dialback_secret: secret.into(),
            tls_available: true,
            have_client_certificate: true,
            timeout: Duration::from_secs(30),
            id_seed: None,
            verify_only: false,
            policy_lookup: None,
        }
    }
    pub fn receiving(local_domains: &[&str], secret: &str) -> Self {
        S2sConfig {
            role: Role::Receiving,
            local_domain: local_domains.first().copied().unwrap_or_default().into(),
            remote_domain: String::new(),
            local_domains: local_domains.iter().map(|d| (*d).into()).collect(),
            policy: S2sPolicy::default(),
            dialback_secret: secret.into(),
            tls_available: true,
            have_client_certificate: false,
            timeout: Duration::from_secs(30),
            id_seed: None,
            verify_only: false,
            policy_lookup: None,
        }
    }
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S2sAction {
    SendBytes(Vec<u8>),
    /// Stop reading XMPP: give `framer.take_buffered()` and the socket to TLS (RFC 6120
    /// §5.4.3.3), reset the framer, then report [`S2sNegotiator::handle_tls_established`].
    StartTls,
    /// Stream restart after SASL (RFC 6120 §6.4.6): `framer.reset()`.
    ResetFramer,
    /// XEP-0220 step 2: ask the authoritative server of `originating` whether `key` is right,
    /// then report [`S2sNegotiator::handle_dialback_verified`].
    VerifyDialback {
        originating: String,
        receiving: String,
        stream_id: String,
        key: String,
    },
    /// The peer (receiving role) or the remote (initiating role) is authenticated for `domain`.
    Authenticated {
        domain: String,
        method: AuthMethod,
    },
    /// A stanza that passed every check; route it (receiving role).
    Deliver(Stanza),
    /// An answer to a `<db:verify/>` we sent on this (outbound) stream.
    VerifyAnswer(Dialback),
    /// Close the connection; any stream error was in the preceding `SendBytes`.
    Fail {
        condition: Option<StreamErrorCondition>,
        text: String,
    },
    /// The peer closed the stream cleanly; we answered with our close tag.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    AwaitHeader,
    AwaitFeatures,
    AwaitProceed,
    AwaitTls,
    AwaitSaslResult,
    AwaitDialbackResult,
    /// Receiving role: header answered, waiting for the peer's next move.
    Negotiating,
    Established,
    /// Initiating, verify-only: the stream is open for `<db:verify/>` questions.
    VerifyReady,
    Done,
}

/// Stream features as read by the initiating side.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features {
    pub starttls: Option<bool>,
    pub mechanisms: Vec<String>,
    pub dialback: bool,
    /// A feature we do not know that says `<required/>`.
    pub unknown_required: Option<String>,
}

impl Features {
    pub fn parse(s: &Stanza) -> Features {
        let mut f = Features::default();
        for c in children(s) {
            let required = c.children.iter().any(|(n, _, _)| n == "required");
            match (c.ns.as_str(), c.name.as_str()) {
                (NS_TLS, "starttls") => f.starttls = Some(required),
                (NS_SASL, "mechanisms") => {
                    f.mechanisms = c
                        .children
                        .iter()
                        .filter(|(n, _, _)| n == "mechanism")
                        .map(|(_, _, t)| t.trim().to_owned())
                        .collect()
                }
                (NS_DIALBACK_FEATURE, "dialback") => f.dialback = true,
                _ if required => f.unknown_required = Some(format!("{{{}}}{}", c.ns, c.name)),
                _ => {}
            }
        }
        f
    }
}

/// The s2s negotiation machine. See the module docs.
#[derive(Debug)]
pub struct S2sNegotiator {
    cfg: S2sConfig,
    /// Policy in force: `cfg.policy`, or what `policy_lookup` said for this peer.
    policy: S2sPolicy,
    phase: Phase,
    tls: bool,
    sasl_done: bool,
    header_sent: bool,
    /// Id of the current stream (ours when receiving, the peer's when initiating).
    stream_id: Option<String>,
    /// Receiving: peer's claimed domain (`from`) and the local domain it addressed (`to`).
    peer_from: Option<String>,
    peer_to: Option<String>,
    peer_cert_domains: Vec<String>,
    /// Domains authenticated on this stream (receiving: peer domains; initiating: remote).
    authenticated: Vec<String>,
    /// Receiving: (peer domain, our domain) pairs authenticated on this stream. XEP-0220 §4
    /// authenticates pairs, and SASL EXTERNAL the header's (from, to): a stanza must travel on
    /// a pair that was authenticated, not just from some authenticated domain to some local one.
    authenticated_pairs: Vec<(String, String)>,
    /// Receiving: dialback requests waiting for the authoritative answer (originating, receiving).
    pending_dialback: Vec<(String, String)>,
    /// Receiving: dialback verdicts other than `valid` while nothing is authenticated.
    auth_failures: usize,
    /// Initiating: the remote declared the dialback namespace on its header.
    peer_header_db: bool,
    dialback_tried: bool,
    /// We sent our close tag already.
    closing: bool,
    /// Verify-only streams: questions waiting for the stream to be ready.
    pending_verify: Vec<Dialback>,
    deadline: Option<Instant>,
    rng: StdRng,
}

/// Most dialback requests in flight on one stream (bounded, style.md §4).
const MAX_PENDING_DIALBACK: usize = 16;

/// Failed dialback attempts allowed on a stream that has authenticated nothing: the first try
/// and two retries (the "reasonable number" RFC 6120 §6.4.5 asks for SASL, applied to
/// dialback too). XEP-0220 §2.4 keeps a stream open after `type='invalid'` so that other
/// domains can still be authenticated on it, but a peer that only ever fails is closed with
/// `<not-authorized/>` (RFC 6120 §4.9.3.12) instead of waiting for the negotiation deadline.
const MAX_DIALBACK_FAILURES: usize = 3;

impl S2sNegotiator {
    pub fn new(cfg: S2sConfig) -> Self {
        let rng = match cfg.id_seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        S2sNegotiator {
            policy: cfg.policy,
            cfg,
            phase: Phase::Idle,
            tls: false,
            sasl_done: false,
            header_sent: false,
            stream_id: None,
            peer_from: None,
            peer_to: None,
            peer_cert_domains: Vec::new(),
            authenticated: Vec::new(),
            authenticated_pairs: Vec::new(),
            pending_dialback: Vec::new(),
            auth_failures: 0,
            peer_header_db: false,
            dialback_tried: false,
            closing: false,
            pending_verify: Vec::new(),
            deadline: None,
            rng,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn stream_id(&self) -> Option<&str> {
        self.stream_id.as_deref()
    }
    pub fn authenticated_domains(&self) -> &[String] {
        &self.authenticated
    }
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Connection is up over XEP-0368 direct TLS (`_xmpps-server`, port 5270): the stream starts
    /// encrypted, STARTTLS is neither offered nor used. `peer_cert_domains` as in
    /// [`handle_tls_established`](Self::handle_tls_established).
    pub fn start_direct_tls(
        &mut self,
        now: Instant,
        peer_cert_domains: Vec<String>,
    ) -> Vec<S2sAction> {
        self.tls = true;
        self.peer_cert_domains = peer_cert_domains
            .iter()
            .filter_map(|d| normalise_domain(d).ok())
            .collect();
        self.start(now)
    }

    /// Queues a `<db:verify/>` question for the authoritative server (verify-only streams);
    /// sent at once if the stream is ready, else when it is. Answers come back as
    /// [`S2sAction::VerifyAnswer`].
    pub fn queue_verify(&mut self, request: Dialback) -> Vec<S2sAction> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        if self.phase == Phase::VerifyReady {
            return vec![S2sAction::SendBytes(request.to_xml())];
        }
        if self.pending_verify.len() >= MAX_PENDING_DIALBACK {
            return Vec::new();
        }
        self.pending_verify.push(request);
        Vec::new()
    }

    /// Connection is up. Initiating: sends our header. Receiving: waits for the peer's.
    pub fn start(&mut self, now: Instant) -> Vec<S2sAction> {
        self.deadline = Some(now + self.cfg.timeout);
        self.phase = Phase::AwaitHeader;
        match self.cfg.role {
            Role::Initiating => vec![self.send_header()],
            Role::Receiving => Vec::new(),
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Established | Phase::VerifyReady | Phase::Done | Phase::Idle => None,
            _ => self.deadline,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Vec<S2sAction> {
        match self.poll_timeout() {
            Some(d) if now >= d => self.fail(
                StreamErrorCondition::ConnectionTimeout,
                "negotiation timed out",
            ),
            _ => Vec::new(),
        }
    }

    /// Closes the stream with a condition the caller decided (federation policy refusing an
    /// authenticated domain gets `policy-violation` or `not-authorized` with a text saying why,
    /// shutdown gets `system-shutdown`, ...). Writes our header first if none went out yet.
    pub fn close_with_error(
        &mut self,
        condition: StreamErrorCondition,
        text: &str,
    ) -> Vec<S2sAction> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        self.fail(condition, text)
    }

    /// Clean close from our side (idle timeout): `</stream:stream>`; the driver then waits for
    /// the peer's close tag, which comes back as `Closed`, and shuts the connection.
    pub fn close(&mut self) -> Vec<S2sAction> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        if self.closing {
            return Vec::new();
        }
        self.closing = true;
        vec![S2sAction::SendBytes(b"</stream:stream>".to_vec())]
    }

    pub fn handle_framing_error(&mut self, e: &StreamError) -> Vec<S2sAction> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        self.fail(e.condition(), &e.to_string())
    }

    /// Replaces the domains the peer's certificate speaks for, on a stream already encrypted
    /// (direct TLS: a wildcard can only be matched once the header names the claimed domain).
    /// Call before passing the header to [`handle_event`](Self::handle_event).
    pub fn set_peer_cert_domains(&mut self, peer_cert_domains: Vec<String>) {
        if !self.tls {
            return;
        }
        self.peer_cert_domains = peer_cert_domains
            .iter()
            .filter_map(|d| normalise_domain(d).ok())
            .collect();
    }

    /// TLS is up. `peer_cert_domains`: the domains the peer's certificate was verified for
    /// (receiving role: the client certificate, possibly none).
    pub fn handle_tls_established(&mut self, peer_cert_domains: Vec<String>) -> Vec<S2sAction> {
        if self.phase != Phase::AwaitTls {
            return Vec::new();
        }
        self.tls = true;
        self.peer_cert_domains = peer_cert_domains
            .iter()
            .filter_map(|d| normalise_domain(d).ok())
            .collect();
        self.phase = Phase::AwaitHeader;
        self.header_sent = false;
        match self.cfg.role {
            // RFC 6120 §5.4.3.3: the initiating entity opens a new stream over TLS.
            Role::Initiating => vec![self.send_header()],
            Role::Receiving => Vec::new(),
        }
    }

    pub fn handle_tls_failed(&mut self, reason: &str) -> Vec<S2sAction> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        self.phase = Phase::Done;
        // RFC 6120 §5.4.3.2: on TLS failure the TCP connection is just closed.
        vec![S2sAction::Fail {
            condition: None,
            text: format!("TLS failed: {reason}"),
        }]
    }

    /// Answer of the authoritative server for a `VerifyDialback` we asked for.
    pub fn handle_dialback_verified(
        &mut self,
        originating: &str,
        receiving: &str,
        verdict: DbType,
    ) -> Vec<S2sAction> {
        // XEP-0220 §2.4: a verification that could not be done is `remote-server-not-found`.
        let condition =
            (verdict == DbType::Error).then_some(StanzaErrorCondition::RemoteServerNotFound);
        self.answer_dialback(originating, receiving, verdict, condition, true)
    }

    /// The driver did not start the verification asked for (per-domain or node-wide bound on
    /// verifications, or no acceptable target): answer `<db:result type='error'>` with
    /// `condition` (XEP-0220 §2.4; `resource-constraint` for a bound). Nothing is queued.
    pub fn handle_dialback_refused(
        &mut self,
        originating: &str,
        receiving: &str,
        condition: StanzaErrorCondition,
    ) -> Vec<S2sAction> {
        // Our own bound, not the peer's failure: it does not count toward closing the stream.
        self.answer_dialback(
            originating,
            receiving,
            DbType::Error,
            Some(condition),
            false,
        )
    }

    fn answer_dialback(
        &mut self,
        originating: &str,
        receiving: &str,
        verdict: DbType,
        condition: Option<StanzaErrorCondition>,
        peer_failed: bool,
    ) -> Vec<S2sAction> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        let Some(i) = self
            .pending_dialback
            .iter()
            .position(|(o, r)| o == originating && r == receiving)
        else {
            return Vec::new();
        };
        self.pending_dialback.remove(i);
        let req = Dialback::request(DbKind::Result, originating, receiving, None, "");
        let mut out = vec![S2sAction::SendBytes(
            req.answer(verdict, condition).to_xml(),
        )];
        if verdict == DbType::Valid {
            out.extend(self.dialback_authenticated(originating, receiving));
            return out;
        }
        // XEP-0220 §2.4: an invalid key gets type='invalid'; the stream may carry other
        // domains, so one failure does not close it — repeated failures do.
        if peer_failed && self.authenticated.is_empty() {
            self.auth_failures += 1;
            if self.auth_failures >= MAX_DIALBACK_FAILURES && self.pending_dialback.is_empty() {
                out.extend(self.fail(
                    StreamErrorCondition::NotAuthorized,
                    "dialback failed too many times on this stream",
                ));
            }
        }
        out
    }

    /// Records a pair authenticated by dialback and reports it.
    fn dialback_authenticated(&mut self, originating: &str, receiving: &str) -> Vec<S2sAction> {
        let pair = (originating.to_owned(), receiving.to_owned());
        if !self.authenticated_pairs.contains(&pair) {
            self.authenticated_pairs.push(pair);
        }
        if !self.authenticated.iter().any(|d| d == originating) {
            self.authenticated.push(originating.to_owned());
        }
        self.phase = Phase::Established;
        vec![S2sAction::Authenticated {
            domain: originating.to_owned(),
            method: AuthMethod::Dialback,
        }]
    }

    pub fn handle_event(&mut self, ev: &StreamEvent) -> Vec<S2sAction> {
        if matches!(self.phase, Phase::Done | Phase::Idle) {
            return Vec::new();
        }
        match ev {
            StreamEvent::StreamClose => {
                self.phase = Phase::Done;
                if self.closing {
                    // We closed first; the peer's close tag completes the exchange (RFC 6120 §4.4).
                    return vec![S2sAction::Closed];
                }
                vec![
                    S2sAction::SendBytes(b"</stream:stream>".to_vec()),
                    S2sAction::Closed,
                ]
            }
            StreamEvent::StreamOpen(h) => {
                if self.phase != Phase::AwaitHeader {
                    return self.fail(StreamErrorCondition::InvalidXml, "unexpected stream header");
                }
                match self.cfg.role {
                    Role::Initiating => self.initiating_header(h),
                    Role::Receiving => self.receiving_header(h),
                }
            }
            StreamEvent::Stanza(s) => {
                if s.namespace() == NS_STREAMS && s.name() == "error" {
                    let e = parse_stream_error(s);
                    self.phase = Phase::Done;
                    return vec![
                        S2sAction::SendBytes(b"</stream:stream>".to_vec()),
                        S2sAction::Fail {
                            condition: None,
                            text: format!(
                                "peer sent stream error {}: {}",
                                e.condition.map(|c| c.as_str()).unwrap_or("(unknown)"),
                                e.text.unwrap_or_default()
                            ),
                        },
                    ];
                }
                match self.cfg.role {
                    Role::Initiating => self.initiating_stanza(s),
                    Role::Receiving => self.receiving_stanza(s),
                }
            }
        }
    }

    // ----- shared helpers -----

    fn header_bytes(&mut self, from: &str, to: Option<&str>, id: Option<&str>) -> Vec<u8> {
        use quick_xml::escape::escape;
        let mut h = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_SERVER}' xmlns:stream='{NS_STREAMS}' xmlns:db='{NS_DIALBACK}' from='{}'",
            escape(from)
        );
        if let Some(to) = to {
            h.push_str(&format!(" to='{}'", escape(to)));
        }
        if let Some(id) = id {
            h.push_str(&format!(" id='{}'", escape(id)));
        }
        h.push_str(" version='1.0'>");
        self.header_sent = true;
        h.into_bytes()
    }

    fn send_header(&mut self) -> S2sAction {
        let (l, r) = (
            self.cfg.local_domain.clone(),
            self.cfg.remote_domain.clone(),
        );
        S2sAction::SendBytes(self.header_bytes(&l, Some(&r), None))
    }

    /// Sends (header if none yet, RFC 6120 §4.9.1.2) + stream error + close, then `Fail`.
    fn fail(&mut self, c: StreamErrorCondition, text: &str) -> Vec<S2sAction> {
        let mut out = Vec::new();
        if !self.header_sent {
            let from = self
                .peer_to
                .clone()
                .unwrap_or_else(|| self.cfg.local_domain.clone());
            let to = self.peer_from.clone();
            let id = self.new_id();
            out.push(S2sAction::SendBytes(self.header_bytes(
                &from,
                to.as_deref(),
                Some(&id),
            )));
        }
        out.push(S2sAction::SendBytes(c.to_xml_and_close(Some(text))));
        out.push(S2sAction::Fail {
            condition: Some(c),
            text: text.to_owned(),
        });
        self.phase = Phase::Done;
        out
    }

    fn new_id(&mut self) -> String {
        let b: [u8; 12] = self.rng.random();
        hex::encode(b)
    }

    fn check_header_common(
        &mut self,
        h: &StreamHeader,
    ) -> Result<(), (StreamErrorCondition, String)> {
        // Accept the RFC 6120 §9.2 prefix-free form, whose default namespace is the streams one.
        if h.default_ns() != NS_SERVER && h.default_ns() != NS_STREAMS {
            return Err((
                StreamErrorCondition::InvalidNamespace,
                format!("content namespace '{}'", h.default_ns()),
            ));
        }
        h.check_version()
            .map_err(|c| (c, format!("version {:?}", h.version())))
    }

    // ----- receiving role -----

    fn receiving_header(&mut self, h: &StreamHeader) -> Vec<S2sAction> {
        self.peer_to = h.to().and_then(|t| normalise_domain(t).ok());
        self.peer_from = h.from().and_then(|f| normalise_domain(f).ok());
        if let Err((c, t)) = self.check_header_common(h) {
            return self.fail(c, &t);
        }
        // RFC 6120 §4.7.1 / §4.9.3.9: a `from` that is present but not a domain can never be
        // authenticated; say so rather than carry on as if it were absent (which would also
        // skip the per-peer policy lookup below).
        if h.from().is_some() && self.peer_from.is_none() {
            return self.fail(
                StreamErrorCondition::InvalidFrom,
                "the stream header's from is not a domain",
            );
        }
        // RFC 6120 §4.9.3.6: a `to` we do not serve.
        let Some(to) = self
            .peer_to
            .clone()
            .filter(|t| self.cfg.local_domains.contains(t))
        else {
            self.peer_to = None;
            return self.fail(
                StreamErrorCondition::HostUnknown,
                "this server does not serve that domain",
            );
        };
        if let (Some(lookup), Some(from)) = (self.cfg.policy_lookup.clone(), self.peer_from.clone())
        {
            match (lookup.0)(&from) {
                Ok(p) => self.policy = p,
                Err((c, text)) => return self.fail(c, &text),
            }
        }
        if self.policy.tls_required && !self.tls && !self.cfg.tls_available {
            // Nothing could ever be authenticated on this stream: say so instead of stalling.
            return self.fail(
                StreamErrorCondition::InternalServerError,
                "TLS is required but not available for this domain",
            );
        }
        let id = self.new_id();
        self.stream_id = Some(id.clone());
        let from = self.peer_from.clone();
        let mut bytes = self.header_bytes(&to, from.as_deref(), Some(&id));
        bytes.extend_from_slice(&self.features());
        self.phase = if self.authenticated.is_empty() {
            Phase::Negotiating
        } else {
            Phase::Established
        };
        vec![S2sAction::SendBytes(bytes)]
    }

    fn external_possible(&self) -> bool {
        self.tls
            && self.policy.sasl_external_allowed
            && !self.sasl_done
            && self
                .peer_from
                .as_ref()
                .is_some_and(|f| self.peer_cert_domains.contains(f))
    }

    fn features(&self) -> Vec<u8> {
        let mut f = String::from("<stream:features>");
        if !self.tls && self.cfg.tls_available {
            f.push_str(&format!("<starttls xmlns='{NS_TLS}'>"));
            if self.policy.tls_required {
                f.push_str("<required/>");
            }
            f.push_str("</starttls>");
        }
        let auth_phase = self.tls || !self.policy.tls_required;
        if auth_phase && !self.sasl_done {
            if self.external_possible() {
                f.push_str(&format!(
                    "<mechanisms xmlns='{NS_SASL}'><mechanism>EXTERNAL</mechanism></mechanisms>"
                ));
            }
            if self.policy.dialback_allowed {
                f.push_str(&format!(
                    "<dialback xmlns='{NS_DIALBACK_FEATURE}'><errors/></dialback>"
                ));
            }
        }
        f.push_str("</stream:features>");
        f.into_bytes()
    }

    fn receiving_stanza(&mut self, s: &Stanza) -> Vec<S2sAction> {
        let ns = s.namespace();
        match (ns, s.name()) {
            (NS_TLS, "starttls") => {
                if self.tls || !self.cfg.tls_available || self.phase != Phase::Negotiating {
                    // RFC 6120 §5.4.2.2: failure, then close.
                    self.phase = Phase::Done;
                    let mut b = format!("<failure xmlns='{NS_TLS}'/>").into_bytes();
                    b.extend_from_slice(b"</stream:stream>");
                    return vec![
                        S2sAction::SendBytes(b),
                        S2sAction::Fail {
                            condition: None,
                            text: "STARTTLS not available".into(),
                        },
                    ];
                }
                self.phase = Phase::AwaitTls;
                vec![
                    S2sAction::SendBytes(format!("<proceed xmlns='{NS_TLS}'/>").into_bytes()),
                    S2sAction::StartTls,
                ]
            }
            (NS_SASL, "auth") => self.receiving_auth(s),
            (NS_DIALBACK, _) => self.receiving_dialback(s),
            _ => {
                if self.authenticated.is_empty() {
                    // RFC 6120 §4.9.3.12: stanzas before authentication.
                    return self.fail(
                        StreamErrorCondition::NotAuthorized,
                        "stanza before authentication",
                    );
                }
                if self.policy.tls_required && !self.tls {
                    return self.fail(StreamErrorCondition::PolicyViolation, "TLS required");
                }
                match s.check_kind() {
                    Err(c) => self.fail(c, "stanza refused"),
                    Ok(StanzaKind::Other) => self.fail(
                        StreamErrorCondition::UnsupportedStanzaType,
                        &format!("<{}/> in namespace '{ns}'", s.name()),
                    ),
                    Ok(_) => {
                        match s.check_s2s_addressing(&self.authenticated, &self.cfg.local_domains) {
                            Ok((from, to)) => {
                                // XEP-0220 §4 / RFC 6120 §4.9.3.9: the (from, to) pair itself
                                // must be authenticated; `from` is what was not validated for
                                // this `to`, so the condition is `invalid-from`.
                                let paired = self
                                    .authenticated_pairs
                                    .iter()
                                    .any(|(f, t)| from.is_domain(f) && to.is_domain(t));
                                if paired {
                                    vec![S2sAction::Deliver(s.clone())]
                                } else {
                                    self.fail(
                                        StreamErrorCondition::InvalidFrom,
                                        &format!(
                                            "{} is not authenticated toward {} on this stream",
                                            from.domain(),
                                            to.domain()
                                        ),
                                    )
                                }
                            }
                            Err(c) => self.fail(c, addressing_text(c)),
                        }
                    }
                }
            }
        }
    }

    fn sasl_failure(&mut self, cond: &str, text: &str) -> Vec<S2sAction> {
        // No retries: over s2s the only mechanism is EXTERNAL, whose outcome is fixed by the
        // TLS session, so a retry on this stream cannot succeed (RFC 6120 §6.4.5 allows the
        // receiving entity to close after a failure; §9.2.1 step 10alt shows it).
        // XEP-0178 §3 / RFC 6120 §6.4.5: failure, and for s2s we close (the 9.2 vector's 10alt).
        self.phase = Phase::Done;
        let mut b = format!("<failure xmlns='{NS_SASL}'><{cond}/></failure>").into_bytes();
        b.extend_from_slice(b"</stream:stream>");
        vec![
            S2sAction::SendBytes(b),
            S2sAction::Fail {
                condition: None,
                text: text.to_owned(),
            },
        ]
    }

    fn receiving_auth(&mut self, s: &Stanza) -> Vec<S2sAction> {
        if s.attr("mechanism").as_deref() != Some("EXTERNAL") {
            return self.sasl_failure("invalid-mechanism", "only SASL EXTERNAL is offered");
        }
        if !self.external_possible() {
            return self.sasl_failure(
                "not-authorized",
                "certificate does not match the stream's from domain",
            );
        }
        let Some(from) = self.peer_from.clone() else {
            return self.sasl_failure("not-authorized", "no from on the stream header");
        };
        // XEP-0178 §3: the authzid is empty ("=") or the base64 of the sending domain.
        let payload = root_text(s);
        if !(payload.is_empty() || payload == "=") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(payload.as_bytes())
                .ok();
            let authz = decoded
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|d| normalise_domain(&d).ok());
            if authz.as_deref() != Some(from.as_str()) {
                return self.sasl_failure(
                    "invalid-authzid",
                    "authorization identity is not the from domain",
                );
            }
        }
        self.sasl_done = true;
        // XEP-0178 §3: EXTERNAL authenticates the header's `from` toward the header's `to`
        // (checked against our domains when the header arrived).
        if let Some(to) = self.peer_to.clone() {
            self.authenticated_pairs.push((from.clone(), to));
        }
        self.authenticated.push(from.clone());
        self.phase = Phase::AwaitHeader;
        self.header_sent = false;
        vec![
            S2sAction::SendBytes(format!("<success xmlns='{NS_SASL}'/>").into_bytes()),
            S2sAction::ResetFramer,
            S2sAction::Authenticated {
                domain: from,
                method: AuthMethod::SaslExternal,
            },
        ]
    }

    fn receiving_dialback(&mut self, s: &Stanza) -> Vec<S2sAction> {
        let db = match Dialback::parse(s) {
            Ok(d) => d,
            Err(e) => {
                return self.fail(StreamErrorCondition::InvalidXml, &format!("dialback: {e}"))
            }
        };
        if db.ty.is_some() {
            return self.fail(
                StreamErrorCondition::InvalidXml,
                "dialback answer on an inbound stream",
            );
        }
        let to_local = normalise_domain(&db.to)
            .ok()
            .filter(|t| self.cfg.local_domains.contains(t));
        let key = db.key.clone().unwrap_or_default();
        match db.kind {
            DbKind::Verify => {
                // We are the authoritative server (XEP-0220 §2.2): recompute our own key.
                let Some(to) = to_local else {
                    return vec![S2sAction::SendBytes(
                        db.answer(DbType::Error, Some(StanzaErrorCondition::ItemNotFound))
                            .to_xml(),
                    )];
                };
                let id = db.id.clone().unwrap_or_default();
                let ok = verify_key(&self.cfg.dialback_secret, &db.from, &to, &id, &key);
                vec![S2sAction::SendBytes(
                    db.answer(if ok { DbType::Valid } else { DbType::Invalid }, None)
                        .to_xml(),
                )]
            }
            DbKind::Result => {
                let Some(to) = to_local else {
                    return vec![S2sAction::SendBytes(
                        db.answer(DbType::Error, Some(StanzaErrorCondition::ItemNotFound))
                            .to_xml(),
                    )];
                };
                let Ok(from) = normalise_domain(&db.from) else {
                    return self.fail(
                        StreamErrorCondition::InvalidFrom,
                        "dialback from is not a domain",
                    );
                };
                // The domain being authenticated may differ from the header's `from`
                // (multiplexing, XEP-0220 §4.3): its own policy applies.
                let policy = match &self.cfg.policy_lookup {
                    Some(l) => match (l.0)(&from) {
                        Ok(p) => p,
                        Err((c, text)) => return self.fail(c, &text),
                    },
                    None => self.policy,
                };
                if !policy.dialback_allowed || (policy.tls_required && !self.tls) {
                    return vec![S2sAction::SendBytes(
                        db.answer(DbType::Error, Some(StanzaErrorCondition::PolicyViolation))
                            .to_xml(),
                    )];
                }
                let pair = (from.clone(), to.clone());
                if self.authenticated_pairs.contains(&pair) {
                    // Already authenticated on this stream: answer from state rather than open
                    // another verify connection (a peer could otherwise make us dial out once
                    // per `<db:result/>`).
                    let mut out = vec![S2sAction::SendBytes(
                        db.answer(DbType::Valid, None).to_xml(),
                    )];
                    out.extend(self.dialback_authenticated(&from, &to));
                    return out;
                }
                if self.pending_dialback.contains(&pair) {
                    // One verification per pair at a time; its answer covers this request.
                    return Vec::new();
                }
                if self.pending_dialback.len() >= MAX_PENDING_DIALBACK {
                    return self.fail(
                        StreamErrorCondition::PolicyViolation,
                        "too many dialback requests",
                    );
                }
                self.pending_dialback.push((from.clone(), to.clone()));
                vec![S2sAction::VerifyDialback {
                    originating: from,
                    receiving: to,
                    stream_id: self.stream_id.clone().unwrap_or_default(),
                    key,
                }]
            }
        }
    }

    // ----- initiating role -----

    fn initiating_header(&mut self, h: &StreamHeader) -> Vec<S2sAction> {
        if let Err((c, t)) = self.check_header_common(h) {
            return self.fail(c, &t);
        }
        self.stream_id = h.id().map(str::to_owned);
        self.peer_header_db = h.prefix_ns("db") == Some(NS_DIALBACK);
        self.phase = Phase::AwaitFeatures;
        Vec::new()
    }

    fn initiating_stanza(&mut self, s: &Stanza) -> Vec<S2sAction> {
        let (ns, name) = (s.namespace(), s.name());
        match (self.phase, ns, name) {
            (Phase::AwaitFeatures, NS_STREAMS, "features") => self.on_features(Features::parse(s)),
            (Phase::AwaitProceed, NS_TLS, "proceed") => {
                self.phase = Phase::AwaitTls;
                vec![S2sAction::StartTls]
            }
            (Phase::AwaitProceed, NS_TLS, "failure") => {
                self.phase = Phase::Done;
                vec![S2sAction::Fail {
                    condition: None,
                    text: "peer refused STARTTLS".into(),
                }]
            }
            (Phase::AwaitSaslResult, NS_SASL, "success") => {
                self.sasl_done = true;
                self.phase = Phase::AwaitHeader;
                vec![S2sAction::ResetFramer, self.send_header()]
            }
            (Phase::AwaitSaslResult, NS_SASL, "failure") => {
                if self.dialback_usable(&Features::default()) {
                    self.send_dialback()
                } else {
                    self.fail(
                        StreamErrorCondition::NotAuthorized,
                        "SASL EXTERNAL refused by peer",
                    )
                }
            }
            (Phase::AwaitDialbackResult, NS_DIALBACK, "result") => match Dialback::parse(s) {
                Ok(d) if d.ty == Some(DbType::Valid) => {
                    let remote = self.cfg.remote_domain.clone();
                    self.authenticated.push(remote.clone());
                    self.phase = Phase::Established;
                    vec![S2sAction::Authenticated {
                        domain: remote,
                        method: AuthMethod::Dialback,
                    }]
                }
                Ok(d) => {
                    let why = match d.error {
                        Some(c) => format!("dialback error {c}"),
                        None => "dialback key rejected".into(),
                    };
                    self.phase = Phase::Done;
                    vec![
                        S2sAction::SendBytes(b"</stream:stream>".to_vec()),
                        S2sAction::Fail {
                            condition: None,
                            text: why,
                        },
                    ]
                }
                Err(e) => self.fail(StreamErrorCondition::InvalidXml, &format!("dialback: {e}")),
            },
            (Phase::Established | Phase::VerifyReady, NS_DIALBACK, "verify") => {
                match Dialback::parse(s) {
                    Ok(d) if d.ty.is_some() => vec![S2sAction::VerifyAnswer(d)],
                    _ => self.fail(StreamErrorCondition::InvalidXml, "unexpected db:verify"),
                }
            }
            (Phase::Established, _, _) => self.fail(
                StreamErrorCondition::UnsupportedStanzaType,
                "stanza on an outbound stream (bidirectional streams not negotiated)",
            ),
            _ => self.fail(
                StreamErrorCondition::InvalidXml,
                &format!("unexpected <{}/> during negotiation", s.qname()),
            ),
        }
    }

    fn dialback_usable(&self, f: &Features) -> bool {
        self.policy.dialback_allowed
            && !self.dialback_tried
            && (f.dialback || self.peer_header_db)
            && (self.tls || !self.policy.tls_required)
            && self.stream_id.is_some()
    }

    fn send_dialback(&mut self) -> Vec<S2sAction> {
        self.dialback_tried = true;
        let id = self.stream_id.clone().unwrap_or_default();
        let key = super::dialback::dialback_key(
            &self.cfg.dialback_secret,
            &self.cfg.remote_domain,
            &self.cfg.local_domain,
            &id,
        );
        self.phase = Phase::AwaitDialbackResult;
        let req = Dialback::request(
            DbKind::Result,
            &self.cfg.local_domain,
            &self.cfg.remote_domain,
            None,
            &key,
        );
        vec![S2sAction::SendBytes(req.to_xml())]
    }

    fn on_features(&mut self, f: Features) -> Vec<S2sAction> {
        if let Some(u) = &f.unknown_required {
            // RFC 6120 §4.9.3.23 (reverse direction): a required feature we do not support.
            return self.fail(
                StreamErrorCondition::UnsupportedFeature,
                &format!("required feature {u}"),
            );
        }
        if self.cfg.verify_only && (self.tls || f.starttls.is_none() || !self.cfg.tls_available) {
            if !self.tls && self.policy.tls_required {
                // A `<db:verify/>` in plaintext could be answered `valid` by anyone on path:
                // the domain would pass as authenticated although its policy requires TLS.
                return self.fail(
                    StreamErrorCondition::PolicyViolation,
                    "TLS is required and the authoritative server does not offer it",
                );
            }
            // XEP-0220 §2.2: the verification stream needs no authentication of its own.
            self.phase = Phase::VerifyReady;
            return std::mem::take(&mut self.pending_verify)
                .into_iter()
                .map(|d| S2sAction::SendBytes(d.to_xml()))
                .collect();
        }
        if self.sasl_done {
            // Features of the stream restarted after SASL: we are done (RFC 6120 §6.4.6).
            let remote = self.cfg.remote_domain.clone();
            self.authenticated.push(remote.clone());
            self.phase = Phase::Established;
            return vec![S2sAction::Authenticated {
                domain: remote,
                method: AuthMethod::SaslExternal,
            }];
        }
        if !self.tls {
            if f.starttls.is_some() && self.cfg.tls_available {
                self.phase = Phase::AwaitProceed;
                return vec![S2sAction::SendBytes(
                    format!("<starttls xmlns='{NS_TLS}'/>").into_bytes(),
                )];
            }
            if self.policy.tls_required {
                return self.fail(
                    StreamErrorCondition::PolicyViolation,
                    "TLS is required and the peer does not offer it",
                );
            }
        }
        if self.tls
            && self.policy.sasl_external_allowed
            && self.cfg.have_client_certificate
            && f.mechanisms.iter().any(|m| m == "EXTERNAL")
        {
            self.phase = Phase::AwaitSaslResult;
            // RFC 6120 §9.2 / XEP-0178 §3: empty authzid, sent as "=".
            return vec![S2sAction::SendBytes(
                format!("<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>").into_bytes(),
            )];
        }
        if self.dialback_usable(&f) {
            return self.send_dialback();
        }
        self.fail(
            StreamErrorCondition::PolicyViolation,
            "no authentication method both sides allow",
        )
    }
}

/// Text for a stanza addressing error (RFC 6120 §4.9.3): says which rule the stanza broke.
fn addressing_text(c: StreamErrorCondition) -> &'static str {
    match c {
        StreamErrorCondition::ImproperAddressing => "stanza without a valid 'to' or 'from'",
        StreamErrorCondition::InvalidFrom => "'from' is not a domain authenticated on this stream",
        StreamErrorCondition::HostUnknown => "'to' is not a domain this server serves",
        _ => "stanza addressing",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmpp::stream::StreamFramer;

    fn vector(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/xmpp")
            .join(name);
        let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        // XEP-0220 transcripts are annotated "send: " / "recv: ".
        let t = String::from_utf8_lossy(&b);
        match t
            .trim_start()
            .strip_prefix("send:")
            .or_else(|| t.trim_start().strip_prefix("recv:"))
        {
            Some(rest) => rest.as_bytes().to_vec(),
            None => b,
        }
    }

    /// A driver with a framer for the bytes the machine receives.
    /// Receiving, plaintext allowed, `capulet.example` → `montague.example` (and we also serve
    /// `verona.example`); returns the side after the header and the header's stream id.
    fn dialback_side() -> (Side, String) {
        let mut cfg = S2sConfig::receiving(&["montague.example", "verona.example"], "secret");
        cfg.policy.tls_required = false;
        cfg.tls_available = false;
        let mut s = Side::new(cfg);
        s.m.start(s.t0);
        let a = s.feed(b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' from='capulet.example' to='montague.example' version='1.0'>");
        let (Some(h), _) = frame_sent(&sent(&a), false) else {
            panic!()
        };
        let id = h.id().unwrap_or_default().to_owned();
        (s, id)
    }

    fn failed_with(a: &[S2sAction]) -> Option<StreamErrorCondition> {
        a.iter().find_map(|x| match x {
            S2sAction::Fail { condition, .. } => *condition,
            _ => None,
        })
    }

    const DB_RESULT: &[u8] =
        b"<db:result from='capulet.example' to='montague.example'>0011</db:result>";

    /// Issue 10 item 4: a `<db:result/>` for a pair already authenticated on this stream is
    /// answered `valid` from state, with no new verification; one already pending starts none.
    #[test]
    fn dialback_for_an_authenticated_pair_needs_no_new_verification() {
        let (mut s, _) = dialback_side();
        let a = s.feed(DB_RESULT);
        assert!(
            matches!(a.as_slice(), [S2sAction::VerifyDialback { .. }]),
            "{a:?}"
        );
        assert!(
            s.feed(DB_RESULT).is_empty(),
            "same pair pending: no second verification"
        );
        s.m.handle_dialback_verified("capulet.example", "montague.example", DbType::Valid);
        let a = s.feed(DB_RESULT);
        assert!(
            !a.iter()
                .any(|x| matches!(x, S2sAction::VerifyDialback { .. })),
            "{a:?}"
        );
        let d = Dialback::parse(&one_stanza(&sent(&a))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.ty, Some(DbType::Valid));
    }

    /// The driver refusing a verification (bounds) answers `type='error'` with its condition.
    #[test]
    fn refused_dialback_is_answered_with_the_condition() {
        let (mut s, _) = dialback_side();
        s.feed(DB_RESULT);
        let a = s.m.handle_dialback_refused(
            "capulet.example",
            "montague.example",
            StanzaErrorCondition::ResourceConstraint,
        );
        let d = Dialback::parse(&one_stanza(&sent(&a))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.ty, Some(DbType::Error));
        assert_eq!(d.error, Some(StanzaErrorCondition::ResourceConstraint));
        assert_eq!(
            failed_with(&a),
            None,
            "one refusal does not close the stream"
        );
        // Answered once: a late verdict for the same request is ignored.
        let a =
            s.m.handle_dialback_verified("capulet.example", "montague.example", DbType::Valid);
        assert!(a.is_empty(), "{a:?}");
        for _ in 0..3 {
            s.feed(DB_RESULT);
            let a = s.m.handle_dialback_refused(
                "capulet.example",
                "montague.example",
                StanzaErrorCondition::ResourceConstraint,
            );
            assert_eq!(
                failed_with(&a),
                None,
                "our own bound is not the peer's failure"
            );
        }
    }

    /// XEP-0220 §2.4 keeps the stream after one invalid key; the third failure with nothing
    /// authenticated closes it with `not-authorized`.
    #[test]
    fn repeated_dialback_failures_close_the_stream() {
        let (mut s, _) = dialback_side();
        for round in 1..=3 {
            s.feed(DB_RESULT);
            let a = s.m.handle_dialback_verified(
                "capulet.example",
                "montague.example",
                DbType::Invalid,
            );
            let want = (round == 3).then_some(StreamErrorCondition::NotAuthorized);
            assert_eq!(failed_with(&a), want, "round {round}: {a:?}");
        }
    }

    /// RFC 6120 §4.9.3: each addressing fault gets its own condition; a stanza must travel on
    /// an authenticated (from, to) pair.
    #[test]
    fn stanza_addressing_conditions() {
        let cases: &[(&[u8], Option<StreamErrorCondition>)] = &[
            (
                b"<message from='j@capulet.example' to='r@montague.example'/>",
                None,
            ),
            (
                b"<message to='r@montague.example'/>",
                Some(StreamErrorCondition::ImproperAddressing),
            ),
            (
                b"<message from='j@capulet.example'/>",
                Some(StreamErrorCondition::ImproperAddressing),
            ),
            (
                b"<message from='j@evil.example' to='r@montague.example'/>",
                Some(StreamErrorCondition::InvalidFrom),
            ),
            (
                b"<message from='j@capulet.example' to='r@elsewhere.example'/>",
                Some(StreamErrorCondition::HostUnknown),
            ),
            // Ours, but the pair (capulet, verona) was never authenticated.
            (
                b"<message from='j@capulet.example' to='r@verona.example'/>",
                Some(StreamErrorCondition::InvalidFrom),
            ),
        ];
        for (stanza, want) in cases {
            let (mut s, _) = dialback_side();
            s.feed(DB_RESULT);
            s.m.handle_dialback_verified("capulet.example", "montague.example", DbType::Valid);
            let a = s.feed(stanza);
            assert_eq!(
                failed_with(&a),
                *want,
                "{}",
                String::from_utf8_lossy(stanza)
            );
            if want.is_none() {
                assert!(matches!(a.as_slice(), [S2sAction::Deliver(_)]), "{a:?}");
            }
        }
    }

    /// Header faults get their specific conditions (RFC 6120 §4.9.3.6, .9, .10, .25).
    #[test]
    fn header_conditions() {
        let cases: &[(&str, StreamErrorCondition)] = &[
            (
                "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' from='capulet.example' to='montague.example' version='2.0'>",
                StreamErrorCondition::UnsupportedVersion,
            ),
            (
                "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' from='capulet.example' to='montague.example' version='1.0'>",
                StreamErrorCondition::InvalidNamespace,
            ),
            (
                "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' from='capulet.example' to='nowhere.example' version='1.0'>",
                StreamErrorCondition::HostUnknown,
            ),
            (
                "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' from='not a domain!' to='montague.example' version='1.0'>",
                StreamErrorCondition::InvalidFrom,
            ),
        ];
        for (hdr, want) in cases {
            let mut cfg = S2sConfig::receiving(&["montague.example"], "secret");
            cfg.policy.tls_required = false;
            let mut s = Side::new(cfg);
            s.m.start(s.t0);
            let a = s.feed(hdr.as_bytes());
            assert_eq!(failed_with(&a), Some(*want), "{hdr}");
        }
    }

    struct Side {
        m: S2sNegotiator,
        rx: StreamFramer,
        t0: Instant,
    }

    impl Side {
        fn new(cfg: S2sConfig) -> Side {
            Side {
                m: S2sNegotiator::new(cfg),
                rx: StreamFramer::default(),
                t0: Instant::now(),
            }
        }
        fn feed(&mut self, bytes: &[u8]) -> Vec<S2sAction> {
            self.rx.push(bytes);
            let mut out = Vec::new();
            loop {
                match self.rx.next_event() {
                    Ok(Some(ev)) => {
                        let acts = self.m.handle_event(&ev);
                        let mut stop = false;
                        for a in &acts {
                            match a {
                                S2sAction::ResetFramer => self.rx.reset(),
                                S2sAction::StartTls => {
                                    let _tls_bytes = self.rx.take_buffered();
                                    stop = true;
                                }
                                _ => {}
                            }
                        }
                        out.extend(acts);
                        if stop {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        out.extend(self.m.handle_framing_error(&e));
                        break;
                    }
                }
            }
            out
        }
    }

    fn sent(acts: &[S2sAction]) -> Vec<u8> {
        let mut v = Vec::new();
        for a in acts {
            if let S2sAction::SendBytes(b) = a {
                v.extend_from_slice(b);
            }
        }
        v
    }

    /// Frames what we sent (after a header if `needs_header`), returning header attrs and stanzas.
    fn frame_sent(bytes: &[u8], needs_header: bool) -> (Option<StreamHeader>, Vec<Stanza>) {
        let mut f = StreamFramer::default();
        if needs_header {
            f.push(b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'>");
        }
        f.push(bytes);
        let (mut h, mut st) = (None, Vec::new());
        while let Ok(Some(ev)) = f.next_event() {
            match ev {
                StreamEvent::StreamOpen(x) if !needs_header || h.is_some() || x.to().is_some() => {
                    h = Some(x)
                }
                StreamEvent::StreamOpen(_) => {}
                StreamEvent::Stanza(s) => st.push(s),
                StreamEvent::StreamClose => {}
            }
        }
        (h, st)
    }

    /// Every attribute of the vector header appears with the same value in ours.
    fn assert_header_like(ours: &[u8], vector_file: &str) {
        let (Some(h), _) = frame_sent(ours, false) else {
            panic!("no header in {}", String::from_utf8_lossy(ours))
        };
        let (Some(v), _) = frame_sent(&vector(vector_file), false) else {
            panic!("vector")
        };
        for (k, val) in v.attrs() {
            if k == "id" {
                continue;
            }
            assert_eq!(
                h.attr(k),
                Some(val.as_str()),
                "{vector_file}: attribute {k}"
            );
        }
    }

    fn one_stanza(bytes: &[u8]) -> Stanza {
        let (_, st) = frame_sent(bytes, true);
        assert_eq!(st.len(), 1, "{}", String::from_utf8_lossy(bytes));
        st.into_iter().next().unwrap_or_else(|| unreachable!())
    }

    fn assert_same_element(ours: &Stanza, vector_file: &str) {
        let v = one_stanza(&vector(vector_file));
        assert_eq!(
            (ours.name(), ours.namespace()),
            (v.name(), v.namespace()),
            "{vector_file}"
        );
        assert_eq!(root_text(ours), root_text(&v), "{vector_file}");
        assert_eq!(children(ours), children(&v), "{vector_file}");
    }

    const DIR: &str = "rfc6120-9.2-s2s-flow/";

    #[test]
    fn rfc6120_9_2_as_initiating_server() {
        let mut cfg = S2sConfig::initiating("im.example.com", "example.net", "secret");
        cfg.policy.dialback_allowed = false;
        let mut s1 = Side::new(cfg);
        let a = s1.m.start(s1.t0);
        assert_header_like(&sent(&a), &format!("{DIR}01-S1-initial-stream-header.xml"));
        assert!(s1
            .feed(&vector(&format!(
                "{DIR}02-S2-response-stream-header-prefix-free.xml"
            )))
            .is_empty());
        let a = s1.feed(&vector(&format!(
            "{DIR}03-S2-features-starttls-required.xml"
        )));
        assert_same_element(&one_stanza(&sent(&a)), &format!("{DIR}04-S1-starttls.xml"));
        let a = s1.feed(&vector(&format!("{DIR}05-S2-proceed.xml")));
        assert_eq!(a, vec![S2sAction::StartTls]);
        let a = s1.m.handle_tls_established(vec!["example.net".into()]);
        assert_header_like(
            &sent(&a),
            &format!("{DIR}07-S1-stream-header-after-tls.xml"),
        );
        s1.feed(&vector(&format!(
            "{DIR}08-S2-response-header-after-tls.xml"
        )));
        assert_eq!(s1.m.stream_id(), Some("RChdjlgj/TIBcbT9Keu31zDihH4="));
        let a = s1.feed(&vector(&format!("{DIR}08b-S2-features-sasl-external.xml")));
        let auth = one_stanza(&sent(&a));
        assert_same_element(
            &auth,
            &format!("{DIR}09-S1-auth-external-empty-response.xml"),
        );
        assert_eq!(auth.attr("mechanism").as_deref(), Some("EXTERNAL"));
        let a = s1.feed(&vector(&format!("{DIR}10-S2-sasl-success.xml")));
        assert_eq!(a.first(), Some(&S2sAction::ResetFramer));
        assert_header_like(
            &sent(&a),
            &format!("{DIR}11-S1-stream-header-after-sasl.xml"),
        );
        let mut v = vector(&format!("{DIR}12-S2-response-header-after-sasl.xml"));
        v.extend(vector(&format!("{DIR}12b-S2-empty-features.xml")));
        let a = s1.feed(&v);
        assert_eq!(
            a,
            vec![S2sAction::Authenticated {
                domain: "example.net".into(),
                method: AuthMethod::SaslExternal
            }]
        );
        assert_eq!(s1.m.phase(), Phase::Established);
        assert_eq!(s1.m.poll_timeout(), None);
        let a = s1.feed(&vector(&format!("{DIR}15-S2-close-prefix-free.xml")));
        assert_eq!(a.last(), Some(&S2sAction::Closed));
    }

    #[test]
    fn rfc6120_9_2_as_receiving_server() {
        let mut cfg = S2sConfig::receiving(&["example.net"], "secret");
        cfg.id_seed = Some(1);
        cfg.policy.dialback_allowed = false;
        let mut s2 = Side::new(cfg);
        assert!(s2.m.start(s2.t0).is_empty());
        let a = s2.feed(&vector(&format!("{DIR}01-S1-initial-stream-header.xml")));
        let out = sent(&a);
        let (Some(h), st) = frame_sent(&out, false) else {
            panic!()
        };
        assert_eq!(
            (h.from(), h.to(), h.version()),
            (Some("example.net"), Some("im.example.com"), Some("1.0"))
        );
        assert!(h.id().is_some_and(|id| id.len() >= 16));
        assert_eq!(st.len(), 1);
        assert_same_element(
            &st[0],
            &format!("{DIR}03-S2-features-starttls-required.xml"),
        );
        let a = s2.feed(&vector(&format!("{DIR}04-S1-starttls.xml")));
        assert_eq!(a.last(), Some(&S2sAction::StartTls));
        assert_same_element(&one_stanza(&sent(&a)), &format!("{DIR}05-S2-proceed.xml"));
        s2.m.handle_tls_established(vec!["im.example.com".into()]);
        let a = s2.feed(&vector(&format!("{DIR}07-S1-stream-header-after-tls.xml")));
        let (Some(h2), st) = frame_sent(&sent(&a), false) else {
            panic!()
        };
        assert_ne!(h2.id(), h.id(), "new stream id after TLS (RFC 6120 §4.7.3)");
        assert_same_element(&st[0], &format!("{DIR}08b-S2-features-sasl-external.xml"));
        let a = s2.feed(&vector(&format!(
            "{DIR}09-S1-auth-external-empty-response.xml"
        )));
        assert_same_element(
            &one_stanza(&sent(&a)),
            &format!("{DIR}10-S2-sasl-success.xml"),
        );
        assert!(a.contains(&S2sAction::ResetFramer));
        assert!(a.contains(&S2sAction::Authenticated {
            domain: "im.example.com".into(),
            method: AuthMethod::SaslExternal
        }));
        let a = s2.feed(&vector(&format!("{DIR}11-S1-stream-header-after-sasl.xml")));
        let (_, st) = frame_sent(&sent(&a), false);
        assert_same_element(&st[0], &format!("{DIR}12b-S2-empty-features.xml"));
        let a = s2.feed(&vector(&format!("{DIR}13-S1-message-stanza.xml")));
        let [S2sAction::Deliver(m)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(m.id().as_deref(), Some("ju2ba41c"));
        let a = s2.feed(&vector(&format!("{DIR}14-S1-close.xml")));
        assert_eq!(a.last(), Some(&S2sAction::Closed));
    }

    #[test]
    fn rfc6120_9_2_sasl_failure_branch() {
        let mut s2 = Side::new(S2sConfig::receiving(&["example.net"], "secret"));
        s2.m.start(s2.t0);
        s2.feed(&vector(&format!("{DIR}01-S1-initial-stream-header.xml")));
        s2.feed(&vector(&format!("{DIR}04-S1-starttls.xml")));
        // Certificate for another domain: EXTERNAL is not offered and is refused if tried.
        s2.m.handle_tls_established(vec!["evil.example".into()]);
        let a = s2.feed(&vector(&format!("{DIR}07-S1-stream-header-after-tls.xml")));
        let (_, st) = frame_sent(&sent(&a), false);
        assert!(Features::parse(&st[0]).mechanisms.is_empty());
        let a = s2.feed(&vector(&format!(
            "{DIR}09-S1-auth-external-empty-response.xml"
        )));
        let out = sent(&a);
        assert!(out.ends_with(b"</stream:stream>"));
        assert_same_element(
            &one_stanza(&out),
            &format!("{DIR}10alt-S2-sasl-failure-not-authorized-and-close.xml"),
        );
        assert!(matches!(a.last(), Some(S2sAction::Fail { .. })));

        // Initiating side receiving the TLS failure branch.
        let mut s1 = Side::new(S2sConfig::initiating("im.example.com", "example.net", "s"));
        s1.m.start(s1.t0);
        s1.feed(&vector(&format!(
            "{DIR}02-S2-response-stream-header-prefix-free.xml"
        )));
        s1.feed(&vector(&format!(
            "{DIR}03-S2-features-starttls-required.xml"
        )));
        let a = s1.feed(&vector(&format!("{DIR}05alt-S2-tls-failure-and-close.xml")));
        assert!(matches!(a.first(), Some(S2sAction::Fail { .. })), "{a:?}");
    }

    #[test]
    fn dialback_receiving_and_authoritative() {
        // XEP-0220 names: capulet.example initiates to montague.example (us).
        let mut cfg = S2sConfig::receiving(&["montague.example"], "secret");
        cfg.policy.tls_required = false;
        cfg.tls_available = false;
        let mut s = Side::new(cfg);
        s.m.start(s.t0);
        // The XEP-0220 example 19 header, in the capulet → montague direction (no version).
        let a = s.feed(
            b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' from='capulet.example' to='montague.example'>",
        );
        let (Some(h), st) = frame_sent(&sent(&a), false) else {
            panic!()
        };
        assert!(Features::parse(&st[0]).dialback);
        assert!(Features::parse(&st[0]).starttls.is_none());
        let id = h.id().unwrap_or_default().to_owned();
        let key = "b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3";
        let step1 =
            format!("<db:result from='capulet.example' to='montague.example'>{key}</db:result>");
        let a = s.feed(step1.as_bytes());
        assert_eq!(
            a,
            vec![S2sAction::VerifyDialback {
                originating: "capulet.example".into(),
                receiving: "montague.example".into(),
                stream_id: id,
                key: key.into()
            }]
        );
        // A stanza before the verdict: not-authorized (RFC 6120 §4.9.3.12).
        let a =
            s.m.handle_dialback_verified("capulet.example", "montague.example", DbType::Valid);
        let out = sent(&a);
        assert_same_element(
            &one_stanza(&out),
            "xep-0220/13-receiving-server-sends-valid-verification-result-to-initiati.txt",
        );
        assert_eq!(
            a.last(),
            Some(&S2sAction::Authenticated {
                domain: "capulet.example".into(),
                method: AuthMethod::Dialback
            })
        );
        let a = s.feed(b"<message from='juliet@capulet.example' to='romeo@montague.example'><body>hi</body></message>");
        assert!(matches!(a.as_slice(), [S2sAction::Deliver(_)]), "{a:?}");
        let a = s.feed(b"<message from='x@other.example' to='romeo@montague.example'/>");
        assert_eq!(
            a.iter().find_map(|x| match x {
                S2sAction::Fail { condition, .. } => *condition,
                _ => None,
            }),
            Some(StreamErrorCondition::InvalidFrom)
        );

        // Authoritative role with the XEP-0185 vector.
        let mut cfg = S2sConfig::receiving(&["example.org"], "s3cr3tf0rd14lb4ck");
        cfg.policy.tls_required = false;
        cfg.tls_available = false;
        let mut s = Side::new(cfg);
        s.m.start(s.t0);
        s.feed(b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback' xmlns:stream='http://etherx.jabber.org/streams' to='example.org' from='xmpp.example.com' version='1.0'>");
        let a = s.feed(&vector("xep-0185/03-code.xml"));
        let ans = one_stanza(&sent(&a));
        let d = Dialback::parse(&ans).unwrap_or_else(|e| panic!("{e}"));
        let want = Dialback::parse(&one_stanza(&vector("xep-0185/04-code.xml")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d, want);
        let a = s.feed(
            b"<db:verify to='example.org' from='xmpp.example.com' id='D60000229F'>00</db:verify>",
        );
        assert_eq!(
            Dialback::parse(&one_stanza(&sent(&a))).map(|d| d.ty),
            Ok(Some(DbType::Invalid))
        );
    }

    #[test]
    fn verify_only_without_starttls_fails_when_tls_required() {
        let verify = || {
            Dialback::request(
                DbKind::Verify,
                "montague.example",
                "capulet.example",
                Some("417GAF25"),
                "b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3",
            )
        };
        let header = b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' from='capulet.example' to='montague.example' id='x' version='1.0'>";
        // Features without <starttls/>: tls_required forbids the plaintext <db:verify/>.
        for (tls_required, tls_available) in [(true, true), (true, false)] {
            let mut cfg = S2sConfig::initiating("montague.example", "capulet.example", "s");
            cfg.verify_only = true;
            cfg.policy.tls_required = tls_required;
            cfg.tls_available = tls_available;
            let mut s = Side::new(cfg);
            s.m.start(s.t0);
            assert!(s.m.queue_verify(verify()).is_empty());
            s.feed(header);
            let a = s.feed(
                b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>",
            );
            let out = String::from_utf8_lossy(&sent(&a)).into_owned();
            assert!(!out.contains("db:verify"), "{out}");
            assert!(out.contains("<policy-violation"), "{out}");
            assert!(matches!(
                a.last(),
                Some(S2sAction::Fail {
                    condition: Some(StreamErrorCondition::PolicyViolation),
                    ..
                })
            ));
            // Nothing goes out later either.
            assert!(s.m.queue_verify(verify()).is_empty());
        }
        // STARTTLS offered: negotiated first, the question goes out only over TLS.
        let mut cfg = S2sConfig::initiating("montague.example", "capulet.example", "s");
        cfg.verify_only = true;
        let mut s = Side::new(cfg);
        s.m.start(s.t0);
        s.m.queue_verify(verify());
        s.feed(header);
        let a = s.feed(b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>");
        assert!(!String::from_utf8_lossy(&sent(&a)).contains("db:verify"));
        // Not required: the plaintext question is allowed (XEP-0220 §2.2).
        let mut cfg = S2sConfig::initiating("montague.example", "capulet.example", "s");
        cfg.verify_only = true;
        cfg.policy.tls_required = false;
        let mut s = Side::new(cfg);
        s.m.start(s.t0);
        s.m.queue_verify(verify());
        s.feed(header);
        let a = s.feed(
            b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>",
        );
        assert!(String::from_utf8_lossy(&sent(&a)).contains("db:verify"));
    }

    #[test]
    fn dialback_initiating_with_xep_0185_key() {
        let mut cfg = S2sConfig::initiating("example.org", "xmpp.example.com", "s3cr3tf0rd14lb4ck");
        cfg.policy.tls_required = false;
        cfg.tls_available = false;
        let mut s = Side::new(cfg);
        s.m.start(s.t0);
        s.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' from='xmpp.example.com' to='example.org' id='D60000229F' version='1.0'>");
        let a = s.feed(b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>");
        let ours = Dialback::parse(&one_stanza(&sent(&a))).unwrap_or_else(|e| panic!("{e}"));
        let want = Dialback::parse(&one_stanza(&vector("xep-0185/02-code.xml")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ours, want);
        let a = s.feed(b"<db:result from='xmpp.example.com' to='example.org' type='valid'/>");
        assert_eq!(
            a,
            vec![S2sAction::Authenticated {
                domain: "xmpp.example.com".into(),
                method: AuthMethod::Dialback
            }]
        );
    }

    #[test]
    fn policy_and_error_vectors() {
        // TLS required, not offered.
        let mut s = Side::new(S2sConfig::initiating("a.example", "b.example", "s"));
        s.m.start(s.t0);
        s.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' id='x' version='1.0'>");
        let a = s.feed(
            b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>",
        );
        assert!(matches!(
            a.last(),
            Some(S2sAction::Fail {
                condition: Some(StreamErrorCondition::PolicyViolation),
                ..
            })
        ));
        // A required feature we do not know (RFC 6120 §4.9.3.23 vector).
        let mut s = Side::new(S2sConfig::initiating("a.example", "b.example", "s"));
        s.m.start(s.t0);
        s.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' id='x' version='1.0'>");
        let a = s.feed(&vector(
            "rfc6120-stream-errors/4.9.3.23-unsupported-feature.in.xml",
        ));
        assert!(matches!(
            a.last(),
            Some(S2sAction::Fail {
                condition: Some(StreamErrorCondition::UnsupportedFeature),
                ..
            })
        ));
        // Per-peer policy lookup: refusal at the header, and a domain without dialback.
        let lookup = PolicyLookup(std::sync::Arc::new(|d: &str| match d {
            "evil.example" => Err((
                StreamErrorCondition::PolicyViolation,
                "evil.example is not federated".to_owned(),
            )),
            _ => Ok(S2sPolicy {
                tls_required: false,
                sasl_external_allowed: true,
                dialback_allowed: d != "nodb.example",
            }),
        }));
        let mut cfg = S2sConfig::receiving(&["im.example.com"], "s");
        cfg.policy_lookup = Some(lookup.clone());
        let mut s = Side::new(cfg.clone());
        s.m.start(s.t0);
        let a = s.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' to='im.example.com' from='evil.example' version='1.0'>");
        let out = String::from_utf8_lossy(&sent(&a)).into_owned();
        assert!(out.contains("<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>evil.example is not federated</text>"), "{out}");
        let mut s = Side::new(cfg);
        s.m.start(s.t0);
        let a = s.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' xmlns:db='jabber:server:dialback' to='im.example.com' from='ok.example' version='1.0'>");
        // tls_required false for this peer: dialback offered before TLS.
        let (_, st) = frame_sent(&sent(&a), false);
        assert!(Features::parse(&st[0]).dialback);
        let a = s.feed(b"<db:result from='nodb.example' to='im.example.com'>abcd</db:result>");
        let d = Dialback::parse(&one_stanza(&sent(&a))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (d.ty, d.error),
            (
                Some(DbType::Error),
                Some(StanzaErrorCondition::PolicyViolation)
            )
        );
        let a = s.feed(b"<db:result from='evil.example' to='im.example.com'>abcd</db:result>");
        assert!(matches!(
            a.last(),
            Some(S2sAction::Fail {
                condition: Some(StreamErrorCondition::PolicyViolation),
                ..
            })
        ));

        // The caller's federation policy refusing a domain.
        let mut s = Side::new(S2sConfig::receiving(&["im.example.com"], "s"));
        s.m.start(s.t0);
        s.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' to='im.example.com' from='example.net' version='1.0'>");
        let a = s.m.close_with_error(
            StreamErrorCondition::PolicyViolation,
            "example.net is not on the allow-list",
        );
        let out = String::from_utf8_lossy(&sent(&a)).into_owned();
        assert!(out.contains("<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>example.net is not on the allow-list</text>"), "{out}");
        assert!(s
            .m
            .close_with_error(StreamErrorCondition::Reset, "x")
            .is_empty());
        // Stanza before authentication (§4.9.3.12 vector, s2s flavour).
        let mut s = Side::new(S2sConfig::receiving(&["im.example.com"], "s"));
        s.m.start(s.t0);
        s.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' to='im.example.com' from='example.net' version='1.0'>");
        let a = s.feed(b"<message to='romeo@im.example.com' from='j@example.net'><body>Wherefore art thou?</body></message>");
        assert!(matches!(
            a.last(),
            Some(S2sAction::Fail {
                condition: Some(StreamErrorCondition::NotAuthorized),
                ..
            })
        ));
        // Host unknown (§4.9.3.6 vector): header answered first, then the error.
        let mut s = Side::new(S2sConfig::receiving(&["im.example.com"], "s"));
        s.m.start(s.t0);
        let a = s.feed(&vector(
            "rfc6120-stream-errors/4.9.3.6-host-unknown-s2s.in.xml",
        ));
        let out = String::from_utf8_lossy(&sent(&a)).into_owned();
        assert!(
            out.starts_with("<?xml version='1.0'?><stream:stream"),
            "{out}"
        );
        assert!(
            out.contains("<host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"),
            "{out}"
        );
        // Unsupported version (§4.9.3.25 vector, s2s namespace).
        let mut s = Side::new(S2sConfig::receiving(&["im.example.com"], "s"));
        s.m.start(s.t0);
        let a = s.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' to='im.example.com' version='11.0'>");
        assert!(matches!(
            a.last(),
            Some(S2sAction::Fail {
                condition: Some(StreamErrorCondition::UnsupportedVersion),
                ..
            })
        ));
        // Framing errors become stream errors; timeouts too.
        let mut s = Side::new(S2sConfig::receiving(&["im.example.com"], "s"));
        s.m.start(s.t0);
        s.feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server' to='im.example.com' version='1.0'>");
        let a = s.feed(b"<!DOCTYPE x>");
        assert!(matches!(
            a.last(),
            Some(S2sAction::Fail {
                condition: Some(StreamErrorCondition::RestrictedXml),
                ..
            })
        ));
        let mut s = Side::new(S2sConfig::receiving(&["im.example.com"], "s"));
        s.m.start(s.t0);
        assert!(s.m.handle_timeout(s.t0 + Duration::from_secs(5)).is_empty());
        let a = s.m.handle_timeout(s.t0 + Duration::from_secs(31));
        assert!(matches!(
            a.last(),
            Some(S2sAction::Fail {
                condition: Some(StreamErrorCondition::ConnectionTimeout),
                ..
            })
        ));
    }
}

#[cfg(test)]
mod sequence_tests {
    //! Operation sequences (style.md §11): random inputs in random order never panic, and a
    //! machine that has failed or closed stays silent.
    use super::*;
    use crate::xmpp::stream::StreamFramer;
    use rand::seq::IndexedRandom;

    const PIECES: &[&str] = &[
        "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' from='a.example' to='b.example' id='i1' version='1.0'>",
        "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>",
        "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>EXTERNAL</mechanism></mechanisms><dialback xmlns='urn:xmpp:features:dialback'/></stream:features>",
        "<stream:features/>",
        "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>",
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>YS5leGFtcGxl</auth>",
        "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>",
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>",
        "<db:result from='a.example' to='b.example'>abcdef</db:result>",
        "<db:result from='b.example' to='a.example' type='valid'/>",
        "<db:result from='b.example' to='a.example' type='invalid'/>",
        "<db:verify from='a.example' to='b.example' id='i1'>abcdef</db:verify>",
        "<db:verify from='b.example' to='a.example' id='i1' type='valid'/>",
        "<message from='x@a.example' to='y@b.example'><body>x</body></message>",
        "<iq from='a.example' to='b.example' id='1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
        "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
        "</stream:stream>",
        "<bogus xmlns='urn:x'/>",
    ];

    #[test]
    fn random_sequences_never_panic_and_terminal_is_silent() {
        let mut rng = StdRng::seed_from_u64(42);
        for round in 0..3000 {
            let mut cfg = if rng.random_bool(0.5) {
                S2sConfig::initiating("a.example", "b.example", "s")
            } else {
                S2sConfig::receiving(&["b.example"], "s")
            };
            cfg.id_seed = Some(round);
            cfg.policy.tls_required = rng.random_bool(0.5);
            cfg.tls_available = rng.random_bool(0.8);
            let mut m = S2sNegotiator::new(cfg);
            let mut rx = StreamFramer::default();
            let t0 = Instant::now();
            let mut terminal = false;
            let mut acts = m.start(t0);
            for step in 0..rng.random_range(1..25) {
                for a in &acts {
                    if terminal {
                        panic!("round {round} step {step}: action after terminal: {a:?}");
                    }
                    match a {
                        S2sAction::Fail { .. } | S2sAction::Closed => terminal = true,
                        S2sAction::ResetFramer => rx.reset(),
                        S2sAction::StartTls => {
                            rx.take_buffered();
                        }
                        _ => {}
                    }
                }
                acts = match rng.random_range(0..10) {
                    0 => m.handle_tls_established(vec!["a.example".into()]),
                    1 => m.handle_dialback_verified("a.example", "b.example", DbType::Valid),
                    2 => m.handle_timeout(t0 + Duration::from_secs(rng.random_range(0..60))),
                    3 if rng.random_bool(0.2) => m.handle_tls_failed("x"),
                    _ => {
                        let p = PIECES.choose(&mut rng).copied().unwrap_or_default();
                        rx.push(p.as_bytes());
                        let mut out = Vec::new();
                        loop {
                            match rx.next_event() {
                                Ok(Some(ev)) => out.extend(m.handle_event(&ev)),
                                Ok(None) => break,
                                Err(e) => {
                                    out.extend(m.handle_framing_error(&e));
                                    break;
                                }
                            }
                            if out
                                .iter()
                                .any(|a| matches!(a, S2sAction::StartTls | S2sAction::ResetFramer))
                            {
                                break;
                            }
                        }
                        out
                    }
                };
            }
        }
    }
}
