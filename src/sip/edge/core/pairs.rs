//! The notifier dialogs of each (foreign watcher, local user) pair: the per-pair bound
//! (`MAX_DIALOGS_PER_PAIR`), a sibling dialog's approval, and the fan-out of one presence to
//! the pair's dialogs read it.
//!
//! Sized for a million foreign watchers (issue 11 item 10): a pair is keyed by a 128-bit
//! fingerprint of its two bare addresses (two independently keyed hashes, as
//! `TxnKey::fingerprint` keys the recent answers), not by two owned strings; its dialogs are
//! held by their `notifiers` fingerprints (16 bytes, not a 48-byte `DialogId`), and its first
//! dialog — nearly every pair has exactly one — is its slot's value (a slot of 32 bytes, the
//! others in a second, nearly empty map), not in a vector of its own. Two pairs
//! sharing a fingerprint would need a collision of 128 keyed bits.

use std::hash::BuildHasher;

use super::notifiers::ByFingerprint;

/// A dialog, by its fingerprint in the notifier table.
type Dialog = super::notifiers::Fingerprint;

/// A pair's dialogs, oldest first (see [`PairIndex::get`]).
#[derive(Default, Clone, Copy)]
pub(crate) struct PairDialogs<'a> {
    first: Option<&'a Dialog>,
    more: &'a [Dialog],
}

impl<'a> PairDialogs<'a> {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &'a Dialog> + 'a {
        self.first.into_iter().chain(self.more.iter())
    }
}

/// See the module doc. A pair's first dialog is the value of its slot in `first` (32 bytes:
/// two fingerprints); the others, when a pair has more than one, wait in `more`.
#[derive(Default)]
pub(crate) struct PairIndex {
    first: ByFingerprint<Dialog>,
    more: ByFingerprint<Vec<Dialog>>,
    keys: (std::hash::RandomState, std::hash::RandomState),
}

impl PairIndex {
    fn fingerprint(&self, pair: &(String, String)) -> (u64, u64) {
        (self.keys.0.hash_one(pair), self.keys.1.hash_one(pair))
    }

    /// The pair's dialogs, oldest first.
    pub(crate) fn get(&self, pair: &(String, String)) -> Option<PairDialogs<'_>> {
        let fp = self.fingerprint(pair);
        let first = self.first.get(&fp)?;
        Some(PairDialogs {
            first: Some(first),
            more: self.more.get(&fp).map_or(&[], Vec::as_slice),
        })
    }

    pub(crate) fn contains_key(&self, pair: &(String, String)) -> bool {
        self.first.contains_key(&self.fingerprint(pair))
    }

    /// Adds `id` to the pair; true when it is the pair's first dialog.
    pub(crate) fn add(&mut self, pair: &(String, String), id: Dialog) -> bool {
        let fp = self.fingerprint(pair);
        if let std::collections::hash_map::Entry::Vacant(v) = self.first.entry(fp) {
            v.insert(id);
            return true;
        }
        self.more.entry(fp).or_default().push(id);
        false
    }

    /// Removes `id` from the pair: None when the pair has no dialog at all, else whether it
    /// has none left (the pair is then forgotten).
    pub(crate) fn remove(&mut self, pair: &(String, String), id: Dialog) -> Option<bool> {
        let fp = self.fingerprint(pair);
        let first = *self.first.get(&fp)?;
        if first != id {
            if let Some(v) = self.more.get_mut(&fp) {
                v.retain(|d| *d != id);
                if v.is_empty() {
                    self.more.remove(&fp);
                }
            }
            return Some(false);
        }
        // The oldest of the others, if any, becomes the first.
        let next = match self.more.get_mut(&fp) {
            Some(v) if !v.is_empty() => {
                let n = v.remove(0);
                if v.is_empty() {
                    self.more.remove(&fp);
                }
                Some(n)
            }
            _ => None,
        };
        match next {
            Some(n) => {
                self.first.insert(fp, n);
                Some(false)
            }
            None => {
                self.first.remove(&fp);
                self.more.remove(&fp);
                Some(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One slot per (watcher, user) pair: a key and its first dialog, 32 bytes (a `u128`
    /// key would align it to 16; an enum of one dialog or a vector made it 40).
    #[test]
    fn a_slot_is_thirty_two_bytes() {
        assert_eq!(std::mem::size_of::<((u64, u64), Dialog)>(), 32);
    }

    fn ids_of(p: &PairIndex, pair: &(String, String)) -> Option<Vec<Dialog>> {
        p.get(pair).map(|d| d.iter().copied().collect())
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
        assert_eq!(ids_of(&p, &ab), Some(vec![id(1), id(2), id(3)]));
        assert_eq!(p.remove(&ab, id(2)), Some(false));
        assert_eq!(ids_of(&p, &ab), Some(vec![id(1), id(3)]));
        assert_eq!(p.remove(&ab, id(9)), Some(false), "not one of its dialogs");
        assert_eq!(p.remove(&ab, id(1)), Some(false));
        assert_eq!(p.remove(&ab, id(3)), Some(true));
        assert!(!p.contains_key(&ab));
        assert_eq!(p.remove(&ab, id(3)), None);
        assert_eq!(ids_of(&p, &ba), Some(vec![id(4)]));
    }
}
