//! SIP federation edge: codec, validation, framing, transactions, dialogs, subscriptions,
//! IM sessions and the running edge (`edge`).
//!
//! The codec layer (`message`, `parse`, `header`, `uri`, `validate`, `framing`, `check`) is
//! sans-IO: bytes in, messages or verdicts out, no sockets and no clocks. `txn` holds the
//! RFC 3261 §17 transaction machines, driven by events and an `Instant` passed in. The mapping
//! from any codec failure to what goes on the wire (400/505 or drop) lives in one place:
//! `validate::reject_for_parse_error` and `validate::validate`.

pub mod check;
pub mod dialog;
pub mod edge;
pub mod framing;
pub mod header;
pub mod im_session;
pub mod message;
pub mod parse;
pub mod routing;
pub mod subscription;
pub mod txn;
pub mod uri;
pub mod validate;

pub use framing::{Frame, Framer, FramingError};
pub use header::HeaderName;
pub use message::{HeaderRef, SipMessage};
pub use parse::{parse_bytes, parse_datagram, parse_exact, BodyMode};
pub use uri::{Host, Params, SipUri, Uri};
pub use validate::{check_datagram, validate, Reject};

/// Why a message could not be parsed. Each variant is a specific reason a peer (or an admin
/// running `legate sip check`) can act on; `validate::reject_for_parse_error` maps it to a
/// status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SipParseError {
    /// Nothing to parse.
    #[error("empty message")]
    Empty,
    /// No CRLFCRLF: the header section never ends.
    #[error("header section not terminated by an empty line")]
    NoHeaderEnd,
    /// Header text must be UTF-8 (RFC 3261 §25).
    #[error("header section is not valid UTF-8")]
    HeaderNotUtf8,
    /// A CR or LF that is not part of a CRLF line end.
    #[error("bare CR or LF in header section")]
    BareLineBreak,
    /// Malformed start line.
    #[error("malformed start line: {0}")]
    BadStartLine(&'static str),
    /// A well-formed SIP-Version other than 2.0 (answered with 505).
    #[error("SIP version not supported")]
    UnsupportedVersion,
    /// Status code not three digits in 100..=699.
    #[error("invalid status code")]
    BadStatusCode,
    /// Malformed Request-URI.
    #[error("malformed Request-URI: {0}")]
    BadRequestUri(&'static str),
    /// A header line that is not `name: value`.
    #[error("malformed header line: {0}")]
    BadHeaderLine(&'static str),
    /// A header name that is not a token.
    #[error("invalid header name")]
    BadHeaderName,
    /// A header value refused by an edit.
    #[error("invalid header value: {0}")]
    BadHeaderValue(&'static str),
    /// Content-Length negative, not a number or too large.
    #[error("invalid Content-Length: {0}")]
    BadContentLength(&'static str),
    /// Several Content-Length values that differ (RFC 4475 §3.3.9).
    #[error("conflicting Content-Length values")]
    ConflictingContentLength,
    /// Content-Length larger than the bytes received (RFC 3261 §18.3).
    #[error("Content-Length {declared} exceeds the {available} bytes of body received")]
    ContentLengthExceedsData {
        /// Declared length.
        declared: usize,
        /// Bytes present after the header section.
        available: usize,
    },
    /// In a stream frame the body must be exactly Content-Length bytes.
    #[error("body length differs from Content-Length")]
    ContentLengthMismatch,
    /// Content-Length is mandatory on streams (RFC 3261 §18.3, §20.14).
    #[error("missing Content-Length")]
    MissingContentLength,
}
