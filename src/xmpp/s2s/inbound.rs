//! Inbound s2s (RFC 6120 §4–§6, XEP-0178, XEP-0220 receiving side, XEP-0368 direct TLS): the
//! accept loops of `xmpp_s2s` (STARTTLS) and `xmpp_s2s_direct_tls`, and one task per
//! connection driving a receiving [`S2sNegotiator`].
//!
//! Policy enforcement points, in order: (1) the peer's stream header — `policy_lookup` refuses a
//! domain not allowed by `[xmpp.federation]` with `<policy-violation/>` and a text; (2) after
//! TLS — a domain whose `auth` is `external_only` and whose certificate does not match gets
//! `<not-authorized/>` saying so (the machine would otherwise just offer nothing); (3) each
//! `<db:result/>` — the machine asks the lookup again for the domain being authenticated and
//! answers `type='error'` when dialback is not allowed for it; (4) after authentication — the
//! domain is checked against the live configuration once more. Only stanzas from an
//! authenticated, allowed domain reach the hub.
//!
//! Bounds: connections per listener and per peer (IPv4 address or IPv6 /64, the edge kit's
//! `net::Admission`), the TLS handshake (`handshake_timeout_secs`), the whole negotiation
//! (three of them), each element (`stanza_timeout_secs`, see [`Conn::read`]), and the dialback
//! verifications a peer can make us start ([`super::verify::admit`]: per foreign domain and
//! node-wide, refused at once beyond them).
//!
//! Text the peer chose (its claimed domain, stream-error text, errors quoting its stanzas) is
//! logged through `net::LogSafe`: XML character references can carry CR/LF and escapes.

use super::conn::{cert_domains_of, Conn, TlsSide, Up};
use super::metrics::{REFUSED, STANZAS, STREAMS, UNROUTABLE};
use super::policy::{policy_for, system_for};
use super::Shared;
use crate::config::Domain;
use crate::gateway::Origin;
use crate::net::{accept_admitted, AcceptPolicy, Admission, LogSafe};
use crate::xmpp::convert::{stanza_to_envelope, ConvertError};
use crate::xmpp::dialback::DbType;
use crate::xmpp::error::{stanza_error_bounce, StanzaErrorCondition, StreamErrorCondition};
use crate::xmpp::jid::Jid;
use crate::xmpp::s2s_negotiate::{AuthMethod, S2sConfig, S2sNegotiator};
use crate::xmpp::stanza::Stanza;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// The accept loop of one listener (`direct_tls` for XEP-0368), through the edge kit: a
/// connection holds one slot of this listener and one of its peer — an IPv4 address or an
/// IPv6 /64, since one IPv6 host owns a whole /64 — for its whole life; beyond either bound it
/// is closed at once and counted in `legate_net_accept_refusals_total` (edge `xmpp_s2s` or
/// `xmpp_s2s_direct_tls`). Accept errors (EMFILE...) back off instead of spinning.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    direct_tls: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = shared.hub.config().limits.clone();
    // Bounded connections per listener and per peer (style.md §4); a zero bound would refuse
    // everything, so at least one.
    let admission = Admission::new(
        limits.max_connections_per_listener.max(1),
        limits.max_connections_per_peer.max(1),
    );
    let policy = AcceptPolicy::new(if direct_tls {
        "xmpp_s2s_direct_tls"
    } else {
        "xmpp_s2s"
    });
    while let Some(a) = accept_admitted(&listener, &admission, &policy, &mut shutdown).await {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slots = a.slots;
            handle(shared, a.stream, a.remote, direct_tls, shutdown).await;
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    sock: TcpStream,
    addr: SocketAddr,
    direct_tls: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = shared.hub.config();
    let handshake = Duration::from_secs(cfg.limits.handshake_timeout_secs);
    let idle = Duration::from_secs(cfg.limits.idle_timeout_secs);
    // Chat-room aliases are served like local domains: foreign users join rooms through them.
    let locals: Vec<&str> = cfg
        .local_domains
        .iter()
        .map(|d| d.name.as_str())
        .chain(cfg.chat_nodes.iter().map(|c| c.alias.as_str()))
        .collect();
    let mut mc = S2sConfig::receiving(&locals, &shared.secret);
    mc.tls_available = shared.server_tls.is_some();
    // The whole negotiation: STARTTLS, then SASL or dialback, whose verification is itself a
    // connection to the authoritative server bounded by two handshake timeouts (`verify`).
    mc.timeout = handshake * 3;
    mc.policy_lookup = Some(super::policy::lookup(shared.hub.clone()));
    let tls = shared
        .server_tls
        .clone()
        .map_or(TlsSide::None, TlsSide::Server);
    let limits = shared.stream_limits();
    let now = Instant::now();
    let (mut conn, first) = if direct_tls {
        let Some(st) = shared.server_tls.clone() else {
            return;
        };
        match st.accept(sock, handshake).await {
            Ok(s) => {
                // The header's `from` is not known yet: exact DNS-IDs only for now; `pump`
                // recomputes with the claimed domain (wildcards) when the header arrives.
                let cert = crate::tls::peer_identity(s.get_ref().1).ok().flatten();
                let domains = cert
                    .as_ref()
                    .map(|c| cert_domains_of(c, None))
                    .unwrap_or_default();
                let mut c = Conn::new(
                    Box::new(s),
                    S2sNegotiator::new(mc),
                    tls,
                    limits,
                    handshake,
                    "inbound",
                );
                c.cert_domains = domains.clone();
                c.direct_tls_cert = cert;
                let a = c.m.start_direct_tls(now, domains);
                (c, a)
            }
            Err(e) => {
                super::metrics::TLS_FAILURES
                    .with_label_values(&["inbound", e.failure.label()])
                    .inc();
                e.log(addr);
                return;
            }
        }
    } else {
        let mut c = Conn::new(
            Box::new(sock),
            S2sNegotiator::new(mc),
            tls,
            limits,
            handshake,
            "inbound",
        );
        let a = c.m.start(now);
        (c, a)
    };
    conn.set_stanza_timeout(Duration::from_secs(cfg.limits.stanza_timeout_secs));
    let mut ups = Vec::new();
    if shared.hub.draining() {
        // Maintenance mode: no new stream; RFC 6120 §4.9.3.17 `system-shutdown` tells the
        // peer to try later (or another node of our SRV set). Streams already up go on.
        let a = conn.m.close_with_error(
            StreamErrorCondition::SystemShutdown,
            "the gateway is draining; try again later",
        );
        let _ = conn.run(a, &mut ups).await;
        conn.shutdown().await;
        return;
    }
    if conn.run(first, &mut ups).await.is_err() {
        return;
    }
    let (vtx, mut vrx) = mpsc::channel::<(String, String, DbType)>(16);
    let mut st = Inbound {
        shared: shared.clone(),
        addr,
        vtx,
        checked_tls: false,
    };
    let mut last_activity = Instant::now();
    loop {
        for u in std::mem::take(&mut ups) {
            st.on_up(&mut conn, u).await;
        }
        if conn.done {
            break;
        }
        st.check_after_tls(&mut conn, &mut ups).await;
        if conn.done {
            break;
        }
        let deadline = conn
            .m
            .poll_timeout()
            .unwrap_or(last_activity + idle)
            .min(last_activity + idle);
        tokio::select! {
            r = conn.read() => match r {
                Ok(()) => {
                    last_activity = Instant::now();
                    match conn.pump().await {
                        Ok(u) => ups = u,
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            },
            Some((o, r, v)) = vrx.recv() => {
                let a = conn.m.handle_dialback_verified(&o, &r, v);
                if conn.run(a, &mut ups).await.is_err() { break; }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                if conn.m.poll_timeout().is_some_and(|d| now >= d) {
                    // Not authenticated in time (TLS + SASL or dialback): `connection-timeout`.
                    conn.negotiation_deadline(now, &mut ups).await;
                } else if now >= last_activity + idle {
                    // RFC 6120 §4.4: idle streams are closed cleanly.
                    let a = conn.m.close();
                    let _ = conn.run(a, &mut ups).await;
                    break;
                }
            }
            _ = shutdown.changed() => {
                let a = conn.m.close_with_error(StreamErrorCondition::SystemShutdown, "the gateway is shutting down");
                let _ = conn.run(a, &mut ups).await;
                break;
            }
        }
    }
    conn.shutdown().await;
}

struct Inbound {
    shared: Arc<Shared>,
    addr: SocketAddr,
    vtx: mpsc::Sender<(String, String, DbType)>,
    checked_tls: bool,
}

impl Inbound {
    /// Enforcement point (2) of the module doc: EXTERNAL-only domains need a matching
    /// certificate; say so instead of offering nothing.
    async fn check_after_tls(&mut self, conn: &mut Conn, ups: &mut Vec<Up>) {
        if self.checked_tls || !conn.m.is_tls() || conn.m.stream_id().is_none() {
            return;
        }
        self.checked_tls = true;
        let Some(claimed) = conn.claimed().map(str::to_owned) else {
            return;
        };
        let cfg = self.shared.hub.config();
        if let Ok(p) = policy_for(&cfg, &claimed) {
            let matches = crate::xmpp::jid::normalise_domain(&claimed)
                .is_ok_and(|c| conn.cert_domains.contains(&c));
            if !p.dialback_allowed && !matches {
                REFUSED.with_label_values(&["auth_not_allowed"]).inc();
                let text = format!(
                    "{claimed} may only authenticate with SASL EXTERNAL (XEP-0178) and its \
                     certificate does not match that domain"
                );
                tracing::info!(peer = %self.addr, domain = %LogSafe(&claimed), text = %LogSafe(&text), "s2s refused");
                let a = conn
                    .m
                    .close_with_error(StreamErrorCondition::NotAuthorized, &text);
                let _ = conn.run(a, ups).await;
            }
        }
    }

    async fn on_up(&mut self, conn: &mut Conn, u: Up) {
        match u {
            Up::Authenticated { domain, method } => {
                let cfg = self.shared.hub.config();
                // Enforcement point (4): the configuration may have changed since the header.
                if let Err((c, text)) = policy_for(&cfg, &domain) {
                    let a = conn.m.close_with_error(c, &text);
                    let mut ups = Vec::new();
                    let _ = conn.run(a, &mut ups).await;
                    return;
                }
                let m = match method {
                    AuthMethod::SaslExternal => "external",
                    AuthMethod::Dialback => "dialback",
                };
                STREAMS.with_label_values(&["inbound", m]).inc();
                tracing::info!(peer = %self.addr, %domain, auth = m, "inbound s2s authenticated");
            }
            Up::Deliver(stanza) => self.deliver(&stanza).await,
            Up::VerifyDialback {
                originating,
                receiving,
                stream_id,
                key,
            } => {
                // XEP-0220 §2.1.2 step 2: ask the authoritative server over a verify-only
                // stream — within the per-domain and node-wide bounds, else answered at once.
                let permit = match super::verify::admit(&self.shared, &originating) {
                    Ok(p) => p,
                    Err(why) => {
                        tracing::info!(peer = %self.addr, domain = %LogSafe(&originating), reason = %LogSafe(&why.to_string()), "dialback refused");
                        let a = conn.m.handle_dialback_refused(
                            &originating,
                            &receiving,
                            StanzaErrorCondition::ResourceConstraint,
                        );
                        let mut more = Vec::new();
                        let _ = conn.run(a, &mut more).await;
                        return;
                    }
                };
                let shared = self.shared.clone();
                let tx = self.vtx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let v = super::verify::verify_dialback(
                        &shared,
                        &originating,
                        &receiving,
                        &stream_id,
                        &key,
                    )
                    .await;
                    let _ = tx.send((originating, receiving, v)).await;
                });
            }
            Up::VerifyAnswer(_) => {}
            Up::Ended { condition, text } => {
                tracing::info!(
                    peer = %self.addr,
                    condition = condition.map_or("none", |c| c.as_str()),
                    text = %LogSafe(&text),
                    "inbound s2s stream ended"
                );
            }
        }
    }

    /// XEP-0199 §4.2: a server-to-server ping addressed to one of our domains is answered by
    /// the gateway itself, never relayed to a home node. Streams are one-way, so the result
    /// leaves on our outbound stream toward the peer (raw bytes: a domain is no envelope
    /// address). Returns whether the stanza was such a ping.
    fn answer_ping(&self, stanza: &crate::xmpp::stanza::Stanza) -> bool {
        if stanza.name() != "iq" || stanza.stanza_type().as_deref() != Some("get") {
            return false;
        }
        let (Some(to), Some(from)) = (stanza.to(), stanza.from()) else {
            return false;
        };
        let (Ok(local), Ok(peer)) = (Domain::parse(&to), Domain::parse(&from)) else {
            return false; // not domain-addressed (a user's ping goes to the home node)
        };
        let kids = crate::xmpp::stanza::children(stanza);
        if !kids
            .first()
            .is_some_and(|c| kids.len() == 1 && c.name == "ping" && c.ns == "urn:xmpp:ping")
        {
            return false;
        }
        let id = stanza.id().map(|i| i.into_owned()).unwrap_or_default();
        let result = format!(
            "<iq type='result' id='{}' from='{local}' to='{peer}'/>",
            quick_xml::escape::escape(&id)
        );
        let _ = self
            .shared
            .raw_out
            .try_send((local, peer, result.into_bytes()));
        true
    }

    /// Hands a stanza to the hub, waiting while its destination is full: this stream is not
    /// read meanwhile, so TCP flow control slows the peer instead of Legate dropping stanzas.
    async fn deliver(&self, stanza: &crate::xmpp::stanza::Stanza) {
        STANZAS
            .with_label_values(&["in", super::metrics::kind(stanza.name())])
            .inc();
        // Answers to our own XEP-0199 pings come back on the peer's stream; they are ours.
        if stanza.name() == "iq"
            && matches!(stanza.stanza_type().as_deref(), Some("result" | "error"))
            && stanza
                .id()
                .is_some_and(|id| id.starts_with(super::outbound::PING_ID_PREFIX))
        {
            return;
        }
        if self.answer_ping(stanza) {
            return;
        }
        let Some(from) = stanza
            .from()
            .and_then(|f| crate::gateway::Address::parse(&f).ok())
        else {
            self.unroutable(stanza, "`from` is not a user address");
            return;
        };
        let domain: Domain = from.domain.clone();
        let cfg = self.shared.hub.config();
        let system = system_for(&cfg, &domain);
        let maps = self.shared.hub.maps().current();
        match stanza_to_envelope(stanza, &system, &maps) {
            Ok(env) => {
                self.shared
                    .hub
                    .submit_wait(&Origin::S2s { domain }, env)
                    .await;
            }
            Err(e @ ConvertError::Address(_)) => self.unroutable(stanza, &e.to_string()),
            Err(e) => {
                tracing::info!(peer = %self.addr, error = %LogSafe(&e.to_string()), "inbound stanza not routed");
            }
        }
    }

    /// A stanza whose addresses cannot become an envelope (a bare domain: the gateway has no
    /// home node for it). RFC 6120 §8.2.3: an iq get/set must be answered, so one addressed to
    /// our domain gets an error reply — `feature-not-implemented` for service discovery,
    /// `service-unavailable` otherwise — over our stream to the peer (streams are one-way, as
    /// for [`answer_ping`](Self::answer_ping)). Anything else is dropped and counted.
    fn unroutable(&self, stanza: &Stanza, why: &str) {
        if self.answer_unroutable_iq(stanza) {
            UNROUTABLE.with_label_values(&["answered"]).inc();
            tracing::debug!(peer = %self.addr, reason = why, "unroutable iq answered with an error");
            return;
        }
        UNROUTABLE.with_label_values(&["dropped"]).inc();
        tracing::debug!(
            peer = %self.addr,
            stanza = stanza.name(),
            reason = why,
            "inbound stanza dropped: it cannot be routed"
        );
    }

    fn answer_unroutable_iq(&self, stanza: &Stanza) -> bool {
        if stanza.name() != "iq" || !matches!(stanza.stanza_type().as_deref(), Some("get" | "set"))
        {
            return false;
        }
        // The negotiator checked both addresses (RFC 6120 §8.1.1.1 / §8.1.2.1): `from` is in an
        // authenticated domain, `to` in one of ours. The reply goes from that domain to that one.
        let (Some(from), Some(to)) = (stanza.from(), stanza.to()) else {
            return false;
        };
        let (Ok(from), Ok(to)) = (Jid::parse(&from), Jid::parse(&to)) else {
            return false;
        };
        let (Ok(peer), Ok(local)) = (Domain::parse(from.domain()), Domain::parse(to.domain()))
        else {
            return false;
        };
        let cfg = self.shared.hub.config();
        let chat_alias = cfg.chat_node(&local).is_some();
        if !chat_alias
            && !cfg
                .local_domains
                .iter()
                .any(|d| d.name.as_str() == local.as_str())
        {
            return false;
        }
        let kids = crate::xmpp::stanza::children(stanza);
        let disco = kids.first().and_then(|c| match c.ns.as_str() {
            DISCO_INFO => Some(DISCO_INFO),
            DISCO_ITEMS => Some(DISCO_ITEMS),
            _ => None,
        });
        let get = stanza.stanza_type().as_deref() == Some("get");
        if let (true, true, Some(ns)) = (chat_alias, get, disco) {
            // A chat-room alias is a XEP-0045 service: clients look it up (disco#info on the
            // bare alias) before they join a room, and a foreign server may too. Its rooms
            // live on the home node; the service itself is answered here, as a MUC service
            // that lists no rooms (disco#items: room listing stays the home node's business).
            let reply = disco_answer(stanza, &from, &to, ns);
            return self
                .shared
                .raw_out
                .try_send((local, peer, reply.into_bytes()))
                .is_ok();
        }
        let condition = if disco.is_some() {
            StanzaErrorCondition::FeatureNotImplemented
        } else {
            StanzaErrorCondition::ServiceUnavailable
        };
        let Ok(reply) = stanza_error_bounce(stanza, condition, None, None) else {
            return false;
        };
        self.shared.raw_out.try_send((local, peer, reply)).is_ok()
    }
}

const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";

/// The result of a service discovery query (`ns`: `disco#info` or `disco#items`) sent to a
/// chat-room alias: a text conference service with the MUC feature (XEP-0045 §6.1), and no
/// items. From the alias to the asker, with the query's id.
fn disco_answer(stanza: &Stanza, from: &Jid, to: &Jid, ns: &str) -> String {
    use quick_xml::escape::escape;
    let id = stanza.id().map(|i| i.into_owned()).unwrap_or_default();
    let query = if ns == DISCO_INFO {
        format!(
            "<query xmlns='{DISCO_INFO}'><identity category='conference' type='text' \
             name='{}'/><feature var='{DISCO_INFO}'/><feature \
             var='http://jabber.org/protocol/muc'/></query>",
            escape(to.domain())
        )
    } else {
        format!("<query xmlns='{DISCO_ITEMS}'/>")
    };
    format!(
        "<iq type='result' id='{}' from='{}' to='{}'>{query}</iq>",
        escape(id.as_str()),
        escape(to.to_string().as_str()),
        escape(from.to_string().as_str()),
    )
}
