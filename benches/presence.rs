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
criterion_main!(benches);
