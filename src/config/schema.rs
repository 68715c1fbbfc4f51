//! The file as written: serde structs that mirror the TOML layout one to one, with every value an
//! admin might get wrong kept as `toml::Spanned` so the validator can point at it. Nothing here
//! is interpreted: strings stay strings and omitted keys stay `None`, so that *all* bad domains,
//! addresses and ranges are reported together by `validate` rather than serde stopping at the
//! first. Only closed enums are decoded here (serde then reports an unknown variant with its
//! position and the list of allowed values). Defaults live in `validate`, in one place.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::types::{
    FederationMode, PeerTlsVerify, PresenceFormat, S2sAuth, StoreKind, TlsPolicy, TlsVersion,
};

pub(crate) type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub routing_node: Option<S<String>>,
    pub node: Option<RawNode>,
    #[serde(default)]
    pub local_domain: Vec<RawLocalDomain>,
    pub listeners: Option<RawListeners>,
    pub tls: Option<RawTls>,
    pub sip: Option<RawSip>,
    pub xmpp: Option<RawXmpp>,
    #[serde(default)]
    pub home_node: Vec<RawHomeNode>,
    #[serde(default)]
    pub chat_node: Vec<RawChatNode>,
    pub limits: Option<RawLimits>,
    pub cluster: Option<RawCluster>,
    pub intercluster: Option<RawIntercluster>,
    pub mappings: Option<RawMappings>,
    pub dns: Option<RawDns>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    #[serde(default)]
    pub nameservers: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub id: Option<S<String>>,
    pub data_dir: Option<S<String>>,
    pub admin_listen: Option<S<String>>,
    pub admin_allow_remote: Option<S<bool>>,
    pub admin_token_file: Option<S<String>>,
    pub sip_host: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLocalDomain {
    pub name: S<String>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    pub mesh_component: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListeners {
    pub sip_tls: Option<S<String>>,
    pub sip_tcp: Option<S<String>>,
    pub xmpp_s2s: Option<S<String>>,
    pub xmpp_s2s_direct_tls: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub trust_bundle: Option<S<String>>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    pub min_version: Option<TlsVersion>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSip {
    #[serde(default)]
    pub federated_domain: Vec<RawSipDomain>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSipDomain {
    pub name: S<String>,
    pub system: Option<S<String>>,
    pub route: Option<S<String>>,
    pub tolerate_no_client_auth_eku: Option<bool>,
    pub presence_format: Option<PresenceFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawXmpp {
    pub federation: Option<RawXmppFederation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawXmppFederation {
    pub mode: Option<FederationMode>,
    pub dialback_secret: Option<S<String>>,
    pub dialback_allow_private_targets: Option<bool>,
    #[serde(default)]
    pub domain: Vec<RawXmppDomain>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawXmppDomain {
    pub name: S<String>,
    pub system: Option<S<String>>,
    pub tls: Option<S<TlsPolicy>>,
    pub auth: Option<S<S2sAuth>>,
    pub deny: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHomeNode {
    pub name: S<String>,
    pub addresses: Option<S<Vec<S<String>>>>,
    pub srv: Option<S<bool>>,
    pub component_secret: Option<S<String>>,
    pub component_secret_file: Option<S<String>>,
    pub users: Option<Vec<S<String>>>,
    pub default_system: Option<S<String>>,
    pub connect_from_every_node: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawChatNode {
    pub alias: S<String>,
    pub home_node: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub sip_max_message_bytes: Option<S<i64>>,
    pub sip_max_header_bytes: Option<S<i64>>,
    pub xmpp_max_stanza_bytes: Option<S<i64>>,
    pub max_connections_per_listener: Option<S<i64>>,
    pub max_connections_per_peer: Option<S<i64>>,
    pub handshake_timeout_secs: Option<S<i64>>,
    pub idle_timeout_secs: Option<S<i64>>,
    pub im_session_idle_secs: Option<S<i64>>,
    pub max_subscriptions_per_user: Option<S<i64>>,
    pub outbound_queue_per_domain: Option<S<i64>>,
    pub delivery_timeout_secs: Option<S<i64>>,
    pub stanza_timeout_secs: Option<S<i64>>,
    pub dialback_pending_per_domain: Option<S<i64>>,
    pub dialback_verify_connections: Option<S<i64>>,
    pub sip_message_timeout_secs: Option<S<i64>>,
    pub first_request_timeout_secs: Option<S<i64>>,
    pub sip_transactions_per_domain: Option<S<i64>>,
    pub foreign_watchers_per_domain: Option<S<i64>>,
    pub im_sessions_per_domain: Option<S<i64>>,
    pub sip_dial_backoff_max_secs: Option<S<i64>>,
    pub open_federation_domains: Option<S<i64>>,
    pub home_link_alarm_grace_secs: Option<S<i64>>,
    pub drain_grace_secs: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub name: Option<S<String>>,
    pub primary: Option<S<String>>,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    pub tls_verify: Option<PeerTlsVerify>,
    #[serde(default)]
    pub address_map: BTreeMap<S<String>, S<String>>,
    pub store: Option<S<StoreKind>>,
    pub etcd_endpoints: Option<S<Vec<S<String>>>>,
    pub lease_ttl_secs: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeer {
    pub name: S<String>,
    pub address: S<String>,
    pub federation: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIntercluster {
    pub name: Option<S<String>>,
    pub listen: Option<S<String>>,
    pub transport: Option<S<String>>,
    pub sync_interval_mins: Option<S<i64>>,
    pub stuck_after_secs: Option<S<i64>>,
    pub auto_recovery: Option<bool>,
    #[serde(default)]
    pub peer: Vec<RawClusterPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClusterPeer {
    pub name: S<String>,
    pub address: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMappings {
    pub dir: Option<S<String>>,
    pub reload: Option<bool>,
}
