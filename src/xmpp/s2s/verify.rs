//! The receiving server's half of XEP-0220 §2.1.2 step 2 ("verification"): a verify-only
//! outbound stream to the authoritative server of the originating domain, found like any s2s
//! peer (SRV, then A/AAAA), asking `<db:verify/>` with the key and stream id the originating
//! server gave us. The stream does STARTTLS when offered but never authenticates itself
//! (`S2sConfig::verify_only`). One stream per question keeps it simple; dialback is the
//! fallback path and rare next to SASL EXTERNAL.
//!
//! Every `<db:result/>` a peer sends may make us connect out to addresses its own DNS names
//! (issue 10 item 4), so this module also bounds that: [`VerifyGate`] caps verifications in
//! flight per foreign domain and node-wide (`limits.dialback_pending_per_domain`,
//! `limits.dialback_verify_connections`) — beyond them the request is answered at once with
//! `resource-constraint`, never queued — and targets from DNS on private, loopback, link-local,
//! unspecified or multicast addresses are skipped unless
//! `xmpp.federation.dialback_allow_private_targets` says otherwise ([`is_refused_target`]).

use super::conn::Up;
use super::dial::{open, step, targets};
use super::metrics::DIALBACK_REFUSED;
use super::Shared;
use crate::config::Domain;
use crate::xmpp::dialback::{DbKind, DbType, Dialback};
use crate::xmpp::s2s_negotiate::S2sConfig;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a verification was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyRefused {
    #[error("too many dialback verifications in flight for this domain")]
    DomainBusy,
    #[error("too many dialback verify connections on this node")]
    NodeBusy,
}

impl VerifyRefused {
    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            VerifyRefused::DomainBusy => "domain_busy",
            VerifyRefused::NodeBusy => "node_busy",
        }
    }
}

/// Node-wide count of dialback verifications in flight, in total and per originating domain.
#[derive(Debug, Default)]
pub struct VerifyGate {
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    per_domain: HashMap<Domain, usize>,
}

/// One verification in flight; gives its slots back on drop.
#[derive(Debug)]
pub struct VerifyPermit {
    gate: Arc<VerifyGate>,
    domain: Domain,
}

impl VerifyGate {
    /// Takes a slot for `domain` if both bounds allow it. Checked without waiting: a request
    /// over a bound is answered at once, so nothing accumulates behind a slow authoritative
    /// server.
    pub fn try_acquire(
        self: &Arc<Self>,
        domain: &Domain,
        per_domain: usize,
        total: usize,
    ) -> Result<VerifyPermit, VerifyRefused> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.total >= total {
            return Err(VerifyRefused::NodeBusy);
        }
        let n = st.per_domain.get(domain).copied().unwrap_or(0);
        if n >= per_domain {
            return Err(VerifyRefused::DomainBusy);
        }
        st.total += 1;
        st.per_domain.insert(domain.clone(), n + 1);
        Ok(VerifyPermit {
            gate: self.clone(),
            domain: domain.clone(),
        })
    }

    /// Verifications in flight (all domains).
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for VerifyPermit {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_domain.get_mut(&self.domain) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_domain.remove(&self.domain);
            }
        }
    }
}

/// Takes a verification slot for `originating` under the live configuration's bounds,
/// counting a refusal.
pub fn admit(shared: &Shared, originating: &str) -> Result<Option<VerifyPermit>, VerifyRefused> {
    let Ok(domain) = Domain::parse(originating) else {
        // Not a domain: `verify_dialback` answers `Error` without connecting anywhere.
        return Ok(None);
    };
    let limits = &shared.hub.config().limits;
    shared
        .verify_gate
        .clone()
        .try_acquire(
            &domain,
            limits.dialback_pending_per_domain.max(1),
            limits.dialback_verify_connections.max(1),
        )
        .map(Some)
        .inspect_err(|r| DIALBACK_REFUSED.with_label_values(&[r.label()]).inc())
}

/// Addresses a verify connection must not go to when they come from DNS: private (RFC 1918,
/// RFC 6598 shared, fc00::/7 unique local), loopback, link-local, unspecified, broadcast,
/// "this network" (0/8) and multicast; IPv4-mapped IPv6 addresses are judged as IPv4. A
/// foreign zone naming one of these would make the gateway connect into its own network.
pub fn is_refused_target(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => refused_v4(v4),
            None => refused_v6(v6),
        },
    }
}

fn refused_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        // RFC 6598 shared address space 100.64.0.0/10 (carrier-grade NAT).
        || (a == 100 && (b & 0xc0) == 64)
}

fn refused_v6(ip: Ipv6Addr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
}

/// Asks the authoritative server of `originating` whether `key` is right for a stream with id
/// `stream_id` that it opened toward our `receiving` domain. Any failure answers `Error`
/// (XEP-0220 §2.4: the receiving server then reports `remote-server-not-found`).
pub async fn verify_dialback(
    shared: &Shared,
    originating: &str,
    receiving: &str,
    stream_id: &str,
    key: &str,
) -> DbType {
    let (Ok(orig), Ok(recv)) = (Domain::parse(originating), Domain::parse(receiving)) else {
        return DbType::Error;
    };
    let budget = Duration::from_secs(shared.hub.config().limits.handshake_timeout_secs * 2);
    match tokio::time::timeout(budget, ask(shared, &orig, &recv, stream_id, key)).await {
        Ok(v) => v,
        Err(_) => {
            tracing::info!(%orig, "dialback verification timed out");
            DbType::Error
        }
    }
}

async fn ask(shared: &Shared, orig: &Domain, recv: &Domain, stream_id: &str, key: &str) -> DbType {
    let Ok(mut targets) = targets(shared, orig).await else {
        return DbType::Error;
    };
    // A static route is the administrator's own configuration; DNS answers are the peer's.
    let from_dns = !shared.static_targets.contains_key(orig);
    if from_dns
        && !shared
            .hub
            .config()
            .xmpp
            .federation
            .dialback_allow_private_targets
    {
        let before = targets.len();
        targets.retain(|t| !is_refused_target(t.addr.ip()));
        if targets.len() < before {
            tracing::warn!(
                %orig,
                skipped = before - targets.len(),
                "dialback verify targets on private/loopback/link-local addresses skipped"
            );
            if targets.is_empty() {
                DIALBACK_REFUSED
                    .with_label_values(&["private_target"])
                    .inc();
            }
        }
    }
    for t in &targets {
        let mut mc = S2sConfig::initiating(recv.as_str(), orig.as_str(), &shared.secret);
        mc.verify_only = true;
        if let Ok(p) = super::policy::policy_for(&shared.hub.config(), orig.as_str()) {
            mc.policy = p;
        }
        let Ok((mut conn, mut ups)) = open(shared, mc, recv, orig, t).await else {
            continue;
        };
        let q = Dialback::request(
            DbKind::Verify,
            recv.as_str(),
            orig.as_str(),
            Some(stream_id),
            key,
        );
        let a = conn.m.queue_verify(q);
        if conn.run(a, &mut ups).await.is_err() {
            continue;
        }
        loop {
            for u in std::mem::take(&mut ups) {
                match u {
                    Up::VerifyAnswer(d) if d.from == orig.as_str() && d.to == recv.as_str() => {
                        let a = conn.m.close();
                        let mut rest = Vec::new();
                        let _ = conn.run(a, &mut rest).await;
                        conn.shutdown().await;
                        return d.ty.unwrap_or(DbType::Error);
                    }
                    Up::Ended { text, .. } => {
                        // The text is the authoritative server's: escaped (net::LogSafe).
                        tracing::info!(%orig, text = %crate::net::LogSafe(&text), "dialback verification stream ended");
                    }
                    _ => {}
                }
            }
            if conn.done {
                break;
            }
            match step(&mut conn).await {
                Ok(u) => ups = u,
                Err(_) => {
                    // Sends a stream error a read deadline may have left pending.
                    conn.shutdown().await;
                    break;
                }
            }
        }
    }
    DbType::Error
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn special_addresses_are_refused_public_ones_not() {
        for a in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "127.5.5.5",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_refused_target(ip(a)), "{a} should be refused");
        }
        for a in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.2.1",
            "2001:db8::1",
            "2a00:1450::1",
            "::ffff:8.8.4.4",
        ] {
            assert!(!is_refused_target(ip(a)), "{a} should be allowed");
        }
    }

    #[test]
    fn gate_bounds_per_domain_and_in_total_and_gives_back_on_drop() {
        let g = Arc::new(VerifyGate::default());
        let (a, b, c) = (
            Domain::parse("a.test").unwrap_or_else(|e| panic!("{e}")),
            Domain::parse("b.test").unwrap_or_else(|e| panic!("{e}")),
            Domain::parse("c.test").unwrap_or_else(|e| panic!("{e}")),
        );
        let a1 = g.try_acquire(&a, 2, 3);
        let a2 = g.try_acquire(&a, 2, 3);
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(
            g.try_acquire(&a, 2, 3).err(),
            Some(VerifyRefused::DomainBusy)
        );
        let b1 = g.try_acquire(&b, 2, 3);
        assert!(b1.is_ok());
        assert_eq!(g.try_acquire(&c, 2, 3).err(), Some(VerifyRefused::NodeBusy));
        assert_eq!(g.in_flight(), 3);
        drop(a1);
        assert_eq!(g.in_flight(), 2);
        assert!(
            g.try_acquire(&a, 2, 3).is_ok(),
            "a slot of a.test came back"
        );
        drop((a2, b1));
        assert_eq!(g.in_flight(), 0);
    }
}
