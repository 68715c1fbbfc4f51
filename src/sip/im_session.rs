//! Lync-style IM sessions (requirements §1): an INVITE whose SDP offers `m=message <port> sip
//! null` sets up a dialog in which MESSAGE requests carry the text; the first message may ride
//! in the INVITE's `ms-text-format` header (base64 `ms-body`). This module holds the session
//! state and the pure pieces: SDP offer/answer, text extraction from MESSAGE bodies and
//! `ms-text-format`. Pager-mode MESSAGE (RFC 3428) needs no state and is handled by the edge
//! core directly.

use std::collections::VecDeque;
use std::time::Instant;

use base64::Engine;

use super::dialog::Dialog;
use super::header::MediaType;
use super::message::SipMessage;
use crate::config::Domain;
use crate::gateway::{Address, MessageBody};

/// The `a=accept-types` we announce: what `text_of` can turn into a message.
pub const ACCEPT_TYPES: &str = "text/plain text/html";
/// The `Accept` header value for 415 answers (RFC 3261 §21.4.13).
pub const ACCEPT_HEADER: &str = "text/plain, text/html, application/im-iscomposing+xml";

/// `true` if an SDP body offers an IM session: an `m=message ... sip null` line (Lync's MS-SIPRE
/// session form).
pub fn sdp_offers_im(sdp: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(sdp) else {
        return false;
    };
    text.lines().any(|l| {
        let mut f = l.trim().split_ascii_whitespace();
        matches!(
            (f.next(), f.nth(1), f.next()),
            (Some(m), Some(proto), Some(fmt))
                if m.starts_with("m=message") && proto.eq_ignore_ascii_case("sip") && fmt.eq_ignore_ascii_case("null")
        )
    })
}

/// Our SDP (offer or answer) for an IM session. The port is nominal: the MESSAGEs travel in the
/// SIP dialog itself, as Lync does (`m=message 5061 sip null`).
pub fn sdp(host: &str, session_id: u64) -> Vec<u8> {
    format!(
        "v=0\r\no=- {session_id} 0 IN IP4 {host}\r\ns=session\r\nc=IN IP4 {host}\r\nt=0 0\r\n\
m=message 5061 sip null\r\na=accept-types:{ACCEPT_TYPES}\r\n"
    )
    .into_bytes()
}

/// What a MESSAGE body is to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Text to deliver.
    Text(String),
    /// A typing indication (RFC 3994) or keep-alive: acknowledge, deliver nothing.
    Ignore,
    /// Anything else: answer 415.
    Unsupported,
}

/// Strips HTML to its text: tags dropped, the few entities Lync emits decoded. Good enough
/// for chat text; no attempt to render layout.
fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

/// Reads a MESSAGE body of content type `ct`.
pub fn text_of(ct: Option<&MediaType<'_>>, body: &[u8]) -> Content {
    let Some(ct) = ct else {
        return if body.is_empty() {
            Content::Ignore
        } else {
            Content::Unsupported
        };
    };
    if ct.is("application", "im-iscomposing+xml") {
        return Content::Ignore;
    }
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(_) => return Content::Unsupported,
    };
    if ct.is("text", "plain") {
        Content::Text(text.to_owned())
    } else if ct.is("text", "html") {
        Content::Text(html_to_text(text))
    } else {
        Content::Unsupported
    }
}

/// The first message of a Lync IM INVITE (`ms-text-format: text/plain;...;ms-body=<base64>`),
/// if present and readable. An undecodable one is ignored: the session still opens.
pub fn first_message(invite: &SipMessage) -> Option<String> {
    let f = invite.ms_text_format().ok()??;
    let b64 = f.ms_body()?.trim_matches('"');
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    if f.mtype.eq_ignore_ascii_case("text") && f.subtype.eq_ignore_ascii_case("plain") {
        Some(text)
    } else if f.mtype.eq_ignore_ascii_case("text") && f.subtype.eq_ignore_ascii_case("html") {
        Some(html_to_text(&text))
    } else {
        None
    }
}

/// Session life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// We sent the INVITE; messages queue until the 200.
    Inviting,
    /// Dialog confirmed: MESSAGEs flow both ways.
    Established,
}

/// One IM session between a local and a foreign user (either side may have opened it).
#[derive(Debug, Clone)]
pub struct ImSession {
    pub id: u64,
    pub local: Address,
    pub remote: Address,
    pub domain: Domain,
    pub state: SessionState,
    pub dialog: Option<Dialog>,
    /// For an outbound INVITE: Call-ID, our tag and CSeq until the dialog exists.
    pub call_id: String,
    pub local_tag: String,
    pub invite_cseq: u32,
    /// Messages waiting for the session to be established.
    pub queue: VecDeque<MessageBody>,
    pub last_activity: Instant,
    pub conn: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::header::parse_media_type;
    use crate::sip::parse::parse_datagram;

    #[test]
    fn lync_offer_is_recognised() {
        assert!(sdp_offers_im(
            b"v=0\r\no=- 0 0 IN IP4 10.0.0.1\r\ns=session\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=message 5060 sip null\r\na=accept-types:text/plain\r\n"
        ));
        assert!(!sdp_offers_im(b"v=0\r\nm=audio 5004 RTP/AVP 0\r\n"));
        assert!(sdp_offers_im(&sdp("example.com", 1)));
    }

    #[test]
    fn bodies() {
        let plain = parse_media_type("text/plain; charset=UTF-8").expect("ct");
        assert_eq!(text_of(Some(&plain), b"hi"), Content::Text("hi".into()));
        let html = parse_media_type("text/html").expect("ct");
        assert_eq!(
            text_of(Some(&html), b"<p>a &amp; <b>b</b></p>"),
            Content::Text("a & b".into())
        );
        let typing = parse_media_type("application/im-iscomposing+xml").expect("ct");
        assert_eq!(text_of(Some(&typing), b"<x/>"), Content::Ignore);
        let img = parse_media_type("image/png").expect("ct");
        assert_eq!(text_of(Some(&img), b"x"), Content::Unsupported);
    }

    #[test]
    fn ms_text_format_first_message() {
        let m = parse_datagram(b"INVITE sip:a@example.com SIP/2.0\r\nVia: SIP/2.0/TCP x;branch=z9hG4bK1\r\nFrom: <sip:b@partner.com>;tag=1\r\nTo: <sip:a@example.com>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nms-text-format: text/plain;charset=UTF-8;ms-body=aGVsbG8gdGhlcmU=\r\nContent-Length: 0\r\n\r\n").expect("parses");
        assert_eq!(first_message(&m).as_deref(), Some("hello there"));
    }
}
