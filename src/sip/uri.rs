//! SIP URI views (RFC 3261 §19.1, §25.1; RFC 5118 for IPv6; RFC 3966 `tel:` kept opaque).
//!
//! A URI is a *view* over the original text: every accessor returns a slice of the bytes the peer
//! sent, so Lync parameters such as `opaque=user:epid:<id>;gruu` or `ms-route-sig=<sig>` are never
//! re-encoded, unescaped or reordered. This module checks the grammar strictly (a federation edge
//! refuses what it cannot route on) but it never rewrites anything; rewriting is the caller's job.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Where a URI appears: a Request-URI may not carry `?headers` (RFC 3261 §19.1.1 table, RFC 4475
/// §3.1.2.11); a bracketed name-addr may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriContext {
    /// The Request-URI of a request line.
    RequestUri,
    /// A URI inside `<...>` of a name-addr (From, To, Contact, Route, ...).
    NameAddr,
    /// A bare addr-spec in a header (RFC 3261 §20: no `,`, `?` or `;` inside).
    AddrSpec,
}

/// A parsed URI; which variant depends on the scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri<'a> {
    /// `sip:` or `sips:`.
    Sip(SipUri<'a>),
    /// `tel:` (RFC 3966), kept opaque: number and raw parameters.
    Tel(TelUri<'a>),
    /// Any other scheme (RFC 3261 absoluteURI). Parsed so a later layer can answer 416.
    Other {
        /// The scheme as sent.
        scheme: &'a str,
        /// Everything after the first `:`.
        opaque: &'a str,
        /// The whole URI text.
        raw: &'a str,
    },
}

impl<'a> Uri<'a> {
    /// The original text of the URI, byte-exact.
    pub fn as_str(&self) -> &'a str {
        match self {
            Uri::Sip(u) => u.raw,
            Uri::Tel(t) => t.raw,
            Uri::Other { raw, .. } => raw,
        }
    }

    /// The scheme as sent (`sip`, `SIPS`, `tel`, `nobodyKnowsThisScheme`, ...).
    pub fn scheme(&self) -> &'a str {
        match self {
            Uri::Sip(u) => u.scheme,
            Uri::Tel(t) => t.scheme,
            Uri::Other { scheme, .. } => scheme,
        }
    }

    /// The SIP URI, if this is one.
    pub fn as_sip(&self) -> Option<&SipUri<'a>> {
        match self {
            Uri::Sip(u) => Some(u),
            _ => None,
        }
    }
}

/// A `sip:`/`sips:` URI (RFC 3261 §19.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri<'a> {
    raw: &'a str,
    scheme: &'a str,
    secure: bool,
    user: Option<&'a str>,
    password: Option<&'a str>,
    host: Host<'a>,
    port: Option<u16>,
    params: &'a str,
    headers: Option<&'a str>,
}

impl<'a> SipUri<'a> {
    /// The whole URI text, byte-exact.
    pub fn as_str(&self) -> &'a str {
        self.raw
    }
    /// `true` for `sips:`.
    pub fn is_secure(&self) -> bool {
        self.secure
    }
    /// The user part, still %-escaped (RFC 3261 §19.1.4 compares unescaped, but we route on the
    /// sent text and never unescape into structure: RFC 4475 §3.1.1.3).
    pub fn user(&self) -> Option<&'a str> {
        self.user
    }
    /// The password part, if any.
    pub fn password(&self) -> Option<&'a str> {
        self.password
    }
    /// The host.
    pub fn host(&self) -> &Host<'a> {
        &self.host
    }
    /// The explicit port, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
    /// `host[:port]` as sent.
    pub fn host_port_str(&self) -> &'a str {
        // The host-port text is the slice from the host start to the params/headers start.
        let h = self.host.as_str();
        let start = offset_in(self.raw, h);
        let end = self.raw.len() - self.params.len() - self.headers.map_or(0, |x| x.len() + 1);
        self.raw.get(start..end).unwrap_or(h)
    }
    /// The raw `;name=value...` parameter text (empty if none), byte-exact.
    pub fn params_str(&self) -> &'a str {
        self.params
    }
    /// Iterates the URI parameters as `(name, value)`, byte-exact.
    pub fn params(&self) -> Params<'a> {
        Params::new(self.params)
    }
    /// A URI parameter by case-insensitive name: `Some(None)` for a flag such as `lr` or `gruu`.
    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        self.params().get(name)
    }
    /// The raw `?headers` part without the `?`, if any.
    pub fn headers(&self) -> Option<&'a str> {
        self.headers
    }
}

/// A `tel:` URI, kept opaque (RFC 3966).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelUri<'a> {
    raw: &'a str,
    scheme: &'a str,
    /// The number as sent (global `+...` or local).
    pub number: &'a str,
    /// Raw `;...` parameter text.
    pub params: &'a str,
}

/// A host: domain name, IPv4 literal or bracketed IPv6 reference (RFC 5118).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host<'a> {
    /// A domain name as sent (not case-folded).
    Domain(&'a str),
    /// An IPv4 literal.
    V4(Ipv4Addr, &'a str),
    /// An IPv6 reference: the address and the bracketed text as sent.
    V6(Ipv6Addr, &'a str),
}

impl<'a> Host<'a> {
    /// The host text as sent (with brackets for IPv6).
    pub fn as_str(&self) -> &'a str {
        match self {
            Host::Domain(s) | Host::V4(_, s) | Host::V6(_, s) => s,
        }
    }
}

/// Byte offset of `part` inside `whole` (both slices of the same string).
fn offset_in(whole: &str, part: &str) -> usize {
    (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize)
}

/// Parameters `;name[=value]` as a lazy iterator over raw text (URI or header parameters).
///
/// The text has already been checked by the parser that produced it; the iterator only splits.
/// Whitespace around `;` and `=` (allowed in header parameters, RFC 3261 §25.1 SEMI/EQUAL) is
/// trimmed from names and values; values keep their quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params<'a> {
    rest: &'a str,
}

impl<'a> Params<'a> {
    pub(crate) fn new(raw: &'a str) -> Self {
        Params { rest: raw }
    }
    /// The raw parameter text, byte-exact.
    pub fn as_str(&self) -> &'a str {
        self.rest
    }
    /// A parameter by case-insensitive name (RFC 3261 §19.1.4, §7.3.1).
    pub fn get(&self, name: &str) -> Option<Option<&'a str>> {
        let mut it = *self;
        it.find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a str, Option<&'a str>);
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let s = self.rest.trim_start_matches([' ', '\t']);
            let s = s.strip_prefix(';')?;
            // A parameter ends at the next ';' outside a quoted string.
            let end = find_unquoted(s.as_bytes(), b';').unwrap_or(s.len());
            let item = s.get(..end).unwrap_or("");
            self.rest = s.get(end..).unwrap_or("");
            let item = item.trim_matches([' ', '\t']);
            if item.is_empty() {
                continue;
            }
            return Some(match split_byte(item, b'=') {
                Some((n, v)) => (
                    n.trim_end_matches([' ', '\t']),
                    Some(v.trim_start_matches([' ', '\t'])),
                ),
                None => (item, None),
            });
        }
    }
}

/// Position of `needle` outside double-quoted strings (with `\` escapes).
pub(crate) fn find_unquoted(b: &[u8], needle: u8) -> Option<usize> {
    let mut in_q = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if in_q {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_q = false;
            }
        } else if c == b'"' {
            in_q = true;
        } else if c == needle {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Character classes of RFC 3261 §25.1 as bit flags in one 256-entry table (the URI checks are
/// on the hot path of every header that carries a URI).
const UNRESERVED: u8 = 1;
const USER: u8 = 2;
const PASSWORD: u8 = 4;
const PARAM: u8 = 8;
const HNV: u8 = 16;

const fn class_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut c = 0usize;
    while c < 256 {
        let b = c as u8;
        // unreserved = alphanum / mark
        let unreserved = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
            );
        let mut f = 0u8;
        if unreserved {
            f = UNRESERVED | USER | PASSWORD | PARAM | HNV;
        }
        // user-unreserved, password extras, param-unreserved, hnv-unreserved
        if matches!(b, b'&' | b'=' | b'+' | b'$' | b',' | b';' | b'?' | b'/') {
            f |= USER;
        }
        if matches!(b, b'&' | b'=' | b'+' | b'$' | b',') {
            f |= PASSWORD;
        }
        if matches!(b, b'[' | b']' | b'/' | b':' | b'&' | b'+' | b'$') {
            f |= PARAM;
        }
        if matches!(b, b'[' | b']' | b'/' | b'?' | b':' | b'+' | b'$') {
            f |= HNV;
        }
        t[c] = f;
        c += 1;
    }
    t
}

static CLASS: [u8; 256] = class_table();

fn has(c: u8, class: u8) -> bool {
    CLASS[usize::from(c)] & class != 0
}
fn is_user_char(c: u8) -> bool {
    has(c, USER)
}
fn is_password_char(c: u8) -> bool {
    has(c, PASSWORD)
}
fn is_param_char(c: u8) -> bool {
    has(c, PARAM)
}
fn is_hnv_char(c: u8) -> bool {
    has(c, HNV)
}

/// Checks that `s` only holds characters allowed by `ok` or `%HEX HEX` escapes.
fn check_escaped(s: &str, ok: fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let h1 = b.get(i + 1).copied().unwrap_or(0);
            let h2 = b.get(i + 2).copied().unwrap_or(0);
            if !(h1.is_ascii_hexdigit() && h2.is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else if ok(c) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// The first `b` (an ASCII delimiter) in `s`: a `char` pattern costs far more per call, and
/// a URI is searched this way a dozen times.
fn find_byte(s: &str, b: u8) -> Option<usize> {
    memchr::memchr(b, s.as_bytes())
}

/// `s` split around its first `b` (an ASCII delimiter, so both sides are `str` boundaries).
fn split_byte(s: &str, b: u8) -> Option<(&str, &str)> {
    let i = find_byte(s, b)?;
    Some((s.get(..i)?, s.get(i + 1..)?))
}

/// Parses a URI; `ctx` decides whether `?headers` are allowed.
pub fn parse_uri(s: &str, ctx: UriContext) -> Result<Uri<'_>, &'static str> {
    let colon = find_byte(s, b':').ok_or("URI without scheme")?;
    let scheme = s.get(..colon).unwrap_or("");
    let rest = s.get(colon + 1..).unwrap_or("");
    // RFC 3261 §25.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    let sb = scheme.as_bytes();
    if sb.is_empty()
        || !sb[0].is_ascii_alphabetic()
        || !sb
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
    {
        return Err("invalid URI scheme");
    }
    if scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips") {
        return parse_sip(s, scheme, rest, ctx).map(Uri::Sip);
    }
    if rest.is_empty() {
        return Err("empty URI after scheme");
    }
    // absoluteURI: no whitespace, controls, or the delimiters that end a URI in a header.
    if rest
        .bytes()
        .any(|c| c <= b' ' || c == 0x7f || matches!(c, b'<' | b'>' | b'"'))
    {
        return Err("invalid character in URI");
    }
    if ctx == UriContext::AddrSpec && rest.bytes().any(|c| matches!(c, b',' | b'?' | b';')) {
        return Err("URI with ',', '?' or ';' must be enclosed in <>");
    }
    if scheme.eq_ignore_ascii_case("tel") {
        let (number, params) = match find_byte(rest, b';') {
            Some(i) => (rest.get(..i).unwrap_or(""), rest.get(i..).unwrap_or("")),
            None => (rest, ""),
        };
        if number.is_empty() {
            return Err("empty tel: number");
        }
        return Ok(Uri::Tel(TelUri {
            raw: s,
            scheme,
            number,
            params,
        }));
    }
    Ok(Uri::Other {
        scheme,
        opaque: rest,
        raw: s,
    })
}

fn parse_sip<'a>(
    raw: &'a str,
    scheme: &'a str,
    rest: &'a str,
    ctx: UriContext,
) -> Result<SipUri<'a>, &'static str> {
    let secure = scheme.len() == 4;
    // userinfo ends at '@'. '@' is not allowed unescaped anywhere else in a SIP URI (RFC 3261
    // §25.1), so the first one is the separator; the user part may contain '?', ';', '/' ...
    // (RFC 4475 §3.1.1.2, §3.1.1.9).
    let (user, password, hostpart) = match find_byte(rest, b'@') {
        Some(at) => {
            let userinfo = rest.get(..at).unwrap_or("");
            let (u, p) = match find_byte(userinfo, b':') {
                Some(c) => (
                    userinfo.get(..c).unwrap_or(""),
                    Some(userinfo.get(c + 1..).unwrap_or("")),
                ),
                None => (userinfo, None),
            };
            if u.is_empty() {
                return Err("empty user part before '@'");
            }
            if !check_escaped(u, is_user_char) {
                return Err("invalid character in URI user part");
            }
            if let Some(p) = p {
                if !check_escaped(p, is_password_char) {
                    return Err("invalid character in URI password");
                }
            }
            (Some(u), p, rest.get(at + 1..).unwrap_or(""))
        }
        None => (None, None, rest),
    };
    let hb = hostpart.as_bytes();
    if hb.first() != Some(&b'[') {
        let end = hb
            .iter()
            .position(|&c| matches!(c, b';' | b'?'))
            .unwrap_or(hb.len());
        if hb
            .get(..end)
            .is_some_and(|h| h.iter().filter(|&&c| c == b':').count() > 1)
        {
            // RFC 5118 §4.2: an IPv6 address must be bracketed in a SIP URI.
            return Err("IPv6 address in URI must be enclosed in []");
        }
    }
    // host
    let host_end;
    let host = if hb.first() == Some(&b'[') {
        let close = find_byte(hostpart, b']').ok_or("unterminated IPv6 reference")?;
        let text = hostpart.get(..=close).unwrap_or("");
        host_end = close + 1;
        Host::V6(parse_ipv6_ref(text)?, text)
    } else {
        let end = hb
            .iter()
            .position(|&c| matches!(c, b':' | b';' | b'?'))
            .unwrap_or(hb.len());
        host_end = end;
        parse_host_name(hostpart.get(..end).unwrap_or(""))?
    };
    let mut i = host_end;
    let mut port = None;
    if hb.get(i) == Some(&b':') {
        let start = i + 1;
        let mut end = start;
        while end < hb.len() && hb[end].is_ascii_digit() {
            end += 1;
        }
        let digits = hostpart.get(start..end).unwrap_or("");
        if digits.is_empty() {
            return Err("invalid port in URI");
        }
        port = Some(digits.parse::<u16>().map_err(|_| "URI port out of range")?);
        i = end;
    }
    let tail = hostpart.get(i..).unwrap_or("");
    let (params, headers) = match find_byte(tail, b'?') {
        Some(q) => (
            tail.get(..q).unwrap_or(""),
            Some(tail.get(q + 1..).unwrap_or("")),
        ),
        None => (tail, None),
    };
    if !params.is_empty() && !params.starts_with(';') {
        return Err("invalid character after URI host");
    }
    // uri-parameters = *( ";" uri-parameter ); pname/pvalue = 1*paramchar.
    for p in params.split(';').skip(1) {
        let (n, v) = match split_byte(p, b'=') {
            Some((n, v)) => (n, Some(v)),
            None => (p, None),
        };
        if n.is_empty() || !check_escaped(n, is_param_char) {
            return Err("invalid URI parameter name");
        }
        if let Some(v) = v {
            if v.is_empty() || !check_escaped(v, is_param_char) {
                return Err("invalid URI parameter value");
            }
        }
    }
    if let Some(h) = headers {
        match ctx {
            UriContext::RequestUri => return Err("headers ('?') not allowed in Request-URI"),
            UriContext::AddrSpec => {
                return Err("URI with '?' must be enclosed in <>");
            }
            UriContext::NameAddr => {}
        }
        for kv in h.split('&') {
            let (n, v) = split_byte(kv, b'=').ok_or("URI header without '='")?;
            if n.is_empty() || !check_escaped(n, is_hnv_char) || !check_escaped(v, is_hnv_char) {
                return Err("invalid URI header");
            }
        }
    }
    if ctx == UriContext::AddrSpec && !params.is_empty() {
        // Bare addr-spec: a ';' belongs to the header, not the URI (RFC 3261 §20); the caller
        // splits before us, so reaching here is a caller bug; refuse rather than guess.
        return Err("URI with ';' must be enclosed in <>");
    }
    Ok(SipUri {
        raw,
        scheme,
        secure,
        user,
        password,
        host,
        port,
        params,
        headers,
    })
}

/// Parses a bracketed IPv6 reference. RFC 5118 §4.10: tolerate the three-colon form the RFC 3261
/// ABNF allowed (`2001:db8:::192.0.2.1`), read as `::`.
pub(crate) fn parse_ipv6_ref(text: &str) -> Result<Ipv6Addr, &'static str> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or("invalid IPv6 reference")?;
    if inner.is_empty()
        || !inner
            .bytes()
            .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
    {
        return Err("invalid IPv6 reference");
    }
    if let Ok(a) = inner.parse::<Ipv6Addr>() {
        return Ok(a);
    }
    if inner.contains(":::") && !inner.contains("::::") {
        if let Ok(a) = inner.replacen(":::", "::", 1).parse::<Ipv6Addr>() {
            return Ok(a);
        }
    }
    Err("invalid IPv6 address")
}

/// RFC 3261 §25.1 hostname or IPv4address.
pub(crate) fn parse_host_name(h: &str) -> Result<Host<'_>, &'static str> {
    if h.is_empty() {
        return Err("empty host");
    }
    let b = h.as_bytes();
    if b.iter().all(|&c| c.is_ascii_digit() || c == b'.') {
        return h
            .parse::<Ipv4Addr>()
            .map(|a| Host::V4(a, h))
            .map_err(|_| "invalid IPv4 address");
    }
    // hostname = *( domainlabel "." ) toplabel [ "." ]
    let name = h.strip_suffix('.').unwrap_or(h);
    for label in name.split('.') {
        let lb = label.as_bytes();
        let (Some(&first), Some(&last)) = (lb.first(), lb.last()) else {
            return Err("empty label in host name");
        };
        if !first.is_ascii_alphanumeric()
            || !last.is_ascii_alphanumeric()
            || !lb.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return Err("invalid character in host name");
        }
    }
    Ok(Host::Domain(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lync_gruu_is_byte_exact() {
        let s = "sip:alice@contoso.com;opaque=user:epid:AbCdEf01gHiJkLmNo_pqRsAA;gruu";
        let Ok(Uri::Sip(u)) = parse_uri(s, UriContext::RequestUri) else {
            panic!("gruu must parse")
        };
        assert_eq!(u.as_str(), s);
        assert_eq!(u.user(), Some("alice"));
        assert_eq!(u.host().as_str(), "contoso.com");
        assert_eq!(
            u.param("opaque"),
            Some(Some("user:epid:AbCdEf01gHiJkLmNo_pqRsAA"))
        );
        assert_eq!(u.param("gruu"), Some(None));
        assert_eq!(u.host_port_str(), "contoso.com");
    }

    #[test]
    fn ipv6_and_ports() {
        let Ok(Uri::Sip(u)) = parse_uri("sip:[2001:db8::10]:5070", UriContext::RequestUri) else {
            panic!()
        };
        assert_eq!(u.port(), Some(5070));
        assert_eq!(u.host_port_str(), "[2001:db8::10]:5070");
        let Ok(Uri::Sip(u)) = parse_uri("sip:[2001:db8::10:5070]", UriContext::RequestUri) else {
            panic!()
        };
        assert_eq!(u.port(), None);
        assert!(parse_uri("sip:2001:db8::10", UriContext::RequestUri).is_err());
        assert!(parse_uri("sip:user@[2001:db8:::192.0.2.1]", UriContext::RequestUri).is_ok());
        assert!(parse_uri("sip:a@b:99999", UriContext::RequestUri).is_err());
    }

    #[test]
    fn request_uri_refuses_headers_and_brackets() {
        assert!(parse_uri("sip:a@b?Route=x", UriContext::RequestUri).is_err());
        assert!(parse_uri("sip:a@b?Route=x", UriContext::NameAddr).is_ok());
        assert!(parse_uri("<sip:a@b>", UriContext::RequestUri).is_err());
        assert!(matches!(
            parse_uri(
                "nobodyKnowsThisScheme:totallyopaquecontent",
                UriContext::RequestUri
            ),
            Ok(Uri::Other { .. })
        ));
        assert!(matches!(
            parse_uri("tel:+1-201-555-0123;phone-context=x", UriContext::NameAddr),
            Ok(Uri::Tel(_))
        ));
    }
}
