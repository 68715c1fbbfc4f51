//! The two loops every cache kept in the store needs (consent lists, learned directory): one
//! writes what the cache changed, in batches that share a group commit; one applies what the
//! store reports changed under a prefix, reloading when the history it watched is gone.

use std::future::Future;

use tokio::sync::{mpsc, watch};

use super::{write_batch, Revision, SharedStore, StoreError, WatchEvent};

/// Most changes written in one batch (one group commit of the embedded store).
const BATCH: usize = 4096;

/// Writes what `rx` carries until `shutdown` (what waits then is written before returning),
/// taking everything queued at once: a burst costs a few commits, not one each. `encode`
/// gives each change's key and value (`None`: delete); `what` names it in error logs.
pub async fn write_queue<T>(
    store: SharedStore,
    mut rx: mpsc::UnboundedReceiver<T>,
    mut shutdown: watch::Receiver<bool>,
    encode: fn(T) -> (String, Option<Vec<u8>>),
    what: &'static str,
) {
    loop {
        let (first, stopping) = tokio::select! {
            c = rx.recv() => match c { Some(c) => (Some(c), false), None => return },
            _ = shutdown.changed() => (None, true),
        };
        let mut batch: Vec<T> = first.into_iter().collect();
        while stopping || batch.len() < BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let changes = batch.into_iter().map(encode).collect();
        for (k, e) in write_batch(&store, changes).await {
            tracing::error!(key = %k, error = %e, "{what} not persisted");
        }
        if stopping {
            return;
        }
    }
}

/// Applies the changes under `prefix` from revision `from` until `shutdown` (this node's own
/// writes come back too: applying them again must change nothing). On `Resync` — the history
/// is gone (compaction) or this watcher fell behind — calls `reload`, which reads the listing
/// and returns its revision, and watches again from there.
pub async fn follow<R, F>(
    store: SharedStore,
    prefix: &'static str,
    mut from: Revision,
    mut shutdown: watch::Receiver<bool>,
    what: &'static str,
    mut apply: impl FnMut(&str, Option<&[u8]>) + Send,
    mut reload: R,
) where
    R: FnMut() -> F + Send,
    F: Future<Output = Result<Revision, StoreError>> + Send,
{
    loop {
        let mut w = match store.watch(prefix, from).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the {what}");
                return;
            }
        };
        loop {
            let ev = tokio::select! {
                ev = w.next() => ev,
                _ = shutdown.changed() => return,
            };
            match ev {
                Some(WatchEvent::Put(e)) => apply(&e.key, Some(&e.value)),
                Some(WatchEvent::Delete { key, .. }) => apply(&key, None),
                Some(WatchEvent::Resync) => break,
                None => return,
            }
        }
        match reload().await {
            Ok(r) => from = r + 1,
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the {what}");
                return;
            }
        }
    }
}
