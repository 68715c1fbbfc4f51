//! The accept loop of an edge: take the next connection the [`Admission`] bounds admit,
//! counting refusals by reason, and back off (exponentially, capped) on accept errors such as
//! EMFILE instead of spinning: while the process is out of descriptors, `accept` fails at once
//! on every call, and a loop that retries immediately burns a core and floods the log.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::admission::{Admission, Refusal, Slots};
use super::backoff::Backoff;
use super::metrics as m;

/// What an accept error means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptErrorKind {
    /// The process or system is out of something (EMFILE, ENFILE, ENOBUFS, ENOMEM): back off.
    Resources,
    /// One connection died between SYN and accept (ECONNABORTED, ECONNRESET...): retry at once.
    Aborted,
    /// Anything else: back off too, it may repeat.
    Other,
}

impl AcceptErrorKind {
    pub fn of(e: &io::Error) -> Self {
        // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 (Linux numbering; raw codes because
        // std maps none of them to a stable ErrorKind).
        if let Some(23 | 24 | 105 | 12) = e.raw_os_error() {
            return AcceptErrorKind::Resources;
        }
        match e.kind() {
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock => AcceptErrorKind::Aborted,
            io::ErrorKind::OutOfMemory => AcceptErrorKind::Resources,
            _ => AcceptErrorKind::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            AcceptErrorKind::Resources => "resources",
            AcceptErrorKind::Aborted => "aborted",
            AcceptErrorKind::Other => "other",
        }
    }
}

/// How one listener's loop behaves.
#[derive(Debug, Clone)]
pub struct AcceptPolicy {
    /// Fixed metric label and log field (`sip_tcp`, `sip_tls`, `admin`...).
    pub edge: &'static str,
    /// First pause after an accept error, and the cap.
    pub error_backoff_min: Duration,
    pub error_backoff_max: Duration,
}

impl AcceptPolicy {
    pub fn new(edge: &'static str) -> Self {
        AcceptPolicy {
            edge,
            error_backoff_min: Duration::from_millis(10),
            error_backoff_max: Duration::from_secs(1),
        }
    }
}

/// The pause after an accept error of `kind` (`None`: retry at once), from the loop's backoff.
/// A successful accept resets it.
pub fn pause_after(kind: AcceptErrorKind, backoff: &mut Backoff, jitter: f64) -> Option<Duration> {
    match kind {
        AcceptErrorKind::Aborted => None,
        AcceptErrorKind::Resources | AcceptErrorKind::Other => Some(backoff.next_delay(jitter)),
    }
}

/// An admitted connection with the slots it must hold until it closes.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub remote: SocketAddr,
    pub slots: Slots,
}

/// Counts (and logs) a connection the edge closed at once for `reason`, a fixed label: the
/// admission refusals, and refusals of the edge's own (e.g. `not_a_static_route`).
pub fn count_refusal(edge: &'static str, reason: &'static str, remote: SocketAddr) {
    m::REFUSALS.with_label_values(&[edge, reason]).inc();
    tracing::info!(edge, peer = %remote, reason, "connection refused");
}

/// The next connection `admission` admits on `listener`; `None` once `shutdown` turns true.
/// Refused connections are dropped (closed) at once and counted by reason.
pub async fn accept_admitted(
    listener: &TcpListener,
    admission: &Admission,
    policy: &AcceptPolicy,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Accepted> {
    let mut errors = Backoff::new(policy.error_backoff_min, policy.error_backoff_max);
    loop {
        if *shutdown.borrow() {
            return None;
        }
        let r = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return None,
        };
        let (stream, remote) = match r {
            Ok(x) => x,
            Err(e) => {
                let kind = AcceptErrorKind::of(&e);
                m::ERRORS
                    .with_label_values(&[policy.edge, kind.label()])
                    .inc();
                if let Some(pause) = pause_after(kind, &mut errors, rand::random::<f64>()) {
                    tracing::warn!(edge = policy.edge, error = %e, ?pause, "accept failed; pausing");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => return None,
                    }
                }
                continue;
            }
        };
        errors.reset();
        match admission.admit(remote.ip()) {
            Ok(slots) => {
                let _ = stream.set_nodelay(true);
                return Some(Accepted {
                    stream,
                    remote,
                    slots,
                });
            }
            Err(refusal @ (Refusal::ListenerFull | Refusal::PeerFull)) => {
                count_refusal(policy.edge, refusal.label(), remote);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emfile_backs_off_with_a_cap_and_aborted_retries_at_once() {
        let emfile = io::Error::from_raw_os_error(24);
        assert_eq!(AcceptErrorKind::of(&emfile), AcceptErrorKind::Resources);
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(AcceptErrorKind::of(&aborted), AcceptErrorKind::Aborted);
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let pauses: Vec<Duration> = (0..10)
            .filter_map(|_| pause_after(AcceptErrorKind::Resources, &mut b, 1.0))
            .collect();
        assert_eq!(pauses.first(), Some(&Duration::from_millis(10)));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses.last(), Some(&Duration::from_secs(1)));
        assert_eq!(pause_after(AcceptErrorKind::Aborted, &mut b, 1.0), None);
    }

    #[tokio::test]
    async fn refused_connections_are_closed_and_counted() {
        use tokio::io::AsyncReadExt;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let adm = Admission::new(10, 1);
        let policy = AcceptPolicy::new("test_accept");
        let (_stop, mut shutdown) = watch::channel(false);
        let before = m::REFUSALS
            .with_label_values(&["test_accept", "peer_full"])
            .get();
        let _c1 = TcpStream::connect(addr).await.expect("c1");
        let first = accept_admitted(&l, &adm, &policy, &mut shutdown)
            .await
            .expect("first admitted");
        // The second connection from 127.0.0.1 exceeds the per-peer bound: closed at once.
        let mut c2 = TcpStream::connect(addr).await.expect("c2");
        let _c3 = {
            let accept = accept_admitted(&l, &adm, &policy, &mut shutdown);
            let mut buf = [0u8; 1];
            let closed = async {
                let n = c2.read(&mut buf).await;
                assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
            };
            tokio::pin!(accept);
            tokio::select! {
                _ = closed => {}
                _ = &mut accept => panic!("a refused connection was admitted"),
            }
            drop(first);
            // Its slot is free again: the next connection is admitted.
            let c3 = TcpStream::connect(addr).await.expect("c3");
            let a = tokio::time::timeout(Duration::from_secs(5), accept)
                .await
                .expect("admitted in time");
            assert!(a.is_some());
            c3
        };
        let after = m::REFUSALS
            .with_label_values(&["test_accept", "peer_full"])
            .get();
        assert_eq!(after - before, 1);
    }
}
