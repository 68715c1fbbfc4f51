//! A cluster of gateway nodes on etcd (issue 12; requirements §2 and §6, seeds 001, 003, 004).
//!
//! No consensus or membership protocol of our own: etcd decides.
//! - **Membership**: each node holds an etcd lease (TTL `cluster.lease_ttl_secs`, default 5 s)
//!   kept alive every TTL/3, and registers `members/<node-id>` under it. A node that dies
//!   disappears from the member list one TTL after its last keep-alive. At most
//!   [`MAX_PEERS`] nodes are live at once: a seventh is refused at start with a clear error.
//! - **Leader election**: etcd's election API (`campaign` on `leader`, with the member lease).
//!   A leader whose keep-alives fail for two thirds of the TTL steps down by itself, before
//!   etcd can elect another, so two leaders never act at once on a healthy etcd.
//! - **Singular duties** run on the leader only (today: compacting etcd's history, which
//!   every node's watches would otherwise keep forever).
//! - **Component links**: each (home node, foreign domain) connection is held by one live node,
//!   claimed in etcd under its lease ([`claims`]); the others hand that link's traffic to the
//!   holder over the **peer link** ([`peer`]: tonic over mutual TLS on the clustering port).
//! - **Shared state** is the [`crate::store::etcd::Etcd`] store; state a node owns (SIP
//!   dialogs) lives under `node/<id>/` through [`crate::store::prefixed::Prefixed`].
//!
//! Keys of one cluster live under `/legate/<cluster.name>/`, so one etcd can serve several.
//! - **Dead nodes' SIP subscriptions** are taken over by the leader ([`takeover`]); home-node
//!   presence and consent answers bound for SIP are copied to every node (each holds its own
//!   watchers), over the peer link.
//!
//! - **IM sessions** stay with the node that set them up: their owners are in etcd under the
//!   owner's lease ([`sessions`]), and the node holding a home node's link hands that pair's
//!   messages to the owner. An established session is also a record in the owner's part of
//!   etcd, so the leader takes a dead node's sessions over with its subscriptions.
//!
//! - **In-dialog SIP requests** reaching a node that does not own their dialog are handed to
//!   the owner: each node marks the local tags of the dialogs it creates
//!   ([`crate::sip::dialog::node_mark`]), so the partner's To tag names the owner (or, that
//!   node being dead, the leader that took its dialogs over); the owner's answers are written
//!   back on the partner's connection.
//!
//! What is not built yet (and says so in `legate cluster status`): `[cluster]` changes need a
//! restart.

#[cfg(feature = "cluster")]
pub mod claims;
#[cfg(feature = "cluster")]
pub mod peer;
#[cfg(feature = "cluster")]
pub mod replication;
#[cfg(feature = "cluster")]
mod session;
#[cfg(feature = "cluster")]
pub mod sessions;
mod stores;
#[cfg(feature = "cluster")]
pub mod takeover;

pub use stores::{NodeStores, Placed};

#[cfg(feature = "cluster")]
pub use session::{join, StandAside};

use serde::Serialize;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) static EVENTS: LazyLock<prometheus::IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_cluster_events_total",
        "Cluster events on this node: elected (became leader), stepped_down, lease_lost, \
         leader_changed (a new leader observed: failovers and first elections)",
        &["event"],
    )
});
pub(crate) static IS_LEADER: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    crate::metrics::gauge(
        "legate_cluster_leader",
        "1 while this node is the cluster leader",
    )
});
pub(crate) static MEMBERS: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    crate::metrics::gauge(
        "legate_cluster_members",
        "Live members of the cluster, as registered in etcd",
    )
});

/// The cluster's metric families, at zero, for a node's start (a single node shows them too,
/// so dashboards and alerts see 0, not "absent").
pub fn register_metrics() {
    for e in ["elected", "stepped_down", "lease_lost", "leader_changed"] {
        EVENTS.with_label_values(&[e]);
    }
    // Touched, not set: a node that joined before this ran keeps its values.
    LazyLock::force(&IS_LEADER);
    LazyLock::force(&MEMBERS);
    #[cfg(feature = "cluster")]
    {
        replication::register_metrics();
        claims::register_metrics();
        takeover::register_metrics();
        peer::register_metrics();
    }
}

/// Most nodes live in one cluster at once (requirements §6, seed 001).
pub const MAX_PEERS: usize = crate::config::MAX_CLUSTER_PEERS;

/// What this node is in its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Role {
    /// Registered, campaigning: another node leads (or none yet).
    Follower,
    /// Elected: runs the singular duties.
    Leader,
    /// Lost its etcd lease (etcd unreachable or no quorum): not a member until it gets a new
    /// one; traffic goes on with what is cached.
    Detached,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "FOLLOWER",
            Role::Leader => "LEADER",
            Role::Detached => "DETACHED",
        }
    }
}

/// One live member, as registered in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Member {
    pub id: String,
    /// Its clustering address (from `cluster.peers`).
    pub address: String,
    pub federation: bool,
    /// Unix seconds when it registered.
    pub since: u64,
}

/// What `legate cluster status` and `/status` show (seed 003's `xmpp cluster status`).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub node: String,
    pub cluster: String,
    pub role: Role,
    /// The elected leader's node id, when one is known.
    pub leader: Option<String>,
    pub members: Vec<Member>,
    /// Unix seconds of the last change of role, and what it was.
    pub last_change: u64,
    pub last_change_text: String,
    pub elections_won: u64,
    pub lease_losses: u64,
    pub lease_ttl_secs: u64,
    pub etcd_endpoints: Vec<String>,
    /// Unix seconds of the last compaction this node ran as leader, and its revision.
    pub last_compaction: Option<(u64, i64)>,
    /// The peers `cluster.peers` lists (live or not), `since` 0.
    pub configured_peers: Vec<Member>,
    /// The TLS material this node uses (paths), as seed 003's status shows it.
    pub tls: TlsInUse,
}

/// Paths of the key, certificate and trust bundle in use.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsInUse {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub trust_bundle: Option<String>,
    /// `cluster.tls_verify` of the peer link: `permissive` or `enforce`.
    pub peer_verify: String,
}

/// Why a node cannot join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "the cluster is full: {} nodes are live ({}) and a cluster has at most {MAX_PEERS}; \
         stop one of them, or split into two clusters peered with [intercluster]",
        .members.len(), .members.join(", ")
    )]
    Full { members: Vec<String> },
    #[error(
        "node.id `{id}` is already registered by a live node at {address}: every node of a \
         cluster needs its own node.id (if that node was just killed, its registration ends \
         within cluster.lease_ttl_secs; start again then)"
    )]
    DuplicateId { id: String, address: String },
    #[error(
        "node.id `{0}` is not in cluster.peers: add this node to [[cluster.peers]] on every \
         peer (the configuration primary first)"
    )]
    NotAPeer(String),
    #[error("cluster.name is not set: a cluster needs a name (its FQDN) to share an etcd")]
    NoName,
    #[error("cluster state store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("peer link: {0}")]
    PeerLink(String),
    #[error(
        "cluster.store = \"etcd\" needs a legate built with the `cluster` feature: \
         `cargo build --release --features cluster` (it needs protoc: apt-get install \
         protobuf-compiler)"
    )]
    NotBuilt,
}

/// The handle the node keeps: status for the admin endpoint, role for the duties.
#[derive(Clone)]
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub struct Cluster {
    state: Arc<Mutex<Status>>,
    role: tokio::sync::watch::Receiver<Role>,
    /// The etcd lease of the current term; `None` while detached.
    lease: tokio::sync::watch::Receiver<Option<i64>>,
    /// The session task, awaited by [`Cluster::left`] at shutdown.
    session: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
impl Cluster {
    fn new(status: Status, lease: i64) -> (Self, Senders) {
        let (tx, rx) = tokio::sync::watch::channel(status.role);
        let (lease_tx, lease_rx) = tokio::sync::watch::channel(Some(lease));
        (
            Self {
                state: Arc::new(Mutex::new(status)),
                role: rx,
                lease: lease_rx,
                session: Arc::new(Mutex::new(None)),
            },
            Senders {
                role: tx,
                lease: lease_tx,
            },
        )
    }

    /// Follows the etcd lease of the node's current term (`None` while detached): what this
    /// node writes under its lease (component-link claims) is written again under each new one.
    pub fn watch_lease(&self) -> tokio::sync::watch::Receiver<Option<i64>> {
        self.lease.clone()
    }

    /// The node ids of the live members that take part in federation (all live members when
    /// none does), sorted.
    pub fn federation_members(&self) -> Vec<String> {
        let members = self.status().map(|s| s.members).unwrap_or_default();
        let mut fed: Vec<String> = members
            .iter()
            .filter(|m| m.federation)
            .map(|m| m.id.clone())
            .collect();
        if fed.is_empty() {
            fed = members.into_iter().map(|m| m.id).collect();
        }
        fed.sort();
        fed.dedup();
        fed
    }

    /// The node ids of every live member, this one included.
    pub fn live_members(&self) -> Vec<String> {
        // Read under the lock without copying the whole status: the SIP fan-out asks this
        // for every presence a home node sends.
        self.state
            .lock()
            .map(|s| s.members.iter().map(|m| m.id.clone()).collect())
            .unwrap_or_default()
    }

    /// The node id of this node.
    pub fn node_id(&self) -> String {
        self.status().map(|s| s.node).unwrap_or_default()
    }

    fn set_session(&self, task: tokio::task::JoinHandle<()>) {
        if let Ok(mut s) = self.session.lock() {
            *s = Some(task);
        }
    }

    /// Waits (at most `limit`) for the session to finish leaving after shutdown was signalled.
    pub async fn left(&self, limit: Duration) {
        let task = self.session.lock().ok().and_then(|mut s| s.take());
        if let Some(task) = task {
            let _ = tokio::time::timeout(limit, task).await;
        }
    }

    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// Follows role changes (a duty starts when this turns `Leader`, stops when it leaves it).
    pub fn watch_role(&self) -> tokio::sync::watch::Receiver<Role> {
        self.role.clone()
    }

    pub fn status(&self) -> Option<Status> {
        self.state.lock().ok().map(|s| s.clone())
    }

    /// The status as JSON, for `/status` (`cluster` member).
    pub fn status_json(&self) -> serde_json::Value {
        match self.status() {
            Some(s) => {
                let mut v = serde_json::to_value(&s).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert(
                        "not_built_yet".into(),
                        serde_json::json!(["changes to [cluster] need a restart of the node",]),
                    );
                }
                v
            }
            None => serde_json::Value::Null,
        }
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }
}

/// The `cluster.peers` entry of node `id`.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) fn peer_entry<'a>(
    cfg: &'a crate::config::Config,
    id: &str,
) -> Option<&'a crate::config::ClusterPeer> {
    cfg.cluster.peers.iter().find(|p| p.name.to_string() == id)
}

/// What the session task sets in the [`Cluster`] handle.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) struct Senders {
    pub role: tokio::sync::watch::Sender<Role>,
    pub lease: tokio::sync::watch::Sender<Option<i64>>,
}

#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How long a node may go without a successful keep-alive before it steps down: two thirds
/// of the TTL, so it has stopped acting as leader before etcd lets the lease expire (at one
/// TTL) and elects another.
pub fn step_down_after(ttl: Duration) -> Duration {
    ttl * 2 / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_steps_down_before_its_lease_can_expire() {
        for secs in [2u64, 5, 60] {
            let ttl = Duration::from_secs(secs);
            assert!(step_down_after(ttl) < ttl);
            // Two keep-alives (every TTL/3) may be lost before stepping down.
            assert!(step_down_after(ttl) >= ttl / 3 * 2);
        }
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = ClusterError::Full {
            members: (1..=6).map(|i| format!("gw{i}")).collect(),
        };
        let t = e.to_string();
        assert!(
            t.contains("6 nodes are live") && t.contains("at most 6"),
            "{t}"
        );
        let t = ClusterError::DuplicateId {
            id: "gw1".into(),
            address: "10.0.0.1:7400".into(),
        }
        .to_string();
        assert!(t.contains("gw1") && t.contains("10.0.0.1:7400"), "{t}");
        assert!(ClusterError::NotBuilt
            .to_string()
            .contains("protobuf-compiler"));
    }

    #[test]
    fn status_json_names_the_role_and_what_is_not_built() {
        let (c, _senders) = Cluster::new(
            Status {
                node: "gw1".into(),
                cluster: "gw.example.com".into(),
                role: Role::Leader,
                leader: Some("gw1".into()),
                members: vec![],
                last_change: 0,
                last_change_text: String::new(),
                elections_won: 1,
                lease_losses: 0,
                lease_ttl_secs: 5,
                etcd_endpoints: vec![],
                last_compaction: None,
                configured_peers: vec![],
                tls: TlsInUse::default(),
            },
            1,
        );
        let v = c.status_json();
        assert_eq!(v["role"], "LEADER");
        assert!(v["not_built_yet"].as_array().is_some_and(|a| !a.is_empty()));
    }
}
