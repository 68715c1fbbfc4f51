//! XMPP edge: stream framing, s2s federation and the XEP-0114 link to home nodes.
//!
//! Layout: `stream` (sans-IO framer with limits), `stanza` (zero-copy view of a framed element
//! and stanza-level checks), `error` (stream/stanza error conditions and their XML), `jid`,
//! `component` (XEP-0114 handshake machine), `dialback` (XEP-0185 keys, XEP-0220 elements) and
//! `s2s_negotiate` (RFC 6120 s2s stream negotiation machine). None of these do I/O.

pub mod component;
pub mod convert;
pub mod dialback;
pub mod error;
pub mod jid;
pub mod s2s;
pub mod s2s_negotiate;
pub mod stanza;
pub mod stream;
