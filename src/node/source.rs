//! Where the node's configuration comes from: the file `legate run --config` names (or the
//! embedded default) and the mapping directory (`--mappings`, else the file's `[mappings]
//! dir`, else the shipped tables). Read the same way at start and at every reload, so a
//! reload can never accept what a start would refuse.

use crate::config::{self, Config};
use crate::diag::Diagnostics;
use crate::presence::map;
use std::path::{Path, PathBuf};

/// The files a node was started from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSource {
    /// `None`: the embedded single-node default.
    pub path: Option<PathBuf>,
    /// `--mappings`, which overrides the file's `[mappings] dir`.
    pub mappings: Option<PathBuf>,
}

impl ConfigSource {
    /// The mapping directory in effect (`None`: the shipped tables).
    pub fn mappings_dir(&self) -> Option<PathBuf> {
        self.mappings
            .clone()
            .or_else(|| self.path.as_deref().and_then(configured_mappings_dir))
    }

    /// Reads and validates everything; binds nothing.
    pub fn load(&self) -> Result<Config, Diagnostics> {
        self.load_against(self.mappings_dir().as_deref())
    }

    /// The configuration file checked against the mapping set of `dir` (`None`: the shipped
    /// tables), which it then names: a reload checks it against the set the node runs with,
    /// whatever the file now says about `[mappings] dir` (a restart-only key).
    pub fn load_against(&self, dir: Option<&Path>) -> Result<Config, Diagnostics> {
        let set = match dir {
            Some(d) => map::load_dir(d)?,
            None => map::embedded()?,
        };
        let mut cfg = match &self.path {
            Some(p) => config::load_file(p, &config::systems_from_mappings(&set))?,
            None => config::embedded_default(),
        };
        cfg.mappings.dir = dir.map(Path::to_path_buf);
        Ok(cfg)
    }

    /// What alarms and logs name as the configuration.
    pub fn display(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "<embedded default>".into(), |p| p.display().to_string())
    }
}

/// `[mappings] dir` of a configuration file, resolved against the file's directory, read
/// leniently (the full validation reports any problem with it).
pub fn configured_mappings_dir(config: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(config).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    let dir = table.get("mappings")?.get("dir")?.as_str()?;
    let dir = Path::new(dir);
    Some(match config.parent() {
        Some(base) if dir.is_relative() => base.join(dir),
        _ => dir.to_path_buf(),
    })
}
