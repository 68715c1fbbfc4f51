//! Maintenance mode (`Hub::draining`): new dialogs are refused with 503 and Retry-After,
//! requests inside existing ones still go through.

use super::*;

/// [`FakeHub`] in maintenance mode.
struct Draining(FakeHub);

impl HubPort for Draining {
    fn submit(&self, domain: &Domain, env: Envelope) -> Submitted {
        self.0.submit(domain, env)
    }
    fn config(&self) -> Arc<Config> {
        self.0.config()
    }
    fn maps(&self) -> Arc<MappingSet> {
        self.0.maps()
    }
    fn draining(&self) -> bool {
        true
    }
}

#[test]
fn draining_refuses_new_subscriptions_but_serves_existing_dialogs() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    // Subscribed before the drain.
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let out = sent(&mut c);
    assert_eq!(out[0].status(), Some(200));
    let tag = out[0]
        .to()
        .ok()
        .and_then(|t| t.tag())
        .unwrap_or("")
        .to_owned();

    let d = Draining(hub());
    // A new subscription: 503 with a retry hint, no state kept.
    let new = subscribe_text(3600)
        .replace("Call-ID: c1", "Call-ID: c2")
        .replace("z9hG4bKs1", "z9hG4bKs9");
    c.handle_message(&d, &peer(), msg(&new), t0);
    let out = sent(&mut c);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].status(), Some(503));
    assert!(out[0].header_value_by_raw_name("Retry-After").is_some());
    assert_eq!(
        c.counts().0,
        1,
        "only the subscription made before the drain"
    );

    // The existing one is refreshed, then ended, in its dialog.
    let refresh = subscribe_text(0)
        .replace(
            "To: <sip:alice@example.com>",
            &format!("To: <sip:alice@example.com>;tag={tag}"),
        )
        .replace("CSeq: 1 SUBSCRIBE", "CSeq: 2 SUBSCRIBE")
        .replace("z9hG4bKs1", "z9hG4bKs2");
    c.handle_message(&d, &peer(), msg(&refresh), t0);
    let out = sent(&mut c);
    assert_eq!(out[0].status(), Some(200));
    assert_eq!(c.counts().0, 0, "unsubscribed: nothing left to drain");
}
