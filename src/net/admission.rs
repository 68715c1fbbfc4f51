//! Admission of connections: one slot of the listener and one slot of the peer, both held by
//! the connection for its whole life (RAII: dropping [`Slots`] gives them back).
//!
//! A *peer* is an IPv4 address or an IPv6 /64: one IPv6 host usually owns a whole /64 (RFC
//! 4291 §2.5.4, SLAAC and privacy addresses, RFC 8981), so counting per full IPv6 address lets
//! one machine take a few hundred addresses and fill the listener. An IPv4-mapped IPv6 address
//! counts as its IPv4 address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The unit connections are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    V4([u8; 4]),
    /// The first 64 bits of the address.
    V6Prefix64([u8; 8]),
}

impl PeerKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => PeerKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerKey::V4(v4.octets()),
                None => {
                    let o = v6.octets();
                    let mut p = [0u8; 8];
                    p.copy_from_slice(o.get(..8).unwrap_or(&[0; 8]));
                    PeerKey::V6Prefix64(p)
                }
            },
        }
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(*o)),
            PeerKey::V6Prefix64(p) => {
                let mut o = [0u8; 16];
                o[..8].copy_from_slice(p);
                write!(f, "{}/64", Ipv6Addr::from(o))
            }
        }
    }
}

/// Why a connection was not admitted (bounded metric label via [`Refusal::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the listener has no free connection slot")]
    ListenerFull,
    #[error("the peer (IPv4 address or IPv6 /64) has no free connection slot")]
    PeerFull,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ListenerFull => "listener_full",
            Refusal::PeerFull => "peer_full",
        }
    }
}

#[derive(Debug)]
struct PerPeer {
    counts: Mutex<HashMap<PeerKey, usize>>,
    limit: usize,
}

/// One peer slot; released on drop.
#[derive(Debug)]
pub struct PeerSlot {
    owner: Arc<PerPeer>,
    key: PeerKey,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        // A poisoned lock means a panic elsewhere already; recover the map rather than leak.
        let mut c = match self.owner.counts.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = c.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.key);
            }
        }
    }
}

/// What an admitted connection holds for its whole life. `Slots::none()` is for outbound
/// connections, which no listener bound counts.
#[derive(Debug)]
pub struct Slots {
    pub listener: Option<OwnedSemaphorePermit>,
    pub peer: Option<PeerSlot>,
}

impl Slots {
    pub fn none() -> Self {
        Slots {
            listener: None,
            peer: None,
        }
    }
}

/// A listener's shared bounds (clone it into each task that needs it).
#[derive(Debug, Clone)]
pub struct Admission {
    listener: Arc<Semaphore>,
    per_peer: Arc<PerPeer>,
}

impl Admission {
    pub fn new(max_listener: usize, max_per_peer: usize) -> Self {
        Admission {
            listener: Arc::new(Semaphore::new(max_listener)),
            per_peer: Arc::new(PerPeer {
                counts: Mutex::new(HashMap::new()),
                limit: max_per_peer,
            }),
        }
    }

    /// Both slots for a new connection from `ip`, or the bound that refused it.
    pub fn admit(&self, ip: IpAddr) -> Result<Slots, Refusal> {
        let listener = self
            .listener
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::ListenerFull)?;
        let key = PeerKey::of(ip);
        let mut c = match self.per_peer.counts.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        let n = c.entry(key).or_insert(0);
        if *n >= self.per_peer.limit {
            return Err(Refusal::PeerFull);
        }
        *n += 1;
        drop(c);
        Ok(Slots {
            listener: Some(listener),
            peer: Some(PeerSlot {
                owner: self.per_peer.clone(),
                key,
            }),
        })
    }

    /// Connections currently counted for `ip`'s peer key.
    pub fn peer_count(&self, ip: IpAddr) -> usize {
        let c = match self.per_peer.counts.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        c.get(&PeerKey::of(ip)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ipv6_addresses_of_one_slash_64_are_one_peer() {
        let a = Admission::new(1000, 2);
        let _s1 = a.admit(ip("2001:db8:1:2::1")).expect("first");
        let _s2 = a.admit(ip("2001:db8:1:2:ffff::9")).expect("second");
        // A third address of the same /64 is the same peer: refused.
        assert_eq!(
            a.admit(ip("2001:db8:1:2:abcd::1")).err(),
            Some(Refusal::PeerFull)
        );
        // The neighbouring /64 is another peer.
        assert!(a.admit(ip("2001:db8:1:3::1")).is_ok());
        assert_eq!(a.peer_count(ip("2001:db8:1:2::77")), 2);
    }

    #[test]
    fn ipv4_is_per_address_and_mapped_v6_counts_as_v4() {
        let a = Admission::new(1000, 1);
        let _s = a.admit(ip("192.0.2.1")).expect("first");
        assert_eq!(
            a.admit(ip("::ffff:192.0.2.1")).err(),
            Some(Refusal::PeerFull)
        );
        assert!(a.admit(ip("192.0.2.2")).is_ok());
        assert_eq!(PeerKey::of(ip("::ffff:192.0.2.1")).to_string(), "192.0.2.1");
        assert_eq!(
            PeerKey::of(ip("2001:db8:1:2:3:4:5:6")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn slots_are_released_on_drop_and_listener_bound_holds() {
        let a = Admission::new(3, 2);
        let s1 = a.admit(ip("10.0.0.1")).expect("first");
        let _s2 = a.admit(ip("10.0.0.1")).expect("second");
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refusal::PeerFull));
        let _s3 = a.admit(ip("10.0.0.2")).expect("other peer");
        assert_eq!(a.admit(ip("10.0.0.3")).err(), Some(Refusal::ListenerFull));
        drop(s1);
        assert_eq!(a.peer_count(ip("10.0.0.1")), 1);
        assert!(a.admit(ip("10.0.0.1")).is_ok());
        // A refused peer slot does not keep the listener permit it took first.
        let b = Admission::new(2, 1);
        let _x = b.admit(ip("10.0.0.1")).expect("x");
        assert_eq!(b.admit(ip("10.0.0.1")).err(), Some(Refusal::PeerFull));
        assert!(b.admit(ip("10.0.0.2")).is_ok());
    }
}
