//! Presence hot paths: one table translation, and whole conversions wire → state → wire.
//! Run: `cargo bench --bench presence`. Figures go in README.md's performance table.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use legate::presence::map::{self, Facts};
use std::hint::black_box;

fn translate(c: &mut Criterion) {
    let set = map::embedded().expect("defaults");
    let lync = set.system_id("lync").expect("lync");
    let xmpp = set.system_id("xmpp").expect("xmpp");
    let busy = set.system(lync).state_id("busy").expect("busy");
    let mut g = c.benchmark_group("translate");
    g.throughput(Throughput::Elements(1));
    g.bench_function("lync busy -> xmpp (table row, no user text)", |b| {
        b.iter(|| {
            set.translate(black_box(lync), black_box(xmpp), black_box(busy), None)
                .state
        })
    });
    let sametime = set.system_id("sametime").expect("sametime");
    let meeting = set
        .system(sametime)
        .state_id("in_a_meeting")
        .expect("state");
    g.bench_function(
        "sametime in_a_meeting -> lync (canonical, user text)",
        |b| {
            b.iter(|| {
                set.translate(
                    black_box(sametime),
                    black_box(lync),
                    black_box(meeting),
                    Some("Weekly sync"),
                )
                .state
            })
        },
    );
    g.bench_function("lync decode availability 6500 + translate", |b| {
        b.iter(|| {
            let facts = Facts {
                availability: Some(black_box(6500)),
                ..Facts::default()
            };
            let d = set.decode(lync, &facts);
            set.translate(lync, xmpp, d.state, d.note).state
        })
    });
    g.finish();
}

criterion_group!(benches, translate);

fn conversions(c: &mut Criterion) {
    use legate::presence::codec::xmpp::{encode_presence, PresenceAttrs};
    use legate::presence::convert::{sip_to_xmpp, SipBodyKind};
    let set = map::embedded().expect("defaults");
    let lync = set.system_id("lync").expect("lync");
    let xmpp = set.system_id("xmpp").expect("xmpp");
    let pidf = include_bytes!(
        "../tests/data/presence/sip-xmpp-rfc8048/ex04-F10-sip-notify-pidf.body.pidf.xml"
    );
    let msrtc =
        include_bytes!("../tests/data/presence/real-traces/sfb2016-roaming-categories-fragment-tieto-sipe-issue119.xml");
    let attrs = PresenceAttrs {
        from: Some("juliet@example.com".into()),
        to: Some("romeo@example.net".into()),
        ..PresenceAttrs::default()
    };
    let mut g = c.benchmark_group("convert");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(512);
    for (name, kind, body) in [
        (
            "PIDF (RFC 8048 ex.4, 284 B) -> map -> XMPP presence bytes",
            SipBodyKind::Pidf,
            &pidf[..],
        ),
        (
            "msrtc (SfB trace, 1.5 KB) -> map -> XMPP presence bytes",
            SipBodyKind::Msrtc,
            &msrtc[..],
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                let p = sip_to_xmpp(&set, lync, xmpp, kind, black_box(body))
                    .expect("valid")
                    .expect("has state");
                encode_presence(&p, &attrs, &mut out);
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group!(convert, conversions);
criterion_main!(benches, convert);
