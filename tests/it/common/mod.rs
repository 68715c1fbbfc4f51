//! Shared test support. Each test module uses a subset.
#![allow(dead_code)]

pub mod certs;
pub mod dnsmasq;
#[cfg(feature = "cluster")]
pub mod etcd;
pub mod legate;
pub mod metrics;
pub mod ports;
pub mod programs;
pub mod prosody;
pub mod rig;
pub mod s2s_rig;
pub mod sipp;
pub mod xmpp_client;
