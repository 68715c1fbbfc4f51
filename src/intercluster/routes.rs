//! What routing asks of the peering (issue 13 §3), as the router's [`Mesh`]: which peer
//! cluster a user lives in (the [`Index`]), the return paths ("answers come back the same
//! way"), and which unplaced users the peers answered "nobody" for lately.
//!
//! **Return paths are shared by the cluster's nodes.** The node that answers a peer's
//! `Forward` is often not the one holding the user's home-node link, and the user's answers
//! come out of that link. So a path is known three ways, each closing a gap the others leave:
//! - the node that routed the forwarded envelope remembers it at once;
//! - the envelope carries it ([`Envelope::via_cluster`](crate::gateway::envelope::Envelope))
//!   across the cluster's peer link, and the holder remembers it before the home node sees
//!   the envelope (an immediate answer, such as presence to a probe, finds it);
//! - it is written to the shared store (`intercluster/returns/<user>/<foreign>` = `<peer>
//!   <unix seconds>`), which every node follows: a node that takes a link over, a node of an
//!   ejabberd cluster whose home node answers on another connection, and a restarted node find
//!   it there.
//!
//! A path lives while it is used: a node that uses one whose stored time is more than
//! [`RETURN_REFRESH`] old writes it again, and each node forgets (and deletes) those nobody
//! used for [`RETURN_IDLE`]. A path only ever leads to a peer listed at start.

use super::index::Index;
use super::keys;
use crate::gateway::router::Mesh;
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Most return paths kept (a conversation is one entry).
pub const MAX_RETURN_PATHS: usize = 100_000;
/// A return path not used for this long is forgotten.
pub const RETURN_IDLE: Duration = Duration::from_secs(3600);
/// A used return path whose stored copy is older than this is written again (one write per
/// conversation per quarter hour at most, so the store never sees traffic, only
/// conversations).
pub const RETURN_REFRESH: Duration = Duration::from_secs(RETURN_IDLE.as_secs() / 4);
/// Most "nobody has this user" answers kept.
pub const MAX_ABSENT: usize = 10_000;
/// How long such an answer holds before the peers are asked again.
pub const ABSENT_FOR: Duration = Duration::from_secs(60);

/// A change of the stored return paths: key, and the value to put (`None`: delete).
pub type Write = (String, Option<Vec<u8>>);

/// One way back.
#[derive(Debug)]
struct Path {
    cluster: Arc<str>,
    /// Last used here, or the stored time when learned from the store.
    used: Instant,
    /// The time (unix seconds) of the copy in the store as far as this node knows; 0: none.
    stored: u64,
}

/// The peering's routing state on one node.
pub struct Routing {
    index: Arc<Index>,
    /// Whether peers were listed at start (asking makes no sense otherwise; the asker checks
    /// the current list, so a reload that removes them all stops the asking too).
    peers: AtomicBool,
    /// The peers listed at start (≤ 29): a way back to any other cluster is not taken (a peer
    /// removed since, with paths still in the store).
    listed: Vec<Arc<str>>,
    /// `local/foreign` (bare JIDs) → the way back.
    returns: DashMap<Box<str>, Path>,
    /// Unplaced users the peers answered "nobody" for, and when.
    absent: DashMap<Box<str>, Instant>,
    /// Return paths not remembered because the map was full of live ones.
    pub(crate) dropped: AtomicU64,
    /// Return-path writes not handed to the store (its writer was behind by a full queue).
    pub(crate) unwritten: AtomicU64,
    /// Envelopes forwarded per listed peer, for the status (see [`Forwarded`]).
    forwarded: DashMap<Arc<str>, Forwarded>,
    /// When a full map was last swept of stale entries (ms since `born`): at most once a
    /// second, so a flood of new pairs into a map full of live ones costs no scan each.
    swept: AtomicU64,
    born: Instant,
    /// Unix seconds at `born` (stored times are wall-clock: they cross nodes and restarts).
    born_unix: u64,
    /// Where path changes go to be written to the shared store (`run` sets it).
    writes: OnceLock<mpsc::Sender<Write>>,
}

/// Least time between two sweeps of a full map.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Envelopes exchanged with one peer cluster since start: [out, in] × [delivered, not].
#[derive(Debug, Default)]
pub struct Forwarded([[AtomicU64; 2]; 2]);

/// Which way an envelope went over the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    Out = 0,
    In = 1,
}

fn pair(local: &str, foreign: &str) -> Box<str> {
    // `/` cannot be in a bare JID (RFC 7622: not in a localpart, nor in a domain), so the
    // pair is unambiguous and is the tail of its store key as is.
    format!("{local}/{foreign}").into_boxed_str()
}

/// The store key of a return path.
pub fn return_key(pair: &str) -> String {
    format!("{}{pair}", keys::RETURNS)
}

/// `(cluster, unix seconds)` of a stored return path.
fn parse_value(v: &[u8]) -> Option<(&str, u64)> {
    let (cluster, at) = std::str::from_utf8(v).ok()?.split_once(' ')?;
    Some((cluster, at.parse().ok()?)).filter(|(c, _)| super::valid_name(c))
}

impl Routing {
    /// `listed`: the peers of `[[intercluster.peer]]` at start.
    pub fn new(index: Arc<Index>, listed: &[Arc<str>]) -> Self {
        let born_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Routing {
            index,
            peers: AtomicBool::new(!listed.is_empty()),
            listed: listed.to_vec(),
            returns: DashMap::new(),
            absent: DashMap::new(),
            dropped: Default::default(),
            unwritten: Default::default(),
            forwarded: DashMap::new(),
            swept: AtomicU64::new(0),
            born: Instant::now(),
            born_unix,
            writes: OnceLock::new(),
        }
    }

    /// Sends path changes to `tx` from now on (to be written to the shared store).
    pub fn write_to(&self, tx: mpsc::Sender<Write>) {
        let _ = self.writes.set(tx);
    }

    fn unix(&self, now: Instant) -> u64 {
        self.born_unix + now.saturating_duration_since(self.born).as_secs()
    }

    /// The instant of a stored time, no later than `now` (a node whose clock runs ahead
    /// cannot make a path outlive its idle time here).
    fn instant_of(&self, unix: u64, now: Instant) -> Instant {
        let t = if unix >= self.born_unix {
            self.born + Duration::from_secs(unix - self.born_unix)
        } else {
            self.born
                .checked_sub(Duration::from_secs(self.born_unix - unix))
                .unwrap_or(self.born)
        };
        t.min(now)
    }

    fn listed(&self, cluster: &str) -> Option<&Arc<str>> {
        self.listed.iter().find(|c| &***c == cluster)
    }

    fn write(&self, pair: &str, value: Option<Vec<u8>>) {
        let Some(tx) = self.writes.get() else {
            return;
        };
        let key = return_key(pair);
        if crate::store::check_key(&key).is_err() {
            // Two JIDs longer than a store key: this path stays in this node's memory.
            return;
        }
        if tx.try_send((key, value)).is_err() {
            self.unwritten.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn put(&self, pair: &str, cluster: &str, at: u64) {
        self.write(pair, Some(format!("{cluster} {at}").into_bytes()));
    }

    /// Whether a full map may be swept now (and notes that it is).
    fn may_sweep(&self, now: Instant) -> bool {
        let at = u64::try_from(now.saturating_duration_since(self.born).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.swept.load(Ordering::Relaxed);
        let due = last == 0 || at.saturating_sub(last) >= SWEEP_EVERY.as_millis() as u64;
        due && self
            .swept
            .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Counts an envelope forwarded to or from `peer` (a listed peer: the link refuses others).
    pub fn count(&self, peer: &Arc<str>, way: Way, delivered: bool) {
        let i = usize::from(!delivered);
        if let Some(c) = self.forwarded.get(peer) {
            c.0[way as usize][i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let c = self.forwarded.entry(peer.clone()).or_default();
        c.0[way as usize][i].fetch_add(1, Ordering::Relaxed);
    }

    /// What was forwarded with `peer`, for the status.
    pub fn forwarded_json(&self, peer: &str) -> serde_json::Value {
        let get = |w: usize, i: usize| {
            self.forwarded
                .get(peer)
                .map_or(0, |c| c.0[w][i].load(Ordering::Relaxed))
        };
        serde_json::json!({
            "out_delivered": get(0, 0),
            "out_not_delivered": get(0, 1),
            "in_delivered": get(1, 0),
            "in_not_delivered": get(1, 1),
        })
    }

    /// The peers answered "nobody" for `user` (or could not be asked): not asked again for
    /// [`ABSENT_FOR`].
    pub fn mark_absent(&self, user: &str) {
        let now = Instant::now();
        if self.absent.len() >= MAX_ABSENT && self.may_sweep(now) {
            self.absent
                .retain(|_, t| now.duration_since(*t) < ABSENT_FOR);
        }
        if self.absent.len() < MAX_ABSENT {
            self.absent.insert(user.into(), now);
        }
    }

    /// Return paths kept now (for the status).
    pub fn return_paths(&self) -> usize {
        self.returns.len()
    }

    /// Room for one more path (sweeping a full map at most once a second).
    fn has_room(&self, now: Instant) -> bool {
        if self.returns.len() >= MAX_RETURN_PATHS && self.may_sweep(now) {
            self.returns
                .retain(|_, p| now.duration_since(p.used) < RETURN_IDLE);
        }
        self.returns.len() < MAX_RETURN_PATHS
    }

    fn remember_at(&self, local: &str, foreign: &str, cluster: &str, now: Instant) {
        let Some(cluster) = self.listed(cluster) else {
            return;
        };
        let key = pair(local, foreign);
        let at = self.unix(now);
        if let Some(mut p) = self.returns.get_mut(&key) {
            p.used = now;
            let moved = p.cluster != *cluster;
            if moved || p.stored + RETURN_REFRESH.as_secs() <= at {
                p.cluster = cluster.clone();
                p.stored = at;
                drop(p);
                self.put(&key, cluster, at);
            }
            return;
        }
        if !self.has_room(now) {
            // Full of live conversations: this one's answers leave on our own link (they still
            // arrive; the foreign side may see them on another connection than its own).
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.put(&key, cluster, at);
        self.returns.insert(
            key,
            Path {
                cluster: cluster.clone(),
                used: now,
                stored: at,
            },
        );
    }

    fn return_path_at(&self, local: &str, foreign: &str, now: Instant) -> Option<Arc<str>> {
        let key = pair(local, foreign);
        let mut p = self.returns.get_mut(&key)?;
        if now.duration_since(p.used) >= RETURN_IDLE {
            drop(p);
            if let Some((k, p)) = self
                .returns
                .remove_if(&key, |_, p| now.duration_since(p.used) >= RETURN_IDLE)
            {
                if p.stored != 0 {
                    self.write(&k, None);
                }
            }
            return None;
        }
        let cluster = self.listed(&p.cluster)?.clone();
        p.used = now;
        let at = self.unix(now);
        if p.stored + RETURN_REFRESH.as_secs() <= at {
            p.stored = at;
            drop(p);
            self.put(&key, &cluster, at);
        }
        Some(cluster)
    }

    /// Forgets the paths nobody used for [`RETURN_IDLE`] and deletes their stored copies
    /// (every node does it; a delete of a key already gone is harmless). Returns how many.
    pub fn sweep(&self) -> usize {
        self.sweep_at(Instant::now())
    }

    fn sweep_at(&self, now: Instant) -> usize {
        let mut gone = Vec::new();
        self.returns.retain(|k, p| {
            let live = now.duration_since(p.used) < RETURN_IDLE;
            if !live && p.stored != 0 {
                gone.push(k.clone());
            }
            live
        });
        for k in &gone {
            self.write(k, None);
        }
        gone.len()
    }

    /// One change under `intercluster/` in the shared store (`None`: deleted): return paths
    /// here, the rest into the index.
    pub fn apply(&self, key: &str, value: Option<&[u8]>) {
        self.apply_at(key, value, Instant::now());
    }

    fn apply_at(&self, key: &str, value: Option<&[u8]>, now: Instant) {
        let Some(pair) = key.strip_prefix(keys::RETURNS) else {
            self.index.apply(key, value);
            return;
        };
        if pair.split_once('/').is_none() {
            return;
        }
        match value {
            Some(v) => {
                let Some((cluster, at)) = parse_value(v) else {
                    tracing::debug!(key, "intercluster: unreadable return path in the store");
                    return;
                };
                let cluster: Arc<str> = match self.listed(cluster) {
                    Some(c) => c.clone(),
                    None => Arc::from(cluster),
                };
                let used = self.instant_of(at, now);
                if let Some(mut p) = self.returns.get_mut(pair) {
                    p.cluster = cluster;
                    p.stored = at;
                    p.used = p.used.max(used);
                    return;
                }
                if now.duration_since(used) >= RETURN_IDLE || !self.has_room(now) {
                    return;
                }
                self.returns.insert(
                    pair.into(),
                    Path {
                        cluster,
                        used,
                        stored: at,
                    },
                );
            }
            // Deleted by a node that saw it idle; one this node used since it was stored
            // stays (and is written again at its next use).
            None => {
                self.returns
                    .remove_if(pair, |_, p| now.duration_since(p.used) >= RETURN_REFRESH);
            }
        }
    }

    /// Forgets everything followed from the store (before a resync lists it again).
    pub fn clear(&self) {
        self.index.clear();
        self.returns.clear();
    }
}

impl Mesh for Routing {
    fn cluster_of(&self, bare: &str) -> Option<Arc<str>> {
        self.index.cluster_of(bare)
    }

    fn return_path(&self, local: &str, foreign: &str) -> Option<Arc<str>> {
        self.return_path_at(local, foreign, Instant::now())
    }

    fn remember(&self, local: &str, foreign: &str, cluster: &Arc<str>) {
        self.remember_at(local, foreign, cluster, Instant::now());
    }

    fn should_ask(&self, bare: &str) -> bool {
        if !self.peers.load(Ordering::Relaxed) {
            return false;
        }
        match self.absent.get(bare).map(|t| *t) {
            Some(t) if t.elapsed() < ABSENT_FOR => false,
            Some(_) => {
                self.absent.remove(bare);
                true
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing() -> Routing {
        Routing::new(
            Arc::new(Index::default()),
            &[Arc::from("a"), Arc::from("b")],
        )
    }

    /// A routing whose store writes are kept for the test to read.
    fn stored() -> (Routing, mpsc::Receiver<Write>) {
        let r = routing();
        let (tx, rx) = mpsc::channel(1_000);
        r.write_to(tx);
        (r, rx)
    }

    fn drain(rx: &mut mpsc::Receiver<Write>) -> Vec<(String, Option<String>)> {
        let mut v = Vec::new();
        while let Ok((k, val)) = rx.try_recv() {
            v.push((k, val.map(|b| String::from_utf8_lossy(&b).into_owned())));
        }
        v
    }

    const KEY: &str = "intercluster/returns/carol@example.com/bob@partner.com";

    #[test]
    fn a_path_is_written_once_then_again_only_when_its_copy_is_old_or_it_moves() {
        let (r, mut rx) = stored();
        let t0 = Instant::now();
        let at0 = r.unix(t0);
        r.remember_at("carol@example.com", "bob@partner.com", "a", t0);
        assert_eq!(drain(&mut rx), vec![(KEY.into(), Some(format!("a {at0}")))]);
        // Traffic within the refresh time writes nothing: the store sees conversations.
        let t1 = t0 + RETURN_REFRESH - Duration::from_secs(1);
        r.remember_at("carol@example.com", "bob@partner.com", "a", t1);
        assert_eq!(
            r.return_path_at("carol@example.com", "bob@partner.com", t1)
                .as_deref(),
            Some("a")
        );
        assert!(drain(&mut rx).is_empty());
        // An answer after it writes the path again (it is in use).
        let t2 = t0 + RETURN_REFRESH;
        assert!(r
            .return_path_at("carol@example.com", "bob@partner.com", t2)
            .is_some());
        let at2 = r.unix(t2);
        assert_eq!(drain(&mut rx), vec![(KEY.into(), Some(format!("a {at2}")))]);
        // The conversation now comes through b: written at once.
        r.remember_at("carol@example.com", "bob@partner.com", "b", t2);
        assert_eq!(drain(&mut rx), vec![(KEY.into(), Some(format!("b {at2}")))]);
        // Never toward a cluster not listed.
        r.remember_at("dave@example.com", "bob@partner.com", "x", t2);
        assert!(drain(&mut rx).is_empty());
        assert_eq!(r.return_paths(), 1);
    }

    #[test]
    fn a_path_another_node_stored_is_found_here_and_ages_from_its_stored_time() {
        let r = routing();
        let now = Instant::now();
        let at = r.unix(now);
        r.apply_at(KEY, Some(format!("a {at}").as_bytes()), now);
        assert_eq!(
            r.return_path_at("carol@example.com", "bob@partner.com", now)
                .as_deref(),
            Some("a")
        );
        // One stored an hour ago is not taken up; an unreadable one neither.
        let old = at - RETURN_IDLE.as_secs();
        let k2 = "intercluster/returns/dave@example.com/bob@partner.com";
        r.apply_at(k2, Some(format!("a {old}").as_bytes()), now);
        r.apply_at(
            "intercluster/returns/erin@example.com/bob@partner.com",
            Some(b"a soon"),
            now,
        );
        r.apply_at("intercluster/returns/no-pair", Some(b"a 1"), now);
        assert_eq!(r.return_paths(), 1);
        // A path to a peer no longer listed is kept (it is the store's) but never taken.
        let k3 = "intercluster/returns/frank@example.com/bob@partner.com";
        r.apply_at(k3, Some(format!("gone {at}").as_bytes()), now);
        assert!(r
            .return_path_at("frank@example.com", "bob@partner.com", now)
            .is_none());
        // Other keys go to the index.
        r.apply_at(&keys::user("b", "bob@example.com"), Some(b""), now);
        assert_eq!(r.cluster_of("bob@example.com").as_deref(), Some("b"));
    }

    #[test]
    fn a_delete_forgets_a_path_unless_this_node_used_it_since() {
        let r = routing();
        let t0 = Instant::now();
        let at = r.unix(t0);
        r.apply_at(KEY, Some(format!("a {at}").as_bytes()), t0);
        let k2 = "intercluster/returns/dave@example.com/bob@partner.com";
        r.apply_at(k2, Some(format!("a {at}").as_bytes()), t0);
        let later = t0 + RETURN_REFRESH + Duration::from_secs(1);
        assert!(r
            .return_path_at("dave@example.com", "bob@partner.com", later)
            .is_some());
        r.apply_at(KEY, None, later);
        r.apply_at(k2, None, later);
        assert!(r
            .return_path_at("carol@example.com", "bob@partner.com", later)
            .is_none());
        assert!(r
            .return_path_at("dave@example.com", "bob@partner.com", later)
            .is_some());
    }

    #[test]
    fn idle_paths_are_swept_and_their_stored_copies_deleted() {
        let (r, mut rx) = stored();
        let t0 = Instant::now();
        r.remember_at("carol@example.com", "bob@partner.com", "a", t0);
        r.remember_at("dave@example.com", "bob@partner.com", "a", t0);
        drain(&mut rx);
        let t1 = t0 + RETURN_IDLE / 2;
        assert!(r
            .return_path_at("dave@example.com", "bob@partner.com", t1)
            .is_some());
        drain(&mut rx);
        assert_eq!(r.sweep_at(t0 + RETURN_IDLE), 1);
        assert_eq!(drain(&mut rx), vec![(KEY.into(), None)]);
        assert_eq!(r.return_paths(), 1);
    }

    #[test]
    fn a_full_writer_queue_is_counted_not_waited_for() {
        let r = routing();
        let (tx, _rx) = mpsc::channel(1);
        r.write_to(tx);
        let t0 = Instant::now();
        r.remember_at("carol@example.com", "bob@partner.com", "a", t0);
        r.remember_at("dave@example.com", "bob@partner.com", "a", t0);
        assert_eq!(r.unwritten.load(Ordering::Relaxed), 1);
        assert_eq!(r.return_paths(), 2, "kept in memory all the same");
    }

    #[test]
    fn return_paths_expire_when_idle_and_are_refreshed_by_use() {
        let r = routing();
        let t0 = Instant::now();
        r.remember_at("carol@example.com", "bob@partner.com", "a", t0);
        let half = t0 + RETURN_IDLE / 2;
        assert_eq!(
            r.return_path_at("carol@example.com", "bob@partner.com", half)
                .as_deref(),
            Some("a")
        );
        // Used at half time: still there past the first hour.
        let later = t0 + RETURN_IDLE + Duration::from_secs(1);
        assert!(r
            .return_path_at("carol@example.com", "bob@partner.com", later)
            .is_some());
        // Not the other direction, not another pair.
        assert!(r
            .return_path_at("bob@partner.com", "carol@example.com", later)
            .is_none());
        let idle = later + RETURN_IDLE;
        assert!(r
            .return_path_at("carol@example.com", "bob@partner.com", idle)
            .is_none());
        assert_eq!(r.return_paths(), 0, "an expired path is removed");
    }

    #[test]
    fn the_return_map_is_bounded() {
        let r = routing();
        let t0 = Instant::now();
        for i in 0..MAX_RETURN_PATHS {
            r.remember_at(&format!("u{i}@example.com"), "f@x.test", "a", t0);
        }
        r.remember_at("late@example.com", "f@x.test", "a", t0);
        assert_eq!(r.return_paths(), MAX_RETURN_PATHS);
        assert!(r
            .return_path_at("late@example.com", "f@x.test", t0)
            .is_none());
        assert_eq!(r.dropped.load(Ordering::Relaxed), 1);
        // A flood of new pairs into a map full of live ones is refused without a sweep each.
        let swept = r.swept.load(Ordering::Relaxed);
        for i in 0..1_000 {
            r.remember_at(&format!("flood{i}@example.com"), "f@x.test", "a", t0);
        }
        assert_eq!(
            r.swept.load(Ordering::Relaxed),
            swept,
            "no sweep within a second"
        );
        assert_eq!(r.dropped.load(Ordering::Relaxed), 1_001);
        // Once the old ones are idle, a new one takes their room.
        let t1 = t0 + RETURN_IDLE;
        r.remember_at("late@example.com", "f@x.test", "a", t1);
        assert!(r
            .return_path_at("late@example.com", "f@x.test", t1)
            .is_some());
        assert_eq!(r.return_paths(), 1);
    }

    #[test]
    fn peers_are_asked_again_only_after_a_while() {
        let r = routing();
        assert!(r.should_ask("x@example.com"));
        r.mark_absent("x@example.com");
        assert!(!r.should_ask("x@example.com"));
        assert!(r.should_ask("y@example.com"));
        let none = Routing::new(Arc::new(Index::default()), &[]);
        assert!(!none.should_ask("x@example.com"), "no peers: nobody to ask");
    }
}
