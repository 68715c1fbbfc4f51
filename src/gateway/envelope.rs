//! The core's currency: what one edge hands to another, independent of SIP or XMPP wire forms.
//! Edges decode their protocol into an `Envelope`; the router decides where it goes and
//! translates presence; the destination edge encodes it. XMPP stanzas the core does not need to
//! understand (iq, messages with extensions) travel as `Body::Xmpp` between XMPP links only.

use crate::config::Domain;
use std::fmt;
use std::sync::Arc;

/// A user address on either side: `local@domain[/resource]` (an XMPP JID, or the user part and
/// host of a SIP AOR). Domains compare exactly, never by suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    pub local: String,
    pub domain: Domain,
    pub resource: Option<String>,
}

/// Why an address could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address `{input}`: {reason}")]
pub struct AddressError {
    pub input: String,
    pub reason: String,
}

/// Longest localpart / resource we accept (RFC 7622 §3.3.1 and §3.4.1: 1023 octets).
const MAX_PART: usize = 1023;

impl Address {
    /// Parses `local@domain[/resource]`. A bare domain (no `@`) is refused: the core only routes
    /// between users.
    pub fn parse(input: &str) -> Result<Self, AddressError> {
        let err = |reason: &str| AddressError {
            input: input.chars().take(200).collect(),
            reason: reason.into(),
        };
        // RFC 7622 §3.3.1 and §3.4.1 (PRECIS IdentifierClass and FreeformClass) disallow
        // control characters and non-characters in every part; a SIP URI can carry them
        // (percent-decoded), and the address ends up in the `from` of an XMPP stanza.
        if input
            .chars()
            .any(|c| c.is_control() || matches!(c, '\u{FFFE}' | '\u{FFFF}'))
        {
            return Err(err("control character or non-character"));
        }
        let (bare, resource) = match input.split_once('/') {
            Some((b, r)) if !r.is_empty() && r.len() <= MAX_PART => (b, Some(r.to_string())),
            Some(_) => return Err(err("empty or oversized resource")),
            None => (input, None),
        };
        let (local, domain) = bare
            .split_once('@')
            .ok_or_else(|| err("no `@`: not a user address"))?;
        if local.is_empty() || local.len() > MAX_PART {
            return Err(err("empty or oversized localpart"));
        }
        // RFC 7622 §3.3.1: these never appear in a localpart.
        if local.chars().any(|c| {
            matches!(c, '"' | '&' | '\'' | '/' | ':' | '<' | '>' | '@') || c.is_whitespace()
        }) {
            return Err(err("character not allowed in a localpart"));
        }
        let domain = Domain::parse(domain).map_err(|e| err(&e))?;
        // Localparts compare case-insensitively on both sides: XMPP servers case-fold them
        // (RFC 7622 §3.3.1, PRECIS UsernameCaseMapped) and Lync/SfB treat SIP user parts the
        // same way, so `Bob.Smith@partner.com` and `bob.smith@partner.com` are one watcher.
        // Folding here keeps every key built from an address (subscriptions, IM sessions, the
        // directory) consistent with what the home node sends back. Resources stay as sent.
        // ASCII (nearly every address) folds the same without the Unicode tables.
        let local = if local.is_ascii() {
            local.to_ascii_lowercase()
        } else {
            local.to_lowercase()
        };
        Ok(Address {
            local,
            domain,
            resource,
        })
    }

    /// The same address without resource.
    pub fn bare(&self) -> Address {
        Address {
            local: self.local.clone(),
            domain: self.domain.clone(),
            resource: None,
        }
    }

    pub fn bare_string(&self) -> String {
        format!("{}@{}", self.local, self.domain)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)?;
        if let Some(r) = &self.resource {
            write!(f, "/{r}")?;
        }
        Ok(())
    }
}

/// Availability as a state of a named mapping system (names, not ids, so that an envelope
/// stays meaningful across a mapping reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceBody {
    pub system: Arc<str>,
    pub state: Arc<str>,
    /// The user's status text.
    pub note: Option<String>,
    pub priority: Option<i8>,
}

/// Subscription management (RFC 6121 §3; SIP SUBSCRIBE/NOTIFY states map onto these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Probe,
}

/// The kind of a text message (RFC 6121 §5.2.2 `type`). SIP has no such attribute: a pager
/// MESSAGE is a single message (`Normal`, RFC 7572 §4), a MESSAGE inside an IM session a line of
/// a one-to-one chat (`Chat`, the core's default since most text travels in sessions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MessageKind {
    #[default]
    Chat,
    Normal,
    Headline,
}

impl MessageKind {
    /// The `type` attribute, `None` for `normal` (RFC 6121 §5.2.2: the default when absent).
    pub fn xmpp_type(self) -> Option<&'static str> {
        match self {
            MessageKind::Chat => Some("chat"),
            MessageKind::Normal => None,
            MessageKind::Headline => Some("headline"),
        }
    }

    /// Reads a `type` attribute; `groupchat` and `error` are not text for one user (`None`).
    pub fn from_xmpp(t: Option<&str>) -> Option<Self> {
        match t {
            None | Some("normal") => Some(MessageKind::Normal),
            Some("chat") => Some(MessageKind::Chat),
            Some("headline") => Some(MessageKind::Headline),
            _ => None,
        }
    }
}

/// A text message and the facts RFC 7572 maps between SIP and XMPP, so that no edge re-parses
/// the other's wire form: `thread` ⇄ Call-ID (§4/§5), `subject` ⇄ `Subject`, `lang` (`xml:lang`)
/// ⇄ `Content-Language`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageBody {
    pub id: Option<String>,
    pub text: String,
    pub thread: Option<String>,
    pub kind: MessageKind,
    pub subject: Option<String>,
    pub lang: Option<String>,
}

/// Stanza-level error conditions (RFC 6120 §8.3.3): every one can travel in an envelope, and
/// [`crate::gateway::interwork::errors`] maps each to SIP and back (RFC 7247 §7).
pub use crate::xmpp::error::StanzaErrorCondition as ErrorCondition;

/// A stanza the core relays between XMPP links without looking inside, with the routing facts
/// of its root element read once, when it was framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppRaw {
    /// `message`, `presence` or `iq`.
    pub name: &'static str,
    /// The element's exact bytes as received (no stream namespace declaration of its own).
    pub bytes: bytes::Bytes,
    facts: StanzaFacts,
}

/// The routing facts of a relayed stanza's root element: what the router needs to decide
/// whether it may be answered with an error and whether it teaches the directory a user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StanzaFacts {
    /// The `id` attribute, unescaped.
    pub id: Option<String>,
    /// The `type` attribute, unescaped (`chat`, `get`, `result`, `error`, `subscribe`...).
    pub type_: Option<String>,
}

impl StanzaFacts {
    /// A reply, never a request: an error, or an iq `result` (RFC 6120 §8.2.3, §8.3.1).
    /// Such a stanza is never answered with an error and is not traffic *from a user*: a home
    /// node sends it for any address a foreign peer names, existing or not.
    pub fn is_reply(&self, name: &str) -> bool {
        match self.type_.as_deref() {
            Some("error") => true,
            Some("result") => name == "iq",
            _ => false,
        }
    }
}

impl XmppRaw {
    /// A relayed stanza whose facts the framer already decoded (the XMPP converters).
    pub fn with_facts(name: &'static str, bytes: bytes::Bytes, facts: StanzaFacts) -> Self {
        XmppRaw { name, bytes, facts }
    }

    /// A relayed stanza built from bytes alone (tests, tools): reads `id` and `type` from the
    /// root start tag only (the payload is never parsed); anything unreadable yields no facts.
    pub fn new(name: &'static str, bytes: bytes::Bytes) -> Self {
        use quick_xml::events::Event;
        let mut reader = quick_xml::Reader::from_reader(&bytes[..]);
        let facts = match reader.read_event() {
            Ok(Event::Start(start) | Event::Empty(start)) => {
                let value = |name: &str| {
                    start.try_get_attribute(name).ok().flatten().and_then(|a| {
                        a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .ok()
                            .map(|v| v.into_owned())
                    })
                };
                StanzaFacts {
                    id: value("id"),
                    type_: value("type"),
                }
            }
            _ => StanzaFacts::default(),
        };
        XmppRaw { name, bytes, facts }
    }

    /// The `id` and `type` of the root element.
    pub fn facts(&self) -> &StanzaFacts {
        &self.facts
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Availability broadcast; `unavailable` presence is the state `offline` of the system.
    Presence(PresenceBody),
    Subscription(Subscription),
    Message(MessageBody),
    Xmpp(XmppRaw),
    /// An error answering a stanza or request with `id` (the id of what failed).
    Error {
        id: Option<String>,
        condition: ErrorCondition,
        text: String,
        kind: ErrorOf,
    },
}

/// What kind of stanza an error answers (XMPP errors keep the stanza name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorOf {
    Message,
    Presence,
    Iq,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub from: Address,
    pub to: Address,
    pub body: Body,
    /// The `id` of the XMPP presence stanza a presence or subscription body came from, so a
    /// bounce (RFC 6120 §8.1.3: an error carries the id of what it answers) and a relay to
    /// another XMPP link keep it. Messages keep theirs in [`MessageBody`]; iqs in their bytes.
    pub stanza_id: Option<Box<str>>,
    /// The peer cluster (issue 13) that forwarded this foreign user's envelope to one of our
    /// users: the node that hands it to the user's home node remembers the way back from it,
    /// so the user's answers leave through that cluster even when another node of ours
    /// answered the peer (see `intercluster::routes`). Set by the router only; what a peer
    /// cluster sends in this field is never trusted.
    pub via_cluster: Option<Arc<str>>,
}

impl Envelope {
    /// The error sent back to the sender of `self`, or `None` for things never answered with an
    /// error. The error keeps the stanza's `id` so the sender can match it (RFC 6120 §8.1.3:
    /// an error to a stanza with an `id` carries the same `id`). Errors and iq results
    /// are never answered (RFC 6120 §8.3.1: no error in reply to an error, which would loop
    /// between two entities; §8.2.3: no response to an iq `result` or `error`).
    pub fn bounce(&self, condition: ErrorCondition, text: impl Into<String>) -> Option<Envelope> {
        let (id, kind) = match &self.body {
            Body::Error { .. } => return None,
            Body::Message(m) => (m.id.clone(), ErrorOf::Message),
            Body::Presence(_) | Body::Subscription(_) => (
                self.stanza_id.as_deref().map(str::to_owned),
                ErrorOf::Presence,
            ),
            Body::Xmpp(x) => {
                let facts = x.facts();
                if facts.is_reply(x.name) {
                    return None;
                }
                let id = facts.id.clone();
                let kind = match x.name {
                    "iq" => ErrorOf::Iq,
                    "presence" => ErrorOf::Presence,
                    _ => ErrorOf::Message,
                };
                (id, kind)
            }
        };
        Some(Envelope {
            from: self.to.clone(),
            to: self.from.clone(),
            body: Body::Error {
                id,
                condition,
                text: text.into(),
                kind,
            },
            stanza_id: None,
            via_cluster: None,
        })
    }

    /// Whether this is traffic a user sent, as opposed to a reply a server sends for any address
    /// it is asked about (errors, iq results, refused subscriptions). Only user traffic teaches
    /// the directory where a user lives: otherwise a foreign peer probing random localparts
    /// fills it with users that do not exist.
    pub fn is_user_traffic(&self) -> bool {
        match &self.body {
            Body::Error { .. } => false,
            // A home node answers a subscription request to a user it does not have with
            // `unsubscribed` (RFC 6121 §3.1.3).
            Body::Subscription(Subscription::Unsubscribed) => false,
            Body::Subscription(_) | Body::Presence(_) | Body::Message(_) => true,
            Body::Xmpp(x) => !x.facts().is_reply(x.name),
        }
    }

    /// Bounded metric label of the body kind.
    pub fn kind_label(&self) -> &'static str {
        match &self.body {
            Body::Presence(_) => "presence",
            Body::Subscription(_) => "subscription",
            Body::Message(_) => "message",
            Body::Xmpp(x) => x.name,
            Body::Error { .. } => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_compare_exactly() {
        let a = Address::parse("Alice@Example.COM./Home").expect("valid");
        assert_eq!(a.local, "alice");
        assert_eq!(a.domain.as_str(), "example.com");
        assert_eq!(a.resource.as_deref(), Some("Home"));
        assert_eq!(a.bare().to_string(), "alice@example.com");
        assert_ne!(
            Address::parse("a@imp.example.com").expect("valid").domain,
            Address::parse("a@example.com").expect("valid").domain
        );
        for bad in [
            "example.com",
            "@example.com",
            "a b@example.com",
            "a@",
            "a@exa mple.com",
            "a@example.com/",
            "a\u{1}@example.com",
            "a@example.com/r\u{0}",
            "a@example.com/r\u{FFFF}",
        ] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_are_never_bounced() {
        let env = Envelope {
            from: Address::parse("a@x.test").expect("valid"),
            to: Address::parse("b@y.test").expect("valid"),
            body: Body::Message(MessageBody {
                id: Some("m1".into()),
                text: "hi".into(),
                thread: None,
                ..Default::default()
            }),
            stanza_id: None,
            via_cluster: None,
        };
        let b = env
            .bounce(ErrorCondition::NotAllowed, "policy")
            .expect("a message bounces");
        assert_eq!(b.to, env.from);
        assert!(
            matches!(&b.body, Body::Error { id: Some(i), kind: ErrorOf::Message, .. } if i == "m1")
        );
        assert_eq!(b.bounce(ErrorCondition::NotAllowed, "again"), None);
    }

    fn relayed(name: &'static str, xml: &str) -> Envelope {
        Envelope {
            from: Address::parse("a@x.test/r").expect("valid"),
            to: Address::parse("b@y.test").expect("valid"),
            body: Body::Xmpp(XmppRaw::new(
                name,
                bytes::Bytes::copy_from_slice(xml.as_bytes()),
            )),
            stanza_id: None,
            via_cluster: None,
        }
    }

    #[test]
    fn bounces_of_relayed_stanzas_keep_the_id_and_never_answer_replies() {
        let cases = [
            (
                "message",
                "<message id='m&amp;7' type='chat'><body>x</body></message>",
                Some(("m&7", ErrorOf::Message)),
            ),
            (
                "iq",
                "<iq id='i1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
                Some(("i1", ErrorOf::Iq)),
            ),
            ("iq", "<iq id='i2' type='set'/>", Some(("i2", ErrorOf::Iq))),
            (
                "presence",
                "<presence id='p1' type='subscribe'/>",
                Some(("p1", ErrorOf::Presence)),
            ),
            // RFC 6120 §8.2.3 and §8.3.1: replies are never answered.
            ("iq", "<iq id='i3' type='result'/>", None),
            (
                "iq",
                "<iq id='i4' type='error'><error type='cancel'/></iq>",
                None,
            ),
            (
                "message",
                "<message id='m8' type='error'><error type='cancel'/></message>",
                None,
            ),
            (
                "presence",
                "<presence type='error'><error type='cancel'/></presence>",
                None,
            ),
        ];
        for (name, xml, expected) in cases {
            let env = relayed(name, xml);
            let b = env.bounce(ErrorCondition::ServiceUnavailable, "down");
            match (expected, b) {
                (None, None) => {}
                (Some((id, kind)), Some(b)) => {
                    assert_eq!(
                        (b.from.clone(), b.to.clone()),
                        (env.to.clone(), env.from.clone())
                    );
                    assert_eq!(
                        b.body,
                        Body::Error {
                            id: Some(id.into()),
                            condition: ErrorCondition::ServiceUnavailable,
                            text: "down".into(),
                            kind
                        },
                        "{xml}"
                    );
                    assert_eq!(b.bounce(ErrorCondition::ServiceUnavailable, "loop"), None);
                }
                (e, b) => panic!("{xml}: expected {e:?}, bounced {b:?}"),
            }
            assert_eq!(env.is_user_traffic(), expected.is_some(), "{xml}");
        }
    }
}
