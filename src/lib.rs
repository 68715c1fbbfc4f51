//! Legate: a SIP/XMPP federation gateway.
//!
//! Layout (one module per layer; codecs and protocol machines are sans-IO):
//! - `diag`: `file:line:col` diagnostics for admin-edited files.
//! - `config`: the node's TOML configuration: schema, defaults, validation.
//! - `presence`: wire facts, codecs (XMPP presence, PIDF/RPID, msrtc) and the mapping tables.
//! - `sip`: SIP codec, validation, framing, transactions (federation edge toward Lync/S4B).
//! - `xmpp`: XMPP stream framing, s2s and XEP-0114 component links.
#![forbid(unsafe_code)]

pub mod config;
pub mod diag;
pub mod dns;
pub mod presence;
pub mod sip;
pub mod tls;
pub mod xmpp;
