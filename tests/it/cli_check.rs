//! `legate check --config FILE`: the configuration is checked against the systems of the
//! mapping set it will run with, and problems come out as `file:line:col: message`.

use legate::config::{self, BUILTIN_SYSTEMS};
use legate::presence::map;
use std::process::Command;

fn check(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("check")
        .args(args)
        .output()
        .expect("run legate");
    (
        out.status.code(),
        String::from_utf8(out.stderr).expect("utf-8"),
    )
}

#[test]
fn the_example_configuration_is_valid() {
    let (code, err) = check(&[
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/legate.example.toml"),
    ]);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_domain_federated_over_sip_and_xmpp_is_refused_with_its_position() {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/config/bad/sip_xmpp_overlap.toml"
    );
    let (code, err) = check(&["--config", file]);
    assert_eq!(code, Some(1));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with(&format!("{file}:11:8: domain `partner.com`")),
        "{err}"
    );
    assert!(lines[0].contains("never both"), "{err}");
}

#[test]
fn config_and_mapping_problems_are_reported_together() {
    let tmp = tempfile::tempdir().expect("tmp");
    let maps = tmp.path().join("mappings");
    std::fs::create_dir_all(maps.join("systems")).expect("mkdir");
    std::fs::create_dir_all(maps.join("tables")).expect("mkdir");
    std::fs::write(
        maps.join("canonical.toml"),
        "states = [\"available\", \"available\"]\n",
    )
    .expect("write");
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/config/bad/unknown_system.toml"
    );
    let (code, err) = check(&[
        "--config",
        file,
        "--mappings",
        maps.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("canonical.toml:1:24: duplicate canonical state `available`"),
        "{err}"
    );
    assert!(
        err.contains("unknown_system.toml:7:10: unknown system `skype`"),
        "{err}"
    );
}

#[test]
fn builtin_system_kinds_agree_with_the_shipped_mapping_files() {
    let set = map::embedded().expect("defaults");
    let mut from_files = config::systems_from_mappings(&set);
    from_files.sort_by_key(|(n, _)| *n);
    let mut builtin = BUILTIN_SYSTEMS.to_vec();
    builtin.sort_by_key(|(n, _)| *n);
    assert_eq!(from_files, builtin);
}

#[test]
fn a_system_added_in_the_configured_mapping_dir_may_be_named_by_the_configuration() {
    let tmp = tempfile::tempdir().expect("tmp");
    let maps = tmp.path().join("maps");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
    for sub in ["", "systems", "tables"] {
        std::fs::create_dir_all(maps.join(sub)).expect("mkdir");
        for e in std::fs::read_dir(root.join(sub)).expect("read") {
            let e = e.expect("entry");
            if e.file_type().expect("type").is_file() {
                std::fs::copy(e.path(), maps.join(sub).join(e.file_name())).expect("copy");
            }
        }
    }
    // A new federated SIP system, a copy of lync under another name.
    let lync = std::fs::read_to_string(maps.join("systems/lync.toml")).expect("read");
    std::fs::write(
        maps.join("systems/skype.toml"),
        lync.replace("name = \"lync\"", "name = \"skype\""),
    )
    .expect("write");
    let cfg = tmp.path().join("legate.toml");
    std::fs::write(
        &cfg,
        "[[local_domain]]\nname = \"example.com\"\n[[sip.federated_domain]]\nname = \"partner.com\"\n\
         system = \"skype\"\n[mappings]\ndir = \"maps\"\n",
    )
    .expect("write");
    let (code, err) = check(&["--config", cfg.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{err}");

    // Without the directory, `skype` is unknown.
    std::fs::write(
        &cfg,
        "[[local_domain]]\nname = \"example.com\"\n[[sip.federated_domain]]\nname = \"partner.com\"\n\
         system = \"skype\"\n",
    )
    .expect("write");
    let (code, err) = check(&["--config", cfg.to_str().expect("utf-8")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown system `skype`"), "{err}");
}
