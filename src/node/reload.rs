//! Reload (SIGHUP, `legate reload`, `POST /reload`): the configuration file, the mapping
//! files and the certificates are read again and, when all are valid, swapped in whole.
//!
//! - **Applies live**: every later routing decision and policy check reads the swapped
//!   configuration (the hub's `ArcSwap`), so a domain removed from `[[sip.federated_domain]]` or
//!   `[xmpp.federation]` is refused on its next request or stanza, on connections already open
//!   too; limits read per request or per connection apply to the next one; the certificates
//!   are served from the next TLS handshake on (SIP and s2s share one `ServerTls`), and
//!   presented on the next outbound one (one shared `ClientTls`).
//! - **Needs a restart** ([`RESTART_KEYS`]): what was bound or spawned from the start-up
//!   configuration. A change there is named in the report and the log; the running value is
//!   kept in the swapped configuration so `/status` never shows what is not in effect.
//! - **Refused**: an invalid file (or a certificate that does not load) changes nothing and
//!   raises `ConfigReloadRefused`; the next good reload clears it.
//! - **In a cluster** (`crate::cluster::replication`, through [`ReplicationHook`]): the
//!   configuration primary publishes what it runs after each applied reload; a subordinate
//!   reloads with its file's peer-specific part merged with the primary's cluster-wide part
//!   and mapping set, both when it reloads itself and when the primary publishes
//!   ([`Trigger::Replication`]; a refused one raises `ClusterReplicationFailed` instead).

use super::Control;
use crate::config::{Config, Domain};
use crate::gateway::Hub;
use crate::ops::alarms::AlarmName;
use crate::tls::{ServerTls, TlsSettings};
use serde::Serialize;
use std::sync::LazyLock;

/// Keys (and sections) read only at start: changing them needs a restart. `legate check`
/// prints this list.
pub const RESTART_KEYS: &[&str] = &[
    "node.id",
    "node.data_dir",
    "node.admin_listen",
    "node.admin_allow_remote",
    "listeners.*",
    "tls.trust_bundle",
    "tls.min_version",
    "[[home_node]] and routing_node",
    "xmpp.federation.dialback_secret",
    "mappings.dir",
    "mappings.reload",
    "dns.nameservers",
    "[cluster]",
    "intercluster.name, listen, transport and [[intercluster.peer]]",
    "[[local_domain]] mesh_component",
    "limits.sip_max_message_bytes",
    "limits.sip_max_header_bytes",
    "limits.sip_message_timeout_secs",
    "limits.first_request_timeout_secs",
    "limits.max_connections_per_listener",
    "limits.max_connections_per_peer",
    "limits.im_session_idle_secs",
    "limits.outbound_queue_per_domain",
    "limits.home_link_alarm_grace_secs",
    "a partner domain added in allow-list mode (its component links open at start)",
];

static RELOADS: LazyLock<prometheus::IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        "legate_config_reloads_total",
        "Reloads of the configuration, mappings and certificates (SIGHUP, legate reload), by \
         outcome (applied, refused)",
        &["outcome"],
    )
});

/// Registers the reload counter with zero values (dashboards see the series at start).
pub(super) fn register_metrics() {
    for o in ["applied", "refused"] {
        RELOADS.with_label_values(&[o]);
    }
}

/// What asked for the reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Sighup,
    Admin,
    /// A cluster subordinate applying a configuration the primary published.
    Replication,
    /// The same, while the node starts (nothing bound yet): the replicated limits read only
    /// at start are taken too.
    #[serde(rename = "replication_at_start")]
    ReplicationAtStart,
    /// `legate cluster force-config-update`: a subordinate taking the primary's again.
    Force,
}

impl Trigger {
    /// Whether an admin asked for this reload on this node (a refused one raises
    /// `ConfigReloadRefused`; a refused replication raises its own alarm).
    fn local(self) -> bool {
        matches!(self, Trigger::Sighup | Trigger::Admin)
    }
}

/// A cluster's configuration replication, as the reload sees it (`cluster::replication`
/// implements it; the node keeps one in [`Control`]).
pub trait ReplicationHook: Send + Sync {
    /// On a subordinate holding the primary's configuration: this node's file's peer-specific
    /// part merged with the primary's cluster-wide part, validated, with the primary's mapping
    /// set. `None` on the primary (or before anything was replicated): the file alone is read.
    fn candidate(
        &self,
        source: &super::ConfigSource,
    ) -> Option<Result<(Config, crate::presence::map::MappingSet), Vec<String>>>;
    /// Told after each applied reload (the primary publishes what it now runs).
    fn applied(&self, report: &ReloadReport);
    /// Told when the mapping watcher (`[mappings] reload`) swapped in an edit.
    fn mappings_reloaded(&self);
    /// `legate cluster force-config-update`: drop the primary's part held, read it again and
    /// apply it; an error (on the primary itself, or etcd unreadable) says why not.
    fn force(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ReloadReport, String>> + Send>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Applied,
    Refused,
}

/// What one reload did: the answer of `POST /reload`, the `reload` section of `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    pub outcome: Outcome,
    pub trigger: Trigger,
    /// Unix seconds.
    pub at: u64,
    /// Sections whose new values are now in effect.
    pub applied: Vec<&'static str>,
    /// Keys changed in the file that keep their running value until a restart.
    pub restart_needed: Vec<String>,
    /// Whether the server certificates were read again (false: no TLS server material).
    pub certificates_reloaded: bool,
    /// Why the reload was refused, `file:line:col: message` each where known.
    pub problems: Vec<String>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads everything again and swaps in what is valid; see the module doc.
pub fn reload(hub: &Hub, control: &Control, trigger: Trigger) -> ReloadReport {
    let subject = control.source.display();
    let report = match try_reload(hub, control, trigger) {
        Ok(r) => {
            if trigger.local() {
                hub.alarms().clear(AlarmName::ConfigReloadRefused, &subject);
            }
            tracing::info!(
                ?trigger,
                applied = ?r.applied,
                restart_needed = ?r.restart_needed,
                certificates = r.certificates_reloaded,
                "configuration reloaded"
            );
            for key in &r.restart_needed {
                tracing::warn!(key = %key, "changed in the file, but takes effect only after a restart");
            }
            r
        }
        Err(problems) => {
            let text = problems.join("\n");
            tracing::error!(?trigger, problems = %text, "reload refused; the running configuration stays in use");
            if trigger.local() {
                hub.alarms()
                    .raise(AlarmName::ConfigReloadRefused, &subject, &text);
            }
            ReloadReport {
                outcome: Outcome::Refused,
                trigger,
                at: unix_now(),
                applied: Vec::new(),
                restart_needed: Vec::new(),
                certificates_reloaded: false,
                problems,
            }
        }
    };
    RELOADS
        .with_label_values(&[match report.outcome {
            Outcome::Applied => "applied",
            Outcome::Refused => "refused",
        }])
        .inc();
    if let Ok(mut last) = control.last_reload.lock() {
        *last = Some(report.clone());
    }
    if report.outcome == Outcome::Applied {
        if let Some(hook) = control.replication() {
            hook.applied(&report);
        }
    }
    report
}

fn try_reload(hub: &Hub, control: &Control, trigger: Trigger) -> Result<ReloadReport, Vec<String>> {
    let lines = |d: crate::diag::Diagnostics| -> Vec<String> {
        d.0.iter().map(|x| x.to_string()).collect()
    };
    let old = hub.config();
    // A cluster subordinate runs the primary's cluster-wide part and mapping set.
    let (new, replicated_maps) = match control
        .replication()
        .and_then(|h| h.candidate(&control.source))
    {
        Some(candidate) => {
            let (config, maps) = candidate?;
            (config, Some(maps))
        }
        None => (
            control
                .source
                .load_against(old.mappings.dir.as_deref())
                .map_err(lines)?,
            None,
        ),
    };
    let mut restart_needed = restart_needed(&old, &new, control.server_tls.is_some());
    let candidate_limits = new.limits.clone();
    if control.source.mappings_dir() != old.mappings.dir {
        restart_needed.push("mappings.dir".to_string());
    }
    let mut new = keep_restart_only(&old, new);
    if trigger == Trigger::ReplicationAtStart {
        // Nothing has read the start-only limits yet: the primary's apply.
        new.limits = candidate_limits;
        restart_needed.retain(|k| !k.starts_with("limits.") && !k.starts_with("component links"));
    }
    let settings = TlsSettings::from_config(&new);
    // Every file is read and checked before anything is swapped: a certificate that does not
    // load must not leave a new mapping set beside the old configuration.
    if control.server_tls.is_some() {
        ServerTls::new(&settings).map_err(|e| vec![format!("certificates: {e}")])?;
    }
    if let Some(maps) = replicated_maps {
        hub.maps().pin(maps);
    } else if new.mappings.dir.is_some() {
        hub.maps().reload().map_err(lines)?;
        if let Some(dir) = &new.mappings.dir {
            hub.alarms()
                .clear(AlarmName::MappingReloadRefused, &dir.display().to_string());
        }
    }
    let certificates_reloaded = match &control.server_tls {
        Some(tls) => {
            tls.reload_certs(&settings)
                .map_err(|e| vec![format!("certificates: {e}")])?;
            true
        }
        None => false,
    };
    if let Some(tls) = &control.client_tls {
        // The same files, checked just above: what we present on outbound connections
        // rotates with what we serve.
        tls.reload_certs(&settings)
            .map_err(|e| vec![format!("certificates: {e}")])?;
    }
    let applied = changed_sections(&old, &new);
    crate::ops::alarms::check_certificates(hub.alarms(), &new, unix_now() as i64);
    hub.replace_config(new);
    Ok(ReloadReport {
        outcome: Outcome::Applied,
        trigger,
        at: unix_now(),
        applied,
        restart_needed,
        certificates_reloaded,
        problems: Vec::new(),
    })
}

/// The restart-only keys (see [`RESTART_KEYS`]) whose value differs between `old` (running)
/// and `new` (the file).
pub fn restart_needed(old: &Config, new: &Config, have_server_tls: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |changed: bool, key: &str| {
        if changed {
            out.push(key.to_string());
        }
    };
    note(old.node.id != new.node.id, "node.id");
    note(old.node.data_dir != new.node.data_dir, "node.data_dir");
    note(
        old.node.admin_listen != new.node.admin_listen,
        "node.admin_listen",
    );
    note(
        old.node.admin_allow_remote != new.node.admin_allow_remote,
        "node.admin_allow_remote",
    );
    let (ol, nl) = (&old.listeners, &new.listeners);
    note(ol.sip_tls != nl.sip_tls, "listeners.sip_tls");
    note(ol.sip_tcp != nl.sip_tcp, "listeners.sip_tcp");
    note(ol.xmpp_s2s != nl.xmpp_s2s, "listeners.xmpp_s2s");
    note(
        ol.xmpp_s2s_direct_tls != nl.xmpp_s2s_direct_tls,
        "listeners.xmpp_s2s_direct_tls",
    );
    note(
        old.tls.trust_bundle != new.tls.trust_bundle,
        "tls.trust_bundle",
    );
    note(
        old.tls.min_version != new.tls.min_version,
        "tls.min_version",
    );
    let has_cert =
        |c: &Config| c.tls.cert.is_some() || c.local_domains.iter().any(|d| d.cert.is_some());
    note(
        !have_server_tls && has_cert(new),
        "tls.cert (the node started without a certificate)",
    );
    note(old.home_nodes != new.home_nodes, "[[home_node]]");
    note(old.routing_node != new.routing_node, "routing_node");
    note(
        old.xmpp.federation.dialback_secret != new.xmpp.federation.dialback_secret,
        "xmpp.federation.dialback_secret",
    );
    note(old.mappings != new.mappings, "[mappings]");
    note(old.dns != new.dns, "dns.nameservers");
    note(old.cluster != new.cluster, "[cluster]");
    // The interval, the stuck threshold and auto-recovery are read at each decision of the
    // sync agent (the interval from the next sync on); the link itself is set up at start.
    let (a, b) = (&old.intercluster, &new.intercluster);
    note(
        (&a.name, &a.listen, a.transport, &a.peers) != (&b.name, &b.listen, b.transport, &b.peers),
        "intercluster.name, listen, transport and [[intercluster.peer]]",
    );
    // Mesh components are component links, opened at start.
    let mesh = |c: &Config| -> Vec<(Domain, Option<Domain>)> {
        c.local_domains
            .iter()
            .map(|d| (d.name.clone(), d.mesh_component.clone()))
            .collect()
    };
    note(mesh(old) != mesh(new), "[[local_domain]] mesh_component");
    let (a, b) = (&old.limits, &new.limits);
    // The key name is built from the field, so the two can never disagree.
    macro_rules! start_only {
        ($($f:ident),* $(,)?) => {
            [$((a.$f != b.$f, concat!("limits.", stringify!($f)))),*]
        };
    }
    for (changed, key) in start_only!(
        sip_max_message_bytes,
        sip_max_header_bytes,
        sip_message_timeout_secs,
        first_request_timeout_secs,
        max_connections_per_listener,
        max_connections_per_peer,
        im_session_idle_secs,
        outbound_queue_per_domain,
        home_link_alarm_grace_secs,
    ) {
        note(changed, key);
    }
    // Component links are spawned at start for the listed domains; open federation opens
    // the others on demand, so only allow-list mode needs the restart.
    if new.xmpp.federation.mode != crate::config::FederationMode::DenyList {
        let before = crate::xmpp::link::served_domains(old);
        let added: Vec<Domain> = crate::xmpp::link::served_domains(new)
            .into_iter()
            .filter(|d| !before.contains(d))
            .collect();
        for d in added {
            out.push(format!("component links for the new partner domain {d}"));
        }
    }
    out
}

/// `new` with the restart-only values of `old`: what the swapped configuration says is what
/// runs.
fn keep_restart_only(old: &Config, mut new: Config) -> Config {
    new.node = old.node.clone();
    new.listeners = old.listeners.clone();
    new.tls.trust_bundle = old.tls.trust_bundle.clone();
    new.tls.min_version = old.tls.min_version;
    new.home_nodes = old.home_nodes.clone();
    new.routing_node = old.routing_node.clone();
    new.xmpp.federation.dialback_secret = old.xmpp.federation.dialback_secret.clone();
    new.mappings = old.mappings.clone();
    new.dns = old.dns.clone();
    new.cluster = old.cluster.clone();
    new.intercluster.name = old.intercluster.name.clone();
    new.intercluster.listen = old.intercluster.listen;
    new.intercluster.transport = old.intercluster.transport;
    new.intercluster.peers = old.intercluster.peers.clone();
    for d in &mut new.local_domains {
        d.mesh_component = old
            .local_domains
            .iter()
            .find(|o| o.name == d.name)
            .and_then(|o| o.mesh_component.clone());
    }
    let (a, b) = (&old.limits, &mut new.limits);
    b.sip_max_message_bytes = a.sip_max_message_bytes;
    b.sip_max_header_bytes = a.sip_max_header_bytes;
    b.sip_message_timeout_secs = a.sip_message_timeout_secs;
    b.first_request_timeout_secs = a.first_request_timeout_secs;
    b.max_connections_per_listener = a.max_connections_per_listener;
    b.max_connections_per_peer = a.max_connections_per_peer;
    b.im_session_idle_secs = a.im_session_idle_secs;
    b.outbound_queue_per_domain = a.outbound_queue_per_domain;
    b.home_link_alarm_grace_secs = a.home_link_alarm_grace_secs;
    new
}

/// The sections whose values differ (after `keep_restart_only`, so all of them apply).
fn changed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (changed, name) in [
        (old.local_domains != new.local_domains, "local_domain"),
        (old.tls != new.tls, "tls"),
        (old.sip != new.sip, "sip"),
        (old.xmpp != new.xmpp, "xmpp"),
        (old.chat_nodes != new.chat_nodes, "chat_node"),
        (old.limits != new.limits, "limits"),
    ] {
        if changed {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{from_toml, BUILTIN_SYSTEMS};
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            r#"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
default_system = "xmpp"
{extra}
"#
        );
        from_toml(&text, Path::new("t.toml"), BUILTIN_SYSTEMS).expect("config")
    }

    #[test]
    fn listener_and_limit_changes_are_named_and_kept_at_their_running_value() {
        let old = cfg("[listeners]\nsip_tcp = \"127.0.0.1:5060\"\n");
        let new = cfg(
            "[listeners]\nsip_tcp = \"127.0.0.1:5070\"\n[limits]\nsip_max_header_bytes = 8192\ndelivery_timeout_secs = 7\n",
        );
        let needed = restart_needed(&old, &new, false);
        assert!(
            needed.contains(&"listeners.sip_tcp".to_string()),
            "{needed:?}"
        );
        assert!(
            needed.contains(&"limits.sip_max_header_bytes".to_string()),
            "{needed:?}"
        );
        let merged = keep_restart_only(&old, new);
        assert_eq!(merged.listeners, old.listeners);
        assert_eq!(
            merged.limits.sip_max_header_bytes,
            old.limits.sip_max_header_bytes
        );
        // A limit read per request applies.
        assert_eq!(merged.limits.delivery_timeout_secs, 7);
        assert_eq!(changed_sections(&old, &merged), vec!["limits"]);
    }

    #[test]
    fn a_partner_added_in_allow_list_mode_needs_its_component_links() {
        let old = cfg("");
        let new = cfg("[[sip.federated_domain]]\nname = \"other.com\"\nsystem = \"lync\"\n");
        let needed = restart_needed(&old, &new, false);
        assert_eq!(
            needed,
            vec!["component links for the new partner domain other.com".to_string()]
        );
        assert_eq!(
            changed_sections(&old, &keep_restart_only(&old, new)),
            vec!["sip"]
        );
    }

    #[test]
    fn a_mesh_component_needs_a_restart_and_keeps_running_as_started() {
        let old = cfg("[[local_domain]]\nname = \"other.example\"\n");
        let new = cfg(
            "[[local_domain]]\nname = \"other.example\"\nmesh_component = \"mesh.other.example\"\n",
        );
        let needed = restart_needed(&old, &new, false);
        assert!(
            needed.contains(&"[[local_domain]] mesh_component".to_string()),
            "{needed:?}"
        );
        let kept = keep_restart_only(&old, new);
        assert!(kept
            .local_domains
            .iter()
            .all(|d| d.mesh_component.is_none()));
        assert!(restart_needed(&old, &kept, false).is_empty());
    }

    #[test]
    fn a_removed_partner_applies_without_restart() {
        let old = cfg("[[sip.federated_domain]]\nname = \"other.com\"\nsystem = \"lync\"\n");
        let new = cfg("");
        assert!(restart_needed(&old, &new, false).is_empty());
    }

    #[test]
    fn the_sync_interval_applies_live_the_peers_need_a_restart() {
        let base =
            "[intercluster]\nname = \"a\"\nlisten = \"127.0.0.1:7401\"\ntransport = \"tcp\"\n";
        let old = cfg(&format!(
            "{base}[[intercluster.peer]]\nname = \"b\"\naddress = \"10.0.0.2:7401\"\n"
        ));
        let live = cfg(&format!(
            "{base}sync_interval_mins = 60\nstuck_after_secs = 60\n[[intercluster.peer]]\nname = \"b\"\naddress = \"10.0.0.2:7401\"\n"
        ));
        assert!(restart_needed(&old, &live, false).is_empty());
        let kept = keep_restart_only(&old, live);
        assert_eq!(
            (
                kept.intercluster.sync_interval_mins,
                kept.intercluster.stuck_after_secs
            ),
            (60, 60)
        );
        let moved = cfg(&format!(
            "{base}[[intercluster.peer]]\nname = \"b\"\naddress = \"10.0.0.3:7401\"\n"
        ));
        assert_eq!(
            restart_needed(&old, &moved, false),
            vec!["intercluster.name, listen, transport and [[intercluster.peer]]".to_string()]
        );
        assert_eq!(
            keep_restart_only(&old, moved).intercluster.peers,
            old.intercluster.peers
        );
    }
}
