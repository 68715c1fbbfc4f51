//! SIP codec round trip: parse a datagram; if it parses, serialize, parse again and require the
//! same bytes and fields; the validator's verdict must not change. The same input is also fed
//! to the stream framer in two pieces, which must never panic and whose messages must
//! re-serialize to exactly the framed bytes.
#![no_main]

use legate::sip::{parse_datagram, validate, Frame, Framer, SipMessage};
use libfuzzer_sys::fuzz_target;

fn touch(m: &SipMessage) {
    // Every lazy accessor must be total on whatever the parser accepted.
    let _ = m.via_top();
    let _ = m.vias();
    let _ = m.from();
    let _ = m.to();
    let _ = m.call_id();
    let _ = m.cseq();
    let _ = m.max_forwards();
    let _ = m.contacts();
    let _ = m.routes();
    let _ = m.record_routes();
    let _ = m.content_type();
    let _ = m.expires();
    let _ = m.event();
    let _ = m.subscription_state();
    let _ = m.accept();
    let _ = m.ms_text_format();
    let _ = m.request_uri();
    let _ = m.build_response(400, "Bad Request", Some("x"));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = parse_datagram(data) {
        touch(&m);
        let out = m.to_bytes();
        assert!(
            data.starts_with(&out),
            "serialization is a prefix of the datagram"
        );
        assert_eq!(out.len(), m.encoded_len());
        let again = match parse_datagram(&out) {
            Ok(a) => a,
            Err(e) => panic!("serialized message does not re-parse: {e}"),
        };
        assert_eq!(again.to_bytes(), out);
        assert_eq!(again.method(), m.method());
        assert_eq!(again.status(), m.status());
        assert_eq!(again.body(), m.body());
        assert_eq!(again.header_count(), m.header_count());
        for (a, b) in again.headers().zip(m.headers()) {
            assert_eq!(a.raw_line, b.raw_line);
            assert_eq!(a.value, b.value);
        }
        assert_eq!(validate(&again), validate(&m));
    }

    let mut f = Framer::new(4096, 65536);
    let mid = data.len() / 2;
    for part in [
        data.get(..mid).unwrap_or(&[]),
        data.get(mid..).unwrap_or(&[]),
    ] {
        f.push(part);
        loop {
            match f.next() {
                Ok(Some(Frame::Message(m))) => {
                    touch(&m);
                    let b = m.to_bytes();
                    assert_eq!(b, m.original_bytes().clone());
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
});
