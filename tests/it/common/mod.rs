//! Shared test support. Each test binary uses a subset.
#![allow(dead_code)]

pub mod certs;
pub mod dnsmasq;
pub mod ports;
pub mod prosody;
pub mod xmpp_client;
