//! Presence: the wire-level facts the codecs produce, the admin-editable mapping tables that
//! give those facts a meaning per system (`mappings/`), and the codecs themselves.
//!
//! Layout:
//! - `aggregate`: a user's presence over their XMPP resources (RFC 6121 §4.7.2).
//! - `wire`: protocol facts (XMPP `<show/>`, PIDF basic/RPID, msrtc availability) — no meaning.
//! - `codec`: sans-IO encoders/decoders between bytes and `wire` values.
//! - `map`: systems, states, tables; loading, validation and translation.

pub mod aggregate;
pub mod codec;
pub mod convert;
pub mod map;
pub mod wire;
