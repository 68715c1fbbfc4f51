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
//!
//! Size limits are the edge's (`limits.sip_max_header_bytes`, `limits.sip_max_message_bytes`;
//! their defaults unless a configuration's are given): a message over one is `bad` with 513
//! Message Too Large (RFC 3261 §21.5.14) and a reason naming the limit. The edge refuses the
//! same message: on a stream it closes the connection instead of answering (it will not
//! buffer the body it refuses, so framing cannot resume after it).

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

/// The size bounds a message is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    pub max_header: usize,
    pub max_message: usize,
}

impl Default for SizeLimits {
    /// The configuration's defaults (`config::LIMIT_RANGES`).
    fn default() -> Self {
        let of = |key: &str, fallback: usize| {
            crate::config::LIMIT_RANGES
                .iter()
                .find(|r| r.key == key)
                .and_then(|r| usize::try_from(r.default).ok())
                .unwrap_or(fallback)
        };
        SizeLimits {
            max_header: of("sip_max_header_bytes", 16_384),
            max_message: of("sip_max_message_bytes", 65_536),
        }
    }
}

impl SizeLimits {
    pub fn from_config(l: &crate::config::Limits) -> Self {
        SizeLimits {
            max_header: l.sip_max_header_bytes,
            max_message: l.sip_max_message_bytes,
        }
    }

    /// The 513 reason phrase when `raw` exceeds a bound: the header section (up to and
    /// including the blank line, or everything without one) or the whole message (what the
    /// Content-Length declares, or the bytes present, whichever is larger — the edge refuses
    /// on the declared size before buffering the body).
    pub fn exceeded(&self, raw: &[u8]) -> Option<String> {
        let head = memchr::memmem::find(raw, b"\r\n\r\n").map_or(raw.len(), |i| i + 4);
        if head > self.max_header.saturating_add(4) {
            return Some(format!(
                "Message Too Large (header section of {head} bytes exceeds sip_max_header_bytes = {})",
                self.max_header
            ));
        }
        let declared = super::parse::parse_datagram(raw)
            .ok()
            .and_then(|m| {
                m.header(super::header::HeaderName::ContentLength)
                    .map(|h| h.value.to_owned())
            })
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(0, |cl| head.saturating_add(cl));
        let size = declared.max(raw.len());
        if size > self.max_message {
            return Some(format!(
                "Message Too Large ({size} bytes exceeds sip_max_message_bytes = {})",
                self.max_message
            ));
        }
        None
    }
}

/// Checks every file against the default size limits; returns `true` if all were ok.
pub fn check_files(files: &[PathBuf], out: &mut impl Write) -> std::io::Result<bool> {
    check_files_with(files, SizeLimits::default(), out)
}

/// Checks every file against `limits`; returns `true` if all were ok.
pub fn check_files_with(
    files: &[PathBuf],
    limits: SizeLimits,
    out: &mut impl Write,
) -> std::io::Result<bool> {
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
            Ok(raw) => match limits.exceeded(&raw) {
                Some(reason) => Line {
                    file: &name,
                    verdict: "bad",
                    status: Some(513),
                    reason: Some(reason),
                    method: method_of_bad(&raw),
                },
                None => match check_datagram(&raw) {
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
    print_file_with(file, SizeLimits::default(), out)
}

/// [`print_file`] against given size bounds (a configuration's `[limits]`).
pub fn print_file_with(
    file: &Path,
    limits: SizeLimits,
    out: &mut impl Write,
) -> Result<(), String> {
    let raw =
        std::fs::read(file).map_err(|e| format!("{}: cannot read file: {e}", file.display()))?;
    if let Some(reason) = limits.exceeded(&raw) {
        return Err(format!("513 {reason}"));
    }
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

    #[test]
    fn size_limits_answer_513_naming_the_limit() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let body = "x".repeat(300 * 1024);
        let big = dir.path().join("big.sip");
        let _ = std::fs::write(
            &big,
            format!(
                "MESSAGE sip:a@b.example SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nTo: <sip:a@b.example>\r\nFrom: <sip:c@d.example>;tag=1\r\nCall-ID: 1\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        let long_header = dir.path().join("hdr.sip");
        let _ = std::fs::write(
            &long_header,
            format!(
                "OPTIONS sip:a@b.example SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nX-Pad: {}\r\nTo: <sip:a@b.example>\r\nFrom: <sip:c@d.example>;tag=1\r\nCall-ID: 1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
                "p".repeat(20_000)
            ),
        );
        let mut out = Vec::new();
        assert!(matches!(
            check_files(&[big.clone(), long_header.clone()], &mut out),
            Ok(false)
        ));
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["status"], 513);
        assert_eq!(lines[0]["method"], "MESSAGE");
        let r0 = lines[0]["reason"].as_str().unwrap_or("");
        assert!(r0.contains("sip_max_message_bytes = 65536"), "{r0}");
        assert_eq!(lines[1]["status"], 513);
        let r1 = lines[1]["reason"].as_str().unwrap_or("");
        assert!(r1.contains("sip_max_header_bytes = 16384"), "{r1}");
        // A larger configured limit accepts the same message.
        let mut out = Vec::new();
        let roomy = SizeLimits {
            max_header: 16_384,
            max_message: 1_048_576,
        };
        assert!(matches!(
            check_files_with(&[big], roomy, &mut out),
            Ok(true)
        ));
        assert!(print_file(&long_header, &mut Vec::new()).is_err_and(|e| e.starts_with("513 ")));
    }
}
