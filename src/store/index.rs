//! The embedded store's index: where each key's value is, found by a keyed 64-bit hash of the
//! key, without the key itself in memory.
//!
//! Issue 11 item 10 (a million foreign subscriptions in under 1 GiB): a map from each key as
//! its own `String` to its place and revisions cost ~130 bytes per key (two keys per
//! subscription: the dialog record and the consent approval). A put record holds the
//! revisions and the key right before its value (`journal`), so the index keeps only the hash
//! and the place (24 bytes a slot); whoever asks for a key confirms a hit by reading the
//! stored key back (`is`: verify on read), so two keys sharing a hash are never confused, and
//! reads the revisions back with it. The second key of a hash shared by two is kept with its key in
//! memory (`collided`, empty but for a collision of 64 keyed bits). Ordered listings read
//! every key back (`Source::visit` in embedded.rs): `list` is for start-up and resync, not the
//! hot path, which uses `get`/`put`/`delete`.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use super::{Revision, StoreError};

/// Where a key, its revisions and its value are.
pub(super) enum Place {
    /// Memory-only store, or a change whose journal write failed.
    Mem(Box<MemEntry>),
    /// In the journal: the value's `len` bytes at byte `at` (file offset, or past the file's
    /// end: not written yet), right after the key's `klen` bytes (and before them the
    /// revisions, see `journal::put_revisions_back`).
    Journal { at: u64, len: u32, klen: u16 },
}

pub(super) struct MemEntry {
    pub key: Box<str>,
    pub value: Box<[u8]>,
    pub create: Revision,
    pub modified: Revision,
}

/// What the index holds per key.
pub(super) type Stored = Place;

impl Place {
    pub fn value_len(&self) -> usize {
        match self {
            Place::Mem(m) => m.value.len(),
            Place::Journal { len, .. } => *len as usize,
        }
    }
}

/// The map's keys are already uniformly spread (SipHash outputs): used as they are.
#[derive(Default)]
pub(super) struct Fold(u64);

impl Hasher for Fold {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Where a key is, or would go (see [`Index::find`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Spot {
    /// Under its hash in the main map (present or not).
    Main(u64),
    /// Its hash is another key's: in `collided`, by the key itself.
    Collided,
}

/// See the module doc.
#[derive(Default)]
pub(super) struct Index {
    main: HashMap<u64, Stored, BuildHasherDefault<Fold>>,
    /// Keys whose hash another key holds in `main`. Invariant: each one's hash is in `main`
    /// (a removal from `main` promotes a collided key of the same hash).
    collided: HashMap<Box<str>, Stored>,
    keys: std::hash::RandomState,
}

impl Index {
    fn hash(&self, key: &str) -> u64 {
        self.keys.hash_one(key)
    }

    /// Where `key` is or would go, and its entry if present; `is` tells whether a stored
    /// entry's key is `key` (read back from the journal when not in memory).
    pub fn find(
        &self,
        key: &str,
        is: impl Fn(&Stored) -> Result<bool, StoreError>,
    ) -> Result<(Spot, Option<&Stored>), StoreError> {
        let h = self.hash(key);
        match self.main.get(&h) {
            None => Ok((Spot::Main(h), None)),
            Some(s) if is(s)? => Ok((Spot::Main(h), Some(s))),
            Some(_) => Ok((Spot::Collided, self.collided.get(key))),
        }
    }

    /// Puts `s` at `spot` (from [`Index::find`] of the same key, with no change in between);
    /// returns the entry it replaces.
    pub fn put_at(&mut self, key: &str, spot: Spot, s: Stored) -> Option<Stored> {
        match spot {
            Spot::Main(h) => self.main.insert(h, s),
            Spot::Collided => self.collided.insert(key.into(), s),
        }
    }

    /// Removes the entry at `spot` (from [`Index::find`] of the same key).
    pub fn remove_at(&mut self, key: &str, spot: Spot) -> Option<Stored> {
        match spot {
            Spot::Main(h) => {
                let old = self.main.remove(&h)?;
                let heir = self.collided.keys().find(|k| self.hash(k) == h).cloned();
                if let Some(s) = heir.and_then(|k| self.collided.remove(&k)) {
                    self.main.insert(h, s);
                }
                Some(old)
            }
            Spot::Collided => self.collided.remove(key),
        }
    }

    /// Adds a key known to be absent (loading a journal whose keys are already distinct).
    pub fn insert_new(&mut self, key: &str, s: Stored) {
        match self.main.entry(self.hash(key)) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(key.into(), s);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(s);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.main.len() + self.collided.len()
    }

    /// Every entry, in an order that stays the same while the index is not changed.
    pub fn values(&self) -> impl Iterator<Item = &Stored> {
        self.main.values().chain(self.collided.values())
    }

    /// Every entry, in the order of [`Index::values`].
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Stored> {
        self.main.values_mut().chain(self.collided.values_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(key: &str, v: u8) -> Stored {
        Place::Mem(Box::new(MemEntry {
            key: key.into(),
            value: vec![v].into(),
            create: 1,
            modified: 1,
        }))
    }

    fn key_of(s: &Stored) -> &str {
        match s {
            Place::Mem(m) => &m.key,
            Place::Journal { .. } => "",
        }
    }

    fn value(ix: &Index, key: &str) -> Option<u8> {
        let (_, s) = ix.find(key, |s| Ok(key_of(s) == key)).expect("find");
        match s? {
            Place::Mem(m) => m.value.first().copied(),
            Place::Journal { .. } => None,
        }
    }

    fn put(ix: &mut Index, key: &str, v: u8) -> bool {
        let (spot, _) = ix.find(key, |s| Ok(key_of(s) == key)).expect("find");
        ix.put_at(key, spot, mem(key, v)).is_some()
    }

    fn remove(ix: &mut Index, key: &str) -> bool {
        let (spot, s) = ix.find(key, |s| Ok(key_of(s) == key)).expect("find");
        s.is_some() && ix.remove_at(key, spot).is_some()
    }

    /// Two slots per foreign subscription (its record and its consent approval).
    #[test]
    fn a_slot_is_a_hash_and_a_place() {
        assert_eq!(std::mem::size_of::<(u64, Stored)>(), 24);
    }

    #[test]
    fn keys_are_found_replaced_and_removed() {
        let mut ix = Index::default();
        assert!(!put(&mut ix, "a", 1));
        assert!(!put(&mut ix, "b", 2));
        assert!(put(&mut ix, "a", 3), "same key: replaced");
        assert_eq!(
            (value(&ix, "a"), value(&ix, "b"), value(&ix, "c")),
            (Some(3), Some(2), None)
        );
        assert_eq!(ix.len(), 2);
        assert!(remove(&mut ix, "a") && !remove(&mut ix, "a"));
        assert_eq!((value(&ix, "a"), value(&ix, "b")), (None, Some(2)));
    }

    #[test]
    fn keys_sharing_a_hash_stay_apart_and_the_survivor_is_promoted() {
        let mut ix = Index::default();
        // `z` sits under the hash of `y`, as a collision of 64 bits would place it.
        let h = ix.hash("y");
        ix.main.insert(h, mem("z", 1));
        let (spot, s) = ix.find("y", |s| Ok(key_of(s) == "y")).expect("find");
        assert!(s.is_none() && spot == Spot::Collided);
        assert!(!put(&mut ix, "y", 2));
        assert_eq!(value(&ix, "y"), Some(2));
        assert!(
            put(&mut ix, "y", 3),
            "the collided key is replaced, not added again"
        );
        assert_eq!((ix.len(), value(&ix, "y")), (2, Some(3)));
        // `z` leaves: `y` takes its place under the hash and is still found.
        ix.remove_at("z", Spot::Main(h));
        assert!(ix.collided.is_empty());
        let (spot, s) = ix.find("y", |s| Ok(key_of(s) == "y")).expect("find");
        assert_eq!(spot, Spot::Main(h));
        assert!(s.is_some());
        assert!(remove(&mut ix, "y"));
        assert_eq!(ix.len(), 0);
    }

    #[test]
    fn a_read_error_while_confirming_a_key_is_returned() {
        let mut ix = Index::default();
        assert!(!put(&mut ix, "a", 1));
        let r = ix.find("a", |_| Err(StoreError::Closed));
        assert!(matches!(r, Err(StoreError::Closed)));
    }
}
