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
///
/// A change the store refuses (etcd without quorum, a full disk) is not dropped: it is kept,
/// superseded by any later change of the same key, and written again after a pause that grows
/// from [`RETRY_FIRST`] to [`RETRY_MAX`], so what the cache holds reaches the store once it
/// can take it. At shutdown one last attempt is made; what still fails is logged.
pub async fn write_queue<T>(
    store: SharedStore,
    mut rx: mpsc::UnboundedReceiver<T>,
    mut shutdown: watch::Receiver<bool>,
    encode: fn(T) -> (String, Option<Vec<u8>>),
    what: &'static str,
) {
    // Refused changes by key (the last one wins), waiting for the next attempt.
    let mut pending: std::collections::BTreeMap<String, Option<Vec<u8>>> = Default::default();
    let mut pause = RETRY_FIRST;
    loop {
        let retry = tokio::time::sleep(pause);
        let (first, stopping) = tokio::select! {
            c = rx.recv() => match c { Some(c) => (Some(c), false), None => (None, true) },
            _ = shutdown.changed() => (None, true),
            _ = retry, if !pending.is_empty() => (None, false),
        };
        let mut batch: Vec<T> = first.into_iter().collect();
        while stopping || batch.len() < BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        for (k, v) in batch.into_iter().map(encode) {
            pending.insert(k, v);
        }
        if pending.is_empty() {
            if stopping {
                return;
            }
            continue;
        }
        let changes: Vec<(String, Option<Vec<u8>>)> =
            std::mem::take(&mut pending).into_iter().collect();
        let values: std::collections::HashMap<String, Option<Vec<u8>>> =
            changes.iter().cloned().collect();
        let failed = write_batch(&store, changes).await;
        if failed.is_empty() {
            pause = RETRY_FIRST;
        } else {
            for (k, e) in &failed {
                if stopping {
                    tracing::error!(key = %k, error = %e, "{what} not persisted at shutdown");
                } else {
                    tracing::warn!(key = %k, error = %e, retry_in_ms = pause.as_millis() as u64, "{what} not persisted yet; will retry");
                }
            }
            // A change that arrived meanwhile is newer: it wins over the refused one.
            for (k, _) in failed {
                if let Some(v) = values.get(&k) {
                    pending.entry(k).or_insert_with(|| v.clone());
                }
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
        if stopping {
            return;
        }
    }
}

/// First pause before writing refused changes again, and the longest.
pub const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
pub const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

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
    let mut pause = RETRY_FIRST;
    loop {
        // A store that cannot be reached now (etcd without quorum) is tried again: giving up
        // would leave this cache deaf to every other node for good.
        let mut w = match store.watch(prefix, from).await {
            Ok(w) => {
                pause = RETRY_FIRST;
                w
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "cannot watch the {what} yet; will retry");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return,
                }
                pause = (pause * 2).min(RETRY_MAX);
                continue;
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
        loop {
            match reload().await {
                Ok(r) => {
                    from = r + 1;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "cannot reload the {what} yet; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => return,
                    }
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::Embedded;
    use crate::store::{Cas, Entry, Listing, Store, StoreFuture, Watch};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// The embedded store, refusing every write while `down` is set (etcd without quorum).
    struct Flaky {
        inner: Embedded,
        down: AtomicBool,
    }

    impl Flaky {
        fn refuse(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("test: no quorum".into()));
            }
            Ok(())
        }
    }

    impl Store for Flaky {
        fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Entry>> {
            self.inner.get(key)
        }
        fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Listing> {
            self.inner.list(prefix)
        }
        fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, Revision> {
            Box::pin(async move {
                self.refuse()?;
                self.inner.put(key, value).await
            })
        }
        fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Revision>> {
            Box::pin(async move {
                self.refuse()?;
                self.inner.delete(key).await
            })
        }
        fn compare_and_swap<'a>(
            &'a self,
            key: &'a str,
            expected: Option<Revision>,
            value: Vec<u8>,
        ) -> StoreFuture<'a, Cas> {
            Box::pin(async move {
                self.refuse()?;
                self.inner.compare_and_swap(key, expected, value).await
            })
        }
        fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> StoreFuture<'a, Watch> {
            self.inner.watch(prefix, from)
        }
    }

    fn encode(c: (String, Option<Vec<u8>>)) -> (String, Option<Vec<u8>>) {
        c
    }

    #[tokio::test]
    async fn a_refused_change_is_written_once_the_store_takes_it_and_the_last_one_wins() {
        let flaky = Arc::new(Flaky {
            inner: Embedded::memory(),
            down: AtomicBool::new(true),
        });
        let store: SharedStore = flaky.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(write_queue(store.clone(), rx, stop, encode, "test"));
        tx.send(("k".to_string(), Some(b"1".to_vec())))
            .expect("send");
        tx.send(("gone".to_string(), Some(b"x".to_vec())))
            .expect("send");
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert_eq!(
            store.get("k").await.expect("get"),
            None,
            "refused while down"
        );
        // A newer change of the same key while still down supersedes the refused one.
        tx.send(("k".to_string(), Some(b"2".to_vec())))
            .expect("send");
        tx.send(("gone".to_string(), None)).expect("send");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        flaky.down.store(false, Ordering::SeqCst);
        // The next attempt comes within the grown pause (at most RETRY_MAX).
        let deadline = tokio::time::Instant::now() + RETRY_MAX * 2;
        let k = loop {
            if let Some(k) = store.get("k").await.expect("get") {
                break k;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never written after the store came back"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(k.value, b"2");
        assert_eq!(store.get("gone").await.expect("get"), None);
        stop_tx.send(true).expect("stop");
        task.await.expect("task");
    }
}
