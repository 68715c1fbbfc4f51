//! The receiving server's half of XEP-0220 §2.1.2 step 2 ("verification"): a verify-only
//! outbound stream to the authoritative server of the originating domain, found like any s2s
//! peer (SRV, then A/AAAA), asking `<db:verify/>` with the key and stream id the originating
//! server gave us. The stream does STARTTLS when offered but never authenticates itself
//! (`S2sConfig::verify_only`). One stream per question keeps it simple; dialback is the
//! fallback path and rare next to SASL EXTERNAL.

use super::conn::Up;
use super::dial::{open, step, targets};
use super::Shared;
use crate::config::Domain;
use crate::xmpp::dialback::{DbKind, DbType, Dialback};
use crate::xmpp::s2s_negotiate::S2sConfig;
use std::time::Duration;

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
    let Ok(targets) = targets(shared, orig).await else {
        return DbType::Error;
    };
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
                        tracing::info!(%orig, %text, "dialback verification stream ended");
                    }
                    _ => {}
                }
            }
            if conn.done {
                break;
            }
            match step(&mut conn).await {
                Ok(u) => ups = u,
                Err(_) => break,
            }
        }
    }
    DbType::Error
}
