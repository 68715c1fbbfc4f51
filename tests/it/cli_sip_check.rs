//! `legate sip check` over every RFC 4475 / RFC 5118 vector, through the real binary: the JSON
//! verdict per file follows each folder's index.tsv, and `--print` gives back the bytes of every
//! accepted message.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Vector {
    path: PathBuf,
    expected: String,
}

fn vectors() -> Vec<Vector> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sip");
    let mut out = Vec::new();
    for folder in ["rfc4475", "rfc5118"] {
        let index = std::fs::read_to_string(root.join(folder).join("index.tsv")).expect("index");
        for line in index.lines().skip(1) {
            let cols: Vec<&str> = line.split('\t').collect();
            out.push(Vector {
                path: root.join(folder).join(cols[0]),
                expected: cols[1].to_string(),
            });
        }
    }
    out
}

/// The message part of a datagram: headers plus Content-Length bytes of body when the header is
/// present (RFC 3261 §18.3), else everything.
fn datagram_message(raw: &[u8]) -> Vec<u8> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) else {
        return raw.to_vec();
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let cl = head.split("\r\n").find_map(|l| {
        let (name, value) = l.split_once(':')?;
        let name = name.trim();
        (name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l"))
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    match cl {
        Some(n) if end + n <= raw.len() => raw[..end + n].to_vec(),
        _ => raw.to_vec(),
    }
}

fn is_response(path: &Path) -> bool {
    std::fs::read(path).expect("read").starts_with(b"SIP/")
}

#[test]
fn every_vector_gets_the_verdict_its_index_gives() {
    let vectors = vectors();
    assert!(vectors.len() >= 65, "{}", vectors.len());
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["sip", "check"])
        .args(vectors.iter().map(|v| &v.path))
        .output()
        .expect("run legate");
    assert_eq!(
        out.status.code(),
        Some(1),
        "some vectors are invalid, so the exit code is 1"
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), vectors.len());
    for (v, j) in vectors.iter().zip(&lines) {
        let name = v.path.file_name().and_then(|n| n.to_str()).expect("name");
        assert_eq!(j["file"], v.path.to_str().expect("utf-8 path"));
        // The uncorrected RFC 5118 SDP example has a Content-Length past the end of the data:
        // read as one datagram that is refused like clerr.dat (its .clfix copy is accepted).
        let expect_ok = v.expected != "invalid" && name != "ipv6-in-sdp.dat";
        if expect_ok {
            assert_eq!(j["verdict"], "ok", "{name}: {j}");
            assert!(
                j["status"].is_null() && j["reason"].is_null(),
                "{name}: {j}"
            );
        } else {
            assert_eq!(j["verdict"], "bad", "{name}: {j}");
            assert!(
                j["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{name}: a reason is given: {j}"
            );
            let want = if is_response(&v.path) {
                serde_json::Value::Null // a malformed response is dropped, never answered
            } else if name == "badvers.dat" {
                505.into()
            } else {
                400.into()
            };
            assert_eq!(j["status"], want, "{name}: {j}");
        }
    }
}

#[test]
fn print_gives_back_the_bytes_of_accepted_messages() {
    let mut printed = 0;
    for v in vectors() {
        let name = v
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        if v.expected == "invalid" || name == "ipv6-in-sdp.dat" {
            let out = Command::new(env!("CARGO_BIN_EXE_legate"))
                .args(["sip", "check", "--print"])
                .arg(&v.path)
                .output()
                .expect("run");
            assert_eq!(out.status.code(), Some(1), "{name}");
            assert!(out.stdout.is_empty(), "{name}");
            assert!(!out.stderr.is_empty(), "{name}: the reason is on stderr");
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_legate"))
            .args(["sip", "check", "--print"])
            .arg(&v.path)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let original = std::fs::read(&v.path).expect("read");
        // One datagram: bytes after Content-Length are not part of the message (dblreq.dat,
        // mult-ip-in-sdp.dat); everything else comes back byte-exact.
        assert_eq!(
            out.stdout,
            datagram_message(&original),
            "{name} re-serializes byte-exact"
        );
        printed += 1;
    }
    assert!(printed >= 40, "{printed}");
}

/// Issue 10 item 8: the measured case — a 300 KiB MESSAGE body is refused by `sip check` with
/// 513 and a reason naming `sip_max_message_bytes` (64 KiB by default), as the edge would.
#[test]
fn an_oversized_message_is_513_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = "x".repeat(300 * 1024);
    let file = dir.path().join("big.sip");
    std::fs::write(
        &file,
        format!(
            "MESSAGE sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nTo: <sip:alice@example.com>\r\nFrom: <sip:bob@partner.com>;tag=1\r\nCall-ID: 1\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["sip", "check"])
        .arg(&file)
        .output()
        .expect("run legate");
    assert_eq!(out.status.code(), Some(1));
    let line: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).expect("one JSON line");
    assert_eq!(line["verdict"], "bad");
    assert_eq!(line["status"], 513);
    assert_eq!(line["method"], "MESSAGE");
    let reason = line["reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("Message Too Large") && reason.contains("sip_max_message_bytes = 65536"),
        "{reason}"
    );
}

#[test]
fn with_a_configuration_its_limits_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 2 KiB of body: fine under the defaults, too large for a 1 KiB message bound.
    let body = "x".repeat(2 * 1024);
    let file = dir.path().join("mid.sip");
    std::fs::write(
        &file,
        format!(
            "MESSAGE sip:alice@example.com SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nTo: <sip:alice@example.com>\r\nFrom: <sip:bob@partner.com>;tag=1\r\nCall-ID: 1\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .expect("write");
    let cfg = dir.path().join("legate.toml");
    std::fs::write(
        &cfg,
        "[[local_domain]]\nname = \"example.com\"\n[limits]\nsip_max_message_bytes = 1024\nsip_max_header_bytes = 512\n",
    )
    .expect("write config");
    let run = |with_config: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_legate"));
        cmd.args(["sip", "check"]);
        if with_config {
            cmd.arg("--config").arg(&cfg);
        }
        let out = cmd.arg(&file).output().expect("run legate");
        let line: serde_json::Value =
            serde_json::from_slice(out.stdout.trim_ascii()).expect("one JSON line");
        (out.status.code(), line)
    };
    let (code, line) = run(false);
    assert_eq!((code, &line["verdict"]), (Some(0), &"ok".into()), "{line}");
    let (code, line) = run(true);
    assert_eq!(code, Some(1));
    assert_eq!(line["status"], 513);
    let reason = line["reason"].as_str().unwrap_or("");
    assert!(reason.contains("sip_max_message_bytes = 1024"), "{reason}");
}
