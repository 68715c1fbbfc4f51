//! Parse + route decision + serialize of a Lync-style in-dialog MESSAGE (issue 6 target:
//! ≥ 150 000/s on one core). The route decision reads what a proxy routes on: top Via (branch,
//! sent-by), Call-ID, To (URI host and tag), CSeq, Max-Forwards, and the Request-URI. A second
//! case adds full strict validation (what the edge actually runs on every message).
//!
//! Add to Cargo.toml:
//! ```toml
//! [[bench]]
//! name = "sip"
//! harness = false
//! ```

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use legate::sip::{parse_bytes, validate, BodyMode, SipMessage};

fn lync_message() -> Bytes {
    let body = "Hello from Skype \u{1F44B}";
    let text = format!(
        "MESSAGE sip:alice@contoso.com;opaque=user:epid:wOYQ0RGBk1arJsJZRIdfrwAA;gruu SIP/2.0\r\n\
Via: SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bK7A1F2B3C.9D8E7F6A;branched=FALSE;ms-received-port=5061;ms-received-cid=1A2B00\r\n\
Via: SIP/2.0/TLS 10.0.0.5:49152;branch=z9hG4bK1234abcd;ms-received-port=49152;ms-received-cid=2B00\r\n\
Max-Forwards: 69\r\n\
Route: <sip:edge.contoso.com:5061;transport=tls;opaque=state:T:F:Ci.R0a1b200;lr;ms-route-sig=ba9xLk2Vdj3_rlqWxYz0FtR2pIRnaE2Q0TsYdpEAAA>\r\n\
Record-Route: <sip:edge.fabrikam.com:5061;transport=tls;opaque=state:T:F:Ci.R0c3d400;lr;ms-route-sig=fa3FRQ0Nc1X9kZpeUw2_j7yS0aH4rLAAA>\r\n\
Content-Length: {}\r\n\
From: \"Bob Jones\" <sip:bob@fabrikam.com>;tag=8e4a9cb2b1;epid=5d2e1a0b3c\r\n\
To: <sip:alice@contoso.com>;tag=a1b2c3d4e5;epid=0f1e2d3c4b\r\n\
Call-ID: 3f1b2c9e8d7a4b6c9e0f1a2b3c4d5e6f\r\n\
CSeq: 3 MESSAGE\r\n\
User-Agent: UCCAPI/16.0.4849.1000 OC/16.0.4849.1000 (Skype for Business)\r\n\
Supported: ms-dialog-route-set-update\r\n\
Supported: timer\r\n\
Content-Type: text/plain; charset=UTF-8\r\n\
Ms-Conversation-ID: AdKhLhIjc2ZYoWpvRmaxxB3tmCunSw==\r\n\
\r\n{body}",
        body.len()
    );
    Bytes::from(text)
}

/// What a proxy reads to route; returns something so nothing is optimised away.
fn route_decision(m: &SipMessage) -> Option<usize> {
    let via = m.via_top().ok()?;
    let branch = via.branch()?;
    let call_id = m.call_id().ok()?;
    let to = m.to().ok()?;
    let host = to.uri.as_sip()?.host().as_str();
    let tag = to.tag();
    let cseq = m.cseq().ok()?;
    let mf = m.max_forwards().ok()??;
    let ruri = m.request_uri()?.ok()?;
    Some(
        branch.len()
            + via.sent_by().len()
            + call_id.len()
            + host.len()
            + tag.map_or(0, str::len)
            + cseq.seq as usize
            + usize::from(mf)
            + ruri.as_str().len(),
    )
}

fn bench(c: &mut Criterion) {
    let raw = lync_message();
    // The fixture must take the full path, or the numbers would measure an early return.
    let check = parse_bytes(raw.clone(), BodyMode::Exact);
    assert!(check
        .as_ref()
        .is_ok_and(|m| validate(m).is_ok() && route_decision(m).is_some()));
    let mut g = c.benchmark_group("sip");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(2048);
    g.bench_function(format!("parse_route_serialize_{}B", raw.len()), |b| {
        b.iter(|| {
            let m = parse_bytes(black_box(raw.clone()), BodyMode::Exact);
            let Ok(m) = m else { return 0 };
            let r = route_decision(&m).unwrap_or(0);
            out.clear();
            m.write_to(&mut out);
            black_box(r + out.len())
        })
    });
    g.bench_function("parse_validate_route_serialize", |b| {
        b.iter(|| {
            let m = parse_bytes(black_box(raw.clone()), BodyMode::Exact);
            let Ok(m) = m else { return 0 };
            if validate(&m).is_err() {
                return 0;
            }
            let r = route_decision(&m).unwrap_or(0);
            out.clear();
            m.write_to(&mut out);
            black_box(r + out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
