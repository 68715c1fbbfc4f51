//! Takeover of a dead node's SIP subscriptions (issue 12 item 3): a leader duty.
//!
//! Each node keeps the SIP dialogs it owns under `node/<id>/sip/` in the shared store. When a
//! listed peer is no longer a live member (its lease ended: it died, or was stopped), the
//! leader moves that node's records into its own part of the store and restores them in its
//! SIP edge, as a node restores its own at start. A Lync watcher that subscribed through the
//! dead node then keeps receiving NOTIFYs in its old dialog — sent by the leader over a
//! connection it opens to the partner — without subscribing again, and its next refresh is
//! answered by the leader.
//!
//! Each record is moved by one etcd transaction that also checks that the dead node is still
//! absent and that the record did not change since it was read: a node that comes back while
//! its records are being moved restores (at its start, after registering) exactly those not
//! yet moved, and no record is ever owned by two nodes.
//!
//! Not covered: a refresh or request for an adopted dialog that reaches a third node is
//! answered there as an unknown dialog (the partner subscribes again); IM sessions are not
//! taken over (the next message starts a new one).

use super::{Cluster, Role};
use crate::sip::edge::Adopter;
use crate::store::etcd::{kv_get, kv_txn};
use crate::store::prefixed::Prefixed;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::time::Duration;
use tokio::sync::watch;

/// How often the leader looks for dead peers' records.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Records moved per transaction (etcd allows 128 operations per transaction by default;
/// each record takes a put and a delete).
const PER_TXN: usize = 50;

static ADOPTED: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_cluster_dialogs_taken_over_total",
        "SIP subscription records this node (as leader) took over from dead cluster nodes, \
             by the node they came from (at most the six listed peers)",
        &["from_node"],
    )
});

/// Creates the metric family at start.
pub fn register_metrics() {
    ADOPTED.with_label_values(&["moved"]);
}

/// Runs the duty until `shutdown`: acts only while this node leads.
pub async fn run(
    client: Client,
    cluster_name: String,
    state_root: String,
    cluster: Cluster,
    adopter: Adopter,
    mut shutdown: watch::Receiver<bool>,
) {
    let members = format!("/legate/{cluster_name}/members/");
    let mut role = cluster.watch_role();
    loop {
        if *role.borrow_and_update() == Role::Leader {
            if let Err(e) = pass(&client, &members, &state_root, &cluster, &adopter).await {
                tracing::debug!(error = %e, "dialog takeover: pass failed; trying again");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = role.changed() => {}
            _ = shutdown.changed() => if *shutdown.borrow() { return },
        }
    }
}

/// One look at every listed peer that is not live.
async fn pass(
    client: &Client,
    members: &str,
    state_root: &str,
    cluster: &Cluster,
    adopter: &Adopter,
) -> Result<(), crate::store::StoreError> {
    let Some(status) = cluster.status() else {
        return Ok(());
    };
    let me = status.node.clone();
    for peer in &status.configured_peers {
        if peer.id == me || status.members.iter().any(|m| m.id == peer.id) {
            continue;
        }
        let from = format!(
            "{state_root}{}{}",
            Prefixed::node_prefix(&peer.id),
            crate::sip::edge::core::SIP_PREFIX
        );
        let to = format!(
            "{state_root}{}{}",
            Prefixed::node_prefix(&me),
            crate::sip::edge::core::SIP_PREFIX
        );
        let member_key = format!("{members}{}", peer.id);
        loop {
            if cluster.role() != Role::Leader {
                return Ok(());
            }
            let page = kv_get(
                client,
                from.clone(),
                Some(GetOptions::new().with_prefix().with_limit(PER_TXN as i64)),
            )
            .await?;
            if page.kvs().is_empty() {
                break;
            }
            let mut compares = vec![Compare::create_revision(
                member_key.clone(),
                CompareOp::Equal,
                0,
            )];
            let mut ops = Vec::new();
            let mut records = Vec::new();
            for kv in page.kvs() {
                let Some(rest) = kv.key_str().ok().and_then(|k| k.strip_prefix(&from)) else {
                    continue;
                };
                compares.push(Compare::mod_revision(
                    kv.key().to_vec(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                ));
                ops.push(TxnOp::put(format!("{to}{rest}"), kv.value().to_vec(), None));
                ops.push(TxnOp::delete(kv.key().to_vec(), None));
                records.push((
                    format!("{}{rest}", crate::sip::edge::core::SIP_PREFIX),
                    kv.value().to_vec(),
                ));
            }
            let moved = kv_txn(client, Txn::new().when(compares).and_then(ops)).await?;
            if !moved.succeeded() {
                // The node came back, or a record changed under us: look again next pass.
                tracing::info!(node = %peer.id, "dialog takeover: the node is back or its records changed; not taking them");
                return Ok(());
            }
            let n = records.len();
            ADOPTED.with_label_values(&["moved"]).inc_by(n as u64);
            match adopter.adopt(records).await {
                Some(restored) => tracing::info!(
                    node = %peer.id,
                    records = n,
                    restored,
                    "took over SIP subscriptions of a dead cluster node"
                ),
                None => tracing::warn!(
                    node = %peer.id,
                    records = n,
                    "took over SIP subscription records but this node's SIP edge is not \
                     running; they are restored at its next start"
                ),
            }
        }
    }
    Ok(())
}
