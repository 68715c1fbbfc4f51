//! Which gateway node holds a component connection, when several nodes form a cluster.
//!
//! A home node such as Prosody accepts one connection per component, so in a cluster each
//! (home node, foreign domain) link is held by exactly one live node (issue 12 item 2). The
//! other nodes keep the link's outbox and hand what it receives to the holder over the peer
//! link. Who holds what is decided elsewhere (`cluster::claims`, on etcd); a link only follows
//! the answer through a [`Placement`]. A single node has no placement: it holds every link.

use crate::config::Domain;
use crate::gateway::envelope::Envelope;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::watch;

/// Who holds the connection of one (home node, domain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// This node: it connects to the home node.
    Me,
    /// Another live node (its node id): deliveries are handed to it.
    Peer(Arc<str>),
    /// Not settled yet (a claim in flight, or a dead holder not yet replaced): deliveries wait
    /// in the link's queue as they do while a connection is down.
    Unknown,
}

/// What became of one envelope handed to the holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// In the holder's outbox: it is the holder's now (delivered or bounced there).
    Accepted,
    /// The peer does not hold the link (the claim moved): keep it and try the next holder.
    NotHolder,
    /// The holder's outbox stayed full: bounce it as a timeout.
    Timeout,
    /// The peer could not read it: bounce it.
    Invalid,
}

/// A batch handed over: one outcome per envelope, or why the peer could not be asked at all
/// (then every envelope is kept and tried again).
pub type HandFuture = Pin<Box<dyn Future<Output = Result<Vec<Handed>, String>> + Send>>;

/// The cluster's side of the links.
pub trait Placement: Send + Sync {
    /// Follows the holder of (home node, domain); from now on this node takes part in
    /// claiming it.
    fn follow(&self, home_node: &str, domain: &Domain) -> watch::Receiver<Holder>;

    /// Hands `batch` (envelopes for `home_node`'s component of their sender domain, in order)
    /// to node `peer`.
    fn hand(&self, peer: Arc<str>, home_node: Arc<str>, batch: &[&Envelope]) -> HandFuture;
}
