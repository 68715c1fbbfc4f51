//! Name resolution for outbound connections: where to connect for a foreign SIP domain, a
//! foreign XMPP domain, or a home node's component port.
//!
//! This module owns the lookup *policy* — static routes, the cluster address map, the order of
//! record types, SRV priority/weight ordering, negative caching bounds — on top of
//! hickory-resolver, which owns the wire protocol and the record cache. It returns an ordered
//! list of [`Target`]s; the caller connects to the first and fails over to the next. It must not
//! connect anywhere itself, and it never touches real DNS in tests (they run a loopback
//! dnsmasq).
//!
//! Caching: hickory's cache honours record TTLs, is bounded in entries (`cache_size`) and
//! caches negative answers (NXDOMAIN and "no records of this type") for the SOA minimum
//! (RFC 2308 §5) clamped to `[negative_ttl_min, negative_ttl_max]`; a negative answer without
//! SOA (dnsmasq, some appliances) is cached for `negative_ttl_min`. Trap: an answer with TTL 0
//! is never cached (RFC 1035 §3.2.1 says it must not be), so a domain published with TTL 0 is
//! asked again on every lookup — connection reuse keeps that rare; `positive_ttl_min` can
//! override it.
//!
//! The cluster address map (requirements §6, seed 001 "cluster address mapping") is consulted
//! before DNS for every A/AAAA lookup, including SRV targets and static routes; it lives in an
//! `ArcSwap` so a configuration reload replaces it whole, and never in hickory's `Hosts`.

mod order;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;

use crate::config::{Config, Domain, Host, HostPort};

pub use order::{order_srv, order_srv_by, usable_naptr, NaptrRecord, NaptrService, SrvRecord};

/// Default SIP-over-TLS port (RFC 3261 §19.1.2).
pub const SIPS_PORT: u16 = 5061;
/// Default XMPP server-to-server port (RFC 6120 §3.2.2).
pub const XMPP_S2S_PORT: u16 = 5269;

/// How to reach the DNS and how long to keep answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Explicit nameservers (UDP, then TCP on truncation); `None` reads the system
    /// configuration (`/etc/resolv.conf`).
    pub nameservers: Option<Vec<SocketAddr>>,
    /// Per-attempt timeout. A dead server costs `timeout × attempts` per record type.
    pub timeout: Duration,
    pub attempts: usize,
    /// Most cached answers (positive and negative together).
    pub cache_size: u64,
    /// Floor for cached positive answers; `None` keeps TTLs as published (TTL 0 not cached).
    pub positive_ttl_min: Option<Duration>,
    /// Ceiling for cached positive answers.
    pub positive_ttl_max: Duration,
    /// How long a negative answer without SOA is cached, and the floor for those with one.
    pub negative_ttl_min: Duration,
    /// Ceiling for negative caching (RFC 2308 §5 suggests 1–3 hours; we keep 5 min so a
    /// partner who fixes their DNS is found again quickly).
    pub negative_ttl_max: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            nameservers: None,
            timeout: Duration::from_secs(3),
            attempts: 2,
            cache_size: 4096,
            positive_ttl_min: None,
            positive_ttl_max: Duration::from_secs(86_400),
            negative_ttl_min: Duration::from_secs(30),
            negative_ttl_max: Duration::from_secs(300),
        }
    }
}

/// Transport of a target. For SIP: TLS or plain TCP. For XMPP s2s: `Tls` is direct TLS
/// (XEP-0368, `_xmpps-server`), `Tcp` a plain stream that negotiates STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tls,
    Tcp,
}

/// Which step produced a target, for logs and metrics (bounded labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetSource {
    StaticRoute,
    Srv,
    Naptr,
    /// The A/AAAA fallback on the default port.
    AddressFallback,
}

impl TargetSource {
    pub fn label(self) -> &'static str {
        match self {
            TargetSource::StaticRoute => "static_route",
            TargetSource::Srv => "srv",
            TargetSource::Naptr => "naptr",
            TargetSource::AddressFallback => "address_fallback",
        }
    }
}

/// One address to try. `host` is the name the address came from (SRV target, route host or
/// the domain itself), for logs; TLS verification uses the *domain*, not this host
/// (RFC 5922 §4, RFC 6120 §13.7.2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub addr: SocketAddr,
    pub transport: Transport,
    pub source: TargetSource,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}) {:?}", self.host, self.addr, self.transport)
    }
}

/// Resolution failures. `name` is the DNS name that was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("{name} does not exist (NXDOMAIN)")]
    NxDomain { name: String },
    #[error("{name} has no {rtype} records")]
    NoRecords { name: String, rtype: &'static str },
    /// RFC 2782: a single SRV record with target `.` means the service is decidedly not
    /// available at this domain.
    #[error("{name}: the service is explicitly not offered (SRV target `.`)")]
    ServiceNotOffered { name: String },
    #[error("{domain}: service records found, but none of their targets has an address")]
    NoAddresses { domain: String },
    #[error("DNS lookup of {name} timed out")]
    Timeout { name: String },
    #[error("DNS server answered {code} for {name}")]
    ServerFailure { name: String, code: String },
    #[error("DNS lookup of {name} failed: {message}")]
    Io { name: String, message: String },
    #[error("`{name}` is not a valid DNS name: {message}")]
    InvalidName { name: String, message: String },
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
}

impl DnsError {
    /// Bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DnsError::NxDomain { .. } => "nxdomain",
            DnsError::NoRecords { .. } => "no_records",
            DnsError::ServiceNotOffered { .. } => "service_not_offered",
            DnsError::NoAddresses { .. } => "no_addresses",
            DnsError::Timeout { .. } => "timeout",
            DnsError::ServerFailure { .. } => "server_failure",
            DnsError::Io { .. } => "io",
            DnsError::InvalidName { .. } => "invalid_name",
            DnsError::Setup(_) => "setup",
        }
    }

    /// "This name has nothing for us" (try the next step), as opposed to "DNS is broken"
    /// (stop: falling through would only add more timeouts).
    fn is_absent(&self) -> bool {
        matches!(self, DnsError::NxDomain { .. } | DnsError::NoRecords { .. })
    }

    fn from_net(name: &str, rtype: RecordType, e: NetError) -> Self {
        use hickory_resolver::net::DnsError as H;
        let name = name.to_string();
        match e {
            NetError::Dns(H::NoRecordsFound(nr)) if nr.response_code == ResponseCode::NXDomain => {
                DnsError::NxDomain { name }
            }
            NetError::Dns(H::NoRecordsFound(_)) => DnsError::NoRecords {
                name,
                rtype: rtype_label(rtype),
            },
            NetError::Dns(H::ResponseCode(code)) => DnsError::ServerFailure {
                name,
                code: code.to_string(),
            },
            NetError::Timeout => DnsError::Timeout { name },
            other => DnsError::Io {
                name,
                message: other.to_string(),
            },
        }
    }
}

fn rtype_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::NAPTR => "NAPTR",
        _ => "other",
    }
}

/// Lowercase, without trailing dot: the form names are compared and logged in.
fn plain(name: &Name) -> String {
    let s = name.to_ascii();
    s.strip_suffix('.').unwrap_or(&s).to_ascii_lowercase()
}

fn fqdn(name: &str) -> Result<Name, DnsError> {
    let with_dot = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    Name::from_ascii(&with_dot).map_err(|e| DnsError::InvalidName {
        name: name.to_string(),
        message: e.to_string(),
    })
}

type AddressMap = HashMap<String, Vec<IpAddr>>;

fn build_map(entries: &[(Domain, IpAddr)]) -> AddressMap {
    let mut map: AddressMap = HashMap::new();
    for (d, ip) in entries {
        let v = map.entry(d.as_str().to_string()).or_default();
        if !v.contains(ip) {
            v.push(*ip);
        }
    }
    map
}

/// The resolver both edges share. Cheap to clone (shared cache and address map).
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
    address_map: Arc<ArcSwap<AddressMap>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("address_map_entries", &self.address_map.load().len())
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Builds the resolver. Must be called inside a tokio runtime.
    pub fn new(settings: &DnsSettings, address_map: &[(Domain, IpAddr)]) -> Result<Self, DnsError> {
        let provider = TokioRuntimeProvider::default();
        let (mut builder, explicit) = match &settings.nameservers {
            Some(servers) => {
                let ns = servers
                    .iter()
                    .map(|sa| {
                        let mut udp = ConnectionConfig::udp();
                        udp.port = sa.port();
                        let mut tcp = ConnectionConfig::tcp();
                        tcp.port = sa.port();
                        NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
                    })
                    .collect();
                (
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(ns),
                        provider,
                    ),
                    true,
                )
            }
            None => (
                TokioResolver::builder(provider).map_err(|e| DnsError::Setup(e.to_string()))?,
                false,
            ),
        };
        let o: &mut ResolverOpts = builder.options_mut();
        o.timeout = settings.timeout;
        o.attempts = settings.attempts;
        o.cache_size = settings.cache_size;
        o.positive_min_ttl = settings.positive_ttl_min;
        o.positive_max_ttl = Some(settings.positive_ttl_max);
        o.negative_min_ttl = Some(settings.negative_ttl_min);
        o.negative_max_ttl = Some(settings.negative_ttl_max);
        // We always ask fully qualified names; search lists must not turn `partner.com` into
        // `partner.com.corp.local`.
        o.ndots = 0;
        if explicit {
            // Explicit servers mean "only these": /etc/hosts is not consulted either (the
            // address map is our hosts file).
            o.use_hosts_file = ResolveHosts::Never;
        }
        let inner = builder
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Self {
            inner,
            address_map: Arc::new(ArcSwap::from_pointee(build_map(address_map))),
        })
    }

    /// The configured `[dns] nameservers` (else the system resolver) plus the cluster address map.
    pub fn from_config(cfg: &Config) -> Result<Self, DnsError> {
        let settings = DnsSettings {
            nameservers: cfg.dns.nameservers.clone(),
            ..DnsSettings::default()
        };
        Self::new(&settings, &cfg.cluster.address_map)
    }

    /// Replaces the cluster address map whole (configuration reload).
    pub fn set_address_map(&self, entries: &[(Domain, IpAddr)]) {
        self.address_map.store(Arc::new(build_map(entries)));
    }

    /// Forgets every cached answer (admin "flush DNS"; tests).
    pub fn clear_cache(&self) {
        self.inner.clear_cache();
    }

    /// Addresses of `host`: the cluster address map first, then A/AAAA.
    pub async fn lookup_ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let key = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if let Ok(ip) = key
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![ip]);
        }
        if let Some(ips) = self.address_map.load().get(&key) {
            return Ok(ips.clone());
        }
        let name = fqdn(&key)?;
        let lookup = self
            .inner
            .lookup_ip(name)
            .await
            .map_err(|e| DnsError::from_net(&key, RecordType::A, e))?;
        let ips: Vec<IpAddr> = lookup.iter().collect();
        if ips.is_empty() {
            return Err(DnsError::NoRecords {
                name: key,
                rtype: "A",
            });
        }
        Ok(ips)
    }

    /// SRV records of `name`, in DNS order. A lone `.` target is `ServiceNotOffered`.
    pub async fn srv(&self, name: &str) -> Result<Vec<SrvRecord>, DnsError> {
        let lookup = self
            .inner
            .lookup(fqdn(name)?, RecordType::SRV)
            .await
            .map_err(|e| DnsError::from_net(name, RecordType::SRV, e))?;
        let mut records = Vec::new();
        let mut dot = false;
        for r in lookup.answers() {
            if let RData::SRV(s) = &r.data {
                if s.target.is_root() {
                    dot = true;
                    continue;
                }
                records.push(SrvRecord {
                    priority: s.priority,
                    weight: s.weight,
                    port: s.port,
                    target: plain(&s.target),
                });
            }
        }
        match (records.is_empty(), dot) {
            (true, true) => Err(DnsError::ServiceNotOffered {
                name: name.to_string(),
            }),
            (true, false) => Err(DnsError::NoRecords {
                name: name.to_string(),
                rtype: "SRV",
            }),
            _ => Ok(records),
        }
    }

    /// NAPTR records of `name`.
    pub async fn naptr(&self, name: &str) -> Result<Vec<NaptrRecord>, DnsError> {
        let lookup = self
            .inner
            .lookup(fqdn(name)?, RecordType::NAPTR)
            .await
            .map_err(|e| DnsError::from_net(name, RecordType::NAPTR, e))?;
        let records: Vec<NaptrRecord> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::NAPTR(n) => Some(NaptrRecord {
                    order: n.order,
                    preference: n.preference,
                    flags: String::from_utf8_lossy(&n.flags).into_owned(),
                    service: String::from_utf8_lossy(&n.services).into_owned(),
                    replacement: plain(&n.replacement),
                }),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Err(DnsError::NoRecords {
                name: name.to_string(),
                rtype: "NAPTR",
            });
        }
        Ok(records)
    }

    /// Orders SRV records (RFC 2782) and resolves each target, in order, to its addresses.
    /// A target without addresses is skipped (logged): the next one is the failover.
    async fn srv_targets(
        &self,
        domain: &str,
        records: Vec<(SrvRecord, Transport)>,
        source: TargetSource,
    ) -> Result<Vec<Target>, DnsError> {
        let ordered = order_srv_by(records, |(r, _)| r, &mut rand::rng());
        let mut out = Vec::new();
        let mut last_err = None;
        for (r, transport) in ordered {
            match self.lookup_ips(&r.target).await {
                Ok(ips) => out.extend(ips.into_iter().map(|ip| Target {
                    host: r.target.clone(),
                    addr: SocketAddr::new(ip, r.port),
                    transport,
                    source,
                })),
                Err(e) => {
                    tracing::debug!(domain, target = %r.target, error = %e, "SRV target has no address");
                    if !e.is_absent() {
                        last_err = Some(e);
                    }
                }
            }
        }
        if out.is_empty() {
            return Err(last_err.unwrap_or(DnsError::NoAddresses {
                domain: domain.to_string(),
            }));
        }
        Ok(out)
    }

    async fn address_fallback(
        &self,
        host: &str,
        port: u16,
        transport: Transport,
        source: TargetSource,
    ) -> Result<Vec<Target>, DnsError> {
        Ok(self
            .lookup_ips(host)
            .await?
            .into_iter()
            .map(|ip| Target {
                host: host.to_string(),
                addr: SocketAddr::new(ip, port),
                transport,
                source,
            })
            .collect())
    }

    /// Where to send SIP for a federated domain (requirements §1, issue 6 item 8), best first:
    /// 1. the static route, if configured (TLS; its host resolved via the address map / DNS);
    /// 2. `_sipfederationtls._tcp.<domain>` SRV (Microsoft federation, TLS);
    /// 3. RFC 3263 §4.1: NAPTR `SIPS+D2T` / `SIP+D2T` → their SRV names; without NAPTR,
    ///    `_sips._tcp` (TLS) then `_sip._tcp` (TCP) SRV;
    /// 4. RFC 3263 §4.2: A/AAAA of the domain on port 5061, TLS.
    ///
    /// A step that finds nothing (NXDOMAIN, no records, SRV targets without addresses) falls
    /// through to the next; a timeout or server failure stops the search (the next steps would
    /// time out the same way). A `.` SRV target (RFC 2782 "decidedly not available") on
    /// `_sipfederationtls` ends the search with `ServiceNotOffered`; on an RFC 3263 SRV name it
    /// skips that transport, and if nothing else is found, also ends with `ServiceNotOffered`
    /// instead of guessing an address.
    pub async fn sip_targets(
        &self,
        domain: &Domain,
        static_route: Option<&HostPort>,
    ) -> Result<Vec<Target>, DnsError> {
        if let Some(route) = static_route {
            return match &route.host {
                Host::Ip(ip) => Ok(vec![Target {
                    host: ip.to_string(),
                    addr: SocketAddr::new(*ip, route.port),
                    transport: Transport::Tls,
                    source: TargetSource::StaticRoute,
                }]),
                Host::Name(h) => {
                    self.address_fallback(
                        h.as_str(),
                        route.port,
                        Transport::Tls,
                        TargetSource::StaticRoute,
                    )
                    .await
                }
            };
        }
        let d = domain.as_str();
        // "Nothing here" moves on to the next step; a `.` SRV target skips that service and is
        // remembered; anything else (timeout, server failure) ends the search.
        let mut not_offered: Option<DnsError> = None;
        let mut note = |e: DnsError| -> Result<(), DnsError> {
            match e {
                DnsError::ServiceNotOffered { .. } => {
                    not_offered.get_or_insert(e);
                    Ok(())
                }
                e if e.is_absent() => Ok(()),
                e => Err(e),
            }
        };

        // A `.` here is Microsoft's "this domain does not federate": final.
        let fed = format!("_sipfederationtls._tcp.{d}");
        match self.srv(&fed).await {
            Ok(recs) => {
                let recs = recs.into_iter().map(|r| (r, Transport::Tls)).collect();
                return self.srv_targets(d, recs, TargetSource::Srv).await;
            }
            Err(e @ DnsError::ServiceNotOffered { .. }) => return Err(e),
            Err(e) => note(e)?,
        }

        match self.naptr(d).await {
            Ok(recs) => {
                let mut out = Vec::new();
                for (svc, srv_name) in usable_naptr(recs) {
                    let transport = match svc {
                        NaptrService::SipsD2t => Transport::Tls,
                        NaptrService::SipD2t => Transport::Tcp,
                    };
                    match self.srv(&srv_name).await {
                        Ok(recs) => {
                            let recs = recs.into_iter().map(|r| (r, transport)).collect();
                            match self.srv_targets(d, recs, TargetSource::Naptr).await {
                                Ok(t) => out.extend(t),
                                Err(e) => note(e)?,
                            }
                        }
                        Err(e) => note(e)?,
                    }
                }
                if !out.is_empty() {
                    return Ok(dedup(out));
                }
            }
            Err(e) => note(e)?,
        }

        let mut out = Vec::new();
        for (prefix, transport) in [
            ("_sips._tcp", Transport::Tls),
            ("_sip._tcp", Transport::Tcp),
        ] {
            match self.srv(&format!("{prefix}.{d}")).await {
                Ok(recs) => {
                    let recs = recs.into_iter().map(|r| (r, transport)).collect();
                    match self.srv_targets(d, recs, TargetSource::Srv).await {
                        Ok(t) => out.extend(t),
                        Err(e) => note(e)?,
                    }
                }
                Err(e) => note(e)?,
            }
        }
        if !out.is_empty() {
            return Ok(dedup(out));
        }
        // The domain said "not offered" for the services we looked up: no address guess.
        if let Some(e) = not_offered {
            return Err(e);
        }

        self.address_fallback(d, SIPS_PORT, Transport::Tls, TargetSource::AddressFallback)
            .await
    }

    /// Where to open XMPP s2s toward `domain` (RFC 6120 §3.2, XEP-0368): `_xmpps-server._tcp`
    /// (direct TLS) and `_xmpp-server._tcp` (STARTTLS) SRV records merged into one set and
    /// ordered by priority and weight; without either, A/AAAA on 5269. A `.` target on
    /// `_xmpp-server` (and no usable direct-TLS record) means the domain offers no s2s:
    /// `ServiceNotOffered`, and no address fallback (RFC 6120 §3.2.1 step 3).
    pub async fn xmpp_s2s_targets(&self, domain: &Domain) -> Result<Vec<Target>, DnsError> {
        let d = domain.as_str();
        let direct = self.srv(&format!("_xmpps-server._tcp.{d}")).await;
        let starttls = self.srv(&format!("_xmpp-server._tcp.{d}")).await;
        let mut merged = Vec::new();
        let mut not_offered = None;
        for (res, transport) in [(direct, Transport::Tls), (starttls, Transport::Tcp)] {
            match res {
                Ok(recs) => merged.extend(recs.into_iter().map(|r| (r, transport))),
                Err(e @ DnsError::ServiceNotOffered { .. }) => {
                    if transport == Transport::Tcp {
                        not_offered = Some(e);
                    }
                }
                Err(e) if e.is_absent() => {}
                Err(e) => return Err(e),
            }
        }
        if !merged.is_empty() {
            return self.srv_targets(d, merged, TargetSource::Srv).await;
        }
        if let Some(e) = not_offered {
            return Err(e);
        }
        self.address_fallback(
            d,
            XMPP_S2S_PORT,
            Transport::Tcp,
            TargetSource::AddressFallback,
        )
        .await
    }

    /// A home node's XEP-0114 component endpoints: `_xmpp-component._tcp.<domain>` SRV
    /// (seed 003: components fail over between nodes), ordered by priority/weight. No address
    /// fallback: the component port has no well-known number.
    pub async fn component_targets(&self, domain: &Domain) -> Result<Vec<Target>, DnsError> {
        let d = domain.as_str();
        let recs = self.srv(&format!("_xmpp-component._tcp.{d}")).await?;
        let recs = recs.into_iter().map(|r| (r, Transport::Tcp)).collect();
        self.srv_targets(d, recs, TargetSource::Srv).await
    }

    /// Resolves a configured `host:port` (home node address, peer address) through the address
    /// map and DNS.
    pub async fn host_port_targets(
        &self,
        hp: &HostPort,
        transport: Transport,
    ) -> Result<Vec<Target>, DnsError> {
        match &hp.host {
            Host::Ip(ip) => Ok(vec![Target {
                host: ip.to_string(),
                addr: SocketAddr::new(*ip, hp.port),
                transport,
                source: TargetSource::StaticRoute,
            }]),
            Host::Name(h) => {
                self.address_fallback(h.as_str(), hp.port, transport, TargetSource::StaticRoute)
                    .await
            }
        }
    }
}

/// Drops repeated (address, transport) pairs, keeping the first (best) occurrence: two SRV
/// names often point at the same edge.
fn dedup(targets: Vec<Target>) -> Vec<Target> {
    let mut seen = std::collections::HashSet::new();
    targets
        .into_iter()
        .filter(|t| seen.insert((t.addr, t.transport)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_fully_qualified_once() {
        assert_eq!(
            fqdn("_sip._tcp.example.com").map(|n| n.to_ascii()),
            Ok("_sip._tcp.example.com.".to_string())
        );
        assert_eq!(
            fqdn("example.com.").map(|n| n.to_ascii()),
            Ok("example.com.".to_string())
        );
        assert!(fqdn("a..b").is_err());
    }

    #[test]
    fn labels_are_bounded() {
        let e = DnsError::Timeout { name: "x".into() };
        assert_eq!(e.label(), "timeout");
        assert!(!e.is_absent());
        assert!(DnsError::NxDomain { name: "x".into() }.is_absent());
        assert_eq!(TargetSource::AddressFallback.label(), "address_fallback");
    }

    #[test]
    fn address_map_merges_duplicates() {
        let d = Domain::parse("peer.example.com").ok();
        let Some(d) = d else { return };
        let ip: IpAddr = [10, 0, 0, 1].into();
        let ip2: IpAddr = [10, 0, 0, 2].into();
        let m = build_map(&[(d.clone(), ip), (d.clone(), ip), (d, ip2)]);
        assert_eq!(m.get("peer.example.com"), Some(&vec![ip, ip2]));
    }

    #[test]
    fn dedup_keeps_first() {
        let t = |port, transport| Target {
            host: "h".into(),
            addr: SocketAddr::new([127, 0, 0, 1].into(), port),
            transport,
            source: TargetSource::Srv,
        };
        let out = dedup(vec![
            t(1, Transport::Tls),
            t(1, Transport::Tls),
            t(1, Transport::Tcp),
        ]);
        assert_eq!(out.len(), 2);
    }
}
