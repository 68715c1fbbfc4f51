//! Value types of the configuration: the newtypes (`Domain`, `NodeId`, `HostPort`, `LocalUser`,
//! `Secret`) and the small closed enums that admins choose from. Each newtype can only be built
//! through its checking constructor, so code holding one knows the value is normalised; the
//! constructors return a reason string (not a position) because the caller — the validator —
//! owns the file position. This module does no I/O and knows nothing of TOML.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::Deserialize;

/// A DNS domain name, normalised: ASCII lowercase, trailing dot removed, hostname syntax checked.
///
/// Equality is exact on the normalised form. There is deliberately no "is subdomain of" helper:
/// `imp.example.com` and `example.com` are different domains for federation and routing
/// (requirements §5), and suffix matching is how one domain ends up speaking for another.
///
/// Shared (`Arc<str>`): a clone costs no allocation, and the tables of a million foreign
/// watchers hold their domains as references to a few strings (issue 11 item 10).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Domain(std::sync::Arc<str>);

impl Domain {
    /// Checks and normalises `raw`. Non-ASCII names must be given in their punycode (`xn--`) form,
    /// because that is what appears on the wire and in certificates.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let trimmed = raw.strip_suffix('.').unwrap_or(raw);
        if trimmed.is_empty() {
            return Err("domain name is empty".into());
        }
        if !trimmed.is_ascii() {
            return Err(format!(
                "domain `{raw}` is not ASCII; write internationalised names in punycode (xn--...)"
            ));
        }
        let name = trimmed;
        if name.len() > 253 {
            return Err(format!(
                "domain `{raw}` is {} characters long; at most 253 are allowed",
                name.len()
            ));
        }
        // Split on bytes: the name is ASCII here, and a `char` pattern costs far more per call
        // (a domain is parsed several times per routed message).
        for label in name.as_bytes().split(|&b| b == b'.') {
            if label.is_empty() {
                return Err(format!("domain `{raw}` has an empty label (`..`)"));
            }
            if label.len() > 63 {
                return Err(format!(
                    "domain `{raw}` has a label longer than 63 characters"
                ));
            }
            if !label
                .iter()
                .all(|&b| b.is_ascii_alphabetic() || b.is_ascii_digit() || b == b'-')
            {
                return Err(format!(
                    "domain `{raw}` contains a character other than letters, digits, `-` and `.`"
                ));
            }
            if label.starts_with(b"-") || label.ends_with(b"-") {
                return Err(format!(
                    "domain `{raw}` has a label that starts or ends with `-`"
                ));
            }
        }
        // An all-digit last label means an IP address (or a typo of one), never a domain.
        if name
            .as_bytes()
            .rsplit(|&b| b == b'.')
            .next()
            .is_some_and(|tld| tld.iter().all(u8::is_ascii_digit))
        {
            return Err(format!(
                "`{raw}` looks like an IP address; a domain name is expected here"
            ));
        }
        // Lowercased only when it has to be: one allocation, not two.
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Ok(Self(name.to_ascii_lowercase().into()))
        } else {
            Ok(Self(name.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Domain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

/// The identity of one gateway node inside its cluster: 1–63 characters of lowercase letters,
/// digits, `-`, `_` and `.`, so it is safe in metric labels, file names and log lines.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 63 {
            return Err(format!("node id `{raw}` must be 1 to 63 characters long"));
        }
        if !raw.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        }) {
            return Err(format!(
                "node id `{raw}` may contain only lowercase letters, digits, `-`, `_` and `.`"
            ));
        }
        Ok(Self(raw.to_string()))
    }

    /// The default id of a node that does not set one (a single node needs no name).
    pub fn local() -> Self {
        Self("local".to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The host part of a `HostPort`: an IP address literal or a domain name to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(Domain),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(d) => write!(f, "{d}"),
        }
    }
}

/// A `host:port` destination (IPv6 literals in brackets: `[2001:db8::1]:5269`). The port is
/// mandatory: a static route or peer address with an implied port is a classic source of
/// "works in the lab" failures.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: Host,
    pub port: u16,
}

impl HostPort {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Ok(sa) = raw.parse::<SocketAddr>() {
            return Self::port_ok(raw, Host::Ip(sa.ip()), sa.port());
        }
        let Some((host, port)) = raw.rsplit_once(':') else {
            return Err(format!("`{raw}` is not `host:port` (the port is required)"));
        };
        if host.contains(':') || host.starts_with('[') {
            return Err(format!(
                "`{raw}` is not `host:port`; write IPv6 addresses in brackets: `[2001:db8::1]:5269`"
            ));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{raw}`: port `{port}` is not a number from 1 to 65535"))?;
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(Domain::parse(host).map_err(|e| format!("`{raw}`: {e}"))?),
        };
        Self::port_ok(raw, host, port)
    }

    fn port_ok(raw: &str, host: Host, port: u16) -> Result<Self, String> {
        if port == 0 {
            return Err(format!(
                "`{raw}`: port 0 is not a destination; use 1 to 65535"
            ));
        }
        Ok(Self { host, port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A local user hosted on a home node, written `user@domain` in the file. The localpart is
/// lowercased (XMPP nodeprep folds case); the domain must be one of our local domains.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalUser {
    pub localpart: String,
    pub domain: Domain,
}

impl LocalUser {
    /// Parses `user@domain`; the caller checks that the domain is local.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let Some((local, domain)) = raw.split_once('@') else {
            return Err(format!("user `{raw}` must be a bare JID `user@domain`"));
        };
        if domain.contains('/') {
            return Err(format!(
                "user `{raw}` has a resource (`/...`); give the bare JID `user@domain`"
            ));
        }
        if local.is_empty() || local.len() > 1023 {
            return Err(format!("user `{raw}` has an empty or over-long localpart"));
        }
        // RFC 7622 §3.3.1: these characters are never allowed in a localpart.
        if local
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"&'/:<>@".contains(c))
        {
            return Err(format!(
                "user `{raw}`: the localpart contains a character JIDs forbid"
            ));
        }
        let domain = Domain::parse(domain).map_err(|e| format!("user `{raw}`: {e}"))?;
        Ok(Self {
            localpart: local.to_lowercase(),
            domain,
        })
    }
}

impl fmt::Display for LocalUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.localpart, self.domain)
    }
}

/// A shared secret given inline or as a file to read at start. `Debug` never prints the value,
/// so a config dumped into a log does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Inline(String),
    File(std::path::PathBuf),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Inline(_) => f.write_str("Secret::Inline(<redacted>)"),
            Secret::File(p) => f.debug_tuple("Secret::File").field(p).finish(),
        }
    }
}

/// What a mapping system (availability table column) is used for; decides where its name may
/// appear in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemKind {
    /// A foreign SIP system (`ocs`, `lync`): valid in `[[sip.federated_domain]]`.
    SipFederation,
    /// A foreign XMPP system (`fed-xmpp`, `fed-jabber8`, `webex`, `sametime`): valid in
    /// `[[xmpp.federation.domain]]`.
    XmppFederation,
    /// A client on our own IM service (`xmpp`, `jabber8`): valid as a home node's
    /// `default_system`.
    Local,
}

impl SystemKind {
    pub fn describe(self) -> &'static str {
        match self {
            SystemKind::SipFederation => "a foreign SIP system",
            SystemKind::XmppFederation => "a foreign XMPP system",
            SystemKind::Local => "a local (home-node) system",
        }
    }
}

/// The mapping systems of the default availability tables (spec `availability-tables.md`).
/// Callers that load extra mapping files pass their own list to `from_toml`.
pub const BUILTIN_SYSTEMS: &[(&str, SystemKind)] = &[
    ("ocs", SystemKind::SipFederation),
    ("lync", SystemKind::SipFederation),
    ("xmpp", SystemKind::Local),
    ("jabber8", SystemKind::Local),
    ("fed-jabber8", SystemKind::XmppFederation),
    ("fed-xmpp", SystemKind::XmppFederation),
    ("webex", SystemKind::XmppFederation),
    ("sametime", SystemKind::XmppFederation),
];

/// Presence body format sent to a SIP federated domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceFormat {
    /// RFC 3863 PIDF (+RPID).
    Pidf,
    /// Microsoft msrtc presence categories.
    Msrtc,
    /// Follow the `Accept` / `Event` of the peer's SUBSCRIBE.
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// XMPP federation admin policy (requirements §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FederationMode {
    /// Closed federation: only listed domains (without `deny = true`) may federate.
    AllowList,
    /// Open federation: every domain may federate except those listed with `deny = true`.
    DenyList,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsPolicy {
    /// STARTTLS must succeed before any stanza; no plaintext fallback.
    Required,
    /// Offer STARTTLS; accept a plaintext stream if the peer cannot do TLS.
    Optional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum S2sAuth {
    ExternalOrDialback,
    ExternalOnly,
    DialbackOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerTlsVerify {
    /// Encrypted, certificates not verified (seed default, for forming a cluster by IP).
    Permissive,
    /// Certificate must chain to the trust bundle and its SAN match the peer address.
    Enforce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    Memory,
    Etcd,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_normalises_case_and_trailing_dot() {
        assert_eq!(
            Domain::parse("Example.COM.").map(|d| d.to_string()),
            Ok("example.com".to_string())
        );
    }

    #[test]
    fn domain_equality_is_exact_not_suffix() {
        let a = Domain::parse("imp.example.com");
        let b = Domain::parse("example.com");
        assert!(a.is_ok() && b.is_ok());
        assert_ne!(a, b);
    }

    #[test]
    fn domain_rejects_bad_syntax() {
        for bad in [
            "",
            ".",
            "a..b",
            "-a.com",
            "a-.com",
            "a_b.com",
            "exämple.com",
            "10.0.0.1",
            "a b.com",
        ] {
            assert!(Domain::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Domain::parse(&format!("{}.com", "a".repeat(64))).is_err());
        assert!(Domain::parse("localhost").is_ok());
        assert!(Domain::parse("xn--bcher-kva.example").is_ok());
    }

    #[test]
    fn host_port_forms() {
        assert!(HostPort::parse("sip.partner.com:5061").is_ok());
        assert!(HostPort::parse("10.0.0.1:5269").is_ok());
        assert!(HostPort::parse("[2001:db8::1]:5269").is_ok());
        assert!(HostPort::parse("2001:db8::1:5269").is_err());
        assert!(HostPort::parse("sip.partner.com").is_err());
        assert!(HostPort::parse("sip.partner.com:0").is_err());
        assert!(HostPort::parse("sip.partner.com:99999").is_err());
        assert_eq!(
            HostPort::parse("[2001:db8::1]:5269").map(|h| h.to_string()),
            Ok("[2001:db8::1]:5269".to_string())
        );
    }

    #[test]
    fn node_id_and_users() {
        assert!(NodeId::parse("gw-1.dc2").is_ok());
        assert!(NodeId::parse("GW1").is_err());
        assert!(NodeId::parse("").is_err());
        let u = LocalUser::parse("Alice@Example.com");
        assert_eq!(
            u.map(|u| u.to_string()),
            Ok("alice@example.com".to_string())
        );
        assert!(LocalUser::parse("alice").is_err());
        assert!(LocalUser::parse("alice@example.com/phone").is_err());
        assert!(LocalUser::parse("a:b@example.com").is_err());
    }

    proptest::proptest! {
        /// Normalisation is idempotent and case/trailing-dot variants of a name are one domain.
        #[test]
        fn domain_normalisation_is_stable(raw in "[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?(\\.[a-zA-Z]{1,8}){1,3}\\.?") {
            if let Ok(d) = Domain::parse(&raw) {
                proptest::prop_assert_eq!(Domain::parse(d.as_str()), Ok(d.clone()));
                proptest::prop_assert_eq!(Domain::parse(&raw.to_uppercase()), Ok(d.clone()));
                let dotted = format!("{}.", d.as_str());
                proptest::prop_assert_eq!(Domain::parse(&dotted), Ok(d));
            }
        }
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::Inline("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
