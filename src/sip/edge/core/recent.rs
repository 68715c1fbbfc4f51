//! The SIP core's recent answers: the final response of each recent non-INVITE server
//! transaction, by [`crate::sip::txn::TxnKey::fingerprint`], so that a request re-sent after
//! its transaction ended gets the same answer and causes nothing twice. Over TCP and TLS a
//! non-INVITE server transaction ends as soon as its final response is sent (Timer J is 0,
//! RFC 3261 §17.2.2), yet a peer may re-send after a reconnect or from a sloppy stack; the
//! RFC does not require this cache (a compliant client does not retransmit over a reliable
//! transport, §17.1.2.2), so it is best effort, bounded in entries, bytes and time (64·T1).
//!
//! One entry is stored per request, so storing must cost next to nothing: the response bytes
//! are copied into one ring of bytes (no allocation per entry, and nothing freed when an entry
//! ends: newer bytes simply overwrite the oldest), and entries are indexed by a two-way
//! set-associative table addressed by the fingerprint's low bits (no hashing, no eviction
//! queue). An entry ends when its time is up, when newer responses overwrite its bytes, or when
//! two newer entries land in its set, whichever comes first.
//!
//! Sans-IO: time is passed in.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Sets of the index (a power of two): at most twice as many entries.
const SETS: usize = 4096;
/// Bytes of the ring: a few thousand typical responses; one response always fits (the
/// message limits bound a response far below this).
const RING: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
struct Entry {
    fingerprint: u128,
    /// Only this peer address gets the answer: branches are chosen by peers, and one peer must
    /// never read another's response.
    ip: IpAddr,
    at: Instant,
    /// Where the bytes start, counted in bytes ever written to the ring.
    pos: u64,
    len: u32,
}

/// See the module doc.
#[derive(Debug, Default)]
pub(crate) struct RecentAnswers {
    /// Allocated on the first answer stored.
    ring: Vec<u8>,
    /// Bytes ever written to the ring (padding included): where the next answer starts.
    written: u64,
    sets: Vec<[Option<Entry>; 2]>,
}

impl RecentAnswers {
    fn set_of(fingerprint: u128) -> usize {
        // Truncation intended: the fingerprint's low bits are a keyed hash.
        (fingerprint as usize) & (SETS - 1)
    }

    /// Whether the bytes of `e` are still in the ring (no later write reached them).
    fn intact(&self, e: &Entry) -> bool {
        self.written <= e.pos + RING as u64
    }

    /// Keeps `bytes`, the final response to the transaction `fingerprint` from `ip`.
    pub fn remember(&mut self, fingerprint: u128, ip: IpAddr, bytes: &[u8], now: Instant) {
        let Ok(len) = u32::try_from(bytes.len()) else {
            return;
        };
        if bytes.len() > RING {
            return;
        }
        if self.ring.is_empty() {
            self.ring = vec![0; RING];
            self.sets = vec![[None; 2]; SETS];
        }
        // An answer is never split across the ring's end: skip to its start instead.
        let mut off = (self.written % RING as u64) as usize;
        if off + bytes.len() > RING {
            self.written += (RING - off) as u64;
            off = 0;
        }
        let Some(dst) = self.ring.get_mut(off..off + bytes.len()) else {
            return;
        };
        dst.copy_from_slice(bytes);
        let entry = Entry {
            fingerprint,
            ip,
            at: now,
            pos: self.written,
            len,
        };
        self.written += bytes.len() as u64;
        let Some(set) = self.sets.get_mut(Self::set_of(fingerprint)) else {
            return;
        };
        // The same transaction again, else a free way, else the older one.
        let way = match set {
            [Some(a), _] if a.fingerprint == fingerprint => 0,
            [_, Some(b)] if b.fingerprint == fingerprint => 1,
            [None, _] => 0,
            [_, None] => 1,
            [Some(a), Some(b)] => usize::from(b.pos < a.pos),
        };
        if let Some(w) = set.get_mut(way) {
            *w = Some(entry);
        }
    }

    /// The answer kept for `fingerprint` if `ip` sent it less than `ttl` ago and its bytes are
    /// still there.
    pub fn answer(
        &self,
        fingerprint: u128,
        ip: IpAddr,
        now: Instant,
        ttl: Duration,
    ) -> Option<Bytes> {
        let set = self.sets.get(Self::set_of(fingerprint))?;
        let e = set.iter().flatten().find(|e| {
            e.fingerprint == fingerprint && e.ip == ip && now < e.at + ttl && self.intact(e)
        })?;
        let off = (e.pos % RING as u64) as usize;
        let bytes = self.ring.get(off..off + e.len as usize)?;
        Some(Bytes::copy_from_slice(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(32);

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn answers_the_same_peer_until_the_time_is_up() {
        let mut r = RecentAnswers::default();
        let t0 = Instant::now();
        assert_eq!(r.answer(7, ip(1), t0, TTL), None);
        r.remember(7, ip(1), b"SIP/2.0 200 OK\r\n\r\n", t0);
        let hit = r.answer(7, ip(1), t0 + Duration::from_secs(31), TTL);
        assert_eq!(hit.as_deref(), Some(&b"SIP/2.0 200 OK\r\n\r\n"[..]));
        // Another peer never reads it; nor does anyone once 64·T1 passed.
        assert_eq!(r.answer(7, ip(2), t0, TTL), None);
        assert_eq!(r.answer(7, ip(1), t0 + TTL, TTL), None);
        // The same transaction answered again: the newer answer.
        r.remember(7, ip(1), b"SIP/2.0 500 Later\r\n\r\n", t0);
        let hit = r.answer(7, ip(1), t0, TTL);
        assert_eq!(hit.as_deref(), Some(&b"SIP/2.0 500 Later\r\n\r\n"[..]));
    }

    #[test]
    fn a_set_keeps_the_two_newest() {
        let mut r = RecentAnswers::default();
        let t0 = Instant::now();
        let (a, b, c) = (1u128, 1 + SETS as u128, 1 + 2 * SETS as u128);
        r.remember(a, ip(1), b"a", t0);
        r.remember(b, ip(1), b"b", t0);
        r.remember(c, ip(1), b"c", t0);
        assert_eq!(r.answer(a, ip(1), t0, TTL), None);
        assert_eq!(r.answer(b, ip(1), t0, TTL).as_deref(), Some(&b"b"[..]));
        assert_eq!(r.answer(c, ip(1), t0, TTL).as_deref(), Some(&b"c"[..]));
    }

    #[test]
    fn overwritten_bytes_are_never_served_and_answers_do_not_wrap() {
        let mut r = RecentAnswers::default();
        let t0 = Instant::now();
        let big = vec![b'x'; RING / 3 + 1];
        r.remember(1, ip(1), b"first", t0);
        for f in 2..=4u128 {
            r.remember(f, ip(1), &big, t0);
        }
        // Three big answers went round the ring (the third skipped to its start) over "first".
        assert_eq!(r.answer(1, ip(1), t0, TTL), None);
        assert_eq!(
            r.answer(4, ip(1), t0, TTL).map(|b| b.len()),
            Some(big.len())
        );
        assert_eq!(r.answer(2, ip(1), t0, TTL), None);
    }
}
