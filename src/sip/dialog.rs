//! SIP dialogs (RFC 3261 §12) for a user agent: the state both ends share once a SUBSCRIBE or
//! INVITE succeeded (Call-ID, tags, CSeq counters, remote target, route set), and the
//! construction of requests inside it with loose and strict routing (§12.2.1.1, §16.12).
//!
//! Dialogs are plain values: they own strings copied out of the message that created them and
//! never look at a socket or a clock. Which connection an in-dialog request leaves on is the
//! edge's business, not the dialog's.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::header::HeaderName;
use super::message::SipMessage;
use super::parse::parse_exact;
use super::uri::{parse_uri, UriContext};
use super::SipParseError;

/// Why a dialog could not be created or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialogError {
    /// A header a dialog needs did not decode.
    #[error("cannot build dialog: {0}")]
    BadHeader(&'static str),
    /// A tag needed to identify the dialog is missing.
    #[error("missing {0} tag")]
    MissingTag(&'static str),
    /// Building a request produced an unparsable message (a bug or hostile stored state).
    #[error("cannot build request: {0}")]
    Build(#[from] SipParseError),
}

/// Three strings in one allocation, cut at two offsets. A million foreign watchers each hold
/// a dialog id and a dialog's three URIs (issue 11 item 10): one allocation per triple
/// instead of three, and 8 bytes of offsets instead of three string headers.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Three<T> {
    text: T,
    ends: [u32; 2],
}

impl<T: std::ops::Deref<Target = str> + From<String>> Three<T> {
    fn new(a: &str, b: &str, c: &str) -> Self {
        let mut text = String::with_capacity(a.len() + b.len() + c.len());
        text.push_str(a);
        text.push_str(b);
        text.push_str(c);
        // Parts come from one SIP message, far below 4 GiB (`limits.sip_max_message_bytes`).
        let end = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Three {
            text: T::from(text),
            ends: [end(a.len()), end(a.len() + b.len())],
        }
    }

    fn part(&self, i: usize) -> &str {
        let [a, b] = self.ends.map(|e| e as usize);
        let range = match i {
            0 => 0..a,
            1 => a..b,
            _ => b..self.text.len(),
        };
        self.text.get(range).unwrap_or_default()
    }
}

/// The identity of a dialog, from our side: Call-ID, our tag, their tag (§12).
///
/// The parts are one shared allocation: a notifier's id is held by its table and its timer,
/// and by the persistence bookkeeping, so a clone must not copy the strings.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "DialogIdWire", from = "DialogIdWire")]
pub struct DialogId(Three<Arc<str>>);

/// How a `DialogId` is serialised (the fields it had as three strings).
#[derive(Serialize, Deserialize)]
#[serde(rename = "DialogId")]
struct DialogIdWire {
    call_id: String,
    local_tag: String,
    remote_tag: String,
}

impl From<DialogId> for DialogIdWire {
    fn from(id: DialogId) -> Self {
        DialogIdWire {
            call_id: id.call_id().to_owned(),
            local_tag: id.local_tag().to_owned(),
            remote_tag: id.remote_tag().to_owned(),
        }
    }
}

impl From<DialogIdWire> for DialogId {
    fn from(w: DialogIdWire) -> Self {
        DialogId::new(&w.call_id, &w.local_tag, &w.remote_tag)
    }
}

impl std::fmt::Debug for DialogId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialogId")
            .field("call_id", &self.call_id())
            .field("local_tag", &self.local_tag())
            .field("remote_tag", &self.remote_tag())
            .finish()
    }
}

/// Ordered as (Call-ID, our tag, their tag).
impl Ord for DialogId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.call_id(), self.local_tag(), self.remote_tag()).cmp(&(
            other.call_id(),
            other.local_tag(),
            other.remote_tag(),
        ))
    }
}

impl PartialOrd for DialogId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl DialogId {
    pub fn new(call_id: &str, local_tag: &str, remote_tag: &str) -> Self {
        DialogId(Three::new(call_id, local_tag, remote_tag))
    }

    pub fn call_id(&self) -> &str {
        self.0.part(0)
    }

    pub fn local_tag(&self) -> &str {
        self.0.part(1)
    }

    pub fn remote_tag(&self) -> &str {
        self.0.part(2)
    }

    /// The id of the dialog an incoming in-dialog request belongs to: our tag is in To, theirs
    /// in From (§12.2.2).
    pub fn of_incoming_request(req: &SipMessage) -> Result<Self, DialogError> {
        let to = req.to().map_err(DialogError::BadHeader)?;
        let from = req.from().map_err(DialogError::BadHeader)?;
        Ok(DialogId::new(
            req.call_id().map_err(DialogError::BadHeader)?,
            to.tag().ok_or(DialogError::MissingTag("To"))?,
            from.tag().ok_or(DialogError::MissingTag("From"))?,
        ))
    }
}

/// One dialog's state (§12.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "DialogWire", from = "DialogWire")]
pub struct Dialog {
    pub id: DialogId,
    /// Our URI (From of our requests), their URI (To of our requests), and where in-dialog
    /// requests go (their Contact, §12.1.1), in one allocation (see `Three`).
    uris: Three<Box<str>>,
    /// Route set as URIs (without brackets), in the order our requests carry them. A boxed
    /// slice of boxed strings, not a `Vec<String>`: 16 bytes, not 24, in every dialog, and 16
    /// per URI, not 24 (a million foreign watchers each hold a dialog, issue 11 item 10).
    pub route_set: Box<[Box<str>]>,
    /// Last CSeq we used.
    pub local_cseq: u32,
    /// Last CSeq we accepted from the peer (`None` until they send one, §12.1.2).
    pub remote_cseq: Option<u32>,
}

impl std::fmt::Debug for Three<Box<str>> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries([self.part(0), self.part(1), self.part(2)])
            .finish()
    }
}

/// How a `Dialog` is serialised (the fields it had before its URIs shared an allocation).
#[derive(Serialize, Deserialize)]
#[serde(rename = "Dialog")]
struct DialogWire {
    id: DialogId,
    local_uri: String,
    remote_uri: String,
    remote_target: String,
    route_set: Vec<String>,
    local_cseq: u32,
    remote_cseq: Option<u32>,
}

impl From<Dialog> for DialogWire {
    fn from(d: Dialog) -> Self {
        DialogWire {
            local_uri: d.local_uri().to_owned(),
            remote_uri: d.remote_uri().to_owned(),
            remote_target: d.remote_target().to_owned(),
            id: d.id,
            route_set: d.route_set.iter().map(|r| r.to_string()).collect(),
            local_cseq: d.local_cseq,
            remote_cseq: d.remote_cseq,
        }
    }
}

impl From<DialogWire> for Dialog {
    fn from(w: DialogWire) -> Self {
        Dialog::new(
            w.id,
            &w.local_uri,
            &w.remote_uri,
            &w.remote_target,
            w.route_set,
            w.local_cseq,
            w.remote_cseq,
        )
    }
}

fn bare_uri(value: &str) -> String {
    value.to_owned()
}

/// The first Contact URI of a message, if any.
fn contact_uri(msg: &SipMessage) -> Result<Option<String>, DialogError> {
    let c = msg.contacts().map_err(DialogError::BadHeader)?;
    Ok(c.first().map(|n| bare_uri(n.uri.as_str())))
}

impl Dialog {
    pub fn new(
        id: DialogId,
        local_uri: &str,
        remote_uri: &str,
        remote_target: &str,
        route_set: Vec<String>,
        local_cseq: u32,
        remote_cseq: Option<u32>,
    ) -> Self {
        Dialog {
            id,
            uris: Three::new(local_uri, remote_uri, remote_target),
            route_set: route_set.into_iter().map(String::into_boxed_str).collect(),
            local_cseq,
            remote_cseq,
        }
    }

    /// Our URI (From of our requests).
    pub fn local_uri(&self) -> &str {
        self.uris.part(0)
    }

    /// Their URI (To of our requests).
    pub fn remote_uri(&self) -> &str {
        self.uris.part(1)
    }

    /// Where in-dialog requests go (their Contact, §12.1.1).
    pub fn remote_target(&self) -> &str {
        self.uris.part(2)
    }

    pub fn set_remote_target(&mut self, target: &str) {
        self.uris = Three::new(self.local_uri(), self.remote_uri(), target);
    }

    /// The UAS side of a dialog created by `req` that we answer with `local_tag` (§12.1.1):
    /// route set = Record-Route in order, remote target = Contact, remote CSeq = the request's.
    pub fn uas(req: &SipMessage, local_tag: &str) -> Result<Self, DialogError> {
        let from = req.from().map_err(DialogError::BadHeader)?;
        let to = req.to().map_err(DialogError::BadHeader)?;
        let remote_tag = from.tag().ok_or(DialogError::MissingTag("From"))?;
        let route_set = req
            .record_routes()
            .map_err(DialogError::BadHeader)?
            .iter()
            .map(|n| bare_uri(n.uri.as_str()))
            .collect();
        let remote_target = contact_uri(req)?.unwrap_or_else(|| bare_uri(from.uri.as_str()));
        Ok(Dialog::new(
            DialogId::new(
                req.call_id().map_err(DialogError::BadHeader)?,
                local_tag,
                remote_tag,
            ),
            to.uri.as_str(),
            from.uri.as_str(),
            &remote_target,
            route_set,
            0,
            Some(req.cseq().map_err(DialogError::BadHeader)?.seq),
        ))
    }

    /// The UAC side of a dialog created by a 2xx (or a NOTIFY, RFC 6665 §4.1.2.4) answering our
    /// request (§12.1.2): route set = Record-Route reversed, remote target = Contact, remote
    /// tag = To tag of the response (for a NOTIFY: its From tag, passed as `remote_tag`).
    pub fn uac(
        call_id: &str,
        local_tag: &str,
        local_uri: &str,
        remote_uri: &str,
        local_cseq: u32,
        msg: &SipMessage,
        remote_tag: &str,
    ) -> Result<Self, DialogError> {
        let mut route_set: Vec<String> = msg
            .record_routes()
            .map_err(DialogError::BadHeader)?
            .iter()
            .map(|n| bare_uri(n.uri.as_str()))
            .collect();
        // A 2xx carries Record-Route in the order the request traversed the proxies: the UAC
        // uses it reversed (§12.1.2). A NOTIFY that creates the dialog (RFC 6665 §4.1.2.4) is
        // a request we receive: we are its UAS and keep the order (§12.1.1).
        if !msg.is_request() {
            route_set.reverse();
        }
        let remote_target = contact_uri(msg)?.unwrap_or_else(|| remote_uri.to_owned());
        let remote_cseq = if msg.is_request() {
            Some(msg.cseq().map_err(DialogError::BadHeader)?.seq)
        } else {
            None
        };
        Ok(Dialog::new(
            DialogId::new(call_id, local_tag, remote_tag),
            local_uri,
            remote_uri,
            &remote_target,
            route_set,
            local_cseq,
            remote_cseq,
        ))
    }

    /// Checks and records the CSeq of an in-dialog request (§12.2.2): a lower or equal number
    /// than the last one is out of order (answer 500). An ACK repeats the INVITE's number and
    /// is not checked.
    pub fn accept_remote_cseq(&mut self, seq: u32) -> bool {
        match self.remote_cseq {
            Some(last) if seq <= last => false,
            _ => {
                self.remote_cseq = Some(seq);
                true
            }
        }
    }

    /// Updates the remote target from a target-refresh request or response (§12.2).
    pub fn refresh_target(&mut self, msg: &SipMessage) {
        if let Ok(Some(c)) = contact_uri(msg) {
            self.set_remote_target(&c);
        }
    }

    /// Request-URI and Route values for the next request (§12.2.1.1): with an empty route set,
    /// the remote target; with a loose router (`lr`) first, the remote target and the whole
    /// route set; with a strict router, its URI as Request-URI and the rest plus the remote
    /// target as Route.
    pub fn request_target(&self) -> (String, Vec<String>) {
        let Some(first) = self.route_set.first() else {
            return (self.remote_target().to_owned(), Vec::new());
        };
        let loose = parse_uri(first, UriContext::NameAddr)
            .ok()
            .and_then(|u| u.as_sip().map(|s| s.param("lr").is_some()))
            .unwrap_or(true);
        if loose {
            (
                self.remote_target().to_owned(),
                self.route_set.iter().map(|r| r.to_string()).collect(),
            )
        } else {
            let mut rest: Vec<String> = self
                .route_set
                .iter()
                .skip(1)
                .map(|r| r.to_string())
                .collect();
            rest.push(self.remote_target().to_owned());
            (first.to_string(), rest)
        }
    }

    /// Builds the next request in this dialog. `via` is the full Via value (with a fresh
    /// branch); ACK reuses the INVITE's CSeq (`cseq_override`), everything else increments.
    ///
    /// Written straight into one buffer (no per-header `String`s): every NOTIFY of a presence
    /// storm comes through here.
    pub fn request(&mut self, spec: &InDialog<'_>) -> Result<SipMessage, DialogError> {
        let seq = match spec.cseq_override {
            Some(s) => s,
            None => {
                self.local_cseq = self.local_cseq.saturating_add(1);
                self.local_cseq
            }
        };
        let body_len = spec.body.map_or(0, |b| b.1.len());
        let mut v = Vec::with_capacity(512 + body_len);
        let routes_owned;
        let (ruri, routes): (&str, &[String]) = if self.route_set.is_empty() {
            (self.remote_target(), &[])
        } else {
            let (r, rs) = self.request_target();
            routes_owned = (r, rs);
            (&routes_owned.0, &routes_owned.1)
        };
        v.extend_from_slice(spec.method.as_bytes());
        v.push(b' ');
        v.extend_from_slice(ruri.as_bytes());
        v.extend_from_slice(b" SIP/2.0\r\n");
        let mut seq_buf = itoa_u32(seq);
        put_header(&mut v, "Via", &[spec.via])?;
        put_header(&mut v, "Max-Forwards", &["70"])?;
        put_header(
            &mut v,
            "From",
            &["<", self.local_uri(), ">;tag=", self.id.local_tag()],
        )?;
        put_header(
            &mut v,
            "To",
            &["<", self.remote_uri(), ">;tag=", self.id.remote_tag()],
        )?;
        put_header(&mut v, "Call-ID", &[self.id.call_id()])?;
        put_header(&mut v, "CSeq", &[seq_buf.as_str(), " ", spec.method])?;
        for r in routes {
            put_header(&mut v, "Route", &["<", r, ">"])?;
        }
        if let Some(c) = spec.contact {
            put_header(&mut v, "Contact", &["<", c, ">"])?;
        }
        for (n, val) in spec.extra {
            put_header(&mut v, n, &[val])?;
        }
        if let Some((ct, _)) = spec.body {
            put_header(&mut v, "Content-Type", &[ct])?;
        }
        seq_buf = itoa_u32(u32::try_from(body_len).unwrap_or(u32::MAX));
        put_header(&mut v, "Content-Length", &[seq_buf.as_str()])?;
        v.extend_from_slice(b"\r\n");
        if let Some((_, b)) = spec.body {
            v.extend_from_slice(b);
        }
        Ok(parse_exact(Bytes::from(v))?)
    }
}

/// A header line from parts; a line break in any part is refused (it would inject headers).
fn put_header(v: &mut Vec<u8>, name: &str, parts: &[&str]) -> Result<(), DialogError> {
    if parts
        .iter()
        .any(|p| p.bytes().any(|c| c == b'\r' || c == b'\n'))
    {
        return Err(DialogError::Build(SipParseError::BadHeaderValue(
            "line break in header value",
        )));
    }
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(b": ");
    for p in parts {
        v.extend_from_slice(p.as_bytes());
    }
    v.extend_from_slice(b"\r\n");
    Ok(())
}

/// Decimal digits of `n` without an allocation.
struct Digits {
    buf: [u8; 10],
    start: usize,
}

impl Digits {
    fn as_str(&self) -> &str {
        std::str::from_utf8(self.buf.get(self.start..).unwrap_or_default()).unwrap_or("0")
    }
}

fn itoa_u32(mut n: u32) -> Digits {
    let mut d = Digits {
        buf: [b'0'; 10],
        start: 10,
    };
    loop {
        d.start -= 1;
        if let Some(b) = d.buf.get_mut(d.start) {
            *b = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || d.start == 0 {
            return d;
        }
    }
}

/// What to put in an in-dialog request.
#[derive(Debug, Clone, Copy)]
pub struct InDialog<'a> {
    pub method: &'a str,
    pub via: &'a str,
    pub contact: Option<&'a str>,
    pub extra: &'a [(&'a str, &'a str)],
    /// `(content type, bytes)`.
    pub body: Option<(&'a str, &'a [u8])>,
    pub cseq_override: Option<u32>,
}

/// Serializes a request from its parts, computes Content-Length and parses it back so the
/// result is a checked `SipMessage` (the transaction layer wants one).
pub fn build_request(
    method: &str,
    ruri: &str,
    headers: &[(&str, String)],
    body: Option<(&str, &[u8])>,
) -> Result<SipMessage, DialogError> {
    let mut v = Vec::with_capacity(512 + body.map_or(0, |b| b.1.len()));
    v.extend_from_slice(method.as_bytes());
    v.push(b' ');
    v.extend_from_slice(ruri.as_bytes());
    v.extend_from_slice(b" SIP/2.0\r\n");
    for (n, val) in headers {
        if val.bytes().any(|c| c == b'\r' || c == b'\n') {
            return Err(DialogError::Build(SipParseError::BadHeaderValue(
                "line break in header value",
            )));
        }
        v.extend_from_slice(n.as_bytes());
        v.extend_from_slice(b": ");
        v.extend_from_slice(val.as_bytes());
        v.extend_from_slice(b"\r\n");
    }
    if let Some((ct, _)) = body {
        v.extend_from_slice(b"Content-Type: ");
        v.extend_from_slice(ct.as_bytes());
        v.extend_from_slice(b"\r\n");
    }
    let len = body.map_or(0, |b| b.1.len());
    v.extend_from_slice(format!("Content-Length: {len}\r\n\r\n").as_bytes());
    if let Some((_, b)) = body {
        v.extend_from_slice(b);
    }
    Ok(parse_exact(Bytes::from(v))?)
}

/// Builds a response to `req` with extra header lines and an optional body: `build_response`
/// (Via/From/To/Call-ID/CSeq copied byte-exact) plus our additions.
pub fn response_with(
    req: &SipMessage,
    code: u16,
    reason: &str,
    to_tag: Option<&str>,
    extra: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> Result<SipMessage, DialogError> {
    let mut r = req.build_response(code, reason, to_tag)?;
    let cl = r.header_index(HeaderName::ContentLength).unwrap_or(0);
    for (i, (n, v)) in extra.iter().enumerate() {
        r.insert_header(cl + i, n, v)?;
    }
    if let Some((ct, b)) = body {
        let cl = r.header_index(HeaderName::ContentLength).unwrap_or(0);
        r.insert_header(cl, "Content-Type", ct)?;
        r.set_body(Bytes::copy_from_slice(b))?;
    }
    Ok(r)
}

/// The mark a cluster node puts at the end of the local tags of the dialogs it creates
/// (`<random>-<mark>`), so that any node can tell which node an in-dialog request belongs to
/// from its own tag (the To tag of the partner's requests, RFC 3261 §12.2.1.1) without a
/// lookup. Eight hex digits of FNV-1a over the node id: stable across processes and builds,
/// and it does not spell out the node's name to partners.
pub fn node_mark(node_id: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in node_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// The node mark of one of our local tags, if it carries one.
pub fn mark_of_tag(tag: &str) -> Option<&str> {
    let (_, mark) = tag.rsplit_once('-')?;
    (mark.len() == 8 && mark.bytes().all(|b| b.is_ascii_hexdigit())).then_some(mark)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::parse_datagram;

    const SUB: &[u8] = b"SUBSCRIBE sip:alice@example.com SIP/2.0\r\n\
Via: SIP/2.0/TLS edge.partner.com:5061;branch=z9hG4bK77\r\n\
Record-Route: <sip:edge.partner.com:5061;transport=tls;opaque=state:T:F:Ci.R1;lr;ms-route-sig=aa>\r\n\
Record-Route: <sip:pool.partner.com;lr>\r\n\
From: <sip:bob@partner.com>;tag=bt\r\n\
To: <sip:alice@example.com>\r\n\
Call-ID: c1\r\n\
CSeq: 5 SUBSCRIBE\r\n\
Contact: <sip:bob@partner.com;opaque=user:epid:E1;gruu>\r\n\
Event: presence\r\n\
Content-Length: 0\r\n\r\n";

    #[test]
    fn uas_dialog_keeps_route_set_order_and_gruu_target() {
        let req = parse_datagram(SUB).expect("parses");
        let mut d = Dialog::uas(&req, "lt").expect("dialog");
        assert_eq!(d.id.remote_tag(), "bt");
        assert_eq!(
            d.remote_target(),
            "sip:bob@partner.com;opaque=user:epid:E1;gruu"
        );
        assert_eq!(d.route_set.len(), 2);
        assert!(d.route_set[0].contains("ms-route-sig=aa"));
        let (ruri, routes) = d.request_target();
        assert_eq!(ruri, d.remote_target());
        assert_eq!(
            routes,
            d.route_set
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
        );
        assert!(!d.accept_remote_cseq(5));
        assert!(d.accept_remote_cseq(6));
        let n = d
            .request(&InDialog {
                method: "NOTIFY",
                via: "SIP/2.0/TCP example.com:5060;branch=z9hG4bKx",
                contact: Some("sip:alice@example.com"),
                extra: &[("Event", "presence")],
                body: Some(("application/pidf+xml", b"<x/>")),
                cseq_override: None,
            })
            .expect("builds");
        let text = String::from_utf8_lossy(&n.to_bytes()).into_owned();
        assert!(text.starts_with("NOTIFY sip:bob@partner.com;opaque=user:epid:E1;gruu SIP/2.0\r\n"));
        assert!(text.contains("Route: <sip:edge.partner.com:5061;transport=tls;opaque=state:T:F:Ci.R1;lr;ms-route-sig=aa>\r\nRoute: <sip:pool.partner.com;lr>\r\n"));
        assert!(text.contains("From: <sip:alice@example.com>;tag=lt\r\n"));
        assert!(text.contains("CSeq: 1 NOTIFY\r\n"));
        assert!(text.ends_with("Content-Length: 4\r\n\r\n<x/>"));
    }

    #[test]
    fn digits_and_injected_line_breaks() {
        for n in [0u32, 7, 10, 4_096, u32::MAX] {
            assert_eq!(itoa_u32(n).as_str(), n.to_string());
        }
        let req = parse_datagram(SUB).expect("parses");
        let mut d = Dialog::uas(&req, "lt").expect("dialog");
        let bad = d.request(&InDialog {
            method: "NOTIFY",
            via: "SIP/2.0/TCP example.com;branch=z9hG4bKx",
            contact: None,
            extra: &[("Subscription-State", "active\r\nX-Evil: 1")],
            body: None,
            cseq_override: None,
        });
        assert!(matches!(bad, Err(DialogError::Build(_))));
        let ok = d
            .request(&InDialog {
                method: "NOTIFY",
                via: "SIP/2.0/TCP example.com;branch=z9hG4bKy",
                contact: None,
                extra: &[],
                body: None,
                cseq_override: None,
            })
            .expect("builds");
        let text = String::from_utf8_lossy(&ok.to_bytes()).into_owned();
        assert!(text.contains("CSeq: 2 NOTIFY\r\n"), "{text}");
        assert!(text.ends_with("Content-Length: 0\r\n\r\n"), "{text}");
    }

    #[test]
    fn strict_router_goes_in_the_request_uri() {
        let req = parse_datagram(SUB).expect("parses");
        let mut d = Dialog::uas(&req, "lt").expect("dialog");
        d.route_set = Box::new([
            "sip:strict.partner.com".into(),
            "sip:p2.partner.com;lr".into(),
        ]);
        let (ruri, routes) = d.request_target();
        assert_eq!(ruri, "sip:strict.partner.com");
        assert_eq!(
            routes,
            vec![
                "sip:p2.partner.com;lr".to_string(),
                "sip:bob@partner.com;opaque=user:epid:E1;gruu".to_string()
            ]
        );
    }

    #[test]
    fn uac_dialog_reverses_record_route() {
        let resp = parse_datagram(
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP example.com;branch=z9hG4bK1\r\n\
Record-Route: <sip:a.partner.com;lr>\r\nRecord-Route: <sip:b.partner.com;lr>\r\n\
From: <sip:alice@example.com>;tag=l\r\nTo: <sip:bob@partner.com>;tag=r\r\nCall-ID: c\r\n\
CSeq: 1 SUBSCRIBE\r\nContact: <sip:bob@10.0.0.1>\r\nContent-Length: 0\r\n\r\n",
        )
        .expect("parses");
        let d = Dialog::uac(
            "c",
            "l",
            "sip:alice@example.com",
            "sip:bob@partner.com",
            1,
            &resp,
            "r",
        )
        .expect("dialog");
        assert_eq!(
            d.route_set.iter().map(|r| &**r).collect::<Vec<_>>(),
            ["sip:b.partner.com;lr", "sip:a.partner.com;lr"]
        );
        assert_eq!(d.remote_target(), "sip:bob@10.0.0.1");
        assert_eq!(d.remote_cseq, None);
    }

    #[test]
    fn a_node_mark_is_stable_distinct_and_read_back_from_a_tag() {
        // FNV-1a 32 of "gw1": fixed across builds, so every node computes the same marks.
        assert_eq!(node_mark("gw1"), node_mark("gw1"));
        assert_eq!(node_mark(""), "811c9dc5");
        let marks: std::collections::HashSet<String> = ["gw1", "gw2", "gw3", "gw4", "gw5", "gw6"]
            .iter()
            .map(|n| node_mark(n))
            .collect();
        assert_eq!(marks.len(), 6);
        let tag = format!("abc123def456-{}", node_mark("gw2"));
        assert_eq!(mark_of_tag(&tag), Some(node_mark("gw2").as_str()));
        // Tags of other implementations, or ours from before a cluster: no mark.
        for other in [
            "abc123def456",
            "1234-5678",
            "a-b-zzzzzzzz",
            "x-123456789",
            "-",
        ] {
            assert_eq!(mark_of_tag(other), None, "{other}");
        }
    }
}
