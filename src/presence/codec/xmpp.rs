//! XMPP `<presence/>` stanza codec (RFC 6121 §4.7): one stanza's bytes ⇄ [`XmppPresence`] plus
//! the routing attributes. It reads a stanza already cut out of a stream by the framer (default
//! namespace `jabber:client`, `jabber:server`, or none declared because it is inherited from the
//! stream header) and writes one that inherits the stream's default namespace. It does not check
//! JIDs, does not know which stream the stanza came from and does not decide what a `<show/>`
//! means.
//!
//! Presence `type` (RFC 6121 §4.7.1) splits stanzas in two families: broadcasts (`type` absent
//! or `unavailable`), which carry an [`XmppPresence`], and subscription management / probe /
//! error, which carry nothing we translate. [`decode_presence`] and [`decode_presence_full`]
//! accept broadcasts only and answer [`CodecError::Invalid`] for the rest;
//! [`decode_presence_kind`] returns a [`PresenceKind`] for every legal `type`, so the router can
//! turn `subscribe`/`probe` into SIP SUBSCRIBEs (RFC 8048 §5).

use super::xml::{self, Dialect, Node, Ns, XmlIn};
use super::CodecError;
use crate::presence::wire::{Show, XmppPresence};

/// The stanza attributes later code routes on, as raw (unverified) strings: JIDs are checked by
/// the router, not here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PresenceAttrs {
    pub from: Option<String>,
    pub to: Option<String>,
    pub id: Option<String>,
    /// The raw `type` attribute as received. Ignored by the encoders: the type written is the
    /// one the value says (`XmppPresence::unavailable`, or the [`PresenceKind`]).
    pub type_: Option<String>,
}

/// What a `<presence/>` stanza is, by its `type` attribute (RFC 6121 §4.7.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceKind {
    /// `type` absent or `unavailable`: availability broadcast (RFC 6121 §4.2–4.5).
    Broadcast(XmppPresence),
    /// `subscribe` (RFC 6121 §3.1).
    Subscribe,
    /// `subscribed` (RFC 6121 §3.1.5).
    Subscribed,
    /// `unsubscribe` (RFC 6121 §3.3).
    Unsubscribe,
    /// `unsubscribed` (RFC 6121 §3.2).
    Unsubscribed,
    /// `probe` (RFC 6121 §4.3).
    Probe,
    /// `error` (RFC 6120 §8.3); the error condition is not decoded here.
    Error,
}

impl PresenceKind {
    /// The `type` attribute value this kind is written with (`None` for an available broadcast).
    pub fn type_str(&self) -> Option<&'static str> {
        match self {
            PresenceKind::Broadcast(p) if p.unavailable => Some("unavailable"),
            PresenceKind::Broadcast(_) => None,
            PresenceKind::Subscribe => Some("subscribe"),
            PresenceKind::Subscribed => Some("subscribed"),
            PresenceKind::Unsubscribe => Some("unsubscribe"),
            PresenceKind::Unsubscribed => Some("unsubscribed"),
            PresenceKind::Probe => Some("probe"),
            PresenceKind::Error => Some("error"),
        }
    }
}

/// Decodes one availability broadcast. Any other `type` is [`CodecError::Invalid`].
pub fn decode_presence(xml: &[u8]) -> Result<XmppPresence, CodecError> {
    decode_presence_full(xml).map(|(p, _)| p)
}

/// Decodes one availability broadcast with its routing attributes. Any other `type` is
/// [`CodecError::Invalid`]; use [`decode_presence_kind`] to route those.
pub fn decode_presence_full(xml: &[u8]) -> Result<(XmppPresence, PresenceAttrs), CodecError> {
    match decode_presence_kind(xml)? {
        (PresenceKind::Broadcast(p), attrs) => Ok((p, attrs)),
        (kind, _) => Err(CodecError::Invalid(format!(
            "presence type '{}' is not an availability broadcast",
            kind.type_str().unwrap_or("")
        ))),
    }
}

/// Decodes any legal `<presence/>` stanza.
///
/// Rules (RFC 6121 §4.7): the root is `presence` in `jabber:client`, `jabber:server` or no
/// namespace; `<show/>`, `<status/>` and `<priority/>` count only in the root's namespace (others
/// are extensions and are skipped); an unknown `type`, an unknown or repeated `<show/>`, a
/// repeated `<priority/>` or one outside -128..=127 is [`CodecError::Invalid`]; of several
/// `<status/>` the first without `xml:lang` wins, else the first. Status text is kept exactly
/// (no trimming: whitespace is the sender's). For non-broadcast kinds the children are still
/// vetted but not returned.
pub fn decode_presence_kind(xml: &[u8]) -> Result<(PresenceKind, PresenceAttrs), CodecError> {
    xml::decode_with(xml, Dialect::Stanza, kind_from)
}

fn kind_from(r: &mut XmlIn<'_>) -> Result<(PresenceKind, PresenceAttrs), CodecError> {
    let (root_ns, root) = r.root()?;
    if xml::local(&root) != "presence"
        || !matches!(root_ns, Ns::Unbound | Ns::JabberClient | Ns::JabberServer)
    {
        return Err(CodecError::Invalid(
            "root is not a jabber:client/jabber:server <presence/>".into(),
        ));
    }
    let attrs = PresenceAttrs {
        from: r.attr(&root, "from")?.map(Into::into),
        to: r.attr(&root, "to")?.map(Into::into),
        id: r.attr(&root, "id")?.map(Into::into),
        type_: r.attr(&root, "type")?.map(Into::into),
    };
    let mut presence = XmppPresence::default();
    let kind = match attrs.type_.as_deref() {
        None => None,
        Some("unavailable") => {
            presence.unavailable = true;
            None
        }
        Some("subscribe") => Some(PresenceKind::Subscribe),
        Some("subscribed") => Some(PresenceKind::Subscribed),
        Some("unsubscribe") => Some(PresenceKind::Unsubscribe),
        Some("unsubscribed") => Some(PresenceKind::Unsubscribed),
        Some("probe") => Some(PresenceKind::Probe),
        Some("error") => Some(PresenceKind::Error),
        // RFC 6121 §4.7.1: any other value is a <bad-request/>.
        Some(_) => return Err(CodecError::Invalid("unknown presence type".into())),
    };

    let mut text = String::new();
    let mut status_has_lang = true;
    let mut seen_show = false;
    loop {
        match r.next()? {
            Node::Start { ns, elem } if ns == root_ns => match xml::local(&elem) {
                "show" => {
                    // RFC 6121 §4.7.2.1: at most one <show/>, one of four values.
                    if std::mem::replace(&mut seen_show, true) {
                        return Err(CodecError::Invalid("more than one <show/>".into()));
                    }
                    text.clear();
                    r.read_text(&mut text)?;
                    let show = Show::parse(text.trim())
                        .ok_or_else(|| CodecError::Invalid("unknown <show/> value".into()))?;
                    presence.show = Some(show);
                }
                "status" => {
                    // RFC 6121 §4.7.2.2: several <status/> may differ by xml:lang; prefer the
                    // one without (the stanza's own language), else the first.
                    let lang = xml::has_xml_lang(&elem);
                    text.clear();
                    r.read_text(&mut text)?;
                    if presence.status.is_none() || (status_has_lang && !lang) {
                        presence.status = Some(std::mem::take(&mut text));
                        status_has_lang = lang;
                    }
                }
                "priority" => {
                    // RFC 6121 §4.7.2.3: at most one, an xs:byte.
                    if presence.priority.is_some() {
                        return Err(CodecError::Invalid("more than one <priority/>".into()));
                    }
                    text.clear();
                    r.read_text(&mut text)?;
                    let priority = text.trim().parse::<i8>().map_err(|_| {
                        CodecError::Invalid("<priority/> is not an integer in -128..=127".into())
                    })?;
                    presence.priority = Some(priority);
                }
                _ => r.skip()?,
            },
            Node::Start { .. } => r.skip()?,
            Node::End => break,
            Node::Text(_) | Node::Char(_) => {}
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        }
    }
    r.finish()?;
    Ok((kind.unwrap_or(PresenceKind::Broadcast(presence)), attrs))
}

/// Writes `p` as one `<presence/>` stanza with `from`/`to`/`id` from `attrs` (`attrs.type_` is
/// ignored: `p.unavailable` decides). No `xmlns` is written: the stanza inherits the stream's
/// default namespace (`jabber:client` or `jabber:server`, RFC 6120 §4.8.3). Children are written
/// in the order show, status, priority; text and attributes are escaped with all five
/// predefined entities.
pub fn encode_presence(p: &XmppPresence, attrs: &PresenceAttrs, out: &mut Vec<u8>) {
    write_open(
        out,
        attrs,
        if p.unavailable {
            Some("unavailable")
        } else {
            None
        },
    );
    if p.show.is_none() && p.status.is_none() && p.priority.is_none() {
        out.extend_from_slice(b"/>");
        return;
    }
    out.push(b'>');
    if let Some(show) = p.show {
        out.extend_from_slice(b"<show>");
        out.extend_from_slice(show.as_str().as_bytes());
        out.extend_from_slice(b"</show>");
    }
    if let Some(status) = &p.status {
        out.extend_from_slice(b"<status>");
        write_text(out, status);
        out.extend_from_slice(b"</status>");
    }
    if let Some(priority) = p.priority {
        out.extend_from_slice(b"<priority>");
        xml::push_int(out, i64::from(priority));
        out.extend_from_slice(b"</priority>");
    }
    out.extend_from_slice(b"</presence>");
}

/// Writes `s` as character data of an XMPP stanza. This is the one escaper for text Legate
/// writes into stanzas (presence status here, message bodies, threads and error text in
/// `xmpp::convert`): besides the five predefined entities and CR as `&#13;`, every character
/// XML 1.0 §2.2 does not allow as `Char` (C0 controls, U+FFFE, U+FFFF) becomes U+FFFD. Text from
/// a SIP peer may hold any of them, and one of them on a component or s2s stream makes the
/// receiver close the whole stream with `<not-well-formed/>` (RFC 6120 §4.9.3.13), dropping
/// every other user's traffic on that link.
pub fn write_text(out: &mut Vec<u8>, s: &str) {
    xml::push_text(out, s);
}

/// Writes `s` as an attribute value (either quote style) of an XMPP stanza: as [`write_text`],
/// plus TAB, LF and CR as character references so attribute-value normalisation (XML 1.0
/// §3.3.3) gives them back unchanged.
pub fn write_attr(out: &mut Vec<u8>, s: &str) {
    xml::push_attr(out, s);
}

/// Writes any [`PresenceKind`]; non-broadcast kinds are an empty `<presence type='..'/>`.
pub fn encode_presence_kind(kind: &PresenceKind, attrs: &PresenceAttrs, out: &mut Vec<u8>) {
    match kind {
        PresenceKind::Broadcast(p) => encode_presence(p, attrs, out),
        other => {
            write_open(out, attrs, other.type_str());
            out.extend_from_slice(b"/>");
        }
    }
}

fn write_open(out: &mut Vec<u8>, attrs: &PresenceAttrs, type_: Option<&str>) {
    out.extend_from_slice(b"<presence");
    for (name, value) in [
        ("from", attrs.from.as_deref()),
        ("to", attrs.to.as_deref()),
        ("id", attrs.id.as_deref()),
        ("type", type_),
    ] {
        if let Some(value) = value {
            out.push(b' ');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"=\"");
            write_attr(out, value);
            out.push(b'"');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(p: &XmppPresence, attrs: &PresenceAttrs) -> String {
        let mut out = Vec::new();
        encode_presence(p, attrs, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn decodes_a_full_broadcast() {
        let xml = br#"<presence xmlns="jabber:client" from="a@x/r" to="b@y" id="p1" xml:lang="en">
            <show>dnd</show>
            <status xml:lang="fr">Occup&#xE9;</status>
            <status>Busy &amp; away</status>
            <priority> -5 </priority>
            <c xmlns="http://jabber.org/protocol/caps" hash="sha-1" node="n" ver="v"/>
        </presence>"#;
        let (p, a) = decode_presence_full(xml).expect("valid");
        assert_eq!(
            p,
            XmppPresence {
                unavailable: false,
                show: Some(Show::Dnd),
                status: Some("Busy & away".into()),
                priority: Some(-5),
            }
        );
        assert_eq!(a.from.as_deref(), Some("a@x/r"));
        assert_eq!(a.to.as_deref(), Some("b@y"));
        assert_eq!(a.id.as_deref(), Some("p1"));
        assert_eq!(a.type_, None);
    }

    #[test]
    fn empty_xml_lang_counts_as_no_language() {
        let p = decode_presence(
            b"<presence><status xml:lang='en'>a</status><status xml:lang=''>b</status></presence>",
        );
        assert_eq!(p.map(|p| p.status), Ok(Some("b".into())));
    }

    #[test]
    fn status_with_lang_only_is_kept() {
        let p = decode_presence(b"<presence><status xml:lang='de'>a</status><status xml:lang='en'>b</status></presence>");
        assert_eq!(p.map(|p| p.status), Ok(Some("a".into())));
    }

    #[test]
    fn namespaces() {
        for xml in [
            &b"<presence xmlns='jabber:server' type='unavailable'/>"[..],
            b"<presence type='unavailable'/>",
            b"<c:presence xmlns:c='jabber:client' type='unavailable'/>",
        ] {
            assert_eq!(
                decode_presence(xml).map(|p| p.unavailable),
                Ok(true),
                "{}",
                String::from_utf8_lossy(xml)
            );
        }
        // <show/> in another namespace is an extension, not the presence's show.
        assert_eq!(
            decode_presence(b"<presence><show xmlns='urn:x'>chat</show></presence>")
                .map(|p| p.show),
            Ok(None)
        );
        for xml in [
            &b"<message/>"[..],
            b"<presence xmlns='urn:ietf:params:xml:ns:pidf'/>",
        ] {
            assert!(matches!(decode_presence(xml), Err(CodecError::Invalid(_))));
        }
    }

    #[test]
    fn invalid_children() {
        for xml in [
            &b"<presence><priority>128</priority></presence>"[..],
            b"<presence><priority>-129</priority></presence>",
            b"<presence><priority>1.5</priority></presence>",
            b"<presence><priority></priority></presence>",
            b"<presence><priority>1</priority><priority>2</priority></presence>",
            b"<presence><show>busy</show></presence>",
            b"<presence><show>away</show><show>xa</show></presence>",
            b"<presence type='bogus'/>",
        ] {
            assert!(
                matches!(decode_presence(xml), Err(CodecError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(xml)
            );
        }
        assert_eq!(
            decode_presence(b"<presence><priority>127</priority></presence>").map(|p| p.priority),
            Ok(Some(127))
        );
        assert_eq!(
            decode_presence(b"<presence><priority>-128</priority></presence>").map(|p| p.priority),
            Ok(Some(-128))
        );
    }

    #[test]
    fn kinds() {
        let (k, a) = decode_presence_kind(b"<presence from='j@e' to='r@n' type='subscribe'/>")
            .expect("valid");
        assert_eq!(k, PresenceKind::Subscribe);
        assert_eq!(a.type_.as_deref(), Some("subscribe"));
        assert!(matches!(
            decode_presence(b"<presence type='probe'/>"),
            Err(CodecError::Invalid(_))
        ));
        for kind in [
            PresenceKind::Subscribe,
            PresenceKind::Subscribed,
            PresenceKind::Unsubscribe,
            PresenceKind::Unsubscribed,
            PresenceKind::Probe,
            PresenceKind::Error,
        ] {
            let mut out = Vec::new();
            encode_presence_kind(&kind, &PresenceAttrs::default(), &mut out);
            assert_eq!(decode_presence_kind(&out).map(|(k, _)| k), Ok(kind));
        }
    }

    #[test]
    fn encodes_canonically() {
        let attrs = PresenceAttrs {
            from: Some("a@x/\"r'".into()),
            to: None,
            id: Some("i<1>".into()),
            type_: Some("probe".into()),
        };
        let p = XmppPresence {
            unavailable: true,
            show: Some(Show::Xa),
            status: Some("<&\"'>".into()),
            priority: Some(-1),
        };
        assert_eq!(
            enc(&p, &attrs),
            "<presence from=\"a@x/&quot;r&apos;\" id=\"i&lt;1&gt;\" type=\"unavailable\">\
             <show>xa</show><status>&lt;&amp;&quot;&apos;&gt;</status>\
             <priority>-1</priority></presence>"
        );
        assert_eq!(
            enc(&XmppPresence::default(), &PresenceAttrs::default()),
            "<presence/>"
        );
    }

    #[test]
    fn round_trip() {
        let attrs = PresenceAttrs {
            from: Some("a@x\t/ r\n".into()),
            to: Some("b@y".into()),
            id: Some("1".into()),
            type_: None,
        };
        for p in [
            XmppPresence::default(),
            XmppPresence {
                unavailable: false,
                show: Some(Show::Chat),
                status: Some(" \r\n  ünïcödé 😀 <&\"'> ]]> \t".into()),
                priority: Some(i8::MIN),
            },
            XmppPresence {
                unavailable: true,
                show: None,
                status: Some(String::new()),
                priority: Some(i8::MAX),
            },
        ] {
            let mut out = Vec::new();
            encode_presence(&p, &attrs, &mut out);
            let (p2, a2) = decode_presence_full(&out).expect("own output decodes");
            assert_eq!(p2, p);
            assert_eq!(a2.from, attrs.from);
            assert_eq!(a2.to, attrs.to);
            assert_eq!(a2.id, attrs.id);
        }
    }

    #[test]
    fn comments_are_restricted_in_stanzas() {
        assert_eq!(
            decode_presence(b"<presence><!-- hi --></presence>"),
            Err(CodecError::Restricted("comment"))
        );
    }
}
