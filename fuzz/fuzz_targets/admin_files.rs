//! Admin-edited files: arbitrary text as a mapping table, a mapping system file and a node
//! configuration. Loading must answer with diagnostics (each with a position inside the text)
//! or a valid value, never panic.
#![no_main]

use legate::config::{self, BUILTIN_SYSTEMS};
use legate::presence::map::{defaults, MappingSet};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count().max(1);

    for rel in ["tables/99-fuzz.toml", "systems/fuzz.toml"] {
        let mut files = defaults::source_files();
        files.push(legate::presence::map::SourceFile {
            path: Path::new("fuzz").join(rel),
            rel: rel.to_string(),
            text: text.to_string(),
        });
        if let Err(d) = MappingSet::build(&files) {
            for diag in &d.0 {
                if diag.file.starts_with("fuzz") {
                    assert!(diag.line <= lines + 1, "{diag} is outside the input");
                }
            }
        }
    }

    if let Err(d) = config::from_toml(text, Path::new("fuzz.toml"), BUILTIN_SYSTEMS) {
        assert!(!d.0.is_empty());
        for diag in &d.0 {
            assert!(diag.line <= lines + 1, "{diag} is outside the input");
        }
    }
});
