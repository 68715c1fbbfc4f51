//! Envelopes on the peer link: the core's [`Envelope`] ⇄ the messages of `proto/peer.proto`.
//! Field by field, so the wire form does not change when a Rust type does; what a peer sends
//! is checked as any input is (addresses parsed again, element names from a closed set).

use super::proto;
use crate::gateway::envelope::{
    Address, Body, Envelope, ErrorCondition, ErrorOf, MessageBody, MessageKind, PresenceBody,
    Subscription, XmppRaw,
};
use std::sync::Arc;

/// Why an envelope from a peer cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad address: {0}")]
    Address(#[from] crate::gateway::envelope::AddressError),
    #[error("envelope without a body")]
    NoBody,
    #[error("unknown stanza name `{0}`")]
    StanzaName(String),
    #[error("unknown error condition `{0}`")]
    Condition(String),
    #[error("unknown enum value {0}")]
    Enum(i32),
    #[error("priority {0} is outside -128..=127")]
    Priority(i32),
}

pub fn to_wire(env: &Envelope) -> proto::Envelope {
    use proto::envelope::Body as W;
    let body = match &env.body {
        Body::Presence(p) => W::Presence(proto::Presence {
            system: p.system.to_string(),
            state: p.state.to_string(),
            note: p.note.clone(),
            priority: p.priority.map(i32::from),
        }),
        Body::Subscription(s) => W::Subscription(match s {
            Subscription::Subscribe => proto::Subscription::Subscribe,
            Subscription::Subscribed => proto::Subscription::Subscribed,
            Subscription::Unsubscribe => proto::Subscription::Unsubscribe,
            Subscription::Unsubscribed => proto::Subscription::Unsubscribed,
            Subscription::Probe => proto::Subscription::Probe,
        } as i32),
        Body::Message(m) => W::Message(proto::Message {
            id: m.id.clone(),
            text: m.text.clone(),
            thread: m.thread.clone(),
            kind: match m.kind {
                MessageKind::Chat => proto::MessageKind::Chat,
                MessageKind::Normal => proto::MessageKind::Normal,
                MessageKind::Headline => proto::MessageKind::Headline,
            } as i32,
            subject: m.subject.clone(),
            lang: m.lang.clone(),
        }),
        Body::Xmpp(x) => W::Xmpp(proto::Raw {
            name: x.name.to_string(),
            bytes: x.bytes.to_vec(),
        }),
        Body::Error {
            id,
            condition,
            text,
            kind,
        } => W::Error(proto::Error {
            id: id.clone(),
            condition: condition.as_str().to_string(),
            text: text.clone(),
            kind: match kind {
                ErrorOf::Message => proto::ErrorOf::OfMessage,
                ErrorOf::Presence => proto::ErrorOf::OfPresence,
                ErrorOf::Iq => proto::ErrorOf::OfIq,
            } as i32,
        }),
    };
    proto::Envelope {
        from: env.from.to_string(),
        to: env.to.to_string(),
        body: Some(body),
        stanza_id: env.stanza_id.as_deref().map(str::to_owned),
        via_cluster: env.via_cluster.as_deref().map(str::to_owned),
    }
}

pub fn from_wire(w: proto::Envelope) -> Result<Envelope, WireError> {
    use proto::envelope::Body as W;
    let from = Address::parse(&w.from)?;
    let to = Address::parse(&w.to)?;
    let body = match w.body.ok_or(WireError::NoBody)? {
        W::Presence(p) => Body::Presence(PresenceBody {
            system: Arc::from(p.system.as_str()),
            state: Arc::from(p.state.as_str()),
            note: p.note,
            priority: p
                .priority
                .map(|n| i8::try_from(n).map_err(|_| WireError::Priority(n)))
                .transpose()?,
        }),
        W::Subscription(n) => Body::Subscription(
            match proto::Subscription::try_from(n).map_err(|_| WireError::Enum(n))? {
                proto::Subscription::Subscribe => Subscription::Subscribe,
                proto::Subscription::Subscribed => Subscription::Subscribed,
                proto::Subscription::Unsubscribe => Subscription::Unsubscribe,
                proto::Subscription::Unsubscribed => Subscription::Unsubscribed,
                proto::Subscription::Probe => Subscription::Probe,
            },
        ),
        W::Message(m) => Body::Message(MessageBody {
            id: m.id,
            text: m.text,
            thread: m.thread,
            kind: match proto::MessageKind::try_from(m.kind).map_err(|_| WireError::Enum(m.kind))? {
                proto::MessageKind::Chat => MessageKind::Chat,
                proto::MessageKind::Normal => MessageKind::Normal,
                proto::MessageKind::Headline => MessageKind::Headline,
            },
            subject: m.subject,
            lang: m.lang,
        }),
        W::Xmpp(r) => {
            let name = match r.name.as_str() {
                "message" => "message",
                "presence" => "presence",
                "iq" => "iq",
                other => return Err(WireError::StanzaName(other.chars().take(40).collect())),
            };
            Body::Xmpp(XmppRaw::new(name, bytes::Bytes::from(r.bytes)))
        }
        W::Error(e) => Body::Error {
            id: e.id,
            condition: ErrorCondition::from_name(&e.condition)
                .ok_or_else(|| WireError::Condition(e.condition.chars().take(40).collect()))?,
            text: e.text,
            kind: match proto::ErrorOf::try_from(e.kind).map_err(|_| WireError::Enum(e.kind))? {
                proto::ErrorOf::OfMessage => ErrorOf::Message,
                proto::ErrorOf::OfPresence => ErrorOf::Presence,
                proto::ErrorOf::OfIq => ErrorOf::Iq,
            },
        },
    };
    // Bounded like the rest of a stanza's attributes: a longer one is not ours to relay.
    let stanza_id = w
        .stanza_id
        .filter(|i| i.len() <= MAX_STANZA_ID)
        .map(String::into_boxed_str);
    // A cluster name (`intercluster::valid_name`); anything else is not one we could list.
    let via_cluster = w
        .via_cluster
        .filter(|c| crate::intercluster::valid_name(c))
        .map(|c| Arc::from(c.as_str()));
    Ok(Envelope {
        from,
        to,
        body,
        stanza_id,
        via_cluster,
    })
}

/// Longest stanza id carried across the peer link.
const MAX_STANZA_ID: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn every_body() -> Vec<Body> {
        let mut v = vec![
            Body::Presence(PresenceBody {
                system: Arc::from("xmpp"),
                state: Arc::from("dnd"),
                note: Some("In a meeting ✓".into()),
                priority: Some(-5),
            }),
            Body::Presence(PresenceBody {
                system: Arc::from("lync"),
                state: Arc::from("offline"),
                note: None,
                priority: None,
            }),
            Body::Message(MessageBody {
                id: Some("m1".into()),
                text: "hello <b>&amp;</b>".into(),
                thread: Some("call-id@x".into()),
                kind: MessageKind::Normal,
                subject: Some("s".into()),
                lang: Some("ja".into()),
            }),
            Body::Message(MessageBody::default()),
            Body::Xmpp(XmppRaw::new(
                "iq",
                bytes::Bytes::from_static(
                    b"<iq type='get' id='q1'><query xmlns='jabber:iq:version'/></iq>",
                ),
            )),
        ];
        for s in [
            Subscription::Subscribe,
            Subscription::Subscribed,
            Subscription::Unsubscribe,
            Subscription::Unsubscribed,
            Subscription::Probe,
        ] {
            v.push(Body::Subscription(s));
        }
        for (kind, condition) in [
            (ErrorOf::Message, ErrorCondition::ServiceUnavailable),
            (ErrorOf::Presence, ErrorCondition::RemoteServerTimeout),
            (ErrorOf::Iq, ErrorCondition::ItemNotFound),
        ] {
            v.push(Body::Error {
                id: Some("e1".into()),
                condition,
                text: "why".into(),
                kind,
            });
        }
        v
    }

    #[test]
    fn every_body_survives_the_wire() {
        for body in every_body() {
            let stanza_id =
                matches!(body, Body::Presence(_) | Body::Subscription(_)).then(|| "p&1".into());
            let env = Envelope {
                from: addr("bob@partner.example/desk"),
                to: addr("alice@example.com"),
                body,
                stanza_id,
                via_cluster: Some(Arc::from("west-1")),
            };
            let back = from_wire(to_wire(&env)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, env);
            if let (Body::Xmpp(a), Body::Xmpp(b)) = (&back.body, &env.body) {
                assert_eq!(a.facts(), b.facts());
            }
        }
    }

    #[test]
    fn what_a_peer_may_not_send_is_refused() {
        let good = to_wire(&Envelope {
            from: addr("bob@partner.example"),
            to: addr("alice@example.com"),
            body: Body::Subscription(Subscription::Probe),
            stanza_id: None,
            via_cluster: None,
        });
        let mut w = good.clone();
        w.from = "no-at-sign".into();
        assert!(matches!(from_wire(w), Err(WireError::Address(_))));
        let mut w = good.clone();
        w.body = None;
        assert_eq!(from_wire(w), Err(WireError::NoBody));
        let mut w = good.clone();
        w.body = Some(proto::envelope::Body::Subscription(99));
        assert_eq!(from_wire(w), Err(WireError::Enum(99)));
        let mut w = good.clone();
        w.body = Some(proto::envelope::Body::Xmpp(proto::Raw {
            name: "stream:features".into(),
            bytes: vec![],
        }));
        assert!(matches!(from_wire(w), Err(WireError::StanzaName(_))));
        let mut w = good.clone();
        w.body = Some(proto::envelope::Body::Error(proto::Error {
            id: None,
            condition: "made-up".into(),
            text: String::new(),
            kind: 0,
        }));
        assert!(matches!(from_wire(w), Err(WireError::Condition(_))));
        let mut w = good;
        w.body = Some(proto::envelope::Body::Presence(proto::Presence {
            system: "xmpp".into(),
            state: "online".into(),
            note: None,
            priority: Some(300),
        }));
        assert_eq!(from_wire(w), Err(WireError::Priority(300)));
    }
}
