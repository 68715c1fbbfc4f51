//! The state store: one narrow, async, object-safe trait for everything Legate must keep across
//! a restart (subscriptions, pending requests, policy lists, the learned directory).
//!
//! It is shaped like etcd's key-value API so a cluster can put etcd behind the same trait:
//! string keys ordered bytewise, opaque byte values, one store-wide revision counter that grows
//! by one per change (etcd's `header.revision`), a per-key `mod_revision` used for
//! compare-and-swap, and a watch on a key prefix that replays history from a revision and
//! says "resync" when that history is gone (etcd's compaction).
//!
//! Who calls it: drivers and background tasks only. The sans-IO protocol cores never do; a
//! hot-path reader keeps a local cache filled by `list` and kept current by `watch`.
//!
//! Implementations: [`embedded::Embedded`] (the single-node default: memory plus an
//! append-only journal under `node.data_dir`) and, with the `cluster` feature, [`etcd::Etcd`]
//! (a cluster's shared state). [`prefixed::Prefixed`] scopes a store to one node's own keys.

pub mod embedded;
#[cfg(feature = "cluster")]
pub mod etcd;
mod index;
mod journal;
pub mod prefixed;
pub mod sync;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How drivers hold the store.
pub type SharedStore = Arc<dyn Store>;

/// A store-wide revision: every change gets the next one; 0 means "nothing yet".
pub type Revision = u64;

/// The boxed future every store operation returns (object safety; etcd is async).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the change that created the key (etcd `create_revision`).
    pub create_revision: Revision,
    /// Revision of the last change to the key (etcd `mod_revision`); the CAS token.
    pub mod_revision: Revision,
}

/// The keys under a prefix, consistent at `revision`: watch from `revision + 1` to miss nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listing {
    pub entries: Vec<Entry>,
    pub revision: Revision,
}

/// The outcome of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas {
    /// Written at this revision.
    Swapped(Revision),
    /// The key was not as expected; here is what it holds now (None: absent).
    Conflict(Option<Entry>),
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(Entry),
    Delete {
        key: String,
        revision: Revision,
    },
    /// The history asked for is gone (compacted, or this watcher fell too far behind): the
    /// reader must `list` again and start a new watch from the listing's revision + 1. No
    /// further events follow on this watch.
    Resync,
}

/// A running watch; dropping it cancels it.
#[derive(Debug)]
pub struct Watch {
    rx: tokio::sync::mpsc::Receiver<WatchEvent>,
    /// Set by the store when it had to drop this watcher (its queue was full).
    overflowed: Arc<AtomicBool>,
    resync_sent: bool,
}

impl Watch {
    /// A watch fed by `rx`; an implementation sets `overflowed` before dropping its sender
    /// when the reader fell behind, and the reader then sees one `Resync`.
    pub fn new(rx: tokio::sync::mpsc::Receiver<WatchEvent>, overflowed: Arc<AtomicBool>) -> Self {
        Self {
            rx,
            overflowed,
            resync_sent: false,
        }
    }

    /// The next event; None when the store is gone or after a `Resync`.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        if self.resync_sent {
            return None;
        }
        match self.rx.recv().await {
            Some(ev) => {
                if ev == WatchEvent::Resync {
                    self.resync_sent = true;
                }
                Some(ev)
            }
            None if self.overflowed.load(Ordering::Acquire) => {
                self.resync_sent = true;
                Some(WatchEvent::Resync)
            }
            None => None,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store {path} is locked by another process: another legate uses this node.data_dir (one process per data directory)")]
    InUse { path: PathBuf },
    #[error("state store {path}: corrupt record at byte {offset}: {reason} (the file must be repaired or moved away)")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },
    #[error("state store key is empty or longer than {max} bytes")]
    BadKey { max: usize },
    #[error("state store value of {len} bytes is larger than the limit of {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("state store is closed")]
    Closed,
    /// For remote stores (etcd): the service could not be reached or refused.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
}

/// Longest key accepted (etcd's default request limit is far larger; ours keeps records small).
pub const MAX_KEY: usize = 1024;
/// Largest value accepted.
pub const MAX_VALUE: usize = 1 << 20;

/// The state store. Object-safe (`Arc<dyn Store>`), every call async and `Send`.
pub trait Store: Send + Sync + 'static {
    /// The key, if present.
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Entry>>;

    /// Every key starting with `prefix` (all keys for ""), in key order.
    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Listing>;

    /// Writes the key; resolves once durable; returns the new revision.
    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, Revision>;

    /// Removes the key; resolves once durable; returns the revision of the delete, or None if
    /// the key did not exist (no revision is used then, as in etcd).
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Revision>>;

    /// Writes the key only if its `mod_revision` is `expected` (None: only if absent).
    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<Revision>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, Cas>;

    /// Changes under `prefix` with revision ≥ `from`, then live ones; `from` = 0 means "from
    /// now on". When history before `from` is no longer kept, the first event is `Resync`.
    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> StoreFuture<'a, Watch>;
}

/// Writes a batch of changes (`Some(value)`: put, `None`: delete) concurrently, so a store that
/// commits in groups (the embedded journal: one fsync for all that is waiting) takes them in
/// one commit instead of one each. The last change of a key in the batch wins; changes of
/// different keys have no order between them. Returns the failures (key, error).
pub async fn write_batch(
    store: &SharedStore,
    changes: Vec<(String, Option<Vec<u8>>)>,
) -> Vec<(String, StoreError)> {
    let mut last: std::collections::HashMap<String, Option<Vec<u8>>> =
        std::collections::HashMap::with_capacity(changes.len());
    for (k, v) in changes {
        last.insert(k, v);
    }
    let mut set = tokio::task::JoinSet::new();
    for (k, v) in last {
        let store = Arc::clone(store);
        set.spawn(async move {
            let r = match v {
                Some(v) => store.put(&k, v).await.map(drop),
                None => store.delete(&k).await.map(drop),
            };
            r.err().map(|e| (k, e))
        });
    }
    let mut failed = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(Some(f)) = r {
            failed.push(f);
        }
    }
    failed
}

pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(StoreError::BadKey { max: MAX_KEY });
    }
    Ok(())
}

pub(crate) fn check_value(value: &[u8]) -> Result<(), StoreError> {
    if value.len() > MAX_VALUE {
        return Err(StoreError::ValueTooLarge {
            len: value.len(),
            max: MAX_VALUE,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
