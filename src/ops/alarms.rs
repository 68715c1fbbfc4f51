//! Named alarms: a fixed set of conditions an admin must act on, each with a severity, when it
//! was first and last seen, how often it was raised, whether it is raised now, and the action
//! to take in plain words.
//!
//! `AlarmTable` is sans-IO (time is passed in, as Unix seconds); `Alarms` is the shared handle
//! the hub carries, which also keeps the `legate_alarms_active{name,severity}` gauge (labels
//! bounded: names are the `AlarmName` enum). The drivers at the bottom turn facts the node
//! already has into raise/clear calls: the component link status (XEP-0114 links to the home
//! nodes) and the certificate files (expiry, RFC 5280 §4.1.2.5; names, RFC 6125 §6).

use crate::config::Config;
use crate::net::LogSafe;
use crate::xmpp::link::LinkStatus;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// How urgent an alarm is; the order is the display order (critical first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Major,
    Minor,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
            Severity::Warning => "warning",
        }
    }
}

/// Every alarm Legate can raise. A fixed set, so metric labels stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum AlarmName {
    HomeNodeLinkDown,
    CertificateExpired,
    CertificateExpiring,
    CertificateNotCoveringLocalDomain,
    MappingReloadRefused,
    ConfigReloadRefused,
    PartnerUnreachable,
    PartnerTlsFailure,
    ClusterStoreUnreachable,
    ClusterReplicationFailed,
    ClusterConfigConflict,
    ClusterPrimaryMismatch,
    ClusterNodeNotInPeerList,
    InterClusterSyncAgentPeerPeriodicSyncingFailure,
}

impl AlarmName {
    pub const ALL: [AlarmName; 14] = [
        AlarmName::HomeNodeLinkDown,
        AlarmName::CertificateExpired,
        AlarmName::CertificateExpiring,
        AlarmName::CertificateNotCoveringLocalDomain,
        AlarmName::MappingReloadRefused,
        AlarmName::ConfigReloadRefused,
        AlarmName::PartnerUnreachable,
        AlarmName::PartnerTlsFailure,
        AlarmName::ClusterStoreUnreachable,
        AlarmName::ClusterReplicationFailed,
        AlarmName::ClusterConfigConflict,
        AlarmName::ClusterPrimaryMismatch,
        AlarmName::ClusterNodeNotInPeerList,
        AlarmName::InterClusterSyncAgentPeerPeriodicSyncingFailure,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlarmName::HomeNodeLinkDown => "HomeNodeLinkDown",
            AlarmName::CertificateExpired => "CertificateExpired",
            AlarmName::CertificateExpiring => "CertificateExpiring",
            AlarmName::CertificateNotCoveringLocalDomain => "CertificateNotCoveringLocalDomain",
            AlarmName::MappingReloadRefused => "MappingReloadRefused",
            AlarmName::ConfigReloadRefused => "ConfigReloadRefused",
            AlarmName::PartnerUnreachable => "PartnerUnreachable",
            AlarmName::PartnerTlsFailure => "PartnerTlsFailure",
            AlarmName::ClusterStoreUnreachable => "ClusterStoreUnreachable",
            AlarmName::ClusterReplicationFailed => "ClusterReplicationFailed",
            AlarmName::ClusterConfigConflict => "ClusterConfigConflict",
            AlarmName::ClusterPrimaryMismatch => "ClusterPrimaryMismatch",
            AlarmName::ClusterNodeNotInPeerList => "ClusterNodeNotInPeerList",
            AlarmName::InterClusterSyncAgentPeerPeriodicSyncingFailure => {
                "InterClusterSyncAgentPeerPeriodicSyncingFailure"
            }
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            AlarmName::HomeNodeLinkDown | AlarmName::CertificateExpired => Severity::Critical,
            AlarmName::CertificateNotCoveringLocalDomain
            | AlarmName::PartnerTlsFailure
            | AlarmName::ClusterStoreUnreachable
            | AlarmName::ClusterReplicationFailed
            | AlarmName::ClusterPrimaryMismatch
            | AlarmName::ClusterNodeNotInPeerList
            | AlarmName::InterClusterSyncAgentPeerPeriodicSyncingFailure => Severity::Major,
            AlarmName::CertificateExpiring
            | AlarmName::MappingReloadRefused
            | AlarmName::ConfigReloadRefused
            | AlarmName::PartnerUnreachable
            | AlarmName::ClusterConfigConflict => Severity::Minor,
        }
    }

    /// What the admin should do, in plain words (also in the README's Alarms table).
    pub fn action(self) -> &'static str {
        match self {
            AlarmName::HomeNodeLinkDown => {
                "Check that the home node's XMPP server is running and accepts the component \
                 (address and port in [[home_node]], the shared secret, the component declared \
                 in its configuration); `last_failure` in `legate status` says why the link fails."
            }
            AlarmName::CertificateExpired => {
                "Renew the certificate now: partners refuse our TLS connections."
            }
            AlarmName::CertificateExpiring => {
                "Renew the certificate and install it before it expires, then `legate reload` (or SIGHUP): the next TLS handshake serves it."
            }
            AlarmName::CertificateNotCoveringLocalDomain => {
                "Get a certificate whose subjectAltName names the local domain (or give that \
                 [[local_domain]] its own cert and key): partners will refuse TLS for it."
            }
            AlarmName::MappingReloadRefused => {
                "Fix the mapping files (run `legate check --mappings DIR` for file:line errors); \
                 the last good set stays in use until then."
            }
            AlarmName::ConfigReloadRefused => {
                "Fix the configuration file (or the certificate files it names): run `legate \
                 check --config FILE` for file:line errors, then `legate reload` (or SIGHUP). \
                 The last good configuration stays in use until then."
            }
            AlarmName::PartnerUnreachable => {
                "Run `legate doctor DOMAIN`: the partner's DNS records, address or port, or a \
                 firewall between us, stop our connections."
            }
            AlarmName::PartnerTlsFailure => {
                "Run `legate doctor DOMAIN`: the TLS handshake with the partner fails (certificate \
                 names, expiry, trust bundle, clientAuth usage)."
            }
            AlarmName::ClusterStoreUnreachable => {
                "This node lost its etcd lease: it stepped down, left the member list and serves \
                 traffic on cached state (no configuration or state writes). Check that a \
                 majority of cluster.etcd_endpoints is up and reachable from this node \
                 (`etcdctl --endpoints=... endpoint health`); the node rejoins by itself."
            }
            AlarmName::ClusterReplicationFailed => {
                "The configuration the primary published does not validate on this node (this                  node's peer-specific part merged with it, e.g. a certificate for a domain, or a                  mapping file): this node keeps its running configuration. `last_error` under                  cluster.replication in `legate status --json` names the problems; fix them on                  the primary (and `legate reload` there) or in this node's file (then `legate                  cluster force-config-update` here)."
            }
            AlarmName::ClusterConfigConflict => {
                "This node's own file (or mapping files) says something else than the primary                  about a cluster-wide item; the primary's values are in use. Copy the primary's                  cluster-wide sections into this file (or remove them) so the next admin is not                  misled."
            }
            AlarmName::ClusterPrimaryMismatch => {
                "cluster.primary is not the same on every node: set the same node id on each                  peer and restart the nodes that were wrong. Until then this node keeps its                  running configuration."
            }
            AlarmName::InterClusterSyncAgentPeerPeriodicSyncingFailure => {
                "The user sync with this peer cluster has not succeeded for \
                 intercluster.stuck_after_secs; its users stay routable from the last good sync. \
                 `legate intercluster status` shows why (reachable, certificate, listed by the \
                 peer, last outcome): check that the peer's intercluster.listen is up and \
                 reachable, that it lists this cluster under the name in our intercluster.name, \
                 and that its certificate names its address and chains to tls.trust_bundle. \
                 Then `legate intercluster force-sync PEER`; the alarm clears at the first good \
                 sync."
            }
            AlarmName::ClusterNodeNotInPeerList => {
                "Add this node to [[cluster.peers]] in the primary's file and in this node's                  (every peer lists every peer), then restart."
            }
        }
    }
}

/// One alarm instance: a name about one subject (a home-node link, a certificate file, a
/// partner domain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alarm {
    pub name: AlarmName,
    pub subject: String,
    pub severity: Severity,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// How many times it went from clear to raised (a driver that re-raises a standing
    /// condition on every check updates `last_seen` and `detail`, not this).
    pub count: u64,
    pub raised: bool,
    /// What was seen, the last time.
    pub detail: String,
    pub action: &'static str,
}

/// Alarm instances kept; partner domains are not bounded by the configuration in open
/// federation, so past this the least recently seen (cleared ones first) make room.
const MAX_ENTRIES: usize = 1024;

/// The alarms of one node, keyed by (name, subject). Cleared alarms stay listed (history
/// for the admin) until raised again or evicted (`MAX_ENTRIES`).
#[derive(Debug, Default)]
pub struct AlarmTable {
    entries: BTreeMap<(AlarmName, String), Alarm>,
}

impl AlarmTable {
    /// Raises (or raises again) `name` about `subject`; `true` when it was not raised before.
    pub fn raise(&mut self, name: AlarmName, subject: &str, detail: &str, now: u64) -> bool {
        let key = (name, subject.to_string());
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&key) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, a)| (a.raised, a.last_seen))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        let e = self.entries.entry(key).or_insert_with(|| Alarm {
            name,
            subject: subject.to_string(),
            severity: name.severity(),
            first_seen: now,
            last_seen: now,
            count: 0,
            raised: false,
            detail: String::new(),
            action: name.action(),
        });
        let fresh = !e.raised;
        e.raised = true;
        if fresh {
            e.count += 1;
        }
        e.last_seen = now;
        e.detail = detail.to_string();
        fresh
    }

    /// Clears `name` about `subject`; `true` when it was raised.
    pub fn clear(&mut self, name: AlarmName, subject: &str) -> bool {
        match self.entries.get_mut(&(name, subject.to_string())) {
            Some(e) if e.raised => {
                e.raised = false;
                true
            }
            _ => false,
        }
    }

    /// Raised alarms first, then by severity (critical first), most recent first, name,
    /// subject.
    pub fn list(&self) -> Vec<Alarm> {
        let mut v: Vec<Alarm> = self.entries.values().cloned().collect();
        v.sort_by(|a, b| {
            (
                !a.raised,
                a.severity,
                std::cmp::Reverse(a.last_seen),
                a.name,
                &a.subject,
            )
                .cmp(&(
                    !b.raised,
                    b.severity,
                    std::cmp::Reverse(b.last_seen),
                    b.name,
                    &b.subject,
                ))
        });
        v
    }

    /// Raised alarms per name.
    pub fn active_counts(&self) -> HashMap<AlarmName, i64> {
        let mut m = HashMap::new();
        for e in self.entries.values().filter(|e| e.raised) {
            *m.entry(e.name).or_insert(0) += 1;
        }
        m
    }
}

static ACTIVE: LazyLock<prometheus::IntGaugeVec> = LazyLock::new(|| {
    crate::metrics::gauge_vec(
        "legate_alarms_active",
        "Raised alarms, by alarm name and severity",
        &["name", "severity"],
    )
});

/// Now, in Unix seconds (the time base of `Alarm::first_seen`/`last_seen`).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The shared alarm table of a node (one, on the hub). Every series of
/// `legate_alarms_active` exists from the first handle on, at zero.
#[derive(Debug, Clone)]
pub struct Alarms {
    table: Arc<Mutex<AlarmTable>>,
    /// Consecutive failed connections per partner domain (reset by a success).
    streaks: Arc<Mutex<HashMap<String, u32>>>,
}

/// Consecutive failed connections to a partner before its alarm is raised: one failure is
/// often a restart on their side.
const PARTNER_FAILURES: u32 = 3;

impl Default for Alarms {
    fn default() -> Self {
        for n in AlarmName::ALL {
            ACTIVE.with_label_values(&[n.as_str(), n.severity().as_str()]);
        }
        Alarms {
            table: Arc::default(),
            streaks: Arc::default(),
        }
    }
}

impl Alarms {
    fn with<R>(&self, f: impl FnOnce(&mut AlarmTable) -> R) -> R {
        // A panic elsewhere while holding the lock leaves a table that is still consistent.
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut t);
        let counts = t.active_counts();
        for n in AlarmName::ALL {
            ACTIVE
                .with_label_values(&[n.as_str(), n.severity().as_str()])
                .set(counts.get(&n).copied().unwrap_or(0));
        }
        r
    }

    pub fn raise(&self, name: AlarmName, subject: &str, detail: &str) {
        if self.with(|t| t.raise(name, subject, detail, unix_now())) {
            tracing::warn!(
                alarm = name.as_str(),
                severity = name.severity().as_str(),
                subject = %LogSafe(subject),
                detail = %LogSafe(detail),
                "alarm raised"
            );
        }
    }

    pub fn clear(&self, name: AlarmName, subject: &str) {
        if self.with(|t| t.clear(name, subject)) {
            tracing::info!(alarm = name.as_str(), subject = %LogSafe(subject), "alarm cleared");
        }
    }

    pub fn list(&self) -> Vec<Alarm> {
        self.with(|t| t.list())
    }

    /// An outbound connection (SIP dial or s2s stream) to partner `domain` failed; `tls` when
    /// the TLS handshake was the step that failed. The alarm is raised from the
    /// `PARTNER_FAILURES`th failure in a row.
    pub fn partner_failed(&self, domain: &str, tls: bool, detail: &str) {
        let n = {
            let mut m = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded like the table: a flood of failing domains restarts the counts.
            if m.len() >= MAX_ENTRIES && !m.contains_key(domain) {
                m.clear();
            }
            let c = m.entry(domain.to_string()).or_insert(0);
            *c = c.saturating_add(1);
            *c
        };
        if n >= PARTNER_FAILURES {
            let name = if tls {
                AlarmName::PartnerTlsFailure
            } else {
                AlarmName::PartnerUnreachable
            };
            self.raise(
                name,
                domain,
                &format!("{n} failed connections in a row; last: {detail}"),
            );
        }
    }

    /// `partner_failed` for an s2s dial error text: the s2s edge reports failures as text, so
    /// TLS is told apart by what its errors say ("TLS failed: ...", "TLS handshake failed ...",
    /// "the peer certificate names ...", "the peer presented no certificate").
    pub fn partner_failed_text(&self, domain: &str, text: &str) {
        let tls = text.contains("TLS") || text.contains("certificate");
        self.partner_failed(domain, tls, text);
    }

    /// An outbound connection to partner `domain` succeeded: its streak and alarms end.
    pub fn partner_connected(&self, domain: &str) {
        self.streaks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(domain);
        self.clear(AlarmName::PartnerUnreachable, domain);
        self.clear(AlarmName::PartnerTlsFailure, domain);
    }

    /// The `/alarms` document (also the `alarms` section of `/status`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.list()).unwrap_or_default()
    }
}

/// Watches the component links: a link down longer than `grace` raises `HomeNodeLinkDown`
/// about `home_node/domain`; it clears when the link is up. Polls once a second (the status
/// map is small and has no change feed).
pub async fn watch_links(
    alarms: Alarms,
    status: LinkStatus,
    grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut down_since: HashMap<String, Instant> = HashMap::new();
    loop {
        let now = Instant::now();
        for (home_node, domain, s) in status.snapshot() {
            let subject = format!("{home_node}/{domain}");
            // A link another cluster node holds is that node's to keep up (and to alarm on).
            if s.up || s.held_by.as_deref().is_some_and(|h| !h.is_empty()) {
                down_since.remove(&subject);
                alarms.clear(AlarmName::HomeNodeLinkDown, &subject);
                continue;
            }
            let since = *down_since.entry(subject.clone()).or_insert(now);
            if now.duration_since(since) >= grace {
                let why = s
                    .last_failure
                    .map(|(label, text)| format!("{label}: {text}"))
                    .unwrap_or_else(|| "never connected".to_string());
                let detail = format!(
                    "down for {} s ({} failures); last failure: {why}",
                    now.duration_since(since).as_secs(),
                    s.failures
                );
                alarms.raise(AlarmName::HomeNodeLinkDown, &subject, &detail);
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Checks the node's certificate files now, then once an hour: expiry, and whether each local
/// domain is named by the certificate it is served with (its own, else the node's `[tls]`
/// one). `cfg` gives the configuration in use at each pass (a reload may name other files).
pub async fn watch_certificates(
    alarms: Alarms,
    cfg: impl Fn() -> Arc<Config> + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        check_certificates(&alarms, &cfg(), unix_now() as i64);
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// One pass of the certificate checks at time `now` (Unix seconds): the findings of
/// `certs::inspect` raise their alarms, and the alarms of files and domains found fine clear.
pub fn check_certificates(alarms: &Alarms, cfg: &Config, now: i64) {
    use super::certs::{self, Finding};
    let findings = certs::inspect(cfg, now);
    let has = |f: &dyn Fn(&Finding) -> bool| findings.iter().any(f);
    for (path, leaf) in certs::leaves(cfg) {
        let subject = path.display().to_string();
        // The node refuses to start on an unreadable file, so this is a file changed under a
        // running node: the expiry check cannot say more.
        if let Err(e) = leaf {
            tracing::warn!(file = %subject, error = %e, "cannot read a certificate for the expiry check");
            continue;
        }
        let expired = has(&|f| matches!(f, Finding::Expired { path: p } if p == path));
        if expired {
            alarms.raise(
                AlarmName::CertificateExpired,
                &subject,
                "the certificate has expired",
            );
        } else {
            alarms.clear(AlarmName::CertificateExpired, &subject);
        }
        let expiring = findings.iter().find_map(|f| match f {
            Finding::Expiring { path: p, days } if p == path => Some(*days),
            _ => None,
        });
        match expiring {
            Some(days) => alarms.raise(
                AlarmName::CertificateExpiring,
                &subject,
                &format!("expires in {days} days"),
            ),
            None => alarms.clear(AlarmName::CertificateExpiring, &subject),
        }
    }
    let leaves = certs::leaves(cfg);
    for d in &cfg.local_domains {
        let Some(path) = certs::served_for(cfg, d) else {
            continue;
        };
        if !matches!(leaves.get(path), Some(Ok(_))) {
            continue;
        }
        let subject = d.name.to_string();
        let uncovered =
            has(&|f| matches!(f, Finding::NotCovering { domain, .. } if *domain == d.name));
        if uncovered {
            alarms.raise(
                AlarmName::CertificateNotCoveringLocalDomain,
                &subject,
                &format!("{} names none of: {}", path.display(), d.name),
            );
        } else {
            alarms.clear(AlarmName::CertificateNotCoveringLocalDomain, &subject);
        }
    }
}

/// Creates `legate_alarms_active` with every name/severity series at zero (see
/// `metrics::register_all`).
pub fn register_metrics() {
    for n in AlarmName::ALL {
        ACTIVE.with_label_values(&[n.as_str(), n.severity().as_str()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_raise_updates_last_seen_and_detail_not_the_count() {
        let mut t = AlarmTable::default();
        assert!(t.raise(AlarmName::HomeNodeLinkDown, "hn/a", "down", 100));
        assert!(!t.raise(AlarmName::HomeNodeLinkDown, "hn/a", "still down", 160));
        let l = t.list();
        assert_eq!(l.len(), 1);
        let a = &l[0];
        assert_eq!((a.first_seen, a.last_seen, a.count), (100, 160, 1));
        assert!(a.raised);
        assert_eq!(a.detail, "still down");
        assert_eq!(a.severity, Severity::Critical);
        assert!(!a.action.is_empty());
    }

    #[test]
    fn clear_then_raise_again_keeps_history() {
        let mut t = AlarmTable::default();
        t.raise(AlarmName::PartnerUnreachable, "p.com", "x", 10);
        assert!(t.clear(AlarmName::PartnerUnreachable, "p.com"));
        assert!(
            !t.clear(AlarmName::PartnerUnreachable, "p.com"),
            "already clear"
        );
        assert!(
            !t.clear(AlarmName::PartnerUnreachable, "other.com"),
            "never raised"
        );
        assert!(!t.list()[0].raised);
        assert!(t.active_counts().is_empty());
        assert!(t.raise(AlarmName::PartnerUnreachable, "p.com", "y", 20));
        let a = &t.list()[0];
        assert!(a.raised);
        assert_eq!((a.first_seen, a.last_seen, a.count), (10, 20, 2));
        assert_eq!(t.active_counts()[&AlarmName::PartnerUnreachable], 1);
    }

    #[test]
    fn the_table_is_bounded_evicting_the_oldest_cleared_first() {
        let mut t = AlarmTable::default();
        t.raise(AlarmName::PartnerUnreachable, "old-raised", "", 0);
        t.raise(AlarmName::PartnerUnreachable, "old-cleared", "", 1);
        t.clear(AlarmName::PartnerUnreachable, "old-cleared");
        for i in 0..MAX_ENTRIES {
            t.raise(AlarmName::PartnerUnreachable, &format!("d{i}"), "", 10);
        }
        let l = t.list();
        assert_eq!(l.len(), MAX_ENTRIES);
        assert!(l.iter().all(|a| a.subject != "old-cleared"));
        assert!(
            l.iter().all(|a| a.subject != "old-raised"),
            "then the oldest raised"
        );
    }

    #[test]
    fn list_is_raised_first_then_by_severity() {
        let mut t = AlarmTable::default();
        t.raise(AlarmName::CertificateExpiring, "c.pem", "", 1);
        t.raise(AlarmName::MappingReloadRefused, "maps", "", 5);
        t.raise(AlarmName::PartnerTlsFailure, "p.com", "", 2);
        t.raise(AlarmName::HomeNodeLinkDown, "hn/a", "", 3);
        t.raise(AlarmName::HomeNodeLinkDown, "hn/b", "", 4);
        t.clear(AlarmName::HomeNodeLinkDown, "hn/b");
        let order: Vec<(AlarmName, String)> =
            t.list().into_iter().map(|a| (a.name, a.subject)).collect();
        assert_eq!(
            order,
            vec![
                (AlarmName::HomeNodeLinkDown, "hn/a".to_string()),
                (AlarmName::PartnerTlsFailure, "p.com".to_string()),
                // Same severity: the most recent first.
                (AlarmName::MappingReloadRefused, "maps".to_string()),
                (AlarmName::CertificateExpiring, "c.pem".to_string()),
                (AlarmName::HomeNodeLinkDown, "hn/b".to_string()),
            ]
        );
    }

    #[test]
    fn partner_failures_raise_on_the_third_in_a_row_and_clear_on_success() {
        let alarms = Alarms::default();
        for _ in 0..2 {
            alarms.partner_failed("p.com", false, "refused");
        }
        assert!(alarms.list().is_empty());
        alarms.partner_failed("p.com", false, "refused");
        alarms.partner_failed("q.com", true, "bad certificate");
        let l = alarms.list();
        assert_eq!(
            (l[0].name, l[0].raised),
            (AlarmName::PartnerUnreachable, true)
        );
        assert_eq!(l.len(), 1, "q.com failed once only");
        alarms.partner_connected("p.com");
        assert!(!alarms.list()[0].raised);
        for _ in 0..2 {
            alarms.partner_failed("p.com", true, "bad certificate");
        }
        assert!(
            !alarms.list()[0].raised,
            "the streak restarted at the success"
        );
        alarms.partner_failed("p.com", true, "bad certificate");
        assert_eq!(alarms.list()[0].name, AlarmName::PartnerTlsFailure);
        for _ in 0..3 {
            alarms.partner_failed_text("r.com", "r.com: TLS failed: unknown_ca");
            alarms.partner_failed_text("u.com", "127.0.0.1:5269: connection refused");
        }
        let names: Vec<(AlarmName, String)> = alarms
            .list()
            .into_iter()
            .filter(|a| a.subject != "p.com")
            .map(|a| (a.name, a.subject))
            .collect();
        assert_eq!(
            names,
            vec![
                (AlarmName::PartnerTlsFailure, "r.com".to_string()),
                (AlarmName::PartnerUnreachable, "u.com".to_string()),
            ]
        );
    }
}
