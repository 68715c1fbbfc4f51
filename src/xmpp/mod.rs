//! XMPP edge: stream framing, s2s federation and the XEP-0114 link to home nodes.
//!
//! Layout: `stream` (sans-IO framer with limits), `stanza` (zero-copy view of a framed element
//! and stanza-level checks), `error` (stream/stanza error conditions and their XML), `jid`,
//! `component` (XEP-0114 handshake machine), `dialback` (XEP-0185 keys, XEP-0220 elements) and
//! `s2s_negotiate` (RFC 6120 s2s stream negotiation machine). None of these do I/O.
//! `link` is the running side: the XEP-0114 connection tasks to the home nodes (sockets,
//! timers, failover), driving the `component` machine and the `convert` functions; `s2s` is
//! the running federation edge (listeners, outbound manager, dialback verification) driving
//! `s2s_negotiate`.

pub mod component;
pub mod convert;
pub mod dialback;
pub mod error;
pub mod jid;
pub mod link;
pub mod s2s;
pub mod s2s_negotiate;
pub mod stanza;
pub mod stream;
