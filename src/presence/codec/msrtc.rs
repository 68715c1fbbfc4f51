//! msrtc codec: Microsoft `application/msrtc-event-categories+xml` bodies (Lync / Skype for
//! Business enhanced presence, [MS-PRES] category schemas) ⇄ [`MsrtcPresence`]. It reads the
//! `state`, `note` and `legacyInterop` categories and ignores every other category (device,
//! services, contactCard, calendarData, routing, ...). It reports the availability *number* and
//! activity token it selected; what 6500 means for an XMPP watcher is the mapping tables'
//! business.
//!
//! Accepted documents: a `<categories>` document (namespace
//! `http://schemas.microsoft.com/2006/09/sip/categories`), or a single `<category>` from it, or
//! a bare category value — `<state>` (`.../sip/state`), `<note>` (`.../sip/note`),
//! `<legacyInterop>` (`.../sip/categories`) — as SDK pages and roaming fragments carry them. Any
//! other root in a Microsoft SIP schema namespace (`http://schemas.microsoft.com/...`) is a
//! category we do not use: it is vetted and yields an empty [`MsrtcPresence`]. Other roots are
//! [`CodecError::Invalid`].
//!
//! Selection when several instances exist (a subscriber usually receives several containers'
//! copies, and a self-subscription every machine/user/calendar/phone state):
//! 1. among `xsi:type="aggregateState"` instances carrying `<availability>`: the highest — the
//!    server's own aggregation is authoritative ([MS-PRES] aggregation);
//! 2. otherwise among all `state` instances carrying `<availability>`: the highest. Higher Lync
//!    numbers are *less* available (3500 available … 18000 offline), so this is the
//!    conservative reading and mirrors how the server aggregates (most restrictive wins);
//! 3. otherwise the highest `legacyInterop` `availability` attribute (the value Lync publishes
//!    for pre-2007 clients);
//! 4. otherwise availability `None` (never "offline": a calendar or user state without
//!    `<availability>` says nothing about reachability) and the activity token of the first
//!    aggregateState instance, else of the first state instance.
//!
//! Ties keep the first in document order. The activity is always the one of the selected
//! instance. The note is the first `<body type="personal">` of any `note` category, text kept
//! as sent.

use super::xml::{self, Dialect, Node, Ns, XmlIn};
use super::CodecError;
use crate::presence::wire::MsrtcPresence;

struct Instance {
    availability: u32,
    activity: Option<String>,
}

#[derive(Default)]
struct Acc {
    best_aggregate: Option<Instance>,
    best_state: Option<Instance>,
    best_legacy: Option<Instance>,
    first_aggregate_activity: Option<Option<String>>,
    first_state_activity: Option<Option<String>>,
    note: Option<String>,
}

fn offer(best: &mut Option<Instance>, availability: u32, activity: &Option<String>) {
    if best.as_ref().is_none_or(|b| availability > b.availability) {
        *best = Some(Instance {
            availability,
            activity: activity.clone(),
        });
    }
}

/// Decodes one msrtc category document or category value (see the module docs).
pub fn decode_msrtc(xml: &[u8]) -> Result<MsrtcPresence, CodecError> {
    xml::decode_with(xml, Dialect::Document, msrtc_from)
}

fn msrtc_from(r: &mut XmlIn<'_>) -> Result<MsrtcPresence, CodecError> {
    let (ns, root) = r.root()?;
    let mut acc = Acc::default();
    match (ns, xml::local(&root)) {
        (Ns::MsCategories, "categories") => loop {
            match r.next()? {
                Node::Start { ns, elem } => {
                    if ns == Ns::MsCategories && xml::local(&elem) == "category" {
                        category(r, &mut acc)?;
                    } else {
                        r.skip()?;
                    }
                }
                Node::End => break,
                Node::Text(_) | Node::Char(_) => {}
                Node::Eof => return Err(xml::not_well_formed("truncated document")),
            }
        },
        (Ns::MsCategories, "category") => category(r, &mut acc)?,
        _ => value(r, &mut acc, ns, &root, true)?,
    }
    r.finish()?;

    let chosen = acc.best_aggregate.or(acc.best_state).or(acc.best_legacy);
    let (availability, activity) = match chosen {
        Some(i) => (Some(i.availability), i.activity),
        None => (
            None,
            acc.first_aggregate_activity
                .or(acc.first_state_activity)
                .flatten(),
        ),
    };
    Ok(MsrtcPresence {
        availability,
        activity,
        note: acc.note,
    })
}

/// The children of one `<category>` (its start tag already read).
fn category(r: &mut XmlIn<'_>, acc: &mut Acc) -> Result<(), CodecError> {
    loop {
        match r.next()? {
            Node::Start { ns, elem } => value(r, acc, ns, &elem, false)?,
            Node::End => return Ok(()),
            Node::Text(_) | Node::Char(_) => {}
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        }
    }
}

/// One category value element (start tag already read), through its end tag.
fn value(
    r: &mut XmlIn<'_>,
    acc: &mut Acc,
    ns: Ns,
    elem: &quick_xml::events::BytesStart<'_>,
    is_root: bool,
) -> Result<(), CodecError> {
    match (ns, xml::local(elem)) {
        (Ns::MsState, "state") => state(r, acc, elem),
        (Ns::MsNote, "note") => note(r, acc),
        (Ns::MsCategories, "legacyInterop") => {
            let availability = r
                .attr(elem, "availability")?
                .map(|a| parse_availability(&a))
                .transpose()?;
            let activity = r.attr(elem, "token")?.map(|t| t.into_owned());
            if let Some(availability) = availability {
                offer(&mut acc.best_legacy, availability, &activity);
            }
            r.skip()
        }
        (Ns::MsCategories | Ns::MsState | Ns::MsNote | Ns::MsOther, _) => r.skip(),
        // Inside a <category>, a value in a foreign namespace is someone's extension; as the
        // whole document it means this is not an msrtc body at all.
        _ if is_root => Err(CodecError::Invalid(
            "root is not a Microsoft SIP category element".into(),
        )),
        _ => r.skip(),
    }
}

fn parse_availability(s: &str) -> Result<u32, CodecError> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| CodecError::Invalid("availability is not an unsigned integer".into()))
}

/// `<state xsi:type="...">` ([MS-PRES] state schema): `<availability>` and `<activity token>`.
fn state(
    r: &mut XmlIn<'_>,
    acc: &mut Acc,
    elem: &quick_xml::events::BytesStart<'_>,
) -> Result<(), CodecError> {
    // xsi:type is a QName value; compare its local part.
    let aggregate = r.attr_ns(elem, Ns::Xsi, "type")?.is_some_and(|t| {
        let t = t.trim();
        t.rsplit_once(':').map_or(t, |(_, l)| l) == "aggregateState"
    });
    let mut availability = None;
    let mut activity = None;
    let mut text = String::new();
    loop {
        let (ns, child) = match r.next()? {
            Node::Start { ns, elem } => (ns, elem),
            Node::End => break,
            Node::Text(_) | Node::Char(_) => continue,
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        };
        match (ns, xml::local(&child)) {
            (Ns::MsState, "availability") => {
                if availability.is_some() {
                    return Err(CodecError::Invalid("more than one <availability/>".into()));
                }
                text.clear();
                r.read_text(&mut text)?;
                availability = Some(parse_availability(&text)?);
            }
            (Ns::MsState, "activity") => {
                if activity.is_none() {
                    activity = Some(r.attr(&child, "token")?.map(|t| t.into_owned()));
                }
                r.skip()?;
            }
            _ => r.skip()?,
        }
    }
    let activity = activity.flatten();
    if let Some(availability) = availability {
        if aggregate {
            offer(&mut acc.best_aggregate, availability, &activity);
        }
        offer(&mut acc.best_state, availability, &activity);
    }
    if aggregate && acc.first_aggregate_activity.is_none() {
        acc.first_aggregate_activity = Some(activity.clone());
    }
    if acc.first_state_activity.is_none() {
        acc.first_state_activity = Some(activity);
    }
    Ok(())
}

/// `<note>` ([MS-PRES] note schema): the first `<body type="personal">`.
fn note(r: &mut XmlIn<'_>, acc: &mut Acc) -> Result<(), CodecError> {
    loop {
        let (ns, child) = match r.next()? {
            Node::Start { ns, elem } => (ns, elem),
            Node::End => return Ok(()),
            Node::Text(_) | Node::Char(_) => continue,
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        };
        let personal = ns == Ns::MsNote
            && xml::local(&child) == "body"
            && r.attr(&child, "type")?.as_deref() == Some("personal");
        if personal && acc.note.is_none() {
            let mut text = String::new();
            r.read_text(&mut text)?;
            acc.note = Some(text);
        } else {
            r.skip()?;
        }
    }
}

/// Writes `p` as a `<categories>` document: a `state` category holding one
/// `xsi:type="aggregateState"` instance with `<availability>` and `<activity token>` (when
/// either is set), and a `note` category with a `personal` body (when set). The presentity
/// `uri` and publication metadata (`publishTime`, `container`, `version`) are not part of
/// [`MsrtcPresence`] and are not written.
pub fn encode_msrtc(p: &MsrtcPresence, out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"<?xml version=\"1.0\" encoding=\"utf-8\"?>\
          <categories xmlns=\"http://schemas.microsoft.com/2006/09/sip/categories\">",
    );
    if p.availability.is_some() || p.activity.is_some() {
        out.extend_from_slice(
            b"<category name=\"state\" instance=\"0\">\
              <state xmlns=\"http://schemas.microsoft.com/2006/09/sip/state\" \
              xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
              xsi:type=\"aggregateState\">",
        );
        if let Some(availability) = p.availability {
            out.extend_from_slice(b"<availability>");
            xml::push_int(out, i64::from(availability));
            out.extend_from_slice(b"</availability>");
        }
        if let Some(token) = &p.activity {
            out.extend_from_slice(b"<activity token=\"");
            xml::push_attr(out, token);
            out.extend_from_slice(b"\"/>");
        }
        out.extend_from_slice(b"</state></category>");
    }
    if let Some(note) = &p.note {
        out.extend_from_slice(
            b"<category name=\"note\" instance=\"0\">\
              <note xmlns=\"http://schemas.microsoft.com/2006/09/sip/note\">\
              <body type=\"personal\">",
        );
        xml::push_text(out, note);
        out.extend_from_slice(b"</body></note></category>");
    }
    out.extend_from_slice(b"</categories>");
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE_NS: &str = "http://schemas.microsoft.com/2006/09/sip/state";
    const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

    fn state(xsi_type: &str, body: &str) -> String {
        format!(
            "<category name='state'><state xmlns='{STATE_NS}' xmlns:xsi='{XSI}' xsi:type='{xsi_type}'>{body}</state></category>"
        )
    }

    fn doc(inner: &str) -> String {
        format!("<categories xmlns='http://schemas.microsoft.com/2006/09/sip/categories'>{inner}</categories>")
    }

    #[test]
    fn aggregate_wins_over_higher_machine_state() {
        let xml = doc(&format!(
            "{}{}",
            state(
                "machineState",
                "<availability>15500</availability><activity token='away'/>"
            ),
            state(
                "aggregateState",
                "<availability>6500</availability><activity token='on-the-phone'/>"
            )
        ));
        assert_eq!(
            decode_msrtc(xml.as_bytes()),
            Ok(MsrtcPresence {
                availability: Some(6500),
                activity: Some("on-the-phone".into()),
                note: None,
            })
        );
    }

    #[test]
    fn highest_state_without_aggregate() {
        let xml = doc(&format!(
            "{}{}{}",
            state("userState", "<availability>3500</availability>"),
            state(
                "phoneState",
                "<availability>6500</availability><activity token='on-the-phone'/>"
            ),
            state("calendarState", "<activity token='in-a-meeting'/>")
        ));
        assert_eq!(
            decode_msrtc(xml.as_bytes()).map(|p| (p.availability, p.activity)),
            Ok((Some(6500), Some("on-the-phone".into())))
        );
    }

    #[test]
    fn aggregate_without_availability_does_not_hide_other_states() {
        let xml = doc(&format!(
            "{}{}{}",
            state("aggregateState", "<activity token='in-a-meeting'/>"),
            state(
                "machineState",
                "<availability>3500</availability><activity token='first'/>"
            ),
            state(
                "userState",
                "<availability>3500</availability><activity token='second'/>"
            )
        ));
        // Rule 2, and a tie keeps the first instance in document order.
        assert_eq!(
            decode_msrtc(xml.as_bytes()).map(|p| (p.availability, p.activity)),
            Ok((Some(3500), Some("first".into())))
        );
    }

    #[test]
    fn state_without_availability_is_not_offline() {
        let xml = doc(&state(
            "calendarState",
            "<activity token='out-of-office' minAvailability='12000'/>",
        ));
        assert_eq!(
            decode_msrtc(xml.as_bytes()).map(|p| (p.availability, p.activity)),
            Ok((None, Some("out-of-office".into())))
        );
    }

    #[test]
    fn legacy_interop_is_the_last_resort() {
        let xml = doc("<category name='legacyInterop'><legacyInterop availability='6500' token='on-the-phone'/></category>");
        assert_eq!(
            decode_msrtc(xml.as_bytes()).map(|p| (p.availability, p.activity)),
            Ok((Some(6500), Some("on-the-phone".into())))
        );
        let xml = doc(&format!(
            "<category name='legacyInterop'><legacyInterop availability='18000'/></category>{}",
            state("userState", "<availability>3500</availability>")
        ));
        assert_eq!(
            decode_msrtc(xml.as_bytes()).map(|p| p.availability),
            Ok(Some(3500))
        );
    }

    #[test]
    fn invalid() {
        for xml in [
            doc(&state("userState", "<availability>busy</availability>")),
            doc(&state("userState", "<availability>-1</availability>")),
            doc(&state(
                "userState",
                "<availability>1</availability><availability>2</availability>",
            )),
            "<presence xmlns='urn:ietf:params:xml:ns:pidf' entity='x'/>".into(),
            "<categories/>".into(),
        ] {
            assert!(
                matches!(decode_msrtc(xml.as_bytes()), Err(CodecError::Invalid(_))),
                "{xml}"
            );
        }
    }

    #[test]
    fn unknown_categories_are_ignored() {
        let xml = doc("<category name='device'><device xmlns='http://schemas.microsoft.com/2006/09/sip/device'><x/></device></category><category name='x'><y xmlns='urn:other'/></category>");
        assert_eq!(decode_msrtc(xml.as_bytes()), Ok(MsrtcPresence::default()));
    }

    #[test]
    fn round_trips() {
        for p in [
            MsrtcPresence::default(),
            MsrtcPresence {
                availability: Some(0),
                activity: None,
                note: Some(String::new()),
            },
            MsrtcPresence {
                availability: None,
                activity: Some("in-a-meeting".into()),
                note: None,
            },
            MsrtcPresence {
                availability: Some(u32::MAX),
                activity: Some("a \"b\" <c>\t&\n".into()),
                note: Some(" I'm <away> & \"out\"\r\n😀 ".into()),
            },
        ] {
            let mut out = Vec::new();
            encode_msrtc(&p, &mut out);
            assert_eq!(decode_msrtc(&out), Ok(p.clone()));
        }
    }
}
