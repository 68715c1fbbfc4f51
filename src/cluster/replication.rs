//! Configuration primary and replication (issue 12 item 4; seed 001, Expressway's
//! configuration primary).
//!
//! One node of a cluster, `cluster.primary`, owns the **cluster-wide** configuration: an admin
//! changes it there (file + `legate reload` or SIGHUP) and every other node (a *subordinate*)
//! takes it live. Everything else is **peer-specific** and never replicates.
//!
//! | cluster-wide (replicates) | peer-specific (stays on each node) |
//! |---|---|
//! | `[[local_domain]]` names | `[[local_domain]]` `cert` and `key` (each node its own files) |
//! | `[sip]` (`[[sip.federated_domain]]`: partners, systems, routes, presence formats) | `[node]` (id, data_dir, admin access, admin token) |
//! | `[xmpp.federation]` `mode`, `dialback_allow_private_targets`, `[[xmpp.federation.domain]]` | `xmpp.federation.dialback_secret` (a secret is not copied into etcd) |
//! | `[limits]` | `[listeners]`, `[tls]`, `[dns]`, `[cluster]`, `[intercluster]` |
//! | the mapping files' contents (`canonical.toml`, `systems/`, `tables/`; the shipped set when the primary has no `[mappings] dir`) | `[mappings]` itself (where a node's own files are), `[[home_node]]`, `routing_node`, `[[chat_node]]` (each node's links to the home nodes), logging (`--log-format`, `LEGATE_LOG`) |
//!
//! How:
//! - The primary publishes, at start, after every applied reload and after each mapping edit
//!   its mapping watcher swaps in (`[mappings] reload`), the TOML text of its file's
//!   cluster-wide part, its mapping files, a digest (SHA-1 over both) and the publish time to
//!   `/legate/<cluster>/config`.
//! - Every subordinate watches that key. On a change it merges its own file's peer-specific
//!   part with the primary's cluster-wide part, validates the result exactly as a start would
//!   (against the primary's mapping set), and swaps it in through the reload machinery
//!   ([`crate::node::reload`]): restart-only keys that changed are reported, not applied, as
//!   a local reload does. An invalid result keeps the running configuration and raises
//!   `ClusterReplicationFailed`. A subordinate's own `legate reload` re-reads its file and
//!   merges it with the last primary's part it holds: on a subordinate, its file's
//!   cluster-wide part and its own mapping files are never used (when they differ,
//!   `ClusterConfigConflict` says so, checked at each replication).
//! - Each node writes the digest it applied, when, the replication lag and its last error to
//!   `/legate/<cluster>/replication/<node-id>`; every node watches those, so `/status`
//!   (`cluster.replication`) shows the whole cluster from any node.
//! - `legate cluster force-config-update` (`POST /cluster/force-config-update`) makes a
//!   subordinate drop its copy, read the primary's again and apply it.
//!
//! A subordinate does not take configuration from a node it does not know as its primary:
//! when the published primary id differs from its own `cluster.primary`, it keeps what it runs
//! and raises `ClusterPrimaryMismatch`. The lag is measured with the two nodes' clocks
//! (publish time on the primary, apply time on the subordinate): it needs NTP across
//! machines, as the seed requires anyway.

use super::unix_now;
use crate::config::{self, Config};
use crate::gateway::Hub;
use crate::node::reload::{self, Outcome, ReloadReport, ReplicationHook, Trigger};
use crate::node::{ConfigSource, Control};
use crate::ops::alarms::AlarmName;
use crate::presence::map::{self, MappingSet, SourceFile};
use crate::store::etcd::{deadline, kv_get, kv_put};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use toml::{Table, Value};

/// The cluster-wide items (see the module doc); `legate check` and the README list them.
pub const CLUSTER_WIDE: &[&str] = &[
    "[[local_domain]] names",
    "[sip]",
    "[xmpp.federation] mode, dialback_allow_private_targets, [[xmpp.federation.domain]]",
    "[limits]",
    "the mapping files (canonical.toml, systems/, tables/)",
];

pub(crate) static REPLICATIONS: LazyLock<prometheus::IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_cluster_config_replications_total",
        "Configurations published by the primary that this subordinate applied or could not \
         apply, by outcome (applied, failed)",
        &["outcome"],
    )
});
pub(crate) static LAG_MS: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    crate::metrics::gauge(
        "legate_cluster_replication_lag_ms",
        "Milliseconds between the primary publishing its configuration and this node applying \
         it, for the last one applied",
    )
});

pub(super) fn register_metrics() {
    for o in ["applied", "failed"] {
        REPLICATIONS.with_label_values(&[o]);
    }
    LazyLock::force(&LAG_MS);
}

// ---------------------------------------------------------------------------------------
// The split and the merge (pure: TOML tables in, TOML tables out).

const LOCAL_DOMAIN: &str = "local_domain";
/// Keys of `[[local_domain]]` each node keeps from its own file.
const DOMAIN_OWN_KEYS: [&str; 2] = ["cert", "key"];
/// Whole top-level sections that are cluster-wide.
const WIDE_SECTIONS: [&str; 2] = ["sip", "limits"];
/// The one key of `[xmpp.federation]` that stays on each node.
const FED_OWN_KEY: &str = "dialback_secret";

fn federation(t: &Table) -> Option<&Table> {
    t.get("xmpp")?.get("federation")?.as_table()
}

/// The cluster-wide part of a configuration file's table.
pub fn cluster_wide(own: &Table) -> Table {
    let mut out = Table::new();
    if let Some(Value::Array(domains)) = own.get(LOCAL_DOMAIN) {
        let names = domains
            .iter()
            .map(|d| match d.as_table() {
                Some(t) => {
                    let mut t = t.clone();
                    for k in DOMAIN_OWN_KEYS {
                        t.remove(k);
                    }
                    Value::Table(t)
                }
                None => d.clone(),
            })
            .collect();
        out.insert(LOCAL_DOMAIN.into(), Value::Array(names));
    }
    for k in WIDE_SECTIONS {
        if let Some(v) = own.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(fed) = federation(own) {
        let mut fed = fed.clone();
        fed.remove(FED_OWN_KEY);
        if !fed.is_empty() {
            let mut xmpp = Table::new();
            xmpp.insert("federation".into(), Value::Table(fed));
            out.insert("xmpp".into(), Value::Table(xmpp));
        }
    }
    out
}

/// This node's file with its cluster-wide part replaced by `wide` (the primary's): each
/// `[[local_domain]]` the primary names keeps this node's `cert` and `key` for that name.
pub fn merge(own: &Table, wide: &Table) -> Table {
    let mut out = own.clone();
    for k in WIDE_SECTIONS {
        out.remove(k);
        if let Some(v) = wide.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    let own_domains: BTreeMap<&str, &Table> = match own.get(LOCAL_DOMAIN) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_table)
            .filter_map(|t| Some((t.get("name")?.as_str()?, t)))
            .collect(),
        _ => BTreeMap::new(),
    };
    out.remove(LOCAL_DOMAIN);
    if let Some(Value::Array(domains)) = wide.get(LOCAL_DOMAIN) {
        let merged = domains
            .iter()
            .map(|d| {
                let Some(t) = d.as_table() else {
                    return d.clone();
                };
                let mut t = t.clone();
                let mine = t
                    .get("name")
                    .and_then(Value::as_str)
                    .and_then(|n| own_domains.get(n));
                if let Some(mine) = mine {
                    for k in DOMAIN_OWN_KEYS {
                        if let Some(v) = mine.get(k) {
                            t.insert(k.into(), v.clone());
                        }
                    }
                }
                Value::Table(t)
            })
            .collect();
        out.insert(LOCAL_DOMAIN.into(), Value::Array(merged));
    }
    let mut fed = federation(wide).cloned().unwrap_or_default();
    if let Some(secret) = federation(own).and_then(|f| f.get(FED_OWN_KEY)) {
        fed.insert(FED_OWN_KEY.into(), secret.clone());
    }
    if fed.is_empty() {
        out.remove("xmpp");
    } else {
        let mut xmpp = Table::new();
        xmpp.insert("federation".into(), Value::Table(fed));
        out.insert("xmpp".into(), Value::Table(xmpp));
    }
    out
}

/// One mapping file as published: its path under the mapping root and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingFile {
    pub rel: String,
    pub text: String,
}

/// What the primary writes to `/legate/<cluster>/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The node id of the publisher.
    pub primary: String,
    /// The publisher's `cluster.peers` names (checked, never applied: `[cluster]` is
    /// peer-specific).
    pub peers: Vec<String>,
    /// The TOML text of the cluster-wide part.
    pub config: String,
    pub mappings: Vec<MappingFile>,
    /// SHA-1 (hex) over `config` and the mapping files: what "in sync" compares.
    pub digest: String,
    /// Unix milliseconds.
    pub published_at_ms: u64,
}

/// SHA-1 (hex) over the cluster-wide text and every mapping file's path and text.
pub fn digest(config: &str, mappings: &[MappingFile]) -> String {
    let mut h = Sha1::new();
    h.update(config.as_bytes());
    for f in mappings {
        h.update([0u8]);
        h.update(f.rel.as_bytes());
        h.update([0u8]);
        h.update(f.text.as_bytes());
    }
    hex::encode(h.finalize())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The mapping files of `dir` (`None`: the shipped set), as published.
fn mapping_files(dir: Option<&Path>) -> Result<Vec<MappingFile>, String> {
    let files = match dir {
        Some(d) => map::set::read_dir(d).map_err(|e| e.to_string())?,
        None => map::defaults::source_files(),
    };
    Ok(files
        .into_iter()
        .map(|f| MappingFile {
            rel: f.rel,
            text: f.text,
        })
        .collect())
}

/// This node's file, parsed as a table.
fn own_table(source: &ConfigSource) -> Result<(PathBuf, Table), String> {
    let path = source.path.clone().ok_or_else(|| {
        "a cluster node needs a configuration file (legate run --config FILE)".to_string()
    })?;
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: cannot read the configuration file: {e}",
            path.display()
        )
    })?;
    let table: Table =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    Ok((path, table))
}

/// What the primary publishes now, from its file and the mapping set it runs.
fn to_publish(source: &ConfigSource, running: &Config) -> Result<Published, String> {
    let (_, own) = own_table(source)?;
    let config = toml::to_string(&cluster_wide(&own)).map_err(|e| e.to_string())?;
    let mappings = mapping_files(running.mappings.dir.as_deref())?;
    Ok(Published {
        primary: running.node.id.to_string(),
        peers: running
            .cluster
            .peers
            .iter()
            .map(|p| p.name.to_string())
            .collect(),
        digest: digest(&config, &mappings),
        config,
        mappings,
        published_at_ms: unix_ms(),
    })
}

/// This node's file merged with the primary's part, validated against the primary's
/// mapping set (see the module doc).
pub fn candidate(
    source: &ConfigSource,
    published: &Published,
) -> Result<(Config, MappingSet), Vec<String>> {
    let (path, own) = own_table(source).map_err(|e| vec![e])?;
    let wide: Table = toml::from_str(&published.config).map_err(|e| {
        vec![format!(
            "the primary's cluster-wide configuration does not parse: {}",
            e.message()
        )]
    })?;
    let merged = toml::to_string(&merge(&own, &wide)).map_err(|e| vec![e.to_string()])?;
    let files: Vec<SourceFile> = published
        .mappings
        .iter()
        .map(|f| SourceFile {
            path: PathBuf::from(format!("<primary {}>/{}", published.primary, f.rel)),
            rel: f.rel.clone(),
            text: f.text.clone(),
        })
        .collect();
    let set = MappingSet::build(&files)
        .map_err(|d| d.0.iter().map(|x| x.to_string()).collect::<Vec<_>>())?;
    let mut cfg = config::from_toml(&merged, &path, &config::systems_from_mappings(&set))
        .map_err(|d| {
            d.0.iter()
                .map(|x| {
                    format!("{x} (line numbers of this node's file merged with the primary's cluster-wide part)")
                })
                .collect::<Vec<_>>()
        })?;
    cfg.mappings.dir = source.mappings_dir();
    Ok((cfg, set))
}

/// Whether this node's own file (and mapping files) say something else than the primary
/// about the cluster-wide items: the differing parts, named.
fn conflicts(source: &ConfigSource, published: &Published) -> Vec<String> {
    let mut out = Vec::new();
    let Ok((_, own)) = own_table(source) else {
        return out;
    };
    let mine = cluster_wide(&own);
    let theirs: Table = toml::from_str(&published.config).unwrap_or_default();
    let mut keys: Vec<&String> = mine.keys().chain(theirs.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        if mine.get(k) != theirs.get(k) {
            out.push(format!("[{k}]"));
        }
    }
    if let Ok(files) = mapping_files(source.mappings_dir().as_deref()) {
        if files != published.mappings {
            out.push("the mapping files".into());
        }
    }
    out
}

/// Raises `ClusterConfigConflict` when this node's own files differ from `published` about a
/// cluster-wide item, clears it when they agree.
fn check_conflicts(
    alarms: &crate::ops::alarms::Alarms,
    node: &str,
    source: &ConfigSource,
    published: &Published,
) {
    let differ = conflicts(source, published);
    if differ.is_empty() {
        alarms.clear(AlarmName::ClusterConfigConflict, node);
    } else {
        alarms.raise(
            AlarmName::ClusterConfigConflict,
            node,
            &format!(
                "this node's own files differ from the primary `{}` in {}; the primary's values \
                 are in use",
                published.primary,
                differ.join(", ")
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------
// The running side.

/// One node's replication record, `/legate/<cluster>/replication/<node-id>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    pub primary: bool,
    pub applied_digest: Option<String>,
    /// Unix seconds.
    pub applied_at: Option<u64>,
    pub lag_ms: Option<u64>,
    pub last_error: Option<String>,
    pub restart_needed: Vec<String>,
}

struct Keys {
    config: String,
    records: String,
}

struct Inner {
    node: String,
    /// This node's `cluster.primary`.
    primary: Option<String>,
    keys: Keys,
    client: etcd_client::Client,
    alarms: crate::ops::alarms::Alarms,
    source: ConfigSource,
    /// The primary's configuration this subordinate runs (the merge's other half).
    held: Mutex<Option<Published>>,
    /// The last one seen in etcd (applied or not).
    seen: Mutex<Option<Published>>,
    mine: Mutex<NodeRecord>,
    records: Mutex<BTreeMap<String, NodeRecord>>,
    publish: tokio::sync::Notify,
    force: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<ReloadReport, String>>>,
}

impl Inner {
    fn is_primary(&self) -> bool {
        self.primary.as_deref() == Some(self.node.as_str())
    }

    fn status_json(&self) -> serde_json::Value {
        let seen = self.seen.lock().ok().and_then(|s| s.clone());
        let primary_digest = seen.as_ref().map(|p| p.digest.clone());
        let records = self.records.lock().map(|r| r.clone()).unwrap_or_default();
        let peers: Vec<serde_json::Value> = records
            .values()
            .map(|r| {
                serde_json::json!({
                    "node": r.node,
                    "primary": r.primary,
                    "primary_digest": primary_digest,
                    "applied_digest": r.applied_digest,
                    "in_sync": primary_digest.is_some() && r.applied_digest == primary_digest,
                    "last_applied": r.applied_at,
                    "lag_ms": r.lag_ms,
                    "last_error": r.last_error,
                    "restart_needed": r.restart_needed,
                })
            })
            .collect();
        serde_json::json!({
            "primary": self.primary,
            "this_node_is_primary": self.is_primary(),
            "published_by": seen.as_ref().map(|p| p.primary.clone()),
            "primary_digest": primary_digest,
            "published_at_ms": seen.as_ref().map(|p| p.published_at_ms),
            "cluster_wide": CLUSTER_WIDE,
            "peers": peers,
        })
    }

    async fn write_record(&self) {
        let Ok(rec) = self.mine.lock().map(|m| m.clone()) else {
            return;
        };
        if let Ok(mut r) = self.records.lock() {
            r.insert(rec.node.clone(), rec.clone());
        }
        let value = serde_json::to_vec(&rec).unwrap_or_default();
        let key = format!("{}{}", self.keys.records, self.node);
        let res = kv_put(&self.client, key, value, None).await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "cluster replication: cannot write this node's status");
        }
    }

    /// The primary: publishes what it runs now; false when etcd refused it (the caller tries
    /// again: a change applied here must reach the subordinates once etcd is back).
    async fn publish(&self, hub: &Hub, control: &Control) -> bool {
        let source = control.source().clone();
        let running = hub.config();
        let p = match tokio::task::spawn_blocking(move || to_publish(&source, &running)).await {
            Ok(Ok(p)) => p,
            // The running configuration cannot be rendered: trying again changes nothing.
            Ok(Err(e)) => {
                self.failed_record(format!("cannot publish: {e}")).await;
                return true;
            }
            Err(e) => {
                self.failed_record(format!("cannot publish: {e}")).await;
                return true;
            }
        };
        let value = serde_json::to_vec(&p).unwrap_or_default();
        let key = self.keys.config.clone();
        let res = kv_put(&self.client, key, value, None).await;
        match res {
            Ok(_) => {
                tracing::info!(digest = %p.digest, "cluster configuration published");
                if let Ok(mut m) = self.mine.lock() {
                    m.applied_digest = Some(p.digest.clone());
                    m.applied_at = Some(unix_now());
                    m.lag_ms = Some(0);
                    m.last_error = None;
                }
                if let Ok(mut s) = self.seen.lock() {
                    *s = Some(p);
                }
                self.write_record().await;
                hub.alarms().clear(
                    AlarmName::ClusterReplicationFailed,
                    &hub.config().node.id.to_string(),
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cluster configuration: publishing failed; will retry");
                hub.alarms().raise(
                    AlarmName::ClusterReplicationFailed,
                    &hub.config().node.id.to_string(),
                    &format!("this primary could not publish its configuration (it runs it; the subordinates do not have it yet): {e}"),
                );
                self.failed_record(format!("publishing failed: {e}")).await;
                false
            }
        }
    }

    async fn failed_record(&self, why: String) {
        if let Ok(mut m) = self.mine.lock() {
            m.last_error = Some(why);
        }
        self.write_record().await;
    }

    /// A subordinate: takes `p` (unless it already runs it and `force` is off).
    async fn take(
        &self,
        hub: &Arc<Hub>,
        control: &Arc<Control>,
        p: Published,
        trigger: Trigger,
    ) -> Result<ReloadReport, String> {
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(p.clone());
        }
        let subject = self.node.clone();
        let alarms = hub.alarms();
        if self.primary.as_deref() != Some(p.primary.as_str()) {
            let text = format!(
                "the configuration in etcd was published by `{}`, but this node's \
                 cluster.primary is {}; this node keeps its running configuration",
                p.primary,
                self.primary
                    .as_deref()
                    .map_or_else(|| "not set".to_string(), |x| format!("`{x}`"))
            );
            alarms.raise(AlarmName::ClusterPrimaryMismatch, &subject, &text);
            self.failed_record(text.clone()).await;
            return Err(text);
        }
        alarms.clear(AlarmName::ClusterPrimaryMismatch, &subject);
        let own_listed = hub
            .config()
            .cluster
            .peers
            .iter()
            .any(|x| x.name.as_str() == self.node);
        if !own_listed || !p.peers.contains(&self.node) {
            let whose = match (own_listed, p.peers.contains(&self.node)) {
                (false, false) => "neither this node's nor the primary's",
                (false, true) => "this node's",
                _ => "the primary's",
            };
            alarms.raise(
                AlarmName::ClusterNodeNotInPeerList,
                &subject,
                &format!("node `{}` is not in {whose} cluster.peers", self.node),
            );
        } else {
            alarms.clear(AlarmName::ClusterNodeNotInPeerList, &subject);
        }
        if trigger != Trigger::Force {
            let held = self.held.lock().ok().and_then(|h| h.clone());
            if held.is_some_and(|h| h.digest == p.digest) {
                // What runs here is what the primary publishes: in sync again (a broken
                // publication in between is over).
                alarms.clear(AlarmName::ClusterReplicationFailed, &subject);
                let stale = self.mine.lock().is_ok_and(|m| m.last_error.is_some());
                if stale {
                    if let Ok(mut m) = self.mine.lock() {
                        m.last_error = None;
                    }
                    self.write_record().await;
                }
                return Err("already applied".into());
            }
        }
        let previous = self.held.lock().ok().and_then(|mut h| h.replace(p.clone()));
        let (h2, c2) = (hub.clone(), control.clone());
        let report = tokio::task::spawn_blocking(move || reload::reload(&h2, &c2, trigger))
            .await
            .map_err(|e| e.to_string())?;
        match report.outcome {
            Outcome::Applied => {
                let lag = unix_ms().saturating_sub(p.published_at_ms);
                REPLICATIONS.with_label_values(&["applied"]).inc();
                LAG_MS.set(i64::try_from(lag).unwrap_or(i64::MAX));
                alarms.clear(AlarmName::ClusterReplicationFailed, &subject);
                tracing::info!(digest = %p.digest, lag_ms = lag, restart_needed = ?report.restart_needed, "cluster configuration applied from the primary");
                if let Ok(mut m) = self.mine.lock() {
                    m.applied_digest = Some(p.digest.clone());
                    m.applied_at = Some(unix_now());
                    m.lag_ms = Some(lag);
                    m.last_error = None;
                    m.restart_needed = report.restart_needed.clone();
                }
                let (a2, n2, s2, p2) = (
                    alarms.clone(),
                    subject.clone(),
                    control.source().clone(),
                    p.clone(),
                );
                let _ =
                    tokio::task::spawn_blocking(move || check_conflicts(&a2, &n2, &s2, &p2)).await;
                self.write_record().await;
                Ok(report)
            }
            Outcome::Refused => {
                // The running configuration stays, and with it the primary's part it was
                // built from: a local reload merges with that one.
                if let Ok(mut h) = self.held.lock() {
                    *h = previous;
                }
                REPLICATIONS.with_label_values(&["failed"]).inc();
                let text = report.problems.join("\n");
                alarms.raise(AlarmName::ClusterReplicationFailed, &subject, &text);
                self.failed_record(format!("digest {}: {text}", p.digest))
                    .await;
                Ok(report)
            }
        }
    }

    /// Reads the published configuration and every node's record; applies the first on a
    /// subordinate. The revision the watches resume after.
    async fn sync(
        &self,
        hub: &Arc<Hub>,
        control: &Arc<Control>,
        trigger: Trigger,
    ) -> Result<i64, String> {
        let key = self.keys.config.clone();
        let resp = kv_get(&self.client, key, None)
            .await
            .map_err(|e| e.to_string())?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let published: Option<Published> = resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok());
        let prefix = self.keys.records.clone();
        let recs = kv_get(
            &self.client,
            prefix,
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| e.to_string())?;
        if let Ok(mut r) = self.records.lock() {
            r.clear();
            for kv in recs.kvs() {
                if let Ok(rec) = serde_json::from_slice::<NodeRecord>(kv.value()) {
                    r.insert(rec.node.clone(), rec);
                }
            }
        }
        if let Some(p) = published {
            self.on_published(hub, control, p, trigger).await;
        }
        Ok(rev.max(recs.header().map_or(0, |h| h.revision())))
    }

    async fn on_published(
        &self,
        hub: &Arc<Hub>,
        control: &Arc<Control>,
        p: Published,
        trigger: Trigger,
    ) {
        if self.is_primary() {
            if p.primary != self.node {
                hub.alarms().raise(
                    AlarmName::ClusterPrimaryMismatch,
                    &self.node,
                    &format!(
                        "node `{}` published a configuration, but cluster.primary here is this \
                         node: two nodes think they are the primary",
                        p.primary
                    ),
                );
            }
            if let Ok(mut s) = self.seen.lock() {
                *s = Some(p);
            }
            return;
        }
        let _ = self.take(hub, control, p, trigger).await;
    }

    /// force-config-update: drops the copy, reads the primary's again and applies it.
    async fn force(&self, hub: &Arc<Hub>, control: &Arc<Control>) -> Result<ReloadReport, String> {
        if let Ok(mut h) = self.held.lock() {
            *h = None;
        }
        let key = self.keys.config.clone();
        let resp = kv_get(&self.client, key, None)
            .await
            .map_err(|e| format!("cannot read the primary's configuration from etcd: {e}"))?;
        let p: Published = resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok())
            .ok_or_else(|| {
                "the primary has not published a configuration yet (is it running?)".to_string()
            })?;
        self.take(hub, control, p, Trigger::Force).await
    }
}

/// The hook the reload calls (see [`ReplicationHook`]).
struct Hook(Arc<Inner>);

impl ReplicationHook for Hook {
    fn candidate(
        &self,
        source: &ConfigSource,
    ) -> Option<Result<(Config, MappingSet), Vec<String>>> {
        if self.0.is_primary() {
            return None;
        }
        let held = self.0.held.lock().ok()?.clone()?;
        Some(candidate(source, &held))
    }

    fn applied(&self, report: &ReloadReport) {
        if !matches!(report.trigger, Trigger::Sighup | Trigger::Admin) {
            return;
        }
        if self.0.is_primary() {
            self.0.publish.notify_one();
        } else if let Some(held) = self.0.held.lock().ok().and_then(|h| h.clone()) {
            // The admin edited this node's file: does it still say what the primary says?
            check_conflicts(&self.0.alarms, &self.0.node, &self.0.source, &held);
        }
    }

    fn mappings_reloaded(&self) {
        if self.0.is_primary() {
            self.0.publish.notify_one();
        }
    }

    fn force(&self) -> Pin<Box<dyn Future<Output = Result<ReloadReport, String>> + Send>> {
        let inner = self.0.clone();
        Box::pin(async move {
            if inner.is_primary() {
                return Err(format!(
                    "this node (`{}`) is the configuration primary: force-config-update runs on \
                     a subordinate; change the configuration here and `legate reload`",
                    inner.node
                ));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            inner
                .force
                .send(tx)
                .await
                .map_err(|_| "the replication task has stopped".to_string())?;
            rx.await
                .map_err(|_| "the replication task has stopped".to_string())?
        })
    }
}

/// Starts the replication of a node in cluster `cluster`: the primary publishes, a
/// subordinate applies what is published (the first time before this returns, so the node
/// binds nothing with its own cluster-wide values when the primary's are known). Returns the
/// provider of `/status`'s `cluster.replication`.
pub async fn start(
    client: etcd_client::Client,
    hub: Arc<Hub>,
    control: Arc<Control>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Arc<dyn Fn() -> serde_json::Value + Send + Sync> {
    let config = hub.config();
    let cluster = config
        .cluster
        .name
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let (force_tx, force_rx) = tokio::sync::mpsc::channel(4);
    let node = config.node.id.to_string();
    let inner = Arc::new(Inner {
        primary: config.cluster.primary.as_ref().map(ToString::to_string),
        keys: Keys {
            config: format!("/legate/{cluster}/config"),
            records: format!("/legate/{cluster}/replication/"),
        },
        client,
        alarms: hub.alarms().clone(),
        source: control.source().clone(),
        held: Mutex::new(None),
        seen: Mutex::new(None),
        mine: Mutex::new(NodeRecord {
            node: node.clone(),
            primary: config.cluster.primary.as_ref().map(ToString::to_string) == Some(node.clone()),
            ..NodeRecord::default()
        }),
        node,
        records: Mutex::new(BTreeMap::new()),
        publish: tokio::sync::Notify::new(),
        force: force_tx,
    });
    register_metrics();
    control.set_replication(Arc::new(Hook(inner.clone())));
    if inner.is_primary() && !inner.publish(&hub, &control).await {
        // Refused at start: the watch loop tries again (a stored permit wakes it at once).
        inner.publish.notify_one();
    }
    let first = match inner
        .sync(&hub, &control, Trigger::ReplicationAtStart)
        .await
    {
        Ok(rev) => Some(rev),
        Err(e) => {
            tracing::warn!(error = %e, "cluster replication: etcd not readable yet; retrying");
            None
        }
    };
    let status = inner.clone();
    tokio::spawn(run(inner, hub, control, shutdown, force_rx, first));
    Arc::new(move || status.status_json())
}

type ForceRx =
    tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<Result<ReloadReport, String>>>;

async fn run(
    inner: Arc<Inner>,
    hub: Arc<Hub>,
    control: Arc<Control>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut force: ForceRx,
    mut first: Option<i64>,
) {
    use etcd_client::{EventType, WatchOptions};
    // A publication etcd refused (no quorum) is tried again until it lands.
    let mut republish = false;
    let mut pause = Duration::from_millis(250);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let rev = match first.take() {
            Some(r) => r,
            None => match inner.sync(&hub, &control, Trigger::Replication).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "cluster replication: resync failed");
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        // A reload on the primary while etcd is away: try to publish (and
                        // say it failed) now, not only once the watch is back.
                        () = inner.publish.notified() => {
                            republish = !inner.publish(&hub, &control).await;
                            continue;
                        }
                    }
                }
            },
        };
        let opts = WatchOptions::new().with_start_revision(rev + 1);
        // Bounded like every etcd call: a member that died under us must not hang the loop.
        let mut wc = inner.client.watch_client();
        let config_watch = deadline(wc.watch(inner.keys.config.clone(), Some(opts.clone()))).await;
        let mut wc2 = inner.client.watch_client();
        let records_watch =
            deadline(wc2.watch(inner.keys.records.clone(), Some(opts.with_prefix()))).await;
        let (Ok(mut config_stream), Ok(mut records_stream)) = (config_watch, records_watch) else {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = inner.publish.notified() => {
                    republish = !inner.publish(&hub, &control).await;
                    pause = Duration::from_millis(250);
                }
                _ = tokio::time::sleep(pause), if republish => {
                    republish = !inner.publish(&hub, &control).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Some(reply) = force.recv() => {
                    let _ = reply.send(inner.force(&hub, &control).await);
                }
                msg = config_stream.message() => match msg {
                    Ok(Some(resp)) if resp.compact_revision() == 0 => {
                        let latest = resp
                            .events()
                            .iter()
                            .rev()
                            .filter(|e| e.event_type() == EventType::Put)
                            .filter_map(|e| e.kv())
                            .find_map(|kv| serde_json::from_slice::<Published>(kv.value()).ok());
                        if let Some(p) = latest {
                            inner.on_published(&hub, &control, p, Trigger::Replication).await;
                        }
                    }
                    _ => break,
                },
                msg = records_stream.message() => match msg {
                    Ok(Some(resp)) if resp.compact_revision() == 0 => {
                        if let Ok(mut r) = inner.records.lock() {
                            for e in resp.events() {
                                let Some(kv) = e.kv() else { continue };
                                match e.event_type() {
                                    EventType::Put => {
                                        if let Ok(rec) = serde_json::from_slice::<NodeRecord>(kv.value()) {
                                            r.insert(rec.node.clone(), rec);
                                        }
                                    }
                                    EventType::Delete => {
                                        let key = kv.key_str().unwrap_or_default();
                                        if let Some(id) = key.strip_prefix(inner.keys.records.as_str()) {
                                            r.remove(id);
                                        }
                                    }
                                }
                            }
                        }
                    }
                    _ => break,
                },
            }
        }
        // A broken or compacted watch: read everything again, then watch from there.
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(s: &str) -> Table {
        toml::from_str(s).expect("toml")
    }

    const PRIMARY: &str = r#"
[node]
id = "gw1"
admin_listen = "127.0.0.1:9091"
[[local_domain]]
name = "example.com"
cert = "/etc/gw1/example.pem"
key = "/etc/gw1/example.key"
[[local_domain]]
name = "example.org"
[listeners]
sip_tls = "10.0.0.1:5061"
[tls]
cert = "/etc/gw1/node.pem"
key = "/etc/gw1/node.key"
[sip]
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[xmpp.federation]
mode = "allow-list"
dialback_secret = "gw1-secret-gw1-secret"
[[xmpp.federation.domain]]
name = "xmpp-partner.net"
[limits]
max_subscriptions_per_user = 50
[dns]
nameservers = ["10.0.0.53:53"]
[cluster]
name = "gw.example.com"
primary = "gw1"
"#;

    #[test]
    fn the_cluster_wide_part_holds_no_peer_specific_item() {
        let wide = cluster_wide(&table(PRIMARY));
        let keys: Vec<&str> = wide.keys().map(String::as_str).collect();
        assert_eq!(keys, ["limits", "local_domain", "sip", "xmpp"]);
        let text = toml::to_string(&wide).expect("text");
        for secret_or_local in [
            "gw1-secret",
            "/etc/gw1",
            "10.0.0",
            "admin_listen",
            "gw.example.com",
        ] {
            assert!(
                !text.contains(secret_or_local),
                "{secret_or_local} in {text}"
            );
        }
        assert!(text.contains("partner.com") && text.contains("xmpp-partner.net"));
        assert!(text.contains("max_subscriptions_per_user = 50"), "{text}");
    }

    const SUBORDINATE: &str = r#"
[node]
id = "gw2"
admin_listen = "127.0.0.1:9092"
[[local_domain]]
name = "example.com"
cert = "/etc/gw2/example.pem"
key = "/etc/gw2/example.key"
[[local_domain]]
name = "stale.example"
[listeners]
sip_tls = "10.0.0.2:5061"
[sip]
[[sip.federated_domain]]
name = "old-partner.com"
system = "lync"
[xmpp.federation]
dialback_secret = "gw2-secret-gw2-secret"
[limits]
max_subscriptions_per_user = 10
idle_timeout_secs = 99
[cluster]
name = "gw.example.com"
primary = "gw1"
"#;

    #[test]
    fn the_merge_takes_the_primarys_wide_part_and_keeps_this_nodes_own_items() {
        let wide = cluster_wide(&table(PRIMARY));
        let merged = merge(&table(SUBORDINATE), &wide);
        // Peer-specific: this node's.
        assert_eq!(merged["node"]["id"].as_str(), Some("gw2"));
        assert_eq!(
            merged["listeners"]["sip_tls"].as_str(),
            Some("10.0.0.2:5061")
        );
        assert_eq!(
            merged["xmpp"]["federation"]["dialback_secret"].as_str(),
            Some("gw2-secret-gw2-secret")
        );
        // Cluster-wide: the primary's, whole (a key only this node set is gone too).
        assert_eq!(merged["limits"], wide["limits"]);
        assert!(merged["limits"].get("idle_timeout_secs").is_none());
        assert_eq!(merged["sip"], wide["sip"]);
        assert_eq!(
            merged["xmpp"]["federation"]["mode"].as_str(),
            Some("allow-list")
        );
        // Domains: the primary's names, each with this node's certificate where it has one.
        let domains = merged["local_domain"].as_array().expect("domains");
        let names: Vec<&str> = domains.iter().filter_map(|d| d["name"].as_str()).collect();
        assert_eq!(names, ["example.com", "example.org"]);
        assert_eq!(domains[0]["cert"].as_str(), Some("/etc/gw2/example.pem"));
        assert!(domains[1].get("cert").is_none());
        // The merge of a node with the same wide part is that node's file.
        let own = table(SUBORDINATE);
        assert_eq!(merge(&own, &cluster_wide(&own)), own);
        // And merging is what the primary publishes, read back.
        assert_eq!(cluster_wide(&merged), wide);
    }

    #[test]
    fn a_primary_without_federation_settings_leaves_only_the_secret() {
        let wide = cluster_wide(&table("[limits]\nidle_timeout_secs = 5\n"));
        let merged = merge(&table(SUBORDINATE), &wide);
        let fed = merged["xmpp"]["federation"].as_table().expect("fed");
        assert_eq!(fed.keys().collect::<Vec<_>>(), ["dialback_secret"]);
        assert!(merged.get("sip").is_none() && merged.get("local_domain").is_none());
    }

    #[test]
    fn the_digest_covers_the_text_and_every_mapping_file() {
        let f = |t: &str| MappingFile {
            rel: "tables/a.toml".into(),
            text: t.into(),
        };
        let a = digest("x", &[f("1")]);
        assert_eq!(a, digest("x", &[f("1")]));
        assert_ne!(a, digest("x", &[f("2")]));
        assert_ne!(a, digest("y", &[f("1")]));
        assert_ne!(a, digest("x", &[]));
    }

    fn published(primary_text: &str, extra: Vec<MappingFile>) -> Published {
        let config = toml::to_string(&cluster_wide(&table(primary_text))).expect("text");
        let mut mappings = mapping_files(None).expect("shipped set");
        mappings.extend(extra);
        Published {
            primary: "gw1".into(),
            peers: vec!["gw1".into(), "gw2".into()],
            digest: digest(&config, &mappings),
            config,
            mappings,
            published_at_ms: 0,
        }
    }

    const OWN: &str = r#"
[node]
id = "gw2"
admin_listen = "127.0.0.1:0"
[[local_domain]]
name = "example.com"
[xmpp.federation]
dialback_secret = "gw2-secret-gw2-secret"
[limits]
idle_timeout_secs = 99
"#;

    #[test]
    fn a_candidate_is_this_nodes_file_with_the_primarys_part_validated() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("legate.toml");
        std::fs::write(&path, OWN).expect("write");
        let source = ConfigSource {
            path: Some(path),
            mappings: None,
        };
        let primary = "[[local_domain]]\nname = \"example.com\"\n[[sip.federated_domain]]\nname = \"partner.com\"\nsystem = \"lync\"\n[limits]\nmax_subscriptions_per_user = 60\n";
        let (cfg, set) = candidate(&source, &published(primary, vec![])).expect("valid");
        assert_eq!(cfg.node.id.as_str(), "gw2");
        assert_eq!(cfg.sip.federated_domains[0].name.as_str(), "partner.com");
        assert_eq!(cfg.limits.max_subscriptions_per_user, 60);
        // This node's limit is not the primary's: the default applies.
        assert_ne!(cfg.limits.idle_timeout_secs, 99);
        assert!(cfg.xmpp.federation.dialback_secret.is_some());
        assert!(set.system_id("lync").is_some());
        assert_eq!(
            conflicts(&source, &published(primary, vec![])),
            ["[limits]", "[sip]"]
        );
        // A broken mapping file of the primary's: every problem, named by its path.
        let broken = MappingFile {
            rel: "tables/broken.toml".into(),
            text: "from = \"nosuchsystem\"\n".into(),
        };
        let problems = candidate(&source, &published(primary, vec![broken])).expect_err("broken");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("<primary gw1>/tables/broken.toml")),
            "{problems:?}"
        );
        // A cluster-wide value this node's validation refuses: named, with the merge said.
        let bad = "[limits]\nmax_subscriptions_per_user = -1\n";
        let problems = candidate(&source, &published(bad, vec![])).expect_err("out of range");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("max_subscriptions_per_user") && p.contains("merged")),
            "{problems:?}"
        );
    }
}
