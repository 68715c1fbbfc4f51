//! Envelopes written as XMPP stanzas (issue 10 item 5; the fuzzing twin of the property test in
//! tests/it/gateway_safety.rs). The input is decoded by hand into an envelope of any kind
//! (message, stanza error, presence, subscription, or a relayed stanza framed from the input)
//! whose text fields — body, thread, id, error text, status note, the user and resource parts
//! of both addresses — hold arbitrary Unicode. `envelope_to_stanza` must not panic, and what it
//! writes must:
//! - contain only XML 1.0 `Char`s, literally and through character references;
//! - re-frame with Legate's `StreamFramer` after a component stream header as exactly one
//!   stanza, with no error, of the same element;
//! - carry `from`/`to`/`id` (and a message's body and thread, as `message_text` reads them
//!   back: outer whitespace trimmed) as the input with every non-`Char` replaced by U+FFFD.
//!
//! Input layout: byte 0 picks the kind, byte 1 holds presence flags of optional fields, byte 2
//! picks the condition/state/subscription, byte 3 the priority; the rest is split on 0xFF (never
//! part of UTF-8) into text fields, each read as UTF-8 with invalid sequences as U+FFFD.
#![no_main]

use legate::config::Domain;
use legate::gateway::envelope::{
    Address, Body, Envelope, ErrorCondition, ErrorOf, MessageBody, PresenceBody, Subscription,
    XmppRaw,
};
use legate::presence::map::{self, MappingSet};
use legate::xmpp::convert::{envelope_to_stanza, message_text};
use legate::xmpp::stanza::Stanza;
use legate::xmpp::stream::{Limits, StreamEvent, StreamFramer};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, LazyLock};

static MAPS: LazyLock<MappingSet> =
    LazyLock::new(|| map::embedded().unwrap_or_else(|e| panic!("embedded maps: {e}")));

static STATES: LazyLock<Vec<String>> = LazyLock::new(|| {
    let xmpp = MAPS
        .system_id("xmpp")
        .unwrap_or_else(|| panic!("the embedded maps have the `xmpp` system"));
    MAPS.system(xmpp)
        .state_names()
        .map(str::to_string)
        .collect()
});

const HEADER: &[u8] = b"<stream:stream xmlns='jabber:component:accept' \
xmlns:stream='http://etherx.jabber.org/streams' to='partner.com'>";

const CONDITIONS: [ErrorCondition; 7] = [
    ErrorCondition::NotAllowed,
    ErrorCondition::Forbidden,
    ErrorCondition::ItemNotFound,
    ErrorCondition::RemoteServerNotFound,
    ErrorCondition::RemoteServerTimeout,
    ErrorCondition::ServiceUnavailable,
    ErrorCondition::ResourceConstraint,
];

const SUBSCRIPTIONS: [Subscription; 5] = [
    Subscription::Subscribe,
    Subscription::Subscribed,
    Subscription::Unsubscribe,
    Subscription::Unsubscribed,
    Subscription::Probe,
];

/// XML 1.0 §2.2 `Char`, written from the specification.
fn is_char(c: char) -> bool {
    matches!(c as u32, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
}

fn sanitized(s: &str) -> String {
    s.chars()
        .map(|c| if is_char(c) { c } else { '\u{FFFD}' })
        .collect()
}

/// Every `&#N;` / `&#xN;` in `xml` refers to a `Char`.
fn references_are_chars(xml: &str) -> bool {
    xml.match_indices("&#").all(|(at, _)| {
        let rest = &xml[at + 2..];
        let Some(end) = rest.find(';') else {
            return false;
        };
        let n = match rest[..end].strip_prefix('x') {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => rest[..end].parse::<u32>(),
        };
        n.ok().and_then(char::from_u32).is_some_and(is_char)
    })
}

/// Frames `stanza` after the component header: exactly one stanza, no error.
fn frame_one(stanza: &[u8]) -> Result<Stanza, String> {
    let mut f = StreamFramer::new(Limits::default());
    f.push(HEADER);
    f.push(stanza);
    let mut found = Vec::new();
    loop {
        match f.next_event() {
            Ok(Some(StreamEvent::Stanza(s))) => found.push(s),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return Err(format!("framer: {e}")),
        }
    }
    match <[_; 1]>::try_from(found) {
        Ok([s]) => Ok(s),
        Err(v) => Err(format!("{} stanzas framed", v.len())),
    }
}

/// The first stanza framed from `data` after the component header, as a relayed body.
fn relayed(data: &[u8]) -> Option<Body> {
    let mut f = StreamFramer::new(Limits::default());
    f.push(HEADER);
    f.push(data);
    loop {
        match f.next_event() {
            Ok(Some(StreamEvent::Stanza(s))) => {
                let name = match s.name() {
                    "message" => "message",
                    "presence" => "presence",
                    "iq" => "iq",
                    _ => return None,
                };
                return Some(Body::Xmpp(XmppRaw::new(name, s.bytes().clone())));
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

fn address(local: String, domain: &str, resource: Option<String>) -> Address {
    Address {
        local,
        domain: Domain::parse(domain).unwrap_or_else(|e| panic!("{domain}: {e}")),
        resource: resource.filter(|r| !r.is_empty()),
    }
}

/// How `message_text` reads character data back: outer whitespace trimmed (`children`
/// treats it as indentation), line ends compared as LF.
fn read_form(s: &str) -> String {
    s.trim().replace("\r\n", "\n").replace('\r', "\n")
}

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let [kind, flags, pick, prio] = *head;
    let mut fields = rest
        .split(|&b| b == 0xFF)
        .map(|f| String::from_utf8_lossy(f).into_owned());
    let mut field = || fields.next().unwrap_or_default();
    let opt = |bit: u8, v: String| (flags & (1 << bit) != 0).then_some(v);

    let text = field();
    let id = opt(0, field());
    let second = opt(1, field());
    let from_res = opt(2, field());
    let to_res = opt(3, field());
    let (from_local, to_local) = if flags & 0x10 != 0 {
        (field(), field())
    } else {
        ("bob".to_string(), "alice".to_string())
    };
    let from = address(from_local, "partner.com", from_res);
    let to = address(to_local, "example.com", to_res);

    let body = match kind % 5 {
        0 => Body::Message(MessageBody {
            id,
            text,
            thread: second,
            ..Default::default()
        }),
        1 => Body::Error {
            id,
            condition: CONDITIONS[usize::from(pick) % CONDITIONS.len()],
            text,
            kind: [ErrorOf::Message, ErrorOf::Presence, ErrorOf::Iq][usize::from(flags >> 5) % 3],
        },
        2 => {
            let states = &*STATES;
            let Some(state) = states.get(usize::from(pick) % states.len().max(1)) else {
                return;
            };
            Body::Presence(PresenceBody {
                system: Arc::from("xmpp"),
                state: Arc::from(state.as_str()),
                note: (flags & 0x20 != 0).then_some(text),
                priority: (flags & 0x40 != 0).then_some(prio as i8),
            })
        }
        3 => Body::Subscription(SUBSCRIPTIONS[usize::from(pick) % SUBSCRIPTIONS.len()]),
        _ => match relayed(rest) {
            Some(b) => b,
            None => return,
        },
    };
    let env = Envelope { from, to, body, stanza_id: None, via_cluster: None };

    let mut out = Vec::new();
    if let Err(e) = envelope_to_stanza(&env, &MAPS, &mut out) {
        panic!("encoder refused {env:?}: {e}");
    }
    let xml = match std::str::from_utf8(&out) {
        Ok(x) => x,
        Err(e) => panic!("not UTF-8 ({e}): {out:?}"),
    };
    assert!(xml.chars().all(is_char), "non-Char in {xml:?}");
    assert!(
        references_are_chars(xml),
        "reference to a non-Char in {xml:?}"
    );
    let framed = match frame_one(&out) {
        Ok(s) => s,
        Err(e) => panic!("{e}: {xml:?}"),
    };

    if let Body::Xmpp(raw) = &env.body {
        // A relayed stanza is its own bytes, with only U+FFFE/U+FFFF replaced in place.
        assert_eq!(framed.name(), raw.name);
        assert_eq!(out.len(), raw.bytes.len());
        return;
    }
    assert!(!xml.contains("]]>"), "`]]>` in character data: {xml:?}");
    let want_from = sanitized(&env.from.to_string());
    let want_to = sanitized(&env.to.to_string());
    assert_eq!(
        framed.from().as_deref(),
        Some(want_from.as_str()),
        "{xml:?}"
    );
    assert_eq!(framed.to().as_deref(), Some(want_to.as_str()), "{xml:?}");
    let want_id = match &env.body {
        Body::Message(m) => m.id.as_deref().map(sanitized),
        Body::Error { id, .. } => id.as_deref().map(sanitized),
        _ => None,
    };
    assert_eq!(framed.id().map(|s| s.into_owned()), want_id, "{xml:?}");
    if let Body::Message(m) = &env.body {
        assert_eq!(framed.name(), "message");
        let raw = XmppRaw::new("message", out.clone().into());
        let Some(read) = message_text(&raw) else {
            panic!("no body read back from {xml:?}");
        };
        assert_eq!(
            read_form(&read.text),
            read_form(&sanitized(&m.text)),
            "{xml:?}"
        );
        assert_eq!(
            read.thread.as_deref().map(read_form),
            m.thread.as_deref().map(|t| read_form(&sanitized(t))),
            "{xml:?}"
        );
    }
});
