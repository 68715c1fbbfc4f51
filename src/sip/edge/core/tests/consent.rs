//! Polite blocking in the notifier (requirements §3) and RFC 8048 §5.3.3: a blocked or
//! refused watcher keeps a live subscription that says offline; the end of a subscription
//! never revokes the user's approval.

use super::*;
use crate::gateway::policy::{domain_wide, Policies, Target, Verdict};
use crate::gateway::Denied;

/// A hub with a real consent cache: a blocked watcher's request is refused as the consent
/// stage refuses it (`Denied::Blocked`), everything else is recorded as delivered.
struct ConsentHub {
    inner: FakeHub,
    policies: Policies,
}

impl HubPort for ConsentHub {
    fn submit(&self, domain: &Domain, env: Envelope) -> Submitted {
        let asks = matches!(
            env.body,
            Body::Subscription(Subscription::Subscribe | Subscription::Probe)
        );
        if asks && self.policies.consent(&env.to, &env.from) == Consent::Blocked {
            return Submitted::Denied(Denied::Blocked);
        }
        self.inner.submit(domain, env)
    }
    fn config(&self) -> Arc<Config> {
        self.inner.config()
    }
    fn maps(&self) -> Arc<MappingSet> {
        self.inner.maps()
    }
    fn consent(&self, user: &Address, watcher: &Address) -> Consent {
        self.policies.consent(user, watcher)
    }
}

fn consent_hub() -> ConsentHub {
    ConsentHub {
        inner: hub(),
        policies: Policies::default(),
    }
}

fn busy() -> Body {
    Body::Presence(crate::gateway::PresenceBody {
        system: "lync".into(),
        state: "busy".into(),
        note: Some("In a meeting".into()),
        priority: None,
    })
}

fn state_of(m: &SipMessage) -> String {
    m.header_value_by_raw_name("Subscription-State")
        .unwrap_or("")
        .to_string()
}

fn body_of(m: &SipMessage) -> String {
    String::from_utf8_lossy(m.body()).into_owned()
}

/// The one NOTIFY among `out`.
fn the_notify(out: &[SipMessage]) -> &SipMessage {
    let n: Vec<&SipMessage> = out
        .iter()
        .filter(|m| m.method() == Some("NOTIFY"))
        .collect();
    assert_eq!(n.len(), 1, "one NOTIFY expected");
    n[0]
}

fn assert_offline_but_alive(m: &SipMessage) {
    let state = state_of(m);
    assert!(state.starts_with("active"), "{state}");
    let body = body_of(m);
    assert!(body.contains("<basic>closed</basic>"), "{body}");
}

#[test]
fn a_blocked_watcher_is_accepted_shown_offline_and_the_user_never_asked() {
    let h = consent_hub();
    h.policies
        .set(
            "alice@example.com",
            Target::Domain(dom()),
            Some(Verdict::Block),
        )
        .expect("set");
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    assert_eq!(out[0].status(), Some(200));
    assert_offline_but_alive(the_notify(&out));
    assert!(
        h.inner.got.borrow().is_empty(),
        "the home node is not asked"
    );
    // The user's real state (reaching the core if she had approved before the block) is
    // kept but not shown: nothing new is sent.
    let p = env("alice@example.com", "bob@partner.com", busy());
    c.handle_delivery(&h, &dom(), p, t0);
    for m in sent(&mut c) {
        assert_offline_but_alive(&m);
    }
    // Unblocked: the current state at once.
    h.policies
        .set("alice@example.com", Target::Domain(dom()), None)
        .expect("unset");
    let kick = env(
        "alice@example.com",
        "bob@partner.com",
        Body::Subscription(Subscription::Subscribed),
    );
    c.handle_delivery(&h, &dom(), kick, t0);
    let out = sent(&mut c);
    let n = the_notify(&out);
    assert!(state_of(n).starts_with("active"));
    assert!(body_of(n).contains("<basic>open</basic>"), "{}", body_of(n));
    // Blocked again, domain-wide: offline at once, still alive.
    h.policies
        .set(
            "alice@example.com",
            Target::Domain(dom()),
            Some(Verdict::Block),
        )
        .expect("set");
    let kick = Envelope {
        from: Address::parse("alice@example.com").expect("addr"),
        to: domain_wide(&dom()),
        body: Body::Subscription(Subscription::Unsubscribed),
        stanza_id: None,
        via_cluster: None,
    };
    c.handle_delivery(&h, &dom(), kick, t0);
    assert_offline_but_alive(the_notify(&sent(&mut c)));
    // Its end is not told to the home node either.
    c.handle_timeout(&h, t0 + Duration::from_secs(3601));
    let out = sent(&mut c);
    assert_eq!(state_of(the_notify(&out)), "terminated;reason=timeout");
    assert!(h.inner.got.borrow().is_empty());
}

#[test]
fn a_refusal_never_terminates_the_subscription() {
    let h = consent_hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    assert!(state_of(the_notify(&out)).starts_with("pending"));
    assert_eq!(
        h.inner.got.borrow().last().map(|e| e.body.clone()),
        Some(Body::Subscription(Subscription::Subscribe))
    );
    // Alice refuses: the consent stage stores the block and the home node's `unsubscribed`
    // reaches the SIP core as a consent change for bob.
    h.policies
        .set(
            "alice@example.com",
            Target::Jid("bob@partner.com".into()),
            Some(Verdict::Block),
        )
        .expect("set");
    let no = env(
        "alice@example.com",
        "bob@partner.com",
        Body::Subscription(Subscription::Unsubscribed),
    );
    c.handle_delivery(&h, &dom(), no, t0);
    let out = sent(&mut c);
    let n = the_notify(&out);
    assert_offline_but_alive(n);
    assert!(!state_of(n).contains("rejected"));
    assert_eq!(c.counts().0, 1, "the subscription stays");
}

#[test]
fn an_unsubscribe_is_unavailable_presence_never_a_revocation() {
    let h = consent_hub();
    let mut c = core();
    let t0 = Instant::now();
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    let tag = out[0]
        .to()
        .ok()
        .and_then(|t| t.tag().map(str::to_string))
        .expect("to tag");
    let ok = env(
        "alice@example.com",
        "bob@partner.com",
        Body::Subscription(Subscription::Subscribed),
    );
    c.handle_delivery(&h, &dom(), ok, t0);
    assert!(state_of(the_notify(&sent(&mut c))).starts_with("active"));
    // Un-SUBSCRIBE (Expires: 0, in the dialog).
    let unsub = subscribe_text(0)
        .replace(
            "To: <sip:alice@example.com>",
            &format!("To: <sip:alice@example.com>;tag={tag}"),
        )
        .replace("CSeq: 1 SUBSCRIBE", "CSeq: 2 SUBSCRIBE")
        .replace("branch=z9hG4bKs1", "branch=z9hG4bKs2");
    c.handle_message(&h, &peer(), msg(&unsub), t0);
    let out = sent(&mut c);
    assert_eq!(out[0].status(), Some(200));
    assert_eq!(
        state_of(the_notify(&out)),
        format!(
            "terminated;reason={}",
            TerminationReason::Unsubscribed.token()
        )
    );
    let got: Vec<Body> = h
        .inner
        .got
        .borrow()
        .iter()
        .map(|e| e.body.clone())
        .collect();
    assert!(
        !got.contains(&Body::Subscription(Subscription::Unsubscribe)),
        "no revocation: {got:?}"
    );
    assert!(matches!(got.last(), Some(Body::Presence(p)) if &*p.state == "offline"));
}
