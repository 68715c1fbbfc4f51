//! PIDF codec: `application/pidf+xml` bodies (RFC 3863) with RPID activities (RFC 4480) and the
//! XMPP `<show/>` embedding of RFC 8048 §4.3 ⇄ [`PidfPresence`]. Elements are matched by
//! namespace URI, never by prefix (RFC 3863 §4.2.2 shows the same document prefixed and
//! default-namespaced). It reduces a document to the facts presence interworking uses and
//! ignores every extension it does not know (RFC 3863 §4.3); it never decides what an activity
//! means.
//!
//! Decoding rules:
//! - root `{urn:ietf:params:xml:ns:pidf}presence` with an `entity` attribute (RFC 3863 §4.1.1),
//!   else [`CodecError::Invalid`];
//! - `basic`: open when any tuple's `<status><basic>` is open, closed when some are closed and
//!   none open, `None` when no tuple has one (RFC 8048 §4.3); a value other than
//!   `open`/`closed` is [`CodecError::Invalid`] (RFC 3863 §4.1.4);
//! - `activities`: the RPID `<activities>` children of `<dm:person>` (RFC 4480 §3) or of a
//!   tuple / its `<status>` (older RPID placement), all of them in document order, as local
//!   names; `<rpid:other>TEXT</rpid:other>` becomes `other:TEXT`; `<rpid:note>` is not an
//!   activity; children in other namespaces are extensions and are skipped;
//! - `show`: the first `{jabber:client}show` in a tuple or its status (RFC 8048 §4.3); an
//!   unknown value is ignored like any extension;
//! - `note`: of the PIDF `<note>` elements at presentity or tuple level, the first one without
//!   `xml:lang`, else the first one; text kept as sent. `<dm:note>`/`<rpid:note>` annotate
//!   devices, persons and activities, not the presentity, and are not used;
//! - unknown elements are skipped whole, `mustUnderstand` or not: RFC 3863 §4.3.3 makes the
//!   whole unknown extension ignorable, and the basic status is still processed.

use super::xml::{self, Dialect, Node, Ns, XmlIn};
use super::CodecError;
use crate::presence::wire::{Basic, PidfPresence, Show};

#[derive(Default)]
struct Acc {
    any_open: bool,
    any_closed: bool,
    activities: Vec<String>,
    show: Option<Show>,
    note: Option<String>,
    note_has_lang: bool,
    scratch: String,
}

/// Where in the document a container element sits; decides which children count.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Presence,
    Tuple,
    Status,
    Person,
}

/// Decodes one PIDF document (see the module docs for the rules).
pub fn decode_pidf(xml: &[u8]) -> Result<PidfPresence, CodecError> {
    xml::decode_with(xml, Dialect::Document, pidf_from)
}

fn pidf_from(r: &mut XmlIn<'_>) -> Result<PidfPresence, CodecError> {
    let (ns, root) = r.root()?;
    if ns != Ns::Pidf || xml::local(&root) != "presence" {
        return Err(CodecError::Invalid(
            "root is not {urn:ietf:params:xml:ns:pidf}presence".into(),
        ));
    }
    let entity = r
        .attr(&root, "entity")?
        .ok_or_else(|| CodecError::Invalid("<presence/> without entity".into()))?
        .into_owned();
    let mut acc = Acc::default();
    container(r, &mut acc, Level::Presence)?;
    r.finish()?;
    let basic = if acc.any_open {
        Some(Basic::Open)
    } else if acc.any_closed {
        Some(Basic::Closed)
    } else {
        None
    };
    Ok(PidfPresence {
        entity,
        basic,
        activities: acc.activities,
        show: acc.show,
        note: acc.note,
    })
}

/// Walks the children of a container element (its start tag already read) through its end tag.
/// Depth is bounded by the guard (`MAX_PRESENCE_DEPTH`), and the levels only nest
/// presence → tuple → status, so recursion is at most three deep.
fn container(r: &mut XmlIn<'_>, acc: &mut Acc, level: Level) -> Result<(), CodecError> {
    loop {
        let (ns, elem) = match r.next()? {
            Node::Start { ns, elem } => (ns, elem),
            Node::End => return Ok(()),
            Node::Text(_) | Node::Char(_) => continue,
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        };
        match (level, ns, xml::local(&elem)) {
            (Level::Presence, Ns::Pidf, "tuple") => container(r, acc, Level::Tuple)?,
            (Level::Presence, Ns::DataModel, "person") => container(r, acc, Level::Person)?,
            (Level::Tuple, Ns::Pidf, "status") => container(r, acc, Level::Status)?,
            (Level::Presence | Level::Tuple, Ns::Pidf, "note") => {
                let lang = xml::has_xml_lang(&elem);
                acc.scratch.clear();
                r.read_text(&mut acc.scratch)?;
                // Prefer the note in the document's own language (no xml:lang), as for XMPP
                // <status/> (RFC 8048 Table 2 maps one to the other).
                if acc.note.is_none() || (acc.note_has_lang && !lang) {
                    acc.note = Some(std::mem::take(&mut acc.scratch));
                    acc.note_has_lang = lang;
                }
            }
            (Level::Status, Ns::Pidf, "basic") => {
                acc.scratch.clear();
                r.read_text(&mut acc.scratch)?;
                match acc.scratch.trim() {
                    "open" => acc.any_open = true,
                    "closed" => acc.any_closed = true,
                    _ => return Err(CodecError::Invalid("<basic/> is not open/closed".into())),
                }
            }
            (Level::Tuple | Level::Status, Ns::JabberClient, "show") => {
                acc.scratch.clear();
                r.read_text(&mut acc.scratch)?;
                if acc.show.is_none() {
                    acc.show = Show::parse(acc.scratch.trim());
                }
            }
            (Level::Tuple | Level::Status | Level::Person, Ns::Rpid, "activities") => {
                activities(r, acc)?;
            }
            _ => r.skip()?,
        }
    }
}

/// RFC 4480 `<activities>`: `note*` then activity elements.
fn activities(r: &mut XmlIn<'_>, acc: &mut Acc) -> Result<(), CodecError> {
    loop {
        let (ns, elem) = match r.next()? {
            Node::Start { ns, elem } => (ns, elem),
            Node::End => return Ok(()),
            Node::Text(_) | Node::Char(_) => continue,
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        };
        match (ns, xml::local(&elem)) {
            (Ns::Rpid, "note") => r.skip()?,
            (Ns::Rpid, "other") => {
                let mut text = String::from("other:");
                r.read_text(&mut text)?;
                acc.activities.push(text);
            }
            (Ns::Rpid, name) => {
                acc.activities.push(name.to_owned());
                r.skip()?;
            }
            _ => r.skip()?,
        }
    }
}

const ACTIVITY_OTHER: &str = "other:";

/// Writes `p` as a PIDF document in the RFC 8048 §4.3 shape: one tuple whose `<status>` has
/// `<basic>` (when known) and the `{jabber:client}show` (when set), the note as a tuple `<note>`,
/// and a `<dm:person>` with RPID `<activities>` when there are any (RFC 4480; RFC 4479 `<person>`).
///
/// An activity is written as an empty `<rpid:NAME/>` element; `other:TEXT` as
/// `<rpid:other>TEXT</rpid:other>`; a string that cannot be an element name (or is `note`) as
/// `<rpid:other>STRING</rpid:other>` — the latter only happens for values built by hand, never
/// for decoded ones, so decode(encode(decode(x))) is stable.
pub fn encode_pidf(p: &PidfPresence, out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
          <presence xmlns=\"urn:ietf:params:xml:ns:pidf\" \
          xmlns:dm=\"urn:ietf:params:xml:ns:pidf:data-model\" \
          xmlns:rpid=\"urn:ietf:params:xml:ns:pidf:rpid\" entity=\"",
    );
    xml::push_attr(out, &p.entity);
    // One tuple; its id only needs to be a stable XML ID (RFC 3863 §4.1.2).
    out.extend_from_slice(b"\"><tuple id=\"legate\">");
    if p.basic.is_none() && p.show.is_none() {
        out.extend_from_slice(b"<status/>");
    } else {
        out.extend_from_slice(b"<status>");
        match p.basic {
            Some(Basic::Open) => out.extend_from_slice(b"<basic>open</basic>"),
            Some(Basic::Closed) => out.extend_from_slice(b"<basic>closed</basic>"),
            None => {}
        }
        if let Some(show) = p.show {
            out.extend_from_slice(b"<show xmlns=\"jabber:client\">");
            out.extend_from_slice(show.as_str().as_bytes());
            out.extend_from_slice(b"</show>");
        }
        out.extend_from_slice(b"</status>");
    }
    if let Some(note) = &p.note {
        out.extend_from_slice(b"<note>");
        xml::push_text(out, note);
        out.extend_from_slice(b"</note>");
    }
    out.extend_from_slice(b"</tuple>");
    if !p.activities.is_empty() {
        out.extend_from_slice(b"<dm:person id=\"p\"><rpid:activities>");
        for activity in &p.activities {
            let other = activity.strip_prefix(ACTIVITY_OTHER);
            match other {
                None if xml::is_ncname(activity) && activity != "note" => {
                    out.extend_from_slice(b"<rpid:");
                    out.extend_from_slice(activity.as_bytes());
                    out.extend_from_slice(b"/>");
                }
                _ => {
                    out.extend_from_slice(b"<rpid:other>");
                    xml::push_text(out, other.unwrap_or(activity));
                    out.extend_from_slice(b"</rpid:other>");
                }
            }
        }
        out.extend_from_slice(b"</rpid:activities></dm:person>");
    }
    out.extend_from_slice(b"</presence>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(p: &PidfPresence) -> Result<PidfPresence, CodecError> {
        let mut out = Vec::new();
        encode_pidf(p, &mut out);
        decode_pidf(&out)
    }

    #[test]
    fn rfc8048_show_in_status() {
        let xml = b"<?xml version='1.0' encoding='UTF-8'?>
<presence xmlns='urn:ietf:params:xml:ns:pidf' entity='pres:romeo@example.net'>
  <tuple id='ID-dr4hcr0st3lup4c'>
    <status>
      <basic>open</basic>
      <show xmlns='jabber:client'>away</show>
    </status>
  </tuple>
</presence>";
        assert_eq!(
            decode_pidf(xml),
            Ok(PidfPresence {
                entity: "pres:romeo@example.net".into(),
                basic: Some(Basic::Open),
                activities: vec![],
                show: Some(Show::Away),
                note: None,
            })
        );
    }

    #[test]
    fn aggregation_and_prefixes() {
        let xml = b"<p:presence xmlns:p='urn:ietf:params:xml:ns:pidf' xmlns:r='urn:ietf:params:xml:ns:pidf:rpid' xmlns:d='urn:ietf:params:xml:ns:pidf:data-model' entity='pres:a@b'>
  <p:tuple id='a'><p:status><p:basic>closed</p:basic></p:status><p:note xml:lang='en'>en</p:note></p:tuple>
  <p:tuple id='b'><p:status><p:basic> open </p:basic><r:activities><r:busy/></r:activities></p:status></p:tuple>
  <p:note>plain</p:note>
  <d:person id='x'><r:activities><r:note>n</r:note><r:on-the-phone/><r:other>golf</r:other><x:y xmlns:x='urn:x'/></r:activities></d:person>
</p:presence>";
        let p = decode_pidf(xml).expect("valid");
        assert_eq!(p.basic, Some(Basic::Open));
        assert_eq!(p.note.as_deref(), Some("plain"));
        assert_eq!(p.activities, ["busy", "on-the-phone", "other:golf"]);
    }

    #[test]
    fn wrong_documents() {
        for xml in [
            &b"<presence entity='x'/>"[..],
            b"<presence xmlns='urn:ietf:params:xml:ns:pidf'/>",
            b"<presence xmlns='urn:ietf:params:xml:ns:pidf' entity='x'><tuple id='t'><status><basic>maybe</basic></status></tuple></presence>",
        ] {
            assert!(matches!(decode_pidf(xml), Err(CodecError::Invalid(_))));
        }
    }

    #[test]
    fn round_trips() {
        for p in [
            PidfPresence::default(),
            PidfPresence {
                entity: "pres:a@b.c".into(),
                basic: Some(Basic::Closed),
                activities: vec![],
                show: None,
                note: Some(String::new()),
            },
            PidfPresence {
                entity: "pres:\"a'<b>&\"".into(),
                basic: Some(Basic::Open),
                activities: vec![
                    "away".into(),
                    "on-the-phone".into(),
                    "other:at the <&> gym\r\n".into(),
                    "unknown".into(),
                ],
                show: Some(Show::Dnd),
                note: Some("  Tokyo\tnext week\r\n ✈ ".into()),
            },
        ] {
            assert_eq!(rt(&p), Ok(p.clone()));
        }
    }

    #[test]
    fn hand_built_activities_that_are_not_names() {
        let p = PidfPresence {
            activities: vec!["not a name".into(), "note".into()],
            ..PidfPresence::default()
        };
        assert_eq!(
            rt(&p).map(|p| p.activities),
            Ok(vec![
                "other:not a name".to_string(),
                "other:note".to_string()
            ])
        );
    }
}
