//! The state store on etcd v3 (issue 12): the [`Store`] trait over etcd's KV, Txn and Watch
//! APIs, for a cluster whose nodes share their state.
//!
//! The trait was shaped after etcd, so the mapping is direct:
//! - keys live under one root (`/legate/<cluster>/state/`), which every call adds and every
//!   answer strips, so two clusters (or a test) can share one etcd;
//! - `Revision` is etcd's `header.revision` (store-wide, monotonic; it also moves for keys
//!   outside our root, so readers must not expect "+1 per change" — none does);
//! - compare-and-swap is one transaction: `mod_revision == expected` (or `create_revision == 0`
//!   for "absent"), then put, else get, so a conflict returns what the key holds now;
//! - `list` pages through the range at one fixed revision (etcd's answers are bounded by the
//!   gRPC message size, so a 100 000-key prefix is read in pages but stays consistent);
//! - a watch resumes by itself from the next revision after a broken connection, and says
//!   [`WatchEvent::Resync`] only when etcd has compacted the history it needs.
//!
//! Every unary call has a deadline ([`CALL_TIMEOUT`]): without quorum etcd does not answer
//! writes at all, and a caller must get a clear error instead of a hang.

use super::{
    check_key, check_value, Cas, Entry, Listing, Revision, Store, StoreError, StoreFuture, Watch,
    WatchEvent,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteResponse, EventType, GetOptions, GetResponse,
    KeyValue, PutOptions, PutResponse, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest wait for one etcd call; past it the call fails with `Unavailable`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection attempt to the endpoints may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Keys per page when listing a prefix.
const PAGE: i64 = 1000;
/// Events a watch buffers for a slow reader before it is dropped and told to resync.
const WATCH_QUEUE: usize = 4096;

/// Opens a client on `endpoints` (`http://host:port`), with HTTP/2 keep-alives so a dead
/// member is noticed within seconds and the balanced channel moves to another one.
pub async fn connect(endpoints: &[String]) -> Result<Client, StoreError> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    deadline(Client::connect(endpoints, Some(opts)))
        .await
        .map_err(|e| match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(format!(
                "cannot connect to etcd at {}: {m}",
                endpoints.join(", ")
            )),
            other => other,
        })
}

/// Runs an etcd call under [`CALL_TIMEOUT`] and maps its error.
pub async fn deadline<T>(
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(&e)),
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd did not answer within {} s (no quorum, or no endpoint reachable)",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// Longest wait for one attempt of a [`retrying`] call.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);

/// Runs an etcd call, trying again (within [`CALL_TIMEOUT`] in all) when an attempt fails
/// at the transport or takes longer than [`ATTEMPT_TIMEOUT`]. The client balances over every
/// endpoint, but a request can still be routed to a member that just died (connection
/// refused, or a connection not yet known to be dead): the next attempt goes to a live one,
/// so one member down changes nothing for the caller. Only for calls that may be repeated:
/// puts and deletes are idempotent; a compare-and-swap repeated after an attempt that did
/// commit but whose answer was lost reports a conflict showing our own value.
pub async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let until = tokio::time::Instant::now() + CALL_TIMEOUT;
    let mut last = String::from("no answer");
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(StoreError::Unavailable(format!(
                "etcd did not answer within {} s (no quorum, or no endpoint reachable; last: {last})",
                CALL_TIMEOUT.as_secs()
            )));
        }
        match tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if transient(&e) => last = e.to_string(),
            Ok(Err(e)) => return Err(unavailable(&e)),
            Err(_) => last = "attempt timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(50).min(left)).await;
    }
}

/// A KV read through [`retrying`] (every etcd user of the node reads this way).
pub async fn kv_get(
    client: &Client,
    key: impl Into<Vec<u8>>,
    opts: Option<GetOptions>,
) -> Result<GetResponse, StoreError> {
    let key = key.into();
    retrying(|| {
        let mut kv = client.kv_client();
        let (key, opts) = (key.clone(), opts.clone());
        async move { kv.get(key, opts).await }
    })
    .await
}

/// A KV write through [`retrying`] (a put is idempotent).
pub async fn kv_put(
    client: &Client,
    key: impl Into<Vec<u8>>,
    value: impl Into<Vec<u8>>,
    opts: Option<PutOptions>,
) -> Result<PutResponse, StoreError> {
    let (key, value) = (key.into(), value.into());
    retrying(|| {
        let mut kv = client.kv_client();
        let (key, value, opts) = (key.clone(), value.clone(), opts.clone());
        async move { kv.put(key, value, opts).await }
    })
    .await
}

/// A KV delete of one key through [`retrying`].
pub async fn kv_delete(
    client: &Client,
    key: impl Into<Vec<u8>>,
) -> Result<DeleteResponse, StoreError> {
    let key = key.into();
    retrying(|| {
        let mut kv = client.kv_client();
        let key = key.clone();
        async move { kv.delete(key, None).await }
    })
    .await
}

/// A transaction through [`retrying`] (see its note on repeated compare-and-swaps).
pub async fn kv_txn(client: &Client, txn: Txn) -> Result<TxnResponse, StoreError> {
    retrying(|| {
        let mut kv = client.kv_client();
        let txn = txn.clone();
        async move { kv.txn(txn).await }
    })
    .await
}

/// Errors of the path to a member rather than of the request.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        // "election: no leader" is an answer (nobody is elected), not a broken path.
        etcd_client::Error::GRpcStatus(s) if s.message().contains("election: no leader") => false,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
        ),
        _ => false,
    }
}

fn unavailable(e: &etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

/// The end of the range of keys starting with `prefix` (etcd's `range_end` for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes (or empty): every key after the prefix, etcd's "\0".
    vec![0]
}

fn rev(r: i64) -> Revision {
    u64::try_from(r).unwrap_or(0)
}

/// The state store of a cluster, on etcd.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    root: String,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("root", &self.root).finish()
    }
}

impl Etcd {
    /// The store of `cluster` on an open client; its keys live under `/legate/<cluster>/state/`.
    pub fn new(client: Client, cluster: &str) -> Self {
        Self {
            client,
            root: format!("/legate/{cluster}/state/"),
        }
    }

    /// The root every key of this store lives under.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.root)
    }

    fn entry(&self, kv: &KeyValue) -> Option<Entry> {
        let key = kv.key_str().ok()?.strip_prefix(&self.root)?.to_owned();
        Some(Entry {
            key,
            value: kv.value().to_vec(),
            create_revision: rev(kv.create_revision()),
            mod_revision: rev(kv.mod_revision()),
        })
    }

    async fn do_get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        check_key(key)?;
        let full = self.full(key);
        let resp = kv_get(&self.client, full, None).await?;
        Ok(resp.kvs().first().and_then(|kv| self.entry(kv)))
    }

    async fn do_list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let start = self.full(prefix);
        let end = prefix_end(start.as_bytes());
        let mut from: Vec<u8> = start.into_bytes();
        let mut at: i64 = 0;
        let mut entries = Vec::new();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if at > 0 {
                opts = opts.with_revision(at);
            }
            let resp = kv_get(&self.client, from.clone(), Some(opts)).await?;
            if at == 0 {
                at = resp.header().map_or(0, |h| h.revision());
            }
            entries.extend(resp.kvs().iter().filter_map(|kv| self.entry(kv)));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(Listing {
            entries,
            revision: rev(at),
        })
    }

    async fn do_put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let full = self.full(key);
        let resp = kv_put(&self.client, full, value, None).await?;
        Ok(resp.header().map_or(0, |h| rev(h.revision())))
    }

    async fn do_delete(&self, key: &str) -> Result<Option<Revision>, StoreError> {
        check_key(key)?;
        let full = self.full(key);
        let resp = kv_delete(&self.client, full).await?;
        Ok((resp.deleted() > 0).then(|| resp.header().map_or(0, |h| rev(h.revision()))))
    }

    async fn do_cas(
        &self,
        key: &str,
        expected: Option<Revision>,
        value: Vec<u8>,
    ) -> Result<Cas, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let full = self.full(key);
        let cmp = match expected {
            None => Compare::create_revision(full.clone(), CompareOp::Equal, 0),
            Some(r) => Compare::mod_revision(
                full.clone(),
                CompareOp::Equal,
                i64::try_from(r).unwrap_or(i64::MAX),
            ),
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(full.clone(), value, None)])
            .or_else([TxnOp::get(full, None)]);
        let resp = kv_txn(&self.client, txn).await?;
        if resp.succeeded() {
            return Ok(Cas::Swapped(resp.header().map_or(0, |h| rev(h.revision()))));
        }
        let now = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| self.entry(kv)),
            _ => None,
        });
        Ok(Cas::Conflict(now))
    }

    async fn do_watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let full = self.full(prefix);
        let start = i64::try_from(from).unwrap_or(i64::MAX);
        let mut stream = open_watch(&self.client, &full, start).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = overflowed.clone();
        let (client, root) = (self.client.clone(), self.root.clone());
        tokio::spawn(async move {
            // The next revision this reader needs: where a new stream resumes.
            let mut next = start;
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = tx.closed() => return,
                };
                match msg {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 {
                            // The history from `next` is gone: the reader must list again.
                            let _ = tx.send(WatchEvent::Resync).await;
                            return;
                        }
                        if resp.created() && next == 0 {
                            next = resp.header().map_or(0, |h| h.revision()) + 1;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            next = next.max(kv.mod_revision() + 1);
                            let Some(key) = kv
                                .key_str()
                                .ok()
                                .and_then(|k| k.strip_prefix(root.as_str()))
                            else {
                                continue;
                            };
                            let event = match ev.event_type() {
                                EventType::Put => WatchEvent::Put(Entry {
                                    key: key.to_owned(),
                                    value: kv.value().to_vec(),
                                    create_revision: rev(kv.create_revision()),
                                    mod_revision: rev(kv.mod_revision()),
                                }),
                                EventType::Delete => WatchEvent::Delete {
                                    key: key.to_owned(),
                                    revision: rev(kv.mod_revision()),
                                },
                            };
                            if tx.try_send(event).is_err() {
                                // Full (the reader fell behind) or closed: either way this
                                // watch ends; a live reader sees one Resync.
                                flag.store(true, Ordering::Release);
                                return;
                            }
                        }
                        if resp.canceled() {
                            // Cancelled by the server for another reason than compaction
                            // (e.g. a member restarting): resume below.
                            stream = match reopen(&client, &full, &mut next, &tx).await {
                                Some(s) => s,
                                None => return,
                            };
                        }
                    }
                    Ok(None) | Err(_) => {
                        stream = match reopen(&client, &full, &mut next, &tx).await {
                            Some(s) => s,
                            None => return,
                        };
                    }
                }
            }
        });
        Ok(Watch::new(rx, overflowed))
    }
}

/// A key (without its watch prefix) and its new value, or None for a deletion.
pub(crate) type Change = (String, Option<Vec<u8>>);

/// What one message of a prefix watch changed, in order. `Err` when the watch ended, failed or was cancelled (a compacted
/// start revision): the caller lists the prefix again. `what` names the watch in the error.
pub(crate) fn watch_changes(
    msg: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>,
    prefix: &str,
    what: &str,
) -> Result<Vec<Change>, StoreError> {
    let resp = match msg {
        Ok(Some(r)) => r,
        Ok(None) => return Err(StoreError::Unavailable(format!("{what} watch ended"))),
        Err(e) => return Err(StoreError::Unavailable(format!("{what} watch: {e}"))),
    };
    if resp.canceled() {
        return Err(StoreError::Unavailable(format!("{what} watch cancelled")));
    }
    Ok(resp
        .events()
        .iter()
        .filter_map(|ev| {
            let kv = ev.kv()?;
            let k = kv.key_str().ok()?.strip_prefix(prefix)?.to_string();
            Some(match ev.event_type() {
                etcd_client::EventType::Put => (k, Some(kv.value().to_vec())),
                etcd_client::EventType::Delete => (k, None),
            })
        })
        .collect())
}

/// Opens a prefix watch on `full` from revision `start` (0: from now), through [`retrying`].
pub(crate) async fn open_watch(
    client: &Client,
    full: &str,
    start: i64,
) -> Result<etcd_client::WatchStream, StoreError> {
    let mut opts = WatchOptions::new().with_prefix();
    if start > 0 {
        opts = opts.with_start_revision(start);
    }
    retrying(|| {
        let mut w = client.watch_client();
        let opts = opts.clone();
        async move { w.watch(full.to_owned(), Some(opts)).await }
    })
    .await
}

/// Opens the watch again from `next` after a broken stream, retrying with a growing pause
/// while etcd is unreachable; None when the reader is gone.
async fn reopen(
    client: &Client,
    full: &str,
    next: &mut i64,
    tx: &tokio::sync::mpsc::Sender<WatchEvent>,
) -> Option<etcd_client::WatchStream> {
    let mut pause = Duration::from_millis(100);
    loop {
        if tx.is_closed() {
            return None;
        }
        match open_watch(client, full, *next).await {
            Ok(s) => {
                tracing::debug!(prefix = full, from = *next, "etcd watch resumed");
                return Some(s);
            }
            Err(e) => {
                tracing::debug!(prefix = full, error = %e, "etcd watch: reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = tx.closed() => return None,
                }
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl Store for Etcd {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Entry>> {
        Box::pin(self.do_get(key))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Listing> {
        Box::pin(self.do_list(prefix))
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, Revision> {
        Box::pin(self.do_put(key, value))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Revision>> {
        Box::pin(self.do_delete(key))
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<Revision>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, Cas> {
        Box::pin(self.do_cas(key, expected, value))
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> StoreFuture<'a, Watch> {
        Box::pin(self.do_watch(prefix, from))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_grow() {
        assert_eq!(prefix_end(b"/legate/a/"), b"/legate/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
