//! Bounded TCP connects: a destination that drops SYNs must cost an edge its handshake budget,
//! not the kernel's minutes of SYN retries. Failover (which target next, what a failure means
//! for the protocol) stays with the caller; this is the one connect every dialer shares.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Why a connect did not give a stream.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {addr} did not complete within {limit:?}")]
    Timeout { addr: SocketAddr, limit: Duration },
}

impl ConnectError {
    /// Bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Io { .. } => "connect_error",
            ConnectError::Timeout { .. } => "connect_timeout",
        }
    }
}

/// A TCP connection to `addr` within `limit`, with Nagle off: every edge writes whole
/// messages (a SIP request, a stanza) and waits for answers, where Nagle only adds latency.
pub async fn connect_bounded(addr: SocketAddr, limit: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            // Best effort: a socket that refuses TCP_NODELAY still works, only slower.
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(ConnectError::Io { addr, source }),
        Err(_) => Err(ConnectError::Timeout { addr, limit }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_with_nodelay_and_reports_refusal() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let s = connect_bounded(addr, Duration::from_secs(5))
            .await
            .expect("connected");
        assert!(s.nodelay().expect("nodelay"));
        drop(l);
        // Nobody listens any more: an error at once, labelled, naming the address.
        let e = connect_bounded(addr, Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert_eq!(e.label(), "connect_error");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
