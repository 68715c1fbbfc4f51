//! Message parser: start line, header lines, body (RFC 3261 §7, §18.3; RFC 4475 conventions).
//!
//! One pass over the header section records spans; header values are not decoded here (that is
//! the typed accessors' and the validator's job), except Content-Length, which framing needs.
//! The parser refuses what makes the message structurally unknowable: a malformed start line, a
//! header line without a name or colon, a non-UTF-8 header section, bare CR/LF, a bad or
//! conflicting Content-Length. It never panics on peer input.

use bytes::Bytes;
use memchr::{memchr, memmem};

use super::header::{is_token_char, HeaderName};
use super::message::{HeaderField, SipMessage, Span, StartLine, ValueLoc};
use super::SipParseError;

/// How the body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// One datagram (RFC 3261 §18.3, RFC 4475 §3.1.1.8): without Content-Length the body runs
    /// to the end; bytes after Content-Length are ignored; Content-Length past the end is an
    /// error.
    Datagram,
    /// The buffer is exactly one message cut by a stream framer: Content-Length is required
    /// and must match the body exactly.
    Exact,
}

/// Parses one datagram (copies the input once into a `Bytes`).
pub fn parse_datagram(input: &[u8]) -> Result<SipMessage, SipParseError> {
    parse_bytes(Bytes::copy_from_slice(input), BodyMode::Datagram)
}

/// Parses a stream frame (exact length, Content-Length required).
pub fn parse_exact(buf: Bytes) -> Result<SipMessage, SipParseError> {
    parse_bytes(buf, BodyMode::Exact)
}

/// Parses a message out of `buf` without copying.
pub fn parse_bytes(buf: Bytes, mode: BodyMode) -> Result<SipMessage, SipParseError> {
    let b: &[u8] = &buf;
    if b.is_empty() {
        return Err(SipParseError::Empty);
    }
    // End of the header section: the first CRLFCRLF. `head` includes the CRLF of the last
    // header line.
    let Some(blank) = memmem::find(b, b"\r\n\r\n") else {
        return Err(SipParseError::NoHeaderEnd);
    };
    let head_end = blank + 2;
    let body_start = blank + 4;
    let head = b.get(..head_end).unwrap_or(&[]);
    // RFC 3261 §25: header text is UTF-8 (TEXT-UTF8, UTF8-NONASCII). Checking once here lets
    // accessors hand out &str slices.
    let Ok(head_text) = std::str::from_utf8(head) else {
        return Err(SipParseError::HeaderNotUtf8);
    };
    let head_text = head_text.to_owned();

    // ---- start line ----
    let sl_end = memchr(b'\n', head).unwrap_or(head.len());
    let sl_stop = sl_end.saturating_sub(1);
    if head.get(sl_stop) != Some(&b'\r') {
        return Err(SipParseError::BareLineBreak);
    }
    let start_line = head.get(..sl_stop).unwrap_or(&[]);
    let start = parse_start_line(start_line)?;

    // ---- header lines ----
    let mut headers: Vec<HeaderField> = Vec::with_capacity(24);
    let mut unfolded = String::new();
    let mut content_length: Option<usize> = None;
    let mut pos = sl_end + 1;
    while pos < head_end {
        // Find the logical header: first physical line, then continuation lines that start
        // with SP/HTAB (RFC 3261 §7.3.1 folding).
        let line_start = pos;
        let mut folded = false;
        let mut end; // index of '\r' of the last physical line
        loop {
            let nl = memchr(b'\n', head.get(pos..).unwrap_or(&[]))
                .map(|i| pos + i)
                .ok_or(SipParseError::BareLineBreak)?;
            end = nl.saturating_sub(1);
            if nl == 0 || head.get(end) != Some(&b'\r') || end < pos {
                return Err(SipParseError::BareLineBreak);
            }
            if memchr(b'\r', head.get(pos..end).unwrap_or(&[])).is_some() {
                return Err(SipParseError::BareLineBreak);
            }
            pos = nl + 1;
            if pos < head_end && matches!(head.get(pos), Some(b' ' | b'\t')) {
                folded = true;
                continue;
            }
            break;
        }
        let first = head.get(line_start).copied().unwrap_or(b' ');
        if first == b' ' || first == b'\t' {
            return Err(SipParseError::BadHeaderLine(
                "continuation line before the first header",
            ));
        }
        let logical = head.get(line_start..end).unwrap_or(&[]);
        let Some(colon) = memchr(b':', logical) else {
            return Err(SipParseError::BadHeaderLine("header line without a colon"));
        };
        // HCOLON = *( SP / HTAB ) ":" SWS: the name may be followed by white space.
        let raw_name = logical.get(..colon).unwrap_or(&[]);
        let name_len = raw_name
            .iter()
            .rposition(|&c| c != b' ' && c != b'\t')
            .map_or(0, |i| i + 1);
        let name = raw_name.get(..name_len).unwrap_or(&[]);
        if name.is_empty() || !name.iter().all(|&c| is_token_char(c)) {
            return Err(SipParseError::BadHeaderName);
        }
        if raw_name
            .get(name_len..)
            .is_some_and(|ws| ws.contains(&b'\r') || ws.contains(&b'\n'))
        {
            return Err(SipParseError::BadHeaderName);
        }
        let kind = HeaderName::classify(name);
        let vstart = line_start + colon + 1;
        let (value_span, loc) = if folded {
            // Unfold: every CRLF followed by white space becomes that white space.
            let raw = head.get(vstart..end).unwrap_or(&[]);
            let text = std::str::from_utf8(raw).map_err(|_| SipParseError::HeaderNotUtf8)?;
            let s = unfolded.len();
            for piece in text.split("\r\n") {
                unfolded.push_str(piece);
            }
            let trimmed_start = unfolded
                .get(s..)
                .map_or(0, |t| t.len() - t.trim_start_matches([' ', '\t']).len());
            let trimmed_end = unfolded.trim_end_matches([' ', '\t']).len();
            unfolded.truncate(trimmed_end.max(s));
            let vs = (s + trimmed_start).min(unfolded.len());
            (Span::new(vs..unfolded.len()), ValueLoc::Unfolded)
        } else {
            let raw = head.get(vstart..end).unwrap_or(&[]);
            let lead = raw.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
            let trail = raw
                .iter()
                .rev()
                .take_while(|&&c| c == b' ' || c == b'\t')
                .count();
            let vs = vstart + lead;
            let ve = (end - trail).max(vs);
            (Span::new(vs..ve), ValueLoc::Buf)
        };
        if kind == HeaderName::ContentLength {
            let v = match loc {
                ValueLoc::Buf => value_span.get(head),
                ValueLoc::Unfolded => unfolded.as_bytes().get(value_span.range()).unwrap_or(&[]),
            };
            let n = parse_content_length(v)?;
            if content_length.is_some_and(|old| old != n) {
                // RFC 4475 §3.3.9: framing is undefined.
                return Err(SipParseError::ConflictingContentLength);
            }
            content_length = Some(n);
        }
        headers.push(HeaderField {
            name: kind,
            name_span: Span::new(line_start..line_start + name_len),
            value_span,
            loc,
            line_span: Span::new(line_start..pos),
            own: None,
        });
    }

    // ---- body ----
    let available = b.len().saturating_sub(body_start);
    let body_len = match (mode, content_length) {
        (_, Some(n)) if n > available => {
            return Err(SipParseError::ContentLengthExceedsData {
                declared: n,
                available,
            })
        }
        (BodyMode::Exact, Some(n)) if n != available => {
            return Err(SipParseError::ContentLengthMismatch)
        }
        (_, Some(n)) => n,
        (BodyMode::Datagram, None) => available,
        (BodyMode::Exact, None) => return Err(SipParseError::MissingContentLength),
    };
    let end = body_start + body_len;
    // Keep only this message's bytes (RFC 4475 §3.1.1.8: trailing datagram octets are
    // discarded); `slice` is a refcount bump, not a copy.
    let buf = if end < buf.len() {
        buf.slice(..end)
    } else {
        buf
    };
    Ok(SipMessage {
        buf,
        start,
        start_span: Span::new(0..sl_stop),
        headers,
        unfolded,
        head: head_text,
        body: Span::new(body_start..end),
        body_own: None,
    })
}

/// Content-Length: 1*DIGIT (RFC 3261 §20.14). Negative, signed or non-numeric values are
/// refused (RFC 4475 §3.1.2.3) and overlarge ones too.
pub(crate) fn parse_content_length(v: &[u8]) -> Result<usize, SipParseError> {
    if v.is_empty() {
        return Err(SipParseError::BadContentLength("empty"));
    }
    if v.first() == Some(&b'-') {
        return Err(SipParseError::BadContentLength("negative"));
    }
    if !v.iter().all(u8::is_ascii_digit) {
        return Err(SipParseError::BadContentLength("not a number"));
    }
    let mut n: usize = 0;
    for &c in v {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(c - b'0')))
            .filter(|&n| n <= u32::MAX as usize)
            .ok_or(SipParseError::BadContentLength("too large"))?;
    }
    Ok(n)
}

fn parse_start_line(line: &[u8]) -> Result<StartLine, SipParseError> {
    if line.len() >= 4
        && line
            .get(..4)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
    {
        return parse_status_line(line);
    }
    // Request-Line = Method SP Request-URI SP SIP-Version CRLF (exactly one SP each,
    // RFC 3261 §7.1; RFC 4475 §3.1.2.7-10 refuse extra, leading and trailing white space).
    let mut parts = line.split(|&c| c == b' ');
    let method = parts.next().unwrap_or(&[]);
    let uri = parts.next();
    let version = parts.next();
    let extra = parts.next();
    if method.is_empty() || !method.iter().all(|&c| is_token_char(c)) {
        return Err(SipParseError::BadStartLine("invalid method"));
    }
    let (Some(uri), Some(version)) = (uri, version) else {
        return Err(SipParseError::BadStartLine(
            "missing SIP-Version in Request-Line",
        ));
    };
    if uri.is_empty() {
        return Err(SipParseError::BadStartLine(
            "more than one SP between Request-Line elements",
        ));
    }
    if line.last() == Some(&b' ') {
        return Err(SipParseError::BadStartLine(
            "trailing white space in Request-Line",
        ));
    }
    if extra.is_some() {
        return Err(if version.is_empty() {
            SipParseError::BadStartLine("more than one SP between Request-Line elements")
        } else {
            SipParseError::BadRequestUri("white space in Request-URI")
        });
    }
    if line.contains(&b'\t') {
        return Err(SipParseError::BadStartLine("HTAB in Request-Line"));
    }
    check_version(version)?;
    let m_end = method.len();
    let u_start = m_end + 1;
    Ok(StartLine::Request {
        method: Span::new(0..m_end),
        uri: Span::new(u_start..u_start + uri.len()),
    })
}

/// SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT; anything but 2.0 that is well formed gets 505
/// (RFC 3261 §21.5.6, RFC 4475 §3.1.2.16).
fn check_version(v: &[u8]) -> Result<(), SipParseError> {
    if v == b"SIP/2.0" {
        return Ok(());
    }
    let well_formed = v.len() > 4
        && v.get(..4).is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
        && v.get(4..).is_some_and(|r| {
            let mut it = r.split(|&c| c == b'.');
            let a = it.next().unwrap_or(&[]);
            let b = it.next().unwrap_or(&[]);
            it.next().is_none()
                && !a.is_empty()
                && !b.is_empty()
                && a.iter().all(u8::is_ascii_digit)
                && b.iter().all(u8::is_ascii_digit)
        });
    if well_formed {
        if v.eq_ignore_ascii_case(b"SIP/2.0") {
            return Ok(());
        }
        Err(SipParseError::UnsupportedVersion)
    } else {
        Err(SipParseError::BadStartLine("invalid SIP-Version"))
    }
}

/// Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF; Status-Code is 3DIGIT in
/// 100..=699 (RFC 4475 §3.1.2.19: `4294967301` must not wrap).
fn parse_status_line(line: &[u8]) -> Result<StartLine, SipParseError> {
    let sp1 = memchr(b' ', line).ok_or(SipParseError::BadStartLine("missing status code"))?;
    check_version(line.get(..sp1).unwrap_or(&[]))?;
    let rest = line.get(sp1 + 1..).unwrap_or(&[]);
    let sp2 =
        memchr(b' ', rest).ok_or(SipParseError::BadStartLine("missing SP after status code"))?;
    let code = rest.get(..sp2).unwrap_or(&[]);
    if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return Err(SipParseError::BadStatusCode);
    }
    let n = code.iter().fold(0u16, |n, &c| n * 10 + u16::from(c - b'0'));
    if !(100..=699).contains(&n) {
        return Err(SipParseError::BadStatusCode);
    }
    let r_start = sp1 + 1 + sp2 + 1;
    let reason = line.get(r_start..).unwrap_or(&[]);
    if reason.iter().any(|&c| c < b' ' && c != b'\t') {
        return Err(SipParseError::BadStartLine(
            "control character in reason phrase",
        ));
    }
    Ok(StartLine::Response {
        code: n,
        reason: Span::new(r_start..line.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"OPTIONS sip:user@example.com SIP/2.0\r\n\
Via: SIP/2.0/TCP h.example.com;branch=z9hG4bK1\r\n\
To: <sip:user@example.com>\r\n\
From: <sip:c@example.com>;tag=1\r\n\
Call-ID: abc\r\n\
CSeq: 1 OPTIONS\r\n\
Subject: a\r\n folded\r\n\
l: 4\r\n\
\r\n\
bodyEXTRA";

    #[test]
    fn datagram_roundtrip_drops_trailing() {
        let m = parse_datagram(MSG);
        let Ok(m) = m else { panic!("{m:?}") };
        assert_eq!(m.body(), b"body");
        assert_eq!(&m.to_bytes()[..], &MSG[..MSG.len() - 5]);
        assert_eq!(
            m.header(HeaderName::Subject).map(|h| h.value),
            Some("a folded")
        );
        assert_eq!(m.via_top().map(|v| v.branch()), Ok(Some("z9hG4bK1")));
    }

    #[test]
    fn exact_requires_content_length() {
        let raw = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\n\r\n";
        assert_eq!(
            parse_exact(Bytes::from_static(raw)),
            Err(SipParseError::MissingContentLength)
        );
    }

    #[test]
    fn start_line_errors() {
        for (l, ok) in [
            (&b"INVITE sip:a@b SIP/2.0"[..], true),
            (b"INVITE  sip:a@b SIP/2.0", false),
            (b"INVITE sip:a@b SIP/2.0  ", false),
            (b"INVITE sip:a@b; lr SIP/2.0", false),
            (b"INVITE sip:a@b", false),
            (b"SIP/2.0 100 ", true),
            (b"SIP/2.0 4294967301 x", false),
        ] {
            assert_eq!(
                parse_start_line(l).is_ok(),
                ok,
                "{}",
                String::from_utf8_lossy(l)
            );
        }
        assert_eq!(
            parse_start_line(b"INVITE sip:a@b SIP/7.0"),
            Err(SipParseError::UnsupportedVersion)
        );
    }

    /// Deterministic mini-fuzz: every single-byte substitution (from a set of delimiters and
    /// odd bytes) of two tortuous messages must parse or fail cleanly, and whatever parses must
    /// round-trip and keep its validation verdict. The cargo-fuzz target does the same at scale.
    #[test]
    fn single_byte_mutations_round_trip() {
        let seeds: [&[u8]; 2] = [
            include_bytes!("../../tests/data/sip/rfc4475/wsinv.dat"),
            include_bytes!("../../tests/data/sip/rfc5118/mult-ip-in-header.dat"),
        ];
        let subs = b" \t\r\n:;,\"<>[]%@?=09\\/\x00\xff\xc3";
        let mut parsed = 0usize;
        for seed in seeds {
            for i in 0..seed.len() {
                for &b in subs {
                    let mut v = seed.to_vec();
                    v[i] = b;
                    for input in [&v[..], &v[..i]] {
                        let Ok(m) = parse_datagram(input) else {
                            continue;
                        };
                        parsed += 1;
                        let out = m.to_bytes();
                        assert!(input.starts_with(&out));
                        let again = parse_datagram(&out);
                        let Ok(again) = again else {
                            panic!("re-parse failed: {again:?}")
                        };
                        assert_eq!(again.to_bytes(), out);
                        assert_eq!(
                            crate::sip::validate::validate(&again),
                            crate::sip::validate::validate(&m)
                        );
                        let _ = (m.vias(), m.from(), m.to(), m.contacts(), m.routes());
                        let _ = (m.cseq(), m.call_id(), m.request_uri(), m.accept());
                    }
                }
            }
        }
        assert!(parsed > 1000);
    }
}
