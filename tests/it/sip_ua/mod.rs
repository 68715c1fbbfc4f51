//! A small SIP user agent for tests, playing a foreign Lync edge over one TCP connection:
//! it writes requests built from header lines (Content-Length computed), reads with Legate's
//! own `Framer`, keeps requests and responses in separate queues (a 200 and a NOTIFY may
//! arrive in either order) and answers requests. Every read is bounded by a timeout.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use legate::sip::header::HeaderName;
use legate::sip::{Frame, Framer, SipMessage};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const WAIT: Duration = Duration::from_secs(5);

/// Builds a message from header lines and a body; `{CL}` is replaced by the body length.
pub fn build(lines: &[&str], body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for l in lines {
        let l = l.replace("{CL}", &body.len().to_string());
        v.extend_from_slice(l.as_bytes());
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"\r\n");
    v.extend_from_slice(body);
    v
}

/// Any byte stream the UA can speak over (TCP, TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A TLS connection to `addr` as a foreign edge would open it: trusting the PEM CA at `ca`,
/// presenting `client` (certificate and key PEM paths) if given, asking for `server_name`.
pub async fn connect_tls(
    addr: SocketAddr,
    ca: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
    server_name: &str,
) -> Result<Ua> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = legate::tls::load_trust_bundle(ca)?;
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => b.with_client_auth_cert(
            legate::tls::load_certs(cert)?,
            legate::tls::load_private_key(key)?,
        )?,
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .context("connect timeout")??;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
    let s = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .context("TLS handshake timeout")??;
    Ok(Ua::from_stream(s))
}

pub struct Ua {
    pub stream: Box<dyn Io>,
    framer: Framer,
    requests: VecDeque<SipMessage>,
    responses: VecDeque<SipMessage>,
    /// Raw non-message frames seen (keep-alive pongs are counted here).
    pub pongs: usize,
    /// Bytes of 400 answers etc. are parsed like any response.
    next_branch: u32,
    salt: u64,
}

impl Ua {
    pub async fn connect(addr: SocketAddr) -> Result<Ua> {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .context("connect timeout")??;
        Ok(Ua::from_stream(stream))
    }

    pub fn from_stream(stream: impl Io + 'static) -> Ua {
        Ua {
            stream: Box::new(stream),
            framer: Framer::default(),
            requests: VecDeque::new(),
            responses: VecDeque::new(),
            pongs: 0,
            next_branch: 1,
            salt: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
        }
    }

    /// Accepts one connection on `l` (Legate's outbound connection to our "route").
    pub async fn accept(l: &TcpListener) -> Result<Ua> {
        let (s, _) = tokio::time::timeout(WAIT, l.accept())
            .await
            .context("no connection from the edge")??;
        Ok(Ua::from_stream(s))
    }

    pub fn branch(&mut self) -> String {
        self.next_branch += 1;
        format!("z9hG4bKua{}x{}", self.salt, self.next_branch)
    }

    pub async fn send_raw(&mut self, b: &[u8]) -> Result<()> {
        self.stream.write_all(b).await?;
        self.stream.flush().await?;
        Ok(())
    }

    pub async fn send(&mut self, lines: &[&str], body: &[u8]) -> Result<()> {
        let b = build(lines, body);
        self.send_raw(&b).await
    }

    /// Reads until one more message is queued; `Ok(false)` on EOF.
    async fn fill(&mut self, limit: Duration) -> Result<bool> {
        let mut buf = [0u8; 8192];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.framer.next() {
                Ok(Some(Frame::Message(m))) => {
                    if m.is_request() {
                        self.requests.push_back(*m);
                    } else {
                        self.responses.push_back(*m);
                    }
                    return Ok(true);
                }
                Ok(Some(Frame::KeepAlive)) => {}
                Ok(Some(Frame::Bad { reason, .. })) => bail!("edge sent a bad message: {reason}"),
                Ok(None) => {}
                Err(e) => bail!("framing: {e}"),
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .map_err(|_| anyhow!("timed out waiting for a message"))??;
            if n == 0 {
                return Ok(false);
            }
            // A lone CRLF pong (RFC 5626) is not a frame for the framer: count and skip it.
            let mut data = buf.get(..n).unwrap_or(&[]);
            if self.framer.buffered() == 0 {
                while let Some(rest) = data.strip_prefix(b"\r\n") {
                    self.pongs += 1;
                    data = rest;
                }
            }
            self.framer.push(data);
        }
    }

    pub async fn response(&mut self) -> Result<SipMessage> {
        loop {
            if let Some(m) = self.responses.pop_front() {
                return Ok(m);
            }
            if !self.fill(WAIT).await? {
                bail!("connection closed while waiting for a response");
            }
        }
    }

    /// The next request with `method`; other requests stay queued.
    pub async fn request(&mut self, method: &str) -> Result<SipMessage> {
        loop {
            if let Some(i) = self
                .requests
                .iter()
                .position(|r| r.method() == Some(method))
            {
                if let Some(m) = self.requests.remove(i) {
                    return Ok(m);
                }
            }
            if !self.fill(WAIT).await? {
                bail!("connection closed while waiting for {method}");
            }
        }
    }

    /// `true` if nothing arrives within `d`.
    pub async fn quiet(&mut self, d: Duration) -> bool {
        if !self.requests.is_empty() || !self.responses.is_empty() {
            return false;
        }
        !matches!(self.fill(d).await, Ok(true))
    }

    /// Reads until EOF (bounded); `true` if the edge closed the connection.
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Answers `req` with `code` (adds a To tag when it has none), extra lines and body.
    pub async fn respond(
        &mut self,
        req: &SipMessage,
        code: u16,
        reason: &str,
        extra: &[(&str, &str)],
        body: Option<(&str, &[u8])>,
    ) -> Result<()> {
        let mut r = req
            .build_response(code, reason, Some("uatag"))
            .map_err(|e| anyhow!("{e}"))?;
        let at = r.header_index(HeaderName::ContentLength).unwrap_or(0);
        for (i, (n, v)) in extra.iter().enumerate() {
            r.insert_header(at + i, n, v).map_err(|e| anyhow!("{e}"))?;
        }
        if let Some((ct, b)) = body {
            let at = r.header_index(HeaderName::ContentLength).unwrap_or(0);
            r.insert_header(at, "Content-Type", ct)
                .map_err(|e| anyhow!("{e}"))?;
            r.set_body(bytes::Bytes::copy_from_slice(b))
                .map_err(|e| anyhow!("{e}"))?;
        }
        let b = r.to_bytes();
        self.send_raw(&b).await
    }
}

/// A header value of a message, or "".
pub fn hv<'m>(m: &'m SipMessage, name: &str) -> &'m str {
    m.header_value_by_raw_name(name).unwrap_or("")
}

/// The To tag of a message.
pub fn to_tag(m: &SipMessage) -> String {
    m.to()
        .ok()
        .and_then(|t| t.tag().map(str::to_owned))
        .unwrap_or_default()
}

/// The From tag of a message.
pub fn from_tag(m: &SipMessage) -> String {
    m.from()
        .ok()
        .and_then(|t| t.tag().map(str::to_owned))
        .unwrap_or_default()
}

pub fn body_str(m: &SipMessage) -> String {
    String::from_utf8_lossy(m.body()).into_owned()
}

/// A program a test needs. A missing one fails the test (never a silent skip) and names the
/// Debian package that provides it.
#[allow(dead_code)]
pub fn require_program<'a>(path: &'a str, package: &str) -> &'a std::path::Path {
    let p = std::path::Path::new(path);
    assert!(
        p.exists(),
        "{path} is missing: install the Debian package `{package}` (apt-get install {package})"
    );
    p
}

/// Counts what the home side receives, by kind, so a test can assert exact totals.
#[allow(dead_code)]
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub messages: usize,
    pub subscribes: usize,
    pub unsubscribes: usize,
    pub other: Vec<String>,
}

#[allow(dead_code)]
impl Tally {
    pub fn add(&mut self, body: &legate::gateway::Body) {
        use legate::gateway::{Body, Subscription};
        match body {
            Body::Message(_) => self.messages += 1,
            Body::Subscription(Subscription::Subscribe) => self.subscribes += 1,
            Body::Subscription(Subscription::Unsubscribe) => self.unsubscribes += 1,
            other => self.other.push(format!("{other:?}")),
        }
    }

    /// Drains `home` until the tally has at least `messages` messages, `subscribes` subscribes
    /// and `unsubscribes` unsubscribes, or `limit` passes; returns what was counted.
    pub async fn collect(
        home: &mut tokio::sync::mpsc::Receiver<legate::gateway::hub::Delivery>,
        want: (usize, usize, usize),
        limit: Duration,
    ) -> Tally {
        let mut t = Tally::default();
        let deadline = tokio::time::Instant::now() + limit;
        while t.messages < want.0 || t.subscribes < want.1 || t.unsubscribes < want.2 {
            match tokio::time::timeout_at(deadline, home.recv()).await {
                Ok(Some(d)) => t.add(&d.envelope.body),
                _ => break,
            }
        }
        t
    }
}
