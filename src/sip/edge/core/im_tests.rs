//! Machine tests of the RFC 7247 / RFC 7572 behaviour of the IM paths (see `im.rs`).

use super::tests::{bounced, core, dom, env, hub, hv, msg, peer, sent};
use super::*;
use crate::gateway::envelope::{ErrorOf, MessageKind};
use std::cell::RefCell;

fn pager(ruri: &str, from: &str, extra: &str) -> SipMessage {
    msg(&format!(
        "MESSAGE {ruri} SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKp1\n\
Max-Forwards: 70\n\
From: <{from}>;tag=p\n\
To: <{ruri}>\n\
Call-ID: pager-call-1\n\
CSeq: 1 MESSAGE\n\
{extra}Content-Type: text/plain\n\
Content-Length: 2\n\nhi"
    ))
}

fn status(c: &mut Core) -> Option<u16> {
    sent(c).iter().find_map(|m| m.status())
}

/// RFC 7572 §4: a pager MESSAGE is a `normal` message whose thread is the Call-ID, with its
/// Subject and language; RFC 7247 §6: the user part is decoded and XEP-0106-escaped, the GRUU
/// becomes the resource.
#[test]
fn pager_message_carries_rfc7572_facts_and_rfc7247_addresses() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(
        &h,
        &peer(),
        pager(
            "sip:alice@example.com",
            "sip:O'Malley@partner.com;gr=urn:uuid:1",
            "Subject: Lunch\nContent-Language: fr, en\n",
        ),
        t0,
    );
    assert_eq!(status(&mut c), Some(200));
    let got = h.got.borrow();
    let e = got.first().expect("submitted");
    assert_eq!(e.from.to_string(), "o\\27malley@partner.com/urn:uuid:1");
    assert_eq!(
        e.body,
        Body::Message(MessageBody {
            id: None,
            text: "hi".into(),
            thread: Some("pager-call-1".into()),
            kind: MessageKind::Normal,
            subject: Some("Lunch".into()),
            lang: Some("fr".into()),
        })
    );
}

/// RFC 7247 §8: neither a `sips:` Request-URI nor a `sips:` sender is translated.
#[test]
fn sips_is_refused_with_416() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    for (ruri, from) in [
        ("sips:alice@example.com", "sip:bob@partner.com"),
        ("sip:alice@example.com", "sips:bob@partner.com"),
    ] {
        c.handle_message(&h, &peer(), pager(ruri, from, ""), t0);
        assert_eq!(status(&mut c), Some(416), "{ruri} {from}");
    }
    assert!(h.got.borrow().is_empty());
}

/// XMPP → SIP: the full JID's resource is the GRUU of the INVITE; the thread is its Call-ID;
/// the subject and language travel as headers of the MESSAGE in the session.
#[test]
fn outbound_session_uses_gruu_thread_subject_and_language() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let body = Body::Message(MessageBody {
        id: Some("x1".into()),
        text: "hello".into(),
        thread: Some("thread-0123456789".into()),
        kind: MessageKind::Chat,
        subject: Some("Re:\r\nInjected: yes".into()),
        lang: Some("de".into()),
    });
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "o\\27brien@example.com/desk",
            "bob@partner.com/urn:uuid:7",
            body,
        ),
        t0,
    );
    let inv = sent(&mut c).remove(0);
    assert_eq!(
        inv.request_uri()
            .and_then(Result::ok)
            .map(|u| u.as_str().to_owned()),
        Some("sip:bob@partner.com;gr=urn:uuid:7".to_owned())
    );
    assert_eq!(inv.call_id().ok(), Some("thread-0123456789"));
    assert!(hv(&inv, "From").is_some_and(|f| f.starts_with("<sip:o'brien@example.com>")));
    let ok = inv.build_response(200, "OK", Some("t1")).expect("resp");
    c.handle_message(&h, &peer(), ok, t0);
    let out = sent(&mut c);
    let m = out
        .iter()
        .find(|m| m.method() == Some("MESSAGE"))
        .expect("the queued MESSAGE");
    assert_eq!(hv(m, "Subject"), Some("Re:  Injected: yes"));
    assert_eq!(hv(m, "Content-Language"), Some("de"));
}

/// A thread that cannot be a Call-ID (too short, characters a peer could mis-parse) gets a
/// fresh one; a language that is no tag is not sent.
#[test]
fn unusable_threads_and_languages_are_not_copied() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    for (i, thread) in ["t1", "a b c d e f g h", "x;y=zzzzzzzz", "<evil>@@host"]
        .into_iter()
        .enumerate()
    {
        let body = Body::Message(MessageBody {
            text: "x".into(),
            thread: Some(thread.into()),
            lang: Some("en\r\nX: y".into()),
            ..Default::default()
        });
        c.handle_delivery(
            &h,
            &dom(),
            env("alice@example.com", &format!("u{i}@partner.com"), body),
            t0,
        );
        let inv = sent(&mut c).remove(0);
        assert_ne!(inv.call_id().ok(), Some(thread));
        assert!(hv(&inv, "Content-Language").is_none());
    }
}

/// An XMPP message error arriving after the pager MESSAGE was answered becomes a notice to the
/// SIP sender naming the condition and its RFC 7247 §7.1 status; presence errors do not.
#[test]
fn late_message_errors_become_a_notice() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let err = |kind| Body::Error {
        id: None,
        condition: ErrorCondition::RecipientUnavailable,
        text: "offline".into(),
        kind,
    };
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com/pc",
            "bob@partner.com",
            err(ErrorOf::Presence),
        ),
        t0,
    );
    assert!(sent(&mut c).is_empty());
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com/pc",
            "bob@partner.com",
            err(ErrorOf::Message),
        ),
        t0,
    );
    let inv = sent(&mut c).remove(0);
    assert_eq!(inv.method(), Some("INVITE"));
    let s = c.sessions.values().next().expect("a session");
    let notice = s.queue.front().expect("the notice waits for the session");
    assert_eq!(notice.kind, MessageKind::Normal);
    assert_eq!(
        notice.text,
        "Message not delivered to alice@example.com: recipient-unavailable \
         (480 Temporarily Unavailable): offline"
    );
    assert!(bounced(&h).is_empty());
}

/// SIP → XMPP errors follow RFC 7247 §7.2 (480, 486, 603 and a 5xx are the rows that used to
/// differ) and the bounce keeps the message id, addressed to the writer's resource.
#[test]
fn sip_failures_bounce_with_the_rfc7247_condition() {
    for (code, want) in [
        (480, ErrorCondition::RecipientUnavailable),
        (486, ErrorCondition::RecipientUnavailable),
        (603, ErrorCondition::ServiceUnavailable),
        (500, ErrorCondition::InternalServerError),
        (599, ErrorCondition::InternalServerError),
    ] {
        let h = hub();
        let mut c = core();
        let t0 = Instant::now();
        c.handle_delivery(
            &h,
            &dom(),
            env(
                "alice@example.com/pc",
                "bob@partner.com",
                Body::Message(MessageBody {
                    id: Some("m9".into()),
                    text: "x".into(),
                    ..Default::default()
                }),
            ),
            t0,
        );
        let inv = sent(&mut c).remove(0);
        let no = inv.build_response(code, "No", Some("t")).expect("resp");
        c.handle_message(&h, &peer(), no, t0);
        let got = h.got.borrow();
        let e = got.last().expect("bounce");
        assert_eq!(e.to.to_string(), "alice@example.com/pc");
        assert!(
            matches!(&e.body, Body::Error { id: Some(i), condition, .. } if i == "m9" && *condition == want),
            "{code}: {e:?}"
        );
    }
}

/// An address that cannot be read is answered with why (RFC 7247 §6): bad UTF-8 after
/// percent-decoding, a control character.
#[test]
fn unreadable_addresses_get_400_with_a_reason() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    for from in ["sip:a%C3@partner.com", "sip:a%07b@partner.com"] {
        c.handle_message(&h, &peer(), pager("sip:alice@example.com", from, ""), t0);
        let r = sent(&mut c).into_iter().find(|m| m.status().is_some());
        let r = r.expect("an answer");
        assert_eq!(
            (r.status(), r.reason()),
            (Some(400), Some("Bad Request (Address)")),
            "{from}"
        );
    }
    assert!(h.got.borrow().is_empty());
}

/// An established session is one store record (written when its dialog exists, deleted when it
/// ends); another core restores it — a cluster node taking over a dead one, or a restart — and
/// sends the local user's next message inside the partner's dialog, with a CSeq above any
/// the old owner used (RFC 3261 §12.2.1.1), announcing itself as the session's owner.
#[test]
fn a_stored_session_is_restored_and_used_by_another_core() {
    use super::persist::StoreOp;
    use super::tests::im_invite;
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let wall = std::time::SystemTime::now();
    c.handle_message(&h, &peer(), im_invite("st1", "bob", "z9hG4bKst1"), t0);
    let ok = sent(&mut c).into_iter().find(|m| m.status() == Some(200));
    let our_tag = ok
        .as_ref()
        .and_then(|m| m.to().ok())
        .and_then(|t| t.tag().map(str::to_owned))
        .expect("200 with our tag");
    let ops = c.take_store_ops(t0, wall, true);
    let (key, value) = ops
        .iter()
        .find_map(|o| match o {
            StoreOp::Put { key, value } if key.starts_with("sip/i/") => Some((key, value)),
            _ => None,
        })
        .expect("a session record");
    assert_eq!(key, &format!("sip/i/{our_tag}/b/st1"));

    let mut other = core();
    other.publish_sessions(true);
    assert_eq!(
        other.restore_record(&h, key, value, t0, wall),
        persist::Restored::Session
    );
    let owned = std::iter::from_fn(|| other.poll_action()).any(|a| {
        a == Action::SessionOwner {
            local: "alice@example.com".into(),
            remote: "bob@partner.com".into(),
            owned: true,
        }
    });
    assert!(owned, "the restoring core says it owns the session");
    other.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com/desk",
            "bob@partner.com",
            Body::Message(MessageBody {
                text: "still here".into(),
                ..Default::default()
            }),
        ),
        t0,
    );
    let out = sent(&mut other);
    let m = out
        .iter()
        .find(|m| m.method() == Some("MESSAGE"))
        .expect("a MESSAGE in the restored dialog");
    assert_eq!(m.call_id().ok(), Some("st1"));
    assert_eq!(
        m.from().ok().and_then(|f| f.tag().map(str::to_owned)),
        Some(our_tag.clone())
    );
    assert_eq!(
        m.to().ok().and_then(|t| t.tag().map(str::to_owned)),
        Some("b".into())
    );
    assert!(
        m.cseq().map(|c| c.seq).unwrap_or(0) > 10_000,
        "{:?}",
        m.cseq()
    );
    assert!(
        !out.iter().any(|m| m.method() == Some("INVITE")),
        "no second session"
    );

    // The first core's session ends (the partner's BYE): its record is deleted.
    c.handle_message(
        &h,
        &peer(),
        msg(&format!(
            "BYE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKst2\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=b\n\
To: <sip:alice@example.com>;tag={our_tag}\n\
Call-ID: st1\n\
CSeq: 2 BYE\n\
Content-Length: 0\n\n"
        )),
        t0,
    );
    assert_eq!(status(&mut c), Some(200));
    let ops = c.take_store_ops(t0, wall, true);
    assert!(
        ops.contains(&StoreOp::Delete { key: key.clone() }),
        "{ops:?}"
    );
    // A record for a pair that has a live session, or unreadable, is dropped and deleted.
    assert_eq!(
        other.restore_record(&h, key, value, t0, wall),
        persist::Restored::Dropped
    );
    assert_eq!(
        other.restore_record(&h, "sip/i/x/y/z", b"[1,", t0, wall),
        persist::Restored::Dropped
    );
    let ops = other.take_store_ops(t0, wall, true);
    assert!(
        ops.contains(&StoreOp::Delete {
            key: "sip/i/x/y/z".into()
        }),
        "{ops:?}"
    );
}

/// A hub whose component link tells when it wrote (the real hub for `Link::Component`): the
/// test keeps each `Handled` and fires or drops it itself.
struct TellingHub {
    inner: super::tests::FakeHub,
    handled: RefCell<Vec<Handled>>,
}

impl HubPort for TellingHub {
    fn submit(&self, domain: &Domain, env: Envelope) -> Submitted {
        self.inner.submit(domain, env)
    }
    fn submit_handled(
        &self,
        domain: &Domain,
        env: Envelope,
        handled: Handled,
    ) -> (Submitted, bool) {
        self.handled.borrow_mut().push(handled);
        (self.inner.submit(domain, env), true)
    }
    fn config(&self) -> Arc<Config> {
        self.inner.config()
    }
    fn maps(&self) -> Arc<MappingSet> {
        self.inner.maps()
    }
}

/// Issue 12 (nothing accepted is lost): a MESSAGE is answered 200 only once the home node's
/// link wrote it, 503 when it was lost before (the sender may send it again), 202 when it is
/// still queued after the wait (accepted for delivery, RFC 3428 §7); nothing before.
#[test]
fn a_message_is_answered_when_its_link_wrote_it_not_when_queued() {
    let h = TellingHub {
        inner: hub(),
        handled: RefCell::new(Vec::new()),
    };
    let mut c = core();
    let mut told = c.handover_channel();
    let t0 = Instant::now();
    for call in ["written", "lost", "queued"] {
        let text = format!(
            "MESSAGE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bK{call}\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=p\n\
To: <sip:alice@example.com>\n\
Call-ID: {call}\n\
CSeq: 1 MESSAGE\n\
Content-Type: text/plain\n\
Content-Length: 2\n\nhi"
        );
        c.handle_message(&h, &peer(), msg(&text), t0);
        assert_eq!(
            status(&mut c),
            None,
            "{call}: no answer while the link has it queued"
        );
    }
    assert_eq!(
        h.inner.got.borrow().len(),
        3,
        "all three were handed to the hub"
    );
    assert_eq!(c.poll_timeout(), Some(t0 + HANDOVER_WAIT));
    let mut handled = h.handled.take();
    assert_eq!(handled.len(), 3);
    let queued = handled.pop();
    drop(handled.pop()); // lost with its connection: dropped untold
    if let Some(written) = handled.pop() {
        written.done();
        written.done(); // told once only
    }
    let mut codes = Vec::new();
    while let Ok((token, written)) = told.try_recv() {
        let outcome = if written {
            Handover::Written
        } else {
            Handover::Lost
        };
        c.handle_handover(token, outcome, t0);
        codes.push(status(&mut c));
    }
    codes.sort();
    assert_eq!(codes, [Some(200), Some(503)]);
    // The third is still queued at the deadline: accepted for delivery.
    c.handle_timeout(&h, t0 + HANDOVER_WAIT);
    assert_eq!(status(&mut c), Some(202));
    // Told late (written after all), it is not answered twice.
    if let Some(q) = queued {
        q.done();
    }
    let (token, written) = told.try_recv().expect("told");
    assert!(written);
    c.handle_handover(token, Handover::Written, t0 + HANDOVER_WAIT);
    assert_eq!(status(&mut c), None);
}
