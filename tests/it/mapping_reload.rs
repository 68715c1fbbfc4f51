//! The running gateway reloads edited mapping files without a restart: the real `legate run`
//! binary watches a copy of `mappings/`; a valid edit becomes the set in use (its digest shows
//! in `/status`), an invalid edit is refused with its `file:line:col` problems and the last good
//! set stays in use.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::legate::Legate;

const WAIT: Duration = Duration::from_secs(15);

pub(crate) fn copy_dir(src: &Path, dst: &Path) {
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

fn status(admin: SocketAddr) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).expect("admin");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let body = out.split("\r\n\r\n").nth(1).expect("body");
    serde_json::from_str(body).expect("json")
}

/// Polls `/status` until `pred` holds for its `mappings` section.
fn wait_for(
    admin: SocketAddr,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = std::time::Instant::now();
    loop {
        let st = status(admin);
        if pred(&st["mappings"]) {
            return st;
        }
        assert!(t0.elapsed() < WAIT, "{what}: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn edits_are_swapped_in_and_broken_edits_keep_the_last_good_set() {
    let dir = tempfile::tempdir().expect("tmp");
    let maps = dir.path().join("mappings");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"),
        &maps,
    );
    let cfg = dir.path().join("legate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[[local_domain]]\nname = \"example.com\"\n\
             [listeners]\nsip_tls = \"off\"\nxmpp_s2s = \"off\"\n[mappings]\ndir = \"{}\"\nreload = true\n",
            maps.display()
        ),
    )
    .expect("config");
    let legate = Legate::start(&cfg, &["admin"]).unwrap_or_else(|e| panic!("{e:#}"));
    let admin = legate.addr("admin");
    let first = wait_for(admin, "the reloader reports", |m| m["reloads"] == 0);
    let digest0 = first["mappings"]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    assert_eq!(first["mapping_digest"], digest0.as_str());

    // A valid edit: Lync busy shows as "Occupied" to XMPP users from now on.
    let table = maps.join("tables/04-lync.toml");
    let text = std::fs::read_to_string(&table).expect("read");
    std::fs::write(
        &table,
        text.replacen("note = \"Busy\"", "note = \"Occupied\"", 1),
    )
    .expect("write");
    let st = wait_for(admin, "valid edit swapped in", |m| m["reloads"] == 1);
    let digest1 = st["mappings"]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    assert_ne!(digest1, digest0);
    assert_eq!(st["mappings"]["refused"], 0);

    // A broken edit (unknown state): refused with its position; the previous set stays.
    let text = std::fs::read_to_string(&table).expect("read");
    std::fs::write(
        &table,
        text.replacen("from = \"away\"", "from = \"awya\"", 1),
    )
    .expect("write");
    let st = wait_for(admin, "broken edit refused", |m| m["refused"] == 1);
    assert_eq!(
        st["mappings"]["digest"],
        digest1.as_str(),
        "the last good set stays in use"
    );
    let problems = st["mappings"]["last_refused"].as_array().expect("problems");
    let line = std::fs::read_to_string(&table)
        .expect("read")
        .lines()
        .position(|l| l.contains("awya"))
        .expect("edited line")
        + 1;
    assert!(
        problems.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.contains(&format!("04-lync.toml:{line}:"))
                && p.contains("unknown state `awya`"))),
        "{problems:?}"
    );
    assert_eq!(st["mappings"]["reloads"], 1);
}
