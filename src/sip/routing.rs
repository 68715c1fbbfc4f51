//! The routing headers of one SIP message, decoded once (architecture: "Decode once").
//!
//! Transaction matching, peer screening, dialog lookup and the response all need the top Via,
//! From, To, Call-ID, CSeq and the Request-URI. Asking the message for each one where it is
//! needed re-enters the header lexer about ten times per request; [`Routing::of`] decodes them
//! in one pass over the header list and the view travels with the request through the core.
//! A header that does not decode keeps its error, so each caller still refuses exactly what it
//! refused before (a message from a connection was validated already; one built by a test or
//! a datagram path may not be).
//!
//! This module must not do I/O; it borrows the message and copies nothing.

use super::header::{self, CSeq, DecodeResult, HeaderName, NameAddr, Via};
use super::message::SipMessage;
use super::uri::{parse_uri, Uri, UriContext};
use super::validate::Reject;

/// The decoded routing headers of `msg` (borrowing it).
#[derive(Debug, Clone)]
pub struct Routing<'m> {
    /// The request method (`None` for a response).
    pub method: Option<&'m str>,
    /// Top Via value (RFC 3261 §17.2.3, §18.2.2).
    pub via: DecodeResult<Via<'m>>,
    /// From (name-addr with `tag`).
    pub from: DecodeResult<NameAddr<'m>>,
    /// To (name-addr with `tag`).
    pub to: DecodeResult<NameAddr<'m>>,
    /// Call-ID.
    pub call_id: DecodeResult<&'m str>,
    /// CSeq.
    pub cseq: DecodeResult<CSeq<'m>>,
    /// The Request-URI (`None` for a response).
    pub request_uri: Option<DecodeResult<Uri<'m>>>,
    /// What validation says of the rest of the first Via line (see [`header::parse_via_line`]).
    via_line: DecodeResult<()>,
}

const MISSING: &str = "missing header";

impl<'m> Routing<'m> {
    /// Decodes the routing headers of `msg` in one pass over its header list: the first
    /// instance of each counts, as for [`SipMessage::header`].
    pub fn of(msg: &'m SipMessage) -> Self {
        let [via, from, to, call_id, cseq] = msg.first_values([
            HeaderName::Via,
            HeaderName::From,
            HeaderName::To,
            HeaderName::CallId,
            HeaderName::CSeq,
        ]);
        let (via, via_line) = match via {
            Some(v) => header::parse_via_line(v),
            None => (Err(MISSING), Err(MISSING)),
        };
        Routing {
            method: msg.method(),
            via,
            via_line,
            from: from.ok_or(MISSING).and_then(header::parse_name_addr),
            to: to.ok_or(MISSING).and_then(header::parse_name_addr),
            call_id: call_id.ok_or(MISSING).and_then(header::parse_call_id),
            cseq: cseq.ok_or(MISSING).and_then(header::parse_cseq),
            request_uri: msg
                .request_uri_str()
                .map(|s| parse_uri(s, UriContext::RequestUri)),
        }
    }

    /// The part of strict validation ([`crate::sip::validate::validate`]) that the connection
    /// task leaves to this view ([`crate::sip::validate::validate_framed`]): the Request-URI,
    /// every Via value, From and To, decoded once here instead of twice. Same rules and
    /// reasons; presence and count of the headers were checked already.
    pub fn check(&self, msg: &SipMessage) -> Result<(), Reject> {
        let status = if msg.is_request() { Some(400) } else { None };
        let fail = |reason: String| Err(Reject { status, reason });
        if let Some(Err(e)) = &self.request_uri {
            return fail(format!("Malformed Request-URI: {e}"));
        }
        let mut vias = msg.headers_named(HeaderName::Via);
        // The first line was decoded with the view; the others (a proxied request) here.
        let first = vias.next().map(|_| self.via_line);
        let others = vias.map(|h| header::parse_via_list(h.value).map(drop));
        for r in first.into_iter().chain(others) {
            if let Err(e) = r {
                return fail(format!(
                    "Malformed {} header: {e}",
                    HeaderName::Via.as_str()
                ));
            }
        }
        for (name, r) in [(HeaderName::From, &self.from), (HeaderName::To, &self.to)] {
            if let Err(e) = r {
                return fail(format!("Malformed {} header: {e}", name.as_str()));
            }
        }
        Ok(())
    }

    /// The From tag, if From decoded and carries one.
    pub fn from_tag(&self) -> Option<&'m str> {
        self.from.as_ref().ok().and_then(NameAddr::tag)
    }

    /// The To tag, if To decoded and carries one: a request with it is inside a dialog
    /// (RFC 3261 §12.2.2).
    pub fn to_tag(&self) -> Option<&'m str> {
        self.to.as_ref().ok().and_then(NameAddr::tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::parse::parse_datagram;

    #[test]
    fn decodes_what_the_accessors_decode() {
        let raw = b"MESSAGE sip:alice@example.com SIP/2.0\r\n\
Via: SIP/2.0/TCP h.partner.test:5060;branch=z9hG4bK1, SIP/2.0/TCP p;branch=z9hG4bK0\r\n\
Via: SIP/2.0/TCP q;branch=z9hG4bK9\r\n\
From: <sip:bob@partner.test>;tag=f1\r\n\
To: <sip:alice@example.com>\r\n\
Call-ID: c1\r\n\
CSeq: 7 MESSAGE\r\n\
Content-Length: 0\r\n\r\n";
        let m = parse_datagram(raw).expect("parses");
        let r = Routing::of(&m);
        assert_eq!(r.method, m.method());
        assert_eq!(r.via, m.via_top());
        assert_eq!(r.from, m.from());
        assert_eq!(r.to, m.to());
        assert_eq!(r.call_id, m.call_id());
        assert_eq!(r.cseq, m.cseq());
        assert_eq!(r.request_uri, m.request_uri());
        assert_eq!(r.from_tag(), Some("f1"));
        assert_eq!(r.to_tag(), None);
    }

    /// The connection task's validation plus the view's check refuse exactly what strict
    /// validation refuses, with its reason when only the routing headers are bad: the
    /// RFC 4475 / 5118 vectors and every single-byte
    /// mutation of a pager MESSAGE with two Via values and a second Via line.
    #[test]
    fn framed_validation_plus_check_is_strict_validation() {
        use crate::sip::validate::{validate, validate_framed};
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sip");
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for sub in ["rfc4475", "rfc5118"] {
            for e in std::fs::read_dir(format!("{dir}/{sub}")).expect("vectors") {
                let path = e.expect("entry").path();
                if path.extension().is_some_and(|x| x == "dat") {
                    inputs.push(std::fs::read(path).expect("vector"));
                }
            }
        }
        let pager = b"MESSAGE sip:alice@example.com SIP/2.0\r\n\
Via: SIP/2.0/TCP h.partner.test:5060;branch=z9hG4bK1;rport, SIP/2.0/TCP p;branch=z9hG4bK0\r\n\
From: \"Bob\" <sip:bob@partner.test>;tag=f1\r\n\
Via: SIP/2.0/TCP q;branch=z9hG4bK9;ttl=3\r\n\
To: <sip:alice@example.com>\r\n\
Call-ID: c1\r\n\
CSeq: 7 MESSAGE\r\n\
Content-Length: 0\r\n\r\n";
        for i in 0..pager.len() {
            for &b in b" \t:;,\"<>[]%@?=9x" {
                let mut v = pager.to_vec();
                v[i] = b;
                inputs.push(v);
            }
        }
        let (mut refused, mut by_check) = (0, 0);
        for input in &inputs {
            let Ok(m) = parse_datagram(input) else {
                continue;
            };
            let (framed, strict) = (validate_framed(&m), validate(&m));
            let text = String::from_utf8_lossy(input);
            if framed.is_ok() {
                let checked = Routing::of(&m).check(&m);
                by_check += usize::from(checked.is_err());
                assert_eq!(checked, strict, "{text}");
            } else {
                // Refused by the connection task: a message with a bad routing header and
                // another bad header may be refused naming the other one.
                assert_eq!(
                    framed.map_err(|r| r.status),
                    strict.map_err(|r| r.status),
                    "{text}"
                );
                refused += 1;
            }
        }
        assert!(refused > 100 && by_check > 50, "{refused} {by_check}");
    }

    #[test]
    fn a_missing_or_bad_header_keeps_its_error() {
        let raw = b"OPTIONS sip:a@example.com SIP/2.0\r\nFrom: nonsense <\r\nCall-ID: c\r\nContent-Length: 0\r\n\r\n";
        let m = parse_datagram(raw).expect("parses");
        let r = Routing::of(&m);
        assert_eq!(r.via, m.via_top());
        assert!(r.via.is_err());
        assert_eq!(r.from, m.from());
        assert!(r.from.is_err());
        assert_eq!(r.cseq, m.cseq());
    }
}
