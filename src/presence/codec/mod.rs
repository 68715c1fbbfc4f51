//! Presence codecs (sans-IO): bytes ⇄ `wire` values. Every decoder refuses hostile XML
//! (DTDs, entity declarations, non-predefined entity references, oversized input) instead of
//! expanding or skipping it.
//!
//! Layout:
//! - `xml`: the shared hostile-XML guard every decoder reads through (size, UTF-8, depth,
//!   restricted constructs, namespace resolution, text collection) and the shared escaper
//!   every encoder writes through.
//! - `xmpp`: one XMPP `<presence/>` stanza (RFC 6121 §4.7).
//! - `pidf`: PIDF documents (RFC 3863) with RPID activities (RFC 4480) and the XMPP `<show/>`
//!   embedding of RFC 8048 §4.3.
//! - `msrtc`: Microsoft `application/msrtc-event-categories+xml` documents (Lync/SfB `state`
//!   and `note` categories).
//! - `rlmi`: Lync batched subscriptions: the `batchSub` request body ([MS-PRES] §2.2.2.4),
//!   RLMI documents (RFC 4662 §5) and the `multipart/related` body (RFC 2387) around them.
//!
//! Codecs never decide what a state *means* (that is the mapping tables' job) and import nothing
//! from `tokio::net`/`tokio::io`.

pub mod msrtc;
pub mod pidf;
pub mod rlmi;
mod xml;
pub mod xmpp;

/// Largest presence document any decoder accepts, checked before anything else is looked at.
/// A presence stanza or PIDF/msrtc body is a few hundred bytes; 64 KiB leaves room for fat Lync
/// category sets while keeping a hostile peer from making us parse megabytes.
pub const MAX_PRESENCE_DOC: usize = 64 * 1024;

/// Deepest element nesting any decoder accepts. Real documents nest 5–8 levels (msrtc
/// `categories/category/state/activity/custom`); a deeper one is an attack or garbage.
pub const MAX_PRESENCE_DEPTH: usize = 32;

/// Why a presence document was refused. The caller maps these to the wire (XMPP
/// `<restricted-xml/>` / `<not-well-formed/>` / `<bad-request/>`, SIP 400) in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The input is larger than [`MAX_PRESENCE_DOC`]; nothing was parsed.
    #[error("presence document larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// Elements nest deeper than [`MAX_PRESENCE_DEPTH`].
    #[error("presence document nests deeper than {limit} elements")]
    TooDeep { limit: usize },
    /// The input is not UTF-8. XMPP requires it (RFC 6120 §11.6); RFC 3863 §4 also allows
    /// UTF-16 PIDF, which we do not accept (no federation peer we target sends it).
    #[error("presence document is not UTF-8 (valid up to byte {valid_up_to})")]
    InvalidUtf8 { valid_up_to: usize },
    /// A construct we refuse rather than process (RFC 6120 §11.1 restricted XML): DTD/DOCTYPE,
    /// entity declaration, entity reference other than the five predefined ones and numeric
    /// character references, processing instruction other than the XML declaration, and (in
    /// XMPP only) comments. The string names the construct, never echoes input.
    #[error("restricted XML construct: {0}")]
    Restricted(&'static str),
    /// Not well-formed XML (syntax error, truncated document, unbound prefix, illegal character).
    #[error("not well-formed XML: {0}")]
    NotWellFormed(String),
    /// Well-formed XML that is not a valid document of the expected kind (wrong root, bad
    /// `<priority/>`, unknown `<show/>` value, missing `entity`, ...). Only given once the whole
    /// input was read and found well-formed and free of restricted constructs: a hostile
    /// document always gets one of the variants above, never this one.
    #[error("invalid presence document: {0}")]
    Invalid(String),
}
