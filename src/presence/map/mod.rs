//! Availability mapping: systems, their states and the tables between them, all loaded from
//! the admin-editable files under `mappings/` (nothing about a system is hard-coded here).
//!
//! - `spec`: the file schema as written.
//! - `set`: validation and the immutable, pre-resolved `MappingSet`.
//! - `translate`: state → state, wire facts → state, state → wire values.
//! - `defaults`: the shipped files, embedded in the binary.
//! - `MappingStore`: the live set, swapped whole on reload; a broken edit keeps the last good set.

pub mod defaults;
pub mod set;
pub mod spec;
pub mod translate;

pub use set::{MappingSet, SourceFile, StateId, SystemId, Via};
pub use spec::{Protocol, Role};
pub use translate::{Decoded, Facts, Translation};

use crate::diag::Diagnostics;
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Builds the default set shipped in the binary.
pub fn embedded() -> Result<MappingSet, Diagnostics> {
    MappingSet::build(&defaults::source_files())
}

/// Loads and validates the mapping directory `dir`.
pub fn load_dir(dir: &Path) -> Result<MappingSet, Diagnostics> {
    MappingSet::build(&set::read_dir(dir)?)
}

/// The mapping set in use. Readers take a snapshot (`current()`) and keep it for the whole
/// message they handle, so a reload never changes a translation half-way.
pub struct MappingStore {
    dir: Option<PathBuf>,
    current: ArcSwap<MappingSet>,
    /// Set once a cluster subordinate runs its primary's set ([`MappingStore::pin`]): the
    /// local files no longer apply, so [`MappingStore::reload`] keeps what is pinned.
    pinned: std::sync::atomic::AtomicBool,
}

impl MappingStore {
    /// Loads from `dir`, or the embedded defaults when `dir` is `None`.
    pub fn open(dir: Option<PathBuf>) -> Result<Self, Diagnostics> {
        let set = match &dir {
            Some(d) => load_dir(d)?,
            None => embedded()?,
        };
        Ok(Self {
            dir,
            current: ArcSwap::from_pointee(set),
            pinned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn current(&self) -> Arc<MappingSet> {
        self.current.load_full()
    }

    /// Re-reads the files and swaps the new set in when, and only when, it is valid.
    pub fn reload(&self) -> Result<(), Diagnostics> {
        if self.pinned.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let set = match &self.dir {
            Some(d) => load_dir(d)?,
            None => embedded()?,
        };
        self.current.store(Arc::new(set));
        Ok(())
    }

    /// Whether a set from elsewhere is pinned (see [`MappingStore::pin`]).
    pub fn is_pinned(&self) -> bool {
        self.pinned.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Swaps in a set validated elsewhere (a cluster primary's) and keeps it over the local
    /// files from now on.
    pub fn pin(&self, set: MappingSet) {
        self.pinned.store(true, std::sync::atomic::Ordering::SeqCst);
        self.current.store(Arc::new(set));
    }
}
