//! What this cluster contributes to its peers: the set of its users, and a bounded log of the
//! changes to that set, so a peer can be answered with only what changed since its last sync
//! (sans-IO: the driver feeds it the learned directory and the configured users).
//!
//! Each node keeps its own log (the versions are this node's): a peer's cursor is
//! `(epoch, version)`, the epoch chosen at random when the node starts. A cursor of another
//! epoch (another node answered last time, or this one restarted), a version the log no longer
//! reaches back to, or one from the future gets the complete list instead.

use std::collections::{BTreeSet, HashMap, VecDeque};

/// Changes kept by default: older cursors get the complete list.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Where a peer stands in this node's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub version: u64,
}

/// One change of the set, as sent to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub user: String,
    pub removed: bool,
}

/// The answer to a sync request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// `true`: `changes` is the complete list (all additions); the peer replaces.
    pub complete: bool,
    pub changes: Vec<Change>,
    /// The cursor the answer brings the peer to.
    pub cursor: Cursor,
}

/// The set of this cluster's users and the log of its changes.
#[derive(Debug)]
pub struct ChangeLog {
    epoch: u64,
    version: u64,
    users: BTreeSet<String>,
    /// `(version, change)`, oldest first; versions are consecutive.
    log: VecDeque<(u64, Change)>,
    capacity: usize,
    /// The version a cursor must be at least at to be answered from the log.
    floor: u64,
}

impl ChangeLog {
    pub fn new(epoch: u64, capacity: usize) -> ChangeLog {
        ChangeLog {
            epoch,
            version: 0,
            users: BTreeSet::new(),
            log: VecDeque::new(),
            capacity: capacity.max(1),
            floor: 0,
        }
    }

    pub fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            version: self.version,
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.users.contains(user)
    }

    /// Records that `user` lives in this cluster; a user already in the set changes nothing
    /// (a move between two home nodes of this cluster is no news for the peers).
    pub fn add(&mut self, user: &str) -> bool {
        if self.users.contains(user) {
            return false;
        }
        self.users.insert(user.to_string());
        self.push(Change {
            user: user.to_string(),
            removed: false,
        });
        true
    }

    /// Records that `user` no longer lives in this cluster.
    pub fn remove(&mut self, user: &str) -> bool {
        if !self.users.remove(user) {
            return false;
        }
        self.push(Change {
            user: user.to_string(),
            removed: true,
        });
        true
    }

    /// Replaces the whole set (a store resync): the differences are logged as changes.
    pub fn replace(&mut self, users: impl IntoIterator<Item = String>) {
        let new: BTreeSet<String> = users.into_iter().collect();
        let gone: Vec<String> = self.users.difference(&new).cloned().collect();
        for u in gone {
            self.remove(&u);
        }
        for u in new {
            self.add(&u);
        }
    }

    fn push(&mut self, change: Change) {
        self.version += 1;
        if self.log.len() == self.capacity {
            if let Some((v, _)) = self.log.pop_front() {
                self.floor = v;
            }
        }
        self.log.push_back((self.version, change));
    }

    /// What a peer at `since` (none: never synced with this node) gets; `full` asks for the
    /// complete list whatever the cursor.
    pub fn answer(&self, since: Option<Cursor>, full: bool) -> Answer {
        let incremental = match since {
            Some(c) if !full => {
                c.epoch == self.epoch && c.version >= self.floor && c.version <= self.version
            }
            _ => false,
        };
        if !incremental {
            return Answer {
                complete: true,
                changes: self
                    .users
                    .iter()
                    .map(|u| Change {
                        user: u.clone(),
                        removed: false,
                    })
                    .collect(),
                cursor: self.cursor(),
            };
        }
        let from = since.map_or(0, |c| c.version);
        // Only the last change of each user counts: one added then removed is one removal.
        let mut last: HashMap<&str, (u64, bool)> = HashMap::new();
        for (v, c) in self.log.iter().filter(|(v, _)| *v > from) {
            last.insert(c.user.as_str(), (*v, c.removed));
        }
        let mut changes: Vec<(u64, Change)> = last
            .into_iter()
            .map(|(u, (v, removed))| {
                (
                    v,
                    Change {
                        user: u.to_string(),
                        removed,
                    },
                )
            })
            .collect();
        changes.sort_by_key(|(v, _)| *v);
        Answer {
            complete: false,
            changes: changes.into_iter().map(|(_, c)| c).collect(),
            cursor: self.cursor(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(a: &Answer) -> Vec<(&str, bool)> {
        a.changes
            .iter()
            .map(|c| (c.user.as_str(), c.removed))
            .collect()
    }

    #[test]
    fn a_new_peer_gets_the_complete_list() {
        let mut l = ChangeLog::new(7, 10);
        l.add("a@x");
        l.add("b@x");
        let a = l.answer(None, false);
        assert!(a.complete);
        assert_eq!(users(&a), vec![("a@x", false), ("b@x", false)]);
        assert_eq!(
            a.cursor,
            Cursor {
                epoch: 7,
                version: 2
            }
        );
    }

    #[test]
    fn a_peer_in_step_gets_only_what_changed() {
        let mut l = ChangeLog::new(7, 10);
        l.add("a@x");
        let c = l.cursor();
        l.add("b@x");
        l.add("c@x");
        l.remove("c@x");
        l.remove("a@x");
        assert!(!l.add("b@x"), "already there: no change");
        let a = l.answer(Some(c), false);
        assert!(!a.complete);
        assert_eq!(
            users(&a),
            vec![("b@x", false), ("c@x", true), ("a@x", true)]
        );
        // Nothing new: an empty incremental answer.
        let again = l.answer(Some(a.cursor), false);
        assert!(!again.complete && again.changes.is_empty());
        // Asked for in full, the list.
        let full = l.answer(Some(a.cursor), true);
        assert!(full.complete);
        assert_eq!(users(&full), vec![("b@x", false)]);
    }

    #[test]
    fn an_old_foreign_or_future_cursor_gets_the_complete_list() {
        let mut l = ChangeLog::new(7, 3);
        let start = l.cursor();
        for u in ["a@x", "b@x", "c@x", "d@x"] {
            l.add(u);
        }
        // The log holds 3 changes (versions 2..=4): a cursor at 0 is too old.
        assert!(l.answer(Some(start), false).complete);
        assert!(
            !l.answer(
                Some(Cursor {
                    epoch: 7,
                    version: 1
                }),
                false
            )
            .complete
        );
        assert!(
            l.answer(
                Some(Cursor {
                    epoch: 8,
                    version: 4
                }),
                false
            )
            .complete
        );
        assert!(
            l.answer(
                Some(Cursor {
                    epoch: 7,
                    version: 9
                }),
                false
            )
            .complete
        );
        assert_eq!(l.len(), 4);
    }

    #[test]
    fn replace_logs_the_differences() {
        let mut l = ChangeLog::new(1, 10);
        l.add("a@x");
        l.add("b@x");
        let c = l.cursor();
        l.replace(["b@x".to_string(), "c@x".to_string()]);
        let a = l.answer(Some(c), false);
        assert_eq!(users(&a), vec![("a@x", true), ("c@x", false)]);
    }
}
