//! Presence codec conformance: every file of the vector folders copied under
//! `tests/data/presence/` (from `shared/vectors/presence/`, sources in each `index.tsv`) is
//! decoded and checked against what its index row says — availability numbers and Lync modes,
//! basic status, activities, notes, `<show/>`, stanza kinds — then re-encoded and decoded again
//! (the fuzz target's round trip). Hostile inputs must give the specific `CodecError` variant.
//! Round trips are also checked on arbitrary values with proptest.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use legate::presence::codec::msrtc::{decode_msrtc, encode_msrtc};
use legate::presence::codec::pidf::{decode_pidf, encode_pidf};
use legate::presence::codec::xmpp::{
    decode_presence, decode_presence_full, decode_presence_kind, encode_presence,
    encode_presence_kind, PresenceAttrs, PresenceKind,
};
use legate::presence::codec::{CodecError, MAX_PRESENCE_DEPTH, MAX_PRESENCE_DOC};
use legate::presence::wire::{Basic, MsrtcPresence, PidfPresence, Show, XmppPresence};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Vector plumbing

fn folder(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/presence")
        .join(name)
}

/// The rows of `index.tsv` (header skipped), and a check that the folder holds exactly the files
/// the index lists — a vector nobody asserts on is a vector that silently rots.
fn index(name: &str) -> Vec<Vec<String>> {
    let dir = folder(name);
    let tsv = std::fs::read_to_string(dir.join("index.tsv")).expect("index.tsv");
    let rows: Vec<Vec<String>> = tsv
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect();
    let listed: BTreeSet<String> = rows.iter().map(|r| r[0].clone()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("vector folder")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .into_string()
                .expect("utf-8 name")
        })
        .filter(|n| n != "index.tsv")
        .collect();
    assert_eq!(listed, present, "{name}: index.tsv and folder disagree");
    rows
}

fn read(name: &str, file: &str) -> Vec<u8> {
    std::fs::read(folder(name).join(file)).expect("vector file")
}

fn msrtc_round_trip(p: &MsrtcPresence) {
    let mut out = Vec::new();
    encode_msrtc(p, &mut out);
    assert_eq!(decode_msrtc(&out).as_ref(), Ok(p), "msrtc round trip");
}

fn pidf_round_trip(p: &PidfPresence) {
    let mut out = Vec::new();
    encode_pidf(p, &mut out);
    assert_eq!(decode_pidf(&out).as_ref(), Ok(p), "pidf round trip");
}

fn kind_round_trip(kind: &PresenceKind, attrs: &PresenceAttrs) {
    let mut out = Vec::new();
    encode_presence_kind(kind, attrs, &mut out);
    let (k2, a2) = decode_presence_kind(&out).expect("own output decodes");
    assert_eq!(&k2, kind);
    assert_eq!(
        (&a2.from, &a2.to, &a2.id),
        (&attrs.from, &attrs.to, &attrs.id)
    );
}

/// Lync availability ranges (`docs/schema/parsing-lync-published-category-instances.md`, as
/// repeated in `shared/vectors/README.md`): the index's "Lync mode" column.
fn lync_mode(availability: Option<u32>) -> &'static str {
    match availability {
        None => "(no availability)",
        Some(0..=2999) => "undefined",
        Some(3000..=4499) => "available",
        Some(4500..=5999) => "available-idle",
        Some(6000..=7499) => "busy",
        Some(7500..=8999) => "busy-idle",
        Some(9000..=11999) => "do-not-disturb",
        Some(12000..=14999) => "be-right-back",
        Some(15000..=17999) => "away",
        Some(_) => "offline",
    }
}

// ---------------------------------------------------------------------------------------------
// msrtc vectors

/// Activity tokens and personal notes the index does not spell out, read off the files.
fn lync_extra(file: &str) -> (Option<&'static str>, Option<&'static str>) {
    match file {
        "aggregation-containers-03-state-calendarState.xml"
        | "aggregation-containers-13-state-calendarState.xml" => (Some("out-of-office"), None),
        "aggregation-containers-04-state-phoneState.xml"
        | "aggregation-containers-14-state-phoneState.xml" => (Some("on-the-phone"), None),
        "aggregation-containers-11-state-userState.xml" => {
            (Some("urgent-interruptions-only"), None)
        }
        "state-element_1-01-state-phoneState.xml" => (Some("in-a-conference"), None),
        "state-element_3-01-state-calendarState.xml" => (Some("in-a-meeting"), None),
        "external-contacts-container-10-note.xml" => (None, Some("A message for public")),
        "note-category-instance-value-element-01-note.xml" => (None, Some("I'm away today.")),
        _ => (None, None),
    }
}

#[test]
fn ms_lync_categories_vectors() {
    let rows = index("ms-lync-categories");
    assert_eq!(rows.len(), 42);
    for row in &rows {
        let [file, _source, availability, mode, expected] = &row[..] else {
            panic!("bad index row {row:?}");
        };
        let want_availability = if availability.is_empty() {
            None
        } else {
            Some(availability.parse::<u32>().expect("index availability"))
        };
        let got = decode_msrtc(&read("ms-lync-categories", file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(got.availability, want_availability, "{file}: availability");
        assert_eq!(lync_mode(got.availability), mode, "{file}: Lync mode");
        if expected.contains("must not by itself produce offline") {
            assert_eq!(got.availability, None, "{file}");
        }
        let (activity, note) = lync_extra(file);
        assert_eq!(got.activity.as_deref(), activity, "{file}: activity");
        assert_eq!(got.note.as_deref(), note, "{file}: note");
        msrtc_round_trip(&got);
    }
}

#[test]
fn real_traces_vectors() {
    let rows = index("real-traces");
    assert_eq!(rows.len(), 2);
    let sfb = "sfb2016-roaming-categories-fragment-tieto-sipe-issue119.xml";
    let got = decode_msrtc(&read("real-traces", sfb)).expect("SfB trace decodes");
    assert_eq!(
        got,
        MsrtcPresence {
            availability: Some(6500),
            activity: Some("on-the-phone".into()),
            note: None,
        }
    );
    assert_eq!(lync_mode(got.availability), "busy", "never offline");
    msrtc_round_trip(&got);

    // "reference only (not parseable)": every decoder refuses it, none panics.
    let txt = read(
        "real-traces",
        "ocs2007-reskit-public-im-subscribe-fragment.txt",
    );
    assert!(matches!(
        decode_msrtc(&txt),
        Err(CodecError::NotWellFormed(_))
    ));
    assert!(matches!(
        decode_pidf(&txt),
        Err(CodecError::NotWellFormed(_))
    ));
    assert!(matches!(
        decode_presence(&txt),
        Err(CodecError::NotWellFormed(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// PIDF / RPID vectors

fn pidf(basic: Basic, activities: &[&str], show: Option<Show>, note: Option<&str>) -> PidfPresence {
    PidfPresence {
        entity: "pres:someone@example.com".into(),
        basic: Some(basic),
        activities: activities.iter().map(|a| a.to_string()).collect(),
        show,
        note: note.map(Into::into),
    }
}

#[test]
fn pidf_rfc3863_vectors() {
    let rows = index("pidf-rfc3863");
    assert_eq!(rows.len(), 6);
    for row in &rows {
        let file = &row[0];
        let want = match file.as_str() {
            // §4.2.2: identical semantics, prefixed or default namespace.
            "4.2.2-prefixed-impp.xml" | "4.2.2-default-ns.xml" => {
                pidf(Basic::Open, &[], None, None)
            }
            // §4.2.4: <local:location> ignored.
            "4.2.4-status-extension-location.xml" => pidf(Basic::Open, &[], None, None),
            // §4.3.1: two open tuples; the presentity note (no xml:lang) beats the en/fr
            // tuple notes.
            "4.3.1-default-ns-status-extensions.xml" => {
                pidf(Basic::Open, &[], None, Some("I'll be in Tokyo next week"))
            }
            // §4.3.2/§4.3.3: unknown (even mustUnderstand) extensions ignored, basic kept.
            "4.3.2-other-extension-elements.xml" | "4.3.3-mandatory-to-understand.xml" => {
                pidf(Basic::Open, &[], None, None)
            }
            other => panic!("no expectation for {other}"),
        };
        let got =
            decode_pidf(&read("pidf-rfc3863", file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(got, want, "{file}");
        pidf_round_trip(&got);
    }
}

#[test]
fn rpid_rfc4480_vector() {
    let rows = index("rpid-rfc4480");
    assert_eq!(rows.len(), 1);
    let got = decode_pidf(&read("rpid-rfc4480", "4-example.xml")).expect("RFC 4480 example");
    // Person activities <away/> (its <rpid:note>Far away</rpid:note> is not an activity);
    // the presentity-level note, not dm:note "PC"/"Scoring 120"; three open tuples.
    assert_eq!(
        got,
        pidf(
            Basic::Open,
            &["away"],
            None,
            Some("I'll be in Tokyo next week")
        )
    );
    pidf_round_trip(&got);
}

// ---------------------------------------------------------------------------------------------
// RFC 8048 vectors

fn attrs(from: &str, to: Option<&str>, type_: Option<&str>) -> PresenceAttrs {
    PresenceAttrs {
        from: Some(from.into()),
        to: to.map(Into::into),
        id: None,
        type_: type_.map(Into::into),
    }
}

/// Splits a SIP message into (headers, body) at the first CRLFCRLF.
fn sip_parts(msg: &[u8]) -> (String, &[u8]) {
    let at = msg
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("SIP header end");
    let head = String::from_utf8(msg[..at].to_vec()).expect("ASCII headers");
    (head, &msg[at + 4..])
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn sip_xmpp_rfc8048_vectors() {
    let dir = "sip-xmpp-rfc8048";
    let rows = index(dir);
    assert_eq!(rows.len(), 31);
    let romeo_open_away = PidfPresence {
        entity: "pres:romeo@example.net".into(),
        basic: Some(Basic::Open),
        activities: vec![],
        show: Some(Show::Away),
        note: None,
    };
    let juliet_open_away = PidfPresence {
        entity: "pres:juliet@example.com".into(),
        ..romeo_open_away.clone()
    };
    let romeo_closed = PidfPresence {
        basic: Some(Basic::Closed),
        show: None,
        ..romeo_open_away.clone()
    };
    let (j, r) = ("juliet@example.com", "romeo@example.net");
    let available = PresenceKind::Broadcast(XmppPresence::default());
    let unavailable = PresenceKind::Broadcast(XmppPresence {
        unavailable: true,
        ..XmppPresence::default()
    });

    let mut checked = 0;
    for row in &rows {
        let file = row[0].as_str();
        let bytes = read(dir, file);
        if file.ends_with(".body.pidf.xml") {
            let want = match file {
                "ex04-F10-sip-notify-pidf.body.pidf.xml" => &romeo_open_away,
                "ex19-sip-notify-from-xmpp-presence.body.pidf.xml" => &juliet_open_away,
                "ex20-sip-notify-pidf-closed.body.pidf.xml" => &romeo_closed,
                other => panic!("no expectation for {other}"),
            };
            let got = decode_pidf(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(&got, want, "{file}");
            pidf_round_trip(&got);
        } else if file.ends_with(".xml") {
            let (kind, want_attrs) = match file {
                "ex01-F1-xmpp-subscribe.xml" => (
                    PresenceKind::Subscribe,
                    attrs(j, Some(r), Some("subscribe")),
                ),
                "ex05-F14-xmpp-subscribed.xml" => (
                    PresenceKind::Subscribed,
                    attrs(r, Some(j), Some("subscribed")),
                ),
                "ex06-F15-xmpp-presence-from-sip.xml" => (
                    available.clone(),
                    attrs("romeo@example.net/dr4hcr0st3lup4c", Some(j), None),
                ),
                "ex07-F16-xmpp-unsubscribe.xml" => (
                    PresenceKind::Unsubscribe,
                    attrs(j, Some(r), Some("unsubscribe")),
                ),
                "ex09-F21-xmpp-unsubscribed.xml" => (
                    PresenceKind::Unsubscribed,
                    attrs(r, Some(j), Some("unsubscribed")),
                ),
                "ex12-F28-xmpp-subscribe.xml" => (
                    PresenceKind::Subscribe,
                    attrs(r, Some(j), Some("subscribe")),
                ),
                "ex13-F31-xmpp-subscribed.xml" => (
                    PresenceKind::Subscribed,
                    attrs(j, Some(r), Some("subscribed")),
                ),
                "ex15-xmpp-unsubscribed-reject.xml" => (
                    PresenceKind::Unsubscribed,
                    attrs(j, Some(r), Some("unsubscribed")),
                ),
                "ex18-xmpp-presence-available.xml" => (
                    available.clone(),
                    attrs("juliet@example.com/yn0cl4bnw0yr3vym", None, None),
                ),
                "ex21-xmpp-presence-unavailable.xml" => (
                    unavailable.clone(),
                    attrs(
                        r,
                        Some("juliet@example.com/yn0cl4bnw0yr3vym"),
                        Some("unavailable"),
                    ),
                ),
                "ex22-xmpp-presence-probe.xml" => (
                    PresenceKind::Probe,
                    attrs("juliet@example.com/chamber", Some(r), Some("probe")),
                ),
                "ex25-xmpp-presence-probe.xml" => {
                    (PresenceKind::Probe, attrs(r, Some(j), Some("probe")))
                }
                other => panic!("no expectation for {other}"),
            };
            let got = decode_presence_kind(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(got, (kind.clone(), want_attrs.clone()), "{file}");
            // The broadcast-only entry points agree, and refuse the rest.
            match &kind {
                PresenceKind::Broadcast(p) => {
                    assert_eq!(
                        decode_presence_full(&bytes),
                        Ok((p.clone(), want_attrs.clone()))
                    );
                }
                _ => assert!(
                    matches!(decode_presence(&bytes), Err(CodecError::Invalid(_))),
                    "{file}"
                ),
            }
            kind_round_trip(&kind, &want_attrs);
        } else if file.ends_with(".sip") {
            let (head, body) = sip_parts(&bytes);
            let declared: usize = header(&head, "Content-Length")
                .map(|v| v.parse().expect("Content-Length"))
                .unwrap_or(0);
            match header(&head, "Content-Type") {
                Some("application/pidf+xml") => {
                    let stem = file.split(".").next().expect("stem");
                    let want =
                        decode_pidf(&read(dir, &format!("{stem}.body.pidf.xml"))).expect("LF body");
                    // CRLF line ends decode to the same facts as the LF extraction.
                    assert_eq!(decode_pidf(body).as_ref(), Ok(&want), "{file}");
                    if file.contains(".clfix.") {
                        assert_eq!(declared, body.len(), "{file}: corrected Content-Length");
                    } else {
                        // As printed, Content-Length is short: a framer honouring it hands us
                        // a truncated document, which must be refused, not half-read.
                        assert!(declared < body.len(), "{file}");
                        let cut = body.get(..declared).expect("prefix");
                        assert!(
                            matches!(decode_pidf(cut), Err(CodecError::NotWellFormed(_))),
                            "{file}: truncated body"
                        );
                    }
                }
                None => {
                    // SUBSCRIBE / 200 OK / body-less NOTIFY: no presence document at all.
                    assert_eq!(declared, 0, "{file}");
                    assert!(body.is_empty(), "{file}");
                    assert!(decode_pidf(&bytes).is_err(), "{file}");
                }
                Some(other) => panic!("{file}: unexpected Content-Type {other}"),
            }
        } else {
            panic!("unexpected vector {file}");
        }
        checked += 1;
    }
    assert_eq!(checked, rows.len());
}

/// Every strict prefix of every XML vector is refused as not well-formed (or as invalid UTF-8
/// when the cut splits a character): a truncated document is never half-read.
#[test]
fn truncated_vectors_are_refused() {
    for dir in [
        "ms-lync-categories",
        "pidf-rfc3863",
        "rpid-rfc4480",
        "sip-xmpp-rfc8048",
        "real-traces",
    ] {
        for row in index(dir) {
            let file = &row[0];
            if !file.ends_with(".xml") {
                continue;
            }
            let bytes = read(dir, file);
            let text = std::str::from_utf8(&bytes)
                .expect("utf-8 vector")
                .trim_end();
            // Cuts through the file's own decoder (every byte for files up to 512 bytes, ~512
            // evenly spread cuts for larger ones), every 7th of those through the other two: the
            // guard they share is the same, and the debug-build cost is quadratic.
            let step = 1 + text.len() / 512;
            let own = match dir {
                "ms-lync-categories" | "real-traces" => "msrtc",
                "sip-xmpp-rfc8048" if !file.ends_with(".pidf.xml") => "xmpp",
                _ => "pidf",
            };
            for cut in (0..text.len()).step_by(step) {
                let prefix = &text.as_bytes()[..cut];
                for (codec, decode) in DECODERS {
                    if codec != own && cut % (7 * step) != 0 {
                        continue;
                    }
                    let result = decode(prefix);
                    // XMPP refuses the SfB trace's leading comment before it sees the cut.
                    let comment =
                        codec == "xmpp" && result == Err(CodecError::Restricted("comment"));
                    assert!(
                        comment
                            || matches!(
                                result,
                                Err(CodecError::NotWellFormed(_) | CodecError::InvalidUtf8 { .. })
                            ),
                        "{dir}/{file} cut at {cut} via {codec}: {result:?}"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile input

type Decoder = fn(&[u8]) -> Result<(), CodecError>;

const DECODERS: [(&str, Decoder); 3] = [
    ("xmpp", |x| decode_presence_kind(x).map(drop)),
    ("pidf", |x| decode_pidf(x).map(drop)),
    ("msrtc", |x| decode_msrtc(x).map(drop)),
];

fn refused_by_all(xml: &[u8], want: &CodecError) {
    for (name, decode) in DECODERS {
        assert_eq!(
            decode(xml).as_ref(),
            Err(want),
            "{name}: {}",
            String::from_utf8_lossy(&xml[..xml.len().min(120)])
        );
    }
}

const BILLION_LAUGHS: &str = r#"<?xml version="1.0"?>
<!DOCTYPE presence [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="pres:a@b"><note>&lol9;</note></presence>"#;

#[test]
fn dtd_and_entities_are_refused_never_expanded() {
    refused_by_all(
        BILLION_LAUGHS.as_bytes(),
        &CodecError::Restricted("entity declaration"),
    );
    // External entity (XXE).
    refused_by_all(
        br#"<!DOCTYPE presence [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><presence>&xxe;</presence>"#,
        &CodecError::Restricted("entity declaration"),
    );
    // External DTD without entity declarations, and an unterminated internal subset.
    refused_by_all(
        br#"<!DOCTYPE presence SYSTEM "http://evil.example/p.dtd"><presence/>"#,
        &CodecError::Restricted("DTD"),
    );
    refused_by_all(
        b"<!DOCTYPE presence [ <!ELEMENT presence ANY>",
        &CodecError::Restricted("DTD"),
    );
    // An entity declaration outside any DOCTYPE.
    refused_by_all(
        b"<!ENTITY x 'y'><presence/>",
        &CodecError::Restricted("entity declaration"),
    );
    // Undeclared entity references, in text and attribute values, in ignored parts too.
    for xml in [
        &b"<presence><status>&custom;</status></presence>"[..],
        b"<presence from='&custom;'/>",
        b"<presence xmlns='urn:ietf:params:xml:ns:pidf' entity='pres:a@b'><x:y xmlns:x='urn:x' a='&custom;'/></presence>",
        b"<categories xmlns='http://schemas.microsoft.com/2006/09/sip/categories'><category name='x'>&nbsp;</category></categories>",
    ] {
        refused_by_all(xml, &CodecError::Restricted("entity reference"));
    }
}

#[test]
fn processing_instructions_and_comments() {
    refused_by_all(
        b"<?xml-stylesheet href='x.xsl'?><presence/>",
        &CodecError::Restricted("processing instruction"),
    );
    refused_by_all(
        b"<presence><?php echo 1 ?></presence>",
        &CodecError::Restricted("processing instruction"),
    );
    // RFC 6120 §11.1: no comments in XMPP; SIP bodies may carry them (the SfB trace does).
    assert_eq!(
        decode_presence(b"<presence><!-- x --></presence>"),
        Err(CodecError::Restricted("comment"))
    );
    assert!(
        decode_pidf(b"<!-- x --><presence xmlns='urn:ietf:params:xml:ns:pidf' entity='e'/>")
            .is_ok()
    );
}

#[test]
fn limits() {
    // 100 KiB: refused before parsing, whatever it contains.
    let mut big = b"<presence><status>".to_vec();
    big.resize(100 * 1024, b'a');
    big.extend_from_slice(b"</status></presence>");
    refused_by_all(
        &big,
        &CodecError::TooLarge {
            limit: MAX_PRESENCE_DOC,
        },
    );
    // Exactly at the limit is parsed.
    let mut at = b"<presence><status>".to_vec();
    let tail = b"</status></presence>";
    at.resize(MAX_PRESENCE_DOC - tail.len(), b'a');
    at.extend_from_slice(tail);
    assert_eq!(at.len(), MAX_PRESENCE_DOC);
    assert!(decode_presence(&at).is_ok());

    // Deep nesting inside an ignored extension.
    let deep = format!(
        "<presence>{}{}</presence>",
        "<x xmlns='urn:x'>".repeat(100),
        "</x>".repeat(100)
    );
    refused_by_all(
        deep.as_bytes(),
        &CodecError::TooDeep {
            limit: MAX_PRESENCE_DEPTH,
        },
    );

    // Namespace-binding flood: quick-xml caps bindings; we surface it as not well-formed.
    let decls: String = (0..300)
        .map(|i| format!(" xmlns:p{i}='urn:p{i}'"))
        .collect();
    let flood = format!("<presence{decls}/>");
    for (name, decode) in DECODERS {
        assert!(
            matches!(decode(flood.as_bytes()), Err(CodecError::NotWellFormed(_))),
            "{name}"
        );
    }
}

#[test]
fn encoding_errors() {
    refused_by_all(
        b"<presence><status>\xC3\x28</status></presence>",
        &CodecError::InvalidUtf8 { valid_up_to: 18 },
    );
    // UTF-16 with BOM is not UTF-8.
    let utf16: Vec<u8> = "\u{FEFF}<presence/>"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    refused_by_all(&utf16, &CodecError::InvalidUtf8 { valid_up_to: 0 });
    for xml in [
        &b"<presence><status>\x01</status></presence>"[..],
        b"<presence><status>&#1;</status></presence>",
        b"<presence><status>&#xD800;</status></presence>",
        b"<presence",
        b"<presence>",
        b"<presence></presence><presence/>",
        b"",
    ] {
        for (name, decode) in DECODERS {
            assert!(
                matches!(decode(xml), Err(CodecError::NotWellFormed(_))),
                "{name}: {}",
                String::from_utf8_lossy(xml)
            );
        }
    }
}

#[test]
fn wrong_document_kinds_are_invalid() {
    let pidf = read("pidf-rfc3863", "4.2.2-default-ns.xml");
    let msrtc = read(
        "ms-lync-categories",
        "how-to-enable-custom-privacy-settings-00-categories-aggregateState.xml",
    );
    let xmpp = read("sip-xmpp-rfc8048", "ex21-xmpp-presence-unavailable.xml");
    assert!(matches!(
        decode_presence(&pidf),
        Err(CodecError::Invalid(_))
    ));
    assert!(matches!(
        decode_presence(&msrtc),
        Err(CodecError::Invalid(_))
    ));
    assert!(matches!(decode_pidf(&xmpp), Err(CodecError::Invalid(_))));
    assert!(matches!(decode_pidf(&msrtc), Err(CodecError::Invalid(_))));
    assert!(matches!(decode_msrtc(&xmpp), Err(CodecError::Invalid(_))));
    assert!(matches!(decode_msrtc(&pidf), Err(CodecError::Invalid(_))));
}

// ---------------------------------------------------------------------------------------------
// Property tests: decode(encode(x)) == x

/// Text XML can carry (XML 1.0 `Char` minus nothing), biased toward markup characters.
fn xml_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[<>&\"' \t\r\na-z]{0,12}",
        "[\\PC\t\r\n<>&\"']{0,40}",
        any::<String>().prop_map(|s| s.chars().filter(|&c| is_xml_char(c)).collect()),
    ]
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// What an encoder makes of a string that XML cannot carry.
fn sanitised(s: &str) -> String {
    s.chars()
        .map(|c| if is_xml_char(c) { c } else { '\u{FFFD}' })
        .collect()
}

fn show() -> impl Strategy<Value = Option<Show>> {
    prop::option::of(prop_oneof![
        Just(Show::Chat),
        Just(Show::Away),
        Just(Show::Xa),
        Just(Show::Dnd)
    ])
}

fn xmpp_presence() -> impl Strategy<Value = XmppPresence> {
    (
        any::<bool>(),
        show(),
        prop::option::of(xml_text()),
        any::<Option<i8>>(),
    )
        .prop_map(|(unavailable, show, status, priority)| XmppPresence {
            unavailable,
            show,
            status,
            priority,
        })
}

fn presence_attrs() -> impl Strategy<Value = PresenceAttrs> {
    (
        prop::option::of(xml_text()),
        prop::option::of(xml_text()),
        prop::option::of(xml_text()),
    )
        .prop_map(|(from, to, id)| PresenceAttrs {
            from,
            to,
            id,
            type_: None,
        })
}

fn activity() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,15}",
        xml_text().prop_map(|t| format!("other:{t}")),
    ]
    .prop_filter("rpid:note is not an activity", |a| a != "note")
}

fn pidf_presence() -> impl Strategy<Value = PidfPresence> {
    (
        xml_text(),
        prop::option::of(prop_oneof![Just(Basic::Open), Just(Basic::Closed)]),
        prop::collection::vec(activity(), 0..5),
        show(),
        prop::option::of(xml_text()),
    )
        .prop_map(|(entity, basic, activities, show, note)| PidfPresence {
            entity,
            basic,
            activities,
            show,
            note,
        })
}

fn msrtc_presence() -> impl Strategy<Value = MsrtcPresence> {
    (
        any::<Option<u32>>(),
        prop::option::of(xml_text()),
        prop::option::of(xml_text()),
    )
        .prop_map(|(availability, activity, note)| MsrtcPresence {
            availability,
            activity,
            note,
        })
}

proptest! {
    #[test]
    fn xmpp_round_trip(p in xmpp_presence(), a in presence_attrs()) {
        let mut out = Vec::new();
        encode_presence(&p, &a, &mut out);
        let (p2, a2) = decode_presence_full(&out).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(p2, p.clone());
        prop_assert_eq!((a2.from, a2.to, a2.id), (a.from, a.to, a.id));
        prop_assert_eq!(a2.type_.is_some(), p.unavailable);
    }

    /// Hand-built values with characters XML cannot carry still encode to a decodable stanza.
    #[test]
    fn xmpp_encoder_always_well_formed(status in any::<String>(), from in any::<String>()) {
        let p = XmppPresence { status: Some(status.clone()), ..XmppPresence::default() };
        let a = PresenceAttrs { from: Some(from.clone()), ..PresenceAttrs::default() };
        let mut out = Vec::new();
        encode_presence(&p, &a, &mut out);
        let (p2, a2) = decode_presence_full(&out).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(p2.status, Some(sanitised(&status)));
        prop_assert_eq!(a2.from, Some(sanitised(&from)));
    }

    #[test]
    fn pidf_round_trip_prop(p in pidf_presence()) {
        let mut out = Vec::new();
        encode_pidf(&p, &mut out);
        prop_assert_eq!(decode_pidf(&out), Ok(p));
    }

    #[test]
    fn msrtc_round_trip_prop(p in msrtc_presence()) {
        let mut out = Vec::new();
        encode_msrtc(&p, &mut out);
        prop_assert_eq!(decode_msrtc(&out), Ok(p));
    }

    /// Arbitrary bytes never panic any decoder.
    #[test]
    fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for (_, decode) in DECODERS {
            let _ = decode(&bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A poor man's fuzzer: the fuzz target's round trip over mutated vectors, so the property is
// exercised in every `cargo test` run, not only when someone runs cargo-fuzz.

fn xml_vectors() -> &'static [Vec<u8>] {
    static VECTORS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    VECTORS.get_or_init(|| {
        let mut all = Vec::new();
        for dir in [
            "ms-lync-categories",
            "pidf-rfc3863",
            "rpid-rfc4480",
            "sip-xmpp-rfc8048",
            "real-traces",
        ] {
            for row in index(dir) {
                if row[0].ends_with(".xml") {
                    all.push(read(dir, &row[0]));
                }
            }
        }
        all
    })
}

/// The body of `fuzz/fuzz_targets/presence_codecs.rs`.
fn round_trip_all(data: &[u8]) -> Result<(), TestCaseError> {
    let fits = |out: &[u8]| out.len() <= MAX_PRESENCE_DOC;
    if let Ok((kind, attrs)) = decode_presence_kind(data) {
        let mut out = Vec::new();
        encode_presence_kind(&kind, &attrs, &mut out);
        if fits(&out) {
            let (kind2, attrs2) =
                decode_presence_kind(&out).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&kind, &kind2);
            prop_assert_eq!(
                (&attrs.from, &attrs.to, &attrs.id),
                (&attrs2.from, &attrs2.to, &attrs2.id)
            );
        }
        if let PresenceKind::Broadcast(p) = kind {
            let mut out = Vec::new();
            encode_presence(&p, &attrs, &mut out);
            prop_assert_eq!(decode_presence_full(&out), Ok((p, attrs)));
        }
    }
    if let Ok(p) = decode_pidf(data) {
        let mut out = Vec::new();
        encode_pidf(&p, &mut out);
        if fits(&out) {
            prop_assert_eq!(decode_pidf(&out), Ok(p));
        }
    }
    if let Ok(p) = decode_msrtc(data) {
        let mut out = Vec::new();
        encode_msrtc(&p, &mut out);
        if fits(&out) {
            prop_assert_eq!(decode_msrtc(&out), Ok(p));
        }
    }
    Ok(())
}

const SNIPPETS: &[&str] = &[
    "<",
    ">",
    "&",
    "'",
    "\"",
    "/",
    "\r",
    "\n",
    "\t",
    " ",
    "&amp;",
    "&#13;",
    "&#x1F600;",
    "&lt;",
    "<![CDATA[<&>]]>",
    "<!-- c -->",
    "xml:lang='en' ",
    "<show>away</show>",
    "<status>s</status>",
    "<priority>-3</priority>",
    "<rpid:other>golf</rpid:other>",
    "<rpid:busy/>",
    "<note>n</note>",
    "<availability>6500</availability>",
    "<activity token='a&amp;b'/>",
    "é",
    "😀",
];

#[derive(Debug, Clone)]
enum Edit {
    Delete(prop::sample::Index),
    Insert(prop::sample::Index, &'static str),
    Byte(prop::sample::Index, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Edit::Delete),
        (any::<prop::sample::Index>(), prop::sample::select(SNIPPETS))
            .prop_map(|(i, s)| Edit::Insert(i, s)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_vectors_round_trip(pick in any::<prop::sample::Index>(), edits in prop::collection::vec(edit(), 0..4)) {
        let vectors = xml_vectors();
        let mut doc = pick.get(vectors).clone();
        for e in edits {
            match e {
                Edit::Delete(i) if !doc.is_empty() => {
                    doc.remove(i.index(doc.len()));
                }
                Edit::Delete(_) => {}
                Edit::Insert(i, s) => {
                    let at = i.index(doc.len() + 1);
                    doc.splice(at..at, s.bytes());
                }
                Edit::Byte(i, b) if !doc.is_empty() => {
                    let at = i.index(doc.len());
                    doc[at] = b;
                }
                Edit::Byte(..) => {}
            }
        }
        round_trip_all(&doc)?;
    }
}
