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
        Routing {
            method: msg.method(),
            via: via.ok_or(MISSING).and_then(header::parse_via_first),
            from: from.ok_or(MISSING).and_then(header::parse_name_addr),
            to: to.ok_or(MISSING).and_then(header::parse_name_addr),
            call_id: call_id.ok_or(MISSING).and_then(header::parse_call_id),
            cseq: cseq.ok_or(MISSING).and_then(header::parse_cseq),
            request_uri: msg
                .request_uri_str()
                .map(|s| parse_uri(s, UriContext::RequestUri)),
        }
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
