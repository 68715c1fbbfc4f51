//! `legate sip check` against the edge's size limits (issue 10: a 300 KiB MESSAGE was accepted
//! although `sip_max_message_bytes` is 64 KiB). Bytes 0 and 1 choose small limits so they are
//! reached; the rest is one datagram. Invariants:
//! - neither `SizeLimits::exceeded` nor `check_files_with` panics;
//! - the verdict is 513 exactly when `exceeded` says so, and it does whenever the bytes present
//!   exceed `max_message` or the header section (up to the first blank line, or everything)
//!   exceeds `max_header` (+4 for the blank line);
//! - check and the stream framer agree: a message the edge's `Framer` with the same limits
//!   accepts is not too large for check, and one the framer refuses as too large is `bad`.
#![no_main]

use legate::sip::check::{check_files_with, SizeLimits};
use legate::sip::{Frame, Framer, FramingError};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::LazyLock;

static FILE: LazyLock<PathBuf> = LazyLock::new(|| {
    std::env::temp_dir().join(format!("legate-fuzz-sip-check-{}.sip", std::process::id()))
});

/// The JSON verdict line of `check_files_with` for `raw`: (ok, status).
fn verdict(raw: &[u8], limits: SizeLimits) -> (bool, Option<u16>, String) {
    if let Err(e) = std::fs::write(&*FILE, raw) {
        panic!("cannot write {}: {e}", FILE.display());
    }
    let mut out = Vec::new();
    let ok = match check_files_with(std::slice::from_ref(&*FILE), limits, &mut out) {
        Ok(ok) => ok,
        Err(e) => panic!("check failed: {e}"),
    };
    let line = String::from_utf8_lossy(&out).into_owned();
    assert!(
        line.ends_with('\n') && line.matches('\n').count() == 1,
        "{line:?}"
    );
    let status = line
        .split_once("\"status\":")
        .and_then(|(_, r)| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok());
    (ok, status, line)
}

fuzz_target!(|data: &[u8]| {
    let Some(([h, m], raw)) = data.split_first_chunk::<2>().map(|(a, r)| (*a, r)) else {
        return;
    };
    let limits = SizeLimits {
        max_header: 16 + usize::from(h) * 8,
        max_message: 32 + usize::from(m) * 16,
    };
    let reason = limits.exceeded(raw);
    let (ok, status, line) = verdict(raw, limits);
    assert_eq!(status == Some(513), reason.is_some(), "{line}");
    assert_eq!(ok, line.contains("\"verdict\":\"ok\""), "{line}");
    if ok {
        assert_eq!(status, None, "{line}");
    }

    let head = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |i| i + 4);
    if raw.len() > limits.max_message || head > limits.max_header + 4 {
        assert_eq!(
            status,
            Some(513),
            "{} bytes, head {head}: {line}",
            raw.len()
        );
    }

    // The edge's framer with the same limits, on the same bytes as a stream.
    if raw.first().is_some_and(|&b| b == b'\r' || b == b'\n') {
        return;
    }
    let mut f = Framer::new(limits.max_header, limits.max_message);
    f.push(raw);
    match f.next() {
        Ok(Some(Frame::Message(msg))) => {
            let framed = msg.original_bytes().clone();
            assert!(
                limits.exceeded(&framed).is_none(),
                "the edge accepted {} bytes that check calls too large",
                framed.len()
            );
        }
        Err(FramingError::HeaderTooLarge { .. } | FramingError::MessageTooLarge { .. }) => {
            assert!(
                !ok,
                "the edge refuses as too large what check accepts: {line}"
            );
        }
        _ => {}
    }
});
