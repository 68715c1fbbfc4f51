//! Opening outbound s2s connections (RFC 6120 §3.2, XEP-0368): targets from the resolver
//! (`_xmpps-server` and `_xmpp-server` merged, then A/AAAA) or a static override, tried in
//! order; direct TLS for `_xmpps-server` targets, a plain stream that negotiates STARTTLS
//! otherwise. TLS names the *domain* (SNI and certificate check), never the SRV target host
//! (RFC 6120 §13.7.2.1).

use super::conn::{Conn, ConnError, TlsSide, Up};
use super::metrics::TLS_FAILURES;
use super::Shared;
use crate::config::Domain;
use crate::dns::{Target, Transport};
use crate::gateway::ErrorCondition;
use crate::net::{connect_bounded, ConnectError};
use crate::xmpp::s2s_negotiate::{S2sConfig, S2sNegotiator};
use std::time::{Duration, Instant};

/// Why a remote domain could not be reached, as the bounce condition says it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    /// DNS failure, refused connection, TLS or authentication failure
    /// (`remote-server-not-found`, RFC 6120 §8.3.3.15).
    #[error("{0}")]
    NotFound(String),
    /// Connect, handshake or negotiation took too long (`remote-server-timeout`, §8.3.3.16).
    #[error("{0}")]
    Timeout(String),
}

impl DialError {
    pub fn condition(&self) -> ErrorCondition {
        match self {
            DialError::NotFound(_) => ErrorCondition::RemoteServerNotFound,
            DialError::Timeout(_) => ErrorCondition::RemoteServerTimeout,
        }
    }
}

/// Where to connect for `remote`.
pub async fn targets(shared: &Shared, remote: &Domain) -> Result<Vec<Target>, DialError> {
    if let Some(t) = shared.static_targets.get(remote) {
        return Ok(t.value().clone());
    }
    match shared.resolver.xmpp_s2s_targets(remote).await {
        Ok(t) if !t.is_empty() => Ok(t),
        Ok(_) => Err(DialError::NotFound(format!("{remote}: no s2s targets"))),
        Err(e @ crate::dns::DnsError::Timeout { .. }) => Err(DialError::Timeout(e.to_string())),
        Err(e) => Err(DialError::NotFound(e.to_string())),
    }
}

/// Opens one connection to `target` and starts the initiating machine `mc` on it; returns the
/// connection and the events its first actions produced.
pub async fn open(
    shared: &Shared,
    mut mc: S2sConfig,
    local: &Domain,
    remote: &Domain,
    target: &Target,
) -> Result<(Conn, Vec<Up>), DialError> {
    let cfg = shared.hub.config();
    let handshake = Duration::from_secs(cfg.limits.handshake_timeout_secs);
    let sock = match connect_bounded(target.addr, handshake).await {
        Ok(s) => s,
        Err(ConnectError::Io { source, .. }) => {
            return Err(DialError::NotFound(format!("{target}: {source}")))
        }
        Err(ConnectError::Timeout { .. }) => {
            return Err(DialError::Timeout(format!("{target}: connect timed out")))
        }
    };
    mc.tls_available = shared.client_tls.is_some();
    mc.have_client_certificate = shared.have_client_cert;
    // STARTTLS, then SASL or dialback (the peer verifying our key calls back to us): each step
    // is bounded by the handshake timeout, the whole negotiation by three of them.
    mc.timeout = handshake * 3;
    let tls = match &shared.client_tls {
        Some(t) => TlsSide::Client {
            tls: t.clone(),
            local: local.clone(),
            remote: remote.clone(),
        },
        None => TlsSide::None,
    };
    let limits = shared.stream_limits();
    let now = Instant::now();
    let (mut conn, acts) = if target.transport == Transport::Tls {
        let Some(ct) = &shared.client_tls else {
            return Err(DialError::NotFound(format!(
                "{target}: direct TLS target but no TLS client configured"
            )));
        };
        let s = match ct.connect(sock, Some(local), remote, handshake).await {
            Ok(s) => s,
            Err(e) => {
                TLS_FAILURES
                    .with_label_values(&["outbound", e.failure.label()])
                    .inc();
                let msg = format!("{target}: {e}");
                return Err(if e.failure == crate::tls::TlsFailure::Timeout {
                    DialError::Timeout(msg)
                } else {
                    DialError::NotFound(msg)
                });
            }
        };
        let mut c = Conn::new(
            Box::new(s),
            S2sNegotiator::new(mc),
            tls,
            limits,
            handshake,
            "outbound",
        );
        let a = c.m.start_direct_tls(now, vec![remote.as_str().to_string()]);
        (c, a)
    } else {
        let mut c = Conn::new(
            Box::new(sock),
            S2sNegotiator::new(mc),
            tls,
            limits,
            handshake,
            "outbound",
        );
        let a = c.m.start(now);
        (c, a)
    };
    conn.set_stanza_timeout(Duration::from_secs(cfg.limits.stanza_timeout_secs));
    let mut ups = Vec::new();
    conn.run(acts, &mut ups)
        .await
        .map_err(|e| DialError::NotFound(format!("{target}: {e}")))?;
    Ok((conn, ups))
}

/// Reads and pumps until the machine produces events or its deadline passes.
pub async fn step(conn: &mut Conn) -> Result<Vec<Up>, DialError> {
    let deadline = conn.m.poll_timeout();
    let read = async {
        conn.read().await?;
        conn.pump().await
    };
    let r: Result<Vec<Up>, ConnError> = match deadline {
        Some(d) => match tokio::time::timeout_at(d.into(), read).await {
            Ok(r) => r,
            Err(_) => {
                let mut ups = Vec::new();
                conn.negotiation_deadline(Instant::now(), &mut ups).await;
                if ups.is_empty() {
                    return Err(DialError::Timeout("negotiation timed out".into()));
                }
                return Ok(ups);
            }
        },
        None => read.await,
    };
    r.map_err(|e| DialError::NotFound(e.to_string()))
}
