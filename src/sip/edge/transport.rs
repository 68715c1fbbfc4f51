//! Connection tasks of the SIP edge: one tokio task per connection owns the socket and a
//! [`Framer`], answers CRLFCRLF keep-alives (RFC 5626 §4.4.1) and framed-but-bad messages
//! (their 400) itself, closes on a fatal framing error or idle timeout, and forwards every
//! valid message to the core task. It decides nothing else. Generic over the stream type so
//! the TLS stream from `tls.rs` slots in beside plain TCP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::core::{ConnId, PeerInfo};
use super::metrics as m;
use crate::sip::framing::{Frame, Framer};
use crate::sip::message::SipMessage;
use crate::sip::validate::answer_refused;

/// What connection tasks tell the core task.
#[derive(Debug)]
pub enum Input {
    Opened {
        info: PeerInfo,
        tx: mpsc::Sender<Bytes>,
    },
    Message {
        conn: ConnId,
        msg: Box<SipMessage>,
    },
    Closed {
        conn: ConnId,
    },
    ConnectFailed {
        domain: crate::config::Domain,
    },
}

/// Bounds applied to each connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_header: usize,
    pub max_message: usize,
    pub idle: Duration,
    /// Bound on each write and on the final shutdown (`limits.handshake_timeout_secs`): a peer
    /// that stops reading must not pin the task and its slots.
    pub write: Duration,
}

/// Why a bounded write did not complete.
enum WriteFail {
    Io(std::io::Error),
    Timeout,
}

/// One `write_all` bounded by `limit`.
async fn write_bounded<W>(wr: &mut W, data: &[u8], limit: Duration) -> Result<(), WriteFail>
where
    W: AsyncWrite + Unpin,
{
    match tokio::time::timeout(limit, wr.write_all(data)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(WriteFail::Io(e)),
        Err(_) => Err(WriteFail::Timeout),
    }
}

/// Logs a failed write and counts a timeout (bounded label `write_timeout`).
fn write_failed(f: WriteFail) {
    match f {
        WriteFail::Io(e) => tracing::debug!(error = %e, "write failed"),
        WriteFail::Timeout => {
            tracing::info!("write timed out; closing");
            m::CONNS_REFUSED.with_label_values(&["write_timeout"]).inc();
        }
    }
}

/// Connections per peer address (style practice 4): a shared count, decremented on drop.
#[derive(Debug, Default)]
pub struct PerPeer {
    counts: Mutex<HashMap<IpAddr, usize>>,
    limit: usize,
}

/// Holds one slot of a peer's count.
#[derive(Debug)]
pub struct PeerSlot {
    owner: Arc<PerPeer>,
    ip: IpAddr,
}

impl PerPeer {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(PerPeer {
            counts: Mutex::new(HashMap::new()),
            limit,
        })
    }

    /// A slot for `ip`, or `None` when the peer already has `limit` connections.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut c = self.counts.lock().ok()?;
        let n = c.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut c) = self.owner.counts.lock() {
            if let Some(n) = c.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.remove(&self.ip);
                }
            }
        }
    }
}

/// What a connection holds for its whole life: the listener permit and the per-peer slot.
pub struct Slots {
    pub listener: Option<OwnedSemaphorePermit>,
    pub peer: Option<PeerSlot>,
}

/// Bounded outbound queue per connection.
const OUT_QUEUE: usize = 512;

/// Runs one connection until it closes: peer EOF or error, fatal framing error, idle timeout,
/// shutdown, or the driver dropping the connection's outbound sender (it forgot the
/// connection). `kind` is the bounded metric label.
pub async fn run_connection<S>(
    stream: S,
    info: PeerInfo,
    kind: &'static str,
    core: mpsc::Sender<Input>,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
    slots: Slots,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("sip_conn", conn = info.conn, peer = %info.remote, kind);
    async move {
        let _slots = slots;
        let conn = info.conn;
        let (tx, mut rx) = mpsc::channel::<Bytes>(OUT_QUEUE);
        if core.send(Input::Opened { info, tx }).await.is_err() {
            return;
        }
        m::CONNS.with_label_values(&[kind]).inc();
        tracing::debug!("connection open");
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut framer = Framer::new(limits.max_header, limits.max_message);
        let mut buf = vec![0u8; 16 * 1024];
        let mut deadline = tokio::time::Instant::now() + limits.idle;
        'conn: loop {
            tokio::select! {
                r = rd.read(&mut buf) => {
                    let n = match r {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            tracing::debug!(error = %e, "read failed");
                            break;
                        }
                    };
                    deadline = tokio::time::Instant::now() + limits.idle;
                    framer.push(buf.get(..n).unwrap_or(&[]));
                    loop {
                        match framer.next() {
                            Ok(None) => break,
                            Ok(Some(Frame::KeepAlive)) => {
                                if let Err(f) = write_bounded(&mut wr, b"\r\n", limits.write).await {
                                    write_failed(f);
                                    break 'conn;
                                }
                            }
                            Ok(Some(Frame::Bad { status, reason, bytes })) => {
                                m::refused("malformed");
                                tracing::info!(status, reason = %reason, "bad message");
                                if let Some(s) = status {
                                    if let Some(a) = answer_refused(&bytes, s, &reason, "lgbad") {
                                        m::response("out", s);
                                        if let Err(f) = write_bounded(&mut wr, &a, limits.write).await {
                                            write_failed(f);
                                            break 'conn;
                                        }
                                    }
                                }
                            }
                            Ok(Some(Frame::Message(msg))) => {
                                if core.send(Input::Message { conn, msg }).await.is_err() {
                                    break 'conn;
                                }
                            }
                            Err(e) => {
                                // Framing is lost (e.g. conflicting Content-Length): nothing
                                // after this point can be trusted to start a message.
                                m::refused("framing_lost");
                                tracing::info!(error = %e, "framing error; closing");
                                break 'conn;
                            }
                        }
                    }
                }
                out = rx.recv() => {
                    let Some(b) = out else { break };
                    if let Err(f) = write_bounded(&mut wr, &b, limits.write).await {
                        write_failed(f);
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::debug!("idle timeout");
                    m::CONNS_REFUSED.with_label_values(&["idle_timeout"]).inc();
                    break;
                }
                _ = shutdown.changed() => break,
            }
        }
        if tokio::time::timeout(limits.write, wr.shutdown()).await.is_err() {
            m::CONNS_REFUSED.with_label_values(&["write_timeout"]).inc();
        }
        m::CONNS.with_label_values(&[kind]).dec();
        let _ = core.send(Input::Closed { conn }).await;
        tracing::debug!("connection closed");
    }
    .instrument(span)
    .await;
}

/// A listener's shared bounds.
#[derive(Clone)]
pub struct ListenerBounds {
    pub per_listener: Arc<Semaphore>,
    pub per_peer: Arc<PerPeer>,
}

impl ListenerBounds {
    pub fn new(max_listener: usize, max_peer: usize) -> Self {
        ListenerBounds {
            per_listener: Arc::new(Semaphore::new(max_listener)),
            per_peer: PerPeer::new(max_peer),
        }
    }

    /// Both slots for a new connection from `remote`, or the bound that refused it.
    pub fn admit(&self, remote: SocketAddr) -> Result<Slots, &'static str> {
        let listener = self
            .per_listener
            .clone()
            .try_acquire_owned()
            .map_err(|_| "listener_full")?;
        let peer = self.per_peer.acquire(remote.ip()).ok_or("peer_full")?;
        Ok(Slots {
            listener: Some(listener),
            peer: Some(peer),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn info() -> PeerInfo {
        PeerInfo {
            conn: 7,
            remote: "192.0.2.9:5061".parse().expect("addr"),
            tls: false,
            verified: Vec::new(),
            outbound_to: None,
        }
    }

    async fn next(rx: &mut mpsc::Receiver<Input>) -> Input {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(i)) => i,
            other => panic!("no input: {other:?}"),
        }
    }

    /// Keep-alive pong, 400 for a framed bad request, forwarding, then idle close.
    #[tokio::test]
    async fn connection_task_pongs_answers_bad_forwards_and_idles_out() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (tx, mut rx) = mpsc::channel(16);
        let (_stop, shutdown) = watch::channel(false);
        let limits = ConnLimits {
            max_header: 16 * 1024,
            max_message: 64 * 1024,
            idle: Duration::from_millis(300),
            write: Duration::from_secs(5),
        };
        let slots = Slots {
            listener: None,
            peer: None,
        };
        tokio::spawn(run_connection(
            server,
            info(),
            "tcp_in",
            tx,
            limits,
            shutdown,
            slots,
        ));
        // Keep the outbound sender alive: the task closes when the driver drops it.
        let opened = next(&mut rx).await;
        assert!(matches!(opened, Input::Opened { .. }));
        client.write_all(b"\r\n\r\n").await.expect("write");
        let mut pong = [0u8; 2];
        client.read_exact(&mut pong).await.expect("pong");
        assert_eq!(&pong, b"\r\n");
        client
            .write_all(b"OPTIONS sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/TCP x;branch=z9hG4bK1\r\nFrom: <sip:b@partner.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: c\r\nCall-ID: d\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = client.read(&mut buf).await.expect("answer");
        let text = String::from_utf8_lossy(buf.get(..n).unwrap_or(&[])).into_owned();
        assert!(text.starts_with("SIP/2.0 400 "), "{text}");
        client
            .write_all(b"OPTIONS sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/TCP x;branch=z9hG4bK2\r\nFrom: <sip:b@partner.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("write");
        assert!(matches!(
            next(&mut rx).await,
            Input::Message { conn: 7, .. }
        ));
        // Nothing more: the idle timeout closes the connection.
        assert!(matches!(next(&mut rx).await, Input::Closed { conn: 7 }));
        let n = client.read(&mut buf).await.expect("eof");
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn conflicting_content_length_closes() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (tx, mut rx) = mpsc::channel(16);
        let (_stop, shutdown) = watch::channel(false);
        let limits = ConnLimits {
            max_header: 16 * 1024,
            max_message: 64 * 1024,
            idle: Duration::from_secs(60),
            write: Duration::from_secs(5),
        };
        let slots = Slots {
            listener: None,
            peer: None,
        };
        tokio::spawn(run_connection(
            server,
            info(),
            "tcp_in",
            tx,
            limits,
            shutdown,
            slots,
        ));
        // Keep the outbound sender alive: the task closes when the driver drops it.
        let opened = next(&mut rx).await;
        assert!(matches!(opened, Input::Opened { .. }));
        client
            .write_all(b"MESSAGE sip:a@example.com SIP/2.0\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
            .await
            .expect("write");
        assert!(matches!(next(&mut rx).await, Input::Closed { conn: 7 }));
    }

    #[test]
    fn per_peer_slots_are_released() {
        let b = ListenerBounds::new(3, 2);
        let a: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
        let c: SocketAddr = "10.0.0.2:5000".parse().expect("addr");
        let s1 = b.admit(a).expect("first");
        let _s2 = b.admit(a).expect("second");
        assert_eq!(b.admit(a).err(), Some("peer_full"));
        let _s3 = b.admit(c).expect("other peer");
        assert_eq!(b.admit(c).err(), Some("listener_full"));
        drop(s1);
        assert!(b.admit(a).is_ok());
    }
}
