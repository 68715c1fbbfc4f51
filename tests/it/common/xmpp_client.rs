//! Minimal XMPP pieces for tests against real servers: a stanza framer, a stream connection
//! ([`XmlConn`]) usable for c2s, component or s2s test peers, and a c2s client ([`XmppClient`]:
//! optional STARTTLS, SASL PLAIN, resource bind, presence/subscription/message helpers).
//!
//! Test code, not Legate's codec: the framer counts element depth over raw bytes (quoted attribute
//! values respected) and hands complete top-level elements to quick-xml for a light parsed view.
//! It handles stanzas split across reads and several stanzas in one read. No DTDs, comments or
//! CDATA are expected from a server. Every wait is bounded by a timeout; nothing here can hang.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use quick_xml::events::Event;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Default bound for a single protocol step (connect, negotiation round trip).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";

/// XML-escapes text or an attribute value.
pub fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Framing

/// What the framer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `<stream:stream ...>` opening tag (text of the tag only).
    StreamOpen(String),
    /// A complete top-level element.
    Element(String),
    /// `</stream:stream>`.
    StreamClose,
}

/// Incremental depth-counting framer over an XMPP stream.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet framed.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            // Whitespace between top-level elements (keepalives) is dropped.
            let skip = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            self.buf.drain(..skip);
            if self.buf.is_empty() {
                return Ok(None);
            }
            if self.buf[0] != b'<' {
                bail!(
                    "text at top level of stream: {:?}",
                    String::from_utf8_lossy(&self.buf[..self.buf.len().min(80)])
                );
            }
            if self.buf.starts_with(b"<?") {
                match find(&self.buf, b"?>") {
                    Some(end) => {
                        self.buf.drain(..end + 2);
                        continue;
                    }
                    None => return Ok(None),
                }
            }
            let mut pos = 0;
            let mut depth: usize = 0;
            loop {
                // pos is at '<'
                let Some(tag_end) = tag_end(&self.buf, pos) else {
                    return Ok(None);
                };
                let tag = &self.buf[pos..=tag_end];
                let closing = tag.starts_with(b"</");
                let empty = tag.ends_with(b"/>");
                let name = tag_name(tag);
                if depth == 0 && !closing && is_stream_tag(name) {
                    let text = self.take(tag_end + 1)?;
                    return Ok(Some(Frame::StreamOpen(text)));
                }
                if depth == 0 && closing && is_stream_tag(name) {
                    self.buf.drain(..=tag_end);
                    return Ok(Some(Frame::StreamClose));
                }
                if closing {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| anyhow!("unbalanced closing tag"))?;
                } else if !empty {
                    depth += 1;
                }
                if depth == 0 {
                    let text = self.take(tag_end + 1)?;
                    return Ok(Some(Frame::Element(text)));
                }
                // Skip text content to the next tag.
                match self.buf[tag_end + 1..].iter().position(|&b| b == b'<') {
                    Some(off) => pos = tag_end + 1 + off,
                    None => return Ok(None),
                }
            }
        }
    }

    fn take(&mut self, n: usize) -> Result<String> {
        let bytes: Vec<u8> = self.buf.drain(..n).collect();
        String::from_utf8(bytes).context("invalid UTF-8 in stream")
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Index of the `>` closing the tag that starts at `start`, respecting quoted attribute values.
fn tag_end(buf: &[u8], start: usize) -> Option<usize> {
    let mut quote: Option<u8> = None;
    for (i, &b) in buf.iter().enumerate().skip(start + 1) {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' => quote = Some(b),
            None if b == b'>' => return Some(i),
            None => {}
        }
    }
    None
}

fn tag_name(tag: &[u8]) -> &[u8] {
    let start = if tag.starts_with(b"</") { 2 } else { 1 };
    let rest = &tag[start..];
    let len = rest
        .iter()
        .position(|&b| b.is_ascii_whitespace() || b == b'/' || b == b'>')
        .unwrap_or(rest.len());
    &rest[..len]
}

fn is_stream_tag(name: &[u8]) -> bool {
    name == b"stream:stream" || name == b"stream"
}

// ---------------------------------------------------------------------------------------------
// Light parsed view

/// A complete top-level element with a light parsed view.
#[derive(Clone, PartialEq, Eq)]
pub struct Stanza {
    pub raw: String,
    /// Local name of the root element: `message`, `presence`, `iq`, `features`, `handshake`...
    pub name: String,
    /// Qualified name of the root element as written (`stream:features`).
    pub qname: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub type_: Option<String>,
    pub id: Option<String>,
    /// Text of direct children `<body>`, `<show>`, `<status>`.
    pub body: Option<String>,
    pub show: Option<String>,
    pub status: Option<String>,
    /// Local names of all descendant elements, in document order.
    pub children: Vec<String>,
}

impl fmt::Debug for Stanza {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl Stanza {
    pub fn parse(raw: &str) -> Result<Stanza> {
        let mut reader = quick_xml::Reader::from_str(raw);
        let mut st = Stanza {
            raw: raw.to_owned(),
            name: String::new(),
            qname: String::new(),
            from: None,
            to: None,
            type_: None,
            id: None,
            body: None,
            show: None,
            status: None,
            children: Vec::new(),
        };
        let mut depth = 0usize;
        // Text collector for the current direct child (depth 1), if it is body/show/status.
        let mut collecting: Option<(String, String)> = None;
        loop {
            let ev = reader
                .read_event()
                .with_context(|| format!("parsing stanza {raw}"))?;
            match ev {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let is_empty = matches!(ev, Event::Empty(_));
                    let local = e.local_name().as_ref().to_owned();
                    if depth == 0 {
                        st.qname = e.name().as_ref().to_owned();
                        st.name = local;
                        for a in e.attributes() {
                            let a = a.context("attribute")?;
                            let v = a
                                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .context("attribute value")?
                                .into_owned();
                            match a.key.as_ref() {
                                "from" => st.from = Some(v),
                                "to" => st.to = Some(v),
                                "type" => st.type_ = Some(v),
                                "id" => st.id = Some(v),
                                _ => {}
                            }
                        }
                    } else {
                        if depth == 1 && matches!(local.as_str(), "body" | "show" | "status") {
                            if is_empty {
                                set_text(&mut st, &local, String::new());
                            } else {
                                collecting = Some((local.clone(), String::new()));
                            }
                        }
                        st.children.push(local);
                    }
                    if !is_empty {
                        depth += 1;
                    }
                }
                Event::End(_) => {
                    depth = depth.saturating_sub(1);
                    if depth == 1 {
                        if let Some((name, text)) = collecting.take() {
                            set_text(&mut st, &name, text);
                        }
                    }
                }
                Event::Text(t) => {
                    if let Some((_, text)) = collecting.as_mut() {
                        text.push_str(&t.xml10_content());
                    }
                }
                Event::CData(t) => {
                    if let Some((_, text)) = collecting.as_mut() {
                        text.push_str(&t.xml10_content());
                    }
                }
                Event::GeneralRef(r) => {
                    if let Some((_, text)) = collecting.as_mut() {
                        if r.is_char_ref() {
                            if let Ok(Some(c)) = r.resolve_char_ref() {
                                text.push(c);
                            }
                        } else if let Some(s) =
                            quick_xml::escape::resolve_predefined_entity(&r.xml10_content())
                        {
                            text.push_str(s);
                        } else {
                            bail!("undefined entity in stanza: {raw}");
                        }
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        if st.name.is_empty() {
            bail!("no element in {raw:?}");
        }
        Ok(st)
    }

    /// True for `<stream:error>`.
    pub fn is_stream_error(&self) -> bool {
        self.name == "error" && self.qname.starts_with("stream:")
    }

    pub fn has_child(&self, local_name: &str) -> bool {
        self.children.iter().any(|c| c == local_name)
    }

    /// Bare JID of `from` (resource stripped).
    pub fn sender_bare(&self) -> Option<&str> {
        self.from
            .as_deref()
            .map(|f| f.split('/').next().unwrap_or(f))
    }

    pub fn is_type(&self, t: &str) -> bool {
        self.type_.as_deref() == Some(t)
    }
}

fn set_text(st: &mut Stanza, name: &str, text: String) {
    match name {
        "body" => st.body = Some(text),
        "show" => st.show = Some(text),
        "status" => st.status = Some(text),
        _ => {}
    }
}

/// Value of attribute `name` in a stream header (`<stream:stream ... id='...'>`).
pub fn header_attr(header: &str, name: &str) -> Option<String> {
    let mut reader = quick_xml::Reader::from_str(header);
    if let Ok(Event::Start(e)) | Ok(Event::Empty(e)) = reader.read_event() {
        for a in e.attributes().flatten() {
            if a.key.as_ref() == name {
                return a
                    .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                    .ok()
                    .map(|v| v.into_owned());
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Connection

/// Anything a stream can run over (TCP, TLS over TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An XML stream over a socket: framed reads, raw writes, a backlog of stanzas skipped by
/// [`XmlConn::next_stanza_matching`].
pub struct XmlConn {
    io: Box<dyn Io>,
    framer: Framer,
    backlog: VecDeque<Stanza>,
    /// Log of what went in and out (for failure messages), bounded.
    trace: VecDeque<String>,
    label: String,
}

const TRACE_LINES: usize = 200;

impl XmlConn {
    pub fn new(io: Box<dyn Io>, label: &str) -> Self {
        XmlConn {
            io,
            framer: Framer::new(),
            backlog: VecDeque::new(),
            trace: VecDeque::new(),
            label: label.to_owned(),
        }
    }

    /// TCP connect, bounded by [`STEP_TIMEOUT`].
    pub async fn connect(addr: SocketAddr, label: &str) -> Result<Self> {
        let tcp = timeout(STEP_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("{label}: connect to {addr} timed out"))?
            .with_context(|| format!("{label}: connect to {addr}"))?;
        tcp.set_nodelay(true).ok();
        Ok(Self::new(Box::new(tcp), label))
    }

    fn note(&mut self, line: String) {
        if self.trace.len() == TRACE_LINES {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    /// The last lines sent (`>>`) and received (`<<`).
    pub fn trace(&self) -> String {
        self.trace.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    pub async fn send_raw(&mut self, xml: &str) -> Result<()> {
        self.note(format!(">> {xml}"));
        timeout(STEP_TIMEOUT, async {
            self.io.write_all(xml.as_bytes()).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| anyhow!("{}: write timed out", self.label))?
        .with_context(|| format!("{}: write", self.label))
    }

    /// The next frame from the socket (not the backlog), waiting at most `wait`.
    pub async fn next_frame(&mut self, wait: Duration) -> Result<Frame> {
        let label = self.label.clone();
        let res = timeout(wait, async {
            loop {
                if let Some(f) = self.framer.next_frame()? {
                    return Ok::<Frame, anyhow::Error>(f);
                }
                let mut chunk = [0u8; 8192];
                let n = self.io.read(&mut chunk).await.context("read")?;
                if n == 0 {
                    bail!("connection closed by peer");
                }
                self.framer.push(&chunk[..n]);
            }
        })
        .await;
        match res {
            Err(_) => Err(anyhow!(
                "{label}: no frame within {wait:?}\n--- trace ---\n{}",
                self.trace()
            )),
            Ok(Err(e)) => Err(e.context(format!(
                "{label}: reading stream\n--- trace ---\n{}",
                self.trace()
            ))),
            Ok(Ok(f)) => {
                self.note(match &f {
                    Frame::StreamOpen(s) | Frame::Element(s) => format!("<< {s}"),
                    Frame::StreamClose => "<< </stream:stream>".to_owned(),
                });
                Ok(f)
            }
        }
    }

    /// Waits for the peer's stream header; returns the tag text.
    pub async fn expect_stream_open(&mut self, wait: Duration) -> Result<String> {
        match self.next_frame(wait).await? {
            Frame::StreamOpen(h) => Ok(h),
            other => bail!("{}: expected stream header, got {other:?}", self.label),
        }
    }

    /// The next top-level element from the socket (the backlog is not consulted).
    pub async fn next_stanza(&mut self, wait: Duration) -> Result<Stanza> {
        match self.next_frame(wait).await? {
            Frame::Element(s) => {
                let st = Stanza::parse(&s)?;
                if st.is_stream_error() {
                    bail!("{}: stream error: {}", self.label, st.raw);
                }
                Ok(st)
            }
            other => bail!(
                "{}: expected a stanza, got {other:?}\n--- trace ---\n{}",
                self.label,
                self.trace()
            ),
        }
    }

    /// The first stanza (backlog first, then the socket) for which `pred` holds, waiting at most
    /// `wait` overall. Non-matching stanzas stay in the backlog for later calls. Fails at once on
    /// a stream error or stream close.
    pub async fn next_stanza_matching(
        &mut self,
        pred: impl Fn(&Stanza) -> bool,
        wait: Duration,
    ) -> Result<Stanza> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return Ok(self.backlog.remove(i).expect("index from position"));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let st = match self.next_stanza(left).await {
                Ok(st) => st,
                Err(e) => {
                    return Err(e.context(format!(
                        "{}: waiting {wait:?} for a matching stanza; skipped so far: {:?}",
                        self.label, self.backlog
                    )))
                }
            };
            if pred(&st) {
                return Ok(st);
            }
            self.backlog.push_back(st);
        }
    }

    /// Stanzas received but not yet consumed.
    pub fn backlog(&self) -> &VecDeque<Stanza> {
        &self.backlog
    }

    /// Gives back the socket (e.g. for STARTTLS). Fails if unframed bytes are buffered.
    pub fn into_io(self) -> Result<(Box<dyn Io>, VecDeque<String>)> {
        if !self.framer.pending().is_empty() {
            bail!(
                "{}: {} unframed bytes buffered when switching transport",
                self.label,
                self.framer.pending().len()
            );
        }
        Ok((self.io, self.trace))
    }
}

// ---------------------------------------------------------------------------------------------
// XEP-0114 component

/// Connects to a server's component port as `domain` (XEP-0114: `jabber:component:accept`,
/// handshake = lowercase hex SHA-1(stream id + secret)) and returns the authenticated stream.
/// Fails with the server's stream error (e.g. `not-authorized`) if the secret is wrong.
pub async fn connect_component(addr: SocketAddr, domain: &str, secret: &str) -> Result<XmlConn> {
    use sha1::Digest as _;
    let mut conn = XmlConn::connect(addr, &format!("component {domain}")).await?;
    conn.send_raw(&format!(
        "<stream:stream xmlns='jabber:component:accept' xmlns:stream='{NS_STREAMS}' to='{}'>",
        esc(domain)
    ))
    .await?;
    let header = conn.expect_stream_open(STEP_TIMEOUT).await?;
    let id = header_attr(&header, "id")
        .ok_or_else(|| anyhow!("component {domain}: no stream id in {header}"))?;
    let digest = hex::encode(sha1::Sha1::digest(format!("{id}{secret}").as_bytes()));
    conn.send_raw(&format!("<handshake>{digest}</handshake>"))
        .await?;
    let ack = conn.next_stanza(STEP_TIMEOUT).await?;
    if ack.name != "handshake" {
        bail!("component {domain}: handshake refused: {}", ack.raw);
    }
    Ok(conn)
}

// ---------------------------------------------------------------------------------------------
// c2s client

/// How to verify the server in STARTTLS.
#[derive(Clone)]
pub struct TlsOptions {
    /// PEM of the CA(s) to trust.
    pub ca_pem: Vec<u8>,
    /// Name to verify (normally the XMPP domain).
    pub server_name: String,
}

/// Connection parameters for [`XmppClient::connect`].
#[derive(Clone)]
pub struct ClientConfig {
    pub addr: SocketAddr,
    pub domain: String,
    pub username: String,
    pub password: String,
    pub resource: String,
    /// `Some` → STARTTLS is required; `None` → plaintext (the server must allow it).
    pub tls: Option<TlsOptions>,
}

impl ClientConfig {
    pub fn plain(addr: SocketAddr, domain: &str, username: &str, password: &str) -> Self {
        ClientConfig {
            addr,
            domain: domain.to_owned(),
            username: username.to_owned(),
            password: password.to_owned(),
            resource: "test".to_owned(),
            tls: None,
        }
    }
}

/// A logged-in c2s session with a bound resource.
pub struct XmppClient {
    conn: XmlConn,
    jid: String,
    next_id: u64,
}

fn stream_header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAMS}' to='{}' version='1.0'>",
        esc(domain)
    )
}

impl XmppClient {
    /// Connects, negotiates (STARTTLS if configured, SASL PLAIN, bind), fetches the roster and
    /// returns the session.
    /// Each step is bounded by [`STEP_TIMEOUT`]. Does not send initial presence.
    pub async fn connect(cfg: ClientConfig) -> Result<XmppClient> {
        let label = format!("c2s {}@{}", cfg.username, cfg.domain);
        let mut conn = XmlConn::connect(cfg.addr, &label).await?;
        conn.send_raw(&stream_header(&cfg.domain)).await?;
        conn.expect_stream_open(STEP_TIMEOUT).await?;
        let mut features = conn.next_stanza(STEP_TIMEOUT).await?;

        if let Some(tls) = &cfg.tls {
            if !features.has_child("starttls") {
                bail!("{label}: server does not offer STARTTLS: {}", features.raw);
            }
            conn.send_raw("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                .await?;
            let r = conn.next_stanza(STEP_TIMEOUT).await?;
            if r.name != "proceed" {
                bail!("{label}: STARTTLS refused: {}", r.raw);
            }
            let (io, _) = conn.into_io()?;
            let io = starttls(io, tls).await.context(label.clone())?;
            conn = XmlConn::new(io, &label);
            conn.send_raw(&stream_header(&cfg.domain)).await?;
            conn.expect_stream_open(STEP_TIMEOUT).await?;
            features = conn.next_stanza(STEP_TIMEOUT).await?;
        }

        if !features.raw.contains(">PLAIN<") {
            bail!(
                "{label}: server does not offer SASL PLAIN: {}",
                features.raw
            );
        }
        let creds = base64::engine::general_purpose::STANDARD
            .encode(format!("\0{}\0{}", cfg.username, cfg.password));
        conn.send_raw(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>"
        ))
        .await?;
        let r = conn.next_stanza(STEP_TIMEOUT).await?;
        if r.name != "success" {
            bail!("{label}: SASL PLAIN failed: {}", r.raw);
        }
        conn.send_raw(&stream_header(&cfg.domain)).await?;
        conn.expect_stream_open(STEP_TIMEOUT).await?;
        let features = conn.next_stanza(STEP_TIMEOUT).await?;
        if !features.has_child("bind") {
            bail!("{label}: no resource binding offered: {}", features.raw);
        }
        conn.send_raw(&format!(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{}</resource></bind></iq>",
            esc(&cfg.resource)
        ))
        .await?;
        let r = conn
            .next_stanza_matching(|s| s.id.as_deref() == Some("bind1"), STEP_TIMEOUT)
            .await?;
        if !r.is_type("result") {
            bail!("{label}: bind failed: {}", r.raw);
        }
        let jid = extract_text(&r.raw, "jid")
            .ok_or_else(|| anyhow!("{label}: no <jid> in bind result: {}", r.raw))?;
        // Fetch the roster: Prosody sends subscription presences (subscribe/subscribed/...) and
        // roster pushes only to "interested" resources, i.e. those that requested the roster
        // (RFC 6121 §2.1.6, mod_presence `send_to_interested_resources`).
        conn.send_raw("<iq type='get' id='roster1'><query xmlns='jabber:iq:roster'/></iq>")
            .await?;
        let r = conn
            .next_stanza_matching(|s| s.id.as_deref() == Some("roster1"), STEP_TIMEOUT)
            .await?;
        if !r.is_type("result") {
            bail!("{label}: roster get failed: {}", r.raw);
        }
        Ok(XmppClient {
            conn,
            jid,
            next_id: 1,
        })
    }

    /// Full JID bound by the server.
    pub fn jid(&self) -> &str {
        &self.jid
    }

    pub fn bare_jid(&self) -> &str {
        self.jid.split('/').next().unwrap_or(&self.jid)
    }

    pub fn conn(&mut self) -> &mut XmlConn {
        &mut self.conn
    }

    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("c{}", self.next_id)
    }

    pub async fn send_raw(&mut self, xml: &str) -> Result<()> {
        self.conn.send_raw(xml).await
    }

    /// Initial / broadcast presence, with optional `<show>` and `<status>`.
    pub async fn send_presence(&mut self, show: Option<&str>, status: Option<&str>) -> Result<()> {
        let mut x = String::from("<presence>");
        if let Some(s) = show {
            x.push_str(&format!("<show>{}</show>", esc(s)));
        }
        if let Some(s) = status {
            x.push_str(&format!("<status>{}</status>", esc(s)));
        }
        x.push_str("</presence>");
        self.send_raw(&x).await
    }

    /// `<presence type='subscribe'>` to a bare JID.
    pub async fn subscribe(&mut self, jid: &str) -> Result<()> {
        self.send_raw(&format!("<presence to='{}' type='subscribe'/>", esc(jid)))
            .await
    }

    /// `<presence type='subscribed'>`: approve `jid`'s subscription request.
    pub async fn approve(&mut self, jid: &str) -> Result<()> {
        self.send_raw(&format!("<presence to='{}' type='subscribed'/>", esc(jid)))
            .await
    }

    pub async fn send_message(&mut self, to: &str, body: &str) -> Result<()> {
        let id = self.id();
        self.send_raw(&format!(
            "<message to='{}' type='chat' id='{id}'><body>{}</body></message>",
            esc(to),
            esc(body)
        ))
        .await
    }

    /// See [`XmlConn::next_stanza_matching`].
    pub async fn next_stanza_matching(
        &mut self,
        pred: impl Fn(&Stanza) -> bool,
        wait: Duration,
    ) -> Result<Stanza> {
        self.conn.next_stanza_matching(pred, wait).await
    }

    /// Next `<message>` with a body from `from_bare`.
    pub async fn expect_message_from(&mut self, from_bare: &str, wait: Duration) -> Result<Stanza> {
        self.next_stanza_matching(
            |s| s.name == "message" && s.body.is_some() && s.sender_bare() == Some(from_bare),
            wait,
        )
        .await
    }

    /// Next `<presence>` from `from_bare` whose type is `type_` (`None` = available).
    pub async fn expect_presence_from(
        &mut self,
        from_bare: &str,
        type_: Option<&str>,
        wait: Duration,
    ) -> Result<Stanza> {
        self.next_stanza_matching(
            |s| {
                s.name == "presence"
                    && s.sender_bare() == Some(from_bare)
                    && s.type_.as_deref() == type_
            },
            wait,
        )
        .await
    }

    /// Sends `</stream:stream>` (best effort) and drops the connection.
    pub async fn close(mut self) {
        let _ = self.conn.send_raw("</stream:stream>").await;
    }
}

/// Text content of the first `<name>` element in `xml` (no nesting expected).
fn extract_text(xml: &str, name: &str) -> Option<String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut inside = false;
    let mut out = String::new();
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) if e.local_name().as_ref() == name => inside = true,
            Event::Text(t) if inside => out.push_str(&t.xml10_content()),
            Event::End(e) if inside && e.local_name().as_ref() == name => return Some(out),
            Event::Eof => return None,
            _ => {}
        }
    }
}

async fn starttls(io: Box<dyn Io>, tls: &TlsOptions) -> Result<Box<dyn Io>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &tls.ca_pem[..]) {
        roots
            .add(cert.context("parsing CA PEM")?)
            .context("adding CA")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(tls.server_name.clone())
        .context("TLS server name")?;
    let stream = timeout(STEP_TIMEOUT, connector.connect(name, io))
        .await
        .map_err(|_| anyhow!("TLS handshake timed out"))?
        .context("TLS handshake")?;
    Ok(Box::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_and_joined() {
        let input = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' id='a>b'>\n <message from='x@y' to='z'><body>hi &amp; &lt;3</body></message><presence/> </stream:stream>";
        // Feed one byte at a time: every split point must work.
        let mut f = Framer::new();
        let mut frames = Vec::new();
        for b in input.as_bytes() {
            f.push(std::slice::from_ref(b));
            while let Some(fr) = f.next_frame().expect("frame") {
                frames.push(fr);
            }
        }
        assert_eq!(frames.len(), 4, "{frames:?}");
        assert!(
            matches!(&frames[0], Frame::StreamOpen(h) if header_attr(h, "id").as_deref() == Some("a>b"))
        );
        let Frame::Element(m) = &frames[1] else {
            panic!("{frames:?}")
        };
        let st = Stanza::parse(m).expect("parse");
        assert_eq!(st.name, "message");
        assert_eq!(st.body.as_deref(), Some("hi & <3"));
        assert_eq!(st.sender_bare(), Some("x@y"));
        assert_eq!(frames[2], Frame::Element("<presence/>".into()));
        assert_eq!(frames[3], Frame::StreamClose);
    }
}
