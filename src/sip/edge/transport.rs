//! Connection tasks of the SIP edge: one tokio task per connection owns the socket and a
//! [`Framer`], answers CRLFCRLF keep-alives (RFC 5626 §4.4.1) and framed-but-bad messages
//! (their 400) itself, closes on a fatal framing error or idle timeout, and forwards every
//! valid message to the core task. It decides nothing else. It enforces the connection's
//! deadlines ([`Deadlines`]): idle (reset only by a whole message), message completion from the
//! first byte, and the first request on inbound connections. Generic over the stream type so
//! the TLS stream from `tls.rs` slots in beside plain TCP.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::core::{ConnId, PeerInfo};
use super::metrics as m;
use crate::net::{write_bounded, Slots, WriteError};
use crate::sip::framing::{Frame, Framer};
use crate::sip::message::SipMessage;
use crate::sip::validate::answer_refused;

/// What connection tasks tell the core task.
#[derive(Debug)]
pub enum Input {
    Opened {
        info: PeerInfo,
        tx: OutTx,
        /// Set by the driver when the core accepted a request on the connection (it passed
        /// the peer-identity screen): ends the first-request deadline.
        authenticated: Arc<AtomicBool>,
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
    /// A request that was to be handed to the cluster node owning its dialog but could not be:
    /// the core answers it here.
    Unrelayed {
        conn: ConnId,
        msg: Box<SipMessage>,
    },
}

/// Bounds applied to each connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_header: usize,
    pub max_message: usize,
    /// No complete message for this long closes the connection. Only whole messages (and
    /// keep-alives) reset it: a byte now and then must not keep a connection open.
    pub idle: Duration,
    /// A message must be complete this long after its first byte
    /// (`limits.sip_message_timeout_secs`): a peer dribbling a partial message is closed.
    pub message: Duration,
    /// On inbound connections, the first request must arrive this long after the connection
    /// was admitted (`limits.first_request_timeout_secs`); `None` on connections we opened.
    pub first_request: Option<Duration>,
    /// Bound on each write and on the final shutdown (`limits.handshake_timeout_secs`): a peer
    /// that stops reading must not pin the task and its slots.
    pub write: Duration,
}

impl ConnLimits {
    /// The same bounds for a connection we opened (no first-request deadline: we send first).
    pub fn outbound(self) -> Self {
        ConnLimits {
            first_request: None,
            ..self
        }
    }
}

/// Logs a failed write and counts a timeout (bounded label `write_timeout`).
fn write_failed(f: WriteError) {
    match f {
        WriteError::Io(e) => tracing::debug!(error = %e, "write failed"),
        WriteError::Timeout(_) => {
            tracing::info!("write timed out; closing");
            m::CONNS_REFUSED.with_label_values(&["write_timeout"]).inc();
        }
    }
}

/// Which deadline of a connection is nearest (bounded metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Idle,
    Message,
    FirstRequest,
}

impl Expiry {
    pub fn label(self) -> &'static str {
        match self {
            Expiry::Idle => "idle_timeout",
            Expiry::Message => "message_timeout",
            Expiry::FirstRequest => "first_request_timeout",
        }
    }
}

/// The deadlines of one connection, pure (time is an argument) so the rules are unit-tested:
/// idle resets only on a whole message, the message deadline starts at a message's first
/// byte and ends when it completes, the first-request deadline ends with the first request.
#[derive(Debug, Clone)]
pub struct Deadlines {
    idle: Duration,
    message: Duration,
    idle_at: Instant,
    message_at: Option<Instant>,
    first_request_at: Option<Instant>,
}

impl Deadlines {
    pub fn new(limits: &ConnLimits, now: Instant) -> Self {
        Deadlines {
            idle: limits.idle,
            message: limits.message,
            idle_at: now + limits.idle,
            message_at: None,
            first_request_at: limits.first_request.map(|d| now + d),
        }
    }

    /// A whole message (or keep-alive) was framed at `now`.
    pub fn completed(&mut self, now: Instant) {
        self.idle_at = now + self.idle;
    }

    /// The core accepted a request from the peer: the first-request deadline is met. A
    /// request it refused (unknown domain, wrong route) does not count.
    pub fn authenticated(&mut self) {
        self.first_request_at = None;
    }

    /// After a read was framed: is part of a message still waiting for its rest?
    pub fn partial(&mut self, mid_message: bool, now: Instant) {
        match (mid_message, self.message_at) {
            (true, None) => self.message_at = Some(now + self.message),
            (false, _) => self.message_at = None,
            (true, Some(_)) => {}
        }
    }

    /// The nearest deadline and what it is.
    pub fn next(&self) -> (Instant, Expiry) {
        let mut best = (self.idle_at, Expiry::Idle);
        for (at, what) in [
            (self.message_at, Expiry::Message),
            (self.first_request_at, Expiry::FirstRequest),
        ] {
            if let Some(at) = at {
                if at < best.0 {
                    best = (at, what);
                }
            }
        }
        best
    }
}

/// Bytes waiting to be written on one connection at most. Bounded in bytes, not messages: a
/// Lync edge signing in a pool of users gets thousands of NOTIFYs and answers in a burst, which
/// a healthy peer reads at once; only a peer that stops reading lets this much pile up (and
/// then `limits` write deadline closes it as well). 4 MiB × the connection limit is the worst
/// case, reached only by peers that all stop reading within one write deadline.
pub const OUT_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Why [`OutTx::try_send`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutRefused {
    /// [`OUT_QUEUE_BYTES`] are already waiting: the peer is not reading.
    Full,
    /// The connection task is gone.
    Closed,
}

/// The driver's end of a connection's outbound queue: never waits, bounded in bytes.
#[derive(Debug, Clone)]
pub struct OutTx {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl OutTx {
    /// Queues `bytes` unless [`OUT_QUEUE_BYTES`] would be exceeded (one message alone always
    /// fits, whatever its size: the message limits bound it).
    pub fn try_send(&self, bytes: Bytes) -> Result<(), OutRefused> {
        let len = bytes.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > OUT_QUEUE_BYTES {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(OutRefused::Full);
        }
        self.tx.send(bytes).map_err(|_| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            OutRefused::Closed
        })
    }
}

/// The connection task's end: what it takes leaves the byte count.
pub(super) struct OutRx {
    rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl OutRx {
    fn took(&self, b: Option<Bytes>) -> Option<Bytes> {
        if let Some(b) = &b {
            self.queued.fetch_sub(b.len(), Ordering::AcqRel);
        }
        b
    }

    pub(super) async fn recv(&mut self) -> Option<Bytes> {
        let b = self.rx.recv().await;
        self.took(b)
    }

    fn try_recv(&mut self) -> Option<Bytes> {
        let b = self.rx.try_recv().ok();
        self.took(b)
    }

    fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

/// A connection's outbound queue.
pub(super) fn out_queue() -> (OutTx, OutRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        OutTx {
            tx,
            queued: queued.clone(),
        },
        OutRx { rx, queued },
    )
}

/// Room made in the framer's buffer before each read (as much as the read buffer it replaced).
const READ_ROOM: usize = 16 * 1024;

/// Most bytes one write coalesces (a 64 KiB socket write is still a single cheap syscall).
const WRITE_BATCH: usize = 64 * 1024;

/// Appends `first` and whatever else is already queued for the connection to `batch`: under
/// load the answers to several requests are ready at once, and one write (one syscall, one
/// write deadline) for all of them costs far less than one each. Order is kept; nothing waits
/// for more to arrive.
fn coalesce(first: &[u8], rx: &mut OutRx, batch: &mut Vec<u8>) {
    batch.clear();
    batch.extend_from_slice(first);
    while batch.len() < WRITE_BATCH {
        match rx.try_recv() {
            Some(more) => batch.extend_from_slice(&more),
            None => break,
        }
    }
}

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
        let (tx, mut rx) = out_queue();
        let authenticated = Arc::new(AtomicBool::new(false));
        let opened = Input::Opened {
            info,
            tx,
            authenticated: authenticated.clone(),
        };
        if core.send(opened).await.is_err() {
            return;
        }
        m::CONNS.with_label_values(&[kind]).inc();
        tracing::debug!("connection open");
        let (mut rd, mut wr) = tokio::io::split(stream);
        // The core decodes the routing headers into its view and checks them there.
        let mut framer = Framer::new(limits.max_header, limits.max_message).routing_checked_later();
        let mut batch = Vec::new();
        let mut deadlines = Deadlines::new(&limits, Instant::now());
        'conn: loop {
            let (at, expiry) = deadlines.next();
            tokio::select! {
                // Read straight into the framer's buffer (no copy through a read buffer).
                r = rd.read_buf(framer.read_buf(READ_ROOM)) => {
                    match r {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "read failed");
                            break;
                        }
                    }
                    loop {
                        match framer.next() {
                            Ok(None) => break,
                            Ok(Some(Frame::KeepAlive)) => {
                                deadlines.completed(Instant::now());
                                if let Err(f) = write_bounded(&mut wr, b"\r\n", limits.write).await {
                                    write_failed(f);
                                    break 'conn;
                                }
                            }
                            Ok(Some(Frame::Bad { status, reason, bytes })) => {
                                m::refused("malformed");
                                tracing::info!(status, reason = %crate::net::LogSafe(&reason), "bad message");
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
                                deadlines.completed(Instant::now());
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
                    deadlines.partial(framer.mid_message(), Instant::now());
                }
                out = rx.recv() => {
                    let Some(b) = out else { break };
                    // A lone message is written as is, without a copy.
                    let data: &[u8] = if rx.is_empty() {
                        &b
                    } else {
                        coalesce(&b, &mut rx, &mut batch);
                        &batch
                    };
                    if let Err(f) = write_bounded(&mut wr, data, limits.write).await {
                        write_failed(f);
                        break;
                    }
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {
                    if expiry == Expiry::FirstRequest && authenticated.load(Ordering::Relaxed) {
                        // Met earlier (the driver set the flag): nothing expired.
                        deadlines.authenticated();
                        continue;
                    }
                    tracing::info!(reason = expiry.label(), "deadline expired; closing");
                    m::CONNS_REFUSED.with_label_values(&[expiry.label()]).inc();
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

    /// Runs a connection task over a pipe; returns the peer's end, the driver's inputs and the
    /// `Opened` input and the shutdown sender (the task closes when either is dropped).
    async fn open(
        limits: ConnLimits,
    ) -> (
        tokio::io::DuplexStream,
        mpsc::Receiver<Input>,
        Input,
        watch::Sender<bool>,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (tx, mut rx) = mpsc::channel(16);
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(run_connection(
            server,
            info(),
            "tcp_in",
            tx,
            limits,
            shutdown,
            Slots::none(),
        ));
        let opened = next(&mut rx).await;
        assert!(matches!(opened, Input::Opened { .. }));
        (client, rx, opened, stop)
    }

    #[tokio::test]
    async fn the_out_queue_takes_a_burst_and_refuses_only_past_its_byte_budget() {
        let (tx, mut rx) = out_queue();
        // Thousands of small messages (a sign-in burst of NOTIFYs) fit: the bound is bytes.
        let msg = Bytes::from(vec![b'n'; 500]);
        for _ in 0..5000 {
            assert_eq!(tx.try_send(msg.clone()), Ok(()));
        }
        let big = Bytes::from(vec![b'x'; OUT_QUEUE_BYTES]);
        assert_eq!(tx.try_send(big.clone()), Err(OutRefused::Full));
        // What the connection task takes frees its bytes.
        while rx.try_recv().is_some() {}
        assert!(rx.is_empty());
        // Alone, even a message larger than the budget is queued.
        assert_eq!(tx.try_send(big), Ok(()));
        assert_eq!(rx.recv().await.map(|b| b.len()), Some(OUT_QUEUE_BYTES));
        drop(rx);
        assert_eq!(tx.try_send(msg), Err(OutRefused::Closed));
    }

    /// Keep-alive pong, 400 for a framed bad request, forwarding, then idle close.
    #[tokio::test]
    async fn connection_task_pongs_answers_bad_forwards_and_idles_out() {
        let limits = ConnLimits {
            max_header: 16 * 1024,
            max_message: 64 * 1024,
            idle: Duration::from_millis(300),
            message: Duration::from_secs(5),
            first_request: None,
            write: Duration::from_secs(5),
        };
        let (mut client, mut rx, _opened, _stop) = open(limits).await;
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
        let limits = ConnLimits {
            max_header: 16 * 1024,
            max_message: 64 * 1024,
            idle: Duration::from_secs(60),
            message: Duration::from_secs(5),
            first_request: None,
            write: Duration::from_secs(5),
        };
        let (mut client, mut rx, _opened, _stop) = open(limits).await;
        client
            .write_all(b"MESSAGE sip:a@example.com SIP/2.0\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
            .await
            .expect("write");
        assert!(matches!(next(&mut rx).await, Input::Closed { conn: 7 }));
    }

    fn limits_for_deadlines() -> ConnLimits {
        ConnLimits {
            max_header: 1024,
            max_message: 4096,
            idle: Duration::from_secs(600),
            message: Duration::from_secs(5),
            first_request: Some(Duration::from_secs(10)),
            write: Duration::from_secs(5),
        }
    }

    /// A byte now and then moves no deadline; a partial message has 5 s from its first byte.
    #[test]
    fn dribbled_bytes_do_not_reset_the_idle_timer() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut d = Deadlines::new(&limits_for_deadlines(), t0);
        assert_eq!(d.next(), (t0 + s(10), Expiry::FirstRequest));
        // First byte of a message at t0+1: the message deadline is t0+6.
        d.partial(true, t0 + s(1));
        assert_eq!(d.next(), (t0 + s(6), Expiry::Message));
        // More bytes, still partial: the deadline stays where the first byte put it.
        d.partial(true, t0 + s(4));
        assert_eq!(d.next(), (t0 + s(6), Expiry::Message));
        // The request completes: the message deadline ends, idle restarts; the first-request
        // deadline stays until the core accepted a request.
        d.completed(t0 + s(5));
        d.partial(false, t0 + s(5));
        assert_eq!(d.next(), (t0 + s(10), Expiry::FirstRequest));
        d.authenticated();
        assert_eq!(d.next(), (t0 + s(605), Expiry::Idle));
        // Outbound connections have no first-request deadline.
        let f = Deadlines::new(&limits_for_deadlines().outbound(), t0);
        assert_eq!(f.next(), (t0 + s(600), Expiry::Idle));
    }

    /// Over a pipe: the start of a request, then a byte at a time, is closed at the message
    /// deadline although bytes keep arriving (they never reset anything).
    #[tokio::test]
    async fn a_dribbling_peer_is_closed_at_the_message_deadline() {
        let limits = ConnLimits {
            message: Duration::from_millis(400),
            idle: Duration::from_secs(60),
            first_request: Some(Duration::from_secs(60)),
            ..limits_for_deadlines()
        };
        let (mut client, mut rx, _opened, _stop) = open(limits).await;
        let before = m::CONNS_REFUSED
            .with_label_values(&["message_timeout"])
            .get();
        let started = tokio::time::Instant::now();
        client
            .write_all(b"OPTIONS sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/TCP x")
            .await
            .expect("write");
        let dribble = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if client.write_all(b"x").await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            i = next(&mut rx) => assert!(matches!(i, Input::Closed { conn: 7 })),
            _ = dribble => panic!("writes failed before the close was reported"),
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(
            m::CONNS_REFUSED
                .with_label_values(&["message_timeout"])
                .get()
                > before
        );
    }
}
