//! Intercluster peering (issue 13; requirements §5, seeds 000 and 002): clusters of one local
//! domain tell each other which users live where, so that each can later route to the others.
//!
//! This part owns the **link** (gRPC over mutual TLS, or plaintext TCP in a lab, on
//! `intercluster.listen`; `proto/intercluster.proto`), the **user sync** and its status and
//! alarm, and the **routing** over the link ([`routes`], `forward`; issue 13 §3).
//!
//! - **What we contribute** ([`changelog`]): the users this cluster's home nodes have spoken
//!   for (the learned directory, `directory/<user>` in the shared store), the users
//!   `[[home_node]] users` lists, and those an admin pins with `legate intercluster users add
//!   USER HOME_NODE` — which writes the directory entry itself, so a pinned user is routed to
//!   that home node locally too and there is one list of "who lives here", not two. Each node
//!   keeps a bounded, versioned log of the changes so a peer is answered incrementally.
//! - **What we learn** ([`agent`], `run`): the sync agent runs on the cluster leader (a
//!   single node is its own leader), asks each peer for its users every
//!   `sync_interval_mins`, and writes the result to `intercluster/users/<peer>/<user>` with
//!   its status at `intercluster/status/<peer>`. Every node follows those keys into an
//!   [`index::Index`]. A failed sync never removes a peer's users (split brain: they stay
//!   routable); a complete answer replaces them; the next good sync reconciles.
//! - **Alarm** `InterClusterSyncAgentPeerPeriodicSyncingFailure` when a peer has not been
//!   synced for `stuck_after_secs`; with `auto_recovery` the agent restarts for that peer.
//! - **Routing**: foreign traffic for a user a peer hosts is forwarded there (`Forward`); the
//!   peer remembers which cluster the conversation came through and sends its user's answers
//!   back that way, so the foreign side sees them on the dialog or stream it opened. A local
//!   user nobody placed is asked about (`Lookup`) before being refused.
//! - **Force sync**: `legate intercluster force-sync [PEER] [--full]` on any node writes
//!   `intercluster/force/<peer>`; the leader's agent picks it up.

pub mod agent;
pub mod changelog;
#[cfg(feature = "cluster")]
mod forward;
pub mod index;
#[cfg(feature = "cluster")]
mod link;
pub mod routes;
#[cfg(feature = "cluster")]
mod run;
#[cfg(feature = "cluster")]
mod tls;

#[cfg(feature = "cluster")]
pub use run::{start, Intercluster};

use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;

/// Store keys of the peering (under the cluster's root, like every shared key).
pub mod keys {
    /// `intercluster/users/<peer>/<user>`: `user` lives in peer cluster `peer`.
    pub const USERS: &str = "intercluster/users/";
    /// `intercluster/status/<peer>`: the last sync with `peer` (JSON, see `run::PeerStatus`).
    pub const STATUS: &str = "intercluster/status/";
    /// `intercluster/callers/<name>`: a cluster that called us but that we do not list.
    pub const CALLERS: &str = "intercluster/callers/";
    /// `intercluster/force/<peer>` (`*`: every peer): a forced sync the leader has not
    /// started yet.
    pub const FORCE: &str = "intercluster/force/";
    /// `intercluster/returns/<user>/<foreign>` = `<peer> <unix seconds>`: answers of our `user`
    /// to the foreign JID go back through `peer` (see `routes`).
    pub const RETURNS: &str = "intercluster/returns/";
    /// Everything above.
    pub const ROOT: &str = "intercluster/";

    pub fn user(peer: &str, user: &str) -> String {
        format!("{USERS}{peer}/{user}")
    }

    pub fn users_of(peer: &str) -> String {
        format!("{USERS}{peer}/")
    }

    /// `(peer, user)` of a `intercluster/users/…` key.
    pub fn parse_user(key: &str) -> Option<(&str, &str)> {
        key.strip_prefix(USERS)?
            .split_once('/')
            .filter(|(p, u)| !p.is_empty() && !u.is_empty())
    }
}

/// Whether `name` may be a cluster name (the rule of `intercluster.name`): what a peer says
/// its name is becomes part of a store key, so it is checked first.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

/// The name of the alarm (seed 002's, kept as is).
pub const ALARM: crate::ops::alarms::AlarmName =
    crate::ops::alarms::AlarmName::InterClusterSyncAgentPeerPeriodicSyncingFailure;

pub(crate) static SYNC_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    crate::metrics::histogram_vec(
        "legate_intercluster_sync_seconds",
        "Duration of user syncs with peer clusters (dial, transfer and store writes), by \
         outcome (complete, incremental, failed)",
        &["outcome"],
        &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0],
    )
});
pub(crate) static SYNCS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_intercluster_syncs_total",
        "User syncs with peer clusters run by this node (as leader), by outcome (complete, \
         incremental, failed)",
        &["outcome"],
    )
});
pub(crate) static PEER_USERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    crate::metrics::gauge_vec(
        "legate_intercluster_peer_users",
        "Users each peer cluster contributed at its last good sync (peers from \
         [[intercluster.peer]], at most 29), and their sum (peer=\"all\")",
        &["peer"],
    )
});
pub(crate) static RESTARTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_intercluster_agent_restarts_total",
        "Restarts of the sync agent for a peer, by reason (stuck: no success for \
         stuck_after_secs with auto_recovery; failing: four failed periods in a row)",
        &["reason"],
    )
});
pub(crate) static SERVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_intercluster_served_total",
        "User lists this node sent to peer clusters, by answer (complete, incremental, \
         refused: a caller we do not list)",
        &["answer"],
    )
});

pub(crate) static CALLERS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_intercluster_callers_refused_total",
        "Callers this node's intercluster listener refused, by reason (tls_handshake, \
         tls_timeout, certificate_names: the certificate does not name the address we list for \
         the cluster it says it is, not_listed: a cluster we do not list)",
        &["reason"],
    )
});
pub(crate) static FORWARDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_intercluster_forwarded_total",
        "Envelopes forwarded over the intercluster link, by direction (out: to a peer cluster, \
         in: from one) and outcome (delivered, refused, unavailable, invalid; out only: failed, \
         the peer could not be reached; in only: refused_caller, a cluster we do not list)",
        &["direction", "outcome"],
    )
});
pub(crate) static FORWARD_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    crate::metrics::histogram_vec(
        "legate_intercluster_forward_seconds",
        "Round trip of a Forward call to a peer cluster (one batch), by outcome (answered, \
         failed)",
        &["outcome"],
        &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0,
        ],
    )
});
pub(crate) static LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_intercluster_lookups_total",
        "Questions about unplaced users between peer clusters, by direction (out: asked by \
         this node, in: answered) and answer (yes, no; out only: failed)",
        &["direction", "answer"],
    )
});

/// Creates the families at start (at zero).
pub fn register_metrics() {
    for d in ["out", "in"] {
        for o in ["delivered", "refused", "unavailable", "invalid"] {
            FORWARDED.with_label_values(&[d, o]);
        }
        for a in ["yes", "no"] {
            LOOKUPS.with_label_values(&[d, a]);
        }
    }
    FORWARDED.with_label_values(&["out", "failed"]);
    FORWARDED.with_label_values(&["in", "refused_caller"]);
    for r in [
        "tls_handshake",
        "tls_timeout",
        "certificate_names",
        "not_listed",
    ] {
        CALLERS_REFUSED.with_label_values(&[r]);
    }
    LOOKUPS.with_label_values(&["out", "failed"]);
    for o in ["answered", "failed"] {
        FORWARD_SECONDS.with_label_values(&[o]);
    }
    for o in ["complete", "incremental", "failed"] {
        SYNC_SECONDS.with_label_values(&[o]);
        SYNCS.with_label_values(&[o]);
    }
    for r in ["stuck", "failing"] {
        RESTARTS.with_label_values(&[r]);
    }
    for a in ["complete", "incremental", "refused"] {
        SERVED.with_label_values(&[a]);
    }
    PEER_USERS.with_label_values(&["all"]);
}

/// An admin answer: HTTP status and JSON body.
pub type Answer = (u16, serde_json::Value);
pub type HookFuture<'a> = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;

/// What the admin endpoint asks of the running peering (installed on the node's `Control`).
pub trait AdminHook: Send + Sync {
    /// Asks the leader for a sync of `peer` (`None`: every peer) now.
    fn force_sync(&self, peer: Option<String>, full: bool) -> HookFuture<'_>;
    /// Pins `user` on `home_node` (`add`), or removes its directory entry.
    fn users(&self, add: bool, user: String, home_node: Option<String>) -> HookFuture<'_>;
    /// Which peer cluster `user` lives in, as this node knows it.
    fn lookup(&self, user: &str) -> Answer;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_names_are_checked() {
        let k = keys::user("emea", "bob@example.com");
        assert_eq!(keys::parse_user(&k), Some(("emea", "bob@example.com")));
        assert_eq!(keys::parse_user("intercluster/users/emea"), None);
        assert_eq!(keys::parse_user("intercluster/status/emea"), None);
        assert!(valid_name("emea-1.example"));
        assert!(!valid_name("EMEA") && !valid_name("a/b") && !valid_name(""));
    }
}
