//! The edge kit: the corridors every edge (SIP now; s2s and component links next) needs and
//! must not write again on its own — admission of connections (slots per listener and per
//! peer, a peer being an IPv4 address or an IPv6 /64), an accept loop that counts refusals and
//! backs off on accept errors, exponential backoff with jitter (per link or per destination),
//! bounded connects and writes, and a log-safe view of peer-controlled text.
//!
//! What it must not do: know any protocol. Nothing here parses SIP or XMPP or decides policy;
//! callers pass fixed `&'static str` edge names used as metric labels. The pure parts
//! (`admission`, `backoff`, `logsafe`) take time and randomness as arguments so they are
//! tested without a runtime; `accept`, `dial` and `write` are the thin tokio parts.

pub mod accept;
pub mod admission;
pub mod backoff;
pub mod dial;
pub mod logsafe;
pub mod metrics;
pub mod write;

pub use accept::{accept_admitted, AcceptPolicy, Accepted};
pub use admission::{Admission, PeerKey, Refusal, Slots};
pub use backoff::{Backoff, DestinationBackoff};
pub use dial::{connect_bounded, ConnectError};
pub use logsafe::LogSafe;
pub use write::{write_bounded, WriteError};

/// Resolves once `shutdown` says stop (or its sender is gone): the future a server's graceful
/// shutdown and the node's main wait are given.
pub async fn stopped(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
}
