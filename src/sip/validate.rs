//! Strict validation of parsed messages: what a federation edge refuses and how.
//!
//! The parser only checks structure; here every header whose grammar we know is decoded in full
//! (nothing left over, no list element dropped), single-instance headers are counted, required
//! headers are checked and the CSeq method is compared with the request method. The verdict is
//! `Ok(())` or a `Reject`: a request gets a status (400 with a specific reason phrase, 505 for
//! an unsupported version); a malformed response has no status because it is dropped
//! (RFC 3261 §16.7 / §18.1.2: no response to a response). This is the single place that maps
//! codec failures to the wire. It is stricter than RFC 4475 requires of a liberal element: it
//! refuses ltgtruri, lwsstart, trws, baddate, badaspec, baddn, regbadct, escruri and both
//! mismatch vectors with 400.

use super::header::{self, HeaderName};
use super::message::SipMessage;
use super::parse::{parse_bytes, parse_datagram, BodyMode};
use super::SipParseError;

/// A refusal: `status` is what Legate answers (`None`: the message is dropped silently).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Status code to answer with; `None` for a response, which is dropped.
    pub status: Option<u16>,
    /// The specific reason; used as the reason phrase of the 4xx/5xx.
    pub reason: String,
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "{s} {}", self.reason),
            None => write!(f, "dropped: {}", self.reason),
        }
    }
}

/// `true` if raw bytes start like a status line (used when the message did not parse).
pub fn looks_like_response(raw: &[u8]) -> bool {
    raw.get(..4)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"SIP/"))
}

/// The method token at the start of raw bytes, if they look like a request.
pub fn raw_method(raw: &[u8]) -> Option<&str> {
    if looks_like_response(raw) {
        return None;
    }
    let end = raw
        .iter()
        .position(|&c| c == b' ' || c == b'\r' || c == b'\n')
        .unwrap_or(raw.len());
    let m = std::str::from_utf8(raw.get(..end)?).ok()?;
    header::is_token(m).then_some(m)
}

/// Maps a parse failure to the wire: 505 for a version we do not speak, 400 for anything else
/// in a request, drop for a response.
pub fn reject_for_parse_error(err: &SipParseError, raw: &[u8]) -> Reject {
    let status = if looks_like_response(raw) {
        None
    } else if *err == SipParseError::UnsupportedVersion {
        Some(505)
    } else {
        Some(400)
    };
    let reason = match err {
        SipParseError::UnsupportedVersion => "Version Not Supported".to_owned(),
        e => capitalize(&e.to_string()),
    };
    Reject { status, reason }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Parses one datagram and validates it: the `legate sip check` verdict and the UDP path.
pub fn check_datagram(raw: &[u8]) -> Result<SipMessage, Reject> {
    let m = parse_datagram(raw).map_err(|e| reject_for_parse_error(&e, raw))?;
    validate(&m)?;
    Ok(m)
}

/// Same as [`check_datagram`] over a `Bytes` without copying.
pub fn check_bytes(raw: bytes::Bytes, mode: BodyMode) -> Result<SipMessage, Reject> {
    let copy_head = raw.clone();
    let m = parse_bytes(raw, mode).map_err(|e| reject_for_parse_error(&e, &copy_head))?;
    validate(&m)?;
    Ok(m)
}

/// Best-effort answer to a refused request (RFC 3261 §8.2.6 / §16.3): when the bytes still
/// parse far enough to copy Via, From, To, Call-ID and CSeq, a `status reason` response with a
/// To tag; `None` when no response can be addressed (the caller just logs and drops).
pub fn answer_refused(raw: &[u8], status: u16, reason: &str, to_tag: &str) -> Option<bytes::Bytes> {
    refusal_of(&parse_datagram(raw).ok()?, status, reason, to_tag)
}

/// [`answer_refused`] for a message already parsed (refused by
/// [`crate::sip::routing::Routing::check`]).
pub fn refusal_of(m: &SipMessage, status: u16, reason: &str, to_tag: &str) -> Option<bytes::Bytes> {
    if !m.is_request() || m.method() == Some("ACK") {
        return None;
    }
    m.header(HeaderName::Via)?;
    // Reason phrases come from our own reasons; keep them to one printable line.
    let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
    m.build_response(status, &reason, Some(to_tag))
        .ok()
        .map(|r| r.to_bytes())
}

/// Headers that may appear at most once (RFC 3261 §7.3.1: only comma-list headers repeat).
fn single_instance(n: HeaderName) -> bool {
    matches!(
        n,
        HeaderName::From
            | HeaderName::To
            | HeaderName::CallId
            | HeaderName::CSeq
            | HeaderName::MaxForwards
            | HeaderName::ContentLength
            | HeaderName::ContentType
            | HeaderName::Expires
            | HeaderName::MinExpires
            | HeaderName::Date
            | HeaderName::Event
            | HeaderName::SubscriptionState
            | HeaderName::RetryAfter
            | HeaderName::ReferTo
    )
}

/// Validates a parsed message strictly.
pub fn validate(msg: &SipMessage) -> Result<(), Reject> {
    validate_with(msg, false)
}

/// [`validate`] as the connection task runs it: everything but the decoding of the
/// Request-URI, Via, From and To, which the core decodes anyway into its routing view and
/// checks there with the same rules ([`crate::sip::routing::Routing::check`]): decoded once
/// per message instead of twice (architecture: "Decode once"). Counts, presence, CSeq and
/// every other header are checked here as in [`validate`].
pub fn validate_framed(msg: &SipMessage) -> Result<(), Reject> {
    validate_with(msg, true)
}

fn validate_with(msg: &SipMessage, routing_later: bool) -> Result<(), Reject> {
    let status = if msg.is_request() { Some(400) } else { None };
    let fail = |reason: String| Reject { status, reason };

    if !routing_later {
        if let Some(Err(e)) = msg.request_uri() {
            return Err(fail(format!("Malformed Request-URI: {e}")));
        }
    }

    // Counts for the headers we track; index by a small table.
    let mut seen: [u8; 32] = [0; 32];
    let mut contact_star = false;
    let mut contact_lines = 0usize;
    // The CSeq method as decoded in the loop (CSeq is single-instance), for the check below.
    let mut cseq_method = None;
    for h in msg.headers() {
        let slot = h.name as usize;
        if let Some(c) = seen.get_mut(slot) {
            *c = c.saturating_add(1);
            if *c > 1 && single_instance(h.name) {
                return Err(fail(format!("Multiple {} headers", h.name.as_str())));
            }
        }
        let v = h.value;
        let r: Result<(), &'static str> = match h.name {
            HeaderName::Via | HeaderName::From | HeaderName::To if routing_later => Ok(()),
            HeaderName::Via => header::parse_via_list(v).map(drop),
            HeaderName::From | HeaderName::To | HeaderName::ReferTo => {
                header::parse_name_addr(v).map(drop)
            }
            HeaderName::CallId => header::parse_call_id(v).map(drop),
            HeaderName::CSeq => header::parse_cseq(v).map(|c| cseq_method = Some(c.method)),
            HeaderName::MaxForwards => header::parse_max_forwards(v).map(drop),
            HeaderName::Contact => {
                contact_lines += 1;
                header::parse_contact(v).map(|c| {
                    if matches!(c, header::Contact::Star) {
                        contact_star = true;
                    }
                })
            }
            HeaderName::Route | HeaderName::RecordRoute => {
                header::parse_name_addr_list(v).map(drop)
            }
            HeaderName::ContentLength | HeaderName::Expires | HeaderName::MinExpires => {
                header::parse_u32(v).map(drop)
            }
            HeaderName::ContentType => header::parse_media_type(v).map(drop),
            HeaderName::Accept => header::parse_accept(v).map(drop),
            HeaderName::Event => header::parse_token_params(v).map(drop),
            HeaderName::SubscriptionState => header::parse_subscription_state(v).map(drop),
            HeaderName::Date => header::parse_date(v),
            HeaderName::Require | HeaderName::ProxyRequire | HeaderName::AllowEvents => {
                header::parse_token_list(v, false).map(drop)
            }
            HeaderName::Supported | HeaderName::ContentEncoding => {
                header::parse_token_list(v, true).map(drop)
            }
            HeaderName::RetryAfter => header::parse_retry_after(v).map(drop),
            HeaderName::Warning => header::parse_warning(v),
            _ => Ok(()),
        };
        if let Err(e) = r {
            return Err(fail(format!("Malformed {} header: {e}", h.name.as_str())));
        }
    }
    if contact_star && contact_lines > 1 {
        return Err(fail("Contact '*' combined with other contacts".to_owned()));
    }
    // RFC 3261 §8.1.1: To, From, CSeq, Call-ID, Via are mandatory in every request; responses
    // copy them (§8.2.6.2). Max-Forwards is not required here so RFC 2543 peers still parse
    // (RFC 4475 §3.4.1); a proxy adds it.
    for n in [
        HeaderName::Via,
        HeaderName::From,
        HeaderName::To,
        HeaderName::CallId,
        HeaderName::CSeq,
    ] {
        if seen.get(n as usize).copied().unwrap_or(0) == 0 {
            return Err(fail(format!("Missing {} header", n.as_str())));
        }
    }
    if let Some(method) = msg.method() {
        // RFC 3261 §8.1.1.5 (RFC 4475 §3.1.2.17-18): the CSeq method must match.
        // Present and decoded: the loop refused a bad CSeq and the check above a missing one.
        if cseq_method != Some(method) {
            return Err(fail(
                "CSeq method does not match the request method".to_owned(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_requests_get_an_addressed_answer() {
        let raw = b"OPTIONS sip:a@b.example SIP/2.0\r\nVia: SIP/2.0/TLS h.example;branch=z9hG4bK1\r\nTo: <sip:a@b.example>\r\nFrom: <sip:c@d.example>;tag=1\r\nCall-ID: 1\r\nCSeq: 1e3 OPTIONS\r\nContent-Length: 0\r\n\r\n";
        let r = check_datagram(raw);
        let Err(r) = r else { panic!("must be refused") };
        assert_eq!(r.status, Some(400));
        let answer = answer_refused(raw, 400, &r.reason, "lg1").unwrap_or_default();
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("SIP/2.0 400 Malformed CSeq header: "),
            "{text}"
        );
        assert!(text.contains("To: <sip:a@b.example>;tag=lg1\r\n"));
        assert!(answer_refused(b"garbage", 400, "x", "t").is_none());
    }
}
