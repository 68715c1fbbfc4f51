//! Machine tests of the Lync batched notifier and of resource aggregation for SIP watchers.

use super::*;
use crate::presence::codec::{msrtc, rlmi};

const BATCH_BODY: &str =
    include_str!("../../../../../tests/data/sip/lync-batched/subscribe-three.sip");

/// The batched SUBSCRIBE kept under tests/data, filled in for `bob@partner.com`.
fn batch_subscribe(call: &str, contacts: &[&str], piggyback: bool, expires: u32) -> SipMessage {
    let resources: String = contacts
        .iter()
        .map(|c| format!("<resource uri=\"sip:{c}\"/>"))
        .collect();
    let text = BATCH_BODY
        .replace("{watcher}", "bob@partner.com")
        .replace("{branch}", &format!("z9hG4bK{call}"))
        .replace("{tag}", "bt")
        .replace("{call_id}", call)
        .replace(
            "{piggyback}",
            if piggyback {
                "ms-piggyback-first-notify"
            } else {
                "com.microsoft.autoextend"
            },
        )
        .replace("Expires: 3600", &format!("Expires: {expires}"))
        .replace("{resources}", &resources);
    let (head, body) = text.split_once("\n\n").expect("head and body");
    let body = body.trim_end();
    let head = head.replace("{CL}", &body.len().to_string());
    msg(&format!("{head}\n\n{body}"))
}

trait WithBody {
    fn with_body_for_test(self, body: &str) -> SipMessage;
}

impl WithBody for SipMessage {
    fn with_body_for_test(mut self, body: &str) -> SipMessage {
        self.set_body(bytes::Bytes::copy_from_slice(body.as_bytes()))
            .expect("body");
        self
    }
}

/// The RLMI list and the msrtc availability per resource URI of a multipart message.
fn rlmi_of(m: &SipMessage) -> (rlmi::List, Vec<(String, Option<u32>)>) {
    let ct = hv(m, "Content-Type").expect("content type");
    assert!(ct.starts_with("multipart/related"), "{ct}");
    let parts = rlmi::decode_related(ct, m.body()).expect("multipart");
    let first = parts.first().expect("rlmi part");
    assert_eq!(first.content_type, rlmi::RLMI_CONTENT_TYPE);
    let list = rlmi::decode_rlmi(&first.body).expect("rlmi");
    let mut states = Vec::new();
    for r in &list.resources {
        let cid = r.instances.first().and_then(|i| i.cid.clone());
        let av = cid.and_then(|c| {
            parts
                .iter()
                .find(|p| p.content_id == c)
                .map(|p| msrtc::decode_msrtc(&p.body).expect("msrtc").availability)
        });
        states.push((r.uri.clone(), av.flatten()));
    }
    (list, states)
}

fn presence_with_note(state: &str, note: Option<&str>) -> Body {
    Body::Presence(crate::gateway::PresenceBody {
        system: "lync".into(),
        state: state.into(),
        note: note.map(str::to_string),
        priority: None,
    })
}

const THREE: [&str; 3] = ["alice@example.com", "carol@example.com", "dave@example.com"];

#[test]
fn batched_subscribe_piggybacks_full_state_then_coalesces_changes() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let mut contacts = THREE.to_vec();
    contacts.push("zed@elsewhere.test");
    c.handle_message(
        &h,
        &peer(),
        batch_subscribe("b1", &contacts, true, 3600),
        t0,
    );
    let out = sent(&mut c);
    assert_eq!(out.len(), 1, "the first NOTIFY rides in the 200 OK");
    let ok = &out[0];
    assert_eq!(ok.status(), Some(200));
    assert_eq!(hv(ok, "ms-piggyback-cseq"), Some("1"));
    assert_eq!(hv(ok, "Require"), Some("eventlist"));
    assert!(hv(ok, "Subscription-State").is_some_and(|s| s.starts_with("active")));
    let (list, _) = rlmi_of(ok);
    assert!(list.full_state);
    assert_eq!(list.version, 0);
    assert_eq!(list.uri, "sip:bob@partner.com");
    let states: Vec<_> = list
        .resources
        .iter()
        .map(|r| {
            (
                r.uri.as_str(),
                r.instances[0].state,
                r.instances[0].reason.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("sip:alice@example.com", rlmi::InstanceState::Pending, None),
            ("sip:carol@example.com", rlmi::InstanceState::Pending, None),
            ("sip:dave@example.com", rlmi::InstanceState::Pending, None),
            (
                "sip:zed@elsewhere.test",
                rlmi::InstanceState::Terminated,
                Some("noresource")
            ),
        ]
    );
    // One subscription per local contact went to the home side, none for the foreign one.
    let asked: Vec<String> = h
        .got
        .borrow()
        .iter()
        .filter(|e| e.body == Body::Subscription(Subscription::Subscribe))
        .map(|e| e.to.bare_string())
        .collect();
    assert_eq!(asked, THREE);

    // The home node answers the three at once: one partial NOTIFY after the coalescing delay.
    for (who, state) in THREE.iter().zip(["available", "busy", "away"]) {
        let mut e = env(
            &format!("{who}/desk"),
            "bob@partner.com",
            lync_presence(state),
        );
        e.from.resource = Some("desk".into());
        c.handle_delivery(&h, &dom(), e, t0);
    }
    assert!(sent(&mut c).is_empty(), "changes wait to be coalesced");
    c.handle_timeout(&h, t0 + super::super::batch::COALESCE);
    let out = sent(&mut c);
    assert_eq!(out.len(), 1, "one NOTIFY for three changes");
    let n = &out[0];
    assert_eq!(n.method(), Some("NOTIFY"));
    assert_eq!(
        n.cseq().map(|c| c.seq).ok(),
        Some(2),
        "after the piggy-backed 1"
    );
    assert_eq!(hv(n, "Require"), Some("eventlist"));
    let (list, states) = rlmi_of(n);
    assert!(!list.full_state);
    assert_eq!(list.version, 1);
    assert_eq!(
        states,
        [
            ("sip:alice@example.com".to_string(), Some(3500)),
            ("sip:carol@example.com".to_string(), Some(6500)),
            ("sip:dave@example.com".to_string(), Some(15500)),
        ]
    );

    // A later change of one contact: a NOTIFY with that resource only.
    let mut e = env(
        "carol@example.com/desk",
        "bob@partner.com",
        lync_presence("away"),
    );
    e.from.resource = Some("desk".into());
    c.handle_delivery(&h, &dom(), e, t0 + Duration::from_secs(5));
    c.handle_timeout(&h, t0 + Duration::from_secs(6));
    let out = sent(&mut c);
    let (list, states) = rlmi_of(out.first().expect("NOTIFY"));
    assert_eq!(list.version, 2);
    assert_eq!(states, [("sip:carol@example.com".to_string(), Some(15500))]);
    assert_eq!(c.batch_count(), 1);
}

#[test]
fn without_piggyback_a_full_state_notify_follows_the_200() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), batch_subscribe("b2", &THREE, false, 3600), t0);
    let out = sent(&mut c);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].status(), Some(200));
    assert!(out[0].body().is_empty());
    assert_eq!(out[1].method(), Some("NOTIFY"));
    let (list, _) = rlmi_of(&out[1]);
    assert!(list.full_state);
    assert_eq!(list.resources.len(), 3);
}

/// Polite blocking (requirements §3): a user's refusal keeps the member active and offline,
/// never `terminated;reason=rejected`.
#[test]
fn refused_member_stays_active_offline_and_unsubscribe_ends_the_dialog() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), batch_subscribe("b3", &THREE, true, 3600), t0);
    let ok = sent(&mut c).remove(0);
    let to_tag = ok
        .to()
        .ok()
        .and_then(|t| t.tag().map(str::to_string))
        .expect("tag");
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "carol@example.com",
            "bob@partner.com",
            Body::Subscription(Subscription::Unsubscribed),
        ),
        t0,
    );
    c.handle_timeout(&h, t0 + super::super::batch::COALESCE);
    let out = sent(&mut c);
    let (list, states) = rlmi_of(out.first().expect("NOTIFY"));
    assert_eq!(list.resources.len(), 1);
    assert_eq!(
        list.resources[0].instances[0].state,
        rlmi::InstanceState::Active
    );
    assert!(
        states[0].1.is_some_and(|a| a >= 18000),
        "shown offline: {states:?}"
    );

    // Un-SUBSCRIBE: 200, a terminated NOTIFY, and the home side is told per member, as
    // unavailable presence (RFC 8048 §5.3.3), never `unsubscribe`.
    h.got.borrow_mut().clear();
    let unsub = format!(
        "SUBSCRIBE sip:bob@partner.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKu3\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=bt\n\
To: <sip:bob@partner.com>;tag={to_tag}\n\
Call-ID: b3\n\
CSeq: 2 SUBSCRIBE\n\
Event: presence\n\
Expires: 0\n\
Content-Length: 0\n\n"
    );
    c.handle_message(&h, &peer(), msg(&unsub), t0 + Duration::from_secs(10));
    let out = sent(&mut c);
    assert_eq!(out[0].status(), Some(200));
    let n = out.get(1).expect("terminated NOTIFY");
    assert!(hv(n, "Subscription-State").is_some_and(|s| s.starts_with("terminated")));
    let (list, _) = rlmi_of(n);
    assert!(list
        .resources
        .iter()
        .all(|r| r.instances[0].state == rlmi::InstanceState::Terminated));
    assert_eq!(c.batch_count(), 0);
    let told: Vec<String> = h
        .got
        .borrow()
        .iter()
        .filter(|e| matches!(&e.body, Body::Presence(p) if &*p.state == "offline"))
        .map(|e| e.to.bare_string())
        .collect();
    assert_eq!(told, THREE);
    assert!(h
        .got
        .borrow()
        .iter()
        .all(|e| e.body != Body::Subscription(Subscription::Unsubscribe)));
}

#[test]
fn batch_expires_like_a_single_subscription() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), batch_subscribe("b4", &THREE, true, 60), t0);
    let _ = sent(&mut c);
    c.handle_timeout(&h, t0 + Duration::from_secs(61));
    let out = sent(&mut c);
    let n = out.first().expect("terminated NOTIFY");
    assert_eq!(
        hv(n, "Subscription-State"),
        Some("terminated;reason=timeout")
    );
    assert_eq!(c.batch_count(), 0);
}

#[test]
fn batch_refusals_are_specific() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let many: Vec<String> = (0..=super::super::batch::MAX_BATCH_RESOURCES)
        .map(|i| format!("u{i}@example.com"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    c.handle_message(&h, &peer(), batch_subscribe("b5", &many, true, 3600), t0);
    let r = sent(&mut c).remove(0);
    assert_eq!(r.status(), Some(413));
    assert!(r.reason().is_some_and(|x| x.contains("1000")));

    let bad = batch_subscribe("b6", &THREE, true, 3600).with_body_for_test("<batchSub/>");
    c.handle_message(&h, &peer(), bad, t0);
    assert_eq!(sent(&mut c).remove(0).status(), Some(400));

    // RFC 4662 §4.3: no `eventlist` support, no RLMI: 421 naming it.
    let text = String::from_utf8_lossy(&batch_subscribe("b12", &THREE, true, 3600).to_bytes())
        .replace("Supported: eventlist\r\n", "");
    c.handle_message(
        &h,
        &peer(),
        parse_datagram(text.as_bytes()).expect("parses"),
        t0,
    );
    let r = sent(&mut c).remove(0);
    assert_eq!(r.status(), Some(421));
    assert_eq!(hv(&r, "Require"), Some("eventlist"));

    // A batch for someone else's list is not what a Lync edge sends.
    let text = String::from_utf8_lossy(&batch_subscribe("b7", &THREE, true, 3600).to_bytes())
        .replace(
            "SUBSCRIBE sip:bob@partner.com",
            "SUBSCRIBE sip:alice@example.com",
        )
        .replace("branch=z9hG4bKb7", "branch=z9hG4bKb7x");
    c.handle_message(
        &h,
        &peer(),
        parse_datagram(text.as_bytes()).expect("parses"),
        t0,
    );
    assert_eq!(sent(&mut c).remove(0).status(), Some(403));
    assert_eq!(c.batch_count(), 0);
}

#[test]
fn persisted_batches_are_plain_data() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), batch_subscribe("b8", &THREE, true, 3600), t0);
    let p = c.persisted_batches(t0, 1_000_000);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].expires_unix, 1_003_600);
    assert_eq!(p[0].members.len(), 3);
    let json = serde_json::to_string(&p).expect("serialises");
    let back: Vec<PersistedBatch> = serde_json::from_str(&json).expect("deserialises");
    assert_eq!(back, p);
}

/// Issue 11: desktop "dnd / Busy thing" and phone "Free"; the phone signs off; the single
/// watcher's NOTIFY still says busy with the desktop's note.
#[test]
fn a_second_device_signing_off_leaves_the_first_visible() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let sub = subscribe_text(3600).replace(
        "Event: presence\n",
        "Event: presence\nAccept: application/msrtc-event-categories+xml\n",
    );
    c.handle_message(&h, &peer(), msg(&sub), t0);
    let _ = sent(&mut c);
    let send = |c: &mut Core, res: &str, state: &str, note: Option<&str>| {
        let mut e = env(
            "alice@example.com",
            "bob@partner.com",
            presence_with_note(state, note),
        );
        e.from.resource = Some(res.into());
        c.handle_delivery(&h, &dom(), e, t0);
        sent(c)
    };
    send(&mut c, "desktop", "busy", Some("Busy thing"));
    let out = send(&mut c, "phone", "available", Some("Free"));
    let body = msrtc::decode_msrtc(out.last().expect("NOTIFY").body()).expect("msrtc");
    assert_eq!(body.availability, Some(3500));
    let out = send(&mut c, "phone", "offline", None);
    let body = msrtc::decode_msrtc(out.last().expect("NOTIFY").body()).expect("msrtc");
    assert_eq!(body.availability, Some(6500), "busy, not offline");
    assert_eq!(body.note.as_deref(), Some("Busy thing"));
    let out = send(&mut c, "desktop", "offline", None);
    let body = msrtc::decode_msrtc(out.last().expect("NOTIFY").body()).expect("msrtc");
    assert!(body.availability.is_some_and(|a| a >= 18000), "{body:?}");
}

/// The resource table holds users someone watches: when the last watcher (single or batched)
/// goes, the user's entry goes too.
#[test]
fn resources_of_unwatched_users_are_forgotten() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), batch_subscribe("b9", &THREE, true, 3600), t0);
    let ok = sent(&mut c).remove(0);
    let to_tag = ok
        .to()
        .ok()
        .and_then(|t| t.tag().map(str::to_string))
        .expect("tag");
    for who in THREE {
        let mut e = env(who, "bob@partner.com", lync_presence("busy"));
        e.from.resource = Some("desk".into());
        c.handle_delivery(&h, &dom(), e, t0);
    }
    assert_eq!(c.resources.len(), 3);
    assert_eq!(c.batches.members, 3);
    let unsub = format!(
        "SUBSCRIBE sip:bob@partner.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKu9\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=bt\n\
To: <sip:bob@partner.com>;tag={to_tag}\n\
Call-ID: b9\n\
CSeq: 2 SUBSCRIBE\n\
Event: presence\n\
Expires: 0\n\
Content-Length: 0\n\n"
    );
    c.handle_message(&h, &peer(), msg(&unsub), t0);
    assert_eq!(c.batch_count(), 0);
    assert_eq!(c.batches.members, 0);
    assert!(c.resources.is_empty(), "no watcher left, nothing kept");
}

fn in_dialog(call: &str, to_tag: &str, cseq: u32, action: &str, contacts: &[&str]) -> SipMessage {
    let resources: String = contacts
        .iter()
        .map(|c| format!("<resource uri=\"sip:{c}\"/>"))
        .collect();
    let body = format!(
        "<batchSub xmlns=\"http://schemas.microsoft.com/2006/01/sip/batch-subscribe\" uri=\"sip:bob@partner.com\" name=\"\"><action name=\"{action}\" id=\"9\"><adhocList>{resources}</adhocList><categoryList xmlns=\"http://schemas.microsoft.com/2006/09/sip/categorylist\"><category name=\"state\"/></categoryList></action></batchSub>"
    );
    msg(&format!(
        "SUBSCRIBE sip:bob@partner.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bK{call}{cseq}\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=bt\n\
To: <sip:bob@partner.com>;tag={to_tag}\n\
Call-ID: {call}\n\
CSeq: {cseq} SUBSCRIBE\n\
Event: presence\n\
Expires: 3600\n\
Content-Type: application/msrtc-adrl-categorylist+xml\n\
Content-Length: {}\n\n{body}",
        body.len()
    ))
}

/// An in-dialog batchSub adds contacts (each asking its home node) or removes them (the home
/// node told, unless another dialog still watches the pair); the refresh's NOTIFY is full state.
#[test]
fn in_dialog_batch_sub_adds_and_removes_contacts() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(
        &h,
        &peer(),
        batch_subscribe("b10", &THREE[..1], true, 3600),
        t0,
    );
    let ok = sent(&mut c).remove(0);
    let to_tag = ok
        .to()
        .ok()
        .and_then(|t| t.tag().map(str::to_string))
        .expect("tag");
    h.got.borrow_mut().clear();

    c.handle_message(
        &h,
        &peer(),
        in_dialog("b10", &to_tag, 2, "subscribe", &THREE),
        t0,
    );
    let out = sent(&mut c);
    assert_eq!(out[0].status(), Some(200));
    let (list, _) = rlmi_of(out.get(1).expect("full-state NOTIFY"));
    assert!(list.full_state);
    assert_eq!(list.resources.len(), 3);
    let asked: Vec<String> = h.got.borrow().iter().map(|e| e.to.bare_string()).collect();
    assert_eq!(asked, THREE[1..], "only the new contacts are asked");
    assert_eq!(c.batches.members, 3);

    h.got.borrow_mut().clear();
    c.handle_message(
        &h,
        &peer(),
        in_dialog("b10", &to_tag, 3, "unsubscribe", &THREE[..2]),
        t0,
    );
    let out = sent(&mut c);
    assert_eq!(out[0].status(), Some(200));
    let (list, _) = rlmi_of(out.get(1).expect("full-state NOTIFY"));
    assert_eq!(list.resources.len(), 1);
    assert_eq!(list.resources[0].uri, "sip:dave@example.com");
    let told: Vec<(String, String)> = h
        .got
        .borrow()
        .iter()
        .map(|e| match &e.body {
            Body::Presence(p) => (e.to.bare_string(), p.state.to_string()),
            other => (e.to.bare_string(), format!("{other:?}")),
        })
        .collect();
    assert_eq!(
        told,
        [
            (THREE[0].to_string(), "offline".to_string()),
            (THREE[1].to_string(), "offline".to_string()),
        ]
    );
    assert_eq!(c.batches.members, 1);
    assert!(!c
        .batches
        .watches(&("bob@partner.com".into(), THREE[0].into())));
}

/// A single subscription ending does not revoke the pair while a batch still watches it.
#[test]
fn single_end_keeps_a_pair_a_batch_still_watches() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(
        &h,
        &peer(),
        batch_subscribe("b11", &THREE[..1], true, 3600),
        t0,
    );
    c.handle_message(&h, &peer(), msg(&subscribe_text(60)), t0);
    let _ = sent(&mut c);
    h.got.borrow_mut().clear();
    c.handle_timeout(&h, t0 + Duration::from_secs(61));
    assert!(
        h.got.borrow().is_empty(),
        "the home side is told nothing: {:?}",
        h.got.borrow()
    );
}

/// A consent change for a whole domain (the admin's `legate policy block USER DOMAIN`) reaches
/// every batch of that domain's watchers with a member for the user.
#[test]
fn domain_wide_consent_change_reaches_batches() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), batch_subscribe("b13", &THREE, true, 3600), t0);
    let _ = sent(&mut c);
    let mut e = env(
        "carol@example.com",
        "bob@partner.com",
        Body::Subscription(Subscription::Unsubscribed),
    );
    e.to = crate::gateway::policy::domain_wide(&dom());
    c.handle_delivery(&h, &dom(), e, t0);
    c.handle_timeout(&h, t0 + super::super::batch::COALESCE);
    let out = sent(&mut c);
    let (list, _) = rlmi_of(out.first().expect("NOTIFY"));
    assert_eq!(list.resources.len(), 1);
    assert_eq!(list.resources[0].uri, "sip:carol@example.com");
}

/// Two batches of one watcher share the pairs: a change reaches both.
#[test]
fn two_batches_of_one_watcher_both_hear_a_change() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), batch_subscribe("b14", &THREE, true, 3600), t0);
    for who in THREE {
        c.handle_delivery(
            &h,
            &dom(),
            env(
                who,
                "bob@partner.com",
                Body::Subscription(Subscription::Subscribed),
            ),
            t0,
        );
    }
    c.handle_timeout(&h, t0 + Duration::from_secs(1));
    let _ = sent(&mut c);
    let t1 = t0 + Duration::from_secs(2);
    c.handle_message(&h, &peer(), batch_subscribe("b15", &THREE, false, 3600), t1);
    let out = sent(&mut c);
    assert_eq!(out.len(), 2, "200 and the full-state NOTIFY");
    let mut e = env(
        "carol@example.com/desk",
        "bob@partner.com",
        lync_presence("away"),
    );
    e.from.resource = Some("desk".into());
    c.handle_delivery(&h, &dom(), e, t1);
    let due = c.poll_timeout().expect("a timer");
    assert!(due <= t1 + super::super::batch::COALESCE, "flush is armed");
    c.handle_timeout(&h, t1 + super::super::batch::COALESCE);
    let calls: Vec<String> = sent(&mut c)
        .iter()
        .map(|m| m.call_id().expect("call-id").to_string())
        .collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls.contains(&"b14".to_string()) && calls.contains(&"b15".to_string()));
}

/// A home node repeating a presence (or answering another dialog's subscription) makes no
/// NOTIFY: a partial RLMI document leaves out members whose content is unchanged.
#[test]
fn unchanged_members_are_left_out_and_empty_partials_not_sent() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), batch_subscribe("b16", &THREE, true, 3600), t0);
    let _ = sent(&mut c);
    let busy = |c: &mut Core, who: &str, state: &str, t: Instant| {
        let mut e = env(who, "bob@partner.com", lync_presence(state));
        e.from.resource = Some("desk".into());
        c.handle_delivery(&h, &dom(), e, t);
    };
    busy(&mut c, THREE[0], "busy", t0);
    busy(&mut c, THREE[1], "busy", t0);
    c.handle_timeout(&h, t0 + Duration::from_secs(1));
    assert_eq!(sent(&mut c).len(), 1);
    // The same again: nothing.
    busy(&mut c, THREE[0], "busy", t0 + Duration::from_secs(2));
    c.handle_timeout(&h, t0 + Duration::from_secs(3));
    assert!(sent(&mut c).is_empty());
    // One same, one new: only the new one is listed.
    busy(&mut c, THREE[0], "busy", t0 + Duration::from_secs(4));
    busy(&mut c, THREE[1], "away", t0 + Duration::from_secs(4));
    c.handle_timeout(&h, t0 + Duration::from_secs(5));
    let out = sent(&mut c);
    let (list, states) = rlmi_of(out.first().expect("NOTIFY"));
    assert_eq!(states, [("sip:carol@example.com".to_string(), Some(15500))]);
    assert_eq!(list.version, 2, "the skipped one used no version");
}

/// Issue 11 item 3 for batches: a batched subscription is written to the store, comes back
/// from its record on a new core (same dialog, members and states), writes nothing back, and
/// once the home link is up asks the home node for its approved members; ending it deletes
/// the record.
#[test]
fn batched_subscriptions_survive_a_restart() {
    let h = hub();
    let mut c = core();
    let (t0, wall) = (Instant::now(), std::time::SystemTime::now());
    c.handle_message(&h, &peer(), batch_subscribe("b9", &THREE, true, 3600), t0);
    let _ = sent(&mut c);
    // alice approves (her home node's `subscribed`); the others stay pending.
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com",
            "bob@partner.com",
            Body::Subscription(Subscription::Subscribed),
        ),
        t0,
    );
    let ops = c.take_store_ops(t0, wall, false);
    let batch_puts: Vec<(String, Vec<u8>)> = ops
        .iter()
        .filter_map(|o| match o {
            StoreOp::Put { key, value } if key.starts_with(BATCH_PREFIX) => {
                Some((key.clone(), value.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(batch_puts.len(), 1, "{ops:?}");
    // Unchanged: nothing written again.
    assert!(c
        .take_store_ops(t0, wall, false)
        .iter()
        .all(|o| !matches!(o, StoreOp::Put { key, .. } if key.starts_with(BATCH_PREFIX))));

    let h2 = hub();
    let mut c2 = core();
    let (k, v) = &batch_puts[0];
    assert_eq!(c2.restore_record(&h2, k, v, t0, wall), Restored::Batch);
    assert_eq!(c2.batch_count(), 1);
    let before = c.persisted_batches(t0, 1_000_000);
    let after = c2.persisted_batches(t0, 1_000_000);
    assert_eq!(after[0].members, before[0].members);
    assert_eq!(after[0].dialog.id, before[0].dialog.id);
    assert!(after[0].dialog.local_cseq > before[0].dialog.local_cseq);
    assert!(after[0].version > before[0].version);
    assert!(c2.take_store_ops(t0, wall, false).is_empty());
    assert!(sent(&mut c2).is_empty());
    // The link comes up: a probe for alice (approved), the request again for the others.
    c2.handle_link_up(&dom(), t0);
    while c2.pump_link_up(&h2, 64) {}
    let got = h2.got.borrow();
    let asked = |to: &str, s: Subscription| {
        got.iter().any(|e| {
            e.from.bare_string() == "bob@partner.com"
                && e.to.bare_string() == to
                && e.body == Body::Subscription(s)
        })
    };
    assert!(asked("alice@example.com", Subscription::Probe), "{got:?}");
    assert!(
        asked("carol@example.com", Subscription::Subscribe),
        "{got:?}"
    );
    assert!(
        asked("dave@example.com", Subscription::Subscribe),
        "{got:?}"
    );
    drop(got);
    // Ending the batch deletes its record.
    let id = c2.persisted_batches(t0, 1_000_000)[0].dialog.id.clone();
    c2.batch_remove(&id);
    assert!(c2
        .take_store_ops(t0, wall, false)
        .iter()
        .any(|o| matches!(o, StoreOp::Delete { key } if key == k)));
}
