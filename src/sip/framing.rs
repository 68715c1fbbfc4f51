//! Stream framing for SIP over TCP/TLS (RFC 3261 §18.3, §7.5; RFC 5626 §4.4.1 keep-alives).
//!
//! Sans-IO: the connection driver pushes whatever bytes it read and pulls frames. A frame is a
//! complete message (already validated; a consumer that decodes the routing headers anyway may
//! take them unchecked and check them itself, see [`Framer::routing_checked_later`]), a
//! keep-alive ping to answer with a CRLF pong, or a bad
//! message whose extent is still known (the driver answers 400 and carries on). When the extent
//! of the next message cannot be known — no Content-Length, conflicting or unreadable values, a
//! header section or message over the configured caps — the error is fatal and the driver must
//! close the connection: any byte after that point could be mistaken for a message.
//!
//! Caps are enforced before buffering: the header cap before the blank line arrives, the message
//! cap as soon as Content-Length is read (a 300 KiB body is refused, not buffered).

use bytes::{Buf, Bytes, BytesMut};
use memchr::{memchr, memmem};

use super::header::HeaderName;
use super::message::SipMessage;
use super::parse::{parse_content_length, parse_exact};
use super::validate::{reject_for_parse_error, validate, validate_framed};
use super::SipParseError;

/// Default cap on the whole message (issue 6: 64 KiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Default cap on the header section.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;

/// What the framer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete, validated message (but for its routing headers after
    /// [`Framer::routing_checked_later`]).
    Message(Box<SipMessage>),
    /// A CRLFCRLF ping: answer with a single CRLF pong (RFC 5626 §4.4.1).
    KeepAlive,
    /// A message with known extent that failed to parse or validate: answer `status` (when
    /// `Some`, i.e. a request) with `reason`, and keep the connection.
    Bad {
        /// Status to answer (`None`: a response, dropped).
        status: Option<u16>,
        /// Reason phrase.
        reason: String,
        /// The message bytes, for logging.
        bytes: Bytes,
    },
}

/// Fatal framing errors: close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// No blank line within the header cap.
    #[error("header section exceeds {limit} bytes")]
    HeaderTooLarge {
        /// Configured cap.
        limit: usize,
    },
    /// Header section plus Content-Length exceeds the cap.
    #[error("message of {size} bytes exceeds the {limit}-byte cap")]
    MessageTooLarge {
        /// Declared size.
        size: usize,
        /// Configured cap.
        limit: usize,
    },
    /// Content-Length is mandatory on a stream.
    #[error("missing Content-Length on a stream")]
    MissingContentLength,
    /// Content-Length unreadable (negative, not a number, too large).
    #[error("invalid Content-Length: {0}")]
    BadContentLength(&'static str),
    /// Several different Content-Length values (RFC 4475 §3.3.9).
    #[error("conflicting Content-Length values")]
    ConflictingContentLength,
    /// A previous fatal error left the stream unusable.
    #[error("stream already failed")]
    Failed,
}

/// Incremental framer for one connection.
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    max_header: usize,
    max_message: usize,
    failed: bool,
    /// Bytes of `buf` already searched for CRLFCRLF (so a slow peer costs O(n), not O(n²)).
    scanned: usize,
    /// Total length of the message at the front of `buf`, once its header section was read.
    pending: Option<usize>,
    /// Validation leaves the routing headers to the consumer ([`validate_framed`]).
    routing_later: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Framer::new(DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_MESSAGE_BYTES)
    }
}

impl Framer {
    /// A framer with caps on the header section and on the whole message.
    pub fn new(max_header_bytes: usize, max_message_bytes: usize) -> Self {
        Framer {
            buf: BytesMut::new(),
            max_header: max_header_bytes,
            max_message: max_message_bytes,
            failed: false,
            scanned: 0,
            pending: None,
            routing_later: false,
        }
    }

    /// Leaves the decoding of the Request-URI, Via, From and To to the consumer, which decodes
    /// them anyway into [`crate::sip::routing::Routing`] and must refuse what
    /// [`crate::sip::routing::Routing::check`] refuses: each message is then decoded once
    /// instead of twice (architecture: "Decode once"). Everything else is validated here as
    /// before. The SIP edge's connection tasks frame this way.
    pub fn routing_checked_later(mut self) -> Self {
        self.routing_later = true;
        self
    }

    /// Appends bytes read from the connection.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The buffer to read the connection into directly, with room for at least `room` more
    /// bytes: a read then lands where framing cuts messages from, without a copy through a
    /// separate read buffer.
    pub fn read_buf(&mut self, room: usize) -> &mut BytesMut {
        self.buf.reserve(room);
        &mut self.buf
    }

    /// Whether part of a message has arrived and the rest has not: buffered bytes other than
    /// a keep-alive's CR/LF prefix (RFC 5626 §4.4.1). The connection's message deadline runs
    /// while this is true.
    pub fn mid_message(&self) -> bool {
        let b = &self.buf[..];
        // "\r", "\r\n", "\r\n\r" are a keep-alive in progress, not a message.
        let keep_alive_prefix = b.len() < 4 && b"\r\n\r\n".starts_with(b);
        !b.is_empty() && !keep_alive_prefix
    }

    /// Bytes buffered and not yet framed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn fatal(&mut self, e: FramingError) -> Result<Option<Frame>, FramingError> {
        self.failed = true;
        Err(e)
    }

    /// Next frame: `Ok(None)` means "need more bytes". Not an `Iterator`: it is fallible and
    /// "none yet" is not "finished".
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Frame>, FramingError> {
        if self.failed {
            return Err(FramingError::Failed);
        }
        if let Some(total) = self.pending {
            return Ok(self.take(total));
        }
        // CRLFs before a start line (RFC 3261 §7.5) are keep-alives: CRLFCRLF is a ping, a lone
        // CRLF is a pong and is ignored (RFC 5626 §4.4.1).
        loop {
            let b = &self.buf[..];
            if b.starts_with(b"\r\n\r\n") {
                self.buf.advance(4);
                self.scanned = 0;
                return Ok(Some(Frame::KeepAlive));
            }
            if b"\r\n\r\n".starts_with(b) && !b.is_empty() {
                // "\r", "\r\n" or "\r\n\r": wait to tell a ping from a pong.
                return Ok(None);
            }
            if b.starts_with(b"\r\n") {
                self.buf.advance(2);
                self.scanned = 0;
                continue;
            }
            break;
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        let window = self.buf.len().min(self.max_header.saturating_add(4));
        // Resume the search 3 bytes back: a CRLFCRLF may straddle two pushes.
        let from = self.scanned.saturating_sub(3).min(window);
        let found = self
            .buf
            .get(from..window)
            .and_then(|w| memmem::find(w, b"\r\n\r\n"))
            .map(|i| i + from);
        let Some(blank) = found else {
            if self.buf.len() >= self.max_header.saturating_add(4) {
                return self.fatal(FramingError::HeaderTooLarge {
                    limit: self.max_header,
                });
            }
            self.scanned = window;
            return Ok(None);
        };
        let head_len = blank + 4;
        let cl = match scan_content_length(self.buf.get(..blank + 2).unwrap_or(&[])) {
            Ok(Some(n)) => n,
            Ok(None) => return self.fatal(FramingError::MissingContentLength),
            Err(SipParseError::ConflictingContentLength) => {
                return self.fatal(FramingError::ConflictingContentLength)
            }
            Err(SipParseError::BadContentLength(r)) => {
                return self.fatal(FramingError::BadContentLength(r))
            }
            Err(_) => return self.fatal(FramingError::BadContentLength("unreadable")),
        };
        let total = head_len.saturating_add(cl);
        if total > self.max_message {
            return self.fatal(FramingError::MessageTooLarge {
                size: total,
                limit: self.max_message,
            });
        }
        self.pending = Some(total);
        Ok(self.take(total))
    }

    /// Cuts the message of `total` bytes off the front once it is all there.
    fn take(&mut self, total: usize) -> Option<Frame> {
        if self.buf.len() < total {
            return None;
        }
        self.pending = None;
        self.scanned = 0;
        let frame = self.buf.split_to(total).freeze();
        Some(match parse_exact(frame.clone()) {
            Ok(m) => match if self.routing_later {
                validate_framed(&m)
            } else {
                validate(&m)
            } {
                Ok(()) => Frame::Message(Box::new(m)),
                Err(r) => Frame::Bad {
                    status: r.status,
                    reason: r.reason,
                    bytes: frame,
                },
            },
            Err(e) => {
                let r = reject_for_parse_error(&e, &frame);
                Frame::Bad {
                    status: r.status,
                    reason: r.reason,
                    bytes: frame,
                }
            }
        })
    }
}

/// Finds Content-Length (or `l`) in a header section (start line included, ending with the
/// CRLF of the last header line) without building a message. Lines it cannot read are left for
/// the parser to report once the extent is known.
fn scan_content_length(head: &[u8]) -> Result<Option<usize>, SipParseError> {
    let mut found: Option<usize> = None;
    // Skip the start line.
    let Some(first) = memchr(b'\n', head) else {
        return Ok(None);
    };
    let mut pos = first + 1;
    while pos < head.len() {
        let start = pos;
        // Logical line: physical lines joined while the next one starts with SP/HTAB.
        let mut end;
        loop {
            let rest = head.get(pos..).unwrap_or(&[]);
            let nl = memchr(b'\n', rest).map_or(head.len(), |i| pos + i);
            end = nl;
            pos = nl + 1;
            if matches!(head.get(pos), Some(b' ' | b'\t')) {
                continue;
            }
            break;
        }
        let line = head.get(start..end).unwrap_or(&[]);
        let Some(colon) = memchr(b':', line) else {
            continue;
        };
        let name = line.get(..colon).unwrap_or(&[]).trim_ascii_end();
        // Only `Content-Length` (14) and `l` (1) name it: other lengths are not classified.
        if !matches!(name.len(), 1 | 14) || HeaderName::classify(name) != HeaderName::ContentLength
        {
            continue;
        }
        let value: Vec<u8> = line
            .get(colon + 1..)
            .unwrap_or(&[])
            .iter()
            .copied()
            .filter(|&c| c != b'\r' && c != b'\n')
            .collect();
        let n = parse_content_length(value.trim_ascii())?;
        if found.is_some_and(|old| old != n) {
            return Err(SipParseError::ConflictingContentLength);
        }
        found = Some(n);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPT: &[u8] = b"OPTIONS sip:a@example.com SIP/2.0\r\n\
Via: SIP/2.0/TLS h.example.com;branch=z9hG4bK1\r\n\
To: <sip:a@example.com>\r\n\
From: <sip:b@example.com>;tag=1\r\n\
Call-ID: x1\r\n\
CSeq: 1 OPTIONS\r\n\
Content-Length: 5\r\n\
\r\n\
hello";

    #[test]
    fn byte_by_byte_with_keepalives() {
        let mut f = Framer::default();
        let mut input = b"\r\n\r\n\r\n".to_vec();
        input.extend_from_slice(OPT);
        input.extend_from_slice(OPT);
        let mut frames = Vec::new();
        for b in input {
            f.push(&[b]);
            while let Ok(Some(fr)) = f.next() {
                frames.push(fr);
            }
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0], Frame::KeepAlive);
        assert!(matches!(&frames[1], Frame::Message(m) if m.body() == b"hello"));
        assert!(matches!(&frames[2], Frame::Message(m) if m.to_bytes()[..] == OPT[..]));
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn bad_message_with_known_extent_survives() {
        let bad = String::from_utf8_lossy(OPT).replace("CSeq: 1 OPTIONS", "CSeq: 1e3 OPTIONS");
        let mut f = Framer::default();
        f.push(bad.as_bytes());
        f.push(OPT);
        assert!(matches!(
            f.next(),
            Ok(Some(Frame::Bad {
                status: Some(400),
                ..
            }))
        ));
        assert!(matches!(f.next(), Ok(Some(Frame::Message(_)))));
    }

    /// By default the routing headers are validated here; a consumer that checks them itself
    /// gets the message, everything else still validated.
    #[test]
    fn routing_headers_checked_later_on_request() {
        let bad_from = String::from_utf8_lossy(OPT).replace("<sip:b@example.com>", "<sip:b@");
        let bad_cseq = String::from_utf8_lossy(OPT).replace("CSeq: 1 OPTIONS", "CSeq: x");
        for (later, input, framed) in [
            (false, &bad_from, false),
            (true, &bad_from, true),
            (true, &bad_cseq, false),
        ] {
            let mut f = Framer::default();
            if later {
                f = f.routing_checked_later();
            }
            f.push(input.as_bytes());
            let got = f.next();
            assert_eq!(
                matches!(got, Ok(Some(Frame::Message(_)))),
                framed,
                "{later} {input}: {got:?}"
            );
        }
    }

    #[test]
    fn fatal_errors() {
        let conflicting = String::from_utf8_lossy(OPT)
            .replace("Content-Length: 5\r\n", "Content-Length: 5\r\nl: 6\r\n");
        let missing = String::from_utf8_lossy(OPT).replace("Content-Length: 5\r\n", "");
        let huge = String::from_utf8_lossy(OPT).replace("Length: 5", "Length: 300000");
        let neg = String::from_utf8_lossy(OPT).replace("Length: 5", "Length: -5");
        for (input, want) in [
            (conflicting, FramingError::ConflictingContentLength),
            (missing, FramingError::MissingContentLength),
            (
                huge.clone(),
                FramingError::MessageTooLarge {
                    size: huge.len() - 5 + 300000,
                    limit: DEFAULT_MAX_MESSAGE_BYTES,
                },
            ),
            (neg, FramingError::BadContentLength("negative")),
        ] {
            let mut f = Framer::default();
            f.push(input.as_bytes());
            assert_eq!(f.next(), Err(want));
            assert_eq!(f.next(), Err(FramingError::Failed));
        }
        let mut f = Framer::new(64, 1024);
        f.push(&[b'a'; 100]);
        assert_eq!(f.next(), Err(FramingError::HeaderTooLarge { limit: 64 }));
    }
}
