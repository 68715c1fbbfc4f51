//! `legate run`: starts one gateway node from a validated configuration. Everything is checked
//! before any port is bound; then the admin endpoint, the mapping reloader and the edges start,
//! each as tasks that stop when `shutdown` turns true.
//!
//! Each bound listener is announced on stdout as `legate: listening <name> <addr>` (the address
//! actually bound, so a configuration with port 0 tells a test harness where to connect).

use crate::admin;
use crate::config::{Config, Domain};
use crate::diag::Diagnostics;
use crate::gateway::Hub;
use crate::presence::map::MappingStore;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid mapping files:\n{0}")]
    Mappings(Diagnostics),
    #[error("cannot bind the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Edge(String),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// Announces a bound listener (see the module doc for the format).
pub fn announce(name: &str, addr: std::net::SocketAddr) {
    println!("legate: listening {name} {addr}");
    tracing::info!(listener = name, %addr, "listening");
}

/// Runs the node until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), RunError> {
    let started = Instant::now();
    let maps_dir = config.mappings.dir.clone();
    let reload = config.mappings.reload;
    let maps = MappingStore::open(maps_dir.clone()).map_err(RunError::Mappings)?;
    let admin_addr = config.node.admin_listen;
    // The state store, one per node (consent lists, SIP subscriptions), is read before
    // anything binds: a corrupt journal stops the node with the file and offset named, before
    // any partner sees it half-restored.
    let data_dir = config.node.data_dir.clone();
    if let crate::config::Store::Etcd { .. } = config.cluster.store {
        tracing::warn!(
            "cluster.store = \"etcd\" is not implemented yet: state stays in the embedded store under node.data_dir"
        );
    }
    let embedded = Arc::new(
        tokio::task::spawn_blocking(move || crate::store::embedded::Embedded::open(&data_dir))
            .await
            .map_err(|e| RunError::Edge(format!("state store: {e}")))??,
    );
    let store: crate::store::SharedStore = embedded.clone();
    let hub = Hub::new(config, maps);
    hub.add_status(
        "store",
        Arc::new(move || {
            let (keys, revision) = embedded.stats();
            serde_json::json!({
                "kind": "embedded",
                "path": embedded.path().map(|p| p.display().to_string()),
                "keys": keys,
                "revision": revision,
            })
        }),
    );
    // Edges load their TLS material and secrets before anything binds.
    let s2s = crate::xmpp::s2s::prepare(hub.clone(), crate::xmpp::s2s::S2sOptions::default())
        .map_err(|e| RunError::Edge(e.to_string()))?;

    // The admin token file is read before anything binds: a missing one stops the node.
    let admin =
        admin::Admin::new(hub.clone(), started).map_err(|e| RunError::Edge(e.to_string()))?;
    crate::metrics::register_all();
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| RunError::Bind {
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
    .map_err(|e| RunError::Edge(format!("cannot load the consent lists: {e}")))?;
    crate::gateway::directory_store::start(
        hub.clone(),
        store.clone(),
        shutdown.clone(),
        &mut tasks,
    )
    .await
    .map_err(|e| RunError::Edge(format!("cannot load the learned directory: {e}")))?;
    tasks.spawn(admin.serve(listener, shutdown.clone()));
    if let (Some(dir), true) = (maps_dir, reload) {
        tasks.spawn(watch_mappings(hub.clone(), dir, shutdown.clone()));
    }

    // The edges register their outboxes with the hub and run until shutdown.
    let sip = crate::sip::edge::SipEdge::start_with_store(
        hub.clone(),
        shutdown.clone(),
        None,
        store.clone(),
    )
    .await
    .map_err(|e| RunError::Edge(e.to_string()))?;
    let s2s = s2s
        .spawn(shutdown.clone(), &mut tasks)
        .await
        .map_err(|e| RunError::Edge(e.to_string()))?;
    for (name, addr) in s2s.listeners {
        announce(name, addr);
    }

    // Component links to the home nodes: outbound only, so nothing is announced; each
    // connection logs when its handshake completes.
    let resolver = if crate::xmpp::link::needs_resolver(&hub.config()) {
        Some(
            crate::dns::Resolver::from_config(&hub.config()).map_err(|e| {
                RunError::Edge(format!("cannot set up DNS for the home-node links: {e}"))
            })?,
        )
    } else {
        None
    };
    let settings = crate::xmpp::link::LinkSettings::from_config(&hub.config());
    // Open federation: each domain opened on demand is written to the store (one writer task;
    // the opener never waits), and those opened before a restart are opened again below, so
    // local users reach them before they write again.
    let (opened_tx, opened_rx) = tokio::sync::mpsc::unbounded_channel::<Domain>();
    let links = crate::xmpp::link::spawn_with(
        hub.clone(),
        resolver,
        settings,
        shutdown.clone(),
        &mut tasks,
        Some(Box::new(move |d: &Domain| {
            let _ = opened_tx.send(d.clone());
        })),
    );
    tasks.spawn(write_opened_domains(
        store.clone(),
        opened_rx,
        shutdown.clone(),
    ));
    let reopened = reopen_domains(&hub, &store).await;
    if reopened > 0 {
        tracing::info!(
            domains = reopened,
            "open federation: component links of earlier domains opened again"
        );
    }
    let status = links.status.clone();
    let grace = Duration::from_secs(hub.config().limits.home_link_alarm_grace_secs);
    tasks.spawn(crate::ops::alarms::watch_links(
        hub.alarms().clone(),
        status.clone(),
        grace,
        shutdown.clone(),
    ));
    tasks.spawn(crate::ops::alarms::watch_certificates(
        hub.alarms().clone(),
        hub.config(),
        shutdown.clone(),
    ));
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
                        })
                    })
                    .collect(),
            )
        }),
    );

    // Every listener is bound and announced: systemd (Type=notify) may call us started.
    crate::ops::notify::ready();
    let mut shutdown = shutdown;
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    crate::ops::notify::stopping();
    tracing::info!("shutting down");
    sip.join(Duration::from_secs(5)).await;
    // Give tasks a bounded time to drain, then drop them.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

static RELOADS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_mapping_reloads_total",
        "Edits of the mapping directory seen by the reloader, by outcome (ok, refused)",
        &["outcome"],
    )
});

/// What the admin `/status` shows about the mapping files in use.
#[derive(Debug, Default)]
struct ReloadState {
    reloads: u64,
    refused: u64,
    /// The problems of the last refused edit, `file:line:col: message` each.
    last_refused: Vec<String>,
}

/// Polls the mapping directory and swaps in a valid edit; an invalid edit is logged and the
/// last good set stays in use. Polling (not inotify) because editors save by rename and
/// network file systems do not deliver events; one `stat` per file every 2 s is cheap.
async fn watch_mappings(hub: Arc<Hub>, dir: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let state = Arc::new(std::sync::Mutex::new(ReloadState::default()));
    {
        let (state, hub2, dir) = (state.clone(), hub.clone(), dir.clone());
        hub.add_status(
            "mappings",
            Arc::new(move || {
                let st = state
                    .lock()
                    .map(|s| (s.reloads, s.refused, s.last_refused.clone()))
                    .unwrap_or_default();
                serde_json::json!({
                    "dir": dir.display().to_string(),
                    "digest": hub2.maps().current().digest,
                    "reloads": st.0,
                    "refused": st.1,
                    "last_refused": st.2,
                })
            }),
        );
    }
    let mut last = fingerprint(&dir);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let now = fingerprint(&dir);
        if now == last {
            continue;
        }
        last = now;
        match hub.maps().reload() {
            Ok(()) => {
                RELOADS.with_label_values(&["ok"]).inc();
                if let Ok(mut s) = state.lock() {
                    s.reloads += 1;
                }
                tracing::info!(dir = %dir.display(), digest = %hub.maps().current().digest, "mapping files reloaded");
                hub.alarms().clear(
                    crate::ops::alarms::AlarmName::MappingReloadRefused,
                    &dir.display().to_string(),
                );
            }
            Err(d) => {
                RELOADS.with_label_values(&["refused"]).inc();
                if let Ok(mut s) = state.lock() {
                    s.refused += 1;
                    s.last_refused = d.0.iter().map(|x| x.to_string()).collect();
                }
                tracing::error!(dir = %dir.display(), problems = %d, "mapping edit refused; keeping the last good set");
                hub.alarms().raise(
                    crate::ops::alarms::AlarmName::MappingReloadRefused,
                    &dir.display().to_string(),
                    &d.to_string(),
                );
            }
        }
    }
}

fn fingerprint(dir: &std::path::Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut out = Vec::new();
    for sub in ["", "systems", "tables"] {
        let Ok(rd) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in rd.flatten() {
            let meta = e.metadata().ok();
            out.push((
                e.path(),
                meta.as_ref().and_then(|m| m.modified().ok()),
                meta.map_or(0, |m| m.len()),
            ));
        }
    }
    out.sort();
    out
}

/// Store prefix of the domains open federation opened (`federation/open/<domain>`).
const OPENED_PREFIX: &str = "federation/open/";

async fn write_opened_domains(
    store: crate::store::SharedStore,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Domain>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let d = tokio::select! {
            d = rx.recv() => match d { Some(d) => d, None => return },
            _ = shutdown.changed() => return,
        };
        let key = format!("{OPENED_PREFIX}{d}");
        if let Err(e) = store.put(&key, Vec::new()).await {
            tracing::warn!(domain = %d, error = %e, "open federation: domain not persisted");
        }
    }
}

/// Opens again the components of the domains stored by [`write_opened_domains`] (those the
/// configuration still allows); how many.
async fn reopen_domains(hub: &Hub, store: &crate::store::SharedStore) -> usize {
    let listing = match store.list(OPENED_PREFIX).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "open federation: earlier domains not read");
            return 0;
        }
    };
    listing
        .entries
        .iter()
        .filter_map(|e| e.key.strip_prefix(OPENED_PREFIX))
        .filter_map(|d| Domain::parse(d).ok())
        .filter(|d| hub.open_component_domain(d))
        .count()
}
