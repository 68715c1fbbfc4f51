//! A light, zero-copy view of one framed top-level element.
//!
//! The framer cuts a stanza out of the stream as its exact bytes; this module gives the routing
//! facts (element name and namespace, `to`, `from`, `id`, `type`) as ranges into those bytes,
//! plus the namespace context the stanza inherited from the stream header (RFC 6120 §4.8.3: a
//! stanza's default namespace is declared on the stream header, so bytes cut out of the stream
//! lose it). It never re-parses the payload and never allocates per field. It also holds the
//! stanza-level checks a receiving server applies before routing (RFC 6120 §4.9.3.7, §4.9.3.9,
//! §4.9.3.11, §4.9.3.24).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::error::StreamErrorCondition;
use super::jid::Jid;

/// Stream namespace (RFC 6120 §4.8.1).
pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
/// Content namespaces (RFC 6120 §4.8.3, XEP-0114 §3).
pub const NS_CLIENT: &str = "jabber:client";
pub const NS_SERVER: &str = "jabber:server";
pub const NS_COMPONENT_ACCEPT: &str = "jabber:component:accept";
pub const NS_COMPONENT_CONNECT: &str = "jabber:component:connect";
/// Negotiation namespaces that may appear at the top level of a stream.
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_DIALBACK: &str = "jabber:server:dialback";

/// Namespaces declared on the stream header, shared by every stanza of that stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsContext {
    /// The default (content) namespace, e.g. `jabber:server`.
    pub default_ns: Arc<str>,
    /// Prefixed declarations (`xmlns:stream`, `xmlns:db`, ...), in header order.
    pub prefixed: Vec<(Arc<str>, Arc<str>)>,
}

/// Byte range within the stanza bytes (u32: stanzas are capped well below 4 GiB).
pub(crate) type R32 = (u32, u32);

/// One complete top-level element of a stream (a stanza or a stream-level element such as
/// `<stream:features/>`, `<starttls/>` or `<db:result/>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    pub(crate) bytes: Bytes,
    pub(crate) offset: u64,
    pub(crate) qname: R32,
    pub(crate) local_at: u32,
    pub(crate) ns: Arc<str>,
    pub(crate) ctx: Arc<NsContext>,
    pub(crate) needed: u64,
    pub(crate) root_has_default: bool,
    pub(crate) to: Option<R32>,
    pub(crate) from: Option<R32>,
    pub(crate) id: Option<R32>,
    pub(crate) ty: Option<R32>,
}

impl Stanza {
    /// The exact bytes received, from `<` to the final `>`.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
    /// Position of the stanza in the stream (bytes since the last framer reset).
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.bytes.len() as u64
    }
    fn str_at(&self, r: R32) -> &str {
        self.bytes
            .get(r.0 as usize..r.1 as usize)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }
    /// Qualified name of the root element as written (`message`, `db:result`).
    pub fn qname(&self) -> &str {
        self.str_at(self.qname)
    }
    /// Local name of the root element.
    pub fn name(&self) -> &str {
        self.str_at((self.qname.0 + self.local_at, self.qname.1))
    }
    /// Prefix of the root element, if any.
    pub fn prefix(&self) -> Option<&str> {
        if self.local_at == 0 {
            None
        } else {
            Some(self.str_at((self.qname.0, self.qname.0 + self.local_at - 1)))
        }
    }
    /// Resolved namespace of the root element.
    pub fn namespace(&self) -> &str {
        &self.ns
    }
    /// Default namespace inherited from the stream header (RFC 6120 §4.8.3).
    pub fn default_ns(&self) -> &str {
        &self.ctx.default_ns
    }
    /// Prefixed namespace declarations of the stream header that this stanza uses (for instance
    /// `db` for `<db:result/>`). May list a prefix the stanza also redeclares itself; never
    /// misses one it needs.
    pub fn inherited_prefixes(&self) -> impl Iterator<Item = (&str, &str)> {
        let needed = self.needed;
        self.ctx
            .prefixed
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i < 64 && needed & (1u64 << i) != 0)
            .map(|(_, (p, n))| (&**p, &**n))
    }
    /// Unescaped value of any attribute of the root element (re-reads the start tag; the common
    /// ones have cheaper accessors below).
    pub fn attr(&self, qname: &str) -> Option<String> {
        let text = std::str::from_utf8(&self.bytes).ok()?;
        let mut r = quick_xml::Reader::from_str(text);
        match r.read_event() {
            Ok(quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e)) => {
                e.try_get_attribute(qname).ok().flatten().and_then(|a| {
                    quick_xml::escape::unescape(&a.value)
                        .ok()
                        .map(|v| v.into_owned())
                })
            }
            _ => None,
        }
    }
    /// Raw (still escaped) attribute values of the root element.
    pub fn to_raw(&self) -> Option<&str> {
        self.to.map(|r| self.str_at(r))
    }
    pub fn from_raw(&self) -> Option<&str> {
        self.from.map(|r| self.str_at(r))
    }
    pub fn id_raw(&self) -> Option<&str> {
        self.id.map(|r| self.str_at(r))
    }
    pub fn type_raw(&self) -> Option<&str> {
        self.ty.map(|r| self.str_at(r))
    }
    /// Unescaped attribute values (the framer already refused unknown entities).
    pub fn to(&self) -> Option<Cow<'_, str>> {
        self.to_raw().map(unescape)
    }
    pub fn from(&self) -> Option<Cow<'_, str>> {
        self.from_raw().map(unescape)
    }
    pub fn id(&self) -> Option<Cow<'_, str>> {
        self.id_raw().map(unescape)
    }
    pub fn stanza_type(&self) -> Option<Cow<'_, str>> {
        self.type_raw().map(unescape)
    }

    /// The stanza as a standalone XML element: the inherited default namespace and any header
    /// prefixes it uses are declared on the root, so it can be parsed on its own or written into
    /// a stream with a different header.
    pub fn standalone(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len() + 64);
        let cut = self.qname.1 as usize;
        out.extend_from_slice(self.bytes.get(..cut).unwrap_or(&[]));
        // Declared even on a prefixed root: its unprefixed descendants inherit the default.
        if !self.root_has_default {
            push_decl(&mut out, None, &self.ctx.default_ns);
        }
        for (p, n) in self.inherited_prefixes() {
            push_decl(&mut out, Some(p), n);
        }
        out.extend_from_slice(self.bytes.get(cut..).unwrap_or(&[]));
        out
    }

    /// Stanza-level checks of RFC 6120 before anything is routed:
    /// - a top-level element in the content namespace must be `message`, `presence` or `iq`
    ///   (§4.9.3.24 `unsupported-stanza-type`), also when it names a content namespace other
    ///   than the stream's (the RFC's example is a `jabber:client` `<pubsub/>`); other namespaces (negotiation, dialback) are the
    ///   negotiation machine's business and pass here;
    /// - the `type` attribute must be one RFC 6120 §8.2.3 / RFC 6121 §4.7.1, §5.2.2 define
    ///   (§4.9.3.11 `invalid-xml`, as in the RFC's own example); an `iq` needs `id` and `type`.
    pub fn check_kind(&self) -> Result<StanzaKind, StreamErrorCondition> {
        let content = *self.ns == *self.ctx.default_ns
            || [
                NS_CLIENT,
                NS_SERVER,
                NS_COMPONENT_ACCEPT,
                NS_COMPONENT_CONNECT,
            ]
            .contains(&&*self.ns);
        if !content {
            return Ok(StanzaKind::Other);
        }
        let ty = self.stanza_type();
        let ty = ty.as_deref();
        match self.name() {
            "message" => match ty {
                None | Some("normal" | "chat" | "groupchat" | "headline" | "error") => {
                    Ok(StanzaKind::Message)
                }
                _ => Err(StreamErrorCondition::InvalidXml),
            },
            "presence" => match ty {
                None
                | Some(
                    "unavailable" | "subscribe" | "subscribed" | "unsubscribe" | "unsubscribed"
                    | "probe" | "error",
                ) => Ok(StanzaKind::Presence),
                _ => Err(StreamErrorCondition::InvalidXml),
            },
            "iq" => match ty {
                Some("get" | "set" | "result" | "error") if self.id.is_some() => Ok(StanzaKind::Iq),
                _ => Err(StreamErrorCondition::InvalidXml),
            },
            _ => Err(StreamErrorCondition::UnsupportedStanzaType),
        }
    }

    /// Server-to-server addressing checks (RFC 6120 §4.9.3.7, §4.9.3.9, §8.1.1.1, §8.1.2.1): a
    /// stanza on an s2s stream must carry `to` and `from`; `from` must be a domain the peer has
    /// authenticated on this stream, `to` one we serve. Returns the parsed addresses.
    pub fn check_s2s_addressing(
        &self,
        authenticated: &[String],
        local: &[String],
    ) -> Result<(Jid, Jid), StreamErrorCondition> {
        let (Some(from), Some(to)) = (self.from(), self.to()) else {
            return Err(StreamErrorCondition::ImproperAddressing);
        };
        let from = Jid::parse(&from).map_err(|_| StreamErrorCondition::InvalidFrom)?;
        let to = Jid::parse(&to).map_err(|_| StreamErrorCondition::ImproperAddressing)?;
        if !authenticated.iter().any(|d| from.is_domain(d)) {
            return Err(StreamErrorCondition::InvalidFrom);
        }
        if !local.iter().any(|d| to.is_domain(d)) {
            return Err(StreamErrorCondition::HostUnknown);
        }
        Ok((from, to))
    }
}

/// What [`Stanza::check_kind`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StanzaKind {
    Message,
    Presence,
    Iq,
    /// Not in the content namespace (stream features, TLS/SASL/dialback elements...).
    Other,
}

fn unescape(raw: &str) -> Cow<'_, str> {
    match quick_xml::escape::unescape(raw) {
        Ok(c) => c,
        // Unreachable for framed stanzas (the framer validated every reference).
        Err(_) => Cow::Borrowed(raw),
    }
}

fn push_decl(out: &mut Vec<u8>, prefix: Option<&str>, ns: &str) {
    out.extend_from_slice(b" xmlns");
    if let Some(p) = prefix {
        out.push(b':');
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"='");
    out.extend_from_slice(quick_xml::escape::escape(ns).as_bytes());
    out.push(b'\'');
}

/// One child element of a stanza root, as read by [`children`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Child {
    /// Local name.
    pub name: String,
    /// Resolved namespace ("" when unbound).
    pub ns: String,
    /// Its `type` attribute, if any (used by `<error type=...>`).
    pub attr_type: Option<String>,
    /// Concatenated, unescaped character data directly inside it.
    pub text: String,
    /// Its own children: (local name, namespace, their direct text).
    pub children: Vec<(String, String, String)>,
}

/// Direct children of the stanza root with their text and grandchildren names: enough to read
/// stream features, SASL/TLS elements, stream and stanza errors and dialback keys. Works on
/// [`Stanza::standalone`] so header-inherited namespaces resolve. Negotiation elements are
/// small; on anything unexpected it returns what it read so far.
pub fn children(stanza: &Stanza) -> Vec<Child> {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;
    use quick_xml::NsReader;

    let bytes = stanza.standalone();
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Vec::new();
    };
    let mut r = NsReader::from_str(text);
    let mut out: Vec<Child> = Vec::new();
    let mut depth = 0usize;
    let ns_of = |res: ResolveResult<'_>| match res {
        ResolveResult::Bound(n) => n.as_ref().to_owned(),
        _ => String::new(),
    };
    loop {
        match r.read_resolved_event() {
            Ok((res, Event::Start(e))) => {
                depth += 1;
                let name = e.local_name().as_ref().to_owned();
                if depth == 2 {
                    let attr_type = e
                        .try_get_attribute("type")
                        .ok()
                        .flatten()
                        .map(|a| a.value.into_owned());
                    out.push(Child {
                        name,
                        ns: ns_of(res),
                        attr_type,
                        ..Child::default()
                    });
                } else if depth == 3 {
                    let ns = ns_of(res);
                    if let Some(c) = out.last_mut() {
                        c.children.push((name, ns, String::new()));
                    }
                }
            }
            Ok((res, Event::Empty(e))) => {
                let name = e.local_name().as_ref().to_owned();
                if depth == 1 {
                    let attr_type = e
                        .try_get_attribute("type")
                        .ok()
                        .flatten()
                        .map(|a| a.value.into_owned());
                    out.push(Child {
                        name,
                        ns: ns_of(res),
                        attr_type,
                        ..Child::default()
                    });
                } else if depth == 2 {
                    let ns = ns_of(res);
                    if let Some(c) = out.last_mut() {
                        c.children.push((name, ns, String::new()));
                    }
                }
            }
            Ok((_, Event::End(_))) => depth = depth.saturating_sub(1),
            Ok((_, Event::Text(t))) if depth == 2 => {
                if let Some(c) = out.last_mut() {
                    c.text.push_str(&t);
                }
            }
            Ok((_, Event::Text(t))) if depth == 3 => {
                if let Some(g) = out.last_mut().and_then(|c| c.children.last_mut()) {
                    g.2.push_str(&t);
                }
            }
            // References are resolved at both depths: an error's `<text/>` (depth 3) carries
            // `&amp;` and friends as often as a body does.
            Ok((_, Event::GeneralRef(g))) if depth == 2 => {
                if let (Some(c), Some(ch)) = (out.last_mut(), resolve_ref(&g)) {
                    c.text.push(ch);
                }
            }
            Ok((_, Event::GeneralRef(g))) if depth == 3 => {
                let g_text = out.last_mut().and_then(|c| c.children.last_mut());
                if let (Some(t), Some(ch)) = (g_text, resolve_ref(&g)) {
                    t.2.push(ch);
                }
            }
            Ok((_, Event::CData(t))) if depth == 2 => {
                if let Some(c) = out.last_mut() {
                    c.text.push_str(&t);
                }
            }
            Ok((_, Event::Eof)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // Indentation between elements is not content.
    for c in &mut out {
        c.text = c.text.trim().to_owned();
        for g in &mut c.children {
            g.2 = g.2.trim().to_owned();
        }
    }
    out
}

/// Concatenated, unescaped character data directly inside the stanza root (a dialback key, a
/// SASL payload, a `<handshake>` digest), trimmed.
pub fn root_text(stanza: &Stanza) -> String {
    use quick_xml::events::Event;
    use quick_xml::Reader;
    let Ok(text) = std::str::from_utf8(stanza.bytes()) else {
        return String::new();
    };
    let mut r = Reader::from_str(text);
    let mut depth = 0usize;
    let mut out = String::new();
    loop {
        match r.read_event() {
            Ok(Event::Start(_)) => depth += 1,
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Text(t)) if depth == 1 => out.push_str(&t),
            Ok(Event::CData(t)) if depth == 1 => out.push_str(&t),
            Ok(Event::GeneralRef(g)) if depth == 1 => {
                if let Some(ch) = resolve_ref(&g) {
                    out.push(ch);
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            Ok(_) => {}
        }
    }
    out.trim().to_owned()
}

/// A character or predefined entity reference (XML 1.0 §4.1, §4.6) as the character it stands
/// for; `None` for anything else (the framer already refused other entities).
fn resolve_ref(g: &quick_xml::events::BytesRef<'_>) -> Option<char> {
    if let Ok(Some(ch)) = g.resolve_char_ref() {
        return Some(ch);
    }
    match &**g {
        "lt" => Some('<'),
        "gt" => Some('>'),
        "amp" => Some('&'),
        "apos" => Some('\''),
        "quot" => Some('"'),
        _ => None,
    }
}
