//! Who owns each IM session (issue 12 item 3: "IM session ownership ... in etcd").
//!
//! An IM session is a SIP dialog (RFC 3261 §12) on the node that set it up: the node a partner's
//! INVITE reached, or the node that opened it for a local user's first message. The home
//! node's answers come in on whichever node holds its component link; that node hands each
//! message to the session's owner (over the peer link) instead of opening a second session
//! with the partner, which a Lync client shows as a second conversation.
//!
//! - The owner of (local user, SIP user) is the value of `im/<local bare>/<remote bare>`
//!   (bare JIDs contain no `/`), written under the owner's member lease: when a node dies, etcd
//!   deletes its entries one TTL later and its pairs' next messages open new sessions from the
//!   link holder. A node whose lease changes (it was detached) writes its entries again.
//! - An entry is deleted only while it still names this node (a compare in the transaction):
//!   a pair whose partner moved to another node meanwhile keeps that node's entry.
//! - Every node follows the prefix by watch into a local map, read on each message routed from a
//!   home node toward SIP; a stale read costs at most a second session, never a message (see
//!   `peer::Fanout`, which falls back to local delivery).

use crate::store::etcd::{kv_get, kv_put, kv_txn, open_watch, watch_changes};
use crate::store::StoreError;
use dashmap::DashMap;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

use super::Cluster;

/// Pause before listing again after the watch or etcd failed.
const RETRY: Duration = Duration::from_millis(500);

/// The session owners this node knows, and the writer of its own.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    /// `/legate/<cluster>/im/`
    prefix: String,
    me: Arc<str>,
    cluster: Cluster,
    /// `<local>/<remote>` → owner node id.
    owners: DashMap<String, Arc<str>>,
    changes: mpsc::UnboundedSender<(String, bool)>,
}

fn pair_key(local: &str, remote: &str) -> String {
    format!("{local}/{remote}")
}

impl Sessions {
    /// Starts following the owners and writing this node's (both end at shutdown).
    pub fn start(
        client: Client,
        cluster_name: &str,
        cluster: Cluster,
        shutdown: watch::Receiver<bool>,
    ) -> Sessions {
        let (changes, rx) = mpsc::unbounded_channel();
        let sessions = Sessions {
            inner: Arc::new(Inner {
                prefix: format!("/legate/{cluster_name}/im/"),
                me: Arc::from(cluster.node_id()),
                cluster,
                owners: DashMap::new(),
                changes,
            }),
        };
        tokio::spawn(sessions.clone().follow(client.clone(), shutdown.clone()));
        tokio::spawn(sessions.clone().write(client, rx, shutdown));
        sessions
    }

    /// This node's SIP edge set up (`owned`) or ended the session of (local, remote).
    pub fn changed(&self, local: &str, remote: &str, owned: bool) {
        // The writer ends only at shutdown, when nothing is left to record.
        let _ = self.inner.changes.send((pair_key(local, remote), owned));
    }

    /// The live node other than this one that owns the session of (local, remote), if any.
    pub fn owner_elsewhere(&self, local: &str, remote: &str) -> Option<String> {
        let owner = self.inner.owners.get(&pair_key(local, remote))?.clone();
        if owner == self.inner.me {
            return None;
        }
        // Its entry outlives it by up to a TTL: a dead owner's pairs are served here.
        self.inner
            .cluster
            .live_members()
            .into_iter()
            .find(|m| m.as_str() == &*owner)
    }

    /// Lists the owners, then follows the watch; again after a failure.
    async fn follow(self, client: Client, mut shutdown: watch::Receiver<bool>) {
        loop {
            let end = tokio::select! {
                r = self.follow_once(&client) => r,
                _ = shutdown.changed() => return,
            };
            if let Err(e) = end {
                tracing::debug!(error = %e, "IM session owners: etcd failed; listing again");
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn follow_once(&self, client: &Client) -> Result<(), StoreError> {
        let prefix = &self.inner.prefix;
        let listing = kv_get(
            client,
            prefix.clone(),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        // A full listing replaces what was known: deletions missed while the watch was down
        // (a compacted history) are not kept.
        let mut present = HashSet::new();
        for kv in listing.kvs() {
            if let (Some(k), Ok(v)) = (
                kv.key_str().ok().and_then(|k| k.strip_prefix(prefix)),
                kv.value_str(),
            ) {
                present.insert(k.to_string());
                self.inner.owners.insert(k.to_string(), Arc::from(v));
            }
        }
        self.inner.owners.retain(|k, _| present.contains(k));
        let mut stream = open_watch(client, prefix, revision + 1).await?;
        loop {
            for (k, value) in watch_changes(stream.message().await, prefix, "IM session")? {
                match value.map(String::from_utf8) {
                    Some(Ok(v)) => {
                        self.inner.owners.insert(k, Arc::from(v));
                    }
                    Some(Err(_)) => {}
                    None => {
                        self.inner.owners.remove(&k);
                    }
                }
            }
        }
    }

    /// Writes this node's entries as its SIP edge reports them, under its current lease; all
    /// of them again when the lease changes. A write that fails is retried with the next
    /// change or lease: until then the pair's messages may open a second session, no more.
    async fn write(
        self,
        client: Client,
        mut rx: mpsc::UnboundedReceiver<(String, bool)>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut mine: HashSet<String> = HashSet::new();
        let mut lease_rx = self.inner.cluster.watch_lease();
        let mut lease = *lease_rx.borrow_and_update();
        // Entries whose last write failed or waited for a lease.
        let mut owed: HashSet<String> = HashSet::new();
        loop {
            tokio::select! {
                c = rx.recv() => {
                    let Some((key, owned)) = c else { return };
                    let mut batch = vec![(key, owned)];
                    while let Ok(c) = rx.try_recv() {
                        batch.push(c);
                    }
                    for (key, owned) in batch {
                        if owned {
                            mine.insert(key.clone());
                            owed.insert(key);
                        } else {
                            mine.remove(&key);
                            owed.remove(&key);
                            if let Err(e) = self.release(&client, &key).await {
                                tracing::debug!(session = %key, error = %e, "IM session owner entry not deleted; it ends with this node's lease");
                            }
                        }
                    }
                }
                r = lease_rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    lease = *lease_rx.borrow_and_update();
                    owed.clone_from(&mine);
                }
                _ = shutdown.changed() => return,
            }
            let Some(lease) = lease else { continue };
            let due: Vec<String> = owed.iter().cloned().collect();
            for key in due {
                match self.claim(&client, &key, lease).await {
                    Ok(()) => {
                        owed.remove(&key);
                    }
                    Err(e) => {
                        tracing::debug!(session = %key, error = %e, "IM session owner entry not written; retried with the next change");
                        break;
                    }
                }
            }
        }
    }

    /// The latest writer wins: a partner that set the pair's session up again on another node
    /// is served there.
    async fn claim(&self, client: &Client, key: &str, lease: i64) -> Result<(), StoreError> {
        let full = format!("{}{key}", self.inner.prefix);
        kv_put(
            client,
            full,
            self.inner.me.as_bytes().to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map(|_| ())
    }

    async fn release(&self, client: &Client, key: &str) -> Result<(), StoreError> {
        let full = format!("{}{key}", self.inner.prefix);
        let txn = Txn::new()
            .when([Compare::value(
                full.clone(),
                CompareOp::Equal,
                self.inner.me.as_bytes().to_vec(),
            )])
            .and_then([TxnOp::delete(full, None)]);
        kv_txn(client, txn).await.map(|_| ())
    }
}
