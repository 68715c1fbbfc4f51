//! The notifier table: foreign watchers' dialogs by id (RFC 6665 §4.2), a million at most.
//!
//! Keyed by a 128-bit fingerprint of the dialog id (two independently keyed hashes, as
//! `pairs` keys its pairs) rather than by the id itself: a slot is then 24 bytes, not 56, and
//! the id is read from the notifier's own dialog. A lookup also compares that id, so a
//! fingerprint shared by two ids (a collision of 128 keyed bits) could never return another
//! dialog's notifier.

use std::collections::HashMap;
use std::hash::BuildHasher;

use crate::sip::dialog::DialogId;
use crate::sip::subscription::Notifier;

/// A 128-bit fingerprint as two words: aligned to 8 bytes, not 16 as a `u128` is, so a
/// slot of this table or of `pairs` is 24 bytes, not 32.
pub(crate) type Fingerprint = (u64, u64);

/// The hasher of tables keyed by a [`Fingerprint`]: the key is already the output of two
/// independently keyed SipHashes (random per process), so hashing it again with SipHash only
/// costs time — three hashes per lookup instead of two, on every NOTIFY of a presence storm
/// (issue 11 item 10). Its two words are folded; a table's buckets follow from keyed bits
/// that no peer can choose, as before.
#[derive(Default, Clone, Copy)]
pub(crate) struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(17) ^ n;
    }

    /// Only `u64`s are hashed here; anything else (not used) is still folded in, byte by byte.
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
}

/// A map keyed by fingerprints (see [`Prehashed`]).
pub(crate) type ByFingerprint<V> =
    HashMap<Fingerprint, V, std::hash::BuildHasherDefault<Prehashed>>;

/// See the module doc. Boxed values: a hash table keeps up to half its slots empty after
/// growing, and an empty slot costs the size of the value (a `Notifier` is 192 bytes).
#[derive(Default)]
pub(crate) struct NotifierTable {
    map: ByFingerprint<Box<Notifier>>,
    keys: (std::hash::RandomState, std::hash::RandomState),
}

impl NotifierTable {
    /// The key of `id` (the notifier heap queues it instead of the id: 16 bytes, not 48).
    pub(crate) fn fingerprint(&self, id: &DialogId) -> Fingerprint {
        (self.keys.0.hash_one(id), self.keys.1.hash_one(id))
    }

    pub(crate) fn get(&self, id: &DialogId) -> Option<&Notifier> {
        self.map
            .get(&self.fingerprint(id))
            .map(|n| &**n)
            .filter(|n| n.dialog.id == *id)
    }

    pub(crate) fn get_mut(&mut self, id: &DialogId) -> Option<&mut Notifier> {
        let fp = self.fingerprint(id);
        self.map
            .get_mut(&fp)
            .map(|n| &mut **n)
            .filter(|n| n.dialog.id == *id)
    }

    /// The notifier under fingerprint `fp`, if any.
    pub(crate) fn by_fingerprint(&self, fp: Fingerprint) -> Option<&Notifier> {
        self.map.get(&fp).map(|n| &**n)
    }

    pub(crate) fn contains_key(&self, id: &DialogId) -> bool {
        self.get(id).is_some()
    }

    /// Inserts `n` under its dialog's id; returns the notifier it replaces.
    pub(crate) fn insert(&mut self, n: Box<Notifier>) -> Option<Box<Notifier>> {
        let fp = self.fingerprint(&n.dialog.id);
        self.map.insert(fp, n)
    }

    pub(crate) fn remove(&mut self, id: &DialogId) -> Option<Box<Notifier>> {
        let fp = self.fingerprint(id);
        if self.map.get(&fp)?.dialog.id != *id {
            return None;
        }
        self.map.remove(&fp)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Every notifier with its id.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&DialogId, &Notifier)> {
        self.map.values().map(|n| (&n.dialog.id, &**n))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Notifier> {
        self.map.values().map(|n| &**n)
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut Notifier> {
        self.map.values_mut().map(|n| &mut **n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::dialog::Dialog;

    fn notifier(call: &str) -> Box<Notifier> {
        let addr = |a: &str| crate::gateway::Address::parse(a).expect("address");
        Box::new(Notifier::new(
            Dialog::new(
                DialogId::new(call, "l", "r"),
                "sip:u@example.com",
                "sip:w@partner.test",
                "sip:w@192.0.2.1",
                Vec::new(),
                1,
                Some(1),
            ),
            crate::sip::subscription::Parties::new(&addr("w@partner.test"), &addr("u@example.com")),
            crate::sip::subscription::NotifierState::Pending,
            crate::presence::convert::SipBodyKind::Pidf,
            std::time::Instant::now(),
            None,
            None,
        ))
    }

    #[test]
    fn a_slot_is_a_fingerprint_and_a_pointer() {
        assert_eq!(std::mem::size_of::<(Fingerprint, Box<Notifier>)>(), 24);
    }

    #[test]
    fn notifiers_are_found_by_their_dialog_id_and_only_by_it() {
        let mut t = NotifierTable::default();
        assert!(t.insert(notifier("a")).is_none());
        assert!(t.insert(notifier("b")).is_none());
        let a = notifier("a").dialog.id.clone();
        let other = DialogId::new(a.call_id(), a.local_tag(), "x");
        assert_eq!(t.get(&a).map(|n| n.dialog.id.clone()), Some(a.clone()));
        assert!(t.get(&other).is_none() && t.remove(&other).is_none());
        assert!(t.insert(notifier("a")).is_some(), "same id: replaced");
        assert_eq!(t.len(), 2);
        let mut ids: Vec<_> = t.iter().map(|(id, _)| id.call_id().to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
        assert!(t.remove(&a).is_some());
        assert!(!t.contains_key(&a));
        assert_eq!(t.len(), 1);
    }
}
