//! The notifier dialogs of each (foreign watcher, local user) pair: the per-pair bound
//! (`MAX_DIALOGS_PER_PAIR`), a sibling dialog's approval, and the fan-out of one presence to
//! the pair's dialogs read it.
//!
//! Sized for a million foreign watchers (issue 11 item 10): a pair is keyed by a 128-bit
//! fingerprint of its two bare addresses (two independently keyed hashes, as
//! `TxnKey::fingerprint` keys the recent answers), not by two owned strings; its dialogs are
//! held by their `notifiers` fingerprints (16 bytes, not a 48-byte `DialogId`), and its one
//! dialog — nearly every pair has exactly one — inline, not in a vector of its own. Two pairs
//! sharing a fingerprint would need a collision of 128 keyed bits.

use std::collections::HashMap;
use std::hash::BuildHasher;

/// A dialog, by its fingerprint in the notifier table.
type Dialog = super::notifiers::Fingerprint;

enum Dialogs {
    One(Dialog),
    Many(Vec<Dialog>),
}

impl Dialogs {
    fn as_slice(&self) -> &[Dialog] {
        match self {
            Dialogs::One(d) => std::slice::from_ref(d),
            Dialogs::Many(v) => v,
        }
    }
}

/// See the module doc.
#[derive(Default)]
pub(crate) struct PairIndex {
    map: HashMap<(u64, u64), Dialogs>,
    keys: (std::hash::RandomState, std::hash::RandomState),
}

impl PairIndex {
    fn fingerprint(&self, pair: &(String, String)) -> (u64, u64) {
        (self.keys.0.hash_one(pair), self.keys.1.hash_one(pair))
    }

    /// The pair's dialogs, oldest first.
    pub(crate) fn get(&self, pair: &(String, String)) -> Option<&[Dialog]> {
        self.map.get(&self.fingerprint(pair)).map(Dialogs::as_slice)
    }

    pub(crate) fn contains_key(&self, pair: &(String, String)) -> bool {
        self.map.contains_key(&self.fingerprint(pair))
    }

    /// Adds `id` to the pair; true when it is the pair's first dialog.
    pub(crate) fn add(&mut self, pair: &(String, String), id: Dialog) -> bool {
        let fp = self.fingerprint(pair);
        match self.map.remove(&fp) {
            None => {
                self.map.insert(fp, Dialogs::One(id));
                true
            }
            Some(Dialogs::One(first)) => {
                self.map.insert(fp, Dialogs::Many(vec![first, id]));
                false
            }
            Some(Dialogs::Many(mut v)) => {
                v.push(id);
                self.map.insert(fp, Dialogs::Many(v));
                false
            }
        }
    }

    /// Removes `id` from the pair: None when the pair has no dialog at all, else whether it
    /// has none left (the pair is then forgotten).
    pub(crate) fn remove(&mut self, pair: &(String, String), id: Dialog) -> Option<bool> {
        let fp = self.fingerprint(pair);
        let left = match self.map.remove(&fp)? {
            Dialogs::One(d) if d == id => return Some(true),
            one @ Dialogs::One(_) => one,
            Dialogs::Many(mut v) => {
                v.retain(|d| *d != id);
                match v.len() {
                    0 => return Some(true),
                    1 => Dialogs::One(v.remove(0)),
                    _ => Dialogs::Many(v),
                }
            }
        };
        self.map.insert(fp, left);
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One slot per (watcher, user) pair: a key and the inline dialog, 40 bytes (a `u128`
    /// key would align it to 16 and make it 48).
    #[test]
    fn a_slot_is_forty_bytes() {
        assert_eq!(std::mem::size_of::<((u64, u64), Dialogs)>(), 40);
    }

    fn id(n: u32) -> Dialog {
        (u64::from(n), 0)
    }

    #[test]
    fn dialogs_of_a_pair_in_order_and_the_pair_forgotten_with_its_last() {
        let mut p = PairIndex::default();
        let ab = ("a@x.test".to_string(), "b@y.test".to_string());
        let ba = ("b@y.test".to_string(), "a@x.test".to_string());
        assert!(p.add(&ab, id(1)));
        assert!(!p.add(&ab, id(2)));
        assert!(!p.add(&ab, id(3)));
        assert!(p.add(&ba, id(4)), "the reverse pair is another pair");
        assert_eq!(p.get(&ab), Some(&[id(1), id(2), id(3)][..]));
        assert_eq!(p.remove(&ab, id(2)), Some(false));
        assert_eq!(p.get(&ab), Some(&[id(1), id(3)][..]));
        assert_eq!(p.remove(&ab, id(9)), Some(false), "not one of its dialogs");
        assert_eq!(p.remove(&ab, id(1)), Some(false));
        assert_eq!(p.remove(&ab, id(3)), Some(true));
        assert!(!p.contains_key(&ab));
        assert_eq!(p.remove(&ab, id(3)), None);
        assert_eq!(p.get(&ba), Some(&[id(4)][..]));
    }
}
