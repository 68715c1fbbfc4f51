//! Node configuration (TOML): schema, defaults and validation with `file:line:col` errors.
//!
//! This module owns the one typed `Config` every other layer reads, and the only path from an
//! admin-edited file to it: `from_toml` (pure: text in, `Config` or *every* problem out) and
//! `load_file` (reads the file, then `from_toml`). A `Config` that exists has passed every check
//! — domains are normalised, addresses parsed, cross-references resolved, limits in range — so
//! nothing downstream re-validates, and nothing binds a port before it exists (style practice 6).
//! It must not do I/O beyond reading the file it is given: certificate and secret files are
//! opened by the layers that use them, when they use them.
//!
//! Layout: `schema` is the file as written (spans kept), `validate` turns it into `Config` and
//! collects diagnostics, `types` holds the newtypes and enums.

mod schema;
mod types;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::diag::{Diagnostic, Diagnostics};

pub use types::{
    Domain, FederationMode, Host, HostPort, LocalUser, NodeId, PeerTlsVerify, PresenceFormat,
    S2sAuth, Secret, StoreKind, SystemKind, TlsPolicy, TlsVersion, BUILTIN_SYSTEMS,
};
pub use validate::LIMIT_RANGES;

/// Most peers one cluster may have (requirements §6, seed 001).
pub const MAX_CLUSTER_PEERS: usize = 6;
/// Most *other* clusters one cluster may peer with: 30 clusters in the mesh, including us
/// (requirements §5).
pub const MAX_INTERCLUSTER_PEERS: usize = 29;

/// The configuration `legate run` uses without `--config`: one node, local domain
/// `example.com`, every listener on loopback, no federation, in-memory state. It is TOML (not a
/// Rust literal) so it goes through exactly the same checks as an admin's file.
pub const DEFAULT_TOML: &str = r#"# Embedded default: single node, loopback only, no federation.
[node]
id = "local"
data_dir = "legate-data"
admin_listen = "127.0.0.1:9090"

[[local_domain]]
name = "example.com"

[listeners]
sip_tls = "127.0.0.1:5061"
sip_tcp = "off"
xmpp_s2s = "127.0.0.1:5269"
xmpp_s2s_direct_tls = "off"
"#;

/// The whole validated configuration of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    /// Never empty; names are unique.
    pub local_domains: Vec<LocalDomain>,
    pub listeners: Listeners,
    pub tls: TlsConfig,
    pub sip: SipConfig,
    pub xmpp: XmppConfig,
    /// Names are unique.
    pub home_nodes: Vec<HomeNode>,
    /// Name of the home node that receives traffic for users not in the directory; always the
    /// name of an entry of `home_nodes`.
    pub routing_node: Option<String>,
    pub chat_nodes: Vec<ChatNode>,
    pub limits: Limits,
    pub cluster: ClusterConfig,
    pub intercluster: InterclusterConfig,
    pub mappings: MappingsConfig,
    pub dns: DnsConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Where the node keeps its state file (subscriptions survive a restart). Relative paths in
    /// a file are resolved against the file's directory.
    pub data_dir: PathBuf,
    /// Prometheus `/metrics` and `/status`; loopback by default.
    pub admin_listen: SocketAddr,
    /// `admin_listen` may be a non-loopback address only when this is set (and then
    /// `admin_token_file` is required): exposing it must be a decision, not an accident.
    pub admin_allow_remote: bool,
    /// A file holding the bearer token every admin request but `/healthz` must carry
    /// (`Authorization: Bearer <token>`). Read when the node starts (a missing or empty file
    /// stops it) and again whenever the file changes, so a token is rotated without a restart.
    pub admin_token_file: Option<PathBuf>,
    /// The host this node writes in its SIP Via and Contact (its own FQDN in a cluster, so
    /// a partner's in-dialog requests come back to the node that owns the dialog); `None`:
    /// the first local domain.
    pub sip_host: Option<Host>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDomain {
    pub name: Domain,
    /// Per-domain certificate (SNI); both or neither of `cert`/`key`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The component (on every home node) through which users of this domain who live in a
    /// peer cluster are reached (issue 13, the local side of the mesh): the home node hands
    /// it what its users send to users it does not host, and takes from it what those users
    /// send to its own (`contrib/prosody/mod_legate_mesh.lua`).
    pub mesh_component: Option<Domain>,
}

/// Listening sockets; `None` means the listener is off. Two enabled listeners never share a
/// port on overlapping addresses (checked), except port 0 (ephemeral, for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listeners {
    pub sip_tls: Option<SocketAddr>,
    pub sip_tcp: Option<SocketAddr>,
    pub xmpp_s2s: Option<SocketAddr>,
    pub xmpp_s2s_direct_tls: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub trust_bundle: Option<PathBuf>,
    /// Node certificate, used where no per-domain one applies; both or neither of `cert`/`key`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SipConfig {
    pub federated_domains: Vec<SipFederatedDomain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipFederatedDomain {
    pub name: Domain,
    /// A mapping system of kind `SystemKind::SipFederation`.
    pub system: String,
    /// Static next hop; `None` means DNS (`_sipfederationtls._tcp`, then RFC 3263).
    pub route: Option<HostPort>,
    /// Accept the peer's client certificate without the clientAuth EKU (old OCS/Lync edges).
    pub tolerate_no_client_auth_eku: bool,
    pub presence_format: PresenceFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppConfig {
    pub federation: XmppFederation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppFederation {
    pub mode: FederationMode,
    pub domains: Vec<XmppFederatedDomain>,
    /// `None`: the node generates a random secret at start (fine for a single node; a cluster
    /// needs the same secret on every node for dialback to verify across nodes).
    pub dialback_secret: Option<Secret>,
    /// Dialback verify connections may go to private, loopback, link-local, unspecified or
    /// multicast addresses from DNS (default false: a foreign DNS zone must not make us
    /// connect inside our own network).
    pub dialback_allow_private_targets: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppFederatedDomain {
    pub name: Domain,
    /// A mapping system of kind `SystemKind::XmppFederation`.
    pub system: String,
    pub tls: TlsPolicy,
    pub auth: S2sAuth,
    /// Refused over XMPP (the list entry of deny-list mode).
    pub deny: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeNode {
    pub name: String,
    pub endpoint: HomeEndpoint,
    pub component_secret: Secret,
    /// Users statically known to live here (the directory also learns from traffic).
    pub users: Vec<LocalUser>,
    /// A mapping system of kind `SystemKind::Local`.
    pub default_system: String,
    /// In a cluster, every node opens its own component connections to this home node
    /// (ejabberd accepts several per component) instead of one node holding each (Prosody).
    pub connect_from_every_node: bool,
}

/// How to reach a home node's XEP-0114 component port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomeEndpoint {
    /// Tried in order; the next one on failure.
    Addresses(Vec<HostPort>),
    /// `_xmpp-component._tcp.<name>` SRV lookup (the node's `name` is then a domain).
    Srv(Domain),
}

/// A published chat-room alias (`conference.example.com`) and the home node hosting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatNode {
    pub alias: Domain,
    pub home_node: String,
}

/// Every bound of style practice 4; see `LIMIT_RANGES` for defaults and allowed ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub sip_max_message_bytes: usize,
    pub sip_max_header_bytes: usize,
    pub xmpp_max_stanza_bytes: usize,
    pub max_connections_per_listener: usize,
    pub max_connections_per_peer: usize,
    pub handshake_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub im_session_idle_secs: u64,
    pub max_subscriptions_per_user: usize,
    pub outbound_queue_per_domain: usize,
    pub delivery_timeout_secs: u64,
    /// A stanza (or stream header) must be complete this long after its first byte
    /// (issue 10 item 2; RFC 6120 §4.9.3.4 `connection-timeout` otherwise).
    pub stanza_timeout_secs: u64,
    /// Dialback verifications (XEP-0220 §2.1.2) in flight for one foreign domain, node-wide.
    pub dialback_pending_per_domain: usize,
    /// Verify-only connections to authoritative servers open at once, node-wide.
    pub dialback_verify_connections: usize,
    /// A SIP message must be complete this long after its first byte (seconds).
    pub sip_message_timeout_secs: u64,
    /// The first authenticated request on an inbound SIP connection must arrive this long
    /// after the connection was accepted (seconds).
    pub first_request_timeout_secs: u64,
    /// Foreign XMPP domains whose components open on demand in open federation (`deny_list`):
    /// a domain not listed in `[xmpp.federation]` gets its component links when it first sends.
    pub open_federation_domains: usize,
    /// A component link to a home node down this long raises `HomeNodeLinkDown`.
    pub home_link_alarm_grace_secs: u64,
    /// On SIGTERM the node drains (no new SIP sessions or subscriptions, no new s2s streams)
    /// this long at most before it closes what is left (seconds).
    pub drain_grace_secs: u64,
    /// Live SIP server transactions of one foreign domain (the node-wide table is 16384).
    pub sip_transactions_per_domain: usize,
    /// Foreign watchers (notifier subscriptions) of one foreign domain.
    pub foreign_watchers_per_domain: usize,
    /// IM sessions (INVITE dialogs) with one foreign domain.
    pub im_sessions_per_domain: usize,
    /// Cap of the per-domain backoff after failed outbound SIP dials (seconds).
    pub sip_dial_backoff_max_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// FQDN used in the cluster's SRV records; `None` raises a note (an alarm at run time).
    pub name: Option<Domain>,
    /// The configuration primary; always the `name` of an entry of `peers`.
    pub primary: Option<NodeId>,
    /// At most `MAX_CLUSTER_PEERS`, names and addresses unique.
    pub peers: Vec<ClusterPeer>,
    pub tls_verify: PeerTlsVerify,
    /// Consulted before DNS (requirements §6, peers in a DMZ).
    pub address_map: Vec<(Domain, IpAddr)>,
    pub store: Store,
    /// etcd lease of each node (seconds, 2–60, default 5): a dead node's leadership and
    /// membership end this long after its last keep-alive.
    pub lease_ttl_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPeer {
    pub name: NodeId,
    pub address: HostPort,
    /// Takes part in foreign federation (outbound spread, published in SRV).
    pub federation: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    Memory,
    /// Non-empty list of `http(s)://host:port` URLs.
    Etcd {
        endpoints: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterclusterConfig {
    /// This cluster's name as its peers list it (set whenever peers are listed).
    pub name: Option<String>,
    /// This node's intercluster address (set whenever peers are listed).
    pub listen: Option<SocketAddr>,
    pub transport: InterclusterTransport,
    /// 30–1444 minutes, default 30 (requirements §5).
    pub sync_interval_mins: u32,
    /// A sync that has not succeeded for this long raises the alarm (seed: 2 h).
    pub stuck_after_secs: u64,
    /// Restart a stuck sync agent automatically.
    pub auto_recovery: bool,
    pub peers: Vec<InterclusterPeer>,
}

/// How clusters talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterclusterTransport {
    /// Mutual TLS verified against `tls.trust_bundle` (the default).
    Tls,
    /// Plaintext: for labs only.
    Tcp,
}

impl InterclusterTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            InterclusterTransport::Tls => "tls",
            InterclusterTransport::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterclusterPeer {
    pub name: String,
    pub address: HostPort,
}

/// Which DNS servers resolve SRV/NAPTR/A records for federation and home-node links.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsConfig {
    /// `None`: the system's resolver configuration (/etc/resolv.conf).
    pub nameservers: Option<Vec<SocketAddr>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingsConfig {
    /// `None`: the embedded default tables.
    pub dir: Option<PathBuf>,
    pub reload: bool,
}

impl Config {
    /// Exact lookup (never by suffix) among our own domains.
    pub fn is_local_domain(&self, d: &Domain) -> bool {
        self.local_domains.iter().any(|l| &l.name == d)
    }

    /// The `[[chat_node]]` whose published alias is exactly `d`, if any.
    pub fn chat_node(&self, d: &Domain) -> Option<&ChatNode> {
        self.chat_nodes.iter().find(|c| &c.alias == d)
    }

    /// Whether our s2s edge serves `d`: a local domain (its users) or a chat-room alias (rooms
    /// hosted on a home node). Streams to any other name get `host-unknown`.
    pub fn serves_xmpp_domain(&self, d: &Domain) -> bool {
        self.is_local_domain(d) || self.chat_node(d).is_some()
    }

    /// The SIP federation entry for exactly `d`, if any.
    pub fn sip_federated(&self, d: &Domain) -> Option<&SipFederatedDomain> {
        self.sip.federated_domains.iter().find(|f| &f.name == d)
    }

    /// The XMPP federation entry for exactly `d`, if any (including `deny = true` entries).
    pub fn xmpp_domain(&self, d: &Domain) -> Option<&XmppFederatedDomain> {
        self.xmpp.federation.domains.iter().find(|f| &f.name == d)
    }

    /// What `[xmpp.federation]` means for `d`, in one place so the policy layer and the admin
    /// docs cannot drift: a local domain or a SIP federated domain is never reached over XMPP
    /// (requirements §1, also in open federation); otherwise `allow_list` needs an entry without
    /// `deny`, and `deny_list` refuses only entries with `deny = true`. Exact match only.
    pub fn xmpp_federation_allowed(&self, d: &Domain) -> bool {
        if self.is_local_domain(d) || self.sip_federated(d).is_some() {
            return false;
        }
        let entry = self.xmpp_domain(d);
        match self.xmpp.federation.mode {
            FederationMode::AllowList => entry.is_some_and(|e| !e.deny),
            FederationMode::DenyList => !entry.is_some_and(|e| e.deny),
        }
    }

    pub fn home_node(&self, name: &str) -> Option<&HomeNode> {
        self.home_nodes.iter().find(|h| h.name == name)
    }

    /// Things worth an admin's attention that do not stop the node (the run-time alarm list
    /// starts from these). The embedded default has one: it declares no home node.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.cluster.peers.is_empty() {
            if self.cluster.name.is_none() {
                notes.push(
                    "cluster.name is not set: the cluster has no FQDN for its SRV records".into(),
                );
            }
            if !self.cluster.peers.iter().any(|p| p.name == self.node.id) {
                notes.push(format!(
                    "node.id `{}` is not in cluster.peers: this node is missing from its own \
                     peer list",
                    self.node.id
                ));
            }
            if self.xmpp.federation.dialback_secret.is_none() {
                notes.push(
                    "xmpp.federation.dialback_secret is not set: each node generates its own, \
                     so dialback keys cannot be verified by another node of the cluster"
                        .into(),
                );
            }
        }
        if self.home_nodes.is_empty() {
            notes.push(
                "no [[home_node]] is declared: inbound foreign traffic has nowhere to go".into(),
            );
        }
        // Accepted so a configuration can be written ahead, but said plainly: an admin must
        // not believe a node is clustered or peered when it runs alone.
        match self.cluster.store {
            Store::Etcd { .. } => notes.push(
                "[cluster] is in effect (etcd membership, leader election, shared state, \
                 configuration replication from the primary, component links held by one node \
                 each, the peer link, IM session owners, SIP requests handed to the node owning \
                 their dialog, the leader's takeover of a dead node's SIP subscriptions and IM \
                 sessions); changes to [cluster] itself need a restart of the node"
                    .into(),
            ),
            Store::Memory if !self.cluster.peers.is_empty() => notes.push(
                "[cluster] peers are listed but cluster.store is \"memory\": this node runs \
                 alone with its embedded state store (set store = \"etcd\" to form the cluster)"
                    .into(),
            ),
            Store::Memory => {}
        }
        if !self.intercluster.peers.is_empty() {
            notes.push(
                "[intercluster]: user sync, peer status, the stuck-sync alarm and routing to \
                 users of peer clusters (forwarded over the link, answers back the same way, \
                 unplaced users asked of the peers) are in effect with a legate built with the \
                 `cluster` feature; peers added by a reload are forwarded to after a restart"
                    .into(),
            );
            if self.intercluster.transport == InterclusterTransport::Tcp {
                notes.push(
                    "intercluster.transport = \"tcp\": the intercluster link is plaintext and \
                     unauthenticated (labs only; use \"tls\" in production)"
                        .into(),
                );
            }
        }
        if !self.sip.federated_domains.is_empty()
            && self.listeners.sip_tls.is_none()
            && self.listeners.sip_tcp.is_none()
        {
            notes.push(
                "SIP federated domains are configured but every SIP listener is off: \
                 foreign SIP requests cannot reach this node"
                    .into(),
            );
        }
        notes
    }
}

/// The systems a configuration may name, and where each may be used, read from a mapping set
/// (its `protocol` and `role`), so that a system an admin adds to `mappings/` is usable here.
pub fn systems_from_mappings(set: &crate::presence::map::MappingSet) -> Vec<(&str, SystemKind)> {
    use crate::presence::map::{Protocol, Role};
    set.systems
        .iter()
        .map(|s| {
            let kind = match (s.protocol, s.role) {
                (Protocol::Sip, _) => SystemKind::SipFederation,
                (Protocol::Xmpp, Role::Federated) => SystemKind::XmppFederation,
                (Protocol::Xmpp, Role::Local) => SystemKind::Local,
            };
            (&*s.name, kind)
        })
        .collect()
}

/// Parses and validates `src` (the text of `file`, used only to name it in diagnostics).
///
/// `known_systems` lists the mapping systems the loaded availability tables provide, each with
/// the place it may be used (`SystemKind`); pass `BUILTIN_SYSTEMS` when the embedded tables are
/// in use. On failure every problem found is returned, each positioned at the offending value.
/// A TOML syntax or type error (unknown key, wrong type) stops at that one error, because the
/// rest of the file cannot be trusted to mean what it says.
pub fn from_toml(
    src: &str,
    file: &Path,
    known_systems: &[(&str, SystemKind)],
) -> Result<Config, Diagnostics> {
    let raw: schema::RawConfig =
        toml::from_str(src).map_err(|e| Diagnostics(vec![Diagnostic::from_toml(file, src, &e)]))?;
    validate::validate(raw, src, file, known_systems)
}

/// Reads `path` and calls `from_toml`. A file that cannot be read gives one diagnostic at line 0.
pub fn load_file(path: &Path, known_systems: &[(&str, SystemKind)]) -> Result<Config, Diagnostics> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        Diagnostics(vec![Diagnostic::new(
            path,
            0,
            0,
            format!("cannot read the configuration file: {e}"),
        )])
    })?;
    from_toml(&src, path, known_systems)
}

/// The embedded default configuration (`DEFAULT_TOML`), validated against `BUILTIN_SYSTEMS`.
///
/// # Panics
/// Never in a released build: `DEFAULT_TOML` is a constant and a unit test proves it valid, so
/// a failure here is a programming error in this file, not bad input.
pub fn embedded_default() -> Config {
    match from_toml(
        DEFAULT_TOML,
        Path::new("<embedded default>"),
        BUILTIN_SYSTEMS,
    ) {
        Ok(cfg) => cfg,
        Err(diags) => panic!("the embedded default configuration is invalid:\n{diags}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_validates() {
        let cfg = from_toml(
            DEFAULT_TOML,
            Path::new("<embedded default>"),
            BUILTIN_SYSTEMS,
        );
        assert!(cfg.is_ok(), "{cfg:?}");
        assert_eq!(cfg.ok(), Some(embedded_default()));
    }

    #[test]
    fn empty_file_is_refused_for_lack_of_a_local_domain() {
        let err = from_toml("", Path::new("e.toml"), BUILTIN_SYSTEMS);
        let msgs: Vec<String> = err
            .err()
            .map(|d| d.0.into_iter().map(|d| d.message).collect())
            .unwrap_or_default();
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].contains("no [[local_domain]]"));
    }

    #[test]
    fn toml_syntax_errors_are_positioned() {
        let err = from_toml(
            "[node]
id = \"gw1\n",
            Path::new("s.toml"),
            BUILTIN_SYSTEMS,
        );
        let d = err.err().map(|d| d.0).unwrap_or_default();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].line, 2);
    }
}
