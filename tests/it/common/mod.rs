//! Shared test support for the modules of the one integration test binary.
#![allow(dead_code)]

pub mod certs;
pub mod dnsmasq;
pub mod legate;
pub mod ports;
pub mod prosody;
pub mod xmpp_client;
pub mod metrics;

use std::path::PathBuf;

/// The path of `program` (an absolute path, or a name looked up on `PATH`). A missing program
/// fails the test and names the Debian package that provides it: a test never skips because a
/// tool is missing, or a machine without it would pass what it never ran.
pub fn require_program(program: &str, package: &str) -> PathBuf {
    let found = if program.contains('/') {
        Some(PathBuf::from(program)).filter(|p| p.is_file())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
    };
    found.unwrap_or_else(|| {
        panic!(
            "`{program}` is not installed: this test needs it; install the Debian package \
             `{package}` (apt-get install {package}; .ci/run does)"
        )
    })
}

