//! The one integration test binary (hickory-dns arranges its tests the same way): every area is
//! a module here, so the crate and the shared harness in `common` are compiled and linked once.
//!
//! All modules share one process, hence one Prometheus registry: a test that asserts a counter
//! measures the change it caused while holding that metric family's lock (`common::metrics`),
//! or scrapes the `/metrics` of the `legate` process it started (`common::legate`).

mod common;
mod sip_ua;

mod admin_check_certs;
mod admin_http;
mod admin_page;
mod aggregation;
mod certs_dev;
mod cli_check;
mod cli_sip_check;
#[cfg(feature = "cluster")]
mod cluster;
#[cfg(feature = "cluster")]
mod cluster_config;
#[cfg(feature = "cluster")]
mod cluster_links;
#[cfg(feature = "cluster")]
mod cluster_store;
mod component_link;
mod config;
mod consent;
mod dns;
mod doctor;
mod drain;
mod gateway_safety;
mod golden_tables;
mod group_chat;
mod harness_prosody;
#[cfg(feature = "cluster")]
mod intercluster;
#[cfg(feature = "cluster")]
mod intercluster_cluster;
mod interworking;
mod lync_batched;
mod mapping_properties;
mod mapping_reload;
mod mappings_check;
mod open_federation;
mod ops_alarms;
mod presence_codecs;
mod reload;
mod restart;
mod rfc7247;
mod s2s;
mod sip_edge;
mod sip_edge_tls;
mod sip_lync;
mod sip_run;
mod sip_vectors;
mod tls;
mod xmpp_federation;
mod xmpp_stream;
