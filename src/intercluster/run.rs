//! The peering's drivers (thin: the decisions are in [`super::agent`] and
//! [`super::changelog`]): the link server, the follower of our users (the learned directory)
//! into the change log, the follower of `intercluster/` into the [`Index`] on every node, and the
//! sync agent on the leader, which dials the peers, writes what they answer to the store,
//! raises and clears the alarm, and writes each peer's status.

use super::agent::{Action, Agent, Outcome, Settings};
use super::changelog::{ChangeLog, Cursor, DEFAULT_CAPACITY};
use super::forward;
use super::index::Index;
use super::link::{self, Received};
use super::routes::Routing;
use super::tls::IcTls;
use super::{keys, Answer, HookFuture, ALARM};
use crate::cluster::{Cluster, Role};
use crate::config::{Config, InterclusterPeer, InterclusterTransport};
use crate::gateway::{directory_store, Address, Hub};
use crate::ops::alarms::unix_now;
use crate::store::{SharedStore, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Store writes per batch (etcd caps a transaction at 128 operations).
const WRITE_BATCH: usize = 128;
/// How often the agent reads the configuration again (a reload may change the interval).
const CONFIG_EVERY: Duration = Duration::from_secs(5);

/// Why the peering cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error("intercluster TLS: {0}")]
    Tls(#[from] super::tls::IcTlsError),
    #[error("cannot read our users from the state store: {0}")]
    Store(#[from] StoreError),
}

/// The last sync with one peer, as the leader writes it to `intercluster/status/<peer>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub reachable: bool,
    pub in_sync: bool,
    /// Users the peer contributed at its last good sync.
    pub users: u64,
    /// Unix seconds.
    pub last_sync_start: Option<u64>,
    pub last_sync_end: Option<u64>,
    /// `running`, `complete`, `incremental`, or `failed: why`.
    pub last_outcome: Option<String>,
    pub last_success: Option<u64>,
    /// Changes the last good sync carried.
    pub last_transferred: u64,
    /// Entries of the last answer refused (not a bare JID of our local domains).
    pub last_invalid: u64,
    pub certificate: Option<String>,
    /// Whether the peer lists this cluster (from its `Hello`).
    pub listed_by_peer: Option<bool>,
    pub cursor: Option<Cursor>,
    pub restarts: u64,
    pub alarm: bool,
    /// Attempts that ended (succeeded or failed) since this peer was first synced.
    pub syncs: u64,
}

/// The running peering of this node.
pub struct Intercluster {
    hub: Arc<Hub>,
    store: SharedStore,
    index: Arc<Index>,
    log: Arc<Mutex<ChangeLog>>,
    leading: Arc<AtomicBool>,
    routing: Arc<Routing>,
    refusals: Arc<link::Refusals>,
    pub bound: SocketAddr,
}

/// Starts the peering when `intercluster.listen` is set: serves the link, follows our users
/// and the peers' ones, and runs the sync agent whenever this node leads.
pub async fn start(
    hub: Arc<Hub>,
    store: SharedStore,
    cluster: Option<Cluster>,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<Option<Arc<Intercluster>>, StartError> {
    let cfg = hub.config();
    let Some(listen) = cfg.intercluster.listen else {
        return Ok(None);
    };
    let tls = match cfg.intercluster.transport {
        InterclusterTransport::Tls => Some(IcTls::from_config(&cfg)?),
        InterclusterTransport::Tcp => {
            tracing::warn!(
                "intercluster.transport = \"tcp\": the intercluster link is plaintext (labs only)"
            );
            None
        }
    };
    let epoch = rand::random::<u64>() | 1;
    let log = Arc::new(Mutex::new(ChangeLog::new(epoch, DEFAULT_CAPACITY)));
    follow_our_users(&hub, &store, &log, shutdown.clone(), tasks).await?;
    let index = Arc::new(Index::default());
    // Routing (issue 13 §3): the router reads the index and the return paths (both followed
    // from the store); one forwarder per listed peer (peers added by a reload get one at the
    // next start).
    let listed = peer_names(&cfg);
    let routing = Arc::new(Routing::new(index.clone(), &listed));
    follow_index(&store, &routing, shutdown.clone(), tasks).await?;
    let (tx, rx) = mpsc::channel(RETURN_WRITES);
    routing.write_to(tx);
    tasks.spawn(write_returns(store.clone(), rx));
    tasks.spawn(sweep_returns(routing.clone(), shutdown.clone()));
    hub.directory().set_mesh(routing.clone());
    let peers = forward::Peers::new(&cfg, tls.as_ref());
    for name in peers.names() {
        let rx = hub.register_intercluster(&name, forward::QUEUE);
        tasks.spawn(forward::run(
            Arc::downgrade(&hub),
            routing.clone(),
            peers.clone(),
            name,
            rx,
            shutdown.clone(),
        ));
    }
    hub.set_peer_asker(Arc::new(forward::Asker::new(
        Arc::downgrade(&hub),
        peers,
        routing.clone(),
        store.clone(),
        index.clone(),
    )));
    let refusals = Arc::new(link::Refusals::default());
    let service = link::Service {
        hub: Arc::downgrade(&hub),
        routing: routing.clone(),
        index: index.clone(),
        config: {
            let hub = Arc::downgrade(&hub);
            let fallback = cfg.clone();
            Arc::new(move || {
                hub.upgrade()
                    .map_or_else(|| fallback.clone(), |h| h.config())
            })
        },
        log: log.clone(),
        store: store.clone(),
        refusals: refusals.clone(),
    };
    let bound = link::serve(listen, tls.clone(), service, shutdown.clone()).await?;
    let ic = Arc::new(Intercluster {
        hub: hub.clone(),
        store: store.clone(),
        index,
        log,
        leading: Arc::new(AtomicBool::new(false)),
        routing,
        refusals,
        bound,
    });
    tasks.spawn(agent_duty(ic.clone(), tls, cluster, shutdown));
    Ok(Some(ic))
}

fn static_users(cfg: &Config) -> HashSet<String> {
    cfg.home_nodes
        .iter()
        .flat_map(|h| h.users.iter().map(|u| u.to_string()))
        .collect()
}

fn directory_user(key: &str) -> Option<&str> {
    key.strip_prefix(directory_store::PREFIX)
}

/// Our users into the change log: the `[[home_node]] users` and the learned directory.
async fn follow_our_users(
    hub: &Arc<Hub>,
    store: &SharedStore,
    log: &Arc<Mutex<ChangeLog>>,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), StoreError> {
    let fixed = Arc::new(static_users(&hub.config()));
    let load = {
        let (store, log, fixed) = (store.clone(), log.clone(), fixed.clone());
        move || {
            let (store, log, fixed) = (store.clone(), log.clone(), fixed.clone());
            async move {
                let listing = store.list(directory_store::PREFIX).await?;
                let mut all: HashSet<String> = (*fixed).clone();
                all.extend(
                    listing
                        .entries
                        .iter()
                        .filter_map(|e| directory_user(&e.key).map(str::to_string)),
                );
                log.lock().unwrap_or_else(|p| p.into_inner()).replace(all);
                Ok(listing.revision)
            }
        }
    };
    let reload = load.clone();
    let revision = reload().await?;
    let log = log.clone();
    tasks.spawn(crate::store::sync::follow(
        store.clone(),
        directory_store::PREFIX,
        revision + 1,
        shutdown,
        "users of this cluster (intercluster)",
        move |k, v| {
            let Some(user) = directory_user(k) else {
                return;
            };
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            match v {
                Some(_) => {
                    l.add(user);
                }
                None if !fixed.contains(user) => {
                    l.remove(user);
                }
                None => {}
            }
        },
        load,
    ));
    Ok(())
}

/// `intercluster/` into the index and the return paths, on every node.
async fn follow_index(
    store: &SharedStore,
    routing: &Arc<Routing>,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), StoreError> {
    let load = {
        let (store, routing) = (store.clone(), routing.clone());
        move || {
            let (store, routing) = (store.clone(), routing.clone());
            async move {
                let listing = store.list(keys::ROOT).await?;
                routing.clear();
                for e in &listing.entries {
                    routing.apply(&e.key, Some(&e.value));
                }
                Ok(listing.revision)
            }
        }
    };
    let first = load.clone();
    let revision = first().await?;
    let routing = routing.clone();
    tasks.spawn(crate::store::sync::follow(
        store.clone(),
        keys::ROOT,
        revision + 1,
        shutdown,
        "intercluster users, status and return paths",
        move |k, v| routing.apply(k, v),
        load,
    ));
    Ok(())
}

/// Return-path writes waiting for the store (beyond it they are counted, not queued: the
/// paths stay in this node's memory).
const RETURN_WRITES: usize = 4_096;

/// Writes the return-path changes `Routing` sends, in batches. It ends when the routing
/// (the sender) is dropped, so what was sent before a shutdown is still written.
async fn write_returns(
    store: SharedStore,
    mut rx: mpsc::Receiver<crate::intercluster::routes::Write>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let n = batch.len();
        let failed = crate::store::write_batch(&store, std::mem::take(&mut batch)).await;
        if let Some((key, e)) = failed.first() {
            tracing::warn!(failed = failed.len(), of = n, key, error = %e,
                "intercluster: return paths not written to the store (kept on this node)");
        }
    }
}

/// How often each node forgets the return paths nobody used for `routes::RETURN_IDLE`.
const SWEEP_RETURNS: Duration = Duration::from_secs(60);

async fn sweep_returns(routing: Arc<Routing>, shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_RETURNS) => {
                let n = routing.sweep();
                if n > 0 {
                    tracing::debug!(paths = n, "intercluster: idle return paths forgotten");
                }
            }
            _ = crate::net::stopped(shutdown.clone()) => return,
        }
    }
}

/// The names of the listed peers.
fn peer_names(cfg: &Config) -> Vec<Arc<str>> {
    cfg.intercluster
        .peers
        .iter()
        .map(|p| Arc::from(p.name.as_str()))
        .collect()
}

fn settings(cfg: &Config) -> Settings {
    let ic = &cfg.intercluster;
    Settings {
        interval: Duration::from_secs(u64::from(ic.sync_interval_mins) * 60),
        stuck_after: Duration::from_secs(ic.stuck_after_secs),
        auto_recovery: ic.auto_recovery,
    }
}

fn is_leader(cluster: &Option<Cluster>) -> bool {
    cluster.as_ref().is_none_or(|c| c.role() == Role::Leader)
}

/// Runs the agent whenever this node leads (a single node always does).
async fn agent_duty(
    ic: Arc<Intercluster>,
    tls: Option<IcTls>,
    cluster: Option<Cluster>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut role = cluster.as_ref().map(|c| c.watch_role());
    loop {
        if *shutdown.borrow() {
            return;
        }
        if is_leader(&cluster) {
            let listed = peer_names(&ic.hub.config());
            forget_unlisted(&ic, &listed).await;
            if !listed.is_empty() {
                ic.leading.store(true, Ordering::Release);
                lead(&ic, tls.as_ref(), &cluster, shutdown.clone()).await;
                ic.leading.store(false, Ordering::Release);
            }
        }
        match role.as_mut() {
            Some(r) => tokio::select! {
                _ = r.changed() => {}
                _ = shutdown.changed() => {}
            },
            None => {
                let _ = shutdown.changed().await;
            }
        }
    }
}

/// What a finished sync task reports.
struct Done {
    peer: Arc<str>,
    attempt: u64,
    outcome: Outcome,
    status: PeerStatus,
}

/// The agent's loop while this node leads.
async fn lead(
    ic: &Arc<Intercluster>,
    tls: Option<&IcTls>,
    cluster: &Option<Cluster>,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = ic.hub.config();
    let names = peer_names(&cfg);
    let mut agent = Agent::new(settings(&cfg), &names, Instant::now());
    let mut statuses: BTreeMap<Arc<str>, PeerStatus> = BTreeMap::new();
    for n in &names {
        let st: PeerStatus = ic
            .index
            .status(n)
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        agent.set_cursor(n, st.cursor);
        statuses.insert(n.clone(), st);
    }
    count_users(&statuses);
    // Forced syncs asked while no node led, then those asked from now on.
    let mut forces = open_forces(ic, &mut agent).await;
    let (tx, mut rx) = mpsc::channel::<Done>(64);
    let mut running: HashMap<Arc<str>, tokio::task::AbortHandle> = HashMap::new();
    let mut role = cluster.as_ref().map(|c| c.watch_role());
    tracing::info!(
        peers = names.len(),
        "intercluster sync agent running on this node"
    );
    loop {
        agent.configure(settings(&ic.hub.config()));
        let now = Instant::now();
        for action in agent.poll(now) {
            act(ic, tls, &tx, &mut running, &mut statuses, action).await;
        }
        let wake = agent
            .next_deadline()
            .unwrap_or(now + CONFIG_EVERY)
            .min(now + CONFIG_EVERY);
        tokio::select! {
            Some(done) = rx.recv() => {
                // A cancelled attempt that ended anyway: its result is not the peer's state.
                if agent.running(&done.peer) != Some(done.attempt) {
                    continue;
                }
                running.remove(&done.peer);
                let end = Instant::now();
                agent.finished(&done.peer, done.attempt, done.outcome, end);
                let mut st = done.status;
                if let Some(old) = statuses.get(&done.peer) {
                    st.restarts = old.restarts;
                    st.syncs = old.syncs + 1;
                }
                st.alarm = agent.alarmed(&done.peer);
                write_status(ic, &done.peer, &st).await;
                statuses.insert(done.peer.clone(), st);
                count_users(&statuses);
            }
            ev = next_force(&mut forces) => {
                match ev {
                    Some(crate::store::WatchEvent::Put(e)) => take_force(ic, &mut agent, &e.key, &e.value).await,
                    Some(_) => {}
                    // The watch ended (resync): look again from the current state.
                    None => forces = open_forces(ic, &mut agent).await,
                }
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            _ = async {
                match role.as_mut() {
                    Some(r) => { let _ = r.changed().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {
                if !is_leader(cluster) {
                    break;
                }
            }
            _ = shutdown.changed() => if *shutdown.borrow() { break },
        }
    }
    for (_, h) in running {
        h.abort();
    }
    // The next leader raises its own alarms.
    for n in &names {
        ic.hub.alarms().clear(ALARM, &subject(n));
    }
    tracing::info!("intercluster sync agent stopped on this node");
}

/// Removes what peers that are no longer listed contributed (and their status): their users
/// must not be routed to a cluster we do not talk to.
async fn forget_unlisted(ic: &Intercluster, names: &[Arc<str>]) {
    let Ok(listing) = ic.store.list(keys::STATUS).await else {
        return;
    };
    for e in listing.entries {
        let Some(peer) = e.key.strip_prefix(keys::STATUS) else {
            continue;
        };
        if names.iter().any(|n| &**n == peer) {
            continue;
        }
        let prefix = keys::users_of(peer);
        let users = match ic.store.list(&prefix).await {
            Ok(l) => l.entries,
            Err(_) => continue,
        };
        let mut gone: Vec<(String, Option<Vec<u8>>)> =
            users.into_iter().map(|u| (u.key, None)).collect();
        let n = gone.len();
        gone.push((e.key.clone(), None));
        let mut failed = 0;
        for chunk in gone.chunks(WRITE_BATCH) {
            failed += crate::store::write_batch(&ic.store, chunk.to_vec())
                .await
                .len();
        }
        tracing::info!(
            peer,
            users = n,
            failed,
            "intercluster: forgot a peer that is no longer listed"
        );
    }
}

/// Hands the forced syncs waiting in the store to the agent, then watches for more.
async fn open_forces(ic: &Intercluster, agent: &mut Agent) -> Option<crate::store::Watch> {
    match ic.store.list(keys::FORCE).await {
        Ok(l) => {
            for e in &l.entries {
                take_force(ic, agent, &e.key, &e.value).await;
            }
            ic.store.watch(keys::FORCE, l.revision + 1).await.ok()
        }
        Err(e) => {
            tracing::warn!(error = %e, "intercluster: cannot read forced syncs");
            None
        }
    }
}

async fn next_force(w: &mut Option<crate::store::Watch>) -> Option<crate::store::WatchEvent> {
    match w {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// One forced-sync request: handed to the agent, then removed.
async fn take_force(ic: &Intercluster, agent: &mut Agent, key: &str, value: &[u8]) {
    let Some(name) = key.strip_prefix(keys::FORCE) else {
        return;
    };
    let full = serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|v| v["full"].as_bool())
        .unwrap_or(false);
    let peer = (name != "*").then_some(name);
    match agent.force(peer, full) {
        Ok(()) => tracing::info!(peer = name, full, "intercluster: forced sync"),
        Err(e) => tracing::warn!(error = %e, "intercluster: forced sync ignored"),
    }
    if let Err(e) = ic.store.delete(key).await {
        tracing::warn!(error = %e, "intercluster: cannot remove a handled forced-sync request");
    }
}

/// The users gauge of `peer`, and the sum over every peer.
fn count_users(statuses: &BTreeMap<Arc<str>, PeerStatus>) {
    let mut all = 0u64;
    for (peer, st) in statuses {
        all += st.users;
        super::PEER_USERS
            .with_label_values(&[peer])
            .set(i64::try_from(st.users).unwrap_or(i64::MAX));
    }
    super::PEER_USERS
        .with_label_values(&["all"])
        .set(i64::try_from(all).unwrap_or(i64::MAX));
}

fn subject(peer: &str) -> String {
    format!("intercluster peer {peer}")
}

async fn act(
    ic: &Arc<Intercluster>,
    tls: Option<&IcTls>,
    tx: &mpsc::Sender<Done>,
    running: &mut HashMap<Arc<str>, tokio::task::AbortHandle>,
    statuses: &mut BTreeMap<Arc<str>, PeerStatus>,
    action: Action,
) {
    match action {
        Action::Start {
            peer,
            attempt,
            cursor,
            full,
        } => {
            let cfg = ic.hub.config();
            let Some(p) = cfg.intercluster.peers.iter().find(|p| *p.name == *peer) else {
                return;
            };
            let st = statuses.entry(peer.clone()).or_default();
            st.last_sync_start = Some(unix_now());
            st.last_outcome = Some("running".into());
            let st = st.clone();
            write_status(ic, &peer, &st).await;
            let task = tokio::spawn(sync_task(
                ic.clone(),
                tls.cloned(),
                p.clone(),
                peer.clone(),
                attempt,
                cursor,
                full,
                st,
                tx.clone(),
            ));
            running.insert(peer, task.abort_handle());
        }
        Action::Cancel { peer, .. } => {
            if let Some(h) = running.remove(&peer) {
                h.abort();
            }
        }
        Action::Restarted { peer, why } => {
            super::RESTARTS.with_label_values(&[why.as_str()]).inc();
            tracing::warn!(peer = %peer, reason = why.as_str(), "intercluster: sync agent restarted for this peer");
            let st = statuses.entry(peer.clone()).or_default();
            st.restarts += 1;
            let st = st.clone();
            write_status(ic, &peer, &st).await;
        }
        Action::RaiseAlarm { peer, for_secs } => {
            let st = statuses.entry(peer.clone()).or_default();
            st.alarm = true;
            let detail = format!(
                "no successful sync with peer cluster `{peer}` for {for_secs} s; last outcome: {}",
                st.last_outcome.as_deref().unwrap_or("none yet")
            );
            ic.hub.alarms().raise(ALARM, &subject(&peer), &detail);
            let st = st.clone();
            write_status(ic, &peer, &st).await;
        }
        Action::ClearAlarm { peer } => {
            ic.hub.alarms().clear(ALARM, &subject(&peer));
            let st = statuses.entry(peer.clone()).or_default();
            st.alarm = false;
            let st = st.clone();
            write_status(ic, &peer, &st).await;
        }
    }
}

async fn write_status(ic: &Intercluster, peer: &str, st: &PeerStatus) {
    let key = format!("{}{peer}", keys::STATUS);
    let value = serde_json::to_vec(st).unwrap_or_default();
    if let Err(e) = ic.store.put(&key, value).await {
        tracing::warn!(peer, error = %e, "intercluster: cannot write the peer's status");
    }
}

#[allow(clippy::too_many_arguments)]
async fn sync_task(
    ic: Arc<Intercluster>,
    tls: Option<IcTls>,
    peer: InterclusterPeer,
    name: Arc<str>,
    attempt: u64,
    cursor: Option<Cursor>,
    full: bool,
    mut st: PeerStatus,
    tx: mpsc::Sender<Done>,
) {
    let started = Instant::now();
    let cfg = ic.hub.config();
    let fetched = link::fetch(&cfg, tls.as_ref(), &peer.address, cursor, full).await;
    st.reachable = fetched.reachable;
    st.certificate = Some(fetched.certificate);
    if fetched.listed_by_peer.is_some() {
        st.listed_by_peer = fetched.listed_by_peer;
    }
    let result = match fetched.answer {
        Some(Ok(r)) => apply(&ic.store, &name, r, st.users).await,
        Some(Err(e)) => Err(e),
        None => Err("no answer".into()),
    };
    st.last_sync_end = Some(unix_now());
    let outcome = match result {
        Ok(applied) => {
            let kind = if applied.complete {
                "complete"
            } else {
                "incremental"
            };
            super::SYNCS.with_label_values(&[kind]).inc();
            super::SYNC_SECONDS
                .with_label_values(&[kind])
                .observe(started.elapsed().as_secs_f64());
            tracing::info!(peer = %name, kind, users = applied.users, transferred = applied.transferred, "intercluster: synced");
            st.in_sync = true;
            st.users = applied.users;
            st.last_outcome = Some(kind.into());
            st.last_success = st.last_sync_end;
            st.last_transferred = applied.transferred;
            st.last_invalid = applied.invalid;
            st.cursor = Some(applied.cursor);
            Outcome::Synced {
                cursor: applied.cursor,
            }
        }
        Err(why) => {
            super::SYNCS.with_label_values(&["failed"]).inc();
            super::SYNC_SECONDS
                .with_label_values(&["failed"])
                .observe(started.elapsed().as_secs_f64());
            tracing::warn!(peer = %name, reason = %why, "intercluster: sync failed; the peer's users stay as last synced");
            st.in_sync = false;
            st.last_outcome = Some(format!("failed: {why}"));
            Outcome::Failed
        }
    };
    let _ = tx
        .send(Done {
            peer: name,
            attempt,
            outcome,
            status: st,
        })
        .await;
}

struct Applied {
    complete: bool,
    users: u64,
    transferred: u64,
    invalid: u64,
    cursor: Cursor,
}

/// `changes` in batches of [`WRITE_BATCH`]; what failed.
async fn write_in_batches(
    store: &SharedStore,
    mut changes: Vec<(String, Option<Vec<u8>>)>,
) -> Vec<(String, StoreError)> {
    let mut failed = Vec::new();
    while !changes.is_empty() {
        let rest = changes.split_off(changes.len().min(WRITE_BATCH));
        failed.extend(crate::store::write_batch(store, changes).await);
        changes = rest;
    }
    failed
}

/// Writes a peer's answer to the store: a complete answer replaces its users, an incremental
/// one is merged. Nothing is removed unless the peer said so (split brain).
async fn apply(
    store: &SharedStore,
    peer: &str,
    r: Received,
    users_before: u64,
) -> Result<Applied, String> {
    let cursor = r.cursor.ok_or("the answer has no cursor")?;
    let mut changes: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    let users = if r.complete {
        let prefix = keys::users_of(peer);
        let existing: HashSet<String> = store
            .list(&prefix)
            .await
            .map_err(|e| format!("store: {e}"))?
            .entries
            .into_iter()
            .filter_map(|e| e.key.strip_prefix(&prefix).map(str::to_string))
            .collect();
        let new: HashSet<&str> = r
            .changes
            .iter()
            .filter(|(_, removed)| !removed)
            .map(|(u, _)| u.as_str())
            .collect();
        for u in &new {
            if !existing.contains(*u) {
                changes.push((keys::user(peer, u), Some(Vec::new())));
            }
        }
        for u in &existing {
            if !new.contains(u.as_str()) {
                changes.push((keys::user(peer, u), None));
            }
        }
        new.len() as u64
    } else {
        // Only the users that changed are looked at: an incremental sync costs what changed,
        // not the size of the peer.
        let mut last: HashMap<&str, bool> = HashMap::new();
        for (u, removed) in &r.changes {
            last.insert(u.as_str(), *removed);
        }
        let mut users = users_before;
        for (u, removed) in last {
            let key = keys::user(peer, u);
            let exists = store
                .get(&key)
                .await
                .map_err(|e| format!("store: {e}"))?
                .is_some();
            if removed && exists {
                changes.push((key, None));
                users = users.saturating_sub(1);
            } else if !removed && !exists {
                changes.push((key, Some(Vec::new())));
                users += 1;
            }
        }
        users
    };
    let failed = write_in_batches(store, changes).await;
    if let Some((key, e)) = failed.first() {
        return Err(format!(
            "store: {} writes failed (first: {key}: {e}); the next sync tries again",
            failed.len()
        ));
    }
    Ok(Applied {
        complete: r.complete,
        users,
        transferred: r.changes.len() as u64,
        invalid: r.invalid as u64,
        cursor,
    })
}

impl Intercluster {
    /// The index every node routes with.
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// What `/status` shows under `intercluster` (and `legate intercluster status`).
    pub fn status_json(&self) -> serde_json::Value {
        let cfg = self.hub.config();
        let ic = &cfg.intercluster;
        let listed: HashSet<&str> = ic.peers.iter().map(|p| p.name.as_str()).collect();
        let peers: Vec<serde_json::Value> = ic
            .peers
            .iter()
            .map(|p| {
                let mut v = self
                    .index
                    .status(&p.name)
                    .unwrap_or_else(|| serde_json::json!({"last_outcome": null}));
                if let Some(o) = v.as_object_mut() {
                    o.insert("name".into(), p.name.clone().into());
                    o.insert("address".into(), p.address.to_string().into());
                    o.insert("forwarded".into(), self.routing.forwarded_json(&p.name));
                }
                v
            })
            .collect();
        let unlisted: Vec<serde_json::Value> = self
            .index
            .callers()
            .into_iter()
            .filter(|(n, _)| !listed.contains(n.as_str()))
            .map(|(n, mut v)| {
                if let Some(o) = v.as_object_mut() {
                    o.insert("name".into(), n.into());
                }
                v
            })
            .collect();
        let contributed = self.log.lock().map(|l| l.len()).unwrap_or(0);
        serde_json::json!({
            "name": ic.name,
            "listen": self.bound.to_string(),
            "transport": ic.transport.as_str(),
            "sync_interval_mins": ic.sync_interval_mins,
            "stuck_after_secs": ic.stuck_after_secs,
            "auto_recovery": ic.auto_recovery,
            "agent_here": self.leading.load(Ordering::Acquire),
            "users_contributed": contributed,
            "users_known": self.index.len(),
            "peers": peers,
            "unlisted_callers": unlisted,
            // Callers this node's listener refused lately (newest last).
            "refused_callers": self.refusals.json(),
            "return_paths": self.routing.return_paths(),
            // Paths not kept (the map was full of live ones) or not written to the store (its
            // writer was a full queue behind): their answers may leave on our own link.
            "return_paths_dropped": self.routing.dropped.load(std::sync::atomic::Ordering::Relaxed),
            "return_paths_unwritten": self.routing.unwritten.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn check_user(&self, user: &str) -> Result<Address, String> {
        let cfg = self.hub.config();
        match Address::parse(user) {
            Ok(a) if a.resource.is_none() && link::local_user(&cfg, &a.bare_string()) => Ok(a),
            _ => Err(format!(
                "`{}` is not a bare JID `user@domain` of a local domain",
                user.chars().take(80).collect::<String>()
            )),
        }
    }
}

fn answer(code: u16, v: serde_json::Value) -> Answer {
    (code, v)
}

impl super::AdminHook for Intercluster {
    fn force_sync(&self, peer: Option<String>, full: bool) -> HookFuture<'_> {
        Box::pin(async move {
            let cfg = self.hub.config();
            if let Some(p) = &peer {
                if !cfg.intercluster.peers.iter().any(|x| &x.name == p) {
                    return answer(
                        404,
                        serde_json::json!({"error": format!("`{}` is not a listed intercluster peer", p.chars().take(64).collect::<String>())}),
                    );
                }
            }
            if cfg.intercluster.peers.is_empty() {
                return answer(
                    409,
                    serde_json::json!({"error": "no [[intercluster.peer]] is listed: nothing to sync"}),
                );
            }
            let key = format!("{}{}", keys::FORCE, peer.as_deref().unwrap_or("*"));
            let doc = serde_json::json!({"full": full, "at": unix_now()});
            match self.store.put(&key, doc.to_string().into_bytes()).await {
                Ok(_) => answer(
                    202,
                    serde_json::json!({
                        "requested": peer.as_deref().unwrap_or("all"),
                        "full": full,
                        "agent_here": self.leading.load(Ordering::Acquire),
                    }),
                ),
                Err(e) => answer(
                    503,
                    serde_json::json!({"error": format!("state store: {e}")}),
                ),
            }
        })
    }

    fn users(&self, add: bool, user: String, home_node: Option<String>) -> HookFuture<'_> {
        Box::pin(async move {
            let a = match self.check_user(&user) {
                Ok(a) => a,
                Err(e) => return answer(400, serde_json::json!({ "error": e })),
            };
            let bare = a.bare_string();
            let key = directory_store::key(&bare);
            let r = if add {
                let cfg = self.hub.config();
                let Some(home) = home_node.filter(|h| cfg.home_nodes.iter().any(|n| &n.name == h))
                else {
                    return answer(
                        400,
                        serde_json::json!({"error": "HOME_NODE must be the name of a [[home_node]]"}),
                    );
                };
                self.store
                    .put(&key, home.clone().into_bytes())
                    .await
                    .map(|_| serde_json::json!({"user": bare, "home_node": home, "added": true}))
            } else {
                self.store
                    .delete(&key)
                    .await
                    .map(|r| serde_json::json!({"user": bare, "removed": r.is_some()}))
            };
            match r {
                Ok(v) => answer(200, v),
                Err(e) => answer(
                    503,
                    serde_json::json!({"error": format!("state store: {e}")}),
                ),
            }
        })
    }

    fn lookup(&self, user: &str) -> Answer {
        let ours = self.log.lock().map(|l| l.contains(user)).unwrap_or(false);
        answer(
            200,
            serde_json::json!({
                "user": user,
                "cluster": self.index.cluster_of(user).as_deref(),
                "in_this_cluster": ours,
            }),
        )
    }
}
