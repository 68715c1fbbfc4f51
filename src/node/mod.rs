//! The composition root of one gateway node (`legate run`). [`Node::build`] reads and checks
//! everything once, before any port is bound: the configuration and mapping files
//! ([`ConfigSource`]), the state store, the server TLS material (one `ServerTls`, shared by the
//! SIP and s2s edges so a reload rotates both), the DNS resolver of the home-node links and the
//! s2s secrets. [`Node::run`] then binds the admin endpoint, starts the edges, announces each
//! bound listener, and runs until `shutdown` turns true.
//!
//! Each bound listener is announced on stdout as `legate: listening <name> <addr>` (the address
//! actually bound, so a configuration with port 0 tells a test harness where to connect).
//!
//! Live operations live here too: [`reload`] (SIGHUP, `legate reload`), [`drain`] (`legate
//! drain`, SIGTERM's first step) and the signal loop ([`signals`]); the admin endpoint reaches
//! them through [`api`] with the [`Control`] handle the hub carries.

pub mod api;
pub mod drain;
mod federation;
mod mappings;
pub mod reload;
pub mod signals;
mod source;

pub use source::{configured_mappings_dir, ConfigSource};

use crate::admin;
use crate::cluster::NodeStores;
use crate::config::Domain;
use crate::diag::Diagnostics;
use crate::gateway::Hub;
use crate::presence::map::MappingStore;
use crate::store::SharedStore;
use crate::tls::{ClientTls, ServerTls};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration or its mapping set is invalid (`file:line:col: message` each).
    #[error("invalid configuration:\n{0}")]
    Config(Diagnostics),
    #[error("invalid mapping files:\n{0}")]
    Mappings(Diagnostics),
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("state store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("admin endpoint: {0}")]
    AdminToken(#[from] crate::admin::TokenError),
    #[error("the state store could not be opened: {0}")]
    StoreTask(#[from] tokio::task::JoinError),
    #[error("cannot set up DNS for the home-node links: {0}")]
    Dns(#[from] crate::dns::DnsError),
    #[error("SIP edge: {0}")]
    Sip(#[from] crate::sip::edge::EdgeError),
    #[error("s2s edge: {0}")]
    S2s(#[from] crate::xmpp::s2s::S2sError),
    #[error("intercluster peering: {0}")]
    Intercluster(String),
    #[error("cannot load the {what}: {source}")]
    Load {
        what: &'static str,
        source: crate::store::StoreError,
    },
}

/// Announces a bound listener (see the module doc for the format).
pub fn announce(name: &str, addr: std::net::SocketAddr) {
    println!("legate: listening {name} {addr}");
    tracing::info!(listener = name, %addr, "listening");
}

/// What the admin endpoint and the signal loop need to reload and drain the running node.
/// The hub carries it ([`Hub::node_control`]).
#[derive(Debug)]
pub struct Control {
    source: ConfigSource,
    /// The server TLS material every TLS listener serves from; `None`: no certificate.
    server_tls: Option<ServerTls>,
    /// The client TLS material of the SIP and s2s edges; `None`: no trust bundle.
    client_tls: Option<ClientTls>,
    last_reload: Mutex<Option<reload::ReloadReport>>,
    drain_since: Mutex<Option<drain::Since>>,
    /// The cluster's configuration replication, once started.
    replication: std::sync::OnceLock<Arc<dyn reload::ReplicationHook>>,
    /// The intercluster peering, once started.
    intercluster: std::sync::OnceLock<Arc<dyn crate::intercluster::AdminHook>>,
}

impl std::fmt::Debug for dyn reload::ReplicationHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicationHook")
    }
}

impl std::fmt::Debug for dyn crate::intercluster::AdminHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InterclusterHook")
    }
}

impl Control {
    /// Where the configuration is read from at each reload.
    pub fn source(&self) -> &ConfigSource {
        &self.source
    }

    /// Installs the configuration replication (once; later calls are ignored).
    pub fn set_replication(&self, hook: Arc<dyn reload::ReplicationHook>) {
        let _ = self.replication.set(hook);
    }

    pub fn replication(&self) -> Option<&Arc<dyn reload::ReplicationHook>> {
        self.replication.get()
    }

    /// The intercluster peering's admin operations, when it runs on this node.
    pub fn intercluster(&self) -> Option<&Arc<dyn crate::intercluster::AdminHook>> {
        self.intercluster.get()
    }
}

/// A node built and checked, nothing bound yet.
pub struct Node {
    hub: Arc<Hub>,
    control: Arc<Control>,
    stores: Arc<NodeStores>,
    server_tls: Option<ServerTls>,
    client_tls: Option<ClientTls>,
    s2s: crate::xmpp::s2s::Prepared,
    link_resolver: Option<crate::dns::Resolver>,
}

impl Node {
    /// Reads the configuration and mapping files of `source`, opens the state store, loads the
    /// TLS material, the resolver and the secrets; binds nothing.
    pub async fn build(source: ConfigSource) -> Result<Node, NodeError> {
        let config = source.load().map_err(NodeError::Config)?;
        for note in config.notes() {
            tracing::warn!("{note}");
        }
        let maps = MappingStore::open(config.mappings.dir.clone()).map_err(NodeError::Mappings)?;
        // The state store, one per node (consent lists, SIP subscriptions), is read before
        // anything binds: a corrupt journal stops the node with the file and offset named,
        // before any partner sees it half-restored.
        // With `cluster.store = "etcd"` this connects to etcd and proves it answers.
        let stores = Arc::new(NodeStores::open(&config).await?);
        let server_tls = match ServerTls::from_config(&config) {
            Ok(s) => Some(s),
            // The embedded development default has no certificate: the edges say what that
            // disables.
            Err(crate::tls::TlsError::NoServerCertificate) => None,
            Err(e) => return Err(e.into()),
        };
        // Outbound TLS needs the trust bundle to verify peers; without one the edges say
        // what that disables.
        let client_tls = match config.tls.trust_bundle {
            Some(_) => Some(ClientTls::from_config(&config)?),
            None => None,
        };
        let link_resolver = if crate::xmpp::link::needs_resolver(&config) {
            Some(crate::dns::Resolver::from_config(&config)?)
        } else {
            None
        };
        let hub = Hub::new(config, maps);
        let s2s = crate::xmpp::s2s::prepare(
            hub.clone(),
            crate::xmpp::s2s::S2sOptions {
                server_tls: server_tls.clone(),
                client_tls: client_tls.clone(),
                ..Default::default()
            },
        )?;
        let control = Arc::new(Control {
            source,
            server_tls: server_tls.clone(),
            client_tls: client_tls.clone(),
            last_reload: Mutex::new(None),
            drain_since: Mutex::new(None),
            replication: std::sync::OnceLock::new(),
            intercluster: std::sync::OnceLock::new(),
        });
        hub.set_node_control(control.clone());
        reload::register_metrics();
        Ok(Node {
            hub,
            control,
            stores,
            server_tls,
            client_tls,
            s2s,
            link_resolver,
        })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Binds the admin endpoint, starts the edges and the node's tasks, announces every bound
    /// listener, and runs until `shutdown` turns true; then gives the tasks a bounded time to
    /// finish (the s2s streams close with `<system-shutdown/>`).
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), NodeError> {
        let started = Instant::now();
        let Node {
            hub,
            control,
            stores,
            server_tls,
            client_tls,
            s2s,
            link_resolver,
        } = self;
        let store: SharedStore = stores.shared();
        // SIP dialogs are owned by this node: in a cluster they live under node/<id>/.
        let own_store: SharedStore = stores.own(&hub.config().node.id.to_string());
        {
            let stores = stores.clone();
            hub.add_status("store", Arc::new(move || stores.status_json()));
        }
        // With etcd, the node joins its cluster (membership, election) before anything binds:
        // a full cluster or a duplicate node id stops it with a clear error.
        let draining = {
            let hub = Arc::downgrade(&hub);
            Arc::new(move || hub.upgrade().is_some_and(|h| h.draining()))
        };
        let cluster = stores
            .join(
                &hub.config(),
                hub.alarms().clone(),
                shutdown.clone(),
                draining,
            )
            .await?;
        let mut placement = None;
        let mut serve_sip = None;
        if let Some(cluster) = cluster.clone() {
            // The subordinates take the primary's cluster-wide configuration before binding.
            let replication = stores.replicate(&hub, &control, shutdown.clone()).await;
            let placed = stores.placement(&hub, &cluster, shutdown.clone()).await?;
            let links = placed.as_ref().map(|p| p.status.clone());
            if let Some(p) = placed {
                announce("cluster", p.bound);
                placement = Some(p.placement);
                serve_sip = Some(p.serve_sip);
            }
            hub.add_status(
                "cluster",
                Arc::new(move || {
                    let mut v = cluster.status_json();
                    if let Some(o) = v.as_object_mut() {
                        if let Some(r) = &replication {
                            o.insert("replication".into(), r());
                        }
                        if let Some(l) = &links {
                            o.insert("links".into(), l());
                        }
                    }
                    v
                }),
            );
        }
        {
            let (hub2, control2) = (Arc::downgrade(&hub), control.clone());
            hub.add_status(
                "drain",
                Arc::new(move || match hub2.upgrade() {
                    Some(h) => {
                        serde_json::to_value(drain::status(&h, &control2)).unwrap_or_default()
                    }
                    None => serde_json::Value::Null,
                }),
            );
            let hub2 = Arc::downgrade(&hub);
            hub.add_status(
                "draining",
                Arc::new(move || serde_json::json!(hub2.upgrade().is_some_and(|h| h.draining()))),
            );
            let control = control.clone();
            hub.add_status(
                "reload",
                Arc::new(move || {
                    let last = control.last_reload.lock().ok().and_then(|l| l.clone());
                    serde_json::json!({
                        "config": control.source.display(),
                        "last": last,
                    })
                }),
            );
        }

        // After replication: a subordinate runs with the primary's cluster-wide values.
        let config = hub.config();
        let admin_addr = config.node.admin_listen;
        // The admin token file is read before anything binds: a missing one stops the node.
        let admin = admin::Admin::new(hub.clone(), started)?;
        crate::metrics::register_all();
        let listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .map_err(|source| NodeError::Bind {
                what: "admin",
                addr: admin_addr,
                source,
            })?;
        if let Ok(a) = listener.local_addr() {
            announce("admin", a);
        }
        let mut tasks = tokio::task::JoinSet::new();
        // Consent lists are in the cache before any edge takes traffic.
        crate::gateway::policy::persist::start(
            hub.policies().clone(),
            store.clone(),
            shutdown.clone(),
            &mut tasks,
        )
        .await
        .map_err(|source| NodeError::Load {
            what: "consent lists",
            source,
        })?;
        crate::gateway::directory_store::start(
            hub.clone(),
            store.clone(),
            shutdown.clone(),
            &mut tasks,
        )
        .await
        .map_err(|source| NodeError::Load {
            what: "learned directory",
            source,
        })?;
        start_intercluster(&hub, &control, &store, &cluster, &shutdown, &mut tasks).await?;
        tasks.spawn(admin.serve(listener, shutdown.clone()));
        if let (Some(dir), true) = (config.mappings.dir.clone(), config.mappings.reload) {
            tasks.spawn(mappings::watch_mappings(hub.clone(), dir, shutdown.clone()));
        }

        // The edges register their outboxes with the hub and run until shutdown.
        let sip = crate::sip::edge::SipEdge::start_with_tls(
            hub.clone(),
            shutdown.clone(),
            None,
            own_store,
            server_tls,
            client_tls,
        )
        .await?;
        if let Some(serve) = serve_sip {
            // Other nodes hand this one the partners' requests for its dialogs.
            serve(sip.relay_inbox());
        }
        if let Some(cluster) = &cluster {
            // As leader, this node takes over the SIP subscriptions of peers that died.
            stores.take_over_dialogs(cluster, sip.adopter(), shutdown.clone());
        }
        let s2s = s2s.spawn(shutdown.clone(), &mut tasks).await?;
        for (name, addr) in s2s.listeners {
            announce(name, addr);
        }

        // Component links to the home nodes: outbound only, so nothing is announced; each
        // connection logs when its handshake completes.
        let settings = crate::xmpp::link::LinkSettings::from_config(&config);
        // Open federation: each domain opened on demand is written to the store (one writer
        // task; the opener never waits), and those opened before a restart are opened again
        // below, so local users reach them before they write again.
        let (opened_tx, opened_rx) = tokio::sync::mpsc::unbounded_channel::<Domain>();
        let links = crate::xmpp::link::spawn_with(
            hub.clone(),
            link_resolver,
            settings,
            shutdown.clone(),
            &mut tasks,
            Some(Box::new(move |d: &Domain| {
                let _ = opened_tx.send(d.clone());
            })),
            placement,
        );
        tasks.spawn(federation::write_opened_domains(
            store.clone(),
            opened_rx,
            shutdown.clone(),
        ));
        let reopened = federation::reopen_domains(&hub, &store).await;
        if reopened > 0 {
            tracing::info!(
                domains = reopened,
                "open federation: component links of earlier domains opened again"
            );
        }
        let status = links.status.clone();
        let grace = Duration::from_secs(config.limits.home_link_alarm_grace_secs);
        tasks.spawn(crate::ops::alarms::watch_links(
            hub.alarms().clone(),
            status.clone(),
            grace,
            shutdown.clone(),
        ));
        {
            // The certificate alarms follow the configuration in use (a reload may name
            // other files).
            let hub2 = Arc::downgrade(&hub);
            let fallback = config.clone();
            tasks.spawn(crate::ops::alarms::watch_certificates(
                hub.alarms().clone(),
                move || {
                    hub2.upgrade()
                        .map_or_else(|| fallback.clone(), |h| h.config())
                },
                shutdown.clone(),
            ));
        }
        hub.add_status(
            "component_links",
            Arc::new(move || {
                serde_json::Value::Array(
                    status
                        .snapshot()
                        .into_iter()
                        .map(|(home_node, domain, s)| {
                            serde_json::json!({
                                "home_node": home_node,
                                "domain": domain.to_string(),
                                "up": s.up,
                                "peer": s.peer.map(|p| p.to_string()),
                                "connects": s.connects,
                                "failures": s.failures,
                                "last_failure": s.last_failure.map(|(label, text)| format!("{label}: {text}")),
                                "last_failure_age_secs": s.last_failure_at.map(|t| t.elapsed().as_secs()),
                                "queued": s.queued,
                                "held_by": s.held_by,
                            })
                        })
                        .collect(),
                )
            }),
        );

        // Every listener is bound and announced: systemd (Type=notify) may call us started.
        crate::ops::notify::ready();
        crate::net::stopped(shutdown).await;
        crate::ops::notify::stopping();
        tracing::info!("shutting down");
        if let Some(cluster) = &cluster {
            // Leaving (resign, revoke the lease) hands the leadership over at once instead of
            // after a TTL; bounded, since etcd may be the reason we stop.
            cluster.left(Duration::from_secs(3)).await;
        }
        sip.join(Duration::from_secs(5)).await;
        // Give tasks a bounded time to drain, then drop them.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        Ok(())
    }
}

/// The intercluster peering (issue 13), when `intercluster.listen` is set: its link is
/// announced as `intercluster`, its status is under `intercluster` in `/status`.
async fn start_intercluster(
    hub: &Arc<Hub>,
    control: &Arc<Control>,
    store: &SharedStore,
    cluster: &Option<crate::cluster::Cluster>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), NodeError> {
    #[cfg(feature = "cluster")]
    {
        let started = crate::intercluster::start(
            hub.clone(),
            store.clone(),
            cluster.clone(),
            shutdown.clone(),
            tasks,
        )
        .await
        .map_err(|e| NodeError::Intercluster(e.to_string()))?;
        if let Some(ic) = started {
            announce("intercluster", ic.bound);
            let status = ic.clone();
            hub.add_status("intercluster", Arc::new(move || status.status_json()));
            let _ = control.intercluster.set(ic);
        }
    }
    #[cfg(not(feature = "cluster"))]
    {
        let _ = (control, store, cluster, shutdown, tasks);
        if hub.config().intercluster.listen.is_some() {
            return Err(NodeError::Intercluster(
                "[intercluster] needs a legate built with the `cluster` feature: `cargo build \
                 --release --features cluster` (it needs protoc: apt-get install \
                 protobuf-compiler)"
                    .into(),
            ));
        }
    }
    Ok(())
}
