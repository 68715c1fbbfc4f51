//! Sans-IO XMPP stream framer (RFC 6120 §4, §11).
//!
//! [`StreamFramer`] owns the receive buffer of one stream: the driver pushes whatever bytes the
//! socket produced and pulls [`StreamEvent`]s: the stream header, each complete top-level element
//! as its exact bytes with the namespace context it inherited, and the stream close. It does no
//! I/O and knows nothing about negotiation; it enforces the restricted XML profile of RFC 6120
//! §11 and the size/depth/attribute bounds, so nothing unbounded or expandable ever reaches the
//! layers above.
//!
//! How it works (see `shared/design/crates.md`, "XMPP streams with quick-xml"): quick-xml is run
//! over the buffered bytes only up to the last `>` (so every construct it sees is complete), with
//! our own namespace resolver, element-name stack and depth kept across calls, so each byte is
//! parsed once however the input is fragmented. A construct that contains a `>` but is not yet
//! complete (a `>` inside an attribute value or CDATA section) is finished by a small resumable
//! scan instead of re-parsing. Invalid UTF-8 and characters XML 1.0 forbids are located as they
//! arrive and reported once every complete element before them has been handed out, so a
//! `<proceed/>` followed by TLS bytes is still delivered. Whitespace between elements
//! (keepalives) is consumed and dropped at once. The outcome (events and error condition) does
//! not depend on how the input was fragmented; tests check that on every split point.
//!
//! Driver contract: after each `push`, call `next_event` until `Ok(None)` (or an error, which
//! is final: send `error.to_xml()` and close). After `<proceed/>`, stop calling `next_event`,
//! call [`StreamFramer::take_buffered`] and hand those bytes to TLS; after SASL success call
//! [`StreamFramer::reset`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use memchr::{memchr3, memmem, memrchr};
use quick_xml::errors::{Error as XmlError, IllFormedError, SyntaxError};
use quick_xml::escape::EscapeError;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{NamespaceError, NamespaceResolver, ResolveResult};
use quick_xml::Reader;

use super::error::StreamErrorCondition;
use super::stanza::{
    NsContext, Stanza, NS_CLIENT, NS_COMPONENT_ACCEPT, NS_COMPONENT_CONNECT, NS_SERVER, NS_STREAMS,
};

/// Bounds applied to every stream (style.md §4: every bound is named and has a default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest top-level element (and largest stream header), in bytes; checked on pending bytes
    /// before the element ends (RFC 6120 §13.12 item 4).
    pub max_stanza_bytes: usize,
    /// Deepest element nesting inside a stanza (the stanza root is depth 1).
    pub max_depth: usize,
    /// Most attributes (namespace declarations included) on one element.
    pub max_attrs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attrs: 64,
        }
    }
}

/// Why the stream cannot go on. Each maps to one stream error condition ([`Self::condition`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    #[error("restricted XML (RFC 6120 §11.1): {0}")]
    RestrictedXml(String),
    #[error("policy violation: {0}")]
    PolicyViolation(String),
    #[error("unsupported encoding: {0}")]
    UnsupportedEncoding(String),
    #[error("invalid namespace: {0}")]
    InvalidNamespace(String),
    #[error("bad namespace prefix: {0}")]
    BadNamespacePrefix(String),
    #[error("bad format: {0}")]
    BadFormat(String),
}

impl StreamError {
    /// The stream error condition to send for this error (RFC 6120 §4.9.3).
    pub fn condition(&self) -> StreamErrorCondition {
        match self {
            StreamError::NotWellFormed(_) => StreamErrorCondition::NotWellFormed,
            StreamError::RestrictedXml(_) => StreamErrorCondition::RestrictedXml,
            StreamError::PolicyViolation(_) => StreamErrorCondition::PolicyViolation,
            StreamError::UnsupportedEncoding(_) => StreamErrorCondition::UnsupportedEncoding,
            StreamError::InvalidNamespace(_) => StreamErrorCondition::InvalidNamespace,
            StreamError::BadNamespacePrefix(_) => StreamErrorCondition::BadNamespacePrefix,
            StreamError::BadFormat(_) => StreamErrorCondition::BadFormat,
        }
    }
    /// `<stream:error>` bytes with the error's description as `<text>`.
    pub fn to_xml(&self) -> Vec<u8> {
        self.condition().to_xml(Some(&self.to_string()))
    }
}

/// The stream header (`<stream:stream ...>`, RFC 6120 §4.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    raw: Bytes,
    /// Attributes as (qualified name, unescaped value), in document order, including the
    /// namespace declarations.
    attrs: Vec<(String, String)>,
    ns: Arc<NsContext>,
}

impl StreamHeader {
    /// The header bytes as received (from the `<` of the stream element to its `>`; a leading XML
    /// declaration is not included).
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
    pub fn attrs(&self) -> &[(String, String)] {
        &self.attrs
    }
    /// Value of the attribute with this qualified name (`to`, `xml:lang`, `xmlns:db`...).
    pub fn attr(&self, qname: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == qname)
            .map(|(_, v)| v.as_str())
    }
    pub fn to(&self) -> Option<&str> {
        self.attr("to")
    }
    pub fn from(&self) -> Option<&str> {
        self.attr("from")
    }
    pub fn id(&self) -> Option<&str> {
        self.attr("id")
    }
    pub fn version(&self) -> Option<&str> {
        self.attr("version")
    }
    pub fn lang(&self) -> Option<&str> {
        self.attr("xml:lang")
    }
    /// The content namespace (`jabber:server`, `jabber:component:accept`...).
    pub fn default_ns(&self) -> &str {
        &self.ns.default_ns
    }
    /// Namespace bound to `prefix` on the header (`db` → `jabber:server:dialback`).
    pub fn prefix_ns(&self, prefix: &str) -> Option<&str> {
        self.ns
            .prefixed
            .iter()
            .find(|(p, _)| &**p == prefix)
            .map(|(_, n)| &**n)
    }
    pub fn ns_context(&self) -> &Arc<NsContext> {
        &self.ns
    }
    /// RFC 6120 §4.7.5: a `version` whose major number is above 1 (or that is not a version)
    /// gets `unsupported-version`. A missing `version` is a pre-RFC 3920 peer (still seen with
    /// dialback-only servers; the XEP-0220 examples omit it) and is tolerated here; whether to
    /// talk to it is the caller's policy.
    pub fn check_version(&self) -> Result<(), StreamErrorCondition> {
        let Some(v) = self.version() else {
            return Ok(());
        };
        let (major, minor) = v
            .split_once('.')
            .ok_or(StreamErrorCondition::UnsupportedVersion)?;
        let ok_num =
            |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit());
        if !ok_num(major) || !ok_num(minor) {
            return Err(StreamErrorCondition::UnsupportedVersion);
        }
        match major.trim_start_matches('0') {
            "1" => Ok(()),
            _ => Err(StreamErrorCondition::UnsupportedVersion),
        }
    }
}

/// What the framer produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    StreamOpen(StreamHeader),
    Stanza(Stanza),
    StreamClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prolog,
    Open,
    Closed,
}

/// A construct that contains a `>` but is not complete yet; finished by [`scan_stall`].
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// A tag whose `>` so far were inside quotes; `quote` is the open quote at `scanned`.
    Tag { quote: Option<u8>, scanned: usize },
    /// A CDATA section or XML declaration waiting for its terminator.
    Until { term: &'static [u8], scanned: usize },
}

/// Queued output: positions are absolute stream offsets; bytes are split off the buffer only
/// when the event is handed out, so `take_buffered` after `<proceed/>` returns exactly the bytes
/// that follow it.
#[derive(Debug)]
enum Pending {
    Open {
        start: usize,
        end: usize,
        attrs: Vec<(String, String)>,
        ns: Arc<NsContext>,
    },
    Stanza {
        start: usize,
        end: usize,
        meta: Meta,
    },
    Close {
        end: usize,
    },
}

/// Root-element facts collected while a stanza is parsed (absolute offsets).
#[derive(Debug, Clone, Default)]
struct Meta {
    qname: (usize, usize),
    local_at: usize,
    ns: Option<Arc<str>>,
    root_has_default: bool,
    needed: u64,
    to: Option<(usize, usize)>,
    from: Option<(usize, usize)>,
    id: Option<(usize, usize)>,
    ty: Option<(usize, usize)>,
}

/// Parser state carried across `push` calls.
#[derive(Debug)]
struct State {
    limits: Limits,
    phase: Phase,
    /// Absolute offset of `buf[0]`.
    base: usize,
    /// Absolute offset where parsing resumes (end of the last parsed event).
    scan: usize,
    stall: Option<Stall>,
    resolver: NamespaceResolver,
    ctx: Option<Arc<NsContext>>,
    stream_qname: String,
    /// Open elements of the current stanza: absolute (start, end) of their qualified names.
    names: Vec<(usize, usize)>,
    stanza_start: Option<usize>,
    meta: Meta,
    queue: VecDeque<Pending>,
    error: Option<StreamError>,
    seen_anything: bool,
    /// Events parsed so far (an XML declaration is only allowed as the first).
    events: usize,
    /// Absolute offset up to which bytes are known to be valid UTF-8 without control characters.
    checked: usize,
    /// First byte that can never be valid, once seen.
    poison: Option<(usize, StreamError)>,
    /// Bytes before this absolute offset have been searched for '>'; `last_gt` is the last
    /// one found (both keep a slow sender from making every push rescan its pending bytes).
    gt_from: usize,
    last_gt: Option<usize>,
}

impl State {
    fn new(limits: Limits, base: usize) -> State {
        State {
            limits,
            phase: Phase::Prolog,
            base,
            scan: base,
            stall: None,
            resolver: NamespaceResolver::default(),
            ctx: None,
            stream_qname: String::new(),
            names: Vec::new(),
            stanza_start: None,
            meta: Meta::default(),
            queue: VecDeque::new(),
            error: None,
            seen_anything: false,
            events: 0,
            checked: base,
            poison: None,
            gt_from: base,
            last_gt: None,
        }
    }
}

/// Incremental, bounded framer for one XMPP stream. See the module docs.
#[derive(Debug)]
pub struct StreamFramer {
    buf: BytesMut,
    st: State,
    /// The partial element now pending: its absolute start offset and when the driver first
    /// saw it ([`observe_partial`](Self::observe_partial)). Kept outside `State` so parsing
    /// stays independent of time.
    partial: Option<(usize, Instant)>,
}

impl Default for StreamFramer {
    fn default() -> Self {
        StreamFramer::new(Limits::default())
    }
}

impl StreamFramer {
    pub fn new(limits: Limits) -> StreamFramer {
        StreamFramer {
            buf: BytesMut::with_capacity(8192),
            st: State::new(limits, 0),
            partial: None,
        }
    }

    pub fn limits(&self) -> Limits {
        self.st.limits
    }

    /// Appends received bytes. Call [`next_event`](Self::next_event) until it returns
    /// `Ok(None)` after each push; the size cap is enforced there.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Number of bytes buffered and not yet handed out as events.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Restarts the stream (RFC 6120 §5.4.3.3 after TLS, §6.4.6 after SASL): forgets the header,
    /// namespaces and any parsed-ahead events, keeps the bytes not yet handed out (they are the
    /// peer's new stream header). Offsets restart at 0.
    pub fn reset(&mut self) {
        self.st = State::new(self.st.limits, 0);
        self.partial = None;
    }

    /// Absolute offset where the element not yet complete starts, if any bytes of one are
    /// buffered (inter-element whitespace is consumed and never counts).
    fn partial_start(&self) -> Option<usize> {
        let end = self.st.base + self.buf.len();
        let from = self.st.stanza_start.unwrap_or(self.st.scan);
        (end > from && self.st.queue.is_empty()).then_some(from)
    }

    /// When the element now pending (a stanza or the stream header that is not complete yet)
    /// was first seen, with `now` recorded as that moment for an element that was not pending
    /// at the previous call; `None` when nothing is pending. Call it after draining
    /// [`next_event`](Self::next_event) following each push: the driver then bounds the time
    /// from an element's first byte to its last (issue 10 item 2), which stops a peer holding
    /// a stream open by sending a byte now and then. Time is an argument: the framer never
    /// reads a clock.
    pub fn observe_partial(&mut self, now: Instant) -> Option<Instant> {
        match (self.partial_start(), self.partial) {
            (None, _) => self.partial = None,
            (Some(at), Some((seen, _))) if at == seen => {}
            (Some(at), _) => self.partial = Some((at, now)),
        }
        self.partial.map(|(_, t)| t)
    }

    /// Removes and returns every byte not yet handed out as an event, and resets the framer.
    /// After `<proceed/>` (RFC 6120 §5.4.3.3) these belong to the TLS handshake: give them to
    /// the TLS layer. Call it right after `<proceed/>` came out of `next_event`.
    pub fn take_buffered(&mut self) -> BytesMut {
        let out = self.buf.split();
        self.st = State::new(self.st.limits, 0);
        self.partial = None;
        out
    }

    /// The next complete event, `Ok(None)` if more bytes are needed. After an error the stream
    /// is dead: the same error is returned again.
    pub fn next_event(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        if self.st.queue.is_empty() && self.st.error.is_none() {
            // Drop bytes already consumed between top-level elements (whitespace) so a
            // keepalive flood cannot grow the buffer.
            let st = &mut self.st;
            if st.stanza_start.is_none() && st.stall.is_none() && st.scan > st.base {
                let n = (st.scan - st.base).min(self.buf.len());
                let _ = self.buf.split_to(n);
                st.base += n;
            }
            if let Err(e) = fill(&self.buf, &mut self.st) {
                self.st.error = Some(e);
            }
        }
        if let Some(p) = self.st.queue.pop_front() {
            return Ok(Some(self.take(p)));
        }
        match &self.st.error {
            Some(e) => Err(e.clone()),
            None => Ok(None),
        }
    }

    fn take(&mut self, p: Pending) -> StreamEvent {
        let base = self.st.base;
        let end = match &p {
            Pending::Open { end, .. } | Pending::Stanza { end, .. } | Pending::Close { end } => {
                *end
            }
        };
        let n = end.saturating_sub(base).min(self.buf.len());
        let chunk = self.buf.split_to(n).freeze();
        self.st.base = base + n;
        let rel = |a: usize| a.saturating_sub(base);
        match p {
            Pending::Open {
                start, attrs, ns, ..
            } => StreamEvent::StreamOpen(StreamHeader {
                raw: chunk.slice(rel(start).min(n)..),
                attrs,
                ns,
            }),
            Pending::Close { .. } => StreamEvent::StreamClose,
            Pending::Stanza { start, meta, .. } => {
                let s = rel(start).min(n);
                let r32 = |r: (usize, usize)| {
                    (
                        r.0.saturating_sub(start) as u32,
                        r.1.saturating_sub(start) as u32,
                    )
                };
                let ctx = self.st.ctx.clone().unwrap_or_else(|| {
                    Arc::new(NsContext {
                        default_ns: Arc::from(""),
                        prefixed: Vec::new(),
                    })
                });
                StreamEvent::Stanza(Stanza {
                    bytes: chunk.slice(s..),
                    offset: start as u64,
                    qname: r32(meta.qname),
                    local_at: meta.local_at as u32,
                    ns: meta.ns.unwrap_or_else(|| ctx.default_ns.clone()),
                    ctx,
                    needed: meta.needed,
                    root_has_default: meta.root_has_default,
                    to: meta.to.map(r32),
                    from: meta.from.map(r32),
                    id: meta.id.map(r32),
                    ty: meta.ty.map(r32),
                })
            }
        }
    }
}

fn nwf(s: impl Into<String>) -> StreamError {
    StreamError::NotWellFormed(s.into())
}

/// RFC 6120 §4.9.3.22: `unsupported-encoding` covers a stream that "has otherwise improperly
/// encoded the stream (e.g., by violating the rules of the UTF-8 encoding)" — more specific
/// than `not-well-formed`.
fn bad_utf8() -> StreamError {
    StreamError::UnsupportedEncoding("invalid UTF-8".into())
}

/// First character XML 1.0 forbids (§2.2 Char) in valid UTF-8 `b`, with its code point:
/// controls other than TAB, LF, CR, and the non-characters U+FFFE and U+FFFF (EF BF BE / EF BF
/// BF; in valid UTF-8 those bytes can be nothing else). Surrogates cannot occur in valid UTF-8.
fn first_forbidden(b: &[u8]) -> Option<(usize, u32)> {
    let control = b
        .iter()
        .position(|&c| c < 0x20 && c != b'\t' && c != b'\n' && c != b'\r')
        .map(|i| (i, u32::from(b[i])));
    let nonchar = memchr::memchr_iter(0xEF, b).find_map(|i| match b.get(i + 1..i + 3) {
        Some([0xBF, 0xBE]) => Some((i, 0xFFFE)),
        Some([0xBF, 0xBF]) => Some((i, 0xFFFF)),
        _ => None,
    });
    match (control, nonchar) {
        (Some(c), Some(n)) => Some(if c.0 < n.0 { c } else { n }),
        (c, n) => c.or(n),
    }
}

/// Parses as much of the buffer as is complete, queueing events.
fn fill(buf: &[u8], st: &mut State) -> Result<(), StreamError> {
    if st.phase == Phase::Closed {
        return Ok(());
    }
    let rel = st.scan.saturating_sub(st.base);
    let data = buf.get(rel..).unwrap_or(&[]);
    if data.is_empty() {
        return Ok(());
    }
    if st.phase == Phase::Prolog && !st.seen_anything {
        // RFC 6120 §11.6: UTF-8 only. A UTF-16 BOM or NUL-interleaved ASCII is another encoding.
        // Sniff only once at least two bytes are in.
        if data.len() < 2 {
            return Ok(());
        }
        if data.starts_with(&[0xFF, 0xFE]) || data.starts_with(&[0xFE, 0xFF]) {
            return Err(StreamError::UnsupportedEncoding(
                "UTF-16 byte order mark".into(),
            ));
        }
        if data[0] == 0 || data[1] == 0 {
            return Err(StreamError::UnsupportedEncoding(
                "UTF-16/32 without BOM".into(),
            ));
        }
        if data.len() < 3 && [0xEF, 0xBB, 0xBF].starts_with(data) {
            return Ok(());
        }
        st.seen_anything = true;
        if data.starts_with(&[0xEF, 0xBB, 0xBF]) {
            // A UTF-8 BOM is tolerated at the very start and skipped.
            st.scan += 3;
            return fill(buf, st);
        }
    }

    // Bytes that can never be valid (bad UTF-8, control characters) are located once, as they
    // arrive; parsing stops before them and the error is raised once everything before the
    // construct containing them has been queued. Fragmentation cannot change the outcome.
    let mut data = data;
    if st.phase != Phase::Closed && st.stanza_start.is_none() && st.stall.is_none() {
        // Whitespace between top-level elements (keepalives, RFC 6120 §4.6.1) is consumed here
        // so it is never rescanned and never held: `next_event` drops it from the buffer.
        let ws = data
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            .unwrap_or(data.len());
        if ws > 0 {
            st.scan += ws;
            // Whitespace counts as content for "the XML declaration comes first".
            st.events += 1;
            data = &data[ws..];
        }
        if data.is_empty() {
            return Ok(());
        }
    }
    let poison = find_poison(data, st);
    let clean = match &poison {
        Some((at, _)) => at.saturating_sub(st.scan).min(data.len()),
        None => data.len(),
    };

    // Finish a stalled construct with a resumable scan before running the parser again.
    if let Some(stall) = st.stall {
        match scan_stall(&data[..clean], stall) {
            Ok(()) => st.stall = None,
            Err(s) => {
                st.stall = Some(s);
                if let Some((_, e)) = poison {
                    return Err(e);
                }
                return check_pending(buf, st);
            }
        }
    }

    // The last '>' of the clean region, searching only bytes not searched before.
    let search_from = st.gt_from.saturating_sub(st.scan).min(clean);
    if let Some(i) = memrchr(b'>', &data[search_from..clean]) {
        st.last_gt = Some(st.scan + search_from + i);
    }
    st.gt_from = st.scan + clean;
    let Some(last_gt) = st.last_gt.filter(|&g| g >= st.scan).map(|g| g - st.scan) else {
        if let Some((_, e)) = poison {
            return Err(e);
        }
        if st.stanza_start.is_none() {
            // Between elements (leading whitespace was consumed above): refuse a comment, DTD
            // or PI as soon as it starts rather than when it ends, and character data at once.
            if data.starts_with(b"<!--")
                || data.starts_with(b"<!D")
                || data.starts_with(b"<!E")
                || (data.starts_with(b"<?") && (st.phase != Phase::Prolog || st.events != 0))
            {
                return Err(StreamError::RestrictedXml(
                    "comments, DTDs and processing instructions are not allowed".into(),
                ));
            }
            if data.first().is_some_and(|&b| b != b'<') {
                return Err(StreamError::BadFormat(
                    "character data at stream level".into(),
                ));
            }
        }
        return check_pending(buf, st);
    };
    // Valid by construction (checked by find_poison, and '>' is a character boundary).
    let window = data.get(..=last_gt).unwrap_or(&[]);
    let text = std::str::from_utf8(window).map_err(|_| bad_utf8())?;

    let start_abs = st.scan;
    parse(text, data, start_abs, buf, st)?;

    if st.phase != Phase::Closed {
        if let Some((_, e)) = poison {
            // Parsing stopped before the offending byte; the events before it are already
            // queued and are delivered before this error.
            return Err(e);
        }
    }
    check_pending(buf, st)
}

/// First byte in `data` (which starts at `st.scan`) that no XML stream may contain, as an
/// absolute offset. Only bytes not checked before are looked at.
fn find_poison(data: &[u8], st: &mut State) -> Option<(usize, StreamError)> {
    if let Some(p) = &st.poison {
        return Some(p.clone());
    }
    let from = st.checked.saturating_sub(st.scan).min(data.len());
    let new = &data[from..];
    let (valid, bad_utf8) = match std::str::from_utf8(new) {
        Ok(_) => (new.len(), false),
        // error_len() == None: an incomplete sequence at the end, wait for the rest.
        Err(e) => (e.valid_up_to(), e.error_len().is_some()),
    };
    let found = match first_forbidden(&new[..valid]) {
        Some((i, c)) => Some((i, nwf(format!("character U+{c:04X} is not allowed in XML")))),
        None if bad_utf8 => Some((valid, self::bad_utf8())),
        None => None,
    };
    match found {
        Some((i, e)) => {
            let p = (st.scan + from + i, e);
            st.poison = Some(p.clone());
            Some(p)
        }
        None => {
            st.checked = st.scan + from + valid;
            None
        }
    }
}

/// Enforces the size cap on bytes that do not form a complete element yet.
fn check_pending(buf: &[u8], st: &State) -> Result<(), StreamError> {
    let end = st.base + buf.len();
    let from = st.stanza_start.unwrap_or(st.scan);
    let pending = end.saturating_sub(from);
    if pending > st.limits.max_stanza_bytes {
        let what = if st.phase == Phase::Prolog {
            "stream header"
        } else {
            "stanza"
        };
        return Err(StreamError::PolicyViolation(format!(
            "{what} exceeds {} bytes",
            st.limits.max_stanza_bytes
        )));
    }
    Ok(())
}

/// Continues a stalled construct; `Ok` when its end is now buffered.
fn scan_stall(data: &[u8], stall: Stall) -> Result<(), Stall> {
    match stall {
        Stall::Tag { mut quote, scanned } => {
            let mut i = scanned.max(1);
            while i < data.len() {
                match quote {
                    Some(q) => match memchr::memchr(q, &data[i..]) {
                        Some(j) => {
                            quote = None;
                            i += j + 1;
                        }
                        None => {
                            return Err(Stall::Tag {
                                quote,
                                scanned: data.len(),
                            })
                        }
                    },
                    None => match memchr3(b'>', b'\'', b'"', &data[i..]) {
                        Some(j) => {
                            let c = data[i + j];
                            if c == b'>' {
                                return Ok(());
                            }
                            quote = Some(c);
                            i += j + 1;
                        }
                        None => {
                            return Err(Stall::Tag {
                                quote,
                                scanned: data.len(),
                            })
                        }
                    },
                }
            }
            Err(Stall::Tag {
                quote,
                scanned: data.len(),
            })
        }
        Stall::Until { term, scanned } => {
            let from = scanned.saturating_sub(term.len());
            match memmem::find(data.get(from..).unwrap_or(&[]), term) {
                Some(_) => Ok(()),
                None => Err(Stall::Until {
                    term,
                    scanned: data.len(),
                }),
            }
        }
    }
}

/// Absolute offset of a sub-slice of `text` (which starts at absolute `abs0`).
fn abs_of(text: &str, sub: &str, abs0: usize) -> usize {
    (sub.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize) + abs0
}

fn parse(
    text: &str,
    full: &[u8],
    abs0: usize,
    buf: &[u8],
    st: &mut State,
) -> Result<(), StreamError> {
    let mut reader = Reader::from_str(text);
    {
        let c = reader.config_mut();
        c.check_end_names = false; // we check names ourselves, across calls
        c.allow_unmatched_ends = true;
        c.expand_empty_elements = false;
        c.trim_text(false);
        c.allow_dangling_amp = false;
        c.check_comments = false;
    }
    // quick-xml silently drops a UTF-8 BOM at the start of its input; keep offsets right.
    let bom = if text.starts_with('\u{FEFF}') { 3 } else { 0 };
    let mut pos = 0usize;
    loop {
        let ev = reader.read_event();
        let end = reader.buffer_position() as usize + bom;
        match ev {
            Ok(Event::Eof) => return Ok(()),
            Ok(ev) => {
                let (s_abs, e_abs) = (abs0 + pos, abs0 + end);
                handle(ev, text, abs0, s_abs, e_abs, buf, st)?;
                st.events += 1;
                pos = end;
                st.scan = e_abs;
                if st.phase == Phase::Closed {
                    return Ok(());
                }
            }
            Err(e) => return on_parse_error(e, text, full, pos, st),
        }
    }
}

/// Turns a quick-xml error into a stall (construct incomplete) or a stream error.
fn on_parse_error(
    e: XmlError,
    text: &str,
    full: &[u8],
    pos: usize,
    st: &mut State,
) -> Result<(), StreamError> {
    let rest = text.as_bytes().get(pos..).unwrap_or(&[]);
    if let XmlError::IllFormed(IllFormedError::UnclosedReference) = e {
        // The slice may end at a '>' that is character data inside a reference's would-be name
        // (`&quo-->t;`): decide on the full buffer whether the reference can still complete.
        let rest_full = full.get(pos..).unwrap_or(&[]);
        let amp = memchr::memchr(b'&', rest_full).unwrap_or(0);
        let after = rest_full.get(amp + 1..).unwrap_or(&[]);
        let window = &after[..after.len().min(MAX_REF_NAME)];
        return match window
            .iter()
            .position(|&b| matches!(b, b';' | b'<' | b'&') || b.is_ascii_whitespace())
        {
            Some(i) if window[i] == b';' => {
                st.scan += amp;
                Ok(())
            }
            Some(_) => Err(nwf("'&' that does not start a reference")),
            None if after.len() < MAX_REF_NAME => {
                st.scan += amp;
                Ok(())
            }
            None => Err(nwf("unterminated reference")),
        };
    }
    // Skip text that precedes the construct (it was not returned as an event).
    let lt = memchr::memchr(b'<', rest).unwrap_or(0);
    let construct = &rest[lt..];
    match e {
        XmlError::Syntax(
            SyntaxError::UnclosedTag
            | SyntaxError::UnclosedSingleQuotedAttributeValue
            | SyntaxError::UnclosedDoubleQuotedAttributeValue,
        ) => {
            st.scan += lt;
            st.stall = Some(Stall::Tag {
                quote: None,
                scanned: 1,
            });
            Ok(())
        }
        XmlError::Syntax(SyntaxError::UnclosedCData) => {
            st.scan += lt;
            st.stall = Some(Stall::Until {
                term: b"]]>",
                scanned: 9,
            });
            Ok(())
        }
        XmlError::Syntax(SyntaxError::UnclosedXmlDecl) if st.phase == Phase::Prolog => {
            st.scan += lt;
            st.stall = Some(Stall::Until {
                term: b"?>",
                scanned: 5,
            });
            Ok(())
        }
        XmlError::Syntax(
            SyntaxError::UnclosedComment
            | SyntaxError::UnclosedDoctype
            | SyntaxError::UnclosedPI
            | SyntaxError::UnclosedXmlDecl,
        ) => Err(StreamError::RestrictedXml(
            "comments, DTDs and processing instructions are not allowed".into(),
        )),
        XmlError::Syntax(SyntaxError::InvalidBangMarkup) => {
            if construct.starts_with(b"<!-")
                || construct.starts_with(b"<!D")
                || construct.starts_with(b"<!E")
            {
                Err(StreamError::RestrictedXml("markup declaration".into()))
            } else {
                Err(nwf("invalid <! markup"))
            }
        }
        XmlError::Namespace(NamespaceError::TooManyBindings(n)) => Err(
            StreamError::PolicyViolation(format!("more than {n} namespace bindings")),
        ),
        XmlError::Escape(EscapeError::UnrecognizedEntity(_, name)) => Err(
            StreamError::RestrictedXml(format!("entity reference &{name};")),
        ),
        other => Err(nwf(other.to_string())),
    }
}

fn map_ns_err(e: NamespaceError) -> StreamError {
    match e {
        NamespaceError::TooManyBindings(n) => {
            StreamError::PolicyViolation(format!("more than {n} namespace bindings"))
        }
        other => nwf(other.to_string()),
    }
}

/// Attribute checks for one start tag: count, prefixes bound, values free of `<` and of
/// entities other than the predefined five and character references (RFC 6120 §11.1).
/// Also extracts `to`/`from`/`id`/`type`/`xmlns` when `meta` is given (stanza root).
fn check_attrs(
    e: &BytesStart<'_>,
    text: &str,
    abs0: usize,
    st: &mut State,
    mut meta: Option<&mut Meta>,
) -> Result<(), StreamError> {
    let mut n = 0usize;
    for a in e.attributes() {
        let a = a.map_err(|e| nwf(e.to_string()))?;
        n += 1;
        if n > st.limits.max_attrs {
            return Err(StreamError::PolicyViolation(format!(
                "more than {} attributes on one element",
                st.limits.max_attrs
            )));
        }
        let key = a.key.0;
        let is_decl = key == "xmlns" || key.starts_with("xmlns:");
        if !is_decl {
            if let Some(p) = a.key.prefix() {
                if let (ResolveResult::Unknown(p), _) = st.resolver.resolve_attribute(a.key) {
                    return Err(nwf(format!("unbound prefix '{p}' on attribute")));
                }
                note_prefix(p.as_ref(), st);
            }
        }
        let v: &str = &a.value;
        if v.contains('<') {
            return Err(nwf("'<' in attribute value"));
        }
        if v.contains('&') {
            check_refs(v)?;
        }
        if let Some(m) = meta.as_deref_mut() {
            let r = || {
                // Values of a borrowed input are slices of it; anything else is skipped.
                let s = abs_of(text, v, abs0);
                (s >= abs0 && s + v.len() <= abs0 + text.len()).then_some((s, s + v.len()))
            };
            match key {
                "to" => m.to = r(),
                "from" => m.from = r(),
                "id" => m.id = r(),
                "type" => m.ty = r(),
                "xmlns" => m.root_has_default = true,
                _ => {}
            }
        }
    }
    Ok(())
}

/// Records that the current stanza uses a prefix declared on the stream header.
fn note_prefix(p: &str, st: &mut State) {
    if let Some(ctx) = &st.ctx {
        if let Some(i) = ctx.prefixed.iter().position(|(hp, _)| &**hp == p) {
            if i < 64 {
                st.meta.needed |= 1u64 << i;
            }
        }
    }
}

/// Validates references in an attribute value.
fn check_refs(v: &str) -> Result<(), StreamError> {
    match quick_xml::escape::unescape(v) {
        Ok(u) => {
            if let Some(c) = u.chars().find(|&c| !is_xml_char(c)) {
                return Err(nwf(format!("character reference to U+{:04X}", c as u32)));
            }
            Ok(())
        }
        Err(EscapeError::UnrecognizedEntity(_, name)) => Err(StreamError::RestrictedXml(format!(
            "entity reference &{name};"
        ))),
        Err(e) => Err(nwf(e.to_string())),
    }
}

/// Longest entity name we wait for before calling a `&` malformed.
const MAX_REF_NAME: usize = 64;

/// XML 1.0 §2.3 Name, approximated on ASCII (non-ASCII name characters are accepted).
fn is_xml_name(s: &str) -> bool {
    valid_name_start(s)
        && s.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '.' | '_' | ':') || !c.is_ascii())
}

/// XML 1.0 §2.2 Char production.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn handle(
    ev: Event<'_>,
    text: &str,
    abs0: usize,
    s_abs: usize,
    e_abs: usize,
    buf: &[u8],
    st: &mut State,
) -> Result<(), StreamError> {
    match ev {
        Event::Comment(_) => Err(StreamError::RestrictedXml("comment".into())),
        Event::PI(_) => Err(StreamError::RestrictedXml("processing instruction".into())),
        Event::DocType(_) => Err(StreamError::RestrictedXml("DOCTYPE".into())),
        Event::Decl(d) => {
            // Only a leading XML declaration is allowed (RFC 6120 §11.5).
            if st.phase != Phase::Prolog || st.events != 0 {
                return Err(StreamError::RestrictedXml(
                    "XML declaration inside the stream".into(),
                ));
            }
            if let Some(enc) = d.encoding() {
                let enc = enc.map_err(|e| nwf(e.to_string()))?;
                if !enc.eq_ignore_ascii_case("UTF-8") {
                    return Err(StreamError::UnsupportedEncoding(format!(
                        "encoding '{enc}'"
                    )));
                }
            }
            match d.version() {
                Ok(v) if &*v == "1.0" => Ok(()),
                _ => Err(nwf("XML declaration must say version 1.0")),
            }
        }
        Event::Text(t) => {
            if st.stanza_start.is_none()
                && !t.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
            {
                // Only whitespace (keepalives, RFC 6120 §4.6.1) may sit between top-level elements.
                return Err(StreamError::BadFormat(
                    "character data at stream level".into(),
                ));
            }
            Ok(())
        }
        Event::CData(_) => {
            if st.stanza_start.is_none() {
                return Err(StreamError::BadFormat("CDATA at stream level".into()));
            }
            Ok(())
        }
        Event::GeneralRef(r) => {
            if st.stanza_start.is_none() {
                return Err(StreamError::BadFormat(
                    "character data at stream level".into(),
                ));
            }
            match r.resolve_char_ref() {
                Ok(Some(c)) if is_xml_char(c) => Ok(()),
                Ok(Some(c)) => Err(nwf(format!("character reference to U+{:04X}", c as u32))),
                Err(e) => Err(nwf(e.to_string())),
                Ok(None) => match &*r {
                    "lt" | "gt" | "amp" | "apos" | "quot" => Ok(()),
                    other if !is_xml_name(other) => Err(nwf("malformed reference")),
                    other => Err(StreamError::RestrictedXml(format!(
                        "entity reference &{other};"
                    ))),
                },
            }
        }
        Event::Start(e) => {
            if st.phase == Phase::Prolog {
                return open_stream(&e, text, abs0, s_abs, e_abs, st);
            }
            start_element(&e, text, abs0, s_abs, st, false)?;
            Ok(())
        }
        Event::Empty(e) => {
            if st.phase == Phase::Prolog {
                return Err(StreamError::BadFormat(
                    "stream header closed immediately".into(),
                ));
            }
            start_element(&e, text, abs0, s_abs, st, true)?;
            st.resolver.pop();
            if st.names.is_empty() {
                finish_stanza(e_abs, st)?;
            }
            Ok(())
        }
        Event::End(e) => {
            let name = e.name().0;
            if st.phase == Phase::Prolog {
                return Err(nwf("end tag before the stream header"));
            }
            match st.names.pop() {
                None => {
                    if name != st.stream_qname {
                        return Err(nwf(format!("</{name}> does not close the stream")));
                    }
                    st.phase = Phase::Closed;
                    st.queue.push_back(Pending::Close { end: e_abs });
                    Ok(())
                }
                Some((a, b)) => {
                    let open = buf
                        .get(a.saturating_sub(st.base)..b.saturating_sub(st.base))
                        .unwrap_or(&[]);
                    if open != name.as_bytes() {
                        return Err(nwf(format!(
                            "</{name}> closes <{}>",
                            String::from_utf8_lossy(open)
                        )));
                    }
                    st.resolver.pop();
                    if st.names.is_empty() {
                        finish_stanza(e_abs, st)?;
                    }
                    Ok(())
                }
            }
        }
        Event::Eof => Ok(()),
    }
}

fn start_element(
    e: &BytesStart<'_>,
    text: &str,
    abs0: usize,
    s_abs: usize,
    st: &mut State,
    empty: bool,
) -> Result<(), StreamError> {
    let depth = st.names.len() + 1;
    if depth > st.limits.max_depth {
        return Err(StreamError::PolicyViolation(format!(
            "elements nested deeper than {}",
            st.limits.max_depth
        )));
    }
    if !valid_name_start(e.name().0) {
        return Err(nwf(format!("invalid element name '{}'", e.name().0)));
    }
    let root = st.names.is_empty();
    if root {
        st.stanza_start = Some(s_abs);
        st.meta = Meta::default();
    }
    st.resolver.push(e).map_err(map_ns_err)?;
    let name = e.name();
    let mut meta = std::mem::take(&mut st.meta);
    let r = check_attrs(e, text, abs0, st, if root { Some(&mut meta) } else { None });
    // check_attrs may have recorded needed prefixes in st.meta; merge them.
    meta.needed |= st.meta.needed;
    st.meta = meta;
    r?;
    let (res, _) = st.resolver.resolve_element(name);
    let ns: Option<Arc<str>> = match res {
        ResolveResult::Unknown(p) => return Err(nwf(format!("unbound prefix '{p}'"))),
        ResolveResult::Bound(ns) if root => {
            let ns = ns.as_ref();
            match &st.ctx {
                Some(c) if &*c.default_ns == ns => Some(c.default_ns.clone()),
                _ => Some(Arc::from(ns)),
            }
        }
        _ => None,
    };
    if let Some(p) = name.prefix() {
        note_prefix(p.as_ref(), st);
    }
    let q0 = abs_of(text, name.0, abs0);
    let q = (q0, q0 + name.0.len());
    if root {
        st.meta.qname = q;
        st.meta.local_at = name.prefix().map(|p| p.as_ref().len() + 1).unwrap_or(0);
        st.meta.ns = ns;
    }
    // Empty elements are popped by the caller and never pushed on the name stack, except that
    // the root of an empty stanza must be visible to `finish_stanza` via stanza_start.
    if !empty {
        st.names.push(q);
    }
    Ok(())
}

/// XML 1.0 §2.3 NameStartChar, approximated: quick-xml does not check names at all.
fn valid_name_start(name: &str) -> bool {
    match name.chars().next() {
        Some(c) => {
            c.is_alphabetic() || c == '_' || c == ':' || (!c.is_ascii() && !c.is_whitespace())
        }
        None => false,
    }
}

fn finish_stanza(e_abs: usize, st: &mut State) -> Result<(), StreamError> {
    let Some(start) = st.stanza_start.take() else {
        return Ok(());
    };
    if e_abs.saturating_sub(start) > st.limits.max_stanza_bytes {
        return Err(StreamError::PolicyViolation(format!(
            "stanza exceeds {} bytes",
            st.limits.max_stanza_bytes
        )));
    }
    let meta = std::mem::take(&mut st.meta);
    st.queue.push_back(Pending::Stanza {
        start,
        end: e_abs,
        meta,
    });
    Ok(())
}

fn open_stream(
    e: &BytesStart<'_>,
    text: &str,
    abs0: usize,
    s_abs: usize,
    e_abs: usize,
    st: &mut State,
) -> Result<(), StreamError> {
    if e_abs.saturating_sub(s_abs) > st.limits.max_stanza_bytes {
        return Err(StreamError::PolicyViolation(
            "stream header too large".into(),
        ));
    }
    st.resolver.push(e).map_err(map_ns_err)?;
    check_attrs(e, text, abs0, st, None)?;
    let name = e.name();
    let (res, local) = st.resolver.resolve_element(name);
    // RFC 6120 §4.8.1: the stream element is qualified by the streams namespace; §4.8.5 and the
    // §4.9.3.2 example: its prefix is "stream".
    match res {
        ResolveResult::Bound(ns) if ns.as_ref() == NS_STREAMS => {}
        ResolveResult::Bound(ns) => {
            return Err(StreamError::InvalidNamespace(format!(
                "stream element in namespace '{}'",
                ns.as_ref()
            )))
        }
        ResolveResult::Unknown(p) => {
            return Err(StreamError::BadNamespacePrefix(format!(
                "unbound prefix '{p}'"
            )))
        }
        ResolveResult::Unbound => {
            return Err(StreamError::InvalidNamespace(
                "stream element has no namespace".into(),
            ))
        }
    }
    if local.as_ref() != "stream" {
        return Err(StreamError::BadFormat(format!("root element <{}>", name.0)));
    }
    // The prefix must be "stream" (§4.9.3.2 example); a prefix-free header whose default
    // namespace is the streams namespace is also accepted, because RFC 6120 §9.2 shows one.
    let prefix_free = name.prefix().is_none();
    if !prefix_free && name.prefix().map(|p| p.as_ref() == "stream") != Some(true) {
        return Err(StreamError::BadNamespacePrefix(format!(
            "stream element written as <{}>",
            name.0
        )));
    }
    let mut attrs = Vec::new();
    let mut prefixed = Vec::new();
    let mut default_ns = None;
    for a in e.attributes() {
        let a = a.map_err(|e| nwf(e.to_string()))?;
        let v = quick_xml::escape::unescape(&a.value).map_err(|e| nwf(e.to_string()))?;
        let k = a.key.0;
        if k == "xmlns" {
            default_ns = Some(Arc::<str>::from(&*v));
        } else if let Some(p) = k.strip_prefix("xmlns:") {
            prefixed.push((Arc::<str>::from(p), Arc::<str>::from(&*v)));
        }
        attrs.push((k.to_owned(), v.into_owned()));
    }
    // RFC 6120 §4.8.2/§4.8.3: the content namespace must be one we speak.
    let default_ns = match default_ns {
        Some(d) if prefix_free => d,
        Some(d)
            if [
                NS_SERVER,
                NS_CLIENT,
                NS_COMPONENT_ACCEPT,
                NS_COMPONENT_CONNECT,
            ]
            .contains(&&*d) =>
        {
            d
        }
        Some(d) => {
            return Err(StreamError::InvalidNamespace(format!(
                "content namespace '{d}'"
            )));
        }
        None => return Err(StreamError::InvalidNamespace("no content namespace".into())),
    };
    let ctx = Arc::new(NsContext {
        default_ns,
        prefixed,
    });
    st.ctx = Some(ctx.clone());
    st.stream_qname = name.0.to_owned();
    st.phase = Phase::Open;
    st.queue.push_back(Pending::Open {
        start: s_abs,
        end: e_abs,
        attrs,
        ns: ctx,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_element_time_is_the_first_byte_seen() {
        use std::time::Duration;
        let t0 = Instant::now();
        let mut f = StreamFramer::default();
        f.push(HDR);
        assert!(matches!(
            f.next_event(),
            Ok(Some(StreamEvent::StreamOpen(_)))
        ));
        assert_eq!(f.next_event(), Ok(None));
        assert_eq!(
            f.observe_partial(t0),
            None,
            "nothing pending after the header"
        );
        // Whitespace keepalives are never a pending element.
        f.push(b"  \n");
        assert_eq!(f.next_event(), Ok(None));
        assert_eq!(f.observe_partial(t0), None);
        // A stanza dribbled byte by byte keeps the time of its first byte.
        f.push(b"<mess");
        assert_eq!(f.next_event(), Ok(None));
        assert_eq!(f.observe_partial(t0), Some(t0));
        for (i, b) in b"age to='a@b'>".iter().enumerate() {
            f.push(&[*b]);
            assert_eq!(f.next_event(), Ok(None));
            let later = t0 + Duration::from_secs(i as u64 + 1);
            assert_eq!(f.observe_partial(later), Some(t0));
        }
        // Completing it and starting the next one restarts the clock.
        let t1 = t0 + Duration::from_secs(100);
        f.push(b"</message><iq");
        assert!(matches!(f.next_event(), Ok(Some(StreamEvent::Stanza(_)))));
        assert_eq!(f.next_event(), Ok(None));
        assert_eq!(f.observe_partial(t1), Some(t1));
        f.push(b" type='get' id='1'/>");
        assert!(matches!(f.next_event(), Ok(Some(StreamEvent::Stanza(_)))));
        assert_eq!(f.next_event(), Ok(None));
        assert_eq!(f.observe_partial(t1 + Duration::from_secs(1)), None);
        // A partial stream header counts too (a reset starts over).
        f.reset();
        f.push(b"<stream:str");
        assert_eq!(f.next_event(), Ok(None));
        assert_eq!(f.observe_partial(t1), Some(t1));
    }

    proptest::proptest! {
        /// However a stream is cut into pushes, the pending-element time is one of the push
        /// times so far, never later than now, never earlier than the last complete element,
        /// and nothing is pending once the stream has been fully delivered.
        #[test]
        fn partial_time_is_a_push_time_never_older_than_the_last_element(
            cuts in proptest::collection::vec(0usize..400, 0..12)
        ) {
            use std::time::Duration;
            let mut input = HDR.to_vec();
            input.extend_from_slice(
                b"<message to='a@b'><body>one</body></message> <iq type='get' id='1'/>\n\
                  <presence><status>x &amp; y</status></presence>",
            );
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.push(input.len());
            cuts.sort_unstable();
            let t0 = Instant::now();
            let mut f = StreamFramer::default();
            let (mut from, mut last_event) = (0, t0);
            for (i, &cut) in cuts.iter().enumerate() {
                let now = t0 + Duration::from_secs(i as u64);
                f.push(&input[from..cut]);
                from = cut;
                while let Ok(Some(_)) = f.next_event() {
                    last_event = now;
                }
                if let Some(t) = f.observe_partial(now) {
                    proptest::prop_assert!(t <= now);
                    proptest::prop_assert!(t >= last_event);
                    proptest::prop_assert_eq!((t - t0).subsec_nanos(), 0);
                }
            }
            proptest::prop_assert_eq!(f.observe_partial(t0 + Duration::from_secs(99)), None);
        }
    }

    #[test]
    fn invalid_utf8_is_unsupported_encoding() {
        for split in [1usize, 5, 40] {
            let mut input = HDR.to_vec();
            input.extend_from_slice(b"<message><body>\xC3\x28</body></message>");
            let mut f = StreamFramer::default();
            let (a, b) = input.split_at(split.min(input.len()));
            f.push(a);
            let mut err = None;
            for chunk in [&[][..], b] {
                f.push(chunk);
                loop {
                    match f.next_event() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
            }
            assert_eq!(
                err.map(|e| e.condition()),
                Some(StreamErrorCondition::UnsupportedEncoding)
            );
        }
    }

    const HDR: &[u8] = b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

    fn events(input: &[&[u8]]) -> (Vec<StreamEvent>, Option<StreamError>) {
        let mut f = StreamFramer::default();
        let mut out = Vec::new();
        for c in input {
            f.push(c);
            loop {
                match f.next_event() {
                    Ok(Some(e)) => out.push(e),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, None)
    }

    #[test]
    fn stall_scan_is_quote_aware_and_resumable() {
        let s = Stall::Tag {
            quote: None,
            scanned: 1,
        };
        let Err(s) = scan_stall(b"<a x='>", s) else {
            panic!("'>' inside quotes ends nothing")
        };
        assert!(matches!(
            s,
            Stall::Tag {
                quote: Some(b'\''),
                scanned: 7
            }
        ));
        assert!(scan_stall(b"<a x='>' y=\">\">", s).is_ok());
        let c = Stall::Until {
            term: b"]]>",
            scanned: 9,
        };
        let Err(c) = scan_stall(b"<![CDATA[a>b]]", c) else {
            panic!()
        };
        assert!(scan_stall(b"<![CDATA[a>b]]>", c).is_ok());
    }

    #[test]
    fn names_and_versions() {
        assert!(is_xml_name("amp") && is_xml_name("a-b.c_d:e") && is_xml_name("é"));
        assert!(
            !is_xml_name("")
                && !is_xml_name("1a")
                && !is_xml_name("a b")
                && !is_xml_name("quo-->t")
        );
        let (ev, err) = events(&[HDR]);
        assert!(err.is_none());
        let Some(StreamEvent::StreamOpen(h)) = ev.first() else {
            panic!()
        };
        assert_eq!(h.check_version(), Ok(()));
    }

    #[test]
    fn events_before_a_bad_byte_are_delivered_first() {
        let (ev, err) = events(&[HDR, b"<a/><b>x</b>", b"<c>\x80</c>"]);
        assert_eq!(ev.len(), 3);
        // RFC 6120 §4.9.3.22: broken UTF-8 is `unsupported-encoding`.
        assert_eq!(
            err.map(|e| e.condition()),
            Some(StreamErrorCondition::UnsupportedEncoding)
        );
        // The same bytes in one push.
        let mut all = HDR.to_vec();
        all.extend_from_slice(b"<a/><b>x</b><c>\x80</c>");
        let (ev2, err2) = events(&[&all]);
        assert_eq!(ev2.len(), 3);
        assert!(err2.is_some());
    }

    #[test]
    fn reference_cut_by_the_parse_window_waits() {
        // The '>' inside "&quo-->t;" is character data; the framer must wait, then refuse
        // the malformed name.
        let (_, err) = events(&[HDR, b"<a>&quo-->", b"t;</a>"]);
        assert_eq!(
            err.map(|e| e.condition()),
            Some(StreamErrorCondition::NotWellFormed)
        );
        let (ev, err) = events(&[HDR, b"<a>x &amp", b"; y></a>"]);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(ev.len(), 2);
        let (_, err) = events(&[HDR, b"<a>x & y></a>"]);
        assert_eq!(
            err.map(|e| e.condition()),
            Some(StreamErrorCondition::NotWellFormed)
        );
    }

    #[test]
    fn close_and_after() {
        let (ev, err) = events(&[HDR, b"<a/></stream:stream><garbage"]);
        assert!(err.is_none());
        assert_eq!(ev.last(), Some(&StreamEvent::StreamClose));
        let (_, err) = events(&[HDR, b"</stream:other>"]);
        assert!(err.is_some());
    }
}
