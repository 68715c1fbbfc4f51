//! The consent decision table, branch by branch, and the consent stage on envelopes.

use super::*;
use crate::config::{self, BUILTIN_SYSTEMS};
use crate::presence::map;
use std::path::Path;
use std::sync::Mutex;

const CONFIG: &str = r#"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[xmpp.federation]
mode = "allow_list"
[[xmpp.federation.domain]]
name = "jabber.test"
system = "fed-xmpp"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
default_system = "xmpp"
"#;

fn setup() -> (Config, MappingSet) {
    let cfg =
        config::from_toml(CONFIG, Path::new("test.toml"), BUILTIN_SYSTEMS).expect("valid config");
    (cfg, map::embedded().expect("maps"))
}

fn addr(s: &str) -> Address {
    Address::parse(s).expect("address")
}

fn dom(s: &str) -> Domain {
    Domain::parse(s).expect("domain")
}

fn env(from: &str, to: &str, body: Body) -> Envelope {
    Envelope {
        from: addr(from),
        to: addr(to),
        body,
        stanza_id: None,
        via_cluster: None,
    }
}

fn home() -> Origin {
    Origin::Component {
        home_node: Arc::from("hn1"),
    }
}

fn home_link() -> Link {
    Link::Component {
        home_node: Arc::from("hn1"),
    }
}

fn s2s(d: &str) -> (Origin, Link) {
    (Origin::S2s { domain: dom(d) }, Link::S2s { domain: dom(d) })
}

fn sip(d: &str) -> (Origin, Link) {
    (Origin::Sip { domain: dom(d) }, Link::Sip { domain: dom(d) })
}

const ALICE: &str = "alice@example.com";

#[test]
fn the_decision_table() {
    let p = Policies::default();
    let alice = addr(ALICE);
    let bob = addr("bob@partner.com");
    let carol = addr("carol@partner.com");
    // No lists at all: undecided.
    assert_eq!(p.consent(&alice, &bob), Consent::Undecided);
    // Another user's lists do not apply to alice.
    p.set(
        "zoe@example.com",
        Target::Domain(dom("partner.com")),
        Some(Verdict::Block),
    )
    .expect("set");
    assert_eq!(p.consent(&alice, &bob), Consent::Undecided);
    // Domain entry covers every watcher of that domain, and only that domain (exact match:
    // a subdomain is another domain).
    p.set(
        ALICE,
        Target::Domain(dom("partner.com")),
        Some(Verdict::Block),
    )
    .expect("set");
    assert_eq!(p.consent(&alice, &bob), Consent::Blocked);
    assert_eq!(p.consent(&alice, &carol), Consent::Blocked);
    assert_eq!(
        p.consent(&alice, &addr("bob@eu.partner.com")),
        Consent::Undecided
    );
    // A JID entry beats its domain's, both ways.
    p.set(
        ALICE,
        Target::Jid("bob@partner.com".into()),
        Some(Verdict::Allow),
    )
    .expect("set");
    assert_eq!(p.consent(&alice, &bob), Consent::Allowed);
    assert_eq!(p.consent(&alice, &carol), Consent::Blocked);
    p.set(
        ALICE,
        Target::Domain(dom("partner.com")),
        Some(Verdict::Allow),
    )
    .expect("set");
    p.set(
        ALICE,
        Target::Jid("carol@partner.com".into()),
        Some(Verdict::Block),
    )
    .expect("set");
    assert_eq!(p.consent(&alice, &carol), Consent::Blocked);
    assert_eq!(
        p.consent(&alice, &addr("dave@partner.com")),
        Consent::Allowed
    );
    // Resources and case do not matter: lists hold bare, case-folded JIDs.
    assert_eq!(
        p.consent(
            &addr("Alice@example.com/desk"),
            &addr("Carol@partner.com/x")
        ),
        Consent::Blocked
    );
    // Removing entries falls back to the less specific one, then to undecided; the user
    // disappears with the last entry.
    p.set(ALICE, Target::Jid("carol@partner.com".into()), None)
        .expect("unset");
    assert_eq!(p.consent(&alice, &carol), Consent::Allowed);
    p.set(ALICE, Target::Domain(dom("partner.com")), None)
        .expect("unset");
    p.set(ALICE, Target::Jid("bob@partner.com".into()), None)
        .expect("unset");
    assert_eq!(p.consent(&alice, &carol), Consent::Undecided);
    assert!(p.lists(ALICE).entries().is_empty());
    assert_eq!(p.len(), 1, "only zoe keeps lists");
}

#[test]
fn targets_parse_and_round_trip_through_store_keys() {
    assert_eq!(
        Target::parse("Bob@Partner.com").expect("jid"),
        Target::Jid("bob@partner.com".into())
    );
    assert_eq!(
        Target::parse("partner.com").expect("domain"),
        Target::Domain(dom("partner.com"))
    );
    for bad in [
        "bob@",
        "@partner.com",
        "a b@partner.com",
        "",
        "bad..domain",
        "x@y@z",
    ] {
        assert!(
            matches!(Target::parse(bad), Err(PolicyError::BadTarget { .. })),
            "{bad:?} accepted"
        );
    }
    assert!(matches!(
        Target::parse("bob@partner.com/phone"),
        Err(PolicyError::HasResource(_))
    ));
    for t in [
        Target::Jid("bob@partner.com".into()),
        Target::Domain(dom("partner.com")),
    ] {
        assert_eq!(Target::from_key(&t.key()), Some(t));
    }
    assert_eq!(Target::from_key("jid:partner.com"), None);
    assert_eq!(Target::from_key("other:x"), None);
    assert!(covers(
        &domain_wide(&dom("partner.com")),
        &addr("x@partner.com")
    ));
    assert!(!covers(
        &domain_wide(&dom("partner.com")),
        &addr("x@other.com")
    ));
    assert!(covers(&addr("x@partner.com"), &addr("x@partner.com")));
    assert!(!covers(&addr("x@partner.com"), &addr("y@partner.com")));
}

#[test]
fn lists_are_bounded_per_user() {
    let p = Policies::default();
    for i in 0..MAX_ENTRIES_PER_USER {
        p.apply(
            ALICE,
            &Target::Jid(format!("u{i}@partner.com")),
            Some(Verdict::Block),
        )
        .expect("within the bound");
    }
    assert_eq!(
        p.apply(
            ALICE,
            &Target::Jid("one-more@partner.com".into()),
            Some(Verdict::Block)
        ),
        Err(Full::Entries)
    );
    // Changing an existing entry is not growth.
    p.apply(
        ALICE,
        &Target::Jid("u0@partner.com".into()),
        Some(Verdict::Allow),
    )
    .expect("replace");
}

#[test]
fn changes_are_written_through_the_sink_but_applied_ones_are_not() {
    let p = Policies::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    p.set_sink(Box::new(move |c| s.lock().expect("lock").push(c)));
    p.set(
        ALICE,
        Target::Domain(dom("partner.com")),
        Some(Verdict::Block),
    )
    .expect("set");
    p.apply(
        ALICE,
        &Target::Jid("bob@partner.com".into()),
        Some(Verdict::Allow),
    )
    .expect("apply");
    let seen = seen.lock().expect("lock");
    assert_eq!(
        *seen,
        vec![Change {
            user: ALICE.into(),
            target: Target::Domain(dom("partner.com")),
            verdict: Some(Verdict::Block),
            by_admin: false,
        }]
    );
}

#[test]
fn a_blocked_watchers_request_never_reaches_the_home_node_and_is_not_answered() {
    let (cfg, maps) = setup();
    let p = Policies::default();
    p.set(
        ALICE,
        Target::Domain(dom("partner.com")),
        Some(Verdict::Block),
    )
    .expect("set");
    let (origin, _) = sip("partner.com");
    for s in [Subscription::Subscribe, Subscription::Probe] {
        let e = env("bob@partner.com", ALICE, Body::Subscription(s));
        let r = p
            .screen(&cfg, &maps, &origin, &home_link(), e)
            .expect_err("blocked");
        assert_eq!(r.denied, Denied::Blocked);
        assert!(!r.denied.answered(), "a block is never told");
    }
    assert_eq!(p.pending_len(), 0);
    // Other watchers' requests pass and are remembered as pending; their end passes too.
    let (origin, _) = s2s("jabber.test");
    let e = env(
        "eve@jabber.test",
        ALICE,
        Body::Subscription(Subscription::Subscribe),
    );
    let out = p
        .screen(&cfg, &maps, &origin, &home_link(), e.clone())
        .expect("undecided passes");
    assert_eq!(out, e);
    assert_eq!(p.pending_len(), 1);
}

#[test]
fn an_allowed_watcher_passes_without_becoming_pending() {
    let (cfg, maps) = setup();
    let p = Policies::default();
    p.set(
        ALICE,
        Target::Jid("bob@partner.com".into()),
        Some(Verdict::Allow),
    )
    .expect("set");
    let (origin, _) = sip("partner.com");
    let e = env(
        "bob@partner.com",
        ALICE,
        Body::Subscription(Subscription::Subscribe),
    );
    assert!(p.screen(&cfg, &maps, &origin, &home_link(), e).is_ok());
    assert_eq!(p.pending_len(), 0);
}

#[test]
fn the_users_answers_are_stored_and_a_refusal_leaves_as_offline_presence() {
    let (cfg, maps) = setup();
    for (origin, link, system) in [
        (sip("partner.com").0, sip("partner.com").1, None),
        (s2s("jabber.test").0, s2s("jabber.test").1, Some("fed-xmpp")),
    ] {
        let p = Policies::default();
        let watcher = match &link {
            Link::Sip { .. } => "bob@partner.com",
            _ => "eve@jabber.test",
        };
        let ask = env(watcher, ALICE, Body::Subscription(Subscription::Subscribe));
        p.screen(&cfg, &maps, &origin, &home_link(), ask.clone())
            .expect("pending");
        // Alice refuses: stored as a block; an XMPP watcher gets offline presence, not
        // `unsubscribed`.
        let no = env(
            ALICE,
            watcher,
            Body::Subscription(Subscription::Unsubscribed),
        );
        let out = p
            .screen(&cfg, &maps, &home(), &link, no.clone())
            .expect("rewritten");
        match system {
            Some(system) => assert_eq!(
                out.body,
                Body::Presence(PresenceBody {
                    system: Arc::from(system),
                    state: Arc::from(OFFLINE),
                    note: None,
                    priority: None,
                })
            ),
            // The SIP core shows it as offline NOTIFYs of a live subscription.
            None => assert_eq!(out, no),
        }
        assert_eq!(p.consent(&addr(ALICE), &addr(watcher)), Consent::Blocked);
        assert_eq!(p.pending_len(), 0);
        // The watcher asks again: it stops here now.
        assert!(p
            .screen(&cfg, &maps, &origin, &home_link(), ask.clone())
            .is_err());
        // Alice approves after all (from her client): stored as allow, and sent.
        let yes = env(ALICE, watcher, Body::Subscription(Subscription::Subscribed));
        let out = p
            .screen(&cfg, &maps, &home(), &link, yes.clone())
            .expect("approval passes");
        assert_eq!(out, yes);
        assert_eq!(p.consent(&addr(ALICE), &addr(watcher)), Consent::Allowed);
        // Revoking an approval is a refusal too.
        let no = env(
            ALICE,
            watcher,
            Body::Subscription(Subscription::Unsubscribed),
        );
        p.screen(&cfg, &maps, &home(), &link, no)
            .expect("rewritten");
        assert_eq!(p.consent(&addr(ALICE), &addr(watcher)), Consent::Blocked);
    }
}

#[test]
fn an_answer_to_a_strangers_probe_is_no_decision_but_still_never_leaks() {
    let (cfg, maps) = setup();
    let p = Policies::default();
    let (_, link) = s2s("jabber.test");
    let no = env(
        ALICE,
        "eve@jabber.test",
        Body::Subscription(Subscription::Unsubscribed),
    );
    let out = p
        .screen(&cfg, &maps, &home(), &link, no)
        .expect("rewritten");
    assert!(matches!(out.body, Body::Presence(_)));
    assert_eq!(
        p.consent(&addr(ALICE), &addr("eve@jabber.test")),
        Consent::Undecided
    );
}

#[test]
fn presence_toward_a_blocked_watcher_is_offline_on_s2s_and_left_to_the_sip_core() {
    let (cfg, maps) = setup();
    let p = Policies::default();
    p.set(
        ALICE,
        Target::Domain(dom("jabber.test")),
        Some(Verdict::Block),
    )
    .expect("set");
    p.set(
        ALICE,
        Target::Domain(dom("partner.com")),
        Some(Verdict::Block),
    )
    .expect("set");
    let busy = |system: &str| {
        Body::Presence(PresenceBody {
            system: Arc::from(system),
            state: Arc::from("busy"),
            note: Some("In a meeting".into()),
            priority: None,
        })
    };
    let e = env(ALICE, "eve@jabber.test", busy("fed-xmpp"));
    let out = p
        .screen(&cfg, &maps, &home(), &s2s("jabber.test").1, e)
        .expect("rewritten");
    assert_eq!(
        out.body,
        Body::Presence(PresenceBody {
            system: Arc::from("fed-xmpp"),
            state: Arc::from(OFFLINE),
            note: None,
            priority: None,
        })
    );
    // The SIP core keeps the real state and shows offline while blocked.
    let e = env(ALICE, "bob@partner.com", busy("lync"));
    let out = p
        .screen(&cfg, &maps, &home(), &sip("partner.com").1, e.clone())
        .expect("passes");
    assert_eq!(out, e);
    // Unblocked watchers see the state.
    let e = env(ALICE, "eve@jabber.test", busy("fed-xmpp"));
    p.set(
        ALICE,
        Target::Jid("eve@jabber.test".into()),
        Some(Verdict::Allow),
    )
    .expect("set");
    let out = p
        .screen(&cfg, &maps, &home(), &s2s("jabber.test").1, e.clone())
        .expect("passes");
    assert_eq!(out, e);
}

#[test]
fn a_foreign_watchers_unsubscribe_and_unavailable_pass_untouched() {
    let (cfg, maps) = setup();
    let p = Policies::default();
    let (origin, _) = s2s("jabber.test");
    for body in [
        Body::Subscription(Subscription::Unsubscribe),
        Body::Subscription(Subscription::Subscribed),
        Body::Subscription(Subscription::Unsubscribed),
    ] {
        let e = env("eve@jabber.test", ALICE, body);
        let out = p
            .screen(&cfg, &maps, &origin, &home_link(), e.clone())
            .expect("passes");
        assert_eq!(out, e);
    }
    assert!(p.is_empty());
}

mod admin_changes {
    use super::*;
    use crate::gateway::hub::Hub;
    use crate::gateway::policy::admin::{change, local_user, Op};
    use crate::presence::map::MappingStore;

    fn hub() -> Arc<Hub> {
        let (cfg, _) = setup();
        Hub::new(cfg, MappingStore::open(None).expect("maps"))
    }

    #[test]
    fn admins_name_local_users_by_bare_jid() {
        let h = hub();
        assert!(local_user(&h, ALICE).is_ok());
        assert!(matches!(
            local_user(&h, "alice@partner.com"),
            Err(PolicyError::NotLocalUser(_))
        ));
        assert!(matches!(
            local_user(&h, "alice@example.com/desk"),
            Err(PolicyError::HasResource(_))
        ));
        assert!(matches!(
            local_user(&h, "example.com"),
            Err(PolicyError::BadUser { .. })
        ));
    }

    #[test]
    fn a_change_tells_the_watchers_at_once() {
        let h = hub();
        let mut sip_rx = h.register_sip(8);
        let mut s2s_rx = h.register_s2s(8);
        let mut home_rx = h.register_component("hn1", 8);
        let alice = addr(ALICE);
        // A SIP domain block: the SIP core hears of the whole domain.
        change(&h, &alice, &Target::Domain(dom("partner.com")), Op::Block).expect("block");
        let d = sip_rx.try_recv().expect("SIP told");
        assert_eq!(d.envelope.to, domain_wide(&dom("partner.com")));
        assert_eq!(
            d.envelope.body,
            Body::Subscription(Subscription::Unsubscribed)
        );
        // Unblocked: told again, as a consent.
        change(&h, &alice, &Target::Domain(dom("partner.com")), Op::Unblock).expect("unblock");
        let d = sip_rx.try_recv().expect("SIP told");
        assert_eq!(
            d.envelope.body,
            Body::Subscription(Subscription::Subscribed)
        );
        // An XMPP watcher blocked: unavailable presence, nothing else.
        let eve = Target::Jid("eve@jabber.test".into());
        change(&h, &alice, &eve, Op::Block).expect("block");
        let d = s2s_rx.try_recv().expect("s2s told");
        assert!(matches!(&d.envelope.body, Body::Presence(p) if &*p.state == OFFLINE));
        assert_eq!(d.envelope.to, addr("eve@jabber.test"));
        assert!(home_rx.try_recv().is_err());
        // Unblocked: the home node is probed on the watcher's behalf.
        change(&h, &alice, &eve, Op::Unblock).expect("unblock");
        let d = home_rx.try_recv().expect("home probed");
        assert_eq!(d.envelope.from, addr("eve@jabber.test"));
        assert_eq!(d.envelope.body, Body::Subscription(Subscription::Probe));
        // An allow changes the list only.
        change(&h, &alice, &eve, Op::Allow).expect("allow");
        assert!(home_rx.try_recv().is_err() && s2s_rx.try_recv().is_err());
        assert_eq!(
            h.policies().consent(&alice, &addr("eve@jabber.test")),
            Consent::Allowed
        );
    }
}

#[test]
fn an_admin_block_holds_against_the_home_nodes_late_approval() {
    let (cfg, maps) = setup();
    let p = Policies::default();
    let (origin, link) = sip("partner.com");
    let watcher = "bob@partner.com";
    // bob asks; before alice's server answers, the admin blocks him.
    let ask = env(watcher, ALICE, Body::Subscription(Subscription::Subscribe));
    p.screen(&cfg, &maps, &origin, &home_link(), ask)
        .expect("pending");
    p.admin_set(ALICE, Target::Jid(watcher.into()), Some(Verdict::Block))
        .expect("admin block");
    // The server's answer to the request in flight (or its automatic re-send for a roster
    // approved long ago) does not lift the block.
    let yes = env(ALICE, watcher, Body::Subscription(Subscription::Subscribed));
    let _ = p.screen(&cfg, &maps, &home(), &link, yes.clone());
    assert_eq!(p.consent(&addr(ALICE), &addr(watcher)), Consent::Blocked);
    // A domain-wide admin block holds the same way for a watcher without an entry.
    let carol = "carol@partner.com";
    p.admin_set(
        ALICE,
        Target::Domain(dom("partner.com")),
        Some(Verdict::Block),
    )
    .expect("admin domain block");
    let yes = env(ALICE, carol, Body::Subscription(Subscription::Subscribed));
    let _ = p.screen(&cfg, &maps, &home(), &link, yes);
    assert_eq!(p.consent(&addr(ALICE), &addr(carol)), Consent::Blocked);
    // The admin's unblock lifts it; then the user's answers count again.
    p.admin_set(ALICE, Target::Jid(watcher.into()), None)
        .expect("unblock");
    p.admin_set(ALICE, Target::Domain(dom("partner.com")), None)
        .expect("unblock domain");
    let yes = env(ALICE, watcher, Body::Subscription(Subscription::Subscribed));
    let _ = p.screen(&cfg, &maps, &home(), &link, yes);
    assert_eq!(p.consent(&addr(ALICE), &addr(watcher)), Consent::Allowed);
    // A block that came from the user (a refusal) is still lifted by the user's approval.
    let no = env(ALICE, carol, Body::Subscription(Subscription::Unsubscribed));
    p.screen(
        &cfg,
        &maps,
        &origin,
        &home_link(),
        env(carol, ALICE, Body::Subscription(Subscription::Subscribe)),
    )
    .expect("pending");
    let _ = p.screen(&cfg, &maps, &home(), &link, no);
    assert_eq!(p.consent(&addr(ALICE), &addr(carol)), Consent::Blocked);
    let yes = env(ALICE, carol, Body::Subscription(Subscription::Subscribed));
    let _ = p.screen(&cfg, &maps, &home(), &link, yes);
    assert_eq!(p.consent(&addr(ALICE), &addr(carol)), Consent::Allowed);
}

#[test]
fn jid_entries_are_found_replaced_removed_and_listed_in_order() {
    let p = Policies::new();
    for w in ["c@x.test", "a@x.test", "b@x.test"] {
        p.apply(
            "u@example.com",
            &Target::Jid(w.into()),
            Some(Verdict::Allow),
        )
        .expect("room");
    }
    p.apply(
        "u@example.com",
        &Target::Jid("b@x.test".into()),
        Some(Verdict::Block),
    )
    .expect("room");
    p.apply("u@example.com", &Target::Jid("c@x.test".into()), None)
        .expect("room");
    let listed: Vec<_> = p.lists("u@example.com").entries();
    assert_eq!(
        listed,
        vec![
            (Target::Jid("a@x.test".into()), Verdict::Allow),
            (Target::Jid("b@x.test".into()), Verdict::Block),
        ]
    );
    let addr = |a: &str| crate::gateway::Address::parse(a).expect("address");
    assert_eq!(
        p.consent(&addr("u@example.com"), &addr("b@x.test")),
        Consent::Blocked
    );
    assert_eq!(
        p.consent(&addr("u@example.com"), &addr("c@x.test")),
        Consent::Undecided
    );
}

/// A user's JID entries in one buffer (issue 11 item 10): found, updated, listed in order,
/// and the bytes of removed ones given back once they are half the buffer.
#[test]
fn jid_entries_share_one_buffer_and_give_back_removed_ones() {
    let mut l = JidList::default();
    let jid = |i: usize| format!("w{i:03}@partner.test");
    for i in (0..40).rev() {
        let v = if i % 3 == 0 {
            Verdict::Block
        } else {
            Verdict::Allow
        };
        l.insert(&jid(i), v);
    }
    assert_eq!(l.len(), 40);
    assert_eq!(l.get(&jid(3)), Some(&Verdict::Block));
    assert_eq!(l.get(&jid(4)), Some(&Verdict::Allow));
    assert_eq!(l.get("w999@partner.test"), None);
    l.insert(&jid(4), Verdict::Block);
    assert_eq!(l.get(&jid(4)), Some(&Verdict::Block));
    assert_eq!(l.len(), 40, "an update adds nothing");
    let listed: Vec<String> = l.iter().map(|(j, _)| j.to_string()).collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted);
    let full = l.bytes.len();
    for i in 0..30 {
        l.remove(&jid(i));
        assert!(!l.contains_key(&jid(i)));
    }
    assert_eq!(l.len(), 10);
    assert!(
        l.bytes.len() < full / 2,
        "{} of {full} bytes",
        l.bytes.len()
    );
    for i in 30..40 {
        assert!(l.contains_key(&jid(i)), "{i}");
    }
    let mut other = JidList::default();
    for (j, v) in l.iter() {
        other.insert(j, *v);
    }
    assert_eq!(l, other, "equal by content, not by buffer");
    for i in 30..40 {
        l.remove(&jid(i));
    }
    assert!(l.is_empty() && l.bytes.capacity() == 0);
}
