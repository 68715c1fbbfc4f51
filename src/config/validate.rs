//! Semantic validation: turns the file as written (`schema::RawConfig`) into a `Config`,
//! applying defaults and collecting *every* problem as a positioned `Diagnostic` instead of
//! stopping at the first, so an admin fixes a file in one pass. Each check points at the value to
//! change and, when two entries conflict, names the line of the other one. Defaults live here
//! and nowhere else. When a value is bad the checker records the problem and carries on with a
//! placeholder; the placeholder never escapes, because any diagnostic makes the result an `Err`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::schema::{RawConfig, RawHomeNode, S};
use super::types::{
    Domain, FederationMode, HostPort, LocalUser, NodeId, PeerTlsVerify, PresenceFormat, S2sAuth,
    Secret, StoreKind, SystemKind, TlsPolicy, TlsVersion,
};
use super::{
    ChatNode, ClusterConfig, ClusterPeer, Config, DnsConfig, HomeEndpoint, HomeNode,
    InterclusterConfig, InterclusterPeer, InterclusterTransport, Limits, Listeners, LocalDomain,
    MappingsConfig, NodeConfig, SipConfig, SipFederatedDomain, Store, TlsConfig, XmppConfig,
    XmppFederatedDomain, XmppFederation, MAX_CLUSTER_PEERS, MAX_INTERCLUSTER_PEERS,
};
use crate::diag::{line_col, Diagnostic, Diagnostics};

/// Default and allowed range of one numeric limit. Ranges refuse 0 (a bound of zero disables
/// the service it bounds) and absurd values (which disable the bound itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitRange {
    pub key: &'static str,
    pub default: i64,
    pub min: i64,
    pub max: i64,
}

const fn lim(key: &'static str, default: i64, min: i64, max: i64) -> LimitRange {
    LimitRange {
        key,
        default,
        min,
        max,
    }
}

/// `[limits]` keys in file order, plus `intercluster.sync_interval_mins` and
/// `cluster.lease_ttl_secs`.
pub const LIMIT_RANGES: &[LimitRange] = &[
    lim("sip_max_message_bytes", 65_536, 1_024, 1_048_576),
    lim("sip_max_header_bytes", 16_384, 512, 262_144),
    // RFC 6120 §13.12: a server must accept stanzas of at least 10000 bytes.
    lim("xmpp_max_stanza_bytes", 262_144, 10_000, 16_777_216),
    lim("max_connections_per_listener", 10_000, 1, 1_000_000),
    lim("max_connections_per_peer", 64, 1, 100_000),
    lim("handshake_timeout_secs", 10, 1, 300),
    lim("idle_timeout_secs", 600, 10, 86_400),
    lim("im_session_idle_secs", 600, 10, 86_400),
    lim("max_subscriptions_per_user", 1_000, 1, 100_000),
    lim("outbound_queue_per_domain", 1_000, 1, 1_000_000),
    lim("delivery_timeout_secs", 30, 1, 600),
    lim("stanza_timeout_secs", 5, 1, 300),
    lim("dialback_pending_per_domain", 8, 1, 10_000),
    lim("dialback_verify_connections", 64, 1, 100_000),
    lim("sip_message_timeout_secs", 5, 1, 300),
    lim("first_request_timeout_secs", 10, 1, 600),
    lim("sip_transactions_per_domain", 4_096, 1, 16_384),
    lim("foreign_watchers_per_domain", 10_000, 1, 10_000_000),
    lim("im_sessions_per_domain", 1_000, 1, 1_000_000),
    lim("sip_dial_backoff_max_secs", 60, 1, 3_600),
    lim("open_federation_domains", 1_000, 1, 100_000),
    lim("home_link_alarm_grace_secs", 30, 1, 3_600),
    lim("drain_grace_secs", 30, 1, 3_600),
    lim("intercluster.sync_interval_mins", 30, 30, 1_444),
    // Seed 002: a periodic sync stuck for more than 2 h raises the alarm; tests scale it down.
    lim("intercluster.stuck_after_secs", 7_200, 1, 86_400),
    // Seconds a dead node holds its leadership and its claims: failover takes about this long.
    lim("cluster.lease_ttl_secs", 5, 2, 60),
];

fn range_of(key: &str) -> LimitRange {
    LIMIT_RANGES
        .iter()
        .copied()
        .find(|r| r.key == key)
        // Keys are compile-time constants of this file; a miss is a typo here, and the
        // `limit_keys_exist` test catches it. Fall back to "no bound" rather than panic.
        .unwrap_or(lim("?", 1, 1, i64::MAX))
}

const DEFAULT_SIP_SYSTEM: &str = "lync";
const DEFAULT_XMPP_SYSTEM: &str = "fed-xmpp";
const DEFAULT_HOME_SYSTEM: &str = "xmpp";
const MIN_SECRET_LEN: usize = 16;

struct Ck<'a> {
    src: &'a str,
    file: &'a Path,
    /// Directory relative paths are resolved against (the config file's).
    base: Option<&'a Path>,
    systems: &'a [(&'a str, SystemKind)],
    diags: Vec<Diagnostic>,
}

impl Ck<'_> {
    fn err(&mut self, span: Range<usize>, msg: impl Into<String>) {
        self.diags
            .push(Diagnostic::at_offset(self.file, self.src, span.start, msg));
    }

    /// A problem with no single value to point at (something missing from the whole file).
    fn err_file(&mut self, msg: impl Into<String>) {
        self.diags.push(Diagnostic::new(self.file, 0, 0, msg));
    }

    fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.src, span.start).0
    }

    fn domain(&mut self, s: &S<String>) -> Option<Domain> {
        match Domain::parse(s.get_ref()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(s.span(), e);
                None
            }
        }
    }

    fn host_port(&mut self, s: &S<String>) -> Option<HostPort> {
        match HostPort::parse(s.get_ref()) {
            Ok(h) => Some(h),
            Err(e) => {
                self.err(s.span(), e);
                None
            }
        }
    }

    /// A listening address `ip:port`, or `"off"` when `may_be_off`.
    fn listen(&mut self, s: &S<String>, key: &str, may_be_off: bool) -> Option<SocketAddr> {
        let v = s.get_ref().trim();
        if may_be_off && v == "off" {
            return None;
        }
        match v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let off = if may_be_off { ", or \"off\"" } else { "" };
                self.err(
                    s.span(),
                    format!(
                        "{key} = `{v}` is not a listening address; expected `ip:port` such as \
                         `0.0.0.0:5061` or `[::]:5061`{off}"
                    ),
                );
                None
            }
        }
    }

    fn path(&mut self, s: &S<String>, key: &str) -> Option<PathBuf> {
        let v = s.get_ref();
        if v.trim().is_empty() {
            self.err(
                s.span(),
                format!("{key} is an empty path; remove the key or give a path"),
            );
            return None;
        }
        let p = PathBuf::from(v);
        Some(match self.base {
            Some(base) if p.is_relative() => base.join(p),
            _ => p,
        })
    }

    /// Checks a mapping-system name against the known list and the place it is used in. An
    /// omitted name takes `default`, which is checked too (against the entry's `name` span):
    /// a caller's mapping directory may not provide it.
    fn system(
        &mut self,
        s: Option<&S<String>>,
        want: SystemKind,
        default: &str,
        entry: Range<usize>,
    ) -> String {
        let valid: Vec<&str> = self
            .systems
            .iter()
            .filter(|(_, k)| *k == want)
            .map(|(n, _)| *n)
            .collect();
        let list = if valid.is_empty() {
            "(no such system is loaded)".to_string()
        } else {
            valid.join(", ")
        };
        let Some(s) = s else {
            if !valid.contains(&default) {
                self.err(
                    entry,
                    format!(
                        "no system is given and the default `{default}` is not a loaded mapping \
                         system; set system to one of: {list}"
                    ),
                );
            }
            return default.to_string();
        };
        let name = s.get_ref().as_str();
        match self.systems.iter().find(|(n, _)| *n == name) {
            Some((_, kind)) if *kind == want => {}
            Some((_, kind)) => self.err(
                s.span(),
                format!(
                    "system `{name}` is {}, not {}; use one of: {list}",
                    kind.describe(),
                    want.describe(),
                ),
            ),
            None => self.err(
                s.span(),
                format!("unknown system `{name}`; use one of: {list}"),
            ),
        }
        name.to_string()
    }

    fn limit(&mut self, v: Option<&S<i64>>, key: &str) -> i64 {
        let r = range_of(key);
        let Some(v) = v else {
            return r.default;
        };
        let n = *v.get_ref();
        if n < r.min || n > r.max {
            self.err(
                v.span(),
                format!(
                    "{key} = {n} is out of range; allowed: {} to {} (default {})",
                    r.min, r.max, r.default
                ),
            );
            return r.default;
        }
        n
    }

    fn secret_inline(&mut self, s: &S<String>, key: &str) -> Secret {
        let v = s.get_ref();
        if v.trim().is_empty() {
            self.err(s.span(), format!("{key} is empty; give a shared secret"));
        } else if v.len() < MIN_SECRET_LEN {
            self.err(
                s.span(),
                format!(
                    "{key} is {} characters; use at least {MIN_SECRET_LEN} (a short shared \
                     secret can be guessed)",
                    v.len()
                ),
            );
        }
        Secret::Inline(v.clone())
    }
}

/// Names that other entries refer to (home nodes, peer clusters): they appear in logs, status
/// output and metric labels, so they are kept to a plain token.
///
/// Returns the name and whether it was valid.
fn name_token(ck: &mut Ck<'_>, s: &S<String>, what: &str) -> (String, bool) {
    let v = s.get_ref();
    let bad = v.is_empty()
        || v.len() > 253
        || !v.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if bad {
        ck.err(
            s.span(),
            format!(
                "{what} `{v}` must be 1 to 253 characters of lowercase letters, digits, `-`, `_` \
                 and `.`"
            ),
        );
    }
    (v.clone(), !bad)
}

/// Keeps the first span of each key and reports later duplicates against it.
struct Seen<K> {
    first: HashMap<K, Range<usize>>,
}

impl<K: std::hash::Hash + Eq> Seen<K> {
    fn new() -> Self {
        Self {
            first: HashMap::new(),
        }
    }

    /// `Some(first span)` if `k` was seen before, else records it.
    fn dup(&mut self, k: K, span: &Range<usize>) -> Option<Range<usize>> {
        if let Some(first) = self.first.get(&k) {
            return Some(first.clone());
        }
        self.first.insert(k, span.clone());
        None
    }

    fn get(&self, k: &K) -> Option<&Range<usize>> {
        self.first.get(k)
    }
}

pub(crate) fn validate(
    raw: RawConfig,
    src: &str,
    file: &Path,
    systems: &[(&str, SystemKind)],
) -> Result<Config, Diagnostics> {
    let base = file.parent().filter(|p| !p.as_os_str().is_empty());
    let mut ck = Ck {
        src,
        file,
        base,
        systems,
        diags: Vec::new(),
    };

    let mut listen_spans = ListenSpans::new();
    let node = node(&mut ck, &raw, &mut listen_spans);
    let listeners = listeners(&mut ck, &raw, &mut listen_spans);
    check_listener_overlap(&mut ck, &listen_spans);

    let (local_domains, locals) = local_domains(&mut ck, &raw);
    let tls = tls(&mut ck, &raw);
    let (sip, sip_seen) = sip(&mut ck, &raw, &locals);
    let (xmpp, xmpp_seen) = xmpp(&mut ck, &raw, &locals, &sip_seen);
    let home_nodes = home_nodes(&mut ck, &raw, &locals);
    let routing_node = routing_node(&mut ck, &raw);
    let chat_nodes = chat_nodes(&mut ck, &raw, &locals, &sip_seen, &xmpp_seen);
    let limits = limits(&mut ck, &raw);
    let cluster = cluster(&mut ck, &raw);
    let intercluster = intercluster(&mut ck, &raw);
    let mappings = MappingsConfig {
        dir: raw
            .mappings
            .as_ref()
            .and_then(|m| m.dir.as_ref())
            .and_then(|d| ck.path(d, "mappings.dir")),
        reload: raw.mappings.as_ref().and_then(|m| m.reload).unwrap_or(true),
    };

    let dns = dns(&mut ck, &raw);

    if !ck.diags.is_empty() {
        // File order, so the admin reads them top to bottom.
        ck.diags.sort_by_key(|d| (d.line, d.col));
        return Err(Diagnostics(ck.diags));
    }
    Ok(Config {
        node,
        local_domains,
        listeners,
        tls,
        sip,
        xmpp,
        home_nodes,
        routing_node,
        chat_nodes,
        limits,
        cluster,
        intercluster,
        mappings,
        dns,
    })
}

/// `[dns] nameservers = ["ip:port", ...]`: at most 8, each an address (a name would need a
/// resolver to be found).
fn dns(ck: &mut Ck<'_>, raw: &RawConfig) -> DnsConfig {
    let Some(d) = raw.dns.as_ref() else {
        return DnsConfig::default();
    };
    if d.nameservers.is_empty() {
        return DnsConfig::default();
    }
    let mut out = Vec::new();
    for (i, s) in d.nameservers.iter().enumerate() {
        if i == 8 {
            ck.err(
                s.span(),
                "at most 8 DNS nameservers may be listed".to_string(),
            );
            break;
        }
        let v = s.get_ref().trim();
        let parsed = v
            .parse::<SocketAddr>()
            .or_else(|_| v.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)));
        match parsed {
            Ok(a) if a.port() != 0 => out.push(a),
            _ => ck.err(
                s.span(),
                format!(
                    "dns.nameservers entry `{v}` is not an address; expected `ip` or `ip:port` \
                     such as `10.0.0.53` or `127.0.0.1:5353`"
                ),
            ),
        }
    }
    DnsConfig {
        nameservers: Some(out),
    }
}

/// Placeholders replace invalid values so checking can go on; they never escape (see module
/// doc).
fn node(ck: &mut Ck<'_>, raw: &RawConfig, spans: &mut ListenSpans) -> NodeConfig {
    let n = raw.node.as_ref();
    let id = match n.and_then(|n| n.id.as_ref()) {
        None => NodeId::local(),
        Some(s) => NodeId::parse(s.get_ref()).unwrap_or_else(|e| {
            ck.err(s.span(), e);
            NodeId::local()
        }),
    };
    let default_dir = PathBuf::from("/var/lib/legate");
    let data_dir = match n.and_then(|n| n.data_dir.as_ref()) {
        None => default_dir,
        Some(s) => ck.path(s, "node.data_dir").unwrap_or(default_dir),
    };
    let default_admin = SocketAddr::from(([127, 0, 0, 1], 9090));
    let admin_listen = match n.and_then(|n| n.admin_listen.as_ref()) {
        None => {
            spans.push(("node.admin_listen", default_admin, None));
            default_admin
        }
        Some(s) => {
            let a = ck.listen(s, "node.admin_listen", false);
            if let Some(a) = a {
                spans.push(("node.admin_listen", a, Some(s.span())));
            }
            a.unwrap_or(default_admin)
        }
    };
    let allow_remote = n.and_then(|n| n.admin_allow_remote.as_ref());
    let admin_allow_remote = allow_remote.is_some_and(|a| *a.get_ref());
    let admin_token_file = n
        .and_then(|n| n.admin_token_file.as_ref())
        .and_then(|s| ck.path(s, "node.admin_token_file"));
    // Reachable from other hosts, the endpoint must authenticate: status, alarms and metrics
    // describe the federation, and consent changes are made through it.
    if let (Some(a), None) = (allow_remote, &admin_token_file) {
        if admin_allow_remote && !admin_listen.ip().is_loopback() {
            ck.err(
                a.span(),
                format!(
                    "node.admin_allow_remote = true exposes the admin endpoint on \
                     `{admin_listen}` without authentication; set node.admin_token_file to a \
                     file holding a bearer token (e.g. `openssl rand -hex 32 > \
                     /etc/legate/admin-token`)"
                ),
            );
        }
    }
    // Without a token the admin endpoint is not authenticated (metrics, status): a
    // non-loopback bind must be asked for explicitly, never reached by a typo such as
    // `0.0.0.0`.
    if !admin_allow_remote && !admin_listen.ip().is_loopback() {
        if let Some(s) = n.and_then(|n| n.admin_listen.as_ref()) {
            ck.err(
                s.span(),
                format!(
                    "node.admin_listen = `{admin_listen}` is not a loopback address and the admin \
                     endpoint is not authenticated; use 127.0.0.1 or [::1], or set \
                     node.admin_allow_remote = true to expose it on purpose"
                ),
            );
        }
    }
    let sip_host = n.and_then(|n| n.sip_host.as_ref()).and_then(|s| {
        match s.get_ref().parse::<std::net::IpAddr>() {
            Ok(ip) => Some(super::Host::Ip(ip)),
            Err(_) => ck.domain(s).map(super::Host::Name),
        }
    });
    NodeConfig {
        id,
        data_dir,
        admin_listen,
        admin_allow_remote,
        admin_token_file,
        sip_host,
    }
}

/// Every enabled listening socket: config key, address, and the span of the written value
/// (`None` for a default that was not written, which still occupies its port).
type ListenSpans = Vec<(&'static str, SocketAddr, Option<Range<usize>>)>;

fn listeners(ck: &mut Ck<'_>, raw: &RawConfig, spans: &mut ListenSpans) -> Listeners {
    let l = raw.listeners.as_ref();
    let mut one =
        |ck: &mut Ck<'_>, v: Option<&S<String>>, key: &'static str, default: Option<SocketAddr>| {
            let (addr, span) = match v {
                None => (default, None),
                Some(s) => (ck.listen(s, key, true), Some(s.span())),
            };
            if let Some(a) = addr {
                spans.push((key, a, span));
            }
            addr
        };
    Listeners {
        sip_tls: one(
            ck,
            l.and_then(|l| l.sip_tls.as_ref()),
            "listeners.sip_tls",
            Some(SocketAddr::from(([0, 0, 0, 0], 5061))),
        ),
        sip_tcp: one(
            ck,
            l.and_then(|l| l.sip_tcp.as_ref()),
            "listeners.sip_tcp",
            None,
        ),
        xmpp_s2s: one(
            ck,
            l.and_then(|l| l.xmpp_s2s.as_ref()),
            "listeners.xmpp_s2s",
            Some(SocketAddr::from(([0, 0, 0, 0], 5269))),
        ),
        xmpp_s2s_direct_tls: one(
            ck,
            l.and_then(|l| l.xmpp_s2s_direct_tls.as_ref()),
            "listeners.xmpp_s2s_direct_tls",
            None,
        ),
    }
}

/// Two sockets collide when they share a port and either address is the same or one of them
/// is a wildcard (`0.0.0.0` / `[::]`, which on Linux also covers IPv4 by default). Port 0 means
/// "any free port" and never collides.
fn check_listener_overlap(ck: &mut Ck<'_>, spans: &ListenSpans) {
    for (i, (k2, a2, s2)) in spans.iter().enumerate() {
        for (k1, a1, s1) in &spans[..i] {
            let clash = a1.port() == a2.port()
                && a1.port() != 0
                && (a1.ip() == a2.ip() || a1.ip().is_unspecified() || a2.ip().is_unspecified());
            if !clash {
                continue;
            }
            // Point at the later written value; name the other one by line, or as a default.
            let (at, addr, other_key, other_addr, other_span) = match (s1, s2) {
                (_, Some(s2)) => (s2, a2, k1, a1, s1),
                (Some(s1), None) => (s1, a1, k2, a2, s2),
                (None, None) => continue, // the defaults never clash with each other
            };
            let where_other = match other_span {
                Some(s) => format!("(line {})", ck.line(s)),
                None => "(its default)".to_string(),
            };
            ck.err(
                at.clone(),
                format!(
                    "listening address {addr} overlaps {other_key} = {other_addr} \
                     {where_other}; give each listener its own port or address"
                ),
            );
        }
    }
}

fn local_domains(ck: &mut Ck<'_>, raw: &RawConfig) -> (Vec<LocalDomain>, Seen<Domain>) {
    let mut seen = Seen::new();
    let mut out = Vec::new();
    let mut meshes = Vec::new();
    if raw.local_domain.is_empty() {
        ck.err_file(
            "no [[local_domain]] is declared; add at least one: [[local_domain]] with name = \"<your domain>\"",
        );
    }
    for d in &raw.local_domain {
        let cert = d
            .cert
            .as_ref()
            .and_then(|p| ck.path(p, "local_domain.cert"));
        let key = d.key.as_ref().and_then(|p| ck.path(p, "local_domain.key"));
        pair_check(ck, d.cert.as_ref(), d.key.as_ref(), "local_domain.");
        let Some(name) = ck.domain(&d.name) else {
            continue;
        };
        if let Some(first) = seen.dup(name.clone(), &d.name.span()) {
            let line = ck.line(&first);
            ck.err(
                d.name.span(),
                format!("local domain `{name}` is already declared at line {line}; remove one of the two"),
            );
            continue;
        }
        let mesh_component = d.mesh_component.as_ref().and_then(|m| {
            let domain = ck.domain(m)?;
            meshes.push((domain.clone(), m.span(), name.clone()));
            Some(domain)
        });
        out.push(LocalDomain {
            name,
            cert,
            key,
            mesh_component,
        });
    }
    // A mesh component is a name of its own at the home node: not a domain users live in.
    for (m, span, name) in meshes {
        if seen.get(&m).is_some() {
            ck.err(
                span,
                format!(
                    "mesh_component `{m}` is a local domain; name a component of its own (e.g. \
                     `mesh.{name}`), declared on every home node"
                ),
            );
        }
    }
    (out, seen)
}

/// A certificate without its key (or the reverse) is always a mistake.
fn pair_check(ck: &mut Ck<'_>, cert: Option<&S<String>>, key: Option<&S<String>>, prefix: &str) {
    match (cert, key) {
        (Some(c), None) => ck.err(
            c.span(),
            format!("{prefix}cert is given without {prefix}key; give both or neither"),
        ),
        (None, Some(k)) => ck.err(
            k.span(),
            format!("{prefix}key is given without {prefix}cert; give both or neither"),
        ),
        _ => {}
    }
}

fn tls(ck: &mut Ck<'_>, raw: &RawConfig) -> TlsConfig {
    let t = raw.tls.as_ref();
    let get = |f: fn(&super::schema::RawTls) -> Option<&S<String>>| t.and_then(f);
    let trust_bundle =
        get(|t| t.trust_bundle.as_ref()).and_then(|p| ck.path(p, "tls.trust_bundle"));
    let cert = get(|t| t.cert.as_ref()).and_then(|p| ck.path(p, "tls.cert"));
    let key = get(|t| t.key.as_ref()).and_then(|p| ck.path(p, "tls.key"));
    pair_check(
        ck,
        get(|t| t.cert.as_ref()),
        get(|t| t.key.as_ref()),
        "tls.",
    );
    TlsConfig {
        trust_bundle,
        cert,
        key,
        min_version: t.and_then(|t| t.min_version).unwrap_or(TlsVersion::V1_2),
    }
}

/// Reports `name` if it is one of our local domains (a foreign entry must never be ours).
fn not_local(
    ck: &mut Ck<'_>,
    name: &Domain,
    span: Range<usize>,
    locals: &Seen<Domain>,
    what: &str,
) {
    if let Some(l) = locals.get(name) {
        let line = ck.line(l);
        ck.err(
            span,
            format!(
                "{what} `{name}` is a local domain (line {line}); a foreign domain cannot be \
                 one of ours"
            ),
        );
    }
}

fn sip(ck: &mut Ck<'_>, raw: &RawConfig, locals: &Seen<Domain>) -> (SipConfig, Seen<Domain>) {
    let mut seen = Seen::new();
    let mut out = Vec::new();
    let entries = raw
        .sip
        .as_ref()
        .map(|s| s.federated_domain.as_slice())
        .unwrap_or(&[]);
    for d in entries {
        let system = ck.system(
            d.system.as_ref(),
            SystemKind::SipFederation,
            DEFAULT_SIP_SYSTEM,
            d.name.span(),
        );
        let route = d.route.as_ref().and_then(|r| ck.host_port(r));
        let Some(name) = ck.domain(&d.name) else {
            continue;
        };
        not_local(ck, &name, d.name.span(), locals, "SIP federated domain");
        if let Some(first) = seen.dup(name.clone(), &d.name.span()) {
            let line = ck.line(&first);
            ck.err(
                d.name.span(),
                format!("SIP federated domain `{name}` is already declared at line {line}; remove one of the two"),
            );
            continue;
        }
        out.push(SipFederatedDomain {
            name,
            system,
            route,
            tolerate_no_client_auth_eku: d.tolerate_no_client_auth_eku.unwrap_or(false),
            presence_format: d.presence_format.unwrap_or(PresenceFormat::Auto),
        });
    }
    (
        SipConfig {
            federated_domains: out,
        },
        seen,
    )
}

fn xmpp(
    ck: &mut Ck<'_>,
    raw: &RawConfig,
    locals: &Seen<Domain>,
    sip_seen: &Seen<Domain>,
) -> (XmppConfig, Seen<Domain>) {
    let f = raw.xmpp.as_ref().and_then(|x| x.federation.as_ref());
    let mut seen = Seen::new();
    let mut out = Vec::new();
    let entries = f.map(|f| f.domain.as_slice()).unwrap_or(&[]);
    for d in entries {
        let system = ck.system(
            d.system.as_ref(),
            SystemKind::XmppFederation,
            DEFAULT_XMPP_SYSTEM,
            d.name.span(),
        );
        let tls = d.tls.as_ref().map_or(TlsPolicy::Required, |t| *t.get_ref());
        let auth = d
            .auth
            .as_ref()
            .map_or(S2sAuth::ExternalOrDialback, |a| *a.get_ref());
        if let (Some(t), S2sAuth::ExternalOnly, TlsPolicy::Optional) = (&d.tls, auth, tls) {
            ck.err(
                t.span(),
                "tls = \"optional\" contradicts auth = \"external_only\": SASL EXTERNAL \
                 authenticates with the TLS certificate; set tls = \"required\" or allow dialback",
            );
        }
        let deny = d.deny.unwrap_or(false);
        let Some(name) = ck.domain(&d.name) else {
            continue;
        };
        not_local(ck, &name, d.name.span(), locals, "XMPP federated domain");
        if let Some(first) = seen.dup(name.clone(), &d.name.span()) {
            let line = ck.line(&first);
            ck.err(
                d.name.span(),
                format!("XMPP federation domain `{name}` is already declared at line {line}; remove one of the two"),
            );
            continue;
        }
        // A `deny = true` entry refuses XMPP from the domain, which is consistent with federating
        // it over SIP; only an entry that *allows* XMPP overlaps (requirements §1).
        if !deny {
            if let Some(s) = sip_seen.get(&name) {
                let sip_line = ck.line(s);
                let xmpp_line = ck.line(&d.name.span());
                ck.err(
                    d.name.span(),
                    format!(
                        "domain `{name}` is federated over SIP (sip.federated_domain, line \
                         {sip_line}) and over XMPP (xmpp.federation.domain, line {xmpp_line}); a \
                         domain may be federated over SIP or XMPP, never both: remove one entry"
                    ),
                );
            }
        }
        out.push(XmppFederatedDomain {
            name,
            system,
            tls,
            auth,
            deny,
        });
    }
    let dialback_secret = f
        .and_then(|f| f.dialback_secret.as_ref())
        .map(|s| ck.secret_inline(s, "xmpp.federation.dialback_secret"));
    (
        XmppConfig {
            federation: XmppFederation {
                mode: f.and_then(|f| f.mode).unwrap_or(FederationMode::AllowList),
                domains: out,
                dialback_secret,
                dialback_allow_private_targets: f
                    .and_then(|f| f.dialback_allow_private_targets)
                    .unwrap_or(false),
            },
        },
        seen,
    )
}

fn home_nodes(ck: &mut Ck<'_>, raw: &RawConfig, locals: &Seen<Domain>) -> Vec<HomeNode> {
    let mut names = Seen::new();
    let mut users_seen: Seen<LocalUser> = Seen::new();
    let mut out = Vec::new();
    for h in &raw.home_node {
        let (name, name_ok) = name_token(ck, &h.name, "home_node.name");
        if let Some(first) = names.dup(name.clone(), &h.name.span()) {
            let line = ck.line(&first);
            ck.err(
                h.name.span(),
                format!(
                    "home node `{name}` is already declared at line {line}; remove one of the two"
                ),
            );
        }
        let endpoint = home_endpoint(ck, h, name_ok);
        let secret = match (&h.component_secret, &h.component_secret_file) {
            (Some(_), Some(f)) => {
                ck.err(
                    f.span(),
                    "give component_secret or component_secret_file, not both",
                );
                None
            }
            (Some(s), None) => Some(ck.secret_inline(s, "component_secret")),
            (None, Some(f)) => ck.path(f, "component_secret_file").map(Secret::File),
            (None, None) => {
                ck.err(
                    h.name.span(),
                    format!(
                        "home node `{name}` has no component_secret (or component_secret_file); \
                         XEP-0114 needs the shared secret the home node expects"
                    ),
                );
                None
            }
        };
        let mut users = Vec::new();
        for u in h.users.iter().flatten() {
            let user = match LocalUser::parse(u.get_ref()) {
                Ok(user) => user,
                Err(e) => {
                    ck.err(u.span(), e);
                    continue;
                }
            };
            if locals.get(&user.domain).is_none() {
                ck.err(
                    u.span(),
                    format!(
                        "user `{user}` is not in a local domain; home nodes host only users of \
                         the [[local_domain]] entries"
                    ),
                );
                continue;
            }
            if let Some(first) = users_seen.dup(user.clone(), &u.span()) {
                let line = ck.line(&first);
                ck.err(
                    u.span(),
                    format!(
                        "user `{user}` is already listed at line {line}; a user lives on one \
                         home node"
                    ),
                );
                continue;
            }
            users.push(user);
        }
        let default_system = ck.system(
            h.default_system.as_ref(),
            SystemKind::Local,
            DEFAULT_HOME_SYSTEM,
            h.name.span(),
        );
        if let (Some(endpoint), Some(component_secret)) = (endpoint, secret) {
            out.push(HomeNode {
                name,
                endpoint,
                component_secret,
                users,
                default_system,
                connect_from_every_node: h
                    .connect_from_every_node
                    .as_ref()
                    .is_some_and(|b| *b.get_ref()),
            });
        }
    }
    out
}

/// `name_ok`: the name already passed `name_token`; when it did not, a second complaint about
/// the same name (that SRV needs a domain) would only repeat the first.
fn home_endpoint(ck: &mut Ck<'_>, h: &RawHomeNode, name_ok: bool) -> Option<HomeEndpoint> {
    let srv = h.srv.as_ref().is_some_and(|s| *s.get_ref());
    match (&h.addresses, srv) {
        (Some(_), true) => {
            if let Some(s) = &h.srv {
                ck.err(
                    s.span(),
                    "give either addresses or srv = true, not both (srv would override the list)",
                );
            }
            None
        }
        (Some(a), false) => {
            if a.get_ref().is_empty() {
                ck.err(
                    a.span(),
                    "home_node.addresses is empty; list at least one `host:port` or use srv = true",
                );
                return None;
            }
            let list: Vec<HostPort> = a.get_ref().iter().filter_map(|s| ck.host_port(s)).collect();
            (list.len() == a.get_ref().len()).then_some(HomeEndpoint::Addresses(list))
        }
        (None, true) => match Domain::parse(h.name.get_ref()) {
            Ok(d) => Some(HomeEndpoint::Srv(d)),
            Err(_) if !name_ok => None,
            Err(e) => {
                ck.err(
                    h.name.span(),
                    format!(
                        "srv = true looks up _xmpp-component._tcp.<name>, so the name must be a \
                         domain: {e}"
                    ),
                );
                None
            }
        },
        (None, false) => {
            ck.err(
                h.name.span(),
                format!(
                    "home node `{}` has neither addresses nor srv = true; say how to reach it",
                    h.name.get_ref()
                ),
            );
            None
        }
    }
}

fn routing_node(ck: &mut Ck<'_>, raw: &RawConfig) -> Option<String> {
    let r = raw.routing_node.as_ref()?;
    let name = r.get_ref();
    if raw
        .home_node
        .iter()
        .any(|h| h.name.get_ref().trim() == name)
    {
        return Some(name.clone());
    }
    let declared: Vec<&str> = raw
        .home_node
        .iter()
        .map(|h| h.name.get_ref().as_str())
        .collect();
    let hint = if declared.is_empty() {
        "no [[home_node]] is declared".to_string()
    } else {
        format!("declared home nodes: {}", declared.join(", "))
    };
    ck.err(
        r.span(),
        format!("routing_node `{name}` is not a declared home node ({hint})"),
    );
    None
}

fn chat_nodes(
    ck: &mut Ck<'_>,
    raw: &RawConfig,
    locals: &Seen<Domain>,
    sip_seen: &Seen<Domain>,
    xmpp_seen: &Seen<Domain>,
) -> Vec<ChatNode> {
    let mut seen = Seen::new();
    let mut out = Vec::new();
    for c in &raw.chat_node {
        let home = c.home_node.get_ref();
        if !raw
            .home_node
            .iter()
            .any(|h| h.name.get_ref().trim() == home)
        {
            ck.err(
                c.home_node.span(),
                format!("chat_node.home_node `{home}` is not a declared home node"),
            );
        }
        let Some(alias) = ck.domain(&c.alias) else {
            continue;
        };
        if let Some(first) = seen.dup(alias.clone(), &c.alias.span()) {
            let line = ck.line(&first);
            ck.err(
                c.alias.span(),
                format!("chat node alias `{alias}` is already declared at line {line}; remove one of the two"),
            );
            continue;
        }
        for (set, what) in [
            (locals, "a local domain"),
            (sip_seen, "a SIP federated domain"),
            (xmpp_seen, "an XMPP federation domain"),
        ] {
            if let Some(s) = set.get(&alias) {
                let line = ck.line(s);
                ck.err(
                    c.alias.span(),
                    format!("chat node alias `{alias}` is also {what} (line {line})"),
                );
            }
        }
        out.push(ChatNode {
            alias,
            home_node: home.clone(),
        });
    }
    out
}

fn limits(ck: &mut Ck<'_>, raw: &RawConfig) -> Limits {
    let l = raw.limits.as_ref();
    let before = ck.diags.len();
    macro_rules! get {
        ($f:ident) => {
            ck.limit(l.and_then(|l| l.$f.as_ref()), stringify!($f))
        };
    }
    // Every range fits in u32, so the casts below cannot truncate.
    let limits = Limits {
        sip_max_message_bytes: get!(sip_max_message_bytes) as usize,
        sip_max_header_bytes: get!(sip_max_header_bytes) as usize,
        xmpp_max_stanza_bytes: get!(xmpp_max_stanza_bytes) as usize,
        max_connections_per_listener: get!(max_connections_per_listener) as usize,
        max_connections_per_peer: get!(max_connections_per_peer) as usize,
        handshake_timeout_secs: get!(handshake_timeout_secs) as u64,
        idle_timeout_secs: get!(idle_timeout_secs) as u64,
        im_session_idle_secs: get!(im_session_idle_secs) as u64,
        max_subscriptions_per_user: get!(max_subscriptions_per_user) as usize,
        outbound_queue_per_domain: get!(outbound_queue_per_domain) as usize,
        delivery_timeout_secs: get!(delivery_timeout_secs) as u64,
        stanza_timeout_secs: get!(stanza_timeout_secs) as u64,
        dialback_pending_per_domain: get!(dialback_pending_per_domain) as usize,
        dialback_verify_connections: get!(dialback_verify_connections) as usize,
        sip_message_timeout_secs: get!(sip_message_timeout_secs) as u64,
        first_request_timeout_secs: get!(first_request_timeout_secs) as u64,
        sip_transactions_per_domain: get!(sip_transactions_per_domain) as usize,
        foreign_watchers_per_domain: get!(foreign_watchers_per_domain) as usize,
        im_sessions_per_domain: get!(im_sessions_per_domain) as usize,
        sip_dial_backoff_max_secs: get!(sip_dial_backoff_max_secs) as u64,
        open_federation_domains: get!(open_federation_domains) as usize,
        home_link_alarm_grace_secs: get!(home_link_alarm_grace_secs) as u64,
        drain_grace_secs: get!(drain_grace_secs) as u64,
    };
    // A value already refused for its range was replaced by its default; comparing that
    // default with the other limit would only add a confusing second error.
    if ck.diags.len() > before {
        return limits;
    }
    if limits.sip_max_header_bytes > limits.sip_max_message_bytes {
        if let Some(v) = l.and_then(|l| {
            l.sip_max_header_bytes
                .as_ref()
                .or(l.sip_max_message_bytes.as_ref())
        }) {
            ck.err(
                v.span(),
                format!(
                    "sip_max_header_bytes ({}) exceeds sip_max_message_bytes ({}); the headers \
                     are part of the message",
                    limits.sip_max_header_bytes, limits.sip_max_message_bytes
                ),
            );
        }
    }
    if limits.max_connections_per_peer > limits.max_connections_per_listener {
        if let Some(v) = l.and_then(|l| {
            l.max_connections_per_peer
                .as_ref()
                .or(l.max_connections_per_listener.as_ref())
        }) {
            ck.err(
                v.span(),
                format!(
                    "max_connections_per_peer ({}) exceeds max_connections_per_listener ({})",
                    limits.max_connections_per_peer, limits.max_connections_per_listener
                ),
            );
        }
    }
    limits
}

fn cluster(ck: &mut Ck<'_>, raw: &RawConfig) -> ClusterConfig {
    let c = raw.cluster.as_ref();
    let lease_ttl_secs = ck.limit(
        c.and_then(|c| c.lease_ttl_secs.as_ref()),
        "cluster.lease_ttl_secs",
    );
    let name = c.and_then(|c| c.name.as_ref()).and_then(|n| ck.domain(n));
    let mut names: Seen<NodeId> = Seen::new();
    let mut addrs: Seen<HostPort> = Seen::new();
    let mut peers = Vec::new();
    for (i, p) in c
        .map(|c| c.peers.as_slice())
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        if i == MAX_CLUSTER_PEERS {
            ck.err(
                p.name.span(),
                format!(
                    "cluster.peers has more than {MAX_CLUSTER_PEERS} entries; a cluster has at \
                     most {MAX_CLUSTER_PEERS} peers (split into another cluster and peer them \
                     with [intercluster])"
                ),
            );
        }
        let id = match NodeId::parse(p.name.get_ref()) {
            Ok(id) => Some(id),
            Err(e) => {
                ck.err(p.name.span(), e);
                None
            }
        };
        if let Some(id) = &id {
            if let Some(first) = names.dup(id.clone(), &p.name.span()) {
                let line = ck.line(&first);
                ck.err(
                    p.name.span(),
                    format!("cluster peer `{id}` is already declared at line {line}; remove one of the two"),
                );
            }
        }
        let address = ck.host_port(&p.address);
        if let Some(a) = &address {
            if let Some(first) = addrs.dup(a.clone(), &p.address.span()) {
                let line = ck.line(&first);
                ck.err(
                    p.address.span(),
                    format!("cluster peer address {a} is already used at line {line}; remove one of the two"),
                );
            }
        }
        if let (Some(name), Some(address)) = (id, address) {
            peers.push(ClusterPeer {
                name,
                address,
                federation: p.federation.unwrap_or(true),
            });
        }
    }
    let primary = c.and_then(|c| c.primary.as_ref()).and_then(|p| {
        let found = peers.iter().find(|peer| peer.name.as_str() == p.get_ref());
        if found.is_none() {
            ck.err(
                p.span(),
                format!(
                    "cluster.primary `{}` is not one of cluster.peers",
                    p.get_ref()
                ),
            );
        }
        found.map(|peer| peer.name.clone())
    });
    let mut map_seen: Seen<Domain> = Seen::new();
    let mut address_map = Vec::new();
    // In file order, so "already mapped" points at the later line whatever the key's case.
    let mut entries: Vec<_> = c
        .map(|c| c.address_map.iter())
        .into_iter()
        .flatten()
        .collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    for (k, v) in entries {
        let ip = match v.get_ref().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                ck.err(
                    v.span(),
                    format!(
                        "cluster.address_map: `{}` is not an IP address",
                        v.get_ref()
                    ),
                );
                None
            }
        };
        let Some(fqdn) = ck.domain(k) else {
            continue;
        };
        if let Some(first) = map_seen.dup(fqdn.clone(), &k.span()) {
            let line = ck.line(&first);
            ck.err(
                k.span(),
                format!("cluster.address_map: `{fqdn}` is already mapped at line {line}; remove one of the two"),
            );
            continue;
        }
        if let Some(ip) = ip {
            address_map.push((fqdn, ip));
        }
    }
    let store = store(ck, c);
    ClusterConfig {
        name,
        primary,
        peers,
        tls_verify: c
            .and_then(|c| c.tls_verify)
            .unwrap_or(PeerTlsVerify::Permissive),
        address_map,
        store,
        lease_ttl_secs: u64::try_from(lease_ttl_secs).unwrap_or(5),
    }
}

fn store(ck: &mut Ck<'_>, c: Option<&super::schema::RawCluster>) -> Store {
    let kind = c.and_then(|c| c.store.as_ref());
    let eps = c.and_then(|c| c.etcd_endpoints.as_ref());
    match (kind.map(|k| *k.get_ref()), eps) {
        (None | Some(StoreKind::Memory), None) => Store::Memory,
        (None | Some(StoreKind::Memory), Some(e)) => {
            ck.err(
                e.span(),
                "cluster.etcd_endpoints is set but cluster.store is \"memory\"; set store = \
                 \"etcd\" or remove the endpoints",
            );
            Store::Memory
        }
        (Some(StoreKind::Etcd), None) => {
            if let Some(k) = kind {
                ck.err(
                    k.span(),
                    "cluster.store = \"etcd\" needs cluster.etcd_endpoints (e.g. \
                     [\"https://10.0.0.1:2379\"])",
                );
            }
            Store::Memory
        }
        (Some(StoreKind::Etcd), Some(e)) => {
            if e.get_ref().is_empty() {
                ck.err(e.span(), "cluster.etcd_endpoints is empty");
            }
            let mut endpoints = Vec::new();
            for ep in e.get_ref() {
                let v = ep.get_ref();
                let rest = v
                    .strip_prefix("https://")
                    .or_else(|| v.strip_prefix("http://"));
                match rest.map(|r| HostPort::parse(r.trim_end_matches('/'))) {
                    Some(Ok(_)) => endpoints.push(v.clone()),
                    Some(Err(err)) => ck.err(ep.span(), format!("etcd endpoint {err}")),
                    None => ck.err(
                        ep.span(),
                        format!(
                            "etcd endpoint `{v}` must be a URL `https://host:port` (or http://)"
                        ),
                    ),
                }
            }
            Store::Etcd { endpoints }
        }
    }
}

fn intercluster(ck: &mut Ck<'_>, raw: &RawConfig) -> InterclusterConfig {
    let ic = raw.intercluster.as_ref();
    let sync = ck.limit(
        ic.and_then(|i| i.sync_interval_mins.as_ref()),
        "intercluster.sync_interval_mins",
    );
    let mut names = Seen::new();
    let mut peers = Vec::new();
    for (i, p) in ic
        .map(|i| i.peer.as_slice())
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        if i == MAX_INTERCLUSTER_PEERS {
            ck.err(
                p.name.span(),
                format!(
                    "more than {MAX_INTERCLUSTER_PEERS} [[intercluster.peer]] entries; a mesh has \
                     at most {} clusters including this one",
                    MAX_INTERCLUSTER_PEERS + 1
                ),
            );
        }
        let (name, _) = name_token(ck, &p.name, "intercluster.peer.name");
        if name == "all" {
            ck.err(
                p.name.span(),
                "intercluster peer name `all` is reserved (the metrics' sum over every peer); \
                 choose another",
            );
        }
        if let Some(first) = names.dup(name.clone(), &p.name.span()) {
            let line = ck.line(&first);
            ck.err(
                p.name.span(),
                format!("intercluster peer `{name}` is already declared at line {line}; remove one of the two"),
            );
        }
        if let Some(address) = ck.host_port(&p.address) {
            peers.push(InterclusterPeer { name, address });
        }
    }
    let stuck = ck.limit(
        ic.and_then(|i| i.stuck_after_secs.as_ref()),
        "intercluster.stuck_after_secs",
    );
    let transport = match ic.and_then(|i| i.transport.as_ref()) {
        None => InterclusterTransport::Tls,
        Some(t) => match t.get_ref().as_str() {
            "tls" => InterclusterTransport::Tls,
            "tcp" => InterclusterTransport::Tcp,
            other => {
                ck.err(
                    t.span(),
                    format!(
                        "intercluster.transport = `{other}` is unknown: \"tls\" (mutual TLS, the \
                         default) or \"tcp\" (plaintext, for labs only)"
                    ),
                );
                InterclusterTransport::Tls
            }
        },
    };
    let name = ic
        .and_then(|i| i.name.as_ref())
        .map(|n| name_token(ck, n, "intercluster.name").0);
    let listen = ic
        .and_then(|i| i.listen.as_ref())
        .and_then(|l| ck.listen(l, "intercluster.listen", false));
    // What a listed peer needs to find and trust this cluster: pointed at the first peer.
    if let Some(first) = ic.and_then(|i| i.peer.first()) {
        let span = first.name.span();
        if name.is_none() {
            ck.err(
                span.clone(),
                "[[intercluster.peer]] is listed but intercluster.name is not set: add \
                 `name = \"...\"` under [intercluster], this cluster's name as its peers list it",
            );
        }
        if ic.is_some_and(|i| i.listen.is_none()) {
            ck.err(
                span.clone(),
                "[[intercluster.peer]] is listed but intercluster.listen is not set: add \
                 `listen = \"ip:port\"` under [intercluster], the address the peers' \
                 [[intercluster.peer]] address points at",
            );
        }
        if let Some(n) = &name {
            if let Some(p) = peers.iter().find(|p| &p.name == n) {
                ck.err(
                    span.clone(),
                    format!(
                        "intercluster peer `{}` has this cluster's own name (intercluster.name): \
                         list the other clusters only",
                        p.name
                    ),
                );
            }
        }
        let t = &raw.tls;
        let has = |f: fn(&super::schema::RawTls) -> bool| t.as_ref().is_some_and(f);
        if transport == InterclusterTransport::Tls
            && !(has(|t| t.cert.is_some())
                && has(|t| t.key.is_some())
                && has(|t| t.trust_bundle.is_some()))
        {
            let at = ic
                .and_then(|i| i.transport.as_ref())
                .map_or(span, |t| t.span());
            ck.err(
                at,
                "intercluster.transport = \"tls\" (the default) needs tls.cert and tls.key (this \
                 node's certificate, presented to the peer clusters) and tls.trust_bundle (the CA \
                 that signed theirs); or set transport = \"tcp\" in a lab",
            );
        }
    }
    InterclusterConfig {
        name,
        listen,
        transport,
        // In range 30..=1444 after `limit`, so the cast is exact.
        sync_interval_mins: sync as u32,
        stuck_after_secs: u64::try_from(stuck).unwrap_or(7_200),
        auto_recovery: ic.and_then(|i| i.auto_recovery).unwrap_or(true),
        peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_keys_exist() {
        for key in [
            "sip_max_message_bytes",
            "sip_max_header_bytes",
            "xmpp_max_stanza_bytes",
            "max_connections_per_listener",
            "max_connections_per_peer",
            "handshake_timeout_secs",
            "idle_timeout_secs",
            "im_session_idle_secs",
            "max_subscriptions_per_user",
            "outbound_queue_per_domain",
            "stanza_timeout_secs",
            "dialback_pending_per_domain",
            "dialback_verify_connections",
            "sip_message_timeout_secs",
            "first_request_timeout_secs",
            "sip_transactions_per_domain",
            "foreign_watchers_per_domain",
            "im_sessions_per_domain",
            "sip_dial_backoff_max_secs",
            "intercluster.sync_interval_mins",
            "intercluster.stuck_after_secs",
            "cluster.lease_ttl_secs",
        ] {
            assert_eq!(range_of(key).key, key);
        }
    }

    fn listener_errors(sip_tls: &str, sip_tcp: &str) -> usize {
        let src = format!(
            "[[local_domain]]\nname = \"example.com\"\n[listeners]\nsip_tls = \"{sip_tls}\"\n\
             sip_tcp = \"{sip_tcp}\"\n"
        );
        match super::super::from_toml(&src, Path::new("l.toml"), super::super::BUILTIN_SYSTEMS) {
            Ok(_) => 0,
            Err(d) => d.0.len(),
        }
    }

    fn admin(node: &str) -> Result<SocketAddr, String> {
        let src = format!("[node]\n{node}\n[[local_domain]]\nname = \"example.com\"\n");
        super::super::from_toml(&src, Path::new("a.toml"), super::super::BUILTIN_SYSTEMS)
            .map(|c| c.node.admin_listen)
            .map_err(|d| d.to_string())
    }

    #[test]
    fn a_non_loopback_admin_endpoint_must_be_asked_for() {
        assert!(admin("admin_listen = \"127.0.0.1:9090\"").is_ok());
        assert!(admin("admin_listen = \"[::1]:9090\"").is_ok());
        let e = admin("admin_listen = \"0.0.0.0:9090\"")
            .err()
            .unwrap_or_default();
        assert!(e.contains("admin_allow_remote = true"), "{e}");
        assert!(e.contains("a.toml:2:"), "{e}");
        let e = admin("admin_listen = \"10.1.2.3:9090\"\nadmin_allow_remote = true")
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("a.toml:3:") && e.contains("admin_token_file"),
            "{e}"
        );
        assert!(
            admin("admin_listen = \"127.0.0.1:9090\"\nadmin_allow_remote = true").is_ok(),
            "a loopback bind needs no token"
        );
        assert_eq!(
            admin(
                "admin_listen = \"10.1.2.3:9090\"\nadmin_allow_remote = true\n\
                 admin_token_file = \"token\""
            ),
            Ok("10.1.2.3:9090"
                .parse()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))))
        );
    }

    #[test]
    fn listener_overlap_rules() {
        // A wildcard covers every address of its port, IPv6 wildcard included (dual stack).
        assert_eq!(listener_errors("[::]:5061", "127.0.0.1:5061"), 1);
        assert_eq!(listener_errors("0.0.0.0:5061", "10.0.0.1:5061"), 1);
        assert_eq!(listener_errors("10.0.0.1:5061", "10.0.0.1:5061"), 1);
        // Distinct specific addresses on one port, or distinct ports, are fine.
        assert_eq!(listener_errors("10.0.0.1:5061", "10.0.0.2:5061"), 0);
        assert_eq!(listener_errors("0.0.0.0:5061", "0.0.0.0:5060"), 0);
        // Port 0 is "any free port": never a clash (test harnesses use it everywhere).
        assert_eq!(listener_errors("127.0.0.1:0", "127.0.0.1:0"), 0);
        // "off" frees the port.
        assert_eq!(listener_errors("off", "0.0.0.0:5061"), 0);
    }

    #[test]
    fn defaults_are_inside_their_ranges() {
        for r in LIMIT_RANGES {
            assert!(
                r.min >= 1 && r.min <= r.default && r.default <= r.max,
                "{r:?}"
            );
            assert!(
                r.max <= i64::from(u32::MAX),
                "{r:?} would not fit the casts"
            );
        }
    }
}
