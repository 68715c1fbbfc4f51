//! Peer text in log lines (`legate::net::LogSafe`, issue 10): arbitrary text, and arbitrary
//! bytes through `LogSafe::bytes`, must format without panicking into a line that holds no
//! character a terminal or a log reader could act on — no control (C0, DEL, C1), no bidi
//! override or isolate, no zero-width or line/paragraph separator, no non-character, no
//! whitespace other than the plain space — and whose length is bounded whatever the input's:
//! at most `MAX_LOGGED_CHARS` input characters are shown, each escaped as at most `\u{10ffff}`.
//! The shown part must also read back to the input's prefix (escapes are unambiguous), so
//! nothing is dropped silently.
#![no_main]

use legate::net::logsafe::MAX_LOGGED_CHARS;
use legate::net::LogSafe;
use libfuzzer_sys::fuzz_target;

const CUT: &str = "…[cut]";

/// Characters that must never appear literally, written from the module's contract.
fn forbidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2028}' | '\u{2029}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
            | '\u{fff9}'..='\u{fffb}')
        || (c.is_whitespace() && c != ' ')
}

/// Reads the escaped form back: `\\` is a backslash, `\u{X}` the character X.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next()? {
            '\\' => out.push('\\'),
            'u' => {
                if it.next()? != '{' {
                    return None;
                }
                let hex: String = it.by_ref().take_while(|&c| c != '}').collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
            }
            _ => return None,
        }
    }
    Some(out)
}

fn check(input: &str) {
    let shown = LogSafe(input).to_string();
    if let Some(c) = shown.chars().find(|&c| forbidden(c)) {
        panic!("U+{:04X} shown literally in {shown:?}", c as u32);
    }
    // `\u{10ffff}` is 10 bytes; the marker is 8.
    let bound = MAX_LOGGED_CHARS * 10 + CUT.len();
    assert!(shown.len() <= bound, "{} bytes shown", shown.len());
    let n = input.chars().count();
    let body = if n > MAX_LOGGED_CHARS {
        match shown.strip_suffix(CUT) {
            Some(b) => b,
            None => panic!("long input not marked as cut: {shown:?}"),
        }
    } else {
        shown.as_str()
    };
    let want: String = input.chars().take(MAX_LOGGED_CHARS).collect();
    assert_eq!(unescape(body).as_deref(), Some(want.as_str()), "{shown:?}");
    // Debug quotes the same text.
    assert_eq!(format!("{:?}", LogSafe(input)), format!("\"{shown}\""));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check(s);
    }
    let lossy = LogSafe::bytes(data);
    assert_eq!(lossy, LogSafe(&String::from_utf8_lossy(data)).to_string());
    assert!(!lossy.chars().any(forbidden), "{lossy:?}");
});
