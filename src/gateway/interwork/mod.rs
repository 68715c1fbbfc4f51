//! The RFC 7247 / RFC 7572 mappings between SIP and XMPP, as tables and pure functions.
//!
//! - [`address`]: SIP URI ⇄ core address (RFC 7247 §6: percent-decoding, XEP-0106 escaping of
//!   what a JID localpart forbids, GRUU `gr` ⇄ resource, `sips:` never translated).
//! - [`errors`]: XMPP stanza error conditions ⇄ SIP status codes (RFC 7247 §7.1 and §7.2),
//!   one const row per table line.
//!
//! Sans-IO: no sockets, no time, no configuration. The SIP edge and the XMPP converters call
//! these; nothing here calls them back.

pub mod address;
pub mod errors;
