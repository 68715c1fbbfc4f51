//! Framing throughput of the XMPP stream framer on a realistic s2s stanza mix
//! (issue 4 target: ≥ 100 MB/s). Add to Cargo.toml:
//! `[[bench]] name = "xmpp" harness = false`, then
//! `cargo bench --bench xmpp -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use legate::xmpp::stream::{StreamEvent, StreamFramer};

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:server' \
    xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' \
    from='example.net' to='im.example.com' id='D60000229F' version='1.0'>";

/// About 1 MB of stanzas: chat messages, presence with caps and a status, pings and results,
/// whitespace keepalives; sizes 150–900 bytes, as seen on a busy federation link.
fn stanza_mix() -> Vec<u8> {
    let mut s = String::from(HEADER);
    let mut i = 0u32;
    while s.len() < 1_000_000 {
        match i % 8 {
            0..=2 => s.push_str(&format!(
                "<message from='juliet{i}@example.net/balcony' to='romeo@im.example.com' id='msg-{i:08x}' type='chat' xml:lang='en'>\
                 <body>Art thou not Romeo, and a Montague? &amp; message number {i} with some more text to make it realistic.</body>\
                 <active xmlns='http://jabber.org/protocol/chatstates'/><origin-id xmlns='urn:xmpp:sid:0' id='{i:016x}'/></message>"
            )),
            3..=4 => s.push_str(&format!(
                "<presence from='juliet{i}@example.net/balcony' to='romeo@im.example.com'><show>away</show>\
                 <status>In a meeting until 15:00 &#x2014; call me later</status><priority>5</priority>\
                 <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='http://gajim.org' ver='QgayPKawpkPSDYmwT/WM94uAlu0='/>\
                 <delay xmlns='urn:xmpp:delay' from='example.net' stamp='2026-12-01T11:00:00Z'/></presence>"
            )),
            5 => s.push_str(&format!(
                "<iq from='example.net' to='im.example.com' id='ping-{i}' type='get'><ping xmlns='urn:xmpp:ping'/></iq>"
            )),
            6 => s.push_str(&format!("<iq from='example.net' to='im.example.com' id='r-{i}' type='result'/>\n")),
            _ => s.push_str(&format!(
                "<message from='juliet{i}@example.net/balcony' to='romeo@im.example.com' id='big-{i}' type='chat'><body>{}</body>\
                 <html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'><p style='font-weight:bold'>{}</p></body></html></message>",
                "Wherefore art thou Romeo? Deny thy father and refuse thy name. ".repeat(4),
                "Or if thou wilt not, be but sworn my love. ".repeat(3)
            )),
        }
        i += 1;
    }
    s.into_bytes()
}

fn frame_all(input: &[u8], chunk: usize) -> usize {
    let mut f = StreamFramer::default();
    let mut n = 0;
    for c in input.chunks(chunk) {
        f.push(c);
        while let Ok(Some(ev)) = f.next_event() {
            if let StreamEvent::Stanza(s) = ev {
                n += black_box(s.bytes().len());
            }
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let input = stanza_mix();
    let mut g = c.benchmark_group("xmpp_framing");
    g.throughput(Throughput::Bytes(input.len() as u64));
    for chunk in [16 * 1024, 1500] {
        g.bench_function(format!("mix_1MB_chunks_{chunk}"), |b| {
            b.iter(|| frame_all(black_box(&input), chunk))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
