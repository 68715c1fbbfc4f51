//! The running XEP-0114 links from this gateway node to the enterprise's home nodes.
//!
//! For every home node and every foreign domain Legate serves, one component connection
//! (`jabber:component:accept`, component name = the foreign domain): the home node lists
//! `Component "partner.com"` for each, with the home node's `component_secret`. A local user's
//! stanza to `bob@partner.com` arrives on the `partner.com` connection of that user's home node
//! and is submitted to the hub as `Origin::Component`; what the hub delivers for the home node
//! is written on the connection named after the envelope's *sender* domain (a component may
//! only send from its own domain, and Prosody closes the stream of one that does not).
//!
//! Shape: per (home node, domain), one task owns the hub outbox of that component, the socket,
//! the framer, the handshake machine (`xmpp::component`), the wait queue and the backoff, and
//! `select!`s over reads, deliveries, timers and shutdown. Failover tries the home node's
//! addresses (or `_xmpp-component._tcp` SRV targets) in order, then backs off. The backoff
//! (jittered, reset after `stable_after`) and the bounded writes are the edge kit's
//! (`net::Backoff`, `net::write_bounded`), shared with the SIP and s2s edges.
//!
//! Served domains: every `[[sip.federated_domain]]` plus every `[[xmpp.federation.domain]]`
//! entry without `deny = true`, opened at start. In open federation (`deny_list`), a domain the
//! policy allows without listing it gets its components on every home node when its first
//! stanza is delivered (the hub asks through [`ComponentOpener`](crate::gateway::hub::ComponentOpener)),
//! up to `limits.open_federation_domains`; from then on local users reach it too. The home
//! node must accept a component of that name (ejabberd with a listener-wide password does;
//! Prosody needs each `Component` declared). A configuration reload does not add or remove
//! components.
//!
//! This module decides nothing about routing or policy (the hub does). Flow control: a link
//! takes a delivery from its outbox only when it can write it (up) or hold it (its wait queue
//! has room), so a slow or absent home node leaves the outbox full and the readers feeding it
//! wait (`Hub::submit_wait`); what waited `limits.delivery_timeout_secs` for a link that stays
//! down is bounced with `remote-server-timeout`. What the home node sends is submitted with
//! `submit_wait` too, so a slow s2s or SIP destination slows the home node's stream.

pub mod placement;
pub mod queue;
mod session;

use crate::config::{Config, Domain, HomeEndpoint, Host, Secret};
use crate::dns::Resolver;
use crate::gateway::envelope::{Envelope, ErrorCondition};
use crate::gateway::{Hub, Origin};
use crate::metrics;
use crate::xmpp::component::ComponentFailure;
use crate::xmpp::error::StreamErrorCondition;
use crate::xmpp::stream::{Limits as StreamLimits, StreamError};
use dashmap::DashMap;
use prometheus::{IntCounterVec, IntGauge};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

/// Metric names (constants so tests scrape them without typos).
pub const METRIC_LINKS_UP: &str = "legate_component_links_up";
pub const METRIC_CONNECTS: &str = "legate_component_connects_total";
pub const METRIC_DISCONNECTS: &str = "legate_component_disconnects_total";
pub const METRIC_STANZAS: &str = "legate_component_stanzas_total";
pub const METRIC_QUEUE_DEPTH: &str = "legate_component_queue_depth";
pub const METRIC_BOUNCED: &str = "legate_component_bounced_total";

static LINKS_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    metrics::gauge(
        METRIC_LINKS_UP,
        "Component connections to home nodes that completed the XEP-0114 handshake",
    )
});
static CONNECTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        METRIC_CONNECTS,
        "Component connection attempts by outcome (connected or the failure reason)",
        &["outcome"],
    )
});
static DISCONNECTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        METRIC_DISCONNECTS,
        "Established component connections that ended, by reason",
        &["reason"],
    )
});
static STANZAS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        METRIC_STANZAS,
        "Stanzas on component links by direction (in = from the home node, out = to it, \
         handed = to the cluster node holding the link) and kind",
        &["direction", "kind"],
    )
});
static QUEUE_DEPTH: LazyLock<IntGauge> = LazyLock::new(|| {
    metrics::gauge(
        METRIC_QUEUE_DEPTH,
        "Deliveries waiting for a component connection to come up (all links)",
    )
});
static BOUNCED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        METRIC_BOUNCED,
        "Deliveries to home nodes bounced as service-unavailable, by reason",
        &["reason"],
    )
});

/// Timing and size bounds of the links. `from_config` takes what the configuration names; the
/// rest are fixed defaults documented here (tests shorten them).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSettings {
    /// TCP connect plus XEP-0114 handshake, per target (`limits.handshake_timeout_secs`).
    pub handshake_timeout: Duration,
    /// A single write that does not complete in this time means a dead peer.
    pub write_timeout: Duration,
    /// Whitespace keepalive interval (RFC 6120 §4.6.1), 60 s: under common NAT/firewall idle
    /// timeouts, and lets a dead TCP peer surface as a write error.
    pub keepalive: Duration,
    /// First and largest reconnect delay (1 s → 60 s, jittered).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A connection that stayed up this long resets the backoff, so a home node that accepts
    /// and then drops the stream at once is not hammered every second.
    pub stable_after: Duration,
    /// Deliveries held per (home node, domain) while its connection is down, and the size of
    /// its hub outbox (`limits.outbound_queue_per_domain`).
    pub queue_capacity: usize,
    /// How long a delivery may wait for the connection before it is bounced with
    /// `remote-server-timeout` (`limits.delivery_timeout_secs`): the sender's client shows an
    /// error instead of a message lost in silence.
    pub queue_timeout: Duration,
    /// Framer bounds (`limits.xmpp_max_stanza_bytes`).
    pub stream_limits: StreamLimits,
}

impl LinkSettings {
    pub fn from_config(cfg: &Config) -> Self {
        let handshake = Duration::from_secs(cfg.limits.handshake_timeout_secs);
        LinkSettings {
            handshake_timeout: handshake,
            write_timeout: handshake,
            keepalive: Duration::from_secs(60),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            queue_capacity: cfg.limits.outbound_queue_per_domain,
            queue_timeout: Duration::from_secs(cfg.limits.delivery_timeout_secs),
            stream_limits: StreamLimits {
                max_stanza_bytes: cfg.limits.xmpp_max_stanza_bytes,
                ..StreamLimits::default()
            },
        }
    }
}

/// The foreign domains Legate serves, each one component on every home node: SIP federated
/// domains, then XMPP federation entries that are not denied, in configuration order, without
/// duplicates.
pub fn served_domains(cfg: &Config) -> Vec<Domain> {
    let mut out: Vec<Domain> = Vec::new();
    let sip = cfg.sip.federated_domains.iter().map(|d| &d.name);
    let xmpp = cfg
        .xmpp
        .federation
        .domains
        .iter()
        .filter(|d| !d.deny)
        .map(|d| &d.name);
    for d in sip.chain(xmpp) {
        if !out.contains(d) {
            out.push(d.clone());
        }
    }
    out
}

/// Why a connection attempt failed or an established connection ended. Each has a bounded
/// metric label.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot resolve the home node: {0}")]
    Resolve(#[from] crate::dns::DnsError),
    #[error("the home node's address list needs DNS but no resolver is available")]
    NoResolver,
    #[error("the home node resolved to no address")]
    NoTargets,
    #[error("cannot read component_secret_file {path}: {source}")]
    Secret {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("component_secret_file {0} is empty")]
    EmptySecret(std::path::PathBuf),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("handshake failed: {0}")]
    Handshake(ComponentFailure),
    /// The same failures once the link was up: the home node closed or broke an established
    /// stream (e.g. Prosody's `not-well-formed` after a stanza it could not parse), which an
    /// admin must not read as a handshake problem.
    #[error("established stream ended: {0}")]
    Ended(ComponentFailure),
    #[error("stream from the home node is invalid: {0}")]
    Framing(StreamError),
    #[error("home node sent a stanza that breaks RFC 6120: {0}")]
    BadStanza(StreamErrorCondition),
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("a write to the home node did not complete in time")]
    WriteTimeout,
}

impl LinkError {
    pub fn label(&self) -> &'static str {
        match self {
            LinkError::Resolve(_) | LinkError::NoResolver | LinkError::NoTargets => "resolve",
            LinkError::Secret { .. } | LinkError::EmptySecret(_) => "secret_unreadable",
            LinkError::Connect { .. } => "connect",
            LinkError::Handshake(f) | LinkError::Ended(f) => match f {
                ComponentFailure::StreamError { condition, .. } => match condition {
                    Some(StreamErrorCondition::NotAuthorized) => "not_authorized",
                    Some(StreamErrorCondition::Conflict) => "conflict",
                    Some(StreamErrorCondition::HostUnknown) => "host_unknown",
                    _ => "stream_error",
                },
                ComponentFailure::Framing(_) => "framing",
                ComponentFailure::Protocol(_) => "protocol",
                ComponentFailure::Closed => "closed",
                ComponentFailure::Timeout => "timeout",
            },
            LinkError::Framing(_) => "framing",
            LinkError::BadStanza(_) => "protocol",
            LinkError::Io(_) => "io",
            LinkError::WriteTimeout => "write_timeout",
        }
    }

    /// What an admin should do, when we know.
    pub fn hint(&self, home_node: &str) -> Option<String> {
        match self.label() {
            "not_authorized" => Some(format!(
                "check component_secret for home node {home_node}: it must equal the home node's \
                 component_secret for this component"
            )),
            "conflict" => Some(
                "the home node already has a connection for this component (another gateway \
                 node, or a stale session it has not noticed yet)"
                    .into(),
            ),
            "secret_unreadable" => Some(format!(
                "fix component_secret_file for home node {home_node} (it is read again at every \
                 attempt)"
            )),
            "host_unknown" => Some(format!(
                "declare this domain as a component on home node {home_node} (Prosody: \
                 Component \"<domain>\" with component_secret)"
            )),
            _ => None,
        }
    }
}

impl LinkError {
    /// How an error that ended an established link is reported: a failure of the handshake
    /// machine there is the end of the stream, not a failed handshake.
    pub(crate) fn after_up(self) -> Self {
        match self {
            LinkError::Handshake(f) => LinkError::Ended(f),
            other => other,
        }
    }
}

/// Reads a component secret: inline, or the file's content without its trailing line end.
/// Read at every connection attempt, so a corrected file is picked up without a restart.
pub fn read_secret(secret: &Secret) -> Result<String, LinkError> {
    match secret {
        Secret::Inline(s) => Ok(s.clone()),
        Secret::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| LinkError::Secret {
                path: path.clone(),
                source,
            })?;
            let s = text.trim_end_matches(['\r', '\n']);
            if s.is_empty() {
                return Err(LinkError::EmptySecret(path.clone()));
            }
            Ok(s.to_string())
        }
    }
}

/// What an admin (and a test) can read about one component connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentStatus {
    pub up: bool,
    /// Where the current (or last) connection went.
    pub peer: Option<SocketAddr>,
    pub connects: u64,
    pub failures: u64,
    /// Label and text of the last failure.
    pub last_failure: Option<(&'static str, String)>,
    /// When the last failure happened (its age is shown by `/status`).
    pub last_failure_at: Option<std::time::Instant>,
    /// Deliveries waiting in this link's queue.
    pub queued: usize,
    /// In a cluster, the node holding this link when it is not this one (empty: not settled
    /// yet); `None` when this node holds it.
    pub held_by: Option<String>,
}

/// Shared status of every component connection, keyed by (home node, domain).
#[derive(Debug, Clone, Default)]
pub struct LinkStatus(Arc<DashMap<(String, Domain), ComponentStatus>>);

impl LinkStatus {
    pub fn get(&self, home_node: &str, domain: &Domain) -> Option<ComponentStatus> {
        self.0
            .get(&(home_node.to_string(), domain.clone()))
            .map(|s| s.value().clone())
    }

    /// Every link, sorted by home node then domain.
    pub fn snapshot(&self) -> Vec<(String, Domain, ComponentStatus)> {
        let mut v: Vec<_> = self
            .0
            .iter()
            .map(|e| (e.key().0.clone(), e.key().1.clone(), e.value().clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    fn update(&self, home_node: &str, domain: &Domain, f: impl FnOnce(&mut ComponentStatus)) {
        let mut e = self
            .0
            .entry((home_node.to_string(), domain.clone()))
            .or_default();
        f(e.value_mut());
    }
}

/// Why a delivery to a home node was bounced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BounceReason {
    /// The link stayed down past `limits.delivery_timeout_secs`.
    QueueTimeout,
    /// The connection task is gone (shutdown).
    Closed,
    /// The envelope cannot be written as a stanza (mapping reloaded under it).
    Encode,
}

impl BounceReason {
    fn label(self) -> &'static str {
        match self {
            BounceReason::QueueTimeout => "queue_timeout",
            BounceReason::Closed => "closed",
            BounceReason::Encode => "encode",
        }
    }

    fn text(self) -> &'static str {
        match self {
            BounceReason::QueueTimeout => "the link to the recipient's server is down",
            BounceReason::Closed => "the gateway is shutting down",
            BounceReason::Encode => "the gateway could not convert this stanza",
        }
    }

    /// RFC 6120 §8.3.3: a link that did not come up in time is a timeout; the rest is
    /// unavailability.
    fn condition(self) -> ErrorCondition {
        match self {
            BounceReason::QueueTimeout => ErrorCondition::RemoteServerTimeout,
            BounceReason::Closed | BounceReason::Encode => ErrorCondition::ServiceUnavailable,
        }
    }
}

/// Sends the reason's error back to the sender of `env` (a foreign user) through the hub.
/// Submitted as if from the component link: the error's sender is the local recipient, which
/// is what that link speaks for, and the router finds the foreign sender's link (SIP or s2s).
pub(crate) fn bounce(hub: &Hub, home_node: &Arc<str>, env: &Envelope, reason: BounceReason) {
    BOUNCED.with_label_values(&[reason.label()]).inc();
    tracing::warn!(
        home_node = %home_node,
        from = %env.from,
        to = %env.to,
        kind = env.kind_label(),
        reason = reason.label(),
        "delivery to home node bounced"
    );
    if let Some(b) = env.bounce(reason.condition(), reason.text()) {
        hub.submit(
            &Origin::Component {
                home_node: home_node.clone(),
            },
            b,
        );
    }
}

/// The running links of one node.
#[derive(Debug, Clone)]
pub struct ComponentLinks {
    pub status: LinkStatus,
}

/// Whether any home node needs DNS (an SRV endpoint or a host name in its address list).
pub fn needs_resolver(cfg: &Config) -> bool {
    cfg.home_nodes.iter().any(|h| match &h.endpoint {
        HomeEndpoint::Srv(_) => true,
        HomeEndpoint::Addresses(a) => a.iter().any(|hp| matches!(hp.host, Host::Name(_))),
    })
}

/// Everything a component task needs, kept so open federation can start more later.
struct Spawner {
    hub: Arc<Hub>,
    resolver: Option<Resolver>,
    settings: LinkSettings,
    status: LinkStatus,
    shutdown: watch::Receiver<bool>,
    placement: Option<Arc<dyn placement::Placement>>,
}

impl Spawner {
    /// Registers the outbox of `domain`'s component on every home node and returns the tasks
    /// to run, one per home node.
    fn links(
        &self,
        domain: &Domain,
    ) -> Vec<impl std::future::Future<Output = ()> + Send + 'static> {
        self.links_named(domain, domain)
    }

    /// [`Self::links`] for a component named `name` at the home nodes that carries the traffic
    /// of sender domain `domain`.
    fn links_named(
        &self,
        domain: &Domain,
        component: &Domain,
    ) -> Vec<impl std::future::Future<Output = ()> + Send + 'static> {
        let cfg = self.hub.config();
        let mut out = Vec::new();
        for node in &cfg.home_nodes {
            let name: Arc<str> = Arc::from(node.name.as_str());
            let rx = self.hub.register_component_domain(
                &node.name,
                domain,
                self.settings.queue_capacity,
            );
            self.status.update(&node.name, domain, |_| {});
            let link = session::Component {
                hub: self.hub.clone(),
                home_node: name.clone(),
                node: node.clone(),
                domain: domain.clone(),
                name: component.clone(),
                settings: self.settings.clone(),
                resolver: self.resolver.clone(),
                status: self.status.clone(),
                // A home node that takes a connection from every gateway node needs no
                // holder: each node writes its own traffic on its own connection.
                placement: self
                    .placement
                    .clone()
                    .filter(|_| !node.connect_from_every_node),
            };
            let span = tracing::info_span!("component", home_node = %name, domain = %domain);
            out.push(link.run(rx, self.shutdown.clone()).instrument(span));
        }
        out
    }
}

/// Starts every component link of the hub's configuration: registers the outbox of each
/// (home node, served domain) with the hub and spawns its task into `tasks`. All of them stop
/// when `shutdown` turns true (closing their streams). Deliveries for a domain that has no
/// component find no outbox and are answered by the hub at once — except in open federation,
/// where the hub opens the domain's components through the opener installed here.
pub fn spawn(
    hub: Arc<Hub>,
    resolver: Option<Resolver>,
    settings: LinkSettings,
    shutdown: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) -> ComponentLinks {
    spawn_with(hub, resolver, settings, shutdown, tasks, None, None)
}

/// Called with each domain open federation opens (the node writes it to its state store).
pub type OnOpen = Box<dyn Fn(&Domain) + Send + Sync>;

/// [`spawn`], telling `on_open` of every domain opened on demand; in a cluster, each link
/// follows `placement` to know whether this node holds it.
pub fn spawn_with(
    hub: Arc<Hub>,
    resolver: Option<Resolver>,
    settings: LinkSettings,
    shutdown: watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
    on_open: Option<OnOpen>,
    placement: Option<Arc<dyn placement::Placement>>,
) -> ComponentLinks {
    let cfg = hub.config();
    let domains = served_domains(&cfg);
    let status = LinkStatus::default();
    let open = cfg.xmpp.federation.mode == crate::config::FederationMode::DenyList;
    if domains.is_empty() && !cfg.home_nodes.is_empty() && !open {
        tracing::warn!(
            "no foreign domain is configured: no component link to the home nodes is opened"
        );
    }
    let spawner = Spawner {
        hub: hub.clone(),
        resolver,
        settings,
        status: status.clone(),
        shutdown,
        placement,
    };
    for domain in &domains {
        for task in spawner.links(domain) {
            tasks.spawn(task);
        }
    }
    // The local side of the intercluster mesh: users of a local domain who live in a peer
    // cluster write to ours through the domain's mesh component (only with peers to route to).
    if !cfg.intercluster.peers.is_empty() {
        for d in &cfg.local_domains {
            if let Some(name) = &d.mesh_component {
                for task in spawner.links_named(&d.name, name) {
                    tasks.spawn(task);
                }
            }
        }
    }
    if open {
        let opened = std::sync::Mutex::new(std::collections::HashSet::<Domain>::new());
        let max = cfg.limits.open_federation_domains;
        hub.set_component_opener(Arc::new(move |domain: &Domain| {
            let Ok(mut set) = opened.lock() else {
                return false;
            };
            if set.contains(domain) {
                // Opened already: its outboxes exist unless a task ended at shutdown.
                return true;
            }
            if set.len() >= max {
                OPENED.with_label_values(&["refused"]).inc();
                tracing::warn!(
                    %domain,
                    max,
                    "open federation: limits.open_federation_domains reached; not opening \
                     components for another domain"
                );
                return false;
            }
            set.insert(domain.clone());
            if let Some(f) = &on_open {
                f(domain);
            }
            OPENED.with_label_values(&["opened"]).inc();
            tracing::info!(%domain, "open federation: opening component links for a new domain");
            for task in spawner.links(domain) {
                tokio::spawn(task);
            }
            true
        }));
    }
    ComponentLinks { status }
}

/// Open-federation domains by outcome (`opened`, `refused` at the bound).
static OPENED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        "legate_component_domains_opened_total",
        "Foreign domains whose component links were opened on demand in open federation, by \
         outcome (opened, or refused because limits.open_federation_domains was reached)",
        &["outcome"],
    )
});

/// Creates the component links' metric families at start (`crate::metrics::register_all`).
pub fn register_metrics() {
    for c in [&CONNECTS, &DISCONNECTS, &STANZAS, &BOUNCED, &OPENED] {
        LazyLock::force(c);
    }
    LazyLock::force(&LINKS_UP);
    LazyLock::force(&QUEUE_DEPTH);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn served_domains_are_sip_plus_allowed_xmpp_entries() {
        let cfg = crate::config::from_toml(
            r#"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
[xmpp.federation]
mode = "deny_list"
[[xmpp.federation.domain]]
name = "jabber.test"
[[xmpp.federation.domain]]
name = "evil.test"
deny = true
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "0123456789abcdef"
"#,
            Path::new("t.toml"),
            crate::config::BUILTIN_SYSTEMS,
        )
        .unwrap_or_else(|d| panic!("{d}"));
        let names: Vec<String> = served_domains(&cfg).iter().map(|d| d.to_string()).collect();
        assert_eq!(names, ["partner.com", "jabber.test"]);
        assert!(!needs_resolver(&cfg));
        let s = LinkSettings::from_config(&cfg);
        assert_eq!(s.handshake_timeout, Duration::from_secs(10));
        assert_eq!(s.queue_capacity, 1000);
    }

    #[test]
    fn secrets_from_files_lose_their_line_end() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("s");
        std::fs::write(&p, "s3cret-with-space \r\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            read_secret(&Secret::File(p.clone())).ok().as_deref(),
            Some("s3cret-with-space ")
        );
        std::fs::write(&p, "\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            read_secret(&Secret::File(p)),
            Err(LinkError::EmptySecret(_))
        ));
        let missing = read_secret(&Secret::File(dir.path().join("nope")));
        assert_eq!(
            missing.map_err(|e| e.label()).err(),
            Some("secret_unreadable")
        );
    }

    #[test]
    fn wrong_secret_has_a_hint() {
        let e = LinkError::Handshake(ComponentFailure::StreamError {
            condition: Some(StreamErrorCondition::NotAuthorized),
            text: None,
        });
        assert_eq!(e.label(), "not_authorized");
        assert!(e
            .hint("hn1")
            .is_some_and(|h| h.contains("check component_secret for home node hn1")));
    }
}

#[cfg(test)]
mod link_tests;
