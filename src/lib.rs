//! Legate: a SIP/XMPP federation gateway.
//!
//! Layout (one module per layer; codecs and protocol machines are sans-IO):
//! - `diag`: `file:line:col` diagnostics for admin-edited files.
//! - `config`: the node's TOML configuration: schema, defaults, validation.
//! - `presence`: wire facts, codecs (XMPP presence, PIDF/RPID, msrtc) and the mapping tables.
//! - `gateway`: the interworking core: envelopes, routing and federation policy, the hub.
//! - `sip`: SIP codec, validation, framing, transactions, and the federation edge (Lync/S4B).
//! - `xmpp`: XMPP stream framing, s2s and XEP-0114 component links.
//! - `store`: the state store trait (get/list/put/delete/CAS/watch) and its embedded journal.
//! - `tls`, `dns`: certificates (SNI, mutual TLS, RFC 6125) and target resolution (SRV, RFC
//!   3263, cluster address map).
//! - `net`: the edge kit shared by the edges: admission, accept loop, backoff, bounded writes,
//!   log-safe peer text.
//! - `metrics`, `admin`: the Prometheus registry, the admin endpoint (axum).
//! - `node`: the composition root of `legate run` (everything built once before any port is
//!   bound, then the edges), reload (SIGHUP, `legate reload`) and drain (`legate drain`, SIGTERM).
//! - `cluster`: a cluster of nodes on etcd (membership, leader election, the node's stores).
//! - `intercluster`: peering of clusters of one domain (issue 13): the link, the user sync
//!   agent on the leader, the index of which peer cluster each of their users lives in.
//! - `ops`: named alarms (home-node links, certificates, mapping reloads, partners), the
//!   certificate checks behind them and `legate check`, systemd readiness.
//! - `doctor`: `legate doctor DOMAIN`, the federation self-test (policy, DNS, TCP, TLS, SIP
//!   OPTIONS / s2s stream), each step a verdict and a fix.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cluster;
pub mod config;
pub mod diag;
pub mod dns;
pub mod doctor;
pub mod gateway;
pub mod intercluster;
pub mod metrics;
pub mod net;
pub mod node;
pub mod ops;
pub mod presence;
pub mod sip;
pub mod store;
pub mod tls;
pub mod xmpp;
