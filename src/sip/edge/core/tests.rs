//! Machine tests of the core on a simulated clock: time is only ever an argument.

use super::*;
use crate::config::{self, BUILTIN_SYSTEMS};
use crate::gateway::Link;
use crate::presence::map;
use crate::sip::parse::{parse_datagram, parse_exact};
use std::cell::RefCell;
use std::path::Path;

mod batch;
mod consent;
mod drain;

const CONFIG: &str = r#"routing_node = "hn1"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
default_system = "xmpp"
"#;

pub(super) struct FakeHub {
    cfg: Arc<Config>,
    maps: Arc<MappingSet>,
    pub(super) got: RefCell<Vec<Envelope>>,
}

impl HubPort for FakeHub {
    fn submit(&self, _domain: &Domain, env: Envelope) -> Submitted {
        self.got.borrow_mut().push(env);
        Submitted::Delivered(Link::Component {
            home_node: "hn1".into(),
        })
    }
    fn config(&self) -> Arc<Config> {
        self.cfg.clone()
    }
    fn maps(&self) -> Arc<MappingSet> {
        self.maps.clone()
    }
}

pub(super) fn hub() -> FakeHub {
    hub_with("")
}

/// A hub whose configuration has a second federated domain (`other.com`) and `limits`.
pub(super) fn hub_with(limits: &str) -> FakeHub {
    let text = format!(
        "{CONFIG}[[sip.federated_domain]]\nname = \"other.com\"\nsystem = \"lync\"\n[limits]\n{limits}\n"
    );
    FakeHub {
        cfg: Arc::new(
            config::from_toml(&text, Path::new("t.toml"), BUILTIN_SYSTEMS).expect("config"),
        ),
        maps: Arc::new(map::embedded().expect("maps")),
        got: RefCell::new(Vec::new()),
    }
}

pub(super) fn core() -> Core {
    Core::new(
        LocalIdentity {
            sent_by: "example.com:5061".into(),
            transport: "TLS",
        },
        Duration::from_secs(600),
    )
}

pub(super) fn peer() -> PeerInfo {
    PeerInfo {
        conn: 1,
        remote: "192.0.2.1:5061".parse().expect("addr"),
        tls: true,
        verified: vec![Domain::parse("partner.com").expect("domain")],
        outbound_to: None,
    }
}

/// A TLS peer verified as `other.com`.
fn other_peer() -> PeerInfo {
    PeerInfo {
        conn: 2,
        remote: "198.51.100.7:5061".parse().expect("addr"),
        tls: true,
        verified: vec![Domain::parse("other.com").expect("domain")],
        outbound_to: None,
    }
}

pub(super) fn dom() -> Domain {
    Domain::parse("partner.com").expect("domain")
}

/// Drains the actions into the messages sent.
pub(super) fn sent(c: &mut Core) -> Vec<SipMessage> {
    let mut out = Vec::new();
    while let Some(a) = c.poll_action() {
        if let Action::Send { bytes, .. } = a {
            out.push(parse_exact(bytes).expect("we send valid SIP"));
        }
    }
    out
}

pub(super) fn msg(text: &str) -> SipMessage {
    parse_datagram(text.replace('\n', "\r\n").as_bytes()).expect("test message parses")
}

pub(super) fn subscribe_text(expires: u32) -> String {
    format!(
        "SUBSCRIBE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKs1\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=b\n\
To: <sip:alice@example.com>\n\
Call-ID: c1\n\
CSeq: 1 SUBSCRIBE\n\
Contact: <sip:bob@10.0.0.1:5061;transport=tls>\n\
Event: presence\n\
Expires: {expires}\n\
Content-Length: 0\n\n"
    )
}

pub(super) fn env(from: &str, to: &str, body: Body) -> Envelope {
    Envelope {
        from: Address::parse(from).expect("addr"),
        to: Address::parse(to).expect("addr"),
        body,
        stanza_id: None,
        via_cluster: None,
    }
}

#[test]
fn notifier_expires_with_timeout_notify() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(60)), t0);
    let out = sent(&mut c);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].status(), Some(200));
    assert_eq!(out[1].method(), Some("NOTIFY"));
    assert_eq!(h.got.borrow().len(), 1);
    assert!(c
        .poll_timeout()
        .is_some_and(|t| t <= t0 + Duration::from_secs(60)));
    c.handle_timeout(&h, t0 + Duration::from_secs(59));
    assert!(sent(&mut c).is_empty());
    c.handle_timeout(&h, t0 + Duration::from_secs(61));
    let out = sent(&mut c);
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].header_value_by_raw_name("Subscription-State"),
        Some("terminated;reason=timeout")
    );
    // RFC 8048 §5.3.3: expiry is the watcher going unavailable, not a revocation.
    assert!(matches!(
        h.got.borrow().last().map(|e| e.body.clone()),
        Some(Body::Presence(p)) if &*p.state == "offline"
    ));
    assert_eq!(c.counts().0, 0);
}

#[test]
fn notify_is_answered_481_for_unknown_and_refresh_cseq_must_grow() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    let tag = out[0]
        .to()
        .ok()
        .and_then(|t| t.tag())
        .unwrap_or("")
        .to_owned();
    // Same CSeq again inside the dialog: out of order (§12.2.2).
    let refresh = subscribe_text(3600)
        .replace(
            "To: <sip:alice@example.com>",
            &format!("To: <sip:alice@example.com>;tag={tag}"),
        )
        .replace("z9hG4bKs1", "z9hG4bKs2");
    c.handle_message(&h, &peer(), msg(&refresh), t0);
    assert_eq!(sent(&mut c)[0].status(), Some(500));
    let refresh = refresh
        .replace("CSeq: 1 SUBSCRIBE", "CSeq: 2 SUBSCRIBE")
        .replace("z9hG4bKs2", "z9hG4bKs3");
    c.handle_message(&h, &peer(), msg(&refresh), t0);
    let out = sent(&mut c);
    assert_eq!(out[0].status(), Some(200));
    assert_eq!(out[1].method(), Some("NOTIFY"));
}

#[test]
fn subscriber_refreshes_before_expiry_and_honours_423() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com",
            "bob@partner.com",
            Body::Subscription(Subscription::Subscribe),
        ),
        t0,
    );
    let out = sent(&mut c);
    assert_eq!(out.len(), 1);
    let sub = &out[0];
    assert_eq!(sub.expires(), Ok(Some(3600)));
    // 423: retry with Min-Expires.
    let mut r = sub
        .build_response(423, "Interval Too Brief", Some("bt"))
        .expect("resp");
    r.push_header("Min-Expires", "7200").expect("hdr");
    c.handle_message(&h, &peer(), r, t0);
    let out = sent(&mut c);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].expires(), Ok(Some(7200)));
    // 200 with a shorter grant: refresh at 9/10 of it.
    let mut ok = out[0].build_response(200, "OK", Some("bt")).expect("resp");
    ok.push_header("Expires", "600").expect("hdr");
    ok.push_header("Contact", "<sip:bob@10.0.0.1>")
        .expect("hdr");
    c.handle_message(&h, &peer(), ok, t0);
    assert!(sent(&mut c).is_empty());
    c.handle_timeout(&h, t0 + Duration::from_secs(539));
    assert!(sent(&mut c).is_empty());
    c.handle_timeout(&h, t0 + Duration::from_secs(540));
    let out = sent(&mut c);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].request_uri_str(), Some("sip:bob@10.0.0.1"));
    assert_eq!(out[0].to().ok().and_then(|t| t.tag()), Some("bt"));
    // Nothing was told to the home side yet (no NOTIFY active).
    assert!(h.got.borrow().is_empty());
}

#[test]
fn subscriber_follows_rfc8048_on_notify_states_and_403() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let sub_env = env(
        "alice@example.com",
        "bob@partner.com",
        Body::Subscription(Subscription::Subscribe),
    );
    c.handle_delivery(&h, &dom(), sub_env.clone(), t0);
    let sub = sent(&mut c).remove(0);
    let call = sub.call_id().expect("call-id").to_owned();
    let tag = sub
        .from()
        .ok()
        .and_then(|f| f.tag())
        .unwrap_or("")
        .to_owned();
    let notify = |cseq: u32, state: &str| {
        msg(&format!(
            "NOTIFY sip:alice@example.com:5061 SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKn{cseq}\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=bt\n\
To: <sip:alice@example.com>;tag={tag}\n\
Call-ID: {call}\n\
CSeq: {cseq} NOTIFY\n\
Event: presence\n\
Subscription-State: {state}\n\
Content-Length: 0\n\n"
        ))
    };
    // NOTIFY before the 200 creates the dialog (RFC 6665 §4.1.2.4); pending says nothing.
    c.handle_message(&h, &peer(), notify(1, "pending"), t0);
    assert_eq!(sent(&mut c)[0].status(), Some(200));
    assert!(h.got.borrow().is_empty());
    c.handle_message(&h, &peer(), notify(2, "active;expires=3600"), t0);
    assert_eq!(sent(&mut c)[0].status(), Some(200));
    assert_eq!(
        h.got.borrow().last().map(|e| e.body.clone()),
        Some(Body::Subscription(Subscription::Subscribed))
    );
    c.handle_message(&h, &peer(), notify(3, "terminated;reason=rejected"), t0);
    assert_eq!(sent(&mut c)[0].status(), Some(200));
    assert_eq!(
        h.got.borrow().last().map(|e| e.body.clone()),
        Some(Body::Subscription(Subscription::Unsubscribed))
    );
    assert_eq!(c.counts().1, 0);
    // A NOTIFY for a dialog we do not know: 481.
    c.handle_message(&h, &peer(), notify(4, "active"), t0);
    assert_eq!(sent(&mut c)[0].status(), Some(481));
    // 403 to a new SUBSCRIBE: refused (RFC 8048 §5.2.2).
    c.handle_delivery(&h, &dom(), sub_env, t0);
    let sub = sent(&mut c).remove(0);
    let r = sub
        .build_response(403, "Forbidden", Some("x"))
        .expect("resp");
    c.handle_message(&h, &peer(), r, t0);
    assert_eq!(
        h.got.borrow().last().map(|e| e.body.clone()),
        Some(Body::Subscription(Subscription::Unsubscribed))
    );
}

#[test]
fn idle_session_gets_bye() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let sdp = "v=0\r\nm=message 5061 sip null\r\n";
    let inv = format!(
        "INVITE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKi1\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=b\n\
To: <sip:alice@example.com>\n\
Call-ID: im1\n\
CSeq: 1 INVITE\n\
Contact: <sip:bob@10.0.0.1;transport=tls>\n\
Content-Type: application/sdp\n\
Content-Length: {}\n\n",
        sdp.len()
    );
    let mut raw = inv.replace('\n', "\r\n").into_bytes();
    raw.extend_from_slice(sdp.as_bytes());
    c.handle_message(&h, &peer(), parse_datagram(&raw).expect("parses"), t0);
    let out = sent(&mut c);
    assert_eq!(
        out.iter()
            .filter_map(SipMessage::status)
            .collect::<Vec<_>>(),
        [100, 200]
    );
    assert_eq!(c.counts().2, 1);
    c.handle_timeout(&h, t0 + Duration::from_secs(599));
    assert!(sent(&mut c).is_empty());
    c.handle_timeout(&h, t0 + Duration::from_secs(601));
    let out = sent(&mut c);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].method(), Some("BYE"));
    assert_eq!(
        out[0].request_uri_str(),
        Some("sip:bob@10.0.0.1;transport=tls")
    );
    assert_eq!(c.counts().2, 0);
}

#[test]
fn invite_timeout_timer_b_bounces_queued_messages() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com",
            "bob@partner.com",
            Body::Message(MessageBody {
                id: Some("m1".into()),
                text: "hello".into(),
                thread: None,
                ..Default::default()
            }),
        ),
        t0,
    );
    let out = sent(&mut c);
    assert_eq!(out[0].method(), Some("INVITE"));
    // Timer B = 64·T1 = 32 s.
    c.handle_timeout(&h, t0 + Duration::from_secs(31));
    assert!(h.got.borrow().is_empty());
    c.handle_timeout(&h, t0 + Duration::from_secs(33));
    let got = h.got.borrow();
    let Some(Body::Error { id, condition, .. }) = got.last().map(|e| e.body.clone()) else {
        panic!("expected an error back: {got:?}");
    };
    assert_eq!(id.as_deref(), Some("m1"));
    assert_eq!(condition, ErrorCondition::RemoteServerTimeout);
    assert_eq!(
        got.last().map(|e| e.to.bare_string()),
        Some("alice@example.com".into())
    );
}

#[test]
fn message_timeout_timer_f_on_pager_like_session_message() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    // Build an established inbound session, then send into it and let Timer F fire.
    let sdp = "v=0\r\nm=message 5061 sip null\r\n";
    let inv = format!(
        "INVITE sip:alice@example.com SIP/2.0\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKi2\nMax-Forwards: 70\nFrom: <sip:bob@partner.com>;tag=b\nTo: <sip:alice@example.com>\nCall-ID: im2\nCSeq: 1 INVITE\nContact: <sip:bob@10.0.0.1>\nContent-Type: application/sdp\nContent-Length: {}\n\n",
        sdp.len()
    );
    let mut raw = inv.replace('\n', "\r\n").into_bytes();
    raw.extend_from_slice(sdp.as_bytes());
    c.handle_message(&h, &peer(), parse_datagram(&raw).expect("parses"), t0);
    sent(&mut c);
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com",
            "bob@partner.com",
            Body::Message(MessageBody {
                id: Some("m2".into()),
                text: "in session".into(),
                thread: None,
                ..Default::default()
            }),
        ),
        t0,
    );
    let out = sent(&mut c);
    assert_eq!(out[0].method(), Some("MESSAGE"));
    assert_eq!(out[0].call_id().ok(), Some("im2"));
    c.handle_timeout(&h, t0 + Duration::from_secs(33));
    let got = h.got.borrow();
    assert!(matches!(
        got.last().map(|e| &e.body),
        Some(Body::Error {
            condition: ErrorCondition::RemoteServerTimeout,
            ..
        })
    ));
}

#[test]
fn cancel_after_the_answer_and_options_to_the_domain() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let sdp = "v=0\r\nm=message 5061 sip null\r\n";
    let inv = format!(
        "INVITE sip:alice@example.com SIP/2.0\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKc1\nMax-Forwards: 70\nFrom: <sip:bob@partner.com>;tag=b\nTo: <sip:alice@example.com>\nCall-ID: cc1\nCSeq: 1 INVITE\nContent-Type: application/sdp\nContent-Length: {}\n\n",
        sdp.len()
    );
    let mut raw = inv.replace('\n', "\r\n").into_bytes();
    raw.extend_from_slice(sdp.as_bytes());
    c.handle_message(&h, &peer(), parse_datagram(&raw).expect("parses"), t0);
    sent(&mut c);
    let cancel = |branch: &str| {
        msg(&format!(
            "CANCEL sip:alice@example.com SIP/2.0\nVia: SIP/2.0/TLS sip.partner.com:5061;branch={branch}\nMax-Forwards: 70\nFrom: <sip:bob@partner.com>;tag=b\nTo: <sip:alice@example.com>\nCall-ID: cc1\nCSeq: 1 CANCEL\nContent-Length: 0\n\n"
        ))
    };
    c.handle_message(&h, &peer(), cancel("z9hG4bKc1"), t0);
    assert_eq!(sent(&mut c)[0].status(), Some(200));
    c.handle_message(&h, &peer(), cancel("z9hG4bKzz"), t0);
    assert_eq!(sent(&mut c)[0].status(), Some(481));
    let opt = msg("OPTIONS sip:example.com SIP/2.0\nVia: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKo1\nMax-Forwards: 70\nFrom: <sip:bob@partner.com>;tag=b\nTo: <sip:example.com>\nCall-ID: o1\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n");
    c.handle_message(&h, &peer(), opt, t0);
    assert_eq!(sent(&mut c)[0].status(), Some(200));
}

#[test]
fn loops_and_hops_are_refused() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let ours = c.via_on(None);
    let text = subscribe_text(3600).replace(
        "Max-Forwards: 70\n",
        &format!("Via: {ours}\nMax-Forwards: 70\n"),
    );
    c.handle_message(&h, &peer(), msg(&text), t0);
    assert_eq!(sent(&mut c)[0].status(), Some(482));
    let text = subscribe_text(3600)
        .replace("Max-Forwards: 70", "Max-Forwards: 0")
        .replace("z9hG4bKs1", "z9hG4bKs9");
    c.handle_message(&h, &peer(), msg(&text), t0);
    assert_eq!(sent(&mut c)[0].status(), Some(483));
    assert!(h.got.borrow().is_empty());
}

#[test]
fn persisted_notifiers_restore_with_higher_cseq() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let wall = SystemTime::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    let cseq = out[1].cseq().map(|x| x.seq).unwrap_or(0);
    assert!(c.take_dirty());
    let snap = c.snapshot(t0, wall);
    let json = serde_json::to_string(&snap).expect("json");
    let back: PersistedState = serde_json::from_str(&json).expect("back");
    h.got.borrow_mut().clear();
    let mut c2 = core();
    assert_eq!(c2.restore(&h, back, t0, wall), 1);
    assert!(
        h.got.borrow().is_empty(),
        "nothing is sent before the link is up"
    );
    c2.handle_link_up(&dom(), t0);
    assert!(!c2.pump_link_up(&h, 10));
    // A pending subscription is re-announced to the home side.
    assert_eq!(
        h.got.borrow().last().map(|e| e.body.clone()),
        Some(Body::Subscription(Subscription::Subscribe))
    );
    c2.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com",
            "bob@partner.com",
            Body::Subscription(Subscription::Subscribed),
        ),
        t0,
    );
    let out = sent(&mut c2);
    assert_eq!(out.len(), 1);
    assert!(out[0].cseq().map(|x| x.seq).unwrap_or(0) > cseq);
    // Expired entries are not restored.
    let snap = c.snapshot(t0, wall);
    assert_eq!(
        core().restore(&h, snap, t0, wall + Duration::from_secs(7200)),
        0
    );
}

/// A fetch (`Expires: 0`) gets its 200 and a terminated NOTIFY, and leaves no notifier.
#[test]
fn fetches_leave_no_notifiers() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    for i in 0..100 {
        let text = subscribe_text(0)
            .replace("Call-ID: c1", &format!("Call-ID: fetch{i}"))
            .replace("z9hG4bKs1", &format!("z9hG4bKf{i}"));
        c.handle_message(&h, &peer(), msg(&text), t0);
        let out = sent(&mut c);
        assert_eq!(out[0].status(), Some(200));
        assert_eq!(
            out[1].header_value_by_raw_name("Subscription-State"),
            Some("terminated;reason=timeout")
        );
    }
    assert_eq!(c.counts().0, 0);
}

/// A state file that says an entry expires at u64::MAX does not panic: the entry is kept
/// with at most the longest grant; one already past is dropped.
#[test]
fn restore_clamps_absurd_expiry_and_drops_past() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let wall = SystemTime::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let _ = sent(&mut c);
    let mut snap = c.snapshot(t0, wall);
    let mut past = snap.notifiers[0].clone();
    past.dialog.id = DialogId::new(
        "past",
        past.dialog.id.local_tag(),
        past.dialog.id.remote_tag(),
    );
    past.expires_unix = 1;
    snap.notifiers[0].expires_unix = u64::MAX;
    snap.notifiers.push(past);
    let mut c2 = core();
    assert_eq!(c2.restore(&h, snap, t0, wall), 1);
    assert_eq!(c2.counts().0, 1);
    let max = Duration::from_secs(u64::from(subscription::MAX_EXPIRES));
    assert!(c2.poll_timeout().is_some_and(|t| t <= t0 + max));
    // It ends at the clamped time.
    c2.handle_timeout(&h, t0 + max + Duration::from_secs(1));
    assert_eq!(c2.counts().0, 0);
}

/// Thousands of INVITEs refused by policy (no verified certificate; an unfederated domain)
/// are answered without creating a server transaction.
#[test]
fn refused_invites_leave_no_server_transactions() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let unverified = PeerInfo {
        verified: Vec::new(),
        ..peer()
    };
    for i in 0..3000 {
        let from = if i % 2 == 0 {
            "partner.com"
        } else {
            "nowhere.net"
        };
        let text = format!(
            "INVITE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKflood{i}\n\
Max-Forwards: 70\n\
From: <sip:bob@{from}>;tag=b\n\
To: <sip:alice@example.com>\n\
Call-ID: flood{i}\n\
CSeq: 1 INVITE\n\
Contact: <sip:bob@10.0.0.1;transport=tls>\n\
Content-Length: 0\n\n"
        );
        let p = if i % 2 == 0 { &unverified } else { &peer() };
        c.handle_message(&h, p, msg(&text), t0);
        let out = sent(&mut c);
        assert_eq!(out.len(), 1);
        assert!(out[0].status().is_some_and(|s| (400..500).contains(&s)));
    }
    assert_eq!(c.txn_counts(), (0, 0));
    assert_eq!(c.counts(), (0, 0, 0));
    assert!(h.got.borrow().is_empty());
}

/// New Call-IDs for the same (watcher, user) pair are bounded: beyond MAX_DIALOGS_PER_PAIR
/// the oldest dialog ends with `deactivated`, and a presence change is sent once per live
/// dialog only.
#[test]
fn dialogs_per_pair_are_bounded_oldest_deactivated() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    for i in 0..20 {
        let text = subscribe_text(3600)
            .replace("Call-ID: c1", &format!("Call-ID: pair{i}"))
            .replace("z9hG4bKs1", &format!("z9hG4bKp{i}"));
        c.handle_message(&h, &peer(), msg(&text), t0);
        let out = sent(&mut c);
        assert_eq!(out[0].status(), Some(200));
        if i >= MAX_DIALOGS_PER_PAIR {
            let ended = out
                .iter()
                .find(|m| {
                    m.header_value_by_raw_name("Subscription-State")
                        == Some("terminated;reason=deactivated")
                })
                .expect("the oldest dialog is deactivated");
            let oldest = format!("pair{}", i - MAX_DIALOGS_PER_PAIR);
            assert_eq!(ended.call_id().ok(), Some(oldest.as_str()));
        }
    }
    assert_eq!(c.counts().0, MAX_DIALOGS_PER_PAIR);
    assert_eq!(c.notifier_watchers.get("alice@example.com"), Some(&1));
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
    assert_eq!(sent(&mut c).len(), MAX_DIALOGS_PER_PAIR);
    // Nobody told the home side the watcher went away: it still has live dialogs.
    assert!(!h
        .got
        .borrow()
        .iter()
        .any(|e| e.body == Body::Subscription(Subscription::Unsubscribe)));
}

/// A refresh storm queues no timer per refresh; the subscription still ends at its last
/// granted expiry.
#[test]
fn refresh_storm_does_not_grow_the_timer_heap() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    let tag = out[0]
        .to()
        .ok()
        .and_then(|t| t.tag())
        .unwrap_or("")
        .to_owned();
    let notifier_timers = |c: &Core| c.notifier_heap.len();
    let base = notifier_timers(&c);
    let mut last = t0;
    for i in 2..2002u32 {
        last = t0 + Duration::from_millis(u64::from(i));
        let refresh = subscribe_text(3600)
            .replace(
                "To: <sip:alice@example.com>",
                &format!("To: <sip:alice@example.com>;tag={tag}"),
            )
            .replace("CSeq: 1 SUBSCRIBE", &format!("CSeq: {i} SUBSCRIBE"))
            .replace("z9hG4bKs1", &format!("z9hG4bKr{i}"));
        c.handle_message(&h, &peer(), msg(&refresh), last);
        assert_eq!(sent(&mut c)[0].status(), Some(200));
    }
    let n = notifier_timers(&c);
    assert!(n <= base + 1, "expiry timers grew to {n}");
    // The first timer fires early, re-arms at the refreshed expiry, which ends it.
    c.handle_timeout(&h, t0 + Duration::from_secs(3600));
    assert_eq!(c.counts().0, 1);
    c.handle_timeout(&h, last + Duration::from_secs(3600));
    assert_eq!(c.counts().0, 0);
}

pub(super) fn im_invite(call: &str, from_user: &str, branch: &str) -> SipMessage {
    let sdp = "v=0\r\nm=message 5061 sip null\r\n";
    let inv = format!(
        "INVITE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch={branch}\n\
Max-Forwards: 70\n\
From: <sip:{from_user}@partner.com>;tag=b\n\
To: <sip:alice@example.com>\n\
Call-ID: {call}\n\
CSeq: 1 INVITE\n\
Contact: <sip:{from_user}@10.0.0.1;transport=tls>\n\
Content-Type: application/sdp\n\
Content-Length: {}\n\n",
        sdp.len()
    );
    let mut raw = inv.replace('\n', "\r\n").into_bytes();
    raw.extend_from_slice(sdp.as_bytes());
    parse_datagram(&raw).expect("parses")
}

fn text(id: &str) -> Body {
    Body::Message(MessageBody {
        id: Some(id.into()),
        text: "hi".into(),
        thread: None,
        ..Default::default()
    })
}

pub(super) fn bounced(h: &FakeHub) -> Vec<Option<String>> {
    h.got
        .borrow()
        .iter()
        .filter_map(|e| match &e.body {
            Body::Error { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// A new INVITE for a pair that has a session replaces it: the old dialog gets a BYE and
/// one session remains.
#[test]
fn new_invite_for_same_pair_replaces_the_session() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    for i in 0..50 {
        c.handle_message(
            &h,
            &peer(),
            im_invite(&format!("imr{i}"), "bob", &format!("z9hG4bKir{i}")),
            t0,
        );
        let out = sent(&mut c);
        assert!(out.iter().any(|m| m.status() == Some(200)));
        if i > 0 {
            let bye = out
                .iter()
                .find(|m| m.method() == Some("BYE"))
                .expect("the old session gets a BYE");
            let old = format!("imr{}", i - 1);
            assert_eq!(bye.call_id().ok(), Some(old.as_str()));
        }
    }
    assert_eq!(c.counts().2, 1);
    assert_eq!(c.sessions_of(&dom()), 1);
}

/// Sessions per domain are bounded (`limits.im_sessions_per_domain`, 3 here): beyond, an
/// INVITE gets 503 with Retry-After and a message that would open one is bounced; another
/// partner still opens its sessions.
#[test]
fn sessions_per_domain_are_bounded() {
    let h = hub_with("im_sessions_per_domain = 3");
    let mut c = core();
    let t0 = Instant::now();
    for i in 0..3 {
        c.handle_message(
            &h,
            &peer(),
            im_invite(
                &format!("imd{i}"),
                &format!("u{i}"),
                &format!("z9hG4bKid{i}"),
            ),
            t0,
        );
        let _ = sent(&mut c);
    }
    assert_eq!(c.counts().2, 3);
    c.handle_message(&h, &peer(), im_invite("imd-x", "late", "z9hG4bKidx"), t0);
    let out = sent(&mut c);
    let last = out.last().expect("an answer");
    assert_eq!(last.status(), Some(503));
    assert_eq!(hv(last, "Retry-After"), Some("60"));
    c.handle_delivery(
        &h,
        &dom(),
        env("alice@example.com", "new@partner.com", text("m1")),
        t0,
    );
    assert!(sent(&mut c).is_empty());
    assert_eq!(bounced(&h), [Some("m1".to_owned())]);
    assert_eq!(c.counts().2, 3);
    // other.com has its own share.
    let inv = im_invite("imo", "carol", "z9hG4bKido").to_bytes();
    let inv = String::from_utf8_lossy(&inv).replace("@partner.com", "@other.com");
    c.handle_message(
        &h,
        &other_peer(),
        parse_exact(inv.into()).expect("parses"),
        t0,
    );
    assert_eq!(
        sent(&mut c).iter().filter_map(SipMessage::status).last(),
        Some(200)
    );
    assert_eq!(c.counts().2, 4);
}

/// A header value of a message we sent.
pub(super) fn hv<'m>(m: &'m SipMessage, name: &str) -> Option<&'m str> {
    m.headers()
        .find(|h| h.raw_name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// A 2xx to our INVITE that cannot make a dialog (no To tag) ends the session and bounces
/// what waited on it; later messages open a new session instead of queueing forever.
#[test]
fn unusable_2xx_to_invite_ends_session_and_bounces() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_delivery(
        &h,
        &dom(),
        env("alice@example.com", "bob@partner.com", text("m1")),
        t0,
    );
    let inv = sent(&mut c).remove(0);
    assert_eq!(inv.method(), Some("INVITE"));
    c.handle_delivery(
        &h,
        &dom(),
        env("alice@example.com", "bob@partner.com", text("m2")),
        t0,
    );
    assert!(sent(&mut c).is_empty());
    let ok = inv.build_response(200, "OK", None).expect("resp");
    c.handle_message(&h, &peer(), ok, t0);
    assert_eq!(c.counts().2, 0);
    assert_eq!(bounced(&h), [Some("m1".to_owned()), Some("m2".to_owned())]);
    c.handle_delivery(
        &h,
        &dom(),
        env("alice@example.com", "bob@partner.com", text("m3")),
        t0,
    );
    assert_eq!(sent(&mut c)[0].method(), Some("INVITE"));
}

/// The queue of a session still inviting is bounded; what does not fit is bounced, and
/// closing the session bounces what was queued rather than dropping it.
#[test]
fn session_queue_is_bounded_and_close_bounces() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    for i in 0..100 {
        c.handle_delivery(
            &h,
            &dom(),
            env(
                "alice@example.com",
                "bob@partner.com",
                text(&format!("q{i}")),
            ),
            t0,
        );
    }
    assert_eq!(sent(&mut c).len(), 1, "one INVITE");
    assert_eq!(bounced(&h).len(), 100 - MAX_SESSION_QUEUE);
    let sid = *c.sessions.keys().next().expect("session");
    c.close_session(&h, sid, t0);
    assert_eq!(bounced(&h).len(), 100);
    assert_eq!(c.counts().2, 0);
}

#[test]
fn plain_tcp_needs_the_domains_static_route() {
    // partner.com has no static route in CONFIG: over plain TCP its From header proves nothing.
    let h = hub();
    let mut c = core();
    let tcp = PeerInfo {
        tls: false,
        verified: Vec::new(),
        ..peer()
    };
    c.handle_message(&h, &tcp, msg(&subscribe_text(3600)), Instant::now());
    let out = sent(&mut c);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].status(), Some(403));
    assert_eq!(
        out[0].reason(),
        Some("Forbidden (TCP Needs A Static Route For This Domain)")
    );
    assert!(h.got.borrow().is_empty(), "nothing reaches the home side");
}

/// An INVITE from `user@domain` requiring an extension we lack: answered 420 inside a server
/// transaction that then waits for the ACK (RFC 3261 §17.2.1, Timer H), so it stays live.
fn invite_needing_ack(domain: &str, i: u32) -> SipMessage {
    msg(&format!(
        "INVITE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.{domain}:5061;branch=z9hG4bKfair{domain}{i}\n\
Max-Forwards: 70\n\
From: <sip:u{i}@{domain}>;tag=b{i}\n\
To: <sip:alice@example.com>\n\
Call-ID: fair-{domain}-{i}\n\
CSeq: 1 INVITE\n\
Contact: <sip:u{i}@10.0.0.1;transport=tls>\n\
Require: no-such-extension\n\
Content-Length: 0\n\n"
    ))
}

/// Issue 10 item 4: one partner holding its whole share of server transactions
/// (`limits.sip_transactions_per_domain`, 5 here) gets 503 + Retry-After with a reason
/// naming the bound, while another partner's requests still get transactions; the share
/// comes back when the transactions end (Timer H on the simulated clock).
#[test]
fn one_partner_at_its_transaction_share_does_not_starve_another() {
    let h = hub_with("sip_transactions_per_domain = 5");
    let mut c = core();
    let t0 = Instant::now();
    for i in 0..5 {
        c.handle_message(&h, &peer(), invite_needing_ack("partner.com", i), t0);
        assert_eq!(sent(&mut c).last().and_then(SipMessage::status), Some(420));
    }
    assert_eq!(c.txn_counts().0, 5);
    c.handle_message(&h, &peer(), invite_needing_ack("partner.com", 99), t0);
    let out = sent(&mut c);
    let r = out.first().expect("answered");
    assert_eq!(r.status(), Some(503));
    assert_eq!(
        r.reason(),
        Some("Service Unavailable (Too Many Transactions From Your Domain)")
    );
    assert_eq!(hv(r, "Retry-After"), Some(RETRY_AFTER_BUSY));
    assert_eq!(c.txn_counts().0, 5, "the refusal created no transaction");
    // The other partner is not starved.
    for i in 0..5 {
        c.handle_message(&h, &other_peer(), invite_needing_ack("other.com", i), t0);
        assert_eq!(sent(&mut c).last().and_then(SipMessage::status), Some(420));
    }
    assert_eq!(c.txn_counts().0, 10);
    // Timer H (64·T1) ends the un-ACKed transactions: partner.com has its share again.
    let later = t0 + Duration::from_secs(33);
    c.handle_timeout(&h, later);
    let _ = sent(&mut c);
    assert_eq!(c.txn_counts().0, 0);
    c.handle_message(&h, &peer(), invite_needing_ack("partner.com", 100), later);
    assert_eq!(sent(&mut c).last().and_then(SipMessage::status), Some(420));
}

fn subscribe_from(domain: &str, user: &str) -> SipMessage {
    msg(&format!(
        "SUBSCRIBE sip:alice@example.com SIP/2.0\n\
Via: SIP/2.0/TLS sip.{domain}:5061;branch=z9hG4bKw{user}{domain}\n\
Max-Forwards: 70\n\
From: <sip:{user}@{domain}>;tag=t{user}\n\
To: <sip:alice@example.com>\n\
Call-ID: w-{user}-{domain}\n\
CSeq: 1 SUBSCRIBE\n\
Contact: <sip:{user}@10.0.0.1:5061;transport=tls>\n\
Event: presence\n\
Expires: 3600\n\
Content-Length: 0\n\n"
    ))
}

/// Issue 10 item 4: foreign watchers are bounded per foreign domain
/// (`limits.foreign_watchers_per_domain`, 3 here) whatever localparts it uses; beyond, 503 +
/// Retry-After; another partner still subscribes; an ended dialog frees its place.
#[test]
fn foreign_watchers_are_bounded_per_domain() {
    let h = hub_with("foreign_watchers_per_domain = 3");
    let mut c = core();
    let t0 = Instant::now();
    for u in ["w1", "w2", "w3"] {
        c.handle_message(&h, &peer(), subscribe_from("partner.com", u), t0);
        assert_eq!(sent(&mut c).first().and_then(SipMessage::status), Some(200));
    }
    c.handle_message(&h, &peer(), subscribe_from("partner.com", "w4"), t0);
    let out = sent(&mut c);
    let r = out.first().expect("answered");
    assert_eq!(r.status(), Some(503));
    assert_eq!(
        r.reason(),
        Some("Service Unavailable (Too Many Watchers From Your Domain)")
    );
    assert_eq!(hv(r, "Retry-After"), Some(RETRY_AFTER_BUSY));
    assert_eq!(c.counts().0, 3);
    c.handle_message(&h, &other_peer(), subscribe_from("other.com", "w1"), t0);
    assert_eq!(sent(&mut c).first().and_then(SipMessage::status), Some(200));
    assert_eq!(c.counts().0, 4);
    // The subscriptions expire (3600 s): partner.com may subscribe again.
    let later = t0 + Duration::from_secs(3601);
    c.handle_timeout(&h, later);
    let _ = sent(&mut c);
    assert_eq!(c.counts().0, 0);
    c.handle_message(&h, &peer(), subscribe_from("partner.com", "w5"), later);
    assert_eq!(sent(&mut c).first().and_then(SipMessage::status), Some(200));
}

fn lync_presence(state: &str) -> Body {
    Body::Presence(crate::gateway::PresenceBody {
        system: "lync".into(),
        state: state.into(),
        note: None,
        priority: None,
    })
}

/// The Via and Contact of a NOTIFY name the transport of the connection it goes out on
/// (RFC 3261 §18.1.1): plain TCP here although the node's default is TLS.
#[test]
fn notify_via_and_contact_follow_the_connection_transport() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let tcp = PeerInfo {
        tls: false,
        outbound_to: Some(dom()),
        verified: Vec::new(),
        ..peer()
    };
    c.handle_message(&h, &tcp, msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    let ok = out.first().expect("200");
    assert_eq!(ok.status(), Some(200));
    assert!(
        hv(ok, "Contact").is_some_and(|v| v.ends_with(";transport=tcp>")),
        "{:?}",
        hv(ok, "Contact")
    );
    let notify = out.get(1).expect("NOTIFY");
    assert_eq!(notify.method(), Some("NOTIFY"));
    assert!(
        hv(notify, "Via").is_some_and(|v| v.starts_with("SIP/2.0/TCP ")),
        "{:?}",
        hv(notify, "Via")
    );
    assert!(hv(notify, "Contact").is_some_and(|v| v.contains(";transport=tcp")));
    // Over TLS the same exchange says TLS.
    let mut c = core();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    let notify = out.get(1).expect("NOTIFY");
    assert!(hv(notify, "Via").is_some_and(|v| v.starts_with("SIP/2.0/TLS ")));
    assert!(hv(notify, "Contact").is_some_and(|v| v.contains(";transport=tls")));
}

/// A presence update whose NOTIFY would carry the same state and body as the last one on
/// the dialog is not sent; a different one is; a refresh still gets its NOTIFY (RFC 6665
/// §4.2.1.2) even though nothing changed.
#[test]
fn identical_notify_is_not_sent_twice_but_refreshes_still_notify() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    let tag = out[0]
        .to()
        .ok()
        .and_then(|t| t.tag())
        .unwrap_or("")
        .to_owned();
    let deliver = |c: &mut Core, state: &str, at: Instant| {
        c.handle_delivery(
            &h,
            &dom(),
            env("alice@example.com", "bob@partner.com", lync_presence(state)),
            at,
        );
        sent(c)
            .into_iter()
            .filter(|m| m.method() == Some("NOTIFY"))
            .count()
    };
    assert_eq!(deliver(&mut c, "busy", t0), 1, "pending → active");
    assert_eq!(deliver(&mut c, "busy", t0 + Duration::from_secs(1)), 0);
    assert_eq!(deliver(&mut c, "busy", t0 + Duration::from_secs(2)), 0);
    assert_eq!(deliver(&mut c, "away", t0 + Duration::from_secs(3)), 1);
    assert_eq!(deliver(&mut c, "busy", t0 + Duration::from_secs(4)), 1);
    let refresh = subscribe_text(3600)
        .replace(
            "To: <sip:alice@example.com>",
            &format!("To: <sip:alice@example.com>;tag={tag}"),
        )
        .replace("CSeq: 1 SUBSCRIBE", "CSeq: 2 SUBSCRIBE")
        .replace("branch=z9hG4bKs1", "branch=z9hG4bKs2");
    c.handle_message(&h, &peer(), msg(&refresh), t0 + Duration::from_secs(5));
    let out = sent(&mut c);
    assert_eq!(
        out.iter().filter(|m| m.method() == Some("NOTIFY")).count(),
        1,
        "a refresh is always followed by a NOTIFY"
    );
}

/// The node-wide ceilings hold across partners: with room for 2 watchers and 1 session on
/// the node, a second partner is refused (503) once the node is full, even under its own share.
#[test]
fn node_wide_ceilings_hold_across_partners() {
    let h = hub();
    let mut c = core();
    c.set_node_caps(NodeCaps {
        foreign_watchers: 2,
        im_sessions: 1,
        ..NodeCaps::default()
    });
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), subscribe_from("partner.com", "w1"), t0);
    assert_eq!(sent(&mut c).first().and_then(SipMessage::status), Some(200));
    c.handle_message(&h, &other_peer(), subscribe_from("other.com", "w1"), t0);
    assert_eq!(sent(&mut c).first().and_then(SipMessage::status), Some(200));
    c.handle_message(&h, &other_peer(), subscribe_from("other.com", "w2"), t0);
    let out = sent(&mut c);
    assert_eq!(out.first().and_then(SipMessage::status), Some(503));
    assert_eq!(
        out.first().and_then(|r| hv(r, "Retry-After")),
        Some(RETRY_AFTER_BUSY)
    );
    assert_eq!(c.counts().0, 2);
    c.handle_message(&h, &peer(), im_invite("n1", "u1", "z9hG4bKn1"), t0);
    assert_eq!(sent(&mut c).last().and_then(SipMessage::status), Some(200));
    c.handle_message(&h, &peer(), im_invite("n2", "u2", "z9hG4bKn2"), t0);
    assert_eq!(sent(&mut c).last().and_then(SipMessage::status), Some(503));
    assert_eq!(c.counts().2, 1);
}

/// Presence updates to a connection with `NOTIFY_WINDOW` NOTIFYs unanswered wait (RFC 6665
/// §4.2.2), merged per dialog; each answer lets the oldest waiting one out with the state it
/// has then. A storm to one edge no longer outruns its reading until it is disconnected.
#[test]
fn a_full_notify_window_holds_presence_updates_until_answers_come() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let mut unanswered: Vec<SipMessage> = sent(&mut c)
        .into_iter()
        .filter(|m| m.method() == Some("NOTIFY"))
        .collect();
    let deliver = |c: &mut Core, state: &str| {
        c.handle_delivery(
            &h,
            &dom(),
            env("alice@example.com", "bob@partner.com", lync_presence(state)),
            t0,
        );
        sent(c)
            .into_iter()
            .filter(|m| m.method() == Some("NOTIFY"))
            .collect::<Vec<_>>()
    };
    let mut away_body = None;
    let mut i = 0;
    loop {
        let state = if i % 2 == 0 { "busy" } else { "away" };
        let out = deliver(&mut c, state);
        if out.is_empty() {
            break;
        }
        assert_eq!(out.len(), 1);
        if state == "away" {
            away_body = Some(out[0].body().to_vec());
        }
        unanswered.extend(out);
        i += 1;
        assert!(i <= 2 * NOTIFY_WINDOW as usize, "the window never filled");
    }
    assert_eq!(unanswered.len(), NOTIFY_WINDOW as usize);
    // Two more changes while the window is full: one NOTIFY owed, with the last state (the
    // one that found the window full, not the one the watcher has).
    let last = if i % 2 == 0 { "busy" } else { "away" };
    let other = if last == "away" { "busy" } else { "away" };
    assert!(deliver(&mut c, other).is_empty());
    assert!(deliver(&mut c, last).is_empty());
    let answer = |c: &mut Core, n: &SipMessage| {
        let ok = n.build_response(200, "OK", None).expect("200");
        c.handle_message(&h, &peer(), ok, t0);
        sent(c)
            .into_iter()
            .filter(|m| m.method() == Some("NOTIFY"))
            .collect::<Vec<_>>()
    };
    let out = answer(&mut c, &unanswered[0]);
    assert_eq!(out.len(), 1, "the answer lets the waiting update out");
    if last == "away" {
        assert_eq!(Some(out[0].body().to_vec()), away_body);
    }
    // Nothing else waits.
    assert!(answer(&mut c, &unanswered[1]).is_empty());
    assert!(c.deferred.is_empty() && c.deferred_ids.is_empty());
    // Fill the window again; an update that waits and is then undone merges into nothing.
    let mut more = Vec::new();
    let mut state = other;
    loop {
        let out = deliver(&mut c, state);
        if out.is_empty() {
            break;
        }
        more.extend(out);
        state = if state == "away" { "busy" } else { "away" };
    }
    let undo = if state == "away" { "busy" } else { "away" };
    assert!(deliver(&mut c, undo).is_empty());
    assert!(
        answer(&mut c, &unanswered[2]).is_empty(),
        "unchanged: nothing sent"
    );
    assert!(c.deferred.is_empty() && c.deferred_ids.is_empty());
    assert!(!more.is_empty());
}
