//! Peer-controlled text in log lines. A From header, a reason phrase or a domain read from the
//! wire may hold CR/LF (forged log lines), ANSI escapes (a terminal taken over) or invisible
//! characters (a line that reads differently than it is). [`LogSafe`] prints such text with
//! every control or non-printable character escaped, and bounds its length.

use std::fmt;

/// Longest stretch of peer text written into one log field (characters); the rest is cut and
/// marked, so a 64 KiB header cannot flood the log.
pub const MAX_LOGGED_CHARS: usize = 256;

/// Display wrapper: `tracing::info!(from = %LogSafe(from), ...)`.
#[derive(Clone, Copy)]
pub struct LogSafe<'a>(pub &'a str);

impl LogSafe<'_> {
    /// Byte input (not necessarily UTF-8): invalid sequences are shown as U+FFFD escapes.
    pub fn bytes(b: &[u8]) -> String {
        LogSafe(&String::from_utf8_lossy(b)).to_string()
    }
}

fn needs_escape(c: char) -> bool {
    // Controls (C0, DEL, C1), the Unicode format characters that reorder or hide text (bidi
    // overrides, zero-width), separators other than the plain space, and non-characters.
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2028}' | '\u{2029}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
            | '\u{fff9}'..='\u{fffb}')
        || (c.is_whitespace() && c != ' ')
        || c == '\\'
}

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for (n, c) in self.0.chars().enumerate() {
            if n >= MAX_LOGGED_CHARS {
                return f.write_str("…[cut]");
            }
            if c == '\\' {
                f.write_str("\\\\")?;
            } else if needs_escape(c) {
                write!(f, "\\u{{{:x}}}", c as u32)?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_invisible_characters_are_escaped() {
        assert_eq!(LogSafe("bob@partner.com").to_string(), "bob@partner.com");
        assert_eq!(
            LogSafe("a\r\nINFO forged line").to_string(),
            "a\\u{d}\\u{a}INFO forged line"
        );
        assert_eq!(LogSafe("\u{1b}[31mred").to_string(), "\\u{1b}[31mred");
        assert_eq!(LogSafe("x\u{202e}y\u{0}").to_string(), "x\\u{202e}y\\u{0}");
        // The escape character itself is escaped, so an escape cannot be forged either.
        assert_eq!(LogSafe("\\u{a}").to_string(), "\\\\u{a}");
        assert_eq!(LogSafe("tab\there").to_string(), "tab\\u{9}here");
        assert_eq!(LogSafe("héllo 日本").to_string(), "héllo 日本");
        assert_eq!(LogSafe::bytes(b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn long_text_is_cut() {
        let long = "a".repeat(10_000);
        let s = LogSafe(&long).to_string();
        assert!(s.len() < MAX_LOGGED_CHARS + 16, "{}", s.len());
        assert!(s.ends_with("…[cut]"));
    }
}
