//! Header names and typed header values (RFC 3261 §7.3, §20, §25.1; RFC 6665 Event).
//!
//! Typed values are views: each one borrows the (unfolded) header value and exposes byte-exact
//! slices of it. Decoders are strict: every decoder consumes the whole value or fails with a
//! specific reason ("nothing left after a decode", so `CSeq: 1e3` never reads as 1), and list
//! decoders fail on any element that does not parse instead of returning a shorter list.
//! Nothing here allocates except list collection, and nothing here is on the serialize path.

use super::uri::{parse_host_name, parse_ipv6_ref, parse_uri, Host, Params, Uri, UriContext};

/// Known header names; everything else is `Other` and compared by its raw name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeaderName {
    /// `Via`
    Via,
    /// `From`
    From,
    /// `To`
    To,
    /// `Call-ID`
    CallId,
    /// `CSeq`
    CSeq,
    /// `Max-Forwards`
    MaxForwards,
    /// `Contact`
    Contact,
    /// `Route`
    Route,
    /// `Record-Route`
    RecordRoute,
    /// `Content-Length`
    ContentLength,
    /// `Content-Type`
    ContentType,
    /// `Content-Encoding`
    ContentEncoding,
    /// `Expires`
    Expires,
    /// `Min-Expires`
    MinExpires,
    /// `Event`
    Event,
    /// `Subscription-State`
    SubscriptionState,
    /// `Accept`
    Accept,
    /// `Date`
    Date,
    /// `Require`
    Require,
    /// `Proxy-Require`
    ProxyRequire,
    /// `Supported`
    Supported,
    /// `Subject`
    Subject,
    /// `Refer-To`
    ReferTo,
    /// `Allow-Events`
    AllowEvents,
    /// `Retry-After`
    RetryAfter,
    /// `Warning`
    Warning,
    /// Any other header (compare by raw name).
    Other,
}

impl HeaderName {
    /// Classifies a header name: case-insensitive, compact forms recognised (RFC 3261 §7.3.3,
    /// §20; `o` Event and `u` Allow-Events from RFC 6665, `r` Refer-To from RFC 3515).
    pub fn classify(name: &[u8]) -> HeaderName {
        if name.len() == 1 {
            return match name[0].to_ascii_lowercase() {
                b'v' => HeaderName::Via,
                b'f' => HeaderName::From,
                b't' => HeaderName::To,
                b'i' => HeaderName::CallId,
                b'm' => HeaderName::Contact,
                b'l' => HeaderName::ContentLength,
                b'c' => HeaderName::ContentType,
                b'e' => HeaderName::ContentEncoding,
                b'k' => HeaderName::Supported,
                b's' => HeaderName::Subject,
                b'o' => HeaderName::Event,
                b'u' => HeaderName::AllowEvents,
                b'r' => HeaderName::ReferTo,
                _ => HeaderName::Other,
            };
        }
        // Lowercase into a small stack buffer; long names are never known ones.
        let mut buf = [0u8; 20];
        if name.len() > buf.len() {
            return HeaderName::Other;
        }
        for (d, s) in buf.iter_mut().zip(name) {
            *d = s.to_ascii_lowercase();
        }
        match buf.get(..name.len()).unwrap_or(&[]) {
            b"via" => HeaderName::Via,
            b"from" => HeaderName::From,
            b"to" => HeaderName::To,
            b"call-id" => HeaderName::CallId,
            b"cseq" => HeaderName::CSeq,
            b"max-forwards" => HeaderName::MaxForwards,
            b"contact" => HeaderName::Contact,
            b"route" => HeaderName::Route,
            b"record-route" => HeaderName::RecordRoute,
            b"content-length" => HeaderName::ContentLength,
            b"content-type" => HeaderName::ContentType,
            b"content-encoding" => HeaderName::ContentEncoding,
            b"expires" => HeaderName::Expires,
            b"min-expires" => HeaderName::MinExpires,
            b"event" => HeaderName::Event,
            b"subscription-state" => HeaderName::SubscriptionState,
            b"accept" => HeaderName::Accept,
            b"date" => HeaderName::Date,
            b"require" => HeaderName::Require,
            b"proxy-require" => HeaderName::ProxyRequire,
            b"supported" => HeaderName::Supported,
            b"subject" => HeaderName::Subject,
            b"refer-to" => HeaderName::ReferTo,
            b"allow-events" => HeaderName::AllowEvents,
            b"retry-after" => HeaderName::RetryAfter,
            b"warning" => HeaderName::Warning,
            _ => HeaderName::Other,
        }
    }

    /// The canonical long name (used in error reasons and for headers we add).
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderName::Via => "Via",
            HeaderName::From => "From",
            HeaderName::To => "To",
            HeaderName::CallId => "Call-ID",
            HeaderName::CSeq => "CSeq",
            HeaderName::MaxForwards => "Max-Forwards",
            HeaderName::Contact => "Contact",
            HeaderName::Route => "Route",
            HeaderName::RecordRoute => "Record-Route",
            HeaderName::ContentLength => "Content-Length",
            HeaderName::ContentType => "Content-Type",
            HeaderName::ContentEncoding => "Content-Encoding",
            HeaderName::Expires => "Expires",
            HeaderName::MinExpires => "Min-Expires",
            HeaderName::Event => "Event",
            HeaderName::SubscriptionState => "Subscription-State",
            HeaderName::Accept => "Accept",
            HeaderName::Date => "Date",
            HeaderName::Require => "Require",
            HeaderName::ProxyRequire => "Proxy-Require",
            HeaderName::Supported => "Supported",
            HeaderName::Subject => "Subject",
            HeaderName::ReferTo => "Refer-To",
            HeaderName::AllowEvents => "Allow-Events",
            HeaderName::RetryAfter => "Retry-After",
            HeaderName::Warning => "Warning",
            HeaderName::Other => "extension header",
        }
    }
}

/// A header value that failed to decode: which grammar rule broke.
pub type DecodeResult<T> = Result<T, &'static str>;

/// RFC 3261 §25.1 `token` characters.
pub(crate) fn is_token_char(c: u8) -> bool {
    TOKEN[usize::from(c)]
}

/// Lookup table for [`is_token_char`] (called for nearly every header byte).
static TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0usize;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        c += 1;
    }
    t
};

/// `true` if `s` is a non-empty token.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_char)
}

/// A cursor over an unfolded header value. All slicing goes through `get`, and every position
/// it stops at is an ASCII delimiter, so slices are always on char boundaries.
pub(crate) struct Cur<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cur<'a> {
    pub(crate) fn new(s: &'a str) -> Self {
        Cur { s, i: 0 }
    }
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }
    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    /// Skips linear white space (folds were already turned into plain white space).
    fn ws(&mut self) -> bool {
        let start = self.i;
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
        self.i > start
    }
    fn slice(&self, a: usize, b: usize) -> &'a str {
        self.s.get(a..b).unwrap_or("")
    }
    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let start = self.i;
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        self.slice(start, self.i)
    }
    fn token(&mut self) -> &'a str {
        self.take_while(is_token_char)
    }
    /// RFC 3261 §25.1 quoted-string, returned with its quotes.
    fn quoted(&mut self) -> DecodeResult<&'a str> {
        let start = self.i;
        if !self.eat(b'"') {
            return Err("expected quoted string");
        }
        let b = self.s.as_bytes();
        while let Some(&c) = b.get(self.i) {
            match c {
                b'"' => {
                    self.i += 1;
                    return Ok(self.slice(start, self.i));
                }
                b'\\' => {
                    // quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F)
                    match b.get(self.i + 1) {
                        Some(&n) if n <= 0x7f && n != b'\r' && n != b'\n' => self.i += 2,
                        _ => return Err("invalid escape in quoted string"),
                    }
                }
                // qdtext = LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII
                b' ' | b'\t' | b'\r' | b'\n' | 0x21..=0x7e | 0x80..=0xff => self.i += 1,
                _ => return Err("control character in quoted string"),
            }
        }
        Err("unterminated quoted string")
    }
    /// `*( SEMI generic-param )`; returns the raw parameter text. Empty parameters (`;;`) are
    /// refused (RFC 4475 §3.1.2.1).
    fn params(&mut self) -> DecodeResult<&'a str> {
        let start = self.i;
        loop {
            let save = self.i;
            self.ws();
            if !self.eat(b';') {
                self.i = save;
                break;
            }
            self.ws();
            if self.token().is_empty() {
                return Err("empty or invalid parameter");
            }
            let before_eq = self.i;
            self.ws();
            if self.eat(b'=') {
                self.ws();
                // gen-value = token / host / quoted-string
                match self.peek() {
                    Some(b'"') => {
                        self.quoted()?;
                    }
                    Some(b'[') => {
                        let v = self.take_while(|c| c != b']' && c != b';' && c != b',');
                        if !self.eat(b']') {
                            return Err("unterminated IPv6 reference in parameter");
                        }
                        let full = self.slice(self.i - v.len() - 1, self.i);
                        parse_ipv6_ref(full)?;
                    }
                    _ => {
                        // `received=2001:db8::9:255` (RFC 3261 §20.42 via-received allows a bare
                        // IPv6address; RFC 5118 §4.5): a value with ':' must be an IPv6 address.
                        let v = self.take_while(|c| is_token_char(c) || c == b':');
                        if v.is_empty() {
                            return Err("empty or invalid parameter value");
                        }
                        if v.contains(':') && v.parse::<std::net::Ipv6Addr>().is_err() {
                            return Err("invalid parameter value");
                        }
                    }
                }
            } else {
                self.i = before_eq;
            }
        }
        Ok(self.slice(start, self.i))
    }
    /// After a list element: end of value, or a comma followed by another element.
    /// Returns `true` if another element follows.
    fn list_sep(&mut self) -> DecodeResult<bool> {
        self.ws();
        if self.at_end() {
            return Ok(false);
        }
        if !self.eat(b',') {
            return Err("unexpected character after value");
        }
        self.ws();
        if self.at_end() || self.peek() == Some(b',') {
            return Err("empty list element");
        }
        Ok(true)
    }
    fn finish(&mut self) -> DecodeResult<()> {
        self.ws();
        if self.at_end() {
            Ok(())
        } else {
            Err("trailing characters after value")
        }
    }
}

/// One Via value (RFC 3261 §20.42).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via<'a> {
    /// Protocol name (normally `SIP`).
    pub protocol: &'a str,
    /// Protocol version (normally `2.0`).
    pub version: &'a str,
    /// Transport token as sent (`UDP`, `TCP`, `TLS`, `SCTP`, unknown ones too).
    pub transport: &'a str,
    /// The sent-by host.
    pub host: Host<'a>,
    /// The sent-by port, if given.
    pub port: Option<u16>,
    sent_by: &'a str,
    params: &'a str,
}

impl<'a> Via<'a> {
    /// `host[:port]` as sent (used in transaction matching, RFC 3261 §17.2.3).
    pub fn sent_by(&self) -> &'a str {
        self.sent_by
    }
    /// The Via parameters, byte-exact.
    pub fn params(&self) -> Params<'a> {
        Params::new(self.params)
    }
    /// The `branch` parameter.
    pub fn branch(&self) -> Option<&'a str> {
        self.params().get("branch").flatten()
    }
    /// The `received` parameter (brackets kept if the peer sent them; RFC 5118 §4.5).
    pub fn received(&self) -> Option<&'a str> {
        self.params().get("received").flatten()
    }
    /// `rport`: `Some(None)` when present without a value (RFC 3581).
    pub fn rport(&self) -> Option<Option<&'a str>> {
        self.params().get("rport")
    }
}

fn parse_via_one<'a>(c: &mut Cur<'a>) -> DecodeResult<Via<'a>> {
    c.ws();
    let protocol = c.token();
    if protocol.is_empty() {
        return Err("missing protocol name");
    }
    c.ws();
    if !c.eat(b'/') {
        return Err("expected '/' in sent-protocol");
    }
    c.ws();
    let version = c.token();
    if version.is_empty() {
        return Err("missing protocol version");
    }
    c.ws();
    if !c.eat(b'/') {
        return Err("expected '/' in sent-protocol");
    }
    c.ws();
    let transport = c.token();
    if transport.is_empty() {
        return Err("missing transport");
    }
    if !c.ws() {
        return Err("missing white space before sent-by");
    }
    let hstart = c.i;
    let host = if c.peek() == Some(b'[') {
        c.take_while(|x| x != b']');
        if !c.eat(b']') {
            return Err("unterminated IPv6 reference");
        }
        let text = c.slice(hstart, c.i);
        Host::V6(parse_ipv6_ref(text)?, text)
    } else {
        let h = c.take_while(|x| x.is_ascii_alphanumeric() || x == b'-' || x == b'.');
        parse_host_name(h)?
    };
    let hend = c.i;
    let mut port = None;
    let mut sb_end = hend;
    let save = c.i;
    c.ws();
    if c.eat(b':') {
        c.ws();
        let d = c.take_while(|x| x.is_ascii_digit());
        if d.is_empty() {
            return Err("invalid sent-by port");
        }
        port = Some(d.parse::<u16>().map_err(|_| "sent-by port out of range")?);
        sb_end = c.i;
    } else {
        c.i = save;
    }
    let params = c.params()?;
    Ok(Via {
        protocol,
        version,
        transport,
        host,
        port,
        sent_by: c.slice(hstart, sb_end),
        params,
    })
}

/// Range and form checks on the Via parameters RFC 3261 §20.42 defines (validation only; the
/// routing fast path does not pay for them).
fn check_via_params(v: &Via<'_>) -> DecodeResult<()> {
    for (name, value) in v.params() {
        if name.eq_ignore_ascii_case("ttl") {
            let t = parse_u32(value.ok_or("ttl without value")?)?;
            if t > 255 {
                return Err("ttl out of range");
            }
        } else if name.eq_ignore_ascii_case("rport") {
            if let Some(p) = value {
                p.parse::<u16>().map_err(|_| "invalid rport")?;
            }
        } else if name.eq_ignore_ascii_case("received") {
            // IPv4address / IPv6address; RFC 5118 §4.5: tolerate a bracketed IPv6 reference.
            let r = value.ok_or("received without value")?;
            let ok = r.parse::<std::net::IpAddr>().is_ok()
                || (r.starts_with('[') && parse_ipv6_ref(r).is_ok());
            if !ok {
                return Err("received is not an IP address");
            }
        } else if name.eq_ignore_ascii_case("maddr") {
            let m = value.ok_or("maddr without value")?;
            if !m.starts_with('[') {
                parse_host_name(m)?;
            }
        }
    }
    Ok(())
}

/// Decodes every Via value of one header line (`Via: a, b`).
pub fn parse_via_list(value: &str) -> DecodeResult<Vec<Via<'_>>> {
    let mut c = Cur::new(value);
    let mut out = Vec::new();
    loop {
        let v = parse_via_one(&mut c)?;
        check_via_params(&v)?;
        out.push(v);
        if !c.list_sep()? {
            return Ok(out);
        }
    }
}

/// Decodes the first Via value of one header line; the rest of the line is not looked at
/// (the routing fast path; validation decodes the whole list).
pub fn parse_via_first(value: &str) -> DecodeResult<Via<'_>> {
    let mut c = Cur::new(value);
    let v = parse_via_one(&mut c)?;
    c.ws();
    if c.at_end() || c.peek() == Some(b',') {
        Ok(v)
    } else {
        Err("unexpected character after Via value")
    }
}

/// One pass over the first Via line for the routing view: the first value exactly as
/// [`parse_via_first`] answers it, and the verdict [`parse_via_list`] would give on the whole
/// line (the first value's parameters checked, every later value decoded), without decoding
/// the first value twice.
pub fn parse_via_line(value: &str) -> (DecodeResult<Via<'_>>, DecodeResult<()>) {
    let mut c = Cur::new(value);
    let first = match parse_via_one(&mut c) {
        Ok(v) => v,
        Err(e) => return (Err(e), Err(e)),
    };
    let mut after = Cur { s: value, i: c.i };
    after.ws();
    let rest = check_via_params(&first).and_then(|()| {
        while c.list_sep()? {
            check_via_params(&parse_via_one(&mut c)?)?;
        }
        Ok(())
    });
    if after.at_end() || after.peek() == Some(b',') {
        (Ok(first), rest)
    } else {
        (Err("unexpected character after Via value"), rest)
    }
}

/// A name-addr or addr-spec with header parameters (From, To, Contact, Route, Record-Route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// Display name as sent (quotes kept), if any.
    pub display_name: Option<&'a str>,
    /// The URI.
    pub uri: Uri<'a>,
    /// Whether the URI was enclosed in `<>`.
    pub bracketed: bool,
    params: &'a str,
}

impl<'a> NameAddr<'a> {
    /// Header parameters (after the URI), byte-exact.
    pub fn params(&self) -> Params<'a> {
        Params::new(self.params)
    }
    /// The `tag` parameter (From/To, RFC 3261 §19.3).
    pub fn tag(&self) -> Option<&'a str> {
        self.params().get("tag").flatten()
    }
}

fn parse_name_addr_one<'a>(c: &mut Cur<'a>) -> DecodeResult<NameAddr<'a>> {
    c.ws();
    let start = c.i;
    let mut display_name = None;
    match c.peek() {
        Some(b'"') => {
            display_name = Some(c.quoted()?);
            c.ws();
            if c.peek() != Some(b'<') {
                return Err("expected '<' after display name");
            }
        }
        Some(b'<') => {}
        _ => {
            // Either `*(token LWS) <uri>` or a bare addr-spec. A scheme is followed by ':', which
            // is not a token character, so a first token directly followed by ':' is a URI.
            let t = c.token();
            if !t.is_empty() && c.peek() == Some(b':') {
                c.i = start;
                let u = c.take_while(|x| !matches!(x, b';' | b',' | b' ' | b'\t' | b'\r' | b'\n'));
                // A bare URI with '?' is not a URI followed by something (RFC 3261 §20).
                let uri = parse_uri(u, UriContext::AddrSpec)?;
                let params = c.params()?;
                return Ok(NameAddr {
                    display_name: None,
                    uri,
                    bracketed: false,
                    params,
                });
            }
            if t.is_empty() {
                return Err("expected display name, '<' or URI");
            }
            loop {
                c.ws();
                if c.peek() == Some(b'<') {
                    break;
                }
                if c.token().is_empty() {
                    return Err("display name with non-token characters must be quoted");
                }
            }
            let end = c.i;
            display_name = Some(
                c.slice(start, end)
                    .trim_end_matches([' ', '\t', '\r', '\n']),
            );
        }
    }
    if !c.eat(b'<') {
        return Err("expected '<'");
    }
    // No white space inside the brackets (RFC 4475 §3.1.2.14).
    let u = c.take_while(|x| x != b'>' && x > b' ');
    if !c.eat(b'>') {
        return Err(if c.at_end() {
            "missing '>'"
        } else {
            "white space or control character inside <addr-spec>"
        });
    }
    let uri = parse_uri(u, UriContext::NameAddr)?;
    let params = c.params()?;
    Ok(NameAddr {
        display_name,
        uri,
        bracketed: true,
        params,
    })
}

/// Decodes a single name-addr/addr-spec value (From, To): a list is an error.
pub fn parse_name_addr(value: &str) -> DecodeResult<NameAddr<'_>> {
    let mut c = Cur::new(value);
    let na = parse_name_addr_one(&mut c)?;
    c.finish()?;
    Ok(na)
}

/// Decodes a comma-separated list of name-addr values (Contact, Route, Record-Route).
pub fn parse_name_addr_list(value: &str) -> DecodeResult<Vec<NameAddr<'_>>> {
    let mut c = Cur::new(value);
    let mut out = Vec::new();
    loop {
        out.push(parse_name_addr_one(&mut c)?);
        if !c.list_sep()? {
            return Ok(out);
        }
    }
}

/// Contact: `*` or a list (RFC 3261 §20.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contact<'a> {
    /// `Contact: *` (REGISTER removal).
    Star,
    /// The listed contacts.
    List(Vec<NameAddr<'a>>),
}

/// Decodes a Contact value; `expires` contact parameters are range-checked (RFC 4475 §3.1.2.4).
pub fn parse_contact(value: &str) -> DecodeResult<Contact<'_>> {
    if value.trim() == "*" {
        return Ok(Contact::Star);
    }
    let list = parse_name_addr_list(value)?;
    for na in &list {
        if let Some(e) = na.params().get("expires") {
            parse_u32(e.ok_or("expires parameter without value")?)?;
        }
        if let Some(q) = na.params().get("q") {
            check_qvalue(q.ok_or("q parameter without value")?)?;
        }
    }
    Ok(Contact::List(list))
}

/// qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ) (RFC 3261 §25.1).
fn check_qvalue(q: &str) -> DecodeResult<()> {
    let (int, frac) = q.split_once('.').unwrap_or((q, ""));
    let ok = frac.len() <= 3
        && frac.bytes().all(|c| c.is_ascii_digit())
        && match int {
            "0" => true,
            "1" => frac.bytes().all(|c| c == b'0'),
            _ => false,
        };
    if ok {
        Ok(())
    } else {
        Err("q value out of range")
    }
}

/// CSeq (RFC 3261 §20.16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq<'a> {
    /// Sequence number (< 2^31, RFC 3261 §8.1.1.5).
    pub seq: u32,
    /// Method as sent.
    pub method: &'a str,
}

/// Decodes CSeq: `1*DIGIT LWS Method`, nothing after.
pub fn parse_cseq(value: &str) -> DecodeResult<CSeq<'_>> {
    let mut c = Cur::new(value);
    c.ws();
    let d = c.take_while(|x| x.is_ascii_digit());
    if d.is_empty() {
        return Err("sequence number is not a number");
    }
    let seq = parse_digits_u64(d).ok_or("sequence number too large")?;
    if seq >= 1 << 31 {
        return Err("sequence number too large");
    }
    if !c.ws() {
        return Err("expected white space after sequence number");
    }
    let method = c.token();
    if method.is_empty() {
        return Err("missing method");
    }
    c.finish()?;
    Ok(CSeq {
        seq: seq as u32,
        method,
    })
}

fn parse_digits_u64(d: &str) -> Option<u64> {
    // Leading zeros are legal (RFC 4475 §3.1.1.1: `0009`); u64 parse handles them.
    d.parse::<u64>().ok()
}

/// Decodes a `delta-seconds`-like scalar: digits only, at most 2^32-1 (RFC 3261 §20.19).
pub fn parse_u32(value: &str) -> DecodeResult<u32> {
    let v = value.trim_matches([' ', '\t']);
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
        return Err("not a number");
    }
    parse_digits_u64(v)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or("value too large")
}

/// Max-Forwards: 0..=255 (RFC 3261 §20.22).
pub fn parse_max_forwards(value: &str) -> DecodeResult<u8> {
    let n = parse_u32(value)?;
    u8::try_from(n).map_err(|_| "value too large")
}

/// Call-ID: `word ["@" word]` (RFC 3261 §20.8).
pub fn parse_call_id(value: &str) -> DecodeResult<&str> {
    let v = value.trim_matches([' ', '\t']);
    let is_word = |w: &str| {
        !w.is_empty()
            && w.bytes().all(|c| {
                is_token_char(c)
                    || matches!(
                        c,
                        b'(' | b')'
                            | b'<'
                            | b'>'
                            | b':'
                            | b'\\'
                            | b'"'
                            | b'/'
                            | b'['
                            | b']'
                            | b'?'
                            | b'{'
                            | b'}'
                    )
            })
    };
    let ok = match v.split_once('@') {
        Some((a, b)) => is_word(a) && is_word(b),
        None => is_word(v),
    };
    if ok {
        Ok(v)
    } else {
        Err("invalid Call-ID")
    }
}

/// A media type with parameters (Content-Type, Accept element).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaType<'a> {
    /// Type (`application`, `*`).
    pub mtype: &'a str,
    /// Subtype (`pidf+xml`, `*`).
    pub subtype: &'a str,
    params: &'a str,
}

impl<'a> MediaType<'a> {
    /// Parameters, byte-exact.
    pub fn params(&self) -> Params<'a> {
        Params::new(self.params)
    }
    /// `true` if type and subtype equal `t/s` case-insensitively (RFC 3261 §7.3.1).
    pub fn is(&self, t: &str, s: &str) -> bool {
        self.mtype.eq_ignore_ascii_case(t) && self.subtype.eq_ignore_ascii_case(s)
    }
}

fn parse_media_one<'a>(c: &mut Cur<'a>) -> DecodeResult<MediaType<'a>> {
    c.ws();
    let mtype = c.token();
    if mtype.is_empty() {
        return Err("missing media type");
    }
    c.ws();
    if !c.eat(b'/') {
        return Err("expected '/' in media type");
    }
    c.ws();
    let subtype = c.token();
    if subtype.is_empty() {
        return Err("missing media subtype");
    }
    let params = c.params()?;
    Ok(MediaType {
        mtype,
        subtype,
        params,
    })
}

/// Content-Type (RFC 3261 §20.15).
pub fn parse_media_type(value: &str) -> DecodeResult<MediaType<'_>> {
    let mut c = Cur::new(value);
    let m = parse_media_one(&mut c)?;
    c.finish()?;
    Ok(m)
}

/// Accept (RFC 3261 §20.1): possibly empty list of media ranges.
pub fn parse_accept(value: &str) -> DecodeResult<Vec<MediaType<'_>>> {
    let mut c = Cur::new(value);
    let mut out = Vec::new();
    c.ws();
    if c.at_end() {
        return Ok(out);
    }
    loop {
        out.push(parse_media_one(&mut c)?);
        if !c.list_sep()? {
            return Ok(out);
        }
    }
}

/// A token with parameters: Event (RFC 6665 §8.2.1), Subscription-State (§8.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenParams<'a> {
    /// The token (`presence`, `active`, ...).
    pub value: &'a str,
    params: &'a str,
}

impl<'a> TokenParams<'a> {
    /// Parameters, byte-exact.
    pub fn params(&self) -> Params<'a> {
        Params::new(self.params)
    }
    /// A parameter value by name.
    pub fn param(&self, name: &str) -> Option<&'a str> {
        self.params().get(name).flatten()
    }
}

/// Decodes `token *(SEMI generic-param)`.
pub fn parse_token_params(value: &str) -> DecodeResult<TokenParams<'_>> {
    let mut c = Cur::new(value);
    c.ws();
    let t = c.token();
    if t.is_empty() {
        return Err("missing token");
    }
    let params = c.params()?;
    c.finish()?;
    Ok(TokenParams { value: t, params })
}

/// Subscription-State with its `expires` parameter range-checked.
pub fn parse_subscription_state(value: &str) -> DecodeResult<TokenParams<'_>> {
    let t = parse_token_params(value)?;
    for k in ["expires", "retry-after"] {
        if let Some(v) = t.params().get(k) {
            parse_u32(v.ok_or("parameter without value")?)?;
        }
    }
    Ok(t)
}

/// A list of tokens, possibly empty (Supported) or not (Require, Proxy-Require).
pub fn parse_token_list(value: &str, allow_empty: bool) -> DecodeResult<Vec<&str>> {
    let mut c = Cur::new(value);
    let mut out = Vec::new();
    c.ws();
    if c.at_end() {
        return if allow_empty {
            Ok(out)
        } else {
            Err("empty list")
        };
    }
    loop {
        c.ws();
        let t = c.token();
        if t.is_empty() {
            return Err("invalid token in list");
        }
        out.push(t);
        if !c.list_sep()? {
            return Ok(out);
        }
    }
}

/// Lync's `ms-text-format` header (MS-SIPRE §2.2.1): a media type whose `ms-body` parameter
/// carries the first instant message, base64-encoded. Base64 uses `/` and `=`, which RFC 3261
/// `token` does not allow, so parameter values here run to the next `;` and are returned raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsTextFormat<'a> {
    /// Type (`text`).
    pub mtype: &'a str,
    /// Subtype (`plain`, `html`, `rtf`).
    pub subtype: &'a str,
    /// Raw parameters, byte-exact.
    pub params: &'a str,
}

impl<'a> MsTextFormat<'a> {
    /// A parameter by case-insensitive name, raw (quotes kept).
    pub fn param(&self, name: &str) -> Option<&'a str> {
        self.params
            .split(';')
            .skip(1)
            .filter_map(|p| p.split_once('='))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }
    /// The base64 `ms-body`, as sent.
    pub fn ms_body(&self) -> Option<&'a str> {
        self.param("ms-body")
    }
}

/// Decodes `ms-text-format`.
pub fn parse_ms_text_format(value: &str) -> DecodeResult<MsTextFormat<'_>> {
    let v = value.trim();
    let (mt, params) = match v.find(';') {
        Some(i) => (v.get(..i).unwrap_or(""), v.get(i..).unwrap_or("")),
        None => (v, ""),
    };
    let (t, st) = mt.split_once('/').ok_or("expected '/' in media type")?;
    let (t, st) = (t.trim(), st.trim());
    if !is_token(t) || !is_token(st) {
        return Err("invalid media type");
    }
    for p in params.split(';').skip(1) {
        let (n, val) = p.split_once('=').ok_or("parameter without value")?;
        if !is_token(n.trim()) || val.trim().is_empty() || val.bytes().any(|c| c < b' ') {
            return Err("invalid parameter");
        }
    }
    Ok(MsTextFormat {
        mtype: t,
        subtype: st,
        params,
    })
}

/// Date: `rfc1123-date` in GMT only (RFC 3261 §20.17; RFC 4475 §3.1.2.12).
pub fn parse_date(value: &str) -> DecodeResult<()> {
    let v = value.trim_matches([' ', '\t']);
    // "Sat, 15 Oct 2005 04:44:56 GMT"
    let b = v.as_bytes();
    if b.len() != 29 {
        return Err("not an RFC 1123 date in GMT");
    }
    let wk = v.get(0..3).unwrap_or("");
    let mon = v.get(8..11).unwrap_or("");
    let digits = |r: std::ops::Range<usize>| {
        b.get(r)
            .is_some_and(|s| s.iter().all(|c| c.is_ascii_digit()))
    };
    let ok = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].contains(&wk)
        && v.get(3..5) == Some(", ")
        && digits(5..7)
        && b.get(7) == Some(&b' ')
        && [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .contains(&mon)
        && b.get(11) == Some(&b' ')
        && digits(12..16)
        && b.get(16) == Some(&b' ')
        && digits(17..19)
        && b.get(19) == Some(&b':')
        && digits(20..22)
        && b.get(22) == Some(&b':')
        && digits(23..25)
        && v.get(25..29) == Some(" GMT");
    if ok {
        Ok(())
    } else {
        Err("not an RFC 1123 date in GMT")
    }
}

/// Retry-After: `delta-seconds [comment] *(SEMI params)`; only the number is range-checked.
pub fn parse_retry_after(value: &str) -> DecodeResult<u32> {
    let v = value.trim_start_matches([' ', '\t']);
    let end = v
        .bytes()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(v.len());
    parse_u32(v.get(..end).unwrap_or(""))
}

/// Warning: each `warn-code` must be exactly three digits (RFC 3261 §20.43).
pub fn parse_warning(value: &str) -> DecodeResult<()> {
    let mut c = Cur::new(value);
    loop {
        c.ws();
        let code = c.take_while(|x| x.is_ascii_digit());
        if code.len() != 3 {
            return Err("warn-code must be three digits");
        }
        if !c.ws() {
            return Err("expected white space after warn-code");
        }
        let agent = c.take_while(|x| x > b' ' && x != b'"' && x != b',');
        if agent.is_empty() {
            return Err("missing warn-agent");
        }
        c.ws();
        c.quoted()?;
        if !c.list_sep()? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(HeaderName::classify(b"v"), HeaderName::Via);
        assert_eq!(
            HeaderName::classify(b"MaX-fOrWaRdS"),
            HeaderName::MaxForwards
        );
        assert_eq!(HeaderName::classify(b"L"), HeaderName::ContentLength);
        assert_eq!(HeaderName::classify(b"ms-text-format"), HeaderName::Other);
    }

    #[test]
    fn cseq_strict() {
        assert_eq!(
            parse_cseq("0009 INVITE"),
            Ok(CSeq {
                seq: 9,
                method: "INVITE"
            })
        );
        assert!(parse_cseq("1e3 INVITE").is_err());
        assert!(parse_cseq("1 INVITE x").is_err());
        assert!(parse_cseq("36893488147419103232 REGISTER").is_err());
        assert!(parse_cseq("2147483648 REGISTER").is_err());
    }

    #[test]
    fn via_lists() {
        let v =
            parse_via_list("SIP  /   2.0 /UDP    192.0.2.2;branch=390skdjuw").unwrap_or_default();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].branch(), Some("390skdjuw"));
        assert!(parse_via_list("SIP/2.0/UDP 192.0.2.15;;,;,,").is_err());
        assert!(parse_via_list("SIP/2.0/UDP h;branch=z9hG4bK1;ttl=256").is_err());
        assert!(parse_via_list("SIP/2.0/UDP h;branch=z9hG4bK1;received=host.example").is_err());
        assert!(parse_via_list("SIP/2.0/UDP h;rport;received=[2001:db8::9:255]").is_ok());
        assert!(parse_contact("<sip:a@b>;q=1.5").is_err());
        assert!(parse_contact("<sip:a@b>;q=0.333").is_ok());
        let v = parse_via_first(
            "SIP/2.0/UDP [2001:db8::9:1];received=[2001:db8::9:255];branch=z9hG4bKas3-111",
        );
        assert_eq!(v.map(|v| v.branch()), Ok(Some("z9hG4bKas3-111")));
        let v = parse_via_first("SIP/2.0/UDP [2001:db8::9:1]:6050;branch=x");
        assert_eq!(v.map(|v| v.sent_by()), Ok("[2001:db8::9:1]:6050"));
    }

    #[test]
    fn name_addrs() {
        let n = parse_name_addr(
            "\"J Rosenberg \\\\\\\"\"       <sip:jdrosen@example.com> ; tag = 98asjd8",
        );
        assert_eq!(n.as_ref().map(|n| n.tag()), Ok(Some("98asjd8")));
        assert!(parse_name_addr("\"Mr. J. User <sip:j.user@example.com>").is_err());
        assert!(parse_name_addr("Bell, Alexander <sip:a.g.bell@example.com>;tag=43").is_err());
        assert!(parse_name_addr("\"Watson, Thomas\" < sip:t.watson@example.org >").is_err());
        assert!(parse_name_addr("caller<sip:caller@example.com>;tag=323").is_ok());
        assert!(parse_contact("sip:user@example.com?Route=%3Csip:sip.example.com%3E").is_err());
        assert!(parse_contact("\"Joe\" <sip:joe@example.org>;;;;").is_err());
        assert!(parse_contact("<sip:user@host129.example.com>  ;expires=280297596632815").is_err());
        let n = parse_name_addr("sip:+19725552222@gw1.example.net;unknownparam");
        assert_eq!(n.map(|n| n.params().get("unknownparam")), Ok(Some(None)));
    }

    #[test]
    fn dates() {
        assert!(parse_date("Sat, 15 Oct 2005 04:44:56 GMT").is_ok());
        assert!(parse_date("Fri, 01 Jan 2010 16:00:00 EST").is_err());
    }
}
