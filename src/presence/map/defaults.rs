//! The default mapping files, compiled into the binary from `mappings/` so that a fresh
//! install (and `legate translate` without `--mappings`) has the seed's ten tables.

use super::set::SourceFile;
use std::path::PathBuf;

macro_rules! files {
    ($($rel:literal),* $(,)?) => {
        /// `(path relative to mappings/, contents)` of every default mapping file.
        pub const FILES: &[(&str, &str)] = &[
            $(($rel, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/mappings/", $rel))),)*
        ];
    };
}

files!(
    "canonical.toml",
    "systems/fed-jabber8.toml",
    "systems/fed-xmpp.toml",
    "systems/jabber8.toml",
    "systems/lync.toml",
    "systems/ocs.toml",
    "systems/sametime.toml",
    "systems/webex.toml",
    "systems/xmpp.toml",
    "tables/01-ocs.toml",
    "tables/02-jabber8-to-ocs.toml",
    "tables/03-xmpp-to-ocs.toml",
    "tables/04-lync.toml",
    "tables/05-jabber8-to-lync.toml",
    "tables/06-xmpp-to-lync.toml",
    "tables/07-sametime.toml",
    "tables/08-webex.toml",
    "tables/09-jabber8-to-federated.toml",
    "tables/10-xmpp-to-federated.toml",
);

pub fn source_files() -> Vec<SourceFile> {
    FILES
        .iter()
        .map(|(rel, text)| SourceFile {
            path: PathBuf::from(format!("<embedded>/mappings/{rel}")),
            rel: (*rel).to_string(),
            text: (*text).to_string(),
        })
        .collect()
}
