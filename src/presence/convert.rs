//! Whole presence conversions between the two edges: a SIP body (PIDF or msrtc) from a
//! federated SIP system becomes the XMPP presence a local system shows, and back. This is the
//! "decide" step of presence interworking, kept pure: bytes and a mapping snapshot in, wire
//! values out.

use super::codec::{self, CodecError};
use super::map::{Facts, MappingSet, SystemId};
use super::wire::XmppPresence;

/// The body formats a SIP presence NOTIFY/PUBLISH may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SipBodyKind {
    /// `application/pidf+xml` (RFC 3863, RPID per RFC 4480).
    Pidf,
    /// `application/msrtc-event-categories+xml` (Lync/SfB categories).
    Msrtc,
}

impl SipBodyKind {
    /// From a Content-Type value (parameters ignored, case-insensitive).
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        if base.eq_ignore_ascii_case("application/pidf+xml") {
            Some(Self::Pidf)
        } else if base.eq_ignore_ascii_case("application/msrtc-event-categories+xml") {
            Some(Self::Msrtc)
        } else {
            None
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Pidf => "application/pidf+xml",
            Self::Msrtc => "application/msrtc-event-categories+xml",
        }
    }
}

/// A SIP presence body from system `sip` → the XMPP presence system `xmpp` shows.
/// `Ok(None)`: the body carries no availability at all (an msrtc document with only contact
/// cards or calendar data): it must not change what the watcher sees.
pub fn sip_to_xmpp(
    set: &MappingSet,
    sip: SystemId,
    xmpp: SystemId,
    kind: SipBodyKind,
    body: &[u8],
) -> Result<Option<XmppPresence>, CodecError> {
    let (pidf, msrtc);
    let facts = match kind {
        SipBodyKind::Pidf => {
            pidf = codec::pidf::decode_pidf(body)?;
            if pidf.basic.is_none() && pidf.activities.is_empty() && pidf.show.is_none() {
                return Ok(None);
            }
            Facts::from_pidf(&pidf)
        }
        SipBodyKind::Msrtc => {
            msrtc = codec::msrtc::decode_msrtc(body)?;
            if msrtc.availability.is_none() && msrtc.activity.is_none() {
                return Ok(None);
            }
            Facts::from_msrtc(&msrtc)
        }
    };
    let d = set.decode(sip, &facts);
    let t = set.translate(sip, xmpp, d.state, d.note);
    Ok(Some(set.encode_xmpp(xmpp, t.state, t.note.as_deref())))
}

/// An XMPP presence from system `xmpp` → the SIP body system `sip` is sent, appended to `out`.
pub fn xmpp_to_sip(
    set: &MappingSet,
    xmpp: SystemId,
    sip: SystemId,
    presence: &XmppPresence,
    kind: SipBodyKind,
    entity: &str,
    out: &mut Vec<u8>,
) {
    let d = set.decode(xmpp, &Facts::from_xmpp(presence));
    let t = set.translate(xmpp, sip, d.state, d.note);
    match kind {
        SipBodyKind::Pidf => codec::pidf::encode_pidf(
            &set.encode_pidf(sip, t.state, t.note.as_deref(), entity),
            out,
        ),
        SipBodyKind::Msrtc => {
            codec::msrtc::encode_msrtc(&set.encode_msrtc(sip, t.state, t.note.as_deref()), out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::map;
    use crate::presence::wire::Show;

    fn ids(set: &MappingSet) -> (SystemId, SystemId) {
        (
            set.system_id("lync").expect("lync"),
            set.system_id("xmpp").expect("xmpp"),
        )
    }

    #[test]
    fn lync_on_the_phone_becomes_away_in_a_call() {
        let set = map::embedded().expect("defaults");
        let (lync, xmpp) = ids(&set);
        let body = br#"<categories xmlns="http://schemas.microsoft.com/2006/09/sip/categories"><category name="state"><state xsi:type="aggregateState" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns="http://schemas.microsoft.com/2006/09/sip/state"><availability>6500</availability><activity token="on-the-phone"/></state></category></categories>"#;
        let p = sip_to_xmpp(&set, lync, xmpp, SipBodyKind::Msrtc, body)
            .expect("ok")
            .expect("some");
        assert_eq!(p.show, Some(Show::Away));
        assert_eq!(p.status.as_deref(), Some("In a call"));
        assert!(!p.unavailable);
    }

    #[test]
    fn a_body_without_availability_changes_nothing() {
        let set = map::embedded().expect("defaults");
        let (lync, xmpp) = ids(&set);
        let body = br#"<categories xmlns="http://schemas.microsoft.com/2006/09/sip/categories"><category name="note"><note xmlns="http://schemas.microsoft.com/2006/09/sip/note"><body type="personal">hi</body></note></category></categories>"#;
        assert_eq!(
            sip_to_xmpp(&set, lync, xmpp, SipBodyKind::Msrtc, body).expect("ok"),
            None
        );
    }

    #[test]
    fn xmpp_dnd_goes_to_lync_as_busy_both_formats() {
        let set = map::embedded().expect("defaults");
        let (lync, xmpp) = ids(&set);
        let p = XmppPresence {
            show: Some(Show::Dnd),
            status: Some("Writing".into()),
            ..Default::default()
        };
        let mut out = Vec::new();
        xmpp_to_sip(
            &set,
            xmpp,
            lync,
            &p,
            SipBodyKind::Msrtc,
            "sip:alice@example.com",
            &mut out,
        );
        let m = codec::msrtc::decode_msrtc(&out).expect("own output decodes");
        assert_eq!(m.availability, Some(6500));
        assert_eq!(m.note.as_deref(), Some("Writing"));
        out.clear();
        xmpp_to_sip(
            &set,
            xmpp,
            lync,
            &p,
            SipBodyKind::Pidf,
            "pres:alice@example.com",
            &mut out,
        );
        let d = codec::pidf::decode_pidf(&out).expect("own output decodes");
        assert_eq!(d.basic, Some(crate::presence::wire::Basic::Open));
        assert_eq!(d.activities, ["busy"]);
    }

    #[test]
    fn content_types() {
        assert_eq!(
            SipBodyKind::from_content_type("Application/PIDF+XML; charset=utf-8"),
            Some(SipBodyKind::Pidf)
        );
        assert_eq!(
            SipBodyKind::from_content_type("application/msrtc-event-categories+xml"),
            Some(SipBodyKind::Msrtc)
        );
        assert_eq!(SipBodyKind::from_content_type("text/plain"), None);
    }
}
