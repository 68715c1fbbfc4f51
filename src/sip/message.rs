//! The SIP message model: one `Bytes` buffer plus spans (RFC 3261 §7).
//!
//! A `SipMessage` owns the bytes it was parsed from and records where the start line, every
//! header line (name, value, the whole raw line including folds) and the body are. Nothing is
//! decoded up front: typed accessors decode the few headers routing needs, on demand, and the
//! serializer writes every untouched line back as the original bytes, so Lync URIs, `ms-*`
//! headers, repeated headers and folded lines come back byte-exact. Edits replace or insert
//! whole header lines; edited lines live in their own small buffers.
//!
//! This module must not do I/O and must not interpret what it does not have to.

use std::ops::Range;

use bytes::{BufMut, Bytes};

use super::header::{
    self, CSeq, Contact, DecodeResult, HeaderName, MediaType, NameAddr, TokenParams, Via,
};
use super::uri::{parse_uri, Uri, UriContext};
use super::SipParseError;

/// A byte range into a buffer; `u32` keeps header records small (messages are capped far below
/// 4 GiB by framing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Span {
    pub(crate) start: u32,
    pub(crate) end: u32,
}

impl Span {
    pub(crate) fn new(r: Range<usize>) -> Self {
        Span {
            start: u32::try_from(r.start).unwrap_or(u32::MAX),
            end: u32::try_from(r.end).unwrap_or(u32::MAX),
        }
    }
    pub(crate) fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
    pub(crate) fn get(self, b: &[u8]) -> &[u8] {
        b.get(self.range()).unwrap_or(&[])
    }
}

/// Where a header's value text lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ValueLoc {
    /// In the message buffer (single-line header).
    Buf,
    /// In the message's unfold buffer (the line was folded, RFC 3261 §7.3.1).
    Unfolded,
}

/// One header line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderField {
    pub(crate) name: HeaderName,
    /// The name as sent.
    pub(crate) name_span: Span,
    /// The value, trimmed, folds replaced by white space when `loc` is `Unfolded`.
    pub(crate) value_span: Span,
    pub(crate) loc: ValueLoc,
    /// The whole raw line(s) including the final CRLF.
    pub(crate) line_span: Span,
    /// Set for a header added or replaced by an edit: all spans are relative to this buffer.
    pub(crate) own: Option<Bytes>,
}

/// The start line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartLine {
    Request { method: Span, uri: Span },
    Response { code: u16, reason: Span },
}

/// A parsed SIP request or response.
#[derive(Debug, Clone)]
pub struct SipMessage {
    pub(crate) buf: Bytes,
    pub(crate) start: StartLine,
    /// Raw start line without its CRLF.
    pub(crate) start_span: Span,
    pub(crate) headers: Vec<HeaderField>,
    pub(crate) unfolded: String,
    /// The header section as text (`buf[..head.len()]`, start line included), checked as
    /// UTF-8 once by the parser: every header access slices it instead of checking its bytes
    /// again (tens of accesses per request). Empty when not kept (a built response).
    pub(crate) head: String,
    pub(crate) body: Span,
    pub(crate) body_own: Option<Bytes>,
}

/// Equal when the bytes and their reading are: `head` is a cache of `buf` (kept or not) and
/// takes no part.
impl PartialEq for SipMessage {
    fn eq(&self, other: &Self) -> bool {
        self.buf == other.buf
            && self.start == other.start
            && self.start_span == other.start_span
            && self.headers == other.headers
            && self.unfolded == other.unfolded
            && self.body == other.body
            && self.body_own == other.body_own
    }
}

impl Eq for SipMessage {}

/// A borrowed view of one header.
#[derive(Debug, Clone, Copy)]
pub struct HeaderRef<'m> {
    /// The classified name.
    pub name: HeaderName,
    /// The name as sent (`v`, `MaX-fOrWaRdS`, `ms-text-format`).
    pub raw_name: &'m str,
    /// The value: trimmed, folds turned into white space.
    pub value: &'m str,
    /// The raw line(s) as they will be serialized, CRLF included.
    pub raw_line: &'m [u8],
}

fn as_str(b: &[u8]) -> &str {
    // The header section was checked to be UTF-8 at parse time and every span ends on an ASCII
    // delimiter, so this cannot fail; an empty string is the harmless fallback.
    std::str::from_utf8(b).unwrap_or("")
}

impl SipMessage {
    fn field_bytes<'m>(&'m self, h: &'m HeaderField) -> &'m [u8] {
        h.own.as_deref().unwrap_or(&self.buf)
    }

    /// The text of a span of `buf`: a slice of `head` when it covers the span, else checked.
    fn text(&self, span: Span) -> &str {
        match self.head.get(span.range()) {
            Some(t) => t,
            None => as_str(span.get(&self.buf)),
        }
    }

    fn view<'m>(&'m self, h: &'m HeaderField) -> HeaderRef<'m> {
        let b = self.field_bytes(h);
        let (value, raw_name) = match (&h.own, &h.loc) {
            (None, ValueLoc::Unfolded) => (
                self.unfolded.get(h.value_span.range()).unwrap_or(""),
                self.text(h.name_span),
            ),
            (None, ValueLoc::Buf) => (self.text(h.value_span), self.text(h.name_span)),
            (Some(_), _) => (as_str(h.value_span.get(b)), as_str(h.name_span.get(b))),
        };
        HeaderRef {
            name: h.name,
            raw_name,
            value,
            raw_line: h.line_span.get(b),
        }
    }

    /// `true` for a request.
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The request method, as sent (case-sensitive, RFC 3261 §7.1).
    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(self.text(*method)),
            StartLine::Response { .. } => None,
        }
    }

    /// The raw Request-URI text.
    pub fn request_uri_str(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(self.text(*uri)),
            StartLine::Response { .. } => None,
        }
    }

    /// The decoded Request-URI (`?headers` refused, RFC 3261 §19.1.1).
    pub fn request_uri(&self) -> Option<DecodeResult<Uri<'_>>> {
        self.request_uri_str()
            .map(|s| parse_uri(s, UriContext::RequestUri))
    }

    /// The response status code.
    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    /// The response reason phrase (may be empty, RFC 4475 §3.1.1.13).
    pub fn reason(&self) -> Option<&str> {
        match &self.start {
            StartLine::Response { reason, .. } => Some(self.text(*reason)),
            StartLine::Request { .. } => None,
        }
    }

    /// The start line as it will be serialized, without CRLF.
    pub fn start_line(&self) -> &[u8] {
        self.start_span.get(&self.buf)
    }

    /// All headers in order.
    pub fn headers(&self) -> impl Iterator<Item = HeaderRef<'_>> + '_ {
        self.headers.iter().map(|h| self.view(h))
    }

    /// The value of the first line of each of `names`, in that order; only those lines are
    /// viewed, and the scan stops once all were found (the routing view, once per request).
    pub(crate) fn first_values<const N: usize>(&self, names: [HeaderName; N]) -> [Option<&str>; N] {
        let mut out = [None; N];
        let mut left = N;
        for h in &self.headers {
            let Some(i) = names.iter().position(|n| *n == h.name) else {
                continue;
            };
            if let Some(slot) = out.get_mut(i) {
                if slot.is_none() {
                    *slot = Some(self.view(h).value);
                    left -= 1;
                    if left == 0 {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Number of header lines.
    pub fn header_count(&self) -> usize {
        self.headers.len()
    }

    /// All headers with a known name, in order.
    pub fn headers_named(&self, name: HeaderName) -> impl Iterator<Item = HeaderRef<'_>> + '_ {
        self.headers
            .iter()
            .filter(move |h| h.name == name)
            .map(|h| self.view(h))
    }

    /// The first header with a known name.
    pub fn header(&self, name: HeaderName) -> Option<HeaderRef<'_>> {
        self.headers_named(name).next()
    }

    /// All headers whose raw name matches case-insensitively (for extension headers such as
    /// `ms-text-format`; compact forms are not expanded here).
    pub fn headers_by_raw_name<'m>(
        &'m self,
        name: &'m str,
    ) -> impl Iterator<Item = HeaderRef<'m>> + 'm {
        self.headers()
            .filter(move |h| h.raw_name.eq_ignore_ascii_case(name))
    }

    /// The first header value with this raw name.
    pub fn header_value_by_raw_name(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|h| h.raw_name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    fn single(&self, name: HeaderName) -> DecodeResult<&str> {
        self.header(name).map(|h| h.value).ok_or("missing header")
    }

    /// Top Via value (first value of the first Via line): what routing and transaction
    /// matching need (RFC 3261 §17.2.3, §18.2.2).
    pub fn via_top(&self) -> DecodeResult<Via<'_>> {
        header::parse_via_first(self.single(HeaderName::Via)?)
    }

    /// Every Via value across all Via lines, strictly (an element that fails is an error).
    pub fn vias(&self) -> DecodeResult<Vec<Via<'_>>> {
        let mut out = Vec::new();
        for h in self.headers_named(HeaderName::Via) {
            out.extend(header::parse_via_list(h.value)?);
        }
        Ok(out)
    }

    /// From (name-addr with `tag`).
    pub fn from(&self) -> DecodeResult<NameAddr<'_>> {
        header::parse_name_addr(self.single(HeaderName::From)?)
    }

    /// To (name-addr with `tag`).
    pub fn to(&self) -> DecodeResult<NameAddr<'_>> {
        header::parse_name_addr(self.single(HeaderName::To)?)
    }

    /// Call-ID.
    pub fn call_id(&self) -> DecodeResult<&str> {
        header::parse_call_id(self.single(HeaderName::CallId)?)
    }

    /// CSeq.
    pub fn cseq(&self) -> DecodeResult<CSeq<'_>> {
        header::parse_cseq(self.single(HeaderName::CSeq)?)
    }

    /// Max-Forwards, if present.
    pub fn max_forwards(&self) -> DecodeResult<Option<u8>> {
        self.header(HeaderName::MaxForwards)
            .map(|h| header::parse_max_forwards(h.value))
            .transpose()
    }

    /// Contact values across all Contact lines (`*` only alone).
    pub fn contacts(&self) -> DecodeResult<Vec<NameAddr<'_>>> {
        let mut out = Vec::new();
        for h in self.headers_named(HeaderName::Contact) {
            match header::parse_contact(h.value)? {
                Contact::Star => return Err("'*' Contact mixed with others or used as a list"),
                Contact::List(l) => out.extend(l),
            }
        }
        Ok(out)
    }

    fn name_addrs(&self, name: HeaderName) -> DecodeResult<Vec<NameAddr<'_>>> {
        let mut out = Vec::new();
        for h in self.headers_named(name) {
            out.extend(header::parse_name_addr_list(h.value)?);
        }
        Ok(out)
    }

    /// Route values in order.
    pub fn routes(&self) -> DecodeResult<Vec<NameAddr<'_>>> {
        self.name_addrs(HeaderName::Route)
    }

    /// Record-Route values in order.
    pub fn record_routes(&self) -> DecodeResult<Vec<NameAddr<'_>>> {
        self.name_addrs(HeaderName::RecordRoute)
    }

    /// Content-Length as declared, if present (framing already checked it).
    pub fn content_length(&self) -> DecodeResult<Option<u32>> {
        self.header(HeaderName::ContentLength)
            .map(|h| header::parse_u32(h.value))
            .transpose()
    }

    /// Content-Type, if present.
    pub fn content_type(&self) -> DecodeResult<Option<MediaType<'_>>> {
        self.header(HeaderName::ContentType)
            .map(|h| header::parse_media_type(h.value))
            .transpose()
    }

    /// Expires, if present.
    pub fn expires(&self) -> DecodeResult<Option<u32>> {
        self.header(HeaderName::Expires)
            .map(|h| header::parse_u32(h.value))
            .transpose()
    }

    /// Event (RFC 6665), if present.
    pub fn event(&self) -> DecodeResult<Option<TokenParams<'_>>> {
        self.header(HeaderName::Event)
            .map(|h| header::parse_token_params(h.value))
            .transpose()
    }

    /// Subscription-State (RFC 6665), if present.
    pub fn subscription_state(&self) -> DecodeResult<Option<TokenParams<'_>>> {
        self.header(HeaderName::SubscriptionState)
            .map(|h| header::parse_subscription_state(h.value))
            .transpose()
    }

    /// Every Accept media range across all Accept lines (may be empty).
    pub fn accept(&self) -> DecodeResult<Vec<MediaType<'_>>> {
        let mut out = Vec::new();
        for h in self.headers_named(HeaderName::Accept) {
            out.extend(header::parse_accept(h.value)?);
        }
        Ok(out)
    }

    /// Lync `ms-text-format` (first IM of an IM-session INVITE), if present.
    pub fn ms_text_format(&self) -> DecodeResult<Option<header::MsTextFormat<'_>>> {
        self.header_value_by_raw_name("ms-text-format")
            .map(header::parse_ms_text_format)
            .transpose()
    }

    /// The body bytes (never converted to text).
    pub fn body(&self) -> &[u8] {
        match &self.body_own {
            Some(b) => b,
            None => self.body.get(&self.buf),
        }
    }

    /// The bytes this message was parsed from (a datagram's ignored trailing bytes excluded).
    pub fn original_bytes(&self) -> &Bytes {
        &self.buf
    }

    /// Serialized length in bytes.
    pub fn encoded_len(&self) -> usize {
        self.start_line().len()
            + 2
            + self
                .headers
                .iter()
                .map(|h| h.line_span.range().len())
                .sum::<usize>()
            + 2
            + self.body().len()
    }

    /// Serializes: untouched lines are written back as their original bytes (RFC 3261 §7.3.1
    /// allows folding; keeping the peer's folding keeps the message byte-exact).
    pub fn write_to(&self, out: &mut impl BufMut) {
        out.put_slice(self.start_line());
        out.put_slice(b"\r\n");
        for h in &self.headers {
            out.put_slice(h.line_span.get(self.field_bytes(h)));
        }
        out.put_slice(b"\r\n");
        out.put_slice(self.body());
    }

    /// Serializes: the buffer itself (shared, not copied) when nothing was edited, else a new
    /// one. Every request Legate sends is first parsed or built into its own buffer and then
    /// serialized for the transaction, so a presence storm copied each NOTIFY once more
    /// (issue 11 item 10).
    pub fn to_bytes(&self) -> Bytes {
        if self.is_its_buffer() {
            return self.buf.clone();
        }
        let mut v = Vec::with_capacity(self.encoded_len());
        self.write_to(&mut v);
        Bytes::from(v)
    }

    /// Whether [`SipMessage::write_to`] would write `buf` back byte for byte: the start line,
    /// then every header line in `buf`, each right after the one before (none added,
    /// replaced, removed or moved), the blank line, and the body up to `buf`'s end.
    fn is_its_buffer(&self) -> bool {
        if self.body_own.is_some() || self.start_span.start != 0 {
            return false;
        }
        let mut at = self.start_span.range().end;
        if self.buf.get(at..at + 2) != Some(b"\r\n") {
            return false;
        }
        at += 2;
        for h in &self.headers {
            let r = h.line_span.range();
            if h.own.is_some() || r.start != at {
                return false;
            }
            at = r.end;
        }
        self.buf.get(at..at + 2) == Some(b"\r\n") && self.body.range() == (at + 2..self.buf.len())
    }

    // ---- edits (whole lines; the rest stays byte-exact) ----

    fn make_field(name: &str, value: &str) -> Result<HeaderField, SipParseError> {
        if !header::is_token(name) {
            return Err(SipParseError::BadHeaderName);
        }
        if value.bytes().any(|c| c == b'\r' || c == b'\n') {
            return Err(SipParseError::BadHeaderValue("line break in header value"));
        }
        let mut v = Vec::with_capacity(name.len() + value.len() + 4);
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(b": ");
        v.extend_from_slice(value.as_bytes());
        v.extend_from_slice(b"\r\n");
        let n = name.len();
        Ok(HeaderField {
            name: HeaderName::classify(name.as_bytes()),
            name_span: Span::new(0..n),
            value_span: Span::new(n + 2..n + 2 + value.len()),
            loc: ValueLoc::Buf,
            line_span: Span::new(0..v.len()),
            own: Some(Bytes::from(v)),
        })
    }

    /// Inserts a header line `name: value` before position `index` (clamped to the end).
    /// Used to push a Via (RFC 3261 §16.6 step 8) or Record-Route on top.
    pub fn insert_header(
        &mut self,
        index: usize,
        name: &str,
        value: &str,
    ) -> Result<(), SipParseError> {
        let f = Self::make_field(name, value)?;
        let i = index.min(self.headers.len());
        self.headers.insert(i, f);
        Ok(())
    }

    /// Appends a header line.
    pub fn push_header(&mut self, name: &str, value: &str) -> Result<(), SipParseError> {
        self.insert_header(self.headers.len(), name, value)
    }

    /// Replaces the value of the header line at `index`, keeping its name as sent.
    pub fn replace_header(&mut self, index: usize, value: &str) -> Result<(), SipParseError> {
        let Some(old) = self.headers.get(index) else {
            return Err(SipParseError::BadHeaderValue("no header at this index"));
        };
        let raw_name = as_str(old.name_span.get(self.field_bytes(old))).to_owned();
        let f = Self::make_field(&raw_name, value)?;
        if let Some(slot) = self.headers.get_mut(index) {
            *slot = f;
        }
        Ok(())
    }

    /// Removes the header line at `index` (e.g. the top Route, RFC 3261 §16.4).
    pub fn remove_header(&mut self, index: usize) -> Option<()> {
        (index < self.headers.len()).then(|| {
            self.headers.remove(index);
        })
    }

    /// Index of the first header line with this name.
    pub fn header_index(&self, name: HeaderName) -> Option<usize> {
        self.headers.iter().position(|h| h.name == name)
    }

    /// Replaces the body and sets Content-Length accordingly (replacing every existing
    /// Content-Length line with one).
    pub fn set_body(&mut self, body: Bytes) -> Result<(), SipParseError> {
        let len = body.len().to_string();
        match self.header_index(HeaderName::ContentLength) {
            Some(i) => {
                self.replace_header(i, &len)?;
                let mut j = i + 1;
                while j < self.headers.len() {
                    if self.headers.get(j).map(|h| h.name) == Some(HeaderName::ContentLength) {
                        self.headers.remove(j);
                    } else {
                        j += 1;
                    }
                }
            }
            None => self.push_header("Content-Length", &len)?,
        }
        self.body_own = Some(body);
        Ok(())
    }

    /// Replaces the Request-URI (a proxy retargeting, RFC 3261 §16.5).
    pub fn set_request_uri(&mut self, uri: &str) -> Result<(), SipParseError> {
        parse_uri(uri, UriContext::RequestUri).map_err(SipParseError::BadRequestUri)?;
        let Some(method) = self.method() else {
            return Err(SipParseError::BadStartLine("not a request"));
        };
        let line = format!("{method} {uri} SIP/2.0");
        // Rare operation: rebuild and re-parse so every span points into one buffer again.
        let mut v = Vec::with_capacity(self.encoded_len() + uri.len());
        v.extend_from_slice(line.as_bytes());
        v.extend_from_slice(b"\r\n");
        for h in &self.headers {
            v.extend_from_slice(h.line_span.get(self.field_bytes(h)));
        }
        v.extend_from_slice(b"\r\n");
        v.extend_from_slice(self.body());
        *self = super::parse::parse_bytes(Bytes::from(v), super::parse::BodyMode::Datagram)?;
        Ok(())
    }

    /// Builds a response to this request (RFC 3261 §8.2.6.2): Via lines, From, Call-ID and
    /// CSeq copied byte-exact, To copied with `to_tag` added when it has none (never on 100,
    /// §8.2.6.2), `Content-Length: 0`. Used for 100 Trying and for stateless 4xx answers.
    pub fn build_response(
        &self,
        code: u16,
        reason: &str,
        to_tag: Option<&str>,
    ) -> Result<SipMessage, SipParseError> {
        if !(100..=699).contains(&code) || reason.bytes().any(|c| c < b' ') {
            return Err(SipParseError::BadStatusCode);
        }
        let mut v = Vec::with_capacity(self.encoded_len() / 2 + 64);
        // Pieces appended directly (no `format!`): one response per request is built here.
        v.extend_from_slice(b"SIP/2.0 ");
        // 100..=699 was checked above: always three digits.
        v.extend_from_slice(&[
            b'0' + (code / 100) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
            b' ',
        ]);
        v.extend_from_slice(reason.as_bytes());
        v.extend_from_slice(b"\r\n");
        let sl_end = v.len() - 2;
        // The spans of every line written are known here, so the response is assembled
        // directly instead of lexing the bytes just written again (one response per request).
        // A folded line (its value lives in the unfold buffer) or an unusual reason phrase
        // falls back to the parser, which then has the last word as before.
        let mut direct = reason.bytes().all(|c| (b' '..=b'~').contains(&c));
        let mut headers = Vec::with_capacity(8);
        for h in &self.headers {
            let line = h.line_span.get(self.field_bytes(h));
            match h.name {
                HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                    direct &= copy_line(&mut v, &mut headers, h, line);
                }
                HeaderName::To => {
                    let view = self.view(h);
                    let has_tag = header::parse_name_addr(view.value)
                        .map(|n| n.tag().is_some())
                        .unwrap_or(true);
                    match to_tag {
                        Some(tag) if code > 100 && !has_tag => {
                            let o = v.len();
                            let value_start = o + view.raw_name.len() + 2;
                            for piece in [view.raw_name, ": ", view.value, ";tag=", tag] {
                                v.extend_from_slice(piece.as_bytes());
                            }
                            let value_end = v.len();
                            v.extend_from_slice(b"\r\n");
                            direct &= tag.bytes().all(|c| c.is_ascii_graphic());
                            headers.push(HeaderField {
                                name: h.name,
                                name_span: Span::new(o..o + view.raw_name.len()),
                                value_span: Span::new(value_start..value_end),
                                loc: ValueLoc::Buf,
                                line_span: Span::new(o..v.len()),
                                own: None,
                            });
                        }
                        _ => direct &= copy_line(&mut v, &mut headers, h, line),
                    }
                }
                _ => {}
            }
        }
        let o = v.len();
        v.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        if !direct {
            return super::parse::parse_exact(Bytes::from(v));
        }
        headers.push(HeaderField {
            name: HeaderName::ContentLength,
            name_span: Span::new(o..o + 14),
            value_span: Span::new(o + 16..o + 17),
            loc: ValueLoc::Buf,
            line_span: Span::new(o..o + 19),
            own: None,
        });
        let end = v.len();
        Ok(SipMessage {
            buf: Bytes::from(v),
            start: StartLine::Response {
                code,
                reason: Span::new(12..sl_end),
            },
            start_span: Span::new(0..sl_end),
            headers,
            unfolded: String::new(),
            head: String::new(),
            body: Span::new(end..end),
            body_own: None,
        })
    }
}

/// Appends `line` (the raw line of `h`) to `v` and records its header with spans moved to
/// where it now sits; `false` when the spans cannot be moved (a folded value lives in the
/// source's unfold buffer), so the caller re-parses instead.
fn copy_line(
    v: &mut Vec<u8>,
    headers: &mut Vec<HeaderField>,
    h: &HeaderField,
    line: &[u8],
) -> bool {
    let o = v.len();
    v.extend_from_slice(line);
    if h.own.is_none() && h.loc == ValueLoc::Unfolded {
        return false;
    }
    let base = h.line_span.start as usize;
    let moved = |s: Span| {
        Span::new(
            o + (s.start as usize).saturating_sub(base)..o + (s.end as usize).saturating_sub(base),
        )
    };
    headers.push(HeaderField {
        name: h.name,
        name_span: moved(h.name_span),
        value_span: moved(h.value_span),
        loc: ValueLoc::Buf,
        line_span: Span::new(o..v.len()),
        own: None,
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::{parse_datagram, parse_exact};

    const REQ: &[u8] = b"INVITE sip:a@contoso.com SIP/2.0\r\n\
Via: SIP/2.0/TLS e.fabrikam.com:5061;branch=z9hG4bK1, SIP/2.0/TLS p.fabrikam.com;branch=z9hG4bK0\r\n\
From: <sip:b@fabrikam.com>;tag=f\r\n\
To: \"A\" <sip:a@contoso.com>\r\n\
Call-ID: c\r\n\
CSeq: 1 INVITE\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 3\r\n\r\nv=0";

    fn parsed() -> SipMessage {
        match parse_datagram(REQ) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    /// Unedited, a message serializes to its own buffer, shared; edited, to what `write_to`
    /// writes, which is then a new buffer.
    #[test]
    fn to_bytes_shares_the_buffer_only_while_nothing_was_edited() {
        let m = parsed();
        let b = m.to_bytes();
        assert_eq!(&b[..], REQ);
        assert_eq!(b.as_ptr(), m.original_bytes().as_ptr());
        let edits: [fn(&mut SipMessage); 4] = [
            |m| {
                m.remove_header(1);
            },
            |m| m.push_header("X-A", "1").expect("push"),
            |m| m.replace_header(4, "d").expect("replace"),
            |m| m.set_body(Bytes::from_static(b"v=1")).expect("body"),
        ];
        for edit in edits {
            let mut m = parsed();
            edit(&mut m);
            let mut want = Vec::new();
            m.write_to(&mut want);
            let b = m.to_bytes();
            assert_eq!(&b[..], &want[..]);
            assert_ne!(&b[..], REQ);
            assert_ne!(b.as_ptr(), m.original_bytes().as_ptr());
        }
        // Removing a header and adding one of the same length is still not the buffer.
        let mut m = parsed();
        m.remove_header(3);
        m.push_header("Call-ID", "c").expect("push");
        assert_eq!(m.encoded_len(), REQ.len());
        let mut want = Vec::new();
        m.write_to(&mut want);
        assert_eq!(&m.to_bytes()[..], &want[..]);
        assert_ne!(&m.to_bytes()[..], REQ);
        // A message with trailing datagram bytes: its buffer stops at its body.
        let mut padded = REQ.to_vec();
        padded.extend_from_slice(b"junk");
        let m = parse_datagram(&padded).expect("parse");
        assert_eq!(&m.to_bytes()[..], REQ);
    }

    #[test]
    fn a_response_built_directly_equals_its_parse() {
        let folded = b"MESSAGE sip:a@contoso.com SIP/2.0\r\n\
v: SIP/2.0/TCP e.fabrikam.com;branch=z9hG4bK1\r\n\
f: <sip:b@fabrikam.com>\r\n ;tag=f\r\n\
t:   <sip:a@contoso.com>  \r\n\
i: c\r\n\
CSeq: 1 MESSAGE\r\n\
l: 0\r\n\r\n";
        for raw in [REQ, &folded[..]] {
            let m = match parse_datagram(raw) {
                Ok(m) => m,
                Err(e) => panic!("{e}"),
            };
            for (code, reason, tag) in [
                (100, "Trying", Some("t1")),
                (200, "OK", Some("t1")),
                (200, "OK", None),
                (486, "Busy Here", Some("x")),
                (403, "Forbidden (Domain Not Federated)", Some("lg7")),
                (400, "Caf\u{e9}", Some("t")),
            ] {
                let Ok(r) = m.build_response(code, reason, tag) else {
                    panic!("{code} {reason}")
                };
                assert_eq!(
                    Ok(&r),
                    parse_exact(r.to_bytes()).as_ref(),
                    "{code} {reason}"
                );
            }
        }
    }

    #[test]
    fn response_copies_byte_exact_and_adds_tag() {
        let m = parsed();
        let r = m.build_response(486, "Busy Here", Some("t1"));
        let Ok(r) = r else { panic!("{r:?}") };
        let text = String::from_utf8_lossy(&r.to_bytes()).into_owned();
        assert!(text.starts_with("SIP/2.0 486 Busy Here\r\nVia: SIP/2.0/TLS e.fabrikam.com:5061;branch=z9hG4bK1, SIP/2.0/TLS p.fabrikam.com;branch=z9hG4bK0\r\n"));
        assert!(text.contains("To: \"A\" <sip:a@contoso.com>;tag=t1\r\n"));
        assert!(text.ends_with("CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"));
        let trying = m.build_response(100, "Trying", Some("t1"));
        assert_eq!(
            trying.map(|t| t.to().map(|t| t.tag().is_none())),
            Ok(Ok(true))
        );
        assert!(m.build_response(99, "x", None).is_err());
    }

    #[test]
    fn body_and_request_uri_edits() {
        let mut m = parsed();
        assert!(m.set_body(Bytes::from_static(b"v=0\r\no=-\r\n")).is_ok());
        assert_eq!(m.content_length(), Ok(Some(10)));
        let again = parse_datagram(&m.to_bytes());
        assert_eq!(again.map(|a| a.body().len()), Ok(10));
        assert!(m
            .set_request_uri("sip:a@contoso.com;opaque=user:epid:x;gruu")
            .is_ok());
        assert_eq!(
            m.request_uri_str(),
            Some("sip:a@contoso.com;opaque=user:epid:x;gruu")
        );
        assert!(m.set_request_uri("sip:a@b?x=y").is_err());
        assert!(m.insert_header(0, "Bad Name", "x").is_err());
        assert!(m.push_header("X-Ok", "line\r\nbreak").is_err());
        assert!(m.remove_header(99).is_none());
    }
}
