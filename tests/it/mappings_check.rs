//! `legate check --mappings DIR` on broken copies of `mappings/`: each kind of problem is found
//! and reported as `file:line:col: message` on stderr with exit 1. Also: a live reload keeps
//! the last good set when an edit is invalid.

use legate::presence::map::MappingStore;
use std::path::{Path, PathBuf};
use std::process::Command;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copy");
        }
    }
}

fn fresh_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("mappings");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"),
        &dir,
    );
    (tmp, dir)
}

/// Replaces the first occurrence of `from` in `file` (which must exist) by `to`.
fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let p = dir.join(file);
    let text = std::fs::read_to_string(&p).expect("read");
    assert!(text.contains(from), "{file} does not contain {from:?}");
    std::fs::write(&p, text.replacen(from, to, 1)).expect("write");
}

fn line_of(dir: &Path, file: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(dir.join(file)).expect("read");
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle")
        + 1
}

/// Runs `legate check --mappings dir`; returns the stderr lines.
fn check(dir: &Path) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("check")
        .arg("--mappings")
        .arg(dir)
        .output()
        .expect("run legate");
    let err = String::from_utf8(out.stderr).expect("utf-8");
    if err.is_empty() {
        assert_eq!(out.status.code(), Some(0));
    } else {
        assert_eq!(out.status.code(), Some(1), "{err}");
    }
    err.lines().map(str::to_string).collect()
}

/// Asserts exactly one problem, in `file` at `line`, whose message contains `msg`.
fn assert_one(lines: &[String], dir: &Path, file: &str, line: usize, msg: &str) {
    assert_eq!(lines.len(), 1, "expected one problem, got {lines:#?}");
    let prefix = format!("{}:{line}:", dir.join(file).display());
    assert!(
        lines[0].starts_with(&prefix),
        "expected {prefix}..., got {}",
        lines[0]
    );
    let rest = &lines[0][prefix.len()..];
    let (col, message) = rest.split_once(": ").expect("col: message");
    assert!(
        col.parse::<usize>().is_ok_and(|c| c >= 1),
        "column in {}",
        lines[0]
    );
    assert!(message.contains(msg), "expected {msg:?} in {}", lines[0]);
}

#[test]
fn shipped_mappings_are_valid() {
    let (_t, dir) = fresh_copy();
    assert!(check(&dir).is_empty());
    // And without --mappings (embedded defaults).
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("check")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_state_in_a_row() {
    let (_t, dir) = fresh_copy();
    edit(
        &dir,
        "tables/04-lync.toml",
        "from = \"be_right_back\"",
        "from = \"be_rigth_back\"",
    );
    let line = line_of(&dir, "tables/04-lync.toml", "be_rigth_back");
    assert_one(
        &check(&dir),
        &dir,
        "tables/04-lync.toml",
        line,
        "unknown state `be_rigth_back` of system `lync`; valid:",
    );
}

#[test]
fn unknown_state_in_a_target_cell() {
    let (_t, dir) = fresh_copy();
    edit(
        &dir,
        "tables/08-webex.toml",
        "xmpp = \"do_not_disturb\"",
        "xmpp = \"dnd\"",
    );
    let line = line_of(&dir, "tables/08-webex.toml", "xmpp = \"dnd\"");
    assert_one(
        &check(&dir),
        &dir,
        "tables/08-webex.toml",
        line,
        "unknown state `dnd` of system `xmpp`",
    );
}

#[test]
fn duplicate_row() {
    let (_t, dir) = fresh_copy();
    let f = "tables/02-jabber8-to-ocs.toml";
    let p = dir.join(f);
    let mut text = std::fs::read_to_string(&p).expect("read");
    text.push_str("\n[[row]]\nfrom = \"busy\"\nto = { ocs = \"busy\" }\n");
    std::fs::write(&p, text).expect("write");
    let total = std::fs::read_to_string(&p).expect("read").lines().count();
    let first = line_of(&dir, f, "from = \"busy\"");
    assert_one(
        &check(&dir),
        &dir,
        f,
        total - 1,
        &format!("duplicate row: `busy` is already mapped at line {first}"),
    );
}

#[test]
fn contradicting_rows() {
    let (_t, dir) = fresh_copy();
    let f = "tables/02-jabber8-to-ocs.toml";
    let p = dir.join(f);
    let mut text = std::fs::read_to_string(&p).expect("read");
    text.push_str("\n[[row]]\nfrom = \"busy\"\nto = { ocs = \"away\" }\n");
    std::fs::write(&p, text).expect("write");
    let total = std::fs::read_to_string(&p).expect("read").lines().count();
    assert_one(
        &check(&dir),
        &dir,
        f,
        total - 1,
        "contradicting rows: `busy` is mapped differently at line",
    );
}

#[test]
fn contradicting_tables_for_the_same_pair() {
    let (_t, dir) = fresh_copy();
    let text = std::fs::read_to_string(dir.join("tables/06-xmpp-to-lync.toml")).expect("read");
    std::fs::write(
        dir.join("tables/11-extra.toml"),
        text.replace("Table 6", "Table 11"),
    )
    .expect("write");
    let line = line_of(&dir, "tables/11-extra.toml", "to = [\"lync\"]");
    assert_one(
        &check(&dir),
        &dir,
        "tables/11-extra.toml",
        line,
        "contradicting tables:",
    );
}

#[test]
fn table_not_total() {
    let (_t, dir) = fresh_copy();
    edit(
        &dir,
        "tables/03-xmpp-to-ocs.toml",
        "fallback = \"canonical\"\n",
        "",
    );
    let line = line_of(&dir, "tables/03-xmpp-to-ocs.toml", "from = \"xmpp\"");
    assert_one(
        &check(&dir),
        &dir,
        "tables/03-xmpp-to-ocs.toml",
        line,
        "table is not total: no row for state chat of system `xmpp`",
    );
}

#[test]
fn unknown_system() {
    let (_t, dir) = fresh_copy();
    edit(
        &dir,
        "tables/09-jabber8-to-federated.toml",
        "\"sametime\"]",
        "\"lotus\"]",
    );
    let line = line_of(&dir, "tables/09-jabber8-to-federated.toml", "\"lotus\"]");
    assert_one(
        &check(&dir),
        &dir,
        "tables/09-jabber8-to-federated.toml",
        line,
        "unknown system `lotus`; valid:",
    );
}

#[test]
fn unknown_field_and_syntax_errors_have_positions() {
    let (_t, dir) = fresh_copy();
    edit(
        &dir,
        "systems/webex.toml",
        "protocol = \"xmpp\"",
        "protocol = \"xmpp\"\ncolour = \"blue\"",
    );
    let line = line_of(&dir, "systems/webex.toml", "colour");
    assert_one(
        &check(&dir),
        &dir,
        "systems/webex.toml",
        line,
        "unknown field `colour`",
    );

    let (_t, dir) = fresh_copy();
    edit(
        &dir,
        "tables/01-ocs.toml",
        "from = \"away\"",
        "from = \"away",
    );
    let line = line_of(&dir, "tables/01-ocs.toml", "from = \"away");
    let lines = check(&dir);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!(
            "{}:{line}:",
            dir.join("tables/01-ocs.toml").display()
        )),
        "{lines:?}"
    );
}

#[test]
fn system_rules_must_be_total() {
    let (_t, dir) = fresh_copy();
    edit(
        &dir,
        "systems/sametime.toml",
        "available_idle = \"idle\"\n",
        "",
    );
    let line = line_of(&dir, "systems/sametime.toml", "[from_canonical]");
    assert_one(
        &check(&dir),
        &dir,
        "systems/sametime.toml",
        line,
        "no state for canonical available_idle",
    );

    let (_t, dir) = fresh_copy();
    edit(
        &dir,
        "systems/xmpp.toml",
        "[[decode]]\nmatch = {}\nstate = \"available\"\n",
        "",
    );
    let line = line_of(&dir, "systems/xmpp.toml", "name = \"xmpp\"");
    assert_one(
        &check(&dir),
        &dir,
        "systems/xmpp.toml",
        line,
        "decode rules of system `xmpp` are not total",
    );
}

#[test]
fn several_problems_are_all_reported() {
    let (_t, dir) = fresh_copy();
    edit(
        &dir,
        "tables/04-lync.toml",
        "from = \"be_right_back\"",
        "from = \"brb\"",
    );
    edit(
        &dir,
        "tables/07-sametime.toml",
        "jabber8 = \"away\"",
        "jabber8 = \"gone\"",
    );
    edit(
        &dir,
        "systems/ocs.toml",
        "canonical = \"busy_idle\"",
        "canonical = \"busyish\"",
    );
    let lines = check(&dir);
    assert_eq!(lines.len(), 3, "{lines:#?}");
}

#[test]
fn reload_swaps_valid_edits_and_keeps_the_last_good_set() {
    let (_t, dir) = fresh_copy();
    let store = MappingStore::open(Some(dir.clone())).expect("open");
    let away_for = |store: &MappingStore| {
        let set = store.current();
        let (l, x) = (
            set.system_id("lync").expect("lync"),
            set.system_id("xmpp").expect("xmpp"),
        );
        let t = set.translate(l, x, set.system(l).state_id("busy").expect("busy"), None);
        (
            set.system(x).state(t.state).name.clone(),
            t.note.map(|n| n.into_owned()),
        )
    };
    assert_eq!(away_for(&store), ("away".into(), Some("Busy".into())));
    let before = store.current();

    // A broken edit: the reload fails and the set in use does not change.
    edit(
        &dir,
        "tables/04-lync.toml",
        "note = \"Busy\"",
        "note = \"Occupied\"",
    );
    edit(
        &dir,
        "tables/04-lync.toml",
        "from = \"away\"",
        "from = \"awya\"",
    );
    let err = store.reload().expect_err("invalid edit must be refused");
    assert!(err.to_string().contains("awya"), "{err}");
    assert!(std::sync::Arc::ptr_eq(&before, &store.current()));
    assert_eq!(away_for(&store), ("away".into(), Some("Busy".into())));

    // Fixing it swaps the new set in, whole.
    edit(
        &dir,
        "tables/04-lync.toml",
        "from = \"awya\"",
        "from = \"away\"",
    );
    store.reload().expect("valid edit");
    assert_eq!(away_for(&store), ("away".into(), Some("Occupied".into())));
    // A reader that kept the old snapshot still sees the old table.
    let (l, x) = (
        before.system_id("lync").expect("lync"),
        before.system_id("xmpp").expect("xmpp"),
    );
    let t = before.translate(l, x, before.system(l).state_id("busy").expect("busy"), None);
    assert_eq!(t.note.as_deref(), Some("Busy"));
}
