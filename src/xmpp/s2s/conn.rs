//! The thin driver shared by every s2s connection, inbound, outbound and verify-only: it owns
//! the transport, the framer and the [`S2sNegotiator`], carries out the machine's I/O actions
//! (bytes out, STARTTLS, framer reset) and hands everything else — verdicts, stanzas, dialback
//! questions and answers — to the role's task as [`Up`] events. It decides nothing itself.
//!
//! Deadlines it enforces on every stream (issue 10 item 2): a write must finish within the
//! handshake timeout; an element must be complete within `limits.stanza_timeout_secs` of its
//! first byte (the framer reports when that byte was seen, [`Conn::read`] bounds the wait);
//! the negotiation deadline of the machine is reported through
//! [`Conn::negotiation_deadline`]. Each expiry is `<connection-timeout/>` (RFC 6120 §4.9.3.4)
//! and counts in `legate_s2s_deadlines_expired_total{direction,phase}`.

use super::io::{BoxIo, Rewind};
use super::metrics::{DEADLINES, OPEN, STREAM_ERRORS, TLS_FAILURES};
use crate::config::Domain;
use crate::net::{write_bounded, WriteError};
use crate::tls::{matches_xmpp_domain, peer_identity, ClientTls, PeerCert, ServerTls, TlsFailure};
use crate::xmpp::dialback::Dialback;
use crate::xmpp::error::StreamErrorCondition;
use crate::xmpp::s2s_negotiate::{AuthMethod, S2sAction, S2sNegotiator};
use crate::xmpp::stanza::Stanza;
use crate::xmpp::stream::{StreamEvent, StreamFramer};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the role's task must act on.
#[derive(Debug)]
pub enum Up {
    Authenticated {
        domain: String,
        method: AuthMethod,
    },
    Deliver(Stanza),
    VerifyDialback {
        originating: String,
        receiving: String,
        stream_id: String,
        key: String,
    },
    VerifyAnswer(Dialback),
    /// The stream is over (error sent or received, TLS failed, or a clean close).
    Ended {
        condition: Option<StreamErrorCondition>,
        text: String,
    },
}

/// How this side runs TLS when the machine says `StartTls`.
#[derive(Clone)]
pub enum TlsSide {
    Server(ServerTls),
    Client {
        tls: ClientTls,
        local: Domain,
        remote: Domain,
    },
    /// No TLS configured (the machine was told `tls_available = false`).
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection closed by the peer")]
    Eof,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer stopped reading (write timed out)")]
    WriteTimeout,
    #[error("a stanza was not completed within {0:?} of its first byte")]
    StanzaTimeout(Duration),
}

/// Default bound from a stanza's first byte to its last, for connections whose creator does
/// not set one (`limits.stanza_timeout_secs` has the same default).
pub const DEFAULT_STANZA_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Conn {
    io: Option<BoxIo>,
    pub framer: StreamFramer,
    pub m: S2sNegotiator,
    tls: TlsSide,
    handshake_timeout: Duration,
    direction: &'static str,
    /// The `from` of the last stream header (the peer's claimed domain, before TLS).
    claimed: Option<String>,
    rbuf: BytesBuf,
    /// Domains the peer's verified certificate speaks for (inbound), set once TLS is up.
    pub cert_domains: Vec<String>,
    /// Inbound direct TLS (XEP-0368): the peer's verified certificate. The stream header, and
    /// with it the claimed domain a wildcard may match, only arrives after the handshake, so
    /// `cert_domains` is recomputed from it at each header, before the machine answers.
    pub direct_tls_cert: Option<PeerCert>,
    /// The stream has ended; nothing more is read or written.
    pub done: bool,
    /// Bound from the first byte of an element to its last (issue 10 item 2).
    stanza_timeout: Duration,
    /// A stream error decided while reading (the read future may be cancelled by the caller's
    /// `select!`, so it never writes): sent by [`shutdown`](Self::shutdown).
    pending_error: Option<(StreamErrorCondition, String)>,
}

type BytesBuf = bytes::BytesMut;

impl Drop for Conn {
    fn drop(&mut self) {
        OPEN.with_label_values(&[self.direction]).dec();
    }
}

/// Domains a verified peer certificate speaks for: its exact DNS-IDs, plus `claimed` when a
/// wildcard matches it (RFC 6125 §6.4.3). Verification of the chain is rustls' job.
pub fn cert_domains(conn: &rustls::CommonState, claimed: Option<&str>) -> Vec<String> {
    match peer_identity(conn) {
        Ok(Some(cert)) => cert_domains_of(&cert, claimed),
        _ => Vec::new(),
    }
}

/// [`cert_domains`] for an already parsed certificate: exact DNS-IDs, XMPP SRV-IDs and domain
/// xmppAddrs (RFC 6120 §13.7.2.1), plus `claimed` when a wildcard covers it.
pub fn cert_domains_of(cert: &PeerCert, claimed: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for id in cert.xmpp_ids().filter(|d| !d.contains('*')) {
        if !out.iter().any(|d| d == id) {
            out.push(id.to_owned());
        }
    }
    if let Some(c) = claimed.and_then(|c| Domain::parse(c).ok()) {
        if matches_xmpp_domain(cert, &c) && !out.iter().any(|d| d == c.as_str()) {
            out.push(c.as_str().to_string());
        }
    }
    out
}

impl Conn {
    pub fn new(
        io: BoxIo,
        m: S2sNegotiator,
        tls: TlsSide,
        limits: crate::xmpp::stream::Limits,
        handshake_timeout: Duration,
        direction: &'static str,
    ) -> Conn {
        OPEN.with_label_values(&[direction]).inc();
        Conn {
            io: Some(io),
            framer: StreamFramer::new(limits),
            m,
            tls,
            handshake_timeout,
            direction,
            claimed: None,
            rbuf: BytesBuf::with_capacity(16 * 1024),
            cert_domains: Vec::new(),
            direct_tls_cert: None,
            done: false,
            stanza_timeout: DEFAULT_STANZA_TIMEOUT,
            pending_error: None,
        }
    }

    /// Sets the bound from an element's first byte to its last (`limits.stanza_timeout_secs`).
    pub fn set_stanza_timeout(&mut self, d: Duration) {
        self.stanza_timeout = d;
    }

    /// Reports `now` to the machine; if its negotiation deadline has passed, carries out its
    /// `connection-timeout` (RFC 6120 §4.9.3.4) and counts it. Events go to `ups`.
    pub async fn negotiation_deadline(&mut self, now: Instant, ups: &mut Vec<Up>) {
        let a = self.m.handle_timeout(now);
        if !a.is_empty() {
            DEADLINES
                .with_label_values(&[self.direction, "negotiation"])
                .inc();
        }
        let _ = self.run(a, ups).await;
    }

    /// The `from` of the peer's last stream header.
    pub fn claimed(&self) -> Option<&str> {
        self.claimed.as_deref()
    }

    /// Writes `bytes` and flushes (TLS needs the flush to emit records) through the edge
    /// kit's [`write_bounded`]. A peer that stops reading would block us forever: a write that
    /// does not finish within the handshake timeout counts as a dead connection.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ConnError> {
        let io = self.io.as_mut().ok_or(ConnError::Eof)?;
        write_bounded(io, bytes, self.handshake_timeout)
            .await
            .map_err(|e| match e {
                WriteError::Io(e) => ConnError::Io(e),
                WriteError::Timeout(_) => ConnError::WriteTimeout,
            })
    }

    /// Reads once from the socket into the framer. Cancel-safe (used inside `select!`).
    ///
    /// While part of an element is buffered, the read is bounded by that element's deadline
    /// (first byte + stanza timeout): a peer that sends the start of a stanza and then a byte
    /// now and then would otherwise hold the stream, and reset the idle timer, forever. On
    /// expiry this returns [`ConnError::StanzaTimeout`] and leaves `<connection-timeout/>`
    /// (RFC 6120 §4.9.3.4) for [`shutdown`](Self::shutdown) to send.
    pub async fn read(&mut self) -> Result<(), ConnError> {
        let deadline = self
            .framer
            .observe_partial(Instant::now())
            .map(|first| first + self.stanza_timeout);
        let io = self.io.as_mut().ok_or(ConnError::Eof)?;
        self.rbuf.clear();
        let read = io.read_buf(&mut self.rbuf);
        let n = match deadline {
            None => read.await?,
            Some(d) => match tokio::time::timeout_at(d.into(), read).await {
                Ok(r) => r?,
                Err(_) => return Err(self.stanza_expired()),
            },
        };
        if n == 0 {
            return Err(ConnError::Eof);
        }
        self.framer.push(&self.rbuf);
        Ok(())
    }

    /// Feeds every complete event in the framer to the machine and runs its actions.
    pub async fn pump(&mut self) -> Result<Vec<Up>, ConnError> {
        let mut ups = Vec::new();
        while !self.done {
            let acts = match self.framer.next_event() {
                Ok(Some(ev)) => {
                    if let StreamEvent::StreamOpen(h) = &ev {
                        self.claimed = h.from().map(str::to_owned);
                        if let Some(cert) = &self.direct_tls_cert {
                            let domains = cert_domains_of(cert, self.claimed.as_deref());
                            self.cert_domains = domains.clone();
                            self.m.set_peer_cert_domains(domains);
                        }
                    }
                    self.m.handle_event(&ev)
                }
                Ok(None) => break,
                Err(e) => self.m.handle_framing_error(&e),
            };
            self.run(acts, &mut ups).await?;
        }
        Ok(ups)
    }

    /// Carries out `acts` in order; non-I/O actions go to `ups`.
    pub async fn run(&mut self, acts: Vec<S2sAction>, ups: &mut Vec<Up>) -> Result<(), ConnError> {
        let mut work: VecDeque<S2sAction> = acts.into();
        while let Some(a) = work.pop_front() {
            match a {
                S2sAction::SendBytes(b) => {
                    if let Err(e) = self.send(&b).await {
                        // The peer may hang up right after its own error; report what we know.
                        self.done = true;
                        ups.push(Up::Ended {
                            condition: None,
                            text: format!("write failed: {e}"),
                        });
                        return Ok(());
                    }
                }
                S2sAction::ResetFramer => self.framer.reset(),
                S2sAction::StartTls => {
                    let more = self.upgrade().await;
                    work.extend(more);
                }
                S2sAction::Authenticated { domain, method } => {
                    ups.push(Up::Authenticated { domain, method })
                }
                S2sAction::Deliver(s) => ups.push(Up::Deliver(s)),
                S2sAction::VerifyDialback {
                    originating,
                    receiving,
                    stream_id,
                    key,
                } => ups.push(Up::VerifyDialback {
                    originating,
                    receiving,
                    stream_id,
                    key,
                }),
                S2sAction::VerifyAnswer(d) => ups.push(Up::VerifyAnswer(d)),
                S2sAction::Fail { condition, text } => {
                    self.done = true;
                    let side = if text.starts_with("peer sent stream error") {
                        "received"
                    } else {
                        "sent"
                    };
                    STREAM_ERRORS
                        .with_label_values(&[side, condition.map_or("none", |c| c.as_str())])
                        .inc();
                    ups.push(Up::Ended { condition, text });
                }
                S2sAction::Closed => {
                    self.done = true;
                    ups.push(Up::Ended {
                        condition: None,
                        text: "stream closed".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// STARTTLS (RFC 6120 §5.4.3.3): bytes the framer already holds belong to TLS; the framer
    /// starts over on the encrypted stream. Returns the machine's actions for the outcome.
    async fn upgrade(&mut self) -> Vec<S2sAction> {
        let prefix = self.framer.take_buffered();
        self.framer.reset();
        let Some(plain) = self.io.take() else {
            return self.m.handle_tls_failed("no transport");
        };
        let io = Rewind::new(prefix, plain);
        match self.tls.clone() {
            TlsSide::Server(st) => match st.accept(io, self.handshake_timeout).await {
                Ok(s) => {
                    let domains = cert_domains(s.get_ref().1, self.claimed.as_deref());
                    self.cert_domains = domains.clone();
                    self.io = Some(Box::new(s));
                    self.m.handle_tls_established(domains)
                }
                Err(e) => self.tls_failed(e.failure),
            },
            TlsSide::Client { tls, local, remote } => {
                match tls
                    .connect(io, Some(&local), &remote, self.handshake_timeout)
                    .await
                {
                    Ok(s) => {
                        self.io = Some(Box::new(s));
                        self.m
                            .handle_tls_established(vec![remote.as_str().to_string()])
                    }
                    Err(e) => self.tls_failed(e.failure),
                }
            }
            TlsSide::None => self.m.handle_tls_failed("TLS is not configured"),
        }
    }

    fn tls_failed(&mut self, f: TlsFailure) -> Vec<S2sAction> {
        TLS_FAILURES
            .with_label_values(&[self.direction, f.label()])
            .inc();
        tracing::warn!(
            direction = self.direction,
            reason = f.label(),
            "s2s TLS handshake failed"
        );
        self.m.handle_tls_failed(f.label())
    }

    fn stanza_expired(&mut self) -> ConnError {
        DEADLINES
            .with_label_values(&[self.direction, "stanza"])
            .inc();
        let text = format!(
            "a stanza was not completed within {} s of its first byte",
            self.stanza_timeout.as_secs()
        );
        self.pending_error = Some((StreamErrorCondition::ConnectionTimeout, text));
        ConnError::StanzaTimeout(self.stanza_timeout)
    }

    /// Best-effort shutdown of the transport, after the stream error a read left pending.
    pub async fn shutdown(&mut self) {
        if let Some((c, text)) = self.pending_error.take() {
            let a = self.m.close_with_error(c, &text);
            let mut ups = Vec::new();
            let _ = self.run(a, &mut ups).await;
        }
        if let Some(io) = self.io.as_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        }
        self.io = None;
        self.done = true;
    }
}
