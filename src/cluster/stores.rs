//! Which state store a node runs on, chosen once from `cluster.store` before anything binds.
//!
//! - `memory` (the default): the embedded journal under `node.data_dir`, one process per
//!   directory; shared and own state are the same store.
//! - `etcd`: the cluster's etcd. Shared state (consent lists, directory, open federation) is
//!   at the root of the cluster's keys; state this node owns (SIP dialogs) is under
//!   `node/<id>/` so a restarted node restores its own dialogs and no one else's.

use super::{Cluster, ClusterError};
use crate::config::Config;
use crate::ops::alarms::Alarms;
use crate::store::embedded::Embedded;
use crate::store::SharedStore;
use std::sync::Arc;

/// The node's opened store.
pub enum NodeStores {
    Embedded(Arc<Embedded>),
    #[cfg(feature = "cluster")]
    Etcd(Box<EtcdStores>),
}

/// What [`NodeStores::placement`] starts.
pub struct Placed {
    pub placement: Arc<dyn crate::xmpp::link::placement::Placement>,
    /// The clustering port as bound.
    pub bound: std::net::SocketAddr,
    /// `/status`'s `cluster.links`: each followed link and its holder.
    pub status: crate::gateway::hub::StatusProvider,
    /// Gives the peer link this node's SIP edge once it runs (requests other nodes relay for
    /// its dialogs).
    pub serve_sip: Box<dyn FnOnce(crate::sip::edge::RelayInbox) + Send>,
}

/// The etcd side of [`NodeStores`].
#[cfg(feature = "cluster")]
pub struct EtcdStores {
    client: etcd_client::Client,
    store: Arc<crate::store::etcd::Etcd>,
    endpoints: Vec<String>,
}

impl NodeStores {
    /// Opens the store `config` names: reads the embedded journal, or connects to etcd (a
    /// clear error when no endpoint answers, or when this build has no etcd support).
    pub async fn open(config: &Config) -> Result<NodeStores, ClusterError> {
        match &config.cluster.store {
            crate::config::Store::Memory => {
                let dir = config.node.data_dir.clone();
                let e = tokio::task::spawn_blocking(move || Embedded::open(&dir))
                    .await
                    .map_err(|e| {
                        crate::store::StoreError::Unavailable(format!("state store: {e}"))
                    })??;
                Ok(NodeStores::Embedded(Arc::new(e)))
            }
            #[cfg(feature = "cluster")]
            crate::config::Store::Etcd { endpoints } => {
                let name = config.cluster.name.as_ref().ok_or(ClusterError::NoName)?;
                let client = crate::store::etcd::connect(endpoints).await?;
                let store = Arc::new(crate::store::etcd::Etcd::new(
                    client.clone(),
                    &name.to_string(),
                ));
                // One read proves the endpoints answer and have quorum before we go on.
                crate::store::Store::get(store.as_ref(), "probe").await?;
                Ok(NodeStores::Etcd(Box::new(EtcdStores {
                    client,
                    store,
                    endpoints: endpoints.clone(),
                })))
            }
            #[cfg(not(feature = "cluster"))]
            crate::config::Store::Etcd { .. } => Err(ClusterError::NotBuilt),
        }
    }

    /// The store of cluster-wide state.
    pub fn shared(&self) -> SharedStore {
        match self {
            NodeStores::Embedded(e) => e.clone(),
            #[cfg(feature = "cluster")]
            NodeStores::Etcd(e) => e.store.clone(),
        }
    }

    /// The store of the state this node owns (its SIP dialogs).
    pub fn own(&self, node_id: &str) -> SharedStore {
        match self {
            NodeStores::Embedded(e) => {
                let _ = node_id;
                e.clone()
            }
            #[cfg(feature = "cluster")]
            NodeStores::Etcd(e) => Arc::new(crate::store::prefixed::Prefixed::new(
                e.store.clone(),
                crate::store::prefixed::Prefixed::node_prefix(node_id),
            )),
        }
    }

    /// What `/status` shows under `store`.
    pub fn status_json(&self) -> serde_json::Value {
        match self {
            NodeStores::Embedded(e) => {
                let (keys, revision) = e.stats();
                serde_json::json!({
                    "kind": "embedded",
                    "path": e.path().map(|p| p.display().to_string()),
                    "keys": keys,
                    "revision": revision,
                })
            }
            #[cfg(feature = "cluster")]
            NodeStores::Etcd(e) => serde_json::json!({
                "kind": "etcd",
                "endpoints": e.endpoints,
                "root": e.store.root(),
            }),
        }
    }

    /// Starts the configuration replication from the primary (see `replication`) when the
    /// store is etcd: the provider of `/status`'s `cluster.replication`; None on the embedded
    /// store.
    pub async fn replicate(
        &self,
        hub: &Arc<crate::gateway::Hub>,
        control: &Arc<crate::node::Control>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Option<crate::gateway::hub::StatusProvider> {
        match self {
            NodeStores::Embedded(_) => {
                let _ = (hub, control, shutdown);
                None
            }
            #[cfg(feature = "cluster")]
            NodeStores::Etcd(e) => Some(
                super::replication::start(e.client.clone(), hub.clone(), control.clone(), shutdown)
                    .await,
            ),
        }
    }

    /// In a cluster: starts the component-link claims and the peer link (bound on this
    /// node's clustering address), and returns the links' placement, the bound address and the
    /// `/status` provider of who holds which link. None on the embedded store.
    pub async fn placement(
        &self,
        hub: &Arc<crate::gateway::Hub>,
        cluster: &Cluster,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Placed>, ClusterError> {
        match self {
            NodeStores::Embedded(_) => {
                let _ = (hub, cluster, shutdown);
                Ok(None)
            }
            #[cfg(feature = "cluster")]
            NodeStores::Etcd(e) => {
                let name = hub
                    .config()
                    .cluster
                    .name
                    .as_ref()
                    .ok_or(ClusterError::NoName)?
                    .to_string();
                let claims = super::claims::Claims::start(
                    e.client.clone(),
                    &name,
                    cluster.clone(),
                    shutdown.clone(),
                );
                let (link, bound) =
                    super::peer::PeerLink::start(hub.clone(), claims.clone(), shutdown.clone())
                        .await
                        .map_err(|e| ClusterError::PeerLink(e.to_string()))?;
                // Every node's SIP edge holds its own watchers: home-node presence and consent
                // answers arriving here are copied to the others, and messages for an IM
                // session another node set up are handed to it.
                let sessions = super::sessions::Sessions::start(
                    e.client.clone(),
                    &name,
                    cluster.clone(),
                    shutdown.clone(),
                );
                hub.set_sip_peers(Arc::new(super::peer::ClusterSip {
                    fanout: super::peer::Fanout::new(link.clone(), cluster.clone()),
                    sessions,
                }));
                let status = claims.clone();
                let serving = link.clone();
                Ok(Some(Placed {
                    serve_sip: Box::new(move |inbox| serving.serve_sip(inbox)),
                    placement: Arc::new(super::peer::ClusterPlacement { claims, link }),
                    bound,
                    status: Arc::new(move || {
                        serde_json::Value::Array(
                            status
                                .snapshot()
                                .into_iter()
                                .map(|(link, holder)| {
                                    serde_json::json!({"link": link, "holder": holder})
                                })
                                .collect(),
                        )
                    }),
                }))
            }
        }
    }

    /// In a cluster: starts the leader's duty of taking over the SIP subscriptions of dead
    /// nodes into `adopter`'s edge (see `takeover`). Nothing on the embedded store.
    pub fn take_over_dialogs(
        &self,
        cluster: &Cluster,
        adopter: crate::sip::edge::Adopter,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        match self {
            NodeStores::Embedded(_) => {
                let _ = (cluster, adopter, shutdown);
            }
            #[cfg(feature = "cluster")]
            NodeStores::Etcd(e) => {
                let name = cluster.status().map(|s| s.cluster).unwrap_or_default();
                tokio::spawn(super::takeover::run(
                    e.client.clone(),
                    name,
                    e.store.root().to_string(),
                    cluster.clone(),
                    adopter,
                    shutdown,
                ));
            }
        }
    }

    /// Joins the cluster when the store is etcd (membership, election); None on the embedded
    /// store, where the node runs alone.
    pub async fn join(
        &self,
        config: &Config,
        alarms: Alarms,
        shutdown: tokio::sync::watch::Receiver<bool>,
        stand_aside: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Result<Option<Cluster>, ClusterError> {
        match self {
            NodeStores::Embedded(_) => {
                let _ = (config, alarms, shutdown, stand_aside);
                Ok(None)
            }
            #[cfg(feature = "cluster")]
            NodeStores::Etcd(e) => {
                super::join(e.client.clone(), config, alarms, shutdown, stand_aside)
                    .await
                    .map(Some)
            }
        }
    }
}
