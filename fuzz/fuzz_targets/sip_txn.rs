//! Random event sequences against the RFC 3261 §17 transaction machines (client and server,
//! INVITE and non-INVITE, reliable and unreliable timers) on a simulated clock. Invariants:
//! nothing panics; a terminated transaction has no deadline and sends nothing more; after a
//! `Timer` event at `now` the next deadline is strictly later (no stuck timer); time only moves
//! forward.
#![no_main]

use std::time::{Duration, Instant};

use legate::sip::parse_datagram;
use legate::sip::txn::{ClientTransaction, Event, ServerTransaction, Timers};
use legate::sip::SipMessage;
use libfuzzer_sys::fuzz_target;

fn request(method: &str, branch: &str) -> Option<SipMessage> {
    let cseq_method = method;
    let raw = format!(
        "{method} sip:a@contoso.com SIP/2.0\r\nVia: SIP/2.0/TLS edge.fabrikam.com:5061;branch={branch}\r\n\
From: <sip:b@fabrikam.com>;tag=f\r\nTo: <sip:a@contoso.com>\r\nCall-ID: c\r\nCSeq: 1 {cseq_method}\r\n\
Content-Length: 0\r\n\r\n"
    );
    parse_datagram(raw.as_bytes()).ok()
}

const CODES: [u16; 10] = [100, 180, 183, 200, 202, 302, 404, 486, 500, 603];

enum Txn {
    Client(ClientTransaction),
    Server(ServerTransaction),
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, ops)) = data.split_first() else {
        return;
    };
    let timers = if cfg & 1 == 0 {
        Timers::reliable()
    } else {
        Timers::unreliable()
    };
    let method = if cfg & 2 == 0 { "INVITE" } else { "MESSAGE" };
    let Some(req) = request(method, "z9hG4bKfuzz") else {
        return;
    };
    let Some(ack) = request("ACK", "z9hG4bKfuzz") else {
        return;
    };
    let Some(stray) = request(method, "z9hG4bKother") else {
        return;
    };
    let t0 = Instant::now();
    let mut now = t0;
    let mut txn = if cfg & 4 == 0 {
        match ClientTransaction::new(req.clone(), timers, now) {
            Ok(t) => Txn::Client(t),
            Err(_) => return,
        }
    } else {
        match ServerTransaction::new(&req, timers, now) {
            Ok(t) => Txn::Server(t),
            Err(_) => return,
        }
    };
    let mut it = ops.iter();
    while let Some(&op) = it.next() {
        let arg = it.next().copied().unwrap_or(0);
        let code = CODES[usize::from(arg) % CODES.len()];
        let event = match op % 7 {
            0 => match req.build_response(code, "X", Some("t")) {
                Ok(r) => Event::Message(Box::new(r)),
                Err(_) => continue,
            },
            1 => match req.build_response(code, "X", Some("t")) {
                Ok(r) => Event::TuResponse(Box::new(r)),
                Err(_) => continue,
            },
            2 => Event::Message(Box::new(req.clone())),
            3 => Event::Message(Box::new(ack.clone())),
            4 => Event::Message(Box::new(stray.clone())),
            5 => Event::TransportError,
            _ => {
                // Jump to the next deadline, or forward by arg * 250 ms.
                let deadline = match &txn {
                    Txn::Client(t) => t.poll_timeout(),
                    Txn::Server(t) => t.poll_timeout(),
                };
                now = match deadline {
                    Some(d) if arg & 1 == 0 => d.max(now),
                    _ => now + Duration::from_millis(u64::from(arg) * 250),
                };
                Event::Timer
            }
        };
        let is_timer = event == Event::Timer;
        let (was_terminated, deadline, sent) = match &mut txn {
            Txn::Client(t) => {
                let was = t.is_terminated();
                t.handle(event, now);
                let sent = std::iter::from_fn(|| t.poll_transmit()).count();
                while t.poll_event().is_some() {}
                (was, t.poll_timeout(), sent)
            }
            Txn::Server(t) => {
                let was = t.is_terminated();
                t.handle(event, now);
                let sent = std::iter::from_fn(|| t.poll_transmit()).count();
                while t.poll_event().is_some() {}
                (was, t.poll_timeout(), sent)
            }
        };
        if was_terminated {
            assert_eq!(sent, 0, "a terminated transaction sends nothing");
            assert!(deadline.is_none());
        }
        if is_timer {
            if let Some(d) = deadline {
                assert!(d > now, "timer not re-armed after firing");
            }
        }
    }
});
