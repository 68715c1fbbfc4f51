//! Free-port helper for harnesses that start real servers (Prosody, dnsmasq, legate) on loopback.
//!
//! Ports are drawn at random from 20000..32000, below Linux's ephemeral range (32768..60999), so an
//! outgoing connection cannot grab a port between our probe and the server's bind. A port is
//! handed out only if both TCP and UDP can bind it on the given address right now, and never twice
//! in one test process. There is still a small window between the probe and the server's bind in
//! which another process could take it; harnesses retry start-up once on "address in use".

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Mutex, OnceLock};

const LOW: u16 = 20000;
const HIGH: u16 = 32000;

fn handed_out() -> &'static Mutex<HashSet<(IpAddr, u16)>> {
    static SET: OnceLock<Mutex<HashSet<(IpAddr, u16)>>> = OnceLock::new();
    SET.get_or_init(|| Mutex::new(HashSet::new()))
}

fn random_u64() -> u64 {
    // RandomState is seeded per process from the OS; mixing in a counter gives a fresh value per call.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

/// True if `ip:port` is bindable for both TCP and UDP right now.
pub fn is_free(ip: IpAddr, port: u16) -> bool {
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok()
}

/// A port free for TCP and UDP on `ip`, not handed out before in this process.
///
/// Panics after 1000 attempts (the range would have to be nearly full).
pub fn free_port(ip: IpAddr) -> u16 {
    let mut taken = handed_out().lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = LOW + (random_u64() % u64::from(HIGH - LOW)) as u16;
        if taken.contains(&(ip, port)) {
            continue;
        }
        if is_free(ip, port) {
            taken.insert((ip, port));
            return port;
        }
    }
    panic!("no free port found on {ip} in {LOW}..{HIGH} after 1000 attempts");
}

/// A free port on 127.0.0.1.
pub fn free_local_port() -> u16 {
    free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// The same free port on 127.0.0.1 for the same `name` within this test process: the
/// clustering ports of a test cluster's peers, which every node's configuration lists alike.
pub fn named_port(name: &str) -> u16 {
    static NAMED: OnceLock<Mutex<std::collections::HashMap<String, u16>>> = OnceLock::new();
    let mut map = NAMED
        .get_or_init(|| Mutex::new(std::collections::HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = map.get(name) {
        return *p;
    }
    let p = free_local_port();
    map.insert(name.to_string(), p);
    p
}

/// `[[cluster.peers]]` entries for `peers` of test cluster `cluster`, each on 127.0.0.1 and
/// its own [`named_port`] (the same in every node's configuration).
pub fn cluster_peers_toml(cluster: &str, peers: &[&str]) -> String {
    peers
        .iter()
        .map(|p| {
            format!(
                "[[cluster.peers]]\nname = \"{p}\"\naddress = \"127.0.0.1:{}\"\n",
                named_port(&format!("{cluster}/{p}"))
            )
        })
        .collect()
}
