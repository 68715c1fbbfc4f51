//! Golden test: every row of the ten tables in the seed (tests/data/availability-tables.md, a
//! copy of shared/spec/availability-tables.md) goes through the real `legate translate` binary
//! with the embedded defaults. The expectations are read from the Markdown, not from
//! `mappings/`, so an edit of the shipped files that drifts from the seed fails here.

use std::process::Command;

#[derive(Debug)]
struct Cell {
    state: String,
    note: Option<String>,
    /// "(with the status message)": the user's own text must come through.
    keeps_user_text: bool,
}

fn parse_cell(s: &str) -> Cell {
    let s = s.trim();
    let state = s
        .split('`')
        .nth(1)
        .unwrap_or_else(|| panic!("no `state` in cell {s:?}"))
        .to_string();
    let note = s
        .split("(note \"")
        .nth(1)
        .map(|rest| rest.split('"').next().unwrap_or("").to_string());
    Cell {
        state,
        note,
        keeps_user_text: s.contains("with the status message"),
    }
}

/// (table number, source system, target systems, rows of (source cell, target cells)).
type Table = (usize, String, Vec<String>, Vec<(Cell, Vec<Cell>)>);

fn tables() -> Vec<Table> {
    let md = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/availability-tables.md"
    ))
    .expect("read tables");
    let mut out = Vec::new();
    let mut lines = md.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("## Table ") else {
            continue;
        };
        let num: usize = rest
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("table number");
        // Skip to the header row.
        let header = loop {
            let l = lines.next().expect("table header");
            if l.starts_with('|') {
                break l;
            }
        };
        let cols: Vec<String> = header
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        lines.next(); // |---|
        let mut rows = Vec::new();
        while let Some(l) = lines.peek() {
            if !l.starts_with('|') {
                break;
            }
            let cells: Vec<&str> = l.trim_matches('|').split('|').collect();
            rows.push((
                parse_cell(cells[0]),
                cells[1..].iter().map(|c| parse_cell(c)).collect(),
            ));
            lines.next();
        }
        out.push((num, cols[0].clone(), cols[1..].to_vec(), rows));
    }
    out
}

fn translate(from: &str, to: &str, state: &str, note: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_legate"));
    cmd.args(["translate", "--from", from, "--to", to, state]);
    if let Some(n) = note {
        cmd.args(["--note", n]);
    }
    let out = cmd.output().expect("run legate");
    assert!(
        out.status.success(),
        "legate translate {from} {to} {state}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(
        stdout.lines().count(),
        1,
        "exactly one JSON object: {stdout}"
    );
    serde_json::from_str(&stdout).expect("json")
}

#[test]
fn every_row_of_the_ten_tables() {
    let tables = tables();
    assert_eq!(tables.len(), 10, "the seed has ten tables");
    let mut checked = 0;
    for (num, from, targets, rows) in &tables {
        assert!(!rows.is_empty(), "table {num} has rows");
        for (src, cells) in rows {
            for (to, want) in targets.iter().zip(cells) {
                let v = translate(from, to, &src.state, src.note.as_deref());
                let ctx = format!("table {num}: {from}:{} -> {to}", src.state);
                assert_eq!(v["from"], from.as_str(), "{ctx}");
                assert_eq!(v["to"], to.as_str(), "{ctx}");
                assert_eq!(v["input"], src.state.as_str(), "{ctx}");
                assert_eq!(v["state"], want.state.as_str(), "{ctx}");
                assert_eq!(v["note"].as_str(), want.note.as_deref(), "{ctx}");
                let path = v["path"].as_array().expect("path");
                assert!(
                    path.iter().any(|p| p
                        .as_str()
                        .is_some_and(|p| p.starts_with(&format!("Table {num}:")))),
                    "{ctx}: the row of table {num} must be the route taken, got {path:?}"
                );
                if want.keeps_user_text {
                    let v = translate(from, to, &src.state, Some("Back at 3"));
                    assert_eq!(
                        v["note"], "Back at 3",
                        "{ctx}: the user's status message survives"
                    );
                }
                checked += 1;
            }
        }
    }
    // 6*2 + 4 + 5 + 6*2 + 4 + 5 + 5*2 + 5*2 + 5*4 + 6*4 = 106 cells in the seed.
    assert_eq!(checked, 106);
}

#[test]
fn unknown_system_or_state_exits_2_listing_valid_names() {
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["translate", "--from", "lync", "--to", "xmpp", "lunch"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown state `lunch`") && err.contains("be_right_back"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["translate", "--from", "msn", "--to", "xmpp", "away"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown source system `msn`") && err.contains("sametime"),
        "{err}"
    );
}

#[test]
fn raw_availability_numbers_follow_the_lync_ranges() {
    for (n, lync_state, xmpp_state, note) in [
        (0u32, "available", "available", None),
        (3500, "available", "available", None),
        (4499, "available", "available", None),
        (4500, "available_idle", "away", Some("Idle")),
        (6500, "busy", "away", Some("Busy")),
        (7500, "busy_idle", "away", Some("Busy")),
        (9000, "do_not_disturb", "away", Some("Busy")),
        (12000, "be_right_back", "away", None),
        (15500, "away", "away", None),
        (18000, "offline", "offline", None),
        (4_000_000_000, "offline", "offline", None),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_legate"))
            .args([
                "translate",
                "--from",
                "lync",
                "--to",
                "xmpp",
                "--availability",
                &n.to_string(),
            ])
            .output()
            .expect("run");
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(v["input"], format!("availability={n}"));
        assert_eq!(v["state"], xmpp_state, "availability {n}");
        assert_eq!(v["note"].as_str(), note, "availability {n}");
        let first = v["path"][0].as_str().expect("path");
        assert!(
            first.contains(&format!("-> {lync_state} ")),
            "availability {n}: {first}"
        );
    }
}

#[test]
fn mappings_show_prints_aligned_tables_and_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["mappings", "show", "--from", "lync", "--to", "xmpp"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let busy = text
        .lines()
        .find(|l| l.starts_with("busy "))
        .expect("a busy row");
    let cols: Vec<&str> = busy
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cols[1], "away (note \"Busy\")", "{text}");
    assert!(cols[2].starts_with("Table 4:"), "{text}");
    // Aligned: every row starts its second column at the same offset as the header's.
    let header = text
        .lines()
        .find(|l| l.starts_with("lync ") && l.ends_with("via"))
        .expect("header");
    assert_eq!(header.find("xmpp"), busy.find("away (note"), "{text}");
    assert_eq!(header.find("via"), busy.find("Table 4:"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["mappings", "show", "--format", "json"])
        .output()
        .expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["tables"].as_array().map(Vec::len), Some(10));
}
