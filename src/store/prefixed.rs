//! A view of a store under one key prefix, for state that belongs to one node of a cluster.
//!
//! In a cluster the state store is shared, but some state has an owner: a SIP dialog (a
//! foreign subscription, a Lync batch) is served by the node that holds it, and two nodes
//! restoring the same dialog would each send its NOTIFYs. Such state is kept under
//! `node/<node-id>/`, so a node restores only its own, and a node taking over a dead peer's
//! dialogs knows exactly which keys are that peer's. The code that writes it sees the same
//! keys as on a single node (`sip/n/...`), because this view adds and strips the prefix.

use super::{Cas, Entry, Listing, Revision, SharedStore, Store, StoreFuture, Watch, WatchEvent};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// `inner` seen under `prefix`.
pub struct Prefixed {
    inner: SharedStore,
    prefix: String,
}

impl Prefixed {
    pub fn new(inner: SharedStore, prefix: impl Into<String>) -> Self {
        Self {
            inner,
            prefix: prefix.into(),
        }
    }

    /// The prefix of the state a cluster node owns.
    pub fn node_prefix(node_id: &str) -> String {
        format!("node/{node_id}/")
    }

    fn strip(&self, mut e: Entry) -> Option<Entry> {
        e.key = e.key.strip_prefix(&self.prefix)?.to_owned();
        Some(e)
    }
}

impl Store for Prefixed {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Entry>> {
        Box::pin(async move {
            let full = format!("{}{key}", self.prefix);
            Ok(self.inner.get(&full).await?.and_then(|e| self.strip(e)))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Listing> {
        Box::pin(async move {
            let full = format!("{}{prefix}", self.prefix);
            let l = self.inner.list(&full).await?;
            Ok(Listing {
                entries: l
                    .entries
                    .into_iter()
                    .filter_map(|e| self.strip(e))
                    .collect(),
                revision: l.revision,
            })
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, Revision> {
        Box::pin(async move {
            let full = format!("{}{key}", self.prefix);
            self.inner.put(&full, value).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Revision>> {
        Box::pin(async move {
            let full = format!("{}{key}", self.prefix);
            self.inner.delete(&full).await
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<Revision>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, Cas> {
        Box::pin(async move {
            let full = format!("{}{key}", self.prefix);
            Ok(
                match self.inner.compare_and_swap(&full, expected, value).await? {
                    Cas::Conflict(now) => Cas::Conflict(now.and_then(|e| self.strip(e))),
                    swapped => swapped,
                },
            )
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> StoreFuture<'a, Watch> {
        Box::pin(async move {
            let full = format!("{}{prefix}", self.prefix);
            let mut inner = self.inner.watch(&full, from).await?;
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            let cut = self.prefix.clone();
            tokio::spawn(async move {
                while let Some(ev) = inner.next().await {
                    let ev = match ev {
                        WatchEvent::Put(mut e) => match e.key.strip_prefix(&cut) {
                            Some(k) => {
                                e.key = k.to_owned();
                                WatchEvent::Put(e)
                            }
                            None => continue,
                        },
                        WatchEvent::Delete { key, revision } => match key.strip_prefix(&cut) {
                            Some(k) => WatchEvent::Delete {
                                key: k.to_owned(),
                                revision,
                            },
                            None => continue,
                        },
                        WatchEvent::Resync => WatchEvent::Resync,
                    };
                    let resync = ev == WatchEvent::Resync;
                    // Waiting here (not try_send) passes the reader's pace on to the inner
                    // watch, which has its own overflow rule.
                    tokio::select! {
                        r = tx.send(ev) => if r.is_err() { return },
                        _ = tx.closed() => return,
                    }
                    if resync {
                        return;
                    }
                }
                // The inner watch ended without a Resync (its store is gone): dropping the
                // sender passes that end on as it was.
            });
            Ok(Watch::new(rx, Arc::new(AtomicBool::new(false))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::Embedded;

    #[tokio::test]
    async fn a_view_reads_and_writes_only_under_its_prefix() {
        let inner: SharedStore = Arc::new(Embedded::memory());
        inner
            .put("sip/n/shared", b"x".to_vec())
            .await
            .expect("store");
        let a = Prefixed::new(inner.clone(), Prefixed::node_prefix("a"));
        let b = Prefixed::new(inner.clone(), Prefixed::node_prefix("b"));
        let mut wa = a.watch("sip/", 0).await.expect("store");
        a.put("sip/n/1", b"a1".to_vec()).await.expect("store");
        b.put("sip/n/1", b"b1".to_vec()).await.expect("store");
        let la = a.list("sip/").await.expect("store");
        assert_eq!(la.entries.len(), 1);
        assert_eq!(la.entries[0].key, "sip/n/1");
        assert_eq!(la.entries[0].value, b"a1");
        assert!(inner.get("node/b/sip/n/1").await.expect("store").is_some());
        match wa.next().await {
            Some(WatchEvent::Put(e)) => {
                assert_eq!((e.key.as_str(), &e.value[..]), ("sip/n/1", &b"a1"[..]))
            }
            other => panic!("unexpected {other:?}"),
        }
        let rev = a
            .get("sip/n/1")
            .await
            .expect("store")
            .expect("present")
            .mod_revision;
        assert_eq!(
            a.compare_and_swap("sip/n/1", Some(rev + 100), b"z".to_vec())
                .await
                .expect("store"),
            Cas::Conflict(Some(Entry {
                key: "sip/n/1".into(),
                value: b"a1".to_vec(),
                create_revision: rev,
                mod_revision: rev,
            }))
        );
        assert!(a.delete("sip/n/1").await.expect("store").is_some());
        assert!(b.get("sip/n/1").await.expect("store").is_some());
    }
}
