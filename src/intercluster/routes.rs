//! What routing asks of the peering (issue 13 §3), as the router's [`Mesh`]: which peer
//! cluster a user lives in (the [`Index`]), the return paths ("answers come back the same
//! way"), and which unplaced users the peers answered "nobody" for lately.
//!
//! Both maps are in memory, per node, and bounded (this slice; the store would share them): a
//! return path is learned by the node that answers the peer's `Forward` (the address the peer
//! lists) and is found only by that node. In a single-node cluster, or when that node also
//! holds the user's home-node link, the user's answers find it; when another node of the
//! cluster holds the link (a multi-node cluster), or after a restart, answers go out on this
//! cluster's own SIP/s2s link until the foreign side writes again.

use super::index::Index;
use crate::gateway::router::Mesh;
use dashmap::DashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most return paths kept (a conversation is one entry).
pub const MAX_RETURN_PATHS: usize = 100_000;
/// A return path not used for this long is forgotten.
pub const RETURN_IDLE: Duration = Duration::from_secs(3600);
/// Most "nobody has this user" answers kept.
pub const MAX_ABSENT: usize = 10_000;
/// How long such an answer holds before the peers are asked again.
pub const ABSENT_FOR: Duration = Duration::from_secs(60);

/// The peering's routing state on one node.
pub struct Routing {
    index: Arc<Index>,
    /// Whether peers were listed at start (asking makes no sense otherwise; the asker checks
    /// the current list, so a reload that removes them all stops the asking too).
    peers: AtomicBool,
    /// `local\u{0}foreign` (bare JIDs) → (peer cluster, last use).
    returns: DashMap<Box<str>, (Arc<str>, Instant)>,
    /// Unplaced users the peers answered "nobody" for, and when.
    absent: DashMap<Box<str>, Instant>,
    /// Return paths not remembered because the map was full of live ones.
    pub(crate) dropped: std::sync::atomic::AtomicU64,
    /// Envelopes forwarded per listed peer, for the status (see [`Forwarded`]).
    forwarded: DashMap<Arc<str>, Forwarded>,
    /// When a full map was last swept of stale entries (ms since `born`): at most once a
    /// second, so a flood of new pairs into a map full of live ones costs no scan each.
    swept: AtomicU64,
    born: Instant,
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
    // NUL cannot be in a JID (RFC 7622), so the pair is unambiguous.
    format!("{local}\u{0}{foreign}").into_boxed_str()
}

impl Routing {
    pub fn new(index: Arc<Index>, peers_listed: bool) -> Self {
        Routing {
            index,
            peers: AtomicBool::new(peers_listed),
            returns: DashMap::new(),
            absent: DashMap::new(),
            dropped: Default::default(),
            forwarded: DashMap::new(),
            swept: AtomicU64::new(0),
            born: Instant::now(),
        }
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

    fn remember_at(&self, local: &str, foreign: &str, cluster: &Arc<str>, now: Instant) {
        let key = pair(local, foreign);
        if let Some(mut e) = self.returns.get_mut(&key) {
            *e = (cluster.clone(), now);
            return;
        }
        if self.returns.len() >= MAX_RETURN_PATHS && self.may_sweep(now) {
            self.returns
                .retain(|_, (_, t)| now.duration_since(*t) < RETURN_IDLE);
        }
        if self.returns.len() >= MAX_RETURN_PATHS {
            // Full of live conversations: this one's answers leave on our own link (they still
            // arrive; the foreign side may see them on another connection than its own).
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.returns.insert(key, (cluster.clone(), now));
    }

    fn return_path_at(&self, local: &str, foreign: &str, now: Instant) -> Option<Arc<str>> {
        let key = pair(local, foreign);
        let mut e = self.returns.get_mut(&key)?;
        if now.duration_since(e.1) >= RETURN_IDLE {
            drop(e);
            self.returns
                .remove_if(&key, |_, (_, t)| now.duration_since(*t) >= RETURN_IDLE);
            return None;
        }
        e.1 = now;
        Some(e.0.clone())
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

    #[test]
    fn return_paths_expire_when_idle_and_are_refreshed_by_use() {
        let r = Routing::new(Arc::new(Index::default()), true);
        let a: Arc<str> = Arc::from("a");
        let t0 = Instant::now();
        r.remember_at("carol@example.com", "bob@partner.com", &a, t0);
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
        let r = Routing::new(Arc::new(Index::default()), true);
        let a: Arc<str> = Arc::from("a");
        let t0 = Instant::now();
        for i in 0..MAX_RETURN_PATHS {
            r.remember_at(&format!("u{i}@example.com"), "f@x.test", &a, t0);
        }
        r.remember_at("late@example.com", "f@x.test", &a, t0);
        assert_eq!(r.return_paths(), MAX_RETURN_PATHS);
        assert!(r
            .return_path_at("late@example.com", "f@x.test", t0)
            .is_none());
        assert_eq!(r.dropped.load(Ordering::Relaxed), 1);
        // A flood of new pairs into a map full of live ones is refused without a sweep each.
        let swept = r.swept.load(Ordering::Relaxed);
        for i in 0..1_000 {
            r.remember_at(&format!("flood{i}@example.com"), "f@x.test", &a, t0);
        }
        assert_eq!(
            r.swept.load(Ordering::Relaxed),
            swept,
            "no sweep within a second"
        );
        assert_eq!(r.dropped.load(Ordering::Relaxed), 1_001);
        // Once the old ones are idle, a new one takes their room.
        let t1 = t0 + RETURN_IDLE;
        r.remember_at("late@example.com", "f@x.test", &a, t1);
        assert!(r
            .return_path_at("late@example.com", "f@x.test", t1)
            .is_some());
        assert_eq!(r.return_paths(), 1);
    }

    #[test]
    fn peers_are_asked_again_only_after_a_while() {
        let r = Routing::new(Arc::new(Index::default()), true);
        assert!(r.should_ask("x@example.com"));
        r.mark_absent("x@example.com");
        assert!(!r.should_ask("x@example.com"));
        assert!(r.should_ask("y@example.com"));
        let none = Routing::new(Arc::new(Index::default()), false);
        assert!(!none.should_ask("x@example.com"), "no peers: nobody to ask");
    }
}
