//! `legate sip check [--print] FILE...`: the admin diagnostic (issue 6 item 2).
//!
//! Each FILE is one datagram (RFC 4475 framing: no Content-Length → body to the end; bytes after
//! Content-Length ignored; Content-Length past the end → refused). The verdict is exactly what
//! the edge would do with it: the same parser and validator, no separate rules.
//!
//! Output contract, one JSON object per file and line:
//! `{"file":..,"verdict":"ok"|"bad","status":..,"reason":..,"method":..}` where
//! - `status` is the code Legate would answer for a refused request (400, or 505 for an unknown
//!   SIP version), and `null` both for a malformed response (dropped, no answer) and for an ok
//!   message (the codec has nothing to answer; routing decides later);
//! - `reason` is the reason phrase of that answer (or why a response is dropped), `null` if ok;
//! - `method` is the request method, or the CSeq method of a response when it can be read, or
//!   the first token of an unparseable request line; `null` otherwise.
//!
//! A file that cannot be read is reported as `bad` with `status` null and the I/O error.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::validate::{check_datagram, raw_method};

#[derive(Serialize)]
struct Line<'a> {
    file: &'a str,
    verdict: &'static str,
    status: Option<u16>,
    reason: Option<String>,
    method: Option<String>,
}

/// Checks every file; returns `true` if all were ok.
pub fn check_files(files: &[PathBuf], out: &mut impl Write) -> std::io::Result<bool> {
    let mut all_ok = true;
    for f in files {
        let name = f.to_string_lossy();
        let line = match std::fs::read(f) {
            Err(e) => Line {
                file: &name,
                verdict: "bad",
                status: None,
                reason: Some(format!("cannot read file: {e}")),
                method: None,
            },
            Ok(raw) => match check_datagram(&raw) {
                Ok(m) => Line {
                    file: &name,
                    verdict: "ok",
                    status: None,
                    reason: None,
                    method: m
                        .method()
                        .map(str::to_owned)
                        .or_else(|| m.cseq().ok().map(|c| c.method.to_owned())),
                },
                Err(r) => Line {
                    file: &name,
                    verdict: "bad",
                    status: r.status,
                    reason: Some(r.reason),
                    method: method_of_bad(&raw),
                },
            },
        };
        if line.verdict != "ok" {
            all_ok = false;
        }
        serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
    }
    Ok(all_ok)
}

/// Best-effort method of a refused message: parse leniently enough to read it.
fn method_of_bad(raw: &[u8]) -> Option<String> {
    if let Some(m) = raw_method(raw) {
        return Some(m.to_owned());
    }
    // A response: the CSeq method, read leniently (its number may be what was wrong).
    let m = super::parse::parse_datagram(raw).ok()?;
    let cseq = m.header(super::header::HeaderName::CSeq)?;
    let last = cseq.value.split_ascii_whitespace().last()?;
    super::header::is_token(last).then(|| last.to_owned())
}

/// `--print`: writes the message exactly as Legate re-serializes it after parsing (raw bytes),
/// or returns the reason it is refused.
pub fn print_file(file: &Path, out: &mut impl Write) -> Result<(), String> {
    let raw =
        std::fs::read(file).map_err(|e| format!("{}: cannot read file: {e}", file.display()))?;
    let m = check_datagram(&raw).map_err(|r| r.to_string())?;
    out.write_all(&m.to_bytes())
        .map_err(|e| format!("write failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { return };
        let ok = dir.path().join("ok.sip");
        let bad = dir.path().join("bad.sip");
        let _ = std::fs::write(
            &ok,
            b"OPTIONS sip:a@b.example SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nTo: <sip:a@b.example>\r\nFrom: <sip:c@d.example>;tag=1\r\nCall-ID: 1\r\nCSeq: 1 OPTIONS\r\n\r\n",
        );
        let _ = std::fs::write(&bad, b"INVITE sip:a@b SIP/7.0\r\n\r\n");
        let mut out = Vec::new();
        let r = check_files(&[ok.clone(), bad], &mut out);
        assert!(matches!(r, Ok(false)));
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["verdict"], "ok");
        assert_eq!(lines[0]["method"], "OPTIONS");
        assert_eq!(lines[1]["status"], 505);
        assert_eq!(lines[1]["method"], "INVITE");
        let mut printed = Vec::new();
        assert!(print_file(&ok, &mut printed).is_ok());
        assert_eq!(std::fs::read(&ok).ok(), Some(printed));
    }
}
