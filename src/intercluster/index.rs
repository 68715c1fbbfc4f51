//! Which peer cluster each of their users lives in, on every node: an in-memory copy of
//! `intercluster/users/<peer>/<user>` in the shared store (the leader's sync agent writes it,
//! every node follows it), plus the peers' sync status and the callers we do not list.
//! Routing asks [`Index::cluster_of`] for each message, so that is one map read.

use dashmap::DashMap;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::keys;

/// The followed state of the intercluster peering.
#[derive(Debug, Default)]
pub struct Index {
    users: DashMap<Box<str>, Arc<str>>,
    /// One shared name per peer, so the map holds a pointer per user.
    names: Mutex<HashMap<String, Arc<str>>>,
    status: Mutex<BTreeMap<String, serde_json::Value>>,
    callers: Mutex<BTreeMap<String, serde_json::Value>>,
}

impl Index {
    /// The peer cluster `user_bare_jid` lives in, as of the last good sync with it.
    pub fn cluster_of(&self, user_bare_jid: &str) -> Option<Arc<str>> {
        self.users.get(user_bare_jid).map(|p| p.value().clone())
    }

    /// Users known to live in peer clusters.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Users of `peer` (walks the map: for status pages, not for routing).
    pub fn count(&self, peer: &str) -> usize {
        self.users.iter().filter(|e| &**e.value() == peer).count()
    }

    fn name(&self, peer: &str) -> Arc<str> {
        let mut n = self.names.lock().unwrap_or_else(|p| p.into_inner());
        n.entry(peer.to_string())
            .or_insert_with(|| Arc::from(peer))
            .clone()
    }

    /// One change under `intercluster/` (`value` `None`: deleted).
    pub fn apply(&self, key: &str, value: Option<&[u8]>) {
        if let Some((peer, user)) = keys::parse_user(key) {
            match value {
                Some(_) => {
                    let name = self.name(peer);
                    self.users.insert(user.into(), name);
                }
                None => {
                    self.users.remove_if(user, |_, p| &**p == peer);
                }
            }
        } else if let Some(peer) = key.strip_prefix(keys::STATUS) {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            match value.and_then(|v| serde_json::from_slice(v).ok()) {
                Some(v) => {
                    s.insert(peer.to_string(), v);
                }
                None => {
                    s.remove(peer);
                }
            }
        } else if let Some(name) = key.strip_prefix(keys::CALLERS) {
            let mut c = self.callers.lock().unwrap_or_else(|p| p.into_inner());
            match value.and_then(|v| serde_json::from_slice(v).ok()) {
                Some(v) => {
                    c.insert(name.to_string(), v);
                }
                None => {
                    c.remove(name);
                }
            }
        }
    }

    /// Forgets everything (before a store resync lists it again).
    pub fn clear(&self) {
        self.users.clear();
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.callers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The last status the leader wrote for `peer`.
    pub fn status(&self, peer: &str) -> Option<serde_json::Value> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
    }

    /// Clusters that called us without being listed, by name.
    pub fn callers(&self) -> BTreeMap<String, serde_json::Value> {
        self.callers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_users_status_and_callers() {
        let i = Index::default();
        i.apply(&keys::user("b", "bob@example.com"), Some(b""));
        i.apply(&keys::user("c", "carol@example.com"), Some(b""));
        assert_eq!(i.cluster_of("bob@example.com").as_deref(), Some("b"));
        assert_eq!(i.cluster_of("nobody@example.com"), None);
        assert_eq!((i.len(), i.count("b")), (2, 1));
        // A delete by another peer than the one bob is with now changes nothing.
        i.apply(&keys::user("c", "bob@example.com"), None);
        assert_eq!(i.cluster_of("bob@example.com").as_deref(), Some("b"));
        i.apply(&keys::user("b", "bob@example.com"), None);
        assert_eq!(i.cluster_of("bob@example.com"), None);
        i.apply(&format!("{}b", keys::STATUS), Some(br#"{"in_sync":true}"#));
        assert_eq!(i.status("b").map(|v| v["in_sync"] == true), Some(true));
        i.apply(&format!("{}x", keys::CALLERS), Some(br#"{"last_seen":1}"#));
        assert!(i.callers().contains_key("x"));
        i.clear();
        assert!(i.is_empty() && i.status("b").is_none() && i.callers().is_empty());
    }
}
