//! XMPP stanzas ⇄ the core's `Envelope`s, for the component links and s2s streams.
//!
//! Presence broadcasts become `Body::Presence` in the sender's mapping system (so the core can
//! translate them); subscription management becomes `Body::Subscription`; stanza errors become
//! `Body::Error` when their condition is one the core knows; every other message or iq is
//! relayed as its exact bytes (`Body::Xmpp`), so XMPP-to-XMPP traffic keeps its extensions.
//! What presence extensions a broadcast carried (entity caps, avatars) is not translated: a
//! presence crossing systems is rebuilt from its state and status text.

use crate::gateway::envelope::{
    Address, Body, Envelope, ErrorCondition, ErrorOf, MessageBody, MessageKind, PresenceBody,
    StanzaFacts, Subscription, XmppRaw,
};
use crate::presence::codec::xmpp::{
    decode_presence_kind, encode_presence, encode_presence_kind, write_attr, write_text,
    PresenceAttrs, PresenceKind,
};
use crate::presence::codec::CodecError;
use crate::presence::map::{Facts, MappingSet};
use crate::xmpp::error::{parse_stanza_error, StanzaErrorCondition};
use crate::xmpp::stanza::{children, Stanza};
use std::sync::Arc;

/// Why a received stanza cannot become an envelope; each maps to a stanza error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("stanza has no usable `{0}` address")]
    Address(&'static str),
    #[error("presence stanza is invalid: {0}")]
    Presence(#[from] CodecError),
    #[error("unknown mapping system `{0}` for this link")]
    System(String),
    #[error("`{0}` stanzas are not routed")]
    Unsupported(String),
}

impl ConvertError {
    pub fn condition(&self) -> StanzaErrorCondition {
        match self {
            ConvertError::Address(_) => StanzaErrorCondition::JidMalformed,
            ConvertError::Presence(_) => StanzaErrorCondition::BadRequest,
            ConvertError::System(_) => StanzaErrorCondition::InternalServerError,
            ConvertError::Unsupported(_) => StanzaErrorCondition::FeatureNotImplemented,
        }
    }
}

fn address(stanza: &Stanza, which: &'static str) -> Result<Address, ConvertError> {
    let raw = match which {
        "from" => stanza.from(),
        _ => stanza.to(),
    };
    raw.and_then(|s| Address::parse(&s).ok())
        .ok_or(ConvertError::Address(which))
}

/// Reads a stanza received from a link whose presence is expressed in mapping system `system`.
pub fn stanza_to_envelope(
    stanza: &Stanza,
    system: &str,
    maps: &MappingSet,
) -> Result<Envelope, ConvertError> {
    let from = address(stanza, "from")?;
    let to = address(stanza, "to")?;
    let name = stanza.name();
    // The framer already decoded the root's attributes: they travel with the bytes, so no later
    // stage parses the start tag again.
    let raw = |name: &'static str| {
        Body::Xmpp(XmppRaw::with_facts(
            name,
            stanza.bytes().clone(),
            StanzaFacts {
                id: stanza.id().map(|s| s.into_owned()),
                type_: stanza.stanza_type().map(|s| s.into_owned()),
            },
        ))
    };
    let body = match name {
        // Group chat (XEP-0045): joins, leaves and occupant presence carry the room protocol
        // in `<x/>` and mean nothing as an availability to translate; both ends are XMPP.
        "presence" if is_muc_presence(stanza) => raw("presence"),
        "presence" => {
            let (kind, _) = decode_presence_kind(stanza.bytes())?;
            match kind {
                PresenceKind::Broadcast(p) => {
                    let sys = maps
                        .system_id(system)
                        .ok_or_else(|| ConvertError::System(system.to_string()))?;
                    let d = maps.decode(sys, &Facts::from_xmpp(&p));
                    Body::Presence(PresenceBody {
                        system: Arc::from(system),
                        state: maps.system(sys).state(d.state).name.clone(),
                        note: d.note.map(str::to_string),
                        priority: p.priority,
                    })
                }
                PresenceKind::Subscribe => Body::Subscription(Subscription::Subscribe),
                PresenceKind::Subscribed => Body::Subscription(Subscription::Subscribed),
                PresenceKind::Unsubscribe => Body::Subscription(Subscription::Unsubscribe),
                PresenceKind::Unsubscribed => Body::Subscription(Subscription::Unsubscribed),
                PresenceKind::Probe => Body::Subscription(Subscription::Probe),
                PresenceKind::Error => {
                    error_body(stanza, ErrorOf::Presence).unwrap_or_else(|| raw("presence"))
                }
            }
        }
        "message" if stanza.stanza_type().as_deref() == Some("error") => {
            error_body(stanza, ErrorOf::Message).unwrap_or_else(|| raw("message"))
        }
        "message" => raw("message"),
        "iq" => raw("iq"),
        other => return Err(ConvertError::Unsupported(other.chars().take(64).collect())),
    };
    // A presence or subscription body has no room for the stanza's id: it travels beside it.
    let stanza_id = match body {
        Body::Presence(_) | Body::Subscription(_) => stanza.id().map(|i| i.into()),
        _ => None,
    };
    Ok(Envelope {
        from,
        to,
        body,
        stanza_id,
        via_cluster: None,
    })
}

/// The XEP-0045 namespaces (`…/muc` on a join, `…/muc#user` from a room) and their prefix.
const MUC_NS: &str = "http://jabber.org/protocol/muc";

/// Whether a presence stanza is group-chat presence: a child element in a MUC namespace. The
/// byte search keeps the full parse off the path of ordinary presence.
fn is_muc_presence(stanza: &Stanza) -> bool {
    memchr::memmem::find(stanza.bytes(), MUC_NS.as_bytes()).is_some()
        && children(stanza)
            .iter()
            .any(|c| c.ns == MUC_NS || c.ns.starts_with("http://jabber.org/protocol/muc#"))
}

fn error_body(stanza: &Stanza, kind: ErrorOf) -> Option<Body> {
    let (_, cond) = parse_stanza_error(stanza)?;
    // A condition we cannot name is still an error (RFC 6120 §8.3.2 requires one; a peer that
    // sends an unknown one gets the generic condition rather than a relayed blob).
    let condition = cond.unwrap_or(ErrorCondition::UndefinedCondition);
    let text = children(stanza)
        .into_iter()
        .find(|c| c.name == "error")
        .and_then(|e| {
            e.children
                .into_iter()
                .find(|(n, _, _)| n == "text")
                .map(|(_, _, t)| t)
        })
        .unwrap_or_default();
    Some(Body::Error {
        id: stanza.id().map(|s| s.into_owned()),
        condition,
        text,
        kind,
    })
}

/// The text of a `<message/>` relayed as bytes, for a destination that only carries text (SIP).
/// `None` when it has no `<body/>` (chat states, receipts: nothing to show).
pub fn message_text(raw: &XmppRaw) -> Option<MessageBody> {
    let mut framer = crate::xmpp::stream::StreamFramer::new(crate::xmpp::stream::Limits::default());
    framer.push(
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>",
    );
    framer.push(&raw.bytes);
    let mut stanza = None;
    while let Ok(Some(ev)) = framer.next_event() {
        if let crate::xmpp::stream::StreamEvent::Stanza(s) = ev {
            stanza = Some(s);
            break;
        }
    }
    let stanza = stanza?;
    let kind = MessageKind::from_xmpp(stanza.stanza_type().as_deref())?;
    let kids = children(&stanza);
    let child = |name: &str| kids.iter().find(|c| c.name == name).map(|c| c.text.clone());
    Some(MessageBody {
        id: stanza.id().map(|s| s.into_owned()),
        text: child("body")?,
        thread: child("thread"),
        kind,
        subject: child("subject"),
        lang: stanza.attr("xml:lang").filter(|l| !l.is_empty()),
    })
}

/// Writes ` name='value'` through the one stanza escaper (see [`write_text`]).
fn attr(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(b' ');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"='");
    write_attr(out, value);
    out.push(b'\'');
}

/// `<name>text</name>` with `text` through the one stanza escaper.
fn text_element(out: &mut Vec<u8>, name: &str, text: &str) {
    out.push(b'<');
    out.extend_from_slice(name.as_bytes());
    out.push(b'>');
    write_text(out, text);
    out.extend_from_slice(b"</");
    out.extend_from_slice(name.as_bytes());
    out.push(b'>');
}

/// Appends a relayed stanza's bytes. Our framer refuses every non-`Char` (XML 1.0 §2.2), the
/// non-characters U+FFFE and U+FFFF included, but relayed bytes are written to another stream
/// where one of them makes expat-based home nodes (Prosody) close it (RFC 6120 §4.9.3.13): so,
/// whatever produced the bytes, they become U+FFFD in place. In UTF-8 they are
/// `EF BF BE`/`EF BF BF`, U+FFFD is `EF BF BD`: one byte changes and nothing else moves.
fn push_relayed(out: &mut Vec<u8>, raw: &[u8]) {
    let start = out.len();
    out.extend_from_slice(raw);
    for at in memchr::memmem::find_iter(raw, b"\xEF\xBF") {
        if matches!(raw.get(at + 2), Some(0xBE | 0xBF)) {
            if let Some(b) = out.get_mut(start + at + 2) {
                *b = 0xBD;
            }
        }
    }
}

/// Writes `env` as a stanza for a link whose presence is expressed in mapping system `system`
/// (presence bodies arrive already translated into it by the router).
pub fn envelope_to_stanza(
    env: &Envelope,
    maps: &MappingSet,
    out: &mut Vec<u8>,
) -> Result<(), ConvertError> {
    let attrs = || PresenceAttrs {
        from: Some(env.from.to_string()),
        to: Some(env.to.to_string()),
        id: env.stanza_id.as_deref().map(str::to_owned),
        type_: None,
    };
    match &env.body {
        Body::Presence(p) => {
            let sys = maps
                .system_id(&p.system)
                .ok_or_else(|| ConvertError::System(p.system.to_string()))?;
            let state = maps
                .system(sys)
                .state_id(&p.state)
                .ok_or_else(|| ConvertError::System(format!("{}:{}", p.system, p.state)))?;
            let mut x = maps.encode_xmpp(sys, state, p.note.as_deref());
            x.priority = p.priority;
            encode_presence(&x, &attrs(), out);
        }
        Body::Subscription(s) => {
            let kind = match s {
                Subscription::Subscribe => PresenceKind::Subscribe,
                Subscription::Subscribed => PresenceKind::Subscribed,
                Subscription::Unsubscribe => PresenceKind::Unsubscribe,
                Subscription::Unsubscribed => PresenceKind::Unsubscribed,
                Subscription::Probe => PresenceKind::Probe,
            };
            encode_presence_kind(&kind, &attrs(), out);
        }
        Body::Message(m) => {
            // Every value below may come from a SIP peer (user parts, Call-ID based ids, the
            // decoded `ms-body`): all of it goes through the one escaper, which also replaces
            // characters XML 1.0 cannot carry.
            out.extend_from_slice(b"<message");
            if let Some(t) = m.kind.xmpp_type() {
                attr(out, "type", t);
            }
            attr(out, "from", &env.from.to_string());
            attr(out, "to", &env.to.to_string());
            if let Some(id) = &m.id {
                attr(out, "id", id);
            }
            if let Some(lang) = &m.lang {
                attr(out, "xml:lang", lang);
            }
            out.push(b'>');
            if let Some(subject) = &m.subject {
                text_element(out, "subject", subject);
            }
            text_element(out, "body", &m.text);
            if let Some(t) = &m.thread {
                text_element(out, "thread", t);
            }
            out.extend_from_slice(b"</message>");
        }
        Body::Xmpp(raw) => push_relayed(out, &raw.bytes),
        Body::Error {
            id,
            condition,
            text,
            kind,
        } => {
            let name = match kind {
                ErrorOf::Message => "message",
                ErrorOf::Presence => "presence",
                ErrorOf::Iq => "iq",
            };
            out.push(b'<');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b" type='error'");
            attr(out, "from", &env.from.to_string());
            attr(out, "to", &env.to.to_string());
            if let Some(id) = id {
                attr(out, "id", id);
            }
            out.extend_from_slice(
                format!(
                    "><error type='{}'><{} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>",
                    condition.xmpp_type(),
                    condition.xmpp_name()
                )
                .as_bytes(),
            );
            if !text.is_empty() {
                out.extend_from_slice(b"<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>");
                write_text(out, text);
                out.extend_from_slice(b"</text>");
            }
            out.extend_from_slice(format!("</error></{name}>").as_bytes());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::map;
    use crate::xmpp::stream::{Limits, StreamEvent, StreamFramer};

    fn stanzas(header_ns: &str, body: &str) -> Vec<Stanza> {
        let mut f = StreamFramer::new(Limits::default());
        f.push(format!("<stream:stream xmlns='{header_ns}' xmlns:stream='http://etherx.jabber.org/streams'>").as_bytes());
        f.push(body.as_bytes());
        let mut out = Vec::new();
        while let Ok(Some(ev)) = f.next_event() {
            if let StreamEvent::Stanza(s) = ev {
                out.push(s);
            }
        }
        out
    }

    #[test]
    fn presence_from_a_component_is_read_in_the_home_system_and_written_back() {
        let maps = map::embedded().expect("maps");
        let s = stanzas(
            "jabber:component:accept",
            "<presence from='alice@example.com/pc' to='bob@partner.com'><show>dnd</show><status>Writing</status></presence>",
        );
        let env = stanza_to_envelope(&s[0], "jabber8", &maps).expect("converted");
        assert_eq!(env.from.to_string(), "alice@example.com/pc");
        let Body::Presence(p) = &env.body else {
            panic!("presence expected: {env:?}")
        };
        assert_eq!(
            (&*p.system, &*p.state, p.note.as_deref()),
            ("jabber8", "do_not_disturb", Some("Writing"))
        );
        let mut out = Vec::new();
        envelope_to_stanza(&env, &maps, &mut out).expect("encoded");
        let back = stanzas("jabber:server", std::str::from_utf8(&out).expect("utf-8"));
        assert_eq!(
            stanza_to_envelope(&back[0], "jabber8", &maps).expect("again"),
            env
        );
    }

    #[test]
    fn group_chat_presence_is_relayed_whole_and_ordinary_presence_is_not() {
        let maps = map::embedded().expect("maps");
        let s = stanzas(
            "jabber:server",
            "<presence from='x@y.test/pc' to='lobby@conf.example.com/x'><x xmlns='http://jabber.org/protocol/muc'/></presence>\
             <presence from='lobby@conf.example.com/a' to='x@y.test/pc'><show>away</show><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='owner' role='moderator'/></x></presence>\
             <presence from='x@y.test/pc' to='b@example.com' type='unavailable'><status>see http://jabber.org/protocol/muc</status></presence>",
        );
        for st in &s[..2] {
            let env = stanza_to_envelope(st, "fed-xmpp", &maps).expect("ok");
            let Body::Xmpp(raw) = &env.body else {
                panic!("relayed whole: {env:?}")
            };
            assert_eq!((raw.name, &raw.bytes), ("presence", st.bytes()));
        }
        // The namespace in a status text is not a room protocol element.
        let env = stanza_to_envelope(&s[2], "fed-xmpp", &maps).expect("ok");
        assert!(matches!(env.body, Body::Presence(_)), "{env:?}");
    }

    #[test]
    fn subscriptions_messages_and_errors() {
        let maps = map::embedded().expect("maps");
        let s = stanzas(
            "jabber:server",
            "<presence type='subscribe' from='a@x.test' to='b@y.test' id='s&amp;1'/>\
             <message from='a@x.test/r' to='b@y.test' id='m1' type='chat'><body>hi &amp; bye</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>\
             <message from='a@x.test' to='b@y.test' id='m2' type='error'><error type='cancel'><remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>down</text></error></message>\
             <iq from='a@x.test/r' to='b@y.test' id='i1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
        );
        let envs: Vec<Envelope> = s
            .iter()
            .map(|s| stanza_to_envelope(s, "fed-xmpp", &maps).expect("ok"))
            .collect();
        assert_eq!(envs[0].body, Body::Subscription(Subscription::Subscribe));
        // RFC 6120 §8.1.3: the subscription's id is kept for its bounce and its relay.
        assert_eq!(envs[0].stanza_id.as_deref(), Some("s&1"));
        let bounced = envs[0]
            .bounce(ErrorCondition::ItemNotFound, "no such user")
            .expect("a subscription bounces");
        assert!(
            matches!(&bounced.body, Body::Error { id: Some(i), kind: ErrorOf::Presence, .. } if i == "s&1"),
            "{bounced:?}"
        );
        let mut out = Vec::new();
        envelope_to_stanza(&envs[0], &maps, &mut out).expect("encoded");
        let xml = std::str::from_utf8(&out).expect("utf-8");
        assert!(
            xml.contains("id='s&amp;1'") || xml.contains("id=\"s&amp;1\""),
            "{xml}"
        );
        let mut out = Vec::new();
        envelope_to_stanza(&bounced, &maps, &mut out).expect("encoded");
        let xml = std::str::from_utf8(&out).expect("utf-8");
        assert!(xml.starts_with("<presence type='error'"), "{xml}");
        assert!(xml.contains("s&amp;1"), "{xml}");
        let Body::Xmpp(raw) = &envs[1].body else {
            panic!("raw message")
        };
        let m = message_text(raw).expect("has a body");
        assert_eq!((m.text.as_str(), m.id.as_deref()), ("hi & bye", Some("m1")));
        assert!(
            matches!(&envs[2].body, Body::Error { condition: ErrorCondition::RemoteServerNotFound, text, .. } if text == "down")
        );
        assert!(matches!(
            &envs[3].body,
            Body::Xmpp(XmppRaw { name: "iq", .. })
        ));
        let mut out = Vec::new();
        envelope_to_stanza(&envs[2], &maps, &mut out).expect("encoded");
        let back = stanzas("jabber:server", std::str::from_utf8(&out).expect("utf-8"));
        assert_eq!(
            stanza_to_envelope(&back[0], "fed-xmpp", &maps)
                .expect("again")
                .body,
            envs[2].body
        );
    }

    /// Issue 10: a SIP pager MESSAGE with U+0001 or U+FFFE in its body was written as-is to the
    /// component stream and Prosody closed the link with `not-well-formed`.
    #[test]
    fn characters_xml_forbids_become_u_fffd_in_messages_and_errors() {
        let maps = map::embedded().expect("maps");
        let mut from = Address::parse("bob@partner.com").expect("address");
        from.resource = Some("desk\u{1}\u{FFFF}".into());
        let to = Address::parse("alice@example.com").expect("address");
        let hostile = "a\u{1}b\u{FFFE}c\u{0}d\u{1B}]]><&'\"\re";
        let clean = "a\u{FFFD}b\u{FFFD}c\u{FFFD}d\u{FFFD}]]><&'\"\re";
        let message = Envelope {
            from: from.clone(),
            to: to.clone(),
            body: Body::Message(MessageBody {
                id: Some("id\u{2}".into()),
                text: hostile.into(),
                thread: Some(hostile.into()),
                ..Default::default()
            }),
            stanza_id: None,
            via_cluster: None,
        };
        let error = Envelope {
            from,
            to,
            body: Body::Error {
                id: Some("id\u{2}".into()),
                condition: ErrorCondition::ServiceUnavailable,
                text: hostile.into(),
                kind: ErrorOf::Message,
            },
            stanza_id: None,
            via_cluster: None,
        };
        for env in [message, error] {
            let mut out = Vec::new();
            envelope_to_stanza(&env, &maps, &mut out).expect("encoded");
            let text = std::str::from_utf8(&out).expect("utf-8");
            assert!(
                text.chars().all(|c| c != '\u{FFFE}'
                    && c != '\u{FFFF}'
                    && (c >= ' ' || matches!(c, '\t' | '\n'))),
                "{text:?}"
            );
            let back = stanzas("jabber:component:accept", text);
            assert_eq!(back.len(), 1, "{text:?}");
            assert_eq!(back[0].id().as_deref(), Some("id\u{FFFD}"));
            assert_eq!(
                back[0].from().as_deref(),
                Some("bob@partner.com/desk\u{FFFD}\u{FFFD}")
            );
            let kids = children(&back[0]);
            let read = match &env.body {
                Body::Message(_) => kids.iter().find(|c| c.name == "body").map(|c| &c.text),
                _ => kids
                    .iter()
                    .find(|c| c.name == "error")
                    .and_then(|e| e.children.iter().find(|g| g.0 == "text"))
                    .map(|g| &g.2),
            };
            assert_eq!(read.map(String::as_str), Some(clean), "{text:?}");
        }
    }

    #[test]
    fn relayed_stanzas_lose_the_non_characters() {
        let maps = map::embedded().expect("maps");
        let raw = "<message from='a@x.test' to='b@y.test' id='r1'><body>\u{FFFE}x\u{FFFF}\u{FFFD}\u{FF5E}</body></message>";
        let env = Envelope {
            from: Address::parse("a@x.test").expect("from"),
            to: Address::parse("b@y.test").expect("to"),
            body: Body::Xmpp(crate::gateway::envelope::XmppRaw::new(
                "message",
                bytes::Bytes::copy_from_slice(raw.as_bytes()),
            )),
            stanza_id: None,
            via_cluster: None,
        };
        let mut out = b"<presence/>".to_vec();
        envelope_to_stanza(&env, &maps, &mut out).expect("encoded");
        let text = std::str::from_utf8(&out).expect("utf-8");
        assert_eq!(
            text,
            "<presence/><message from='a@x.test' to='b@y.test' id='r1'><body>\u{FFFD}x\u{FFFD}\u{FFFD}\u{FF5E}</body></message>"
        );
        // The framer itself refuses them (not-well-formed), so this guard is the second line.
        let mut f = crate::xmpp::stream::StreamFramer::default();
        f.push(b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>");
        f.push(raw.as_bytes());
        let mut refused = false;
        for _ in 0..4 {
            match f.next_event() {
                Err(e) => {
                    refused = e.to_string().contains("U+FFFE");
                    break;
                }
                Ok(None) => break,
                Ok(Some(_)) => {}
            }
        }
        assert!(refused, "the framer let U+FFFE through");
    }

    /// RFC 7572: type, thread, subject and `xml:lang` are read from a relayed message and
    /// written back; `normal` is written without `type` (RFC 6121 §5.2.2 default).
    #[test]
    fn message_facts_round_trip() {
        let maps = map::embedded().expect("maps");
        for (xml, kind) in [
            ("<message from='a@x.test/r' to='b@y.test' id='m1' xml:lang='fr'><subject>S &amp; T</subject><thread>th-1</thread><body>B</body></message>", MessageKind::Normal),
            ("<message from='a@x.test/r' to='b@y.test' id='m1' type='normal' xml:lang='fr'><subject>S &amp; T</subject><thread>th-1</thread><body>B</body></message>", MessageKind::Normal),
            ("<message from='a@x.test/r' to='b@y.test' id='m1' type='chat' xml:lang='fr'><subject>S &amp; T</subject><thread>th-1</thread><body>B</body></message>", MessageKind::Chat),
            ("<message from='a@x.test/r' to='b@y.test' id='m1' type='headline' xml:lang='fr'><subject>S &amp; T</subject><thread>th-1</thread><body>B</body></message>", MessageKind::Headline),
        ] {
            let s = stanzas("jabber:component:accept", xml);
            let env = stanza_to_envelope(&s[0], "xmpp", &maps).expect("converted");
            let Body::Xmpp(raw) = &env.body else {
                panic!("relayed: {env:?}")
            };
            let m = message_text(raw).expect("text");
            let want = MessageBody {
                id: Some("m1".into()),
                text: "B".into(),
                thread: Some("th-1".into()),
                kind,
                subject: Some("S & T".into()),
                lang: Some("fr".into()),
            };
            assert_eq!(m, want, "{xml}");
            let typed = Envelope {
                body: Body::Message(m),
                ..env
            };
            let mut out = Vec::new();
            envelope_to_stanza(&typed, &maps, &mut out).expect("encoded");
            let text = std::str::from_utf8(&out).expect("utf-8");
            assert_eq!(text.contains("type="), kind != MessageKind::Normal, "{text}");
            let back = stanzas("jabber:server", text);
            let Body::Xmpp(raw) = stanza_to_envelope(&back[0], "xmpp", &maps)
                .expect("again")
                .body
            else {
                panic!("relayed")
            };
            assert_eq!(message_text(&raw), Some(want), "{text}");
        }
        // Group chat and errors are no text for one user.
        for t in ["groupchat", "error"] {
            let raw = XmppRaw::new(
                "message",
                bytes::Bytes::from(format!("<message type='{t}'><body>x</body></message>")),
            );
            assert_eq!(message_text(&raw), None, "{t}");
        }
    }

    /// Every RFC 6120 condition becomes a typed error (RFC 7247 §7 maps all of them); an
    /// unknown one is `undefined-condition`.
    #[test]
    fn every_condition_is_a_typed_error() {
        let maps = map::embedded().expect("maps");
        for c in StanzaErrorCondition::ALL
            .iter()
            .copied()
            .chain([StanzaErrorCondition::UndefinedCondition])
        {
            let name = if c == StanzaErrorCondition::UndefinedCondition {
                "made-up"
            } else {
                c.as_str()
            };
            let xml = format!("<message from='a@x.test' to='b@y.test' id='e1' type='error'><error type='cancel'><{name} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>");
            let s = stanzas("jabber:server", &xml);
            let env = stanza_to_envelope(&s[0], "xmpp", &maps).expect("converted");
            assert!(
                matches!(&env.body, Body::Error { condition, id: Some(i), kind: ErrorOf::Message, .. } if *condition == c && i == "e1"),
                "{name}: {env:?}"
            );
            let mut out = Vec::new();
            envelope_to_stanza(&env, &maps, &mut out).expect("encoded");
            let text = std::str::from_utf8(&out).expect("utf-8");
            assert!(text.contains(&format!("<{} xmlns=", c.as_str())), "{text}");
            assert!(
                text.contains(&format!("<error type='{}'>", c.xmpp_type())),
                "{text}"
            );
        }
    }

    /// The facts read once from the framer are the facts of the root start tag (escaped values,
    /// either quote), as reading the bytes again would give.
    #[test]
    fn relayed_facts_come_from_the_framer() {
        let maps = map::embedded().expect("maps");
        let s = stanzas(
            "jabber:server",
            "<message from='a@x.test' to='b@y.test' id=\"m&amp;1\" type='chat'><body>x</body></message>\
             <iq from='a@x.test/r' to='b@y.test' id='i1' type='result'/>\
             <message from='a@x.test' to='b@y.test'><body>no id</body></message>",
        );
        for st in &s {
            let env = stanza_to_envelope(st, "xmpp", &maps).expect("converted");
            let Body::Xmpp(raw) = &env.body else {
                panic!("relayed")
            };
            assert_eq!(
                raw.facts(),
                XmppRaw::new(raw.name, raw.bytes.clone()).facts()
            );
        }
        let Body::Xmpp(raw) = stanza_to_envelope(&s[0], "xmpp", &maps).expect("ok").body else {
            panic!("relayed")
        };
        assert_eq!(raw.facts().id.as_deref(), Some("m&1"));
    }

    #[test]
    fn bad_addresses_are_refused() {
        let maps = map::embedded().expect("maps");
        let s = stanzas("jabber:server", "<message to='b@y.test'><body>x</body></message><message from='server.test' to='b@y.test'/>");
        assert_eq!(
            stanza_to_envelope(&s[0], "fed-xmpp", &maps),
            Err(ConvertError::Address("from"))
        );
        assert_eq!(
            stanza_to_envelope(&s[1], "fed-xmpp", &maps),
            Err(ConvertError::Address("from"))
        );
    }
}
