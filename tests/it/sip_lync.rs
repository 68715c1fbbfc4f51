//! Lync / Skype for Business shaped messages (written for Legate, not captured traffic): every
//! one must come back byte-exact from parse → serialize, and the typed accessors must return
//! the exact parameter strings routing uses (the faults that ruled out rsip, crates.md "SIP").

use bytes::Bytes;
use legate::sip::header::HeaderName;
use legate::sip::{check_datagram, Frame, Framer, Host, SipMessage, Uri};

/// Builds a message from header lines and a body: CRLF line ends, `Content-Length` computed so
/// the fixtures stay honest.
fn build(lines: &[&str], body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for l in lines {
        let l = l.replace("{CL}", &body.len().to_string());
        v.extend_from_slice(l.as_bytes());
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"\r\n");
    v.extend_from_slice(body);
    v
}

fn accept(raw: &[u8]) -> SipMessage {
    match check_datagram(raw) {
        Ok(m) => {
            assert_eq!(
                &m.to_bytes()[..],
                raw,
                "serialize must give the exact bytes back"
            );
            m
        }
        Err(r) => panic!("refused: {r}"),
    }
}

const GRUU: &str = "sip:alice@contoso.com;opaque=user:epid:wOYQ0RGBk1arJsJZRIdfrwAA;gruu";
const ROUTE: &str = "<sip:edge.contoso.com:5061;transport=tls;opaque=state:T:F:Ci.R0a1b200;lr;ms-route-sig=ba9xLk2Vdj3_rlqWxYz0FtR2pIRnaE2Q0TsYdpEAAA>";
const RR: &str = "<sip:edge.fabrikam.com:5061;transport=tls;opaque=state:T:F:Ci.R0c3d400;lr;ms-route-sig=fa3FRQ0Nc1X9kZpeUw2_j7yS0aH4rLAAA>";

/// A MESSAGE to a GRUU inside a dialog (the bench uses the same shape).
pub fn lync_message() -> Vec<u8> {
    build(
        &[
            &format!("MESSAGE {GRUU} SIP/2.0"),
            "Via: SIP/2.0/TLS 192.0.2.10:5061;branch=z9hG4bK7A1F2B3C.9D8E7F6A;branched=FALSE;ms-received-port=5061;ms-received-cid=1A2B00",
            "Via: SIP/2.0/TLS 10.0.0.5:49152;branch=z9hG4bK1234abcd;ms-received-port=49152;ms-received-cid=2B00",
            "Max-Forwards: 69",
            &format!("Route: {ROUTE}"),
            &format!("Record-Route: {RR}"),
            "Content-Length: {CL}",
            "From: \"Bob Jones\" <sip:bob@fabrikam.com>;tag=8e4a9cb2b1;epid=5d2e1a0b3c",
            "To: <sip:alice@contoso.com>;tag=a1b2c3d4e5;epid=0f1e2d3c4b",
            "Call-ID: 3f1b2c9e8d7a4b6c9e0f1a2b3c4d5e6f",
            "CSeq: 3 MESSAGE",
            "User-Agent: UCCAPI/16.0.4849.1000 OC/16.0.4849.1000 (Skype for Business)",
            "Supported: ms-dialog-route-set-update",
            "Supported: timer",
            "SUPPORTED: ms-sender",
            "Content-Type: text/plain; charset=UTF-8",
            "ms-im-format: text/plain; charset=UTF-8; ms-body=SGVsbG8=",
            "Ms-Conversation-ID: AdKhLhIjc2ZYoWpvRmaxxB3tmCunSw==",
        ],
        "Hello from Skype \u{1F44B}".as_bytes(),
    )
}

#[test]
fn message_to_gruu_in_dialog() {
    let raw = lync_message();
    let m = accept(&raw);
    assert_eq!(m.method(), Some("MESSAGE"));
    let Some(Ok(Uri::Sip(ruri))) = m.request_uri() else {
        panic!("Request-URI")
    };
    assert_eq!(ruri.as_str(), GRUU);
    assert_eq!(
        ruri.param("opaque"),
        Some(Some("user:epid:wOYQ0RGBk1arJsJZRIdfrwAA"))
    );
    assert_eq!(ruri.param("gruu"), Some(None));

    let routes = m.routes().unwrap_or_default();
    assert_eq!(routes.len(), 1);
    let Uri::Sip(r) = &routes[0].uri else {
        panic!("Route URI")
    };
    assert_eq!(format!("<{}>", r.as_str()), ROUTE);
    assert_eq!(r.host().as_str(), "edge.contoso.com");
    assert_eq!(r.port(), Some(5061));
    assert_eq!(r.param("transport"), Some(Some("tls")));
    assert_eq!(r.param("opaque"), Some(Some("state:T:F:Ci.R0a1b200")));
    assert_eq!(r.param("lr"), Some(None));
    assert_eq!(
        r.param("ms-route-sig"),
        Some(Some("ba9xLk2Vdj3_rlqWxYz0FtR2pIRnaE2Q0TsYdpEAAA"))
    );
    let rr = m.record_routes().unwrap_or_default();
    assert_eq!(rr.len(), 1);
    assert_eq!(format!("<{}>", rr[0].uri.as_str()), RR);
    assert_eq!(
        rr[0].uri.as_sip().map(|u| u.params_str()),
        Some(";transport=tls;opaque=state:T:F:Ci.R0c3d400;lr;ms-route-sig=fa3FRQ0Nc1X9kZpeUw2_j7yS0aH4rLAAA")
    );

    // The route decision reads these.
    let via = m.via_top();
    assert_eq!(
        via.as_ref().map(|v| v.branch()),
        Ok(Some("z9hG4bK7A1F2B3C.9D8E7F6A"))
    );
    assert_eq!(via.as_ref().map(|v| v.sent_by()), Ok("192.0.2.10:5061"));
    assert_eq!(
        via.as_ref().map(|v| v.params().get("ms-received-cid")),
        Ok(Some(Some("1A2B00")))
    );
    assert_eq!(m.call_id(), Ok("3f1b2c9e8d7a4b6c9e0f1a2b3c4d5e6f"));
    assert_eq!(m.max_forwards(), Ok(Some(69)));
    assert_eq!(m.cseq().map(|c| (c.seq, c.method)), Ok((3, "MESSAGE")));
    let from = m.from();
    assert_eq!(from.as_ref().map(|f| f.tag()), Ok(Some("8e4a9cb2b1")));
    assert_eq!(
        from.as_ref().map(|f| f.params().get("epid")),
        Ok(Some(Some("5d2e1a0b3c")))
    );
    assert_eq!(from.map(|f| f.display_name), Ok(Some("\"Bob Jones\"")));
    assert_eq!(m.to().map(|t| t.tag()), Ok(Some("a1b2c3d4e5")));

    // Repeated Supported lines stay separate lines, names as sent.
    let sup: Vec<&[u8]> = m
        .headers_named(HeaderName::Supported)
        .map(|h| h.raw_line)
        .collect();
    assert_eq!(
        sup,
        vec![
            &b"Supported: ms-dialog-route-set-update\r\n"[..],
            b"Supported: timer\r\n",
            b"SUPPORTED: ms-sender\r\n"
        ]
    );
    assert_eq!(
        m.header_value_by_raw_name("ms-conversation-id"),
        Some("AdKhLhIjc2ZYoWpvRmaxxB3tmCunSw==")
    );
    assert_eq!(m.body(), "Hello from Skype \u{1F44B}".as_bytes());
    assert!(m
        .content_type()
        .is_ok_and(|c| c.is_some_and(|c| c.is("text", "plain"))));
}

#[test]
fn proxy_edits_keep_everything_else_byte_exact() {
    let raw = lync_message();
    let mut m = accept(&raw);
    // RFC 3261 §16.6: add our Via on top, decrement Max-Forwards, pop our Route (§16.4).
    let ok = m
        .insert_header(
            0,
            "Via",
            "SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKlegate1",
        )
        .is_ok();
    assert!(ok);
    let mf = m
        .header_index(HeaderName::MaxForwards)
        .unwrap_or(usize::MAX);
    assert!(m.replace_header(mf, "68").is_ok());
    let route = m.header_index(HeaderName::Route).unwrap_or(usize::MAX);
    assert!(m.remove_header(route).is_some());
    let out = m.to_bytes();
    let expected = String::from_utf8_lossy(&raw)
        .replacen(
            "\r\nVia:",
            "\r\nVia: SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKlegate1\r\nVia:",
            1,
        )
        .replace("Max-Forwards: 69", "Max-Forwards: 68")
        .replace(&format!("Route: {ROUTE}\r\n"), "");
    assert_eq!(&out[..], expected.as_bytes());
    let again = accept(&out);
    assert_eq!(
        again.via_top().map(|v| v.host.clone()),
        Ok(Host::V6(
            "2001:db8::1"
                .parse()
                .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED),
            "[2001:db8::1]"
        ))
    );
    assert_eq!(again.max_forwards(), Ok(Some(68)));
}

#[test]
fn im_session_invite_with_ms_text_format() {
    let sdp = b"v=0\r\no=- 0 0 IN IP4 192.0.2.20\r\ns=session\r\nc=IN IP4 192.0.2.20\r\nt=0 0\r\nm=message 5060 sip null\r\na=accept-types:text/plain multipart/alternative image/gif text/rtf text/html application/x-ms-ink application/ms-imdn+xml text/x-msmsgsinvite\r\n";
    let raw = build(
        &[
            "INVITE sip:alice@contoso.com SIP/2.0",
            "Via: SIP/2.0/TLS 192.0.2.20:5061;branch=z9hG4bKa1b2c3;branched=FALSE",
            "Max-Forwards: 70",
            "From: \"Bob\" <sip:bob@fabrikam.com>;tag=1234abcd;epid=5d2e1a0b3c",
            "To: <sip:alice@contoso.com>",
            "Call-ID: 9a8b7c6d5e4f",
            "CSeq: 1 INVITE",
            "Contact: <sip:bob@fabrikam.com;opaque=user:epid:AbCdEfGhIjKlMnOpQrStUvAA;gruu>",
            &format!("Record-Route: {RR}"),
            "Supported: ms-dialog-route-set-update",
            "Supported: timer",
            "ms-text-format: text/plain; charset=UTF-8; ms-body=SGVsbG8=",
            "ms-keep-alive: UAC;hop-hop=yes",
            "Content-Type: application/sdp",
            "Content-Length: {CL}",
        ],
        sdp,
    );
    let m = accept(&raw);
    assert_eq!(
        m.header_value_by_raw_name("MS-TEXT-FORMAT"),
        Some("text/plain; charset=UTF-8; ms-body=SGVsbG8=")
    );
    let tf = m.ms_text_format();
    assert_eq!(
        tf.map(|t| t.map(|t| (t.mtype, t.subtype, t.ms_body(), t.param("charset")))),
        Ok(Some(("text", "plain", Some("SGVsbG8="), Some("UTF-8"))))
    );
    let contacts = m.contacts().unwrap_or_default();
    assert_eq!(contacts.len(), 1);
    let c = contacts[0].uri.as_sip();
    assert_eq!(
        c.and_then(|c| c.param("opaque")),
        Some(Some("user:epid:AbCdEfGhIjKlMnOpQrStUvAA"))
    );
    assert_eq!(c.and_then(|c| c.param("gruu")), Some(None));
    assert_eq!(m.to().map(|t| t.tag()), Ok(None));
    assert_eq!(m.body(), &sdp[..]);
}

fn subscribe_ipv6() -> Vec<u8> {
    build(
        &[
            "SUBSCRIBE sip:alice@contoso.com SIP/2.0",
            "v: SIP/2.0/TLS [2001:db8::9]:5061",
            "   ;branch=z9hG4bKsub1;ms-received-port=5061",
            "Max-Forwards: 70",
            "f: <sip:bob@fabrikam.com>;tag=77aa;epid=01ab",
            "t: <sip:alice@contoso.com>",
            "i: 0123abcd@2001:db8::9",
            "CSeq: 1 SUBSCRIBE",
            "m: <sip:bob@[2001:db8::9]:5061;transport=tls>",
            "o: presence",
            "Accept: application/pidf+xml,",
            " application/msrtc-event-categories+xml,",
            "\tapplication/xpidf+xml",
            "Supported: eventlist",
            "k: ms-piggyback-first-notify",
            "Expires: 3600",
            "l: 0",
        ],
        b"",
    )
}

#[test]
fn compact_and_folded_subscribe_from_ipv6_edge() {
    let raw = subscribe_ipv6();
    let m = accept(&raw);
    let via = m.via_top();
    let Ok(via) = via else { panic!("{via:?}") };
    assert!(matches!(&via.host, Host::V6(a, "[2001:db8::9]") if a.to_string() == "2001:db8::9"));
    assert_eq!(via.port, Some(5061));
    assert_eq!(via.transport, "TLS");
    assert_eq!(via.sent_by(), "[2001:db8::9]:5061");
    assert_eq!(via.branch(), Some("z9hG4bKsub1"));
    // The folded line is kept as sent (both physical lines) and decoded unfolded.
    let v = m.header(HeaderName::Via);
    assert_eq!(
        v.map(|h| h.raw_line),
        Some(&b"v: SIP/2.0/TLS [2001:db8::9]:5061\r\n   ;branch=z9hG4bKsub1;ms-received-port=5061\r\n"[..])
    );
    assert_eq!(m.from().map(|f| f.tag()), Ok(Some("77aa")));
    assert_eq!(m.call_id(), Ok("0123abcd@2001:db8::9"));
    assert_eq!(m.event().map(|e| e.map(|e| e.value)), Ok(Some("presence")));
    let accept_list: Vec<String> = m
        .accept()
        .unwrap_or_default()
        .iter()
        .map(|a| format!("{}/{}", a.mtype, a.subtype))
        .collect();
    assert_eq!(
        accept_list,
        [
            "application/pidf+xml",
            "application/msrtc-event-categories+xml",
            "application/xpidf+xml"
        ]
    );
    assert_eq!(m.expires(), Ok(Some(3600)));
    assert_eq!(m.content_length(), Ok(Some(0)));
    let contacts = m.contacts().unwrap_or_default();
    assert_eq!(
        contacts
            .first()
            .and_then(|c| c.uri.as_sip())
            .map(|u| u.host_port_str()),
        Some("[2001:db8::9]:5061")
    );
    assert_eq!(m.headers_named(HeaderName::Supported).count(), 2);
}

fn notify_msrtc(method: &str) -> Vec<u8> {
    let mut body = b"<categories xmlns=\"http://schemas.microsoft.com/2006/09/sip/categories\" uri=\"sip:alice@contoso.com\"><category name=\"note\" instance=\"0\" publishTime=\"2026-12-01T10:00:00Z\"><note xmlns=\"http://schemas.microsoft.com/2006/09/sip/note\"><body type=\"personal\" uri=\"\">".to_vec();
    body.extend_from_slice("Caf\u{e9} \u{2615} ".as_bytes());
    // Bytes that are not UTF-8 must survive untouched too (bodies are bytes).
    body.extend_from_slice(&[0xff, 0xfe, 0x00, b'\r', b'\n']);
    body.extend_from_slice(b"</body></note></category></categories>");
    build(
        &[
            &format!("{method} sip:bob@fabrikam.com;opaque=user:epid:01ab;gruu SIP/2.0"),
            "Via: SIP/2.0/TLS 192.0.2.30:5061;branch=z9hG4bKn1",
            "Max-Forwards: 70",
            "From: <sip:alice@contoso.com>;tag=ntfy1",
            "To: <sip:bob@fabrikam.com>;tag=77aa;epid=01ab",
            "Call-ID: 0123abcd@2001:db8::9",
            &format!("CSeq: 1 {method}"),
            "Event: presence",
            "Subscription-State: active;expires=3600",
            "Content-Type: application/msrtc-event-categories+xml",
            "Content-Length: {CL}",
        ],
        &body,
    )
}

#[test]
fn notify_with_msrtc_body() {
    let raw = notify_msrtc("NOTIFY");
    let m = accept(&raw);
    let ss = m.subscription_state();
    assert_eq!(
        ss.map(|s| s.map(|s| (s.value, s.param("expires")))),
        Ok(Some(("active", Some("3600"))))
    );
    assert!(m
        .content_type()
        .is_ok_and(|c| c.is_some_and(|c| c.is("application", "msrtc-event-categories+xml"))));
    let body = m.body();
    assert!(body.windows(2).any(|w| w == [0xff, 0xfe]));
    assert!(raw.ends_with(body));
}

#[test]
fn lync_methods_and_stream_framing() {
    // BENOTIFY and SERVICE are Lync methods; both are plain tokens.
    // (Built, not text-replaced: a lossy UTF-8 round trip would corrupt the body.)
    let benotify = notify_msrtc("BENOTIFY");
    accept(&benotify);

    // All four messages back to back over one stream, with a keep-alive, in 7-byte chunks.
    let mut stream = Vec::new();
    let msgs = [
        lync_message(),
        subscribe_ipv6(),
        b"\r\n\r\n".to_vec(),
        notify_msrtc("NOTIFY"),
        benotify,
    ];
    for m in &msgs {
        stream.extend_from_slice(m);
    }
    let mut f = Framer::default();
    let mut frames = Vec::new();
    for chunk in stream.chunks(7) {
        f.push(chunk);
        loop {
            match f.next() {
                Ok(Some(fr)) => frames.push(fr),
                Ok(None) => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(frames.len(), 5);
    for (fr, want) in frames.iter().zip(&msgs) {
        match fr {
            Frame::Message(m) => assert_eq!(m.to_bytes(), Bytes::copy_from_slice(want)),
            Frame::KeepAlive => assert_eq!(want, b"\r\n\r\n"),
            Frame::Bad { reason, .. } => panic!("{reason}"),
        }
    }
}
