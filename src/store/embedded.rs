//! The embedded store, the single-node default: an index of every key in memory, every change
//! appended to a journal under the data directory (see `journal`) before it is acknowledged.
//!
//! Group commit: changes are applied in memory and framed into a shared buffer under one lock
//! (so the journal order is the revision order); one writer thread takes the whole buffer,
//! writes it and fsyncs once, then wakes every caller whose change was in it. Concurrent
//! writers therefore share fsyncs instead of queueing for one each.
//!
//! Watches replay from a bounded in-memory history (the last [`HISTORY`] changes); older
//! revisions, and any history from before a restart, answer `Resync`. With a journal the
//! history of a put is the place of its record, read back when a watch replays it, not a copy
//! of its key and value (~50 B per subscription at 100 000, issue 11 item 10); a compaction
//! or a failed write, which move records, forget the history (a watch from before it answers
//! `Resync`, as after a restart).
//!
//! Memory: with a journal, the map keeps each value's place in the journal, not its bytes
//! (issue 11 item 10: at a million subscriptions a second copy of every record in memory
//! was a large part of the cost). `get` and `list` read values back: from the buffer not yet
//! handed to the writer, from the batch or snapshot being written, else from the file (a
//! `pread`, served by the page cache). A write that fails leaves its values in memory
//! instead (see `relocate`), so nothing acknowledged or still applied is ever unreadable.
//! Nor does it keep the keys: see `index` (found by hash, confirmed by reading the key back;
//! `list` reads every key back in file order, a window at a time).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};

use prometheus::IntCounterVec;

use tokio::sync::{mpsc, oneshot};

use super::index::{Index, MemEntry, Place, Spot, Stored};
use super::journal::{self, JournalFile, Record};
use super::{
    check_key, check_value, Cas, Entry, Listing, Revision, Store, StoreError, StoreFuture, Watch,
    WatchEvent,
};

static WRITES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_store_writes_total",
        "Changes written to the embedded store's journal, by outcome (ok, failed)",
        &["outcome"],
    )
});

static COMMITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_store_commits_total",
        "Journal writes of the embedded store, by kind: append (one fsync for a group of changes) or compaction",
        &["kind"],
    )
});

/// Changes kept for watches that start in the past.
pub const HISTORY: usize = 16_384;
/// Events a watcher may have queued before it is dropped with `Resync`.
const WATCH_QUEUE: usize = 8_192;
/// Journal size below which no compaction is done.
const COMPACT_MIN: u64 = 8 << 20;

struct Watcher {
    prefix: String,
    from: Revision,
    tx: mpsc::Sender<WatchEvent>,
    overflowed: Arc<AtomicBool>,
}

type Ack = oneshot::Sender<Result<(), (std::io::ErrorKind, String)>>;

/// One change of the watch history (24 bytes).
enum Past {
    /// A put whose record is in the journal: its value's `len` bytes at `at`, after its key's
    /// `klen` bytes and its revisions (as in [`Place::Journal`]); read back on replay.
    Put {
        rev: Revision,
        at: u64,
        len: u32,
        klen: u16,
    },
    /// Anything else (a delete; a put of a memory-only store): the event itself.
    Event(Revision, Box<WatchEvent>),
}

impl Past {
    fn revision(&self) -> Revision {
        match self {
            Past::Put { rev, .. } | Past::Event(rev, _) => *rev,
        }
    }
}

#[derive(Default)]
struct State {
    map: Index,
    src: Source,
    revision: Revision,
    history: VecDeque<Past>,
    /// The lowest revision from which `history` is complete.
    history_from: Revision,
    watchers: Vec<Watcher>,
    waiters: Vec<Ack>,
    /// Framed size of the live keys: what a compacted journal would hold.
    live_bytes: u64,
    closed: bool,
}

/// Where journal bytes are read back from (unused in memory-only mode).
#[derive(Default)]
struct Source {
    /// Framed records not yet handed to the writer.
    pending: Vec<u8>,
    /// File offset where `pending`'s first byte will land.
    pending_at: u64,
    /// What the writer is writing now (a batch appended at this offset, or a compaction
    /// snapshot): bytes in it are read from here until it is in the file.
    inflight: Option<(u64, Arc<Vec<u8>>)>,
    /// The journal opened for reading values back.
    reader: Option<File>,
    /// The journal's path, for errors.
    path: Option<PathBuf>,
}

/// Bytes read from the file at once when visiting every entry (`Source::visit`).
const VISIT_WINDOW: usize = 1 << 20;

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// None: memory only.
    path: Option<PathBuf>,
}

/// The embedded store. Dropping it flushes the journal and stops its writer thread.
pub struct Embedded {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("path", &self.shared.path)
            .finish()
    }
}

fn framed_put_len(key: &str, value_len: usize) -> u64 {
    (journal::put_value_offset(key) + value_len) as u64
}

impl Source {
    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone().unwrap_or_default(),
            source,
        }
    }

    /// The `len` journal bytes at `at` if they are in memory (not yet in the file).
    fn in_memory(&self, at: u64, len: usize) -> Option<&[u8]> {
        let (from, buf): (u64, &[u8]) = if at >= self.pending_at {
            (self.pending_at, &self.pending)
        } else {
            let (from, buf) = self.inflight.as_ref().filter(|(f, _)| at >= *f)?;
            (*from, buf)
        };
        let i = usize::try_from(at.checked_sub(from)?).ok()?;
        buf.get(i..i.checked_add(len)?)
    }

    /// The `len` journal bytes at `at` (see the module doc for where they are read from).
    fn read(&self, at: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        if let Some(b) = self.in_memory(at, len) {
            return Ok(b.to_vec());
        }
        let f = self
            .reader
            .as_ref()
            .ok_or_else(|| self.io(std::io::Error::other("journal not open for reading")))?;
        let mut out = vec![0; len];
        f.read_exact_at(&mut out, at).map_err(|e| self.io(e))?;
        Ok(out)
    }

    /// The value of `s`.
    fn value(&self, s: &Stored) -> Result<Vec<u8>, StoreError> {
        match s {
            Place::Mem(m) => Ok(m.value.to_vec()),
            Place::Journal { at, len, .. } => self.read(*at, *len as usize),
        }
    }

    /// Whether `s` is the entry of `key` (its key read back when only in the journal).
    fn is(&self, s: &Stored, key: &str) -> Result<bool, StoreError> {
        match s {
            Place::Mem(m) => Ok(*m.key == *key),
            Place::Journal { at, klen, .. } => {
                let klen = usize::from(*klen);
                if klen != key.len() {
                    return Ok(false);
                }
                Ok(self.read(at - klen as u64, klen)? == key.as_bytes())
            }
        }
    }

    /// The (create, modified) revisions of `s`.
    fn revisions(&self, s: &Stored) -> Result<(Revision, Revision), StoreError> {
        match s {
            Place::Mem(m) => Ok((m.create, m.modified)),
            Place::Journal { at, klen, .. } => {
                let back = journal::put_revisions_back(usize::from(*klen)) as u64;
                let b = self.read(at - back, 16)?;
                journal::put_revisions(&b).ok_or_else(|| self.corrupt(at - back))
            }
        }
    }

    fn corrupt(&self, offset: u64) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone().unwrap_or_default(),
            offset,
            reason: "put record unreadable",
        }
    }

    /// Calls `f(n, key, value, create, modified)` for every entry of `index`, `n` its
    /// position in `index.values()`. Journal bytes are read in file order, a window at a
    /// time, not with a read per key.
    fn visit(
        &self,
        index: &Index,
        mut f: impl FnMut(usize, &str, &[u8], Revision, Revision),
    ) -> Result<(), StoreError> {
        let mut spans = Vec::new();
        for (n, s) in index.values().enumerate() {
            match s {
                Place::Mem(m) => f(n, &m.key, &m.value, m.create, m.modified),
                Place::Journal { at, len, klen } => {
                    let klen = usize::from(*klen);
                    let start = at - journal::put_revisions_back(klen) as u64;
                    spans.push((start, klen, *len as usize, n));
                }
            }
        }
        spans.sort_unstable_by_key(|sp| sp.0);
        let mut window: Vec<u8> = Vec::new();
        let mut window_at = 0u64;
        for (start, klen, len, n) in spans {
            let head = journal::put_revisions_back(klen);
            let total = head + len;
            let bytes = match self.in_memory(start, total) {
                Some(b) => b,
                None => {
                    let inside =
                        start >= window_at && (start - window_at) as usize + total <= window.len();
                    if !inside {
                        window = self.read_window(start, total.max(VISIT_WINDOW))?;
                        window_at = start;
                    }
                    let i = (start - window_at) as usize;
                    window
                        .get(i..i + total)
                        .ok_or_else(|| self.io(std::io::ErrorKind::UnexpectedEof.into()))?
                }
            };
            let (create, modified) =
                journal::put_revisions(bytes).ok_or_else(|| self.corrupt(start))?;
            let key = bytes
                .get(head - klen..head)
                .and_then(|k| std::str::from_utf8(k).ok())
                .ok_or_else(|| self.corrupt(start))?;
            f(n, key, &bytes[head..], create, modified);
        }
        Ok(())
    }

    /// Up to `len` bytes of the file from `at` (fewer at its end).
    fn read_window(&self, at: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        let f = self
            .reader
            .as_ref()
            .ok_or_else(|| self.io(std::io::Error::other("journal not open for reading")))?;
        let mut out = vec![0; len];
        let mut got = 0;
        while got < len {
            match f.read_at(&mut out[got..], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        out.truncate(got);
        Ok(out)
    }
}

impl State {
    /// Where `key` is or would go, and its entry.
    fn find(&self, key: &str) -> Result<(Spot, Option<&Stored>), StoreError> {
        self.map.find(key, |s| self.src.is(s, key))
    }

    /// The bytes in `buf`, meant for the file at offset `from`, did not land there (a failed
    /// write: the file still ends at `file_len`). Entries in them are kept in memory instead,
    /// and entries queued after them move to where they will now land.
    fn relocate(&mut self, from: u64, buf: &[u8], file_len: u64) {
        // The history's places in `buf` and after it no longer hold.
        self.forget_history();
        let end = from + buf.len() as u64;
        for s in self.map.values_mut() {
            if let Place::Journal { at, len, klen } = *s {
                if at >= from && at < end {
                    // The whole record is in `buf`: revisions, key, value.
                    let i = (at - from) as usize;
                    let klen = usize::from(klen);
                    let key = i
                        .checked_sub(klen)
                        .and_then(|k| buf.get(k..i))
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .unwrap_or_default();
                    let (create, modified) = i
                        .checked_sub(journal::put_revisions_back(klen))
                        .and_then(|r| buf.get(r..r + 16))
                        .and_then(journal::put_revisions)
                        .unwrap_or_default();
                    let value = buf.get(i..i + len as usize).unwrap_or_default();
                    *s = Place::Mem(Box::new(MemEntry {
                        key: key.into(),
                        value: value.into(),
                        create,
                        modified,
                    }));
                } else if at >= end {
                    *s = Place::Journal {
                        at: at - end + file_len,
                        len,
                        klen,
                    };
                }
            }
        }
        if self.src.pending_at >= end {
            self.src.pending_at = self.src.pending_at - end + file_len;
        }
    }

    /// The entry of `s` under `key`, its value read back.
    fn entry(&self, key: &str, s: &Stored) -> Result<Entry, StoreError> {
        let (create, modified) = self.src.revisions(s)?;
        Ok(Entry {
            key: key.to_string(),
            value: self.src.value(s)?,
            create_revision: create,
            mod_revision: modified,
        })
    }
}

impl Embedded {
    /// A store that keeps nothing across a restart (tests, and nodes without a data dir).
    pub fn memory() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    history_from: 1,
                    ..State::default()
                }),
                wake: Condvar::new(),
                path: None,
            }),
            writer: None,
        }
    }

    /// Opens (or creates) the store in `dir`, loading its journal. Blocking: call at start-up.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let (file, records) = JournalFile::open(dir)?;
        // The last put of each key, by key (the journal's keys, held only while loading).
        let mut live: std::collections::HashMap<String, Stored> = Default::default();
        let mut revision = 0;
        for r in records {
            match r {
                Record::Put {
                    key,
                    value,
                    create,
                    modified,
                    at,
                } => {
                    revision = revision.max(modified);
                    let place = match (u32::try_from(value.len()), u16::try_from(key.len())) {
                        (Ok(len), Ok(klen)) => Place::Journal { at, len, klen },
                        _ => Place::Mem(Box::new(MemEntry {
                            key: key.as_str().into(),
                            value: value.into(),
                            create,
                            modified,
                        })),
                    };
                    live.insert(key, place);
                }
                Record::Delete { key, revision: r } => {
                    revision = revision.max(r);
                    live.remove(key.as_str());
                }
                Record::Revision(r) => revision = revision.max(r),
            }
        }
        let mut st = State {
            revision,
            history_from: revision + 1,
            ..State::default()
        };
        for (k, s) in live {
            st.live_bytes += framed_put_len(&k, s.value_len());
            st.map.insert_new(&k, s);
        }
        st.src.pending_at = file.len;
        st.src.reader = Some(file.open_reader()?);
        st.src.path = Some(file.path().to_path_buf());
        let path = file.path().to_path_buf();
        let shared = Arc::new(Shared {
            state: Mutex::new(st),
            wake: Condvar::new(),
            path: Some(path),
        });
        let w = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("legate-store".into())
            .spawn(move || writer_loop(&w, file))
            .map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            shared,
            writer: Some(writer),
        })
    }

    /// Number of keys (for status and tests).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Keys and current revision, for the admin `/status`.
    pub fn stats(&self) -> (usize, Revision) {
        let st = self.lock();
        (st.map.len(), st.revision)
    }

    /// The journal file (None: memory only).
    pub fn path(&self) -> Option<&Path> {
        self.shared.path.as_deref()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every change is applied
        // before anything can fail), so a poisoned lock is still usable.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the framed record for the writer; None in memory-only mode.
    fn enqueue(
        &self,
        st: &mut State,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Option<oneshot::Receiver<Result<(), (std::io::ErrorKind, String)>>> {
        self.shared.path.as_ref()?;
        encode(&mut st.src.pending);
        let (tx, rx) = oneshot::channel();
        st.waiters.push(tx);
        self.shared.wake.notify_one();
        Some(rx)
    }

    async fn durable(
        &self,
        ack: Option<oneshot::Receiver<Result<(), (std::io::ErrorKind, String)>>>,
    ) -> Result<(), StoreError> {
        let Some(ack) = ack else { return Ok(()) };
        match ack.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err((kind, msg))) => Err(StoreError::Io {
                path: self.shared.path.clone().unwrap_or_default(),
                source: std::io::Error::new(kind, msg),
            }),
            Err(_) => Err(StoreError::Closed),
        }
    }

    fn do_put(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<Option<Revision>>,
    ) -> Result<(Cas, Option<oneshot::Receiver<AckResult>>), StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.closed {
            return Err(StoreError::Closed);
        }
        let (spot, found) = st.find(key)?;
        let current = found.map(|s| st.src.revisions(s)).transpose()?;
        if let Some(expected) = expected {
            if current.map(|(_, m)| m) != expected {
                let now = match found {
                    Some(s) => Some(st.entry(key, s)?),
                    None => None,
                };
                return Ok((Cas::Conflict(now), None));
            }
        }
        let rev = st.revision + 1;
        st.revision = rev;
        let create = current.map_or(rev, |(c, _)| c);
        let new_len = framed_put_len(key, value.len());
        // With a journal the map keeps where the value will be, not a copy (module doc).
        let at =
            st.src.pending_at + st.src.pending.len() as u64 + journal::put_value_offset(key) as u64;
        let place = match (
            self.shared.path.is_some(),
            u32::try_from(value.len()),
            u16::try_from(key.len()),
        ) {
            (true, Ok(len), Ok(klen)) => Place::Journal { at, len, klen },
            _ => Place::Mem(Box::new(MemEntry {
                key: key.into(),
                value: value.as_slice().into(),
                create,
                modified: rev,
            })),
        };
        let ack = self.enqueue(st, |out| {
            journal::encode_put(out, key, &value, create, rev);
        });
        let entry = Entry {
            key: key.to_string(),
            value,
            create_revision: create,
            mod_revision: rev,
        };
        st.live_bytes += new_len;
        let past = match place {
            Place::Journal { at, len, klen } => Some(Past::Put { rev, at, len, klen }),
            Place::Mem(_) => None,
        };
        if let Some(old) = st.map.put_at(key, spot, place) {
            st.live_bytes -= framed_put_len(key, old.value_len());
        }
        publish(st, rev, WatchEvent::Put(entry), past);
        Ok((Cas::Swapped(rev), ack))
    }
}

type AckResult = Result<(), (std::io::ErrorKind, String)>;

/// Records the change in the history (as `past` when given: the place of its record) and
/// hands it to matching watchers.
fn publish(st: &mut State, rev: Revision, ev: WatchEvent, past: Option<Past>) {
    let key = match &ev {
        WatchEvent::Put(e) => e.key.as_str(),
        WatchEvent::Delete { key, .. } => key.as_str(),
        WatchEvent::Resync => return,
    };
    st.watchers.retain(|w| {
        if !key.starts_with(&w.prefix) || rev < w.from {
            return true;
        }
        match w.tx.try_send(ev.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                w.overflowed.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    });
    st.history
        .push_back(past.unwrap_or_else(|| Past::Event(rev, Box::new(ev))));
    if st.history.len() > HISTORY {
        if let Some(p) = st.history.pop_front() {
            st.history_from = p.revision() + 1;
        }
    }
}

impl State {
    /// Forgets the watch history: the records its puts point at moved (a compaction, a failed
    /// write). A watch from an earlier revision then answers `Resync` and its reader lists
    /// again, as after a restart.
    fn forget_history(&mut self) {
        self.history = VecDeque::new();
        self.history_from = self.revision + 1;
    }

    /// The event `p` stands for if its key is under `prefix`, a put read back from its
    /// record (its value only when the key is wanted).
    fn replay(&self, p: &Past, prefix: &str) -> Result<Option<WatchEvent>, StoreError> {
        match p {
            Past::Event(_, ev) => {
                let key = match &**ev {
                    WatchEvent::Put(e) => e.key.as_str(),
                    WatchEvent::Delete { key, .. } => key.as_str(),
                    WatchEvent::Resync => return Ok(None),
                };
                Ok(key.starts_with(prefix).then(|| (**ev).clone()))
            }
            Past::Put { at, len, klen, .. } => {
                let place = Place::Journal {
                    at: *at,
                    len: *len,
                    klen: *klen,
                };
                let k = usize::from(*klen);
                let key = String::from_utf8(self.src.read(at - k as u64, k)?)
                    .map_err(|_| self.src.corrupt(*at))?;
                if !key.starts_with(prefix) {
                    return Ok(None);
                }
                let (create, modified) = self.src.revisions(&place)?;
                Ok(Some(WatchEvent::Put(Entry {
                    key,
                    value: self.src.value(&place)?,
                    create_revision: create,
                    mod_revision: modified,
                })))
            }
        }
    }
}

/// The compaction snapshot (records without the magic) of every live key, with the map
/// pointing into it; None (and nothing changed) if a value could not be read back.
fn snapshot(st: &mut State) -> Option<Arc<Vec<u8>>> {
    let mut snap = Vec::with_capacity(st.live_bytes as usize + 32);
    journal::encode_revision(&mut snap, st.revision);
    let mut places: Vec<Option<Place>> =
        std::iter::repeat_with(|| None).take(st.map.len()).collect();
    let visited = st.src.visit(&st.map, |n, key, value, create, modified| {
        let at = journal::HEADER + (snap.len() + journal::put_value_offset(key)) as u64;
        journal::encode_put(&mut snap, key, value, create, modified);
        if let (Ok(len), Ok(klen), Some(p)) = (
            u32::try_from(value.len()),
            u16::try_from(key.len()),
            places.get_mut(n),
        ) {
            *p = Some(Place::Journal { at, len, klen });
        }
    });
    if let Err(e) = visited {
        tracing::error!(error = %e, "state journal not compacted: a value could not be read back");
        return None;
    }
    for (s, p) in st.map.values_mut().zip(places) {
        if let Some(p) = p {
            *s = p;
        }
    }
    // The history's places point into the journal being replaced.
    st.forget_history();
    // Everything pending is already in the map: the snapshot subsumes it.
    st.src.pending.clear();
    let snap = Arc::new(snap);
    st.src.pending_at = journal::HEADER + snap.len() as u64;
    st.src.inflight = Some((journal::HEADER, Arc::clone(&snap)));
    Some(snap)
}

fn writer_loop(shared: &Shared, mut file: JournalFile) {
    loop {
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.src.pending.is_empty() && !st.closed {
            st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.src.pending.is_empty() && st.closed {
            return;
        }
        let waiters = std::mem::take(&mut st.waiters);
        let compact =
            file.len > COMPACT_MIN && file.len + st.src.pending.len() as u64 > 2 * st.live_bytes;
        COMMITS
            .with_label_values(&[if compact { "compaction" } else { "append" }])
            .inc();
        let snap = if compact { snapshot(&mut st) } else { None };
        let result = if let Some(snap) = snap {
            drop(st);
            let before = file.len;
            let r = file.replace(&snap);
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            match &r {
                Ok(()) => {
                    tracing::info!(before, after = file.len, "state journal compacted");
                    match file.open_reader() {
                        Ok(f) => st.src.reader = Some(f),
                        Err(e) => {
                            // The file is the snapshot, but cannot be read: keep its values.
                            tracing::error!(error = %e, "state journal not readable after compaction");
                            let end = journal::HEADER + snap.len() as u64;
                            st.relocate(journal::HEADER, &snap, end);
                        }
                    }
                }
                Err(_) => st.relocate(journal::HEADER, &snap, file.len),
            }
            st.src.inflight = None;
            r
        } else {
            let batch = Arc::new(std::mem::take(&mut st.src.pending));
            let from = st.src.pending_at;
            st.src.pending_at += batch.len() as u64;
            st.src.inflight = Some((from, Arc::clone(&batch)));
            drop(st);
            let r = file.append(&batch);
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_err() {
                st.relocate(from, &batch, file.len);
            }
            st.src.inflight = None;
            r
        };
        let result: AckResult = result.map_err(|e| {
            tracing::error!(error = %e, "state store write failed");
            (std::io::ErrorKind::Other, e.to_string())
        });
        WRITES
            .with_label_values(&[if result.is_ok() { "ok" } else { "failed" }])
            .inc_by(waiters.len() as u64);
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.lock().closed = true;
        self.shared.wake.notify_all();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Store for Embedded {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Entry>> {
        Box::pin(async move {
            let st = self.lock();
            match st.find(key)? {
                (_, Some(s)) => Ok(Some(st.entry(key, s)?)),
                (_, None) => Ok(None),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> StoreFuture<'a, Listing> {
        Box::pin(async move {
            let st = self.lock();
            // The index keeps no keys (see `index`): every key is read back, in file order.
            let mut entries = Vec::new();
            st.src.visit(&st.map, |_, key, value, create, modified| {
                if key.starts_with(prefix) {
                    entries.push(Entry {
                        key: key.to_string(),
                        value: value.to_vec(),
                        create_revision: create,
                        mod_revision: modified,
                    });
                }
            })?;
            entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
            Ok(Listing {
                entries,
                revision: st.revision,
            })
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>) -> StoreFuture<'a, Revision> {
        Box::pin(async move {
            let (cas, ack) = self.do_put(key, value, None)?;
            self.durable(ack).await?;
            match cas {
                Cas::Swapped(rev) => Ok(rev),
                // Unconditional puts never conflict.
                Cas::Conflict(_) => Err(StoreError::Closed),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Revision>> {
        Box::pin(async move {
            check_key(key)?;
            let ack = {
                let mut guard = self.lock();
                let st = &mut *guard;
                if st.closed {
                    return Err(StoreError::Closed);
                }
                let spot = match st.find(key)? {
                    (spot, Some(_)) => spot,
                    (_, None) => return Ok(None),
                };
                if let Some(old) = st.map.remove_at(key, spot) {
                    st.live_bytes -= framed_put_len(key, old.value_len());
                }
                let rev = st.revision + 1;
                st.revision = rev;
                let ack = self.enqueue(st, |out| {
                    journal::encode_delete(out, key, rev);
                });
                publish(
                    st,
                    rev,
                    WatchEvent::Delete {
                        key: key.to_string(),
                        revision: rev,
                    },
                    None,
                );
                (ack, rev)
            };
            self.durable(ack.0).await?;
            Ok(Some(ack.1))
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<Revision>,
        value: Vec<u8>,
    ) -> StoreFuture<'a, Cas> {
        Box::pin(async move {
            let (cas, ack) = self.do_put(key, value, Some(expected))?;
            self.durable(ack).await?;
            Ok(cas)
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Revision) -> StoreFuture<'a, Watch> {
        Box::pin(async move {
            let mut st = self.lock();
            let overflowed = Arc::new(AtomicBool::new(false));
            let from = if from == 0 { st.revision + 1 } else { from };
            let (tx, rx) = mpsc::channel(WATCH_QUEUE);
            let watch = Watch::new(rx, Arc::clone(&overflowed));
            if from < st.history_from {
                // The history asked for is gone: the reader lists again.
                let _ = tx.try_send(WatchEvent::Resync);
                return Ok(watch);
            }
            for p in &st.history {
                if p.revision() < from {
                    continue;
                }
                let ev = match st.replay(p, prefix) {
                    Ok(Some(ev)) => ev,
                    Ok(None) => continue,
                    Err(e) => {
                        // Not readable back: the reader lists instead.
                        tracing::warn!(error = %e, "watch history not readable; the watcher lists again");
                        let _ = tx.try_send(WatchEvent::Resync);
                        return Ok(watch);
                    }
                };
                if tx.try_send(ev).is_err() {
                    // More to replay than a watcher may queue: start from a listing instead.
                    overflowed.store(true, Ordering::Release);
                    return Ok(watch);
                }
            }
            st.watchers.push(Watcher {
                prefix: prefix.to_string(),
                from,
                tx,
                overflowed,
            });
            Ok(watch)
        })
    }
}

/// Creates the embedded store's metric families at start (`crate::metrics::register_all`).
pub fn register_metrics() {
    LazyLock::force(&WRITES);
    LazyLock::force(&COMMITS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_keeps_its_entries_in_memory_and_moves_later_ones_back() {
        let mut st = State::default();
        // A batch meant for offset 100 failed; the file still ends at 100. Key `a` was in it,
        // `b` was queued after it, `c` was in the file (not readable here: no file).
        let mut batch = Vec::new();
        journal::encode_put(&mut batch, "a", &[4, 5, 6], 1, 2);
        let a_at = 100 + journal::put_value_offset("a") as u64;
        let pending_at = 100 + batch.len() as u64;
        journal::encode_put(&mut st.src.pending, "b", &[7, 8], 3, 3);
        let b_at = pending_at + journal::put_value_offset("b") as u64;
        let place = |at, len| Place::Journal { at, len, klen: 1 };
        st.map.insert_new("a", place(a_at, 3));
        st.map.insert_new("b", place(b_at, 2));
        st.map.insert_new("c", place(50, 4));
        st.src.pending_at = pending_at;
        st.relocate(100, &batch, 100);
        assert_eq!(st.src.pending_at, 100);
        let read = |st: &State, k: &str| -> Result<Option<Entry>, StoreError> {
            match st.find(k)? {
                (_, Some(s)) => st.entry(k, s).map(Some),
                (_, None) => Ok(None),
            }
        };
        let got = |k| {
            read(&st, k)
                .ok()
                .flatten()
                .map(|e| (e.value, e.create_revision, e.mod_revision))
        };
        assert_eq!(got("a"), Some((vec![4, 5, 6], 1, 2)));
        assert_eq!(got("b"), Some((vec![7, 8], 3, 3)));
        // Not in memory and no file to read it from: an error, never another key's bytes.
        assert!(matches!(read(&st, "c"), Err(StoreError::Io { .. })));
    }
}
