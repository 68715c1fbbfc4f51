//! Machine tests of the persistence of both subscription roles: records out, records back
//! in, and what a restored core owes the home side once its link is up.

use super::tests::{core, dom, env, hub, hub_with, msg, peer, sent, subscribe_text};
use super::*;

/// A local user's subscription to bob, established (200 with a tag) and approved (NOTIFY
/// active with a body-less state).
fn subscribed(c: &mut Core, h: &dyn HubPort, t0: Instant) -> SipMessage {
    c.handle_delivery(
        h,
        &dom(),
        env(
            "alice@example.com",
            "bob@partner.com",
            Body::Subscription(Subscription::Subscribe),
        ),
        t0,
    );
    let sub = sent(c).remove(0);
    let mut ok = sub.build_response(200, "OK", Some("bt")).expect("resp");
    ok.push_header("Expires", "3600").expect("hdr");
    ok.push_header("Contact", "<sip:bob@10.0.0.1>")
        .expect("hdr");
    c.handle_message(h, &peer(), ok, t0);
    let _ = sent(c);
    sub
}

fn notify_for(sub: &SipMessage, cseq: u32, state: &str) -> SipMessage {
    let call = sub.call_id().expect("call-id");
    let tag = sub
        .from()
        .ok()
        .and_then(|f| f.tag())
        .unwrap_or("")
        .to_owned();
    msg(&format!(
        "NOTIFY sip:alice@example.com:5061 SIP/2.0\n\
Via: SIP/2.0/TLS sip.partner.com:5061;branch=z9hG4bKp{cseq}\n\
Max-Forwards: 70\n\
From: <sip:bob@partner.com>;tag=bt\n\
To: <sip:alice@example.com>;tag={tag}\n\
Call-ID: {call}\n\
CSeq: {cseq} NOTIFY\n\
Event: presence\n\
Subscription-State: {state}\n\
Content-Length: 0\n\n"
    ))
}

fn puts(ops: &[StoreOp]) -> Vec<(&str, &[u8])> {
    ops.iter()
        .filter_map(|o| match o {
            StoreOp::Put { key, value } => Some((key.as_str(), value.as_slice())),
            StoreOp::Delete { .. } => None,
        })
        .collect()
}

#[test]
fn both_roles_are_written_once_and_restored_from_their_records() {
    let h = hub();
    let mut c = core();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let _ = sent(&mut c);
    let sub = subscribed(&mut c, &h, t0);
    let ops = c.take_store_ops(t0, wall, false);
    let records = puts(&ops);
    assert_eq!(records.len(), 2, "{ops:?}");
    assert!(records.iter().any(|(k, _)| k.starts_with(NOTIFIER_PREFIX)));
    assert!(records
        .iter()
        .any(|(k, _)| *k == "sip/s/alice@example.com/bob@partner.com"));
    for (k, v) in &records {
        assert!(k.len() + v.len() < 1024, "{k}: {} bytes", v.len());
    }
    // Nothing changed: nothing to write; a NOTIFY alone changes nothing stored.
    assert!(c.take_store_ops(t0, wall, false).is_empty());

    let h2 = hub();
    let mut c2 = core();
    for (k, v) in &records {
        assert_ne!(
            c2.restore_record(&h2, k, v, t0, wall),
            Restored::Dropped,
            "{k}"
        );
    }
    assert_eq!((c2.counts().0, c2.counts().1), (1, 1));
    // Restoring writes nothing back, and sends nothing to either side yet.
    assert!(c2.take_store_ops(t0, wall, false).is_empty());
    assert!(h2.got.borrow().is_empty());
    assert!(sent(&mut c2).is_empty());
    // Once the link is up, the local user's subscription is refreshed in its old dialog,
    // with a higher CSeq.
    c2.handle_link_up(&dom(), t0);
    let out = sent(&mut c2);
    assert_eq!(out.len(), 1);
    let refresh = &out[0];
    assert_eq!(refresh.method(), Some("SUBSCRIBE"));
    assert_eq!(refresh.call_id().ok(), sub.call_id().ok());
    assert_eq!(refresh.to().ok().and_then(|t| t.tag()), Some("bt"));
    assert_eq!(refresh.request_uri_str(), Some("sip:bob@10.0.0.1"));
    assert!(refresh.cseq().map(|x| x.seq).unwrap_or(0) > sub.cseq().map(|x| x.seq).unwrap_or(0));
    // Its NOTIFYs in the old dialog reach the user.
    c2.handle_message(&h2, &peer(), notify_for(&sub, 7, "active;expires=3600"), t0);
    assert_eq!(sent(&mut c2)[0].status(), Some(200));
    assert!(h2
        .got
        .borrow()
        .iter()
        .any(|e| e.to.bare_string() == "alice@example.com"));
}

#[test]
fn removal_deletes_the_record_and_unreadable_records_are_dropped_and_deleted() {
    let h = hub();
    let mut c = core();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let _ = subscribed(&mut c, &h, t0);
    assert_eq!(puts(&c.take_store_ops(t0, wall, false)).len(), 1);
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com",
            "bob@partner.com",
            Body::Subscription(Subscription::Unsubscribe),
        ),
        t0,
    );
    assert_eq!(
        c.take_store_ops(t0, wall, false),
        vec![StoreOp::Delete {
            key: "sip/s/alice@example.com/bob@partner.com".into()
        }]
    );
    let mut c2 = core();
    assert_eq!(
        c2.restore_record(&h, "sip/n/a/b/call", b"not json", t0, wall),
        Restored::Dropped
    );
    assert_eq!(
        c2.take_store_ops(t0, wall, false),
        vec![StoreOp::Delete {
            key: "sip/n/a/b/call".into()
        }]
    );
}

#[test]
fn link_up_probes_approved_watchers_and_repeats_pending_requests() {
    let h = hub();
    let mut c = core();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    // bob's watch is pending; carol's (a second dialog) approved.
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let carol = subscribe_text(3600)
        .replace("sip:bob@partner.com>;tag=b", "sip:carol@partner.com>;tag=c")
        .replace("Call-ID: c1", "Call-ID: c2")
        .replace("z9hG4bKs1", "z9hG4bKs2");
    c.handle_message(&h, &peer(), msg(&carol), t0);
    c.handle_delivery(
        &h,
        &dom(),
        env(
            "alice@example.com",
            "carol@partner.com",
            Body::Subscription(Subscription::Subscribed),
        ),
        t0,
    );
    let _ = sent(&mut c);
    let ops = c.take_store_ops(t0, wall, false);
    let h2 = hub();
    let mut c2 = core();
    for (k, v) in puts(&ops) {
        c2.restore_record(&h2, k, v, t0, wall);
    }
    // Another domain's link says nothing about these.
    c2.handle_link_up(&Domain::parse("other.com").expect("domain"), t0);
    assert!(!c2.has_link_up_work());
    c2.handle_link_up(&dom(), t0);
    assert!(c2.pump_link_up(&h2, 1), "one left after a slice of one");
    assert!(!c2.pump_link_up(&h2, 10));
    let got = h2.got.borrow();
    let mut asks: Vec<(String, Body)> = got
        .iter()
        .map(|e| (e.from.bare_string(), e.body.clone()))
        .collect();
    asks.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        asks,
        vec![
            (
                "bob@partner.com".to_string(),
                Body::Subscription(Subscription::Subscribe)
            ),
            (
                "carol@partner.com".to_string(),
                Body::Subscription(Subscription::Probe)
            ),
        ]
    );
}

#[test]
fn a_probe_creates_the_sip_subscription_when_there_is_none() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    let probe = env(
        "alice@example.com",
        "bob@partner.com",
        Body::Subscription(Subscription::Probe),
    );
    c.handle_delivery(&h, &dom(), probe.clone(), t0);
    let out = sent(&mut c);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].method(), Some("SUBSCRIBE"));
    assert_eq!(c.counts().1, 1);
    // A second probe while the SUBSCRIBE is in flight sends nothing more.
    c.handle_delivery(&h, &dom(), probe, t0);
    assert!(sent(&mut c).is_empty());
    assert_eq!(c.counts().1, 1);
}

/// A Lync edge's SUBSCRIBE (GRUU Contact, signed Record-Route, long Call-ID and tags) from
/// watcher `i` to local user `i`.
fn lync_subscribe(i: usize) -> String {
    format!(
        "SUBSCRIBE sip:user{i}@example.com SIP/2.0\n\
Via: SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bK7A1F2B3C.{i:08};branched=FALSE;ms-received-port=5061;ms-received-cid=1A2B00\n\
Max-Forwards: 69\n\
From: <sip:watcher{i}@partner.com>;tag=8d2e5f0a1b;epid=5c1f0e2d3a\n\
To: <sip:user{i}@example.com>\n\
Call-ID: 0f4c3a2b1e6d5c8b7a9f{i:016x}\n\
CSeq: 1 SUBSCRIBE\n\
Record-Route: <sip:edge.partner.com:5061;transport=tls;opaque=state:T:F:Ci.R0c3d400;lr;ms-route-sig=fa3FRQ0Nc1X9kZpeUw2_j7yS0aH4rLAAA>\n\
Contact: <sip:watcher{i}@partner.com;opaque=user:epid:wOYQ0RGBk1arJsJZRIdfrwAA;gruu>\n\
Event: presence\n\
Accept: application/msrtc-event-categories+xml\n\
Supported: ms-piggyback-first-notify\n\
Expires: 3600\n\
Content-Length: 0\n\n"
    )
}

/// Size and write throughput of foreign-watcher records (issue 11: ≤ 1 KiB per foreign
/// subscription in the store). `LEGATE_STORE_FIGURES=100000 cargo test --release --lib
/// store_figures -- --nocapture` gives the README's figures; the default run checks the size.
#[test]
fn store_figures_for_lync_watchers() {
    let n: usize = std::env::var("LEGATE_STORE_FIGURES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let h = hub_with("foreign_watchers_per_domain = 10000000\nsip_transactions_per_domain = 16384");
    let mut c = core();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    for i in 0..n {
        c.handle_message(&h, &peer(), msg(&lync_subscribe(i)), t0);
        while c.poll_action().is_some() {}
        if i % 1000 == 999 {
            c.handle_timeout(&h, t0 + Duration::from_secs(64));
        }
    }
    assert_eq!(c.counts().0, n);
    let ops = c.take_store_ops(t0, wall, false);
    assert_eq!(ops.len(), n);
    // The once-a-second pass when one subscription changed (a refresh).
    c.handle_message(&h, &peer(), msg(&lync_subscribe(n)), t0);
    while c.poll_action().is_some() {}
    let t = Instant::now();
    assert_eq!(c.take_store_ops(t0, wall, false).len(), 1);
    let pass = t.elapsed();
    // The once-a-minute safety net over the whole table.
    c.dirty = true;
    let t = Instant::now();
    assert!(c.take_store_ops(t0, wall, true).is_empty());
    let scan = t.elapsed();
    // What the journal holds per record: key + value + the record's own header.
    let bytes: usize = puts(&ops).iter().map(|(k, v)| k.len() + v.len() + 27).sum();
    let per = bytes / n;
    assert!(per <= 1024, "{per} bytes per foreign subscription");

    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let took = rt.block_on(async {
        let store: crate::store::SharedStore =
            Arc::new(crate::store::embedded::Embedded::open(dir.path()).expect("open"));
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for op in ops {
            let store = store.clone();
            set.spawn(async move {
                if let StoreOp::Put { key, value } = op {
                    store.put(&key, value).await.expect("put");
                }
            });
        }
        while set.join_next().await.is_some() {}
        t.elapsed()
    });
    let t = Instant::now();
    let reopened = crate::store::embedded::Embedded::open(dir.path()).expect("reopen");
    assert_eq!(reopened.len(), n);
    let load = t.elapsed();
    let file = std::fs::metadata(dir.path().join("state.journal"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "store figures: {n} Lync watchers, {per} B per record, journal {file} B, written in {took:?} ({:.0} records/s), loaded in {load:?}; per-second pass {pass:?}, full scan {scan:?}",
        n as f64 / took.as_secs_f64()
    );
}

#[test]
fn the_full_pass_catches_a_change_nobody_touched() {
    let h = hub();
    let mut c = core();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let _ = sent(&mut c);
    assert_eq!(puts(&c.take_store_ops(t0, wall, false)).len(), 1);
    // A state change made without a touch, only flagged.
    for n in c.notifiers.values_mut() {
        n.state = NotifierState::Active;
    }
    c.dirty = true;
    assert!(c.take_store_ops(t0, wall, false).is_empty());
    assert_eq!(puts(&c.take_store_ops(t0, wall, true)).len(), 1);
    // Flag spent: the next full pass has nothing to do.
    assert!(c.take_store_ops(t0, wall, true).is_empty());
}

#[test]
fn writes_the_store_refused_are_tried_again() {
    let h = hub();
    let mut c = core();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    c.handle_message(&h, &peer(), msg(&subscribe_text(3600)), t0);
    let _ = sent(&mut c);
    let _ = subscribed(&mut c, &h, t0);
    let ops = c.take_store_ops(t0, wall, false);
    let keys: Vec<String> = puts(&ops).iter().map(|(k, _)| k.to_string()).collect();
    assert_eq!(keys.len(), 2);
    assert!(c.take_store_ops(t0, wall, false).is_empty());
    c.store_failed(&keys);
    let again = c.take_store_ops(t0, wall, false);
    assert_eq!(again, ops, "the same records, written again");
}

#[test]
fn a_dialog_whose_key_the_store_would_refuse_is_not_written_nor_retried() {
    let h = hub();
    let mut c = core();
    let (t0, wall) = (Instant::now(), SystemTime::now());
    let long = "x".repeat(crate::store::MAX_KEY);
    let text = subscribe_text(3600).replace("Call-ID: c1", &format!("Call-ID: {long}"));
    c.handle_message(&h, &peer(), msg(&text), t0);
    let _ = sent(&mut c);
    assert_eq!(c.counts().0, 1);
    assert!(c.take_store_ops(t0, wall, false).is_empty());
    c.dirty = true;
    assert!(c.take_store_ops(t0, wall, true).is_empty());
}

/// A cheap pass encodes a chunk of the touched notifiers; the rest wait and come a chunk at a
/// time, each record once, and a notifier touched again while it waits is not written twice.
#[test]
fn touched_notifiers_are_written_a_chunk_at_a_time_and_once_each() {
    let h = hub();
    let mut c = core();
    let t0 = Instant::now();
    for i in 0..5 {
        let text = subscribe_text(3600)
            .replace("bob@partner.com", &format!("bob{i}@partner.com"))
            .replace("Call-ID: c1", &format!("Call-ID: c{i}"))
            .replace("z9hG4bKs1", &format!("z9hG4bKs{i}x"));
        c.handle_message(&h, &peer(), msg(&text), t0);
    }
    let _ = sent(&mut c);
    let wall = SystemTime::now();
    let first = c.take_store_ops_upto(t0, wall, false, 2);
    assert_eq!(puts(&first).len(), 2);
    assert!(c.has_store_backlog());
    let mut keys: Vec<String> = puts(&first).iter().map(|(k, _)| k.to_string()).collect();
    while c.has_store_backlog() {
        let ops = c.take_store_backlog(t0, wall, 2);
        assert!(puts(&ops).len() <= 2);
        keys.extend(puts(&ops).iter().map(|(k, _)| k.to_string()));
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(
        c.take_store_ops(t0, wall, false).is_empty(),
        "nothing twice"
    );
}
