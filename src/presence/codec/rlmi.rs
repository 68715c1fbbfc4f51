//! Lync / Skype for Business batched presence subscriptions, as bytes (sans-IO):
//!
//! - the request body, `application/msrtc-adrl-categorylist+xml` ([MS-PRES] §2.2.2.4.1,
//!   schema §6.8): `<batchSub><action name="subscribe|unsubscribe" id><adhocList><resource
//!   uri/>…</adhocList><categoryList><category name/>…</categoryList></action></batchSub>`;
//! - the RLMI document (RFC 4662 §5, `application/rlmi+xml`): `<list uri version fullState>`
//!   with one `<resource uri>` per contact and its `<instance id state [reason] [cid]>`;
//! - the `multipart/related` body that carries the RLMI part first and one part per active
//!   instance (RFC 4662 §5.1, RFC 2387), each named by its `Content-ID` (RFC 2392).
//!
//! Decoders read through the shared hostile-XML guard (`xml`); the multipart reader bounds the
//! parts it accepts. What a resource's state *means* is not decided here.

use std::borrow::Cow;

use super::xml::{self, Dialect, Node, Ns, XmlIn};
use super::CodecError;

/// `Content-Type` of a batched SUBSCRIBE body.
pub const ADRL_CONTENT_TYPE: &str = "application/msrtc-adrl-categorylist+xml";
/// `Content-Type` of an RLMI document.
pub const RLMI_CONTENT_TYPE: &str = "application/rlmi+xml";
/// The `Content-ID` of the RLMI part (the `start` of the multipart body).
pub const RLMI_CID: &str = "resourceList";

/// Resources one `batchSub` may list at most when decoded. A decoder bound, above any
/// subscription bound the core applies (the core refuses beyond its own, smaller, limit with
/// a clear status): a 64 KiB document holds at most ~1 600 `<resource uri/>` anyway.
pub const MAX_DECODED_RESOURCES: usize = 2048;
/// Parts one multipart body may have when decoded.
pub const MAX_PARTS: usize = 4096;

const BATCH_NS: &str = "http://schemas.microsoft.com/2006/01/sip/batch-subscribe";
const CATEGORYLIST_NS: &str = "http://schemas.microsoft.com/2006/09/sip/categorylist";

/// `<action name=…>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchAction {
    Subscribe,
    Unsubscribe,
}

impl BatchAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
        }
    }
}

/// A `batchSub` request body reduced to what the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchSub {
    /// The watcher's own URI (`uri` attribute of `<batchSub>`).
    pub uri: String,
    /// `<action>` name and `id`; `None` when the document had no action.
    pub action: Option<(BatchAction, String)>,
    /// `<adhocList><resource uri>` in document order.
    pub resources: Vec<String>,
    /// `<categoryList><category name>` in document order.
    pub categories: Vec<String>,
}

/// Decodes a `batchSub` document.
pub fn decode_batch_sub(body: &[u8]) -> Result<BatchSub, CodecError> {
    xml::decode_with(body, Dialect::Document, batch_from)
}

fn required(
    r: &XmlIn<'_>,
    elem: &quick_xml::events::BytesStart<'_>,
    name: &str,
    what: &str,
) -> Result<String, CodecError> {
    r.attr(elem, name)?
        .map(Cow::into_owned)
        .ok_or_else(|| CodecError::Invalid(format!("{what} without `{name}`")))
}

fn batch_from(r: &mut XmlIn<'_>) -> Result<BatchSub, CodecError> {
    let (ns, root) = r.root()?;
    if ns != Ns::MsOther || xml::local(&root) != "batchSub" {
        return Err(CodecError::Invalid("root is not <batchSub>".into()));
    }
    let mut out = BatchSub {
        uri: r
            .attr(&root, "uri")?
            .map(Cow::into_owned)
            .unwrap_or_default(),
        ..BatchSub::default()
    };
    loop {
        match r.next()? {
            Node::Start { ns, elem } if ns == Ns::MsOther && xml::local(&elem) == "action" => {
                let name = r.attr(&elem, "name")?.map(Cow::into_owned);
                let action = match name.as_deref() {
                    Some("subscribe") => BatchAction::Subscribe,
                    Some("unsubscribe") => BatchAction::Unsubscribe,
                    _ => {
                        return Err(CodecError::Invalid(
                            "<action> name is neither subscribe nor unsubscribe".into(),
                        ))
                    }
                };
                let id = r
                    .attr(&elem, "id")?
                    .map(Cow::into_owned)
                    .unwrap_or_default();
                if out.action.is_some() {
                    return Err(CodecError::Invalid("more than one <action>".into()));
                }
                out.action = Some((action, id));
                action_children(r, &mut out)?;
            }
            Node::Start { .. } => r.skip()?,
            Node::End => break,
            Node::Text(_) | Node::Char(_) => {}
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        }
    }
    r.finish()?;
    Ok(out)
}

fn action_children(r: &mut XmlIn<'_>, out: &mut BatchSub) -> Result<(), CodecError> {
    loop {
        match r.next()? {
            Node::Start { ns, elem } if ns == Ns::MsOther && xml::local(&elem) == "adhocList" => {
                list_of(r, "resource", "uri", &mut out.resources)?
            }
            Node::Start { ns, elem }
                if ns == Ns::MsOther && xml::local(&elem) == "categoryList" =>
            {
                list_of(r, "category", "name", &mut out.categories)?
            }
            Node::Start { .. } => r.skip()?,
            Node::End => return Ok(()),
            Node::Text(_) | Node::Char(_) => {}
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        }
    }
}

/// `<item attr=…/>` children of a list (their own children — Lync's `<context>` — skipped).
fn list_of(
    r: &mut XmlIn<'_>,
    item: &str,
    attr: &str,
    out: &mut Vec<String>,
) -> Result<(), CodecError> {
    loop {
        match r.next()? {
            Node::Start { ns, elem } if ns == Ns::MsOther && xml::local(&elem) == item => {
                let v = required(r, &elem, attr, item)?;
                if out.len() >= MAX_DECODED_RESOURCES {
                    return Err(CodecError::Invalid(format!(
                        "more than {MAX_DECODED_RESOURCES} <{item}> elements"
                    )));
                }
                out.push(v);
                r.skip()?;
            }
            Node::Start { .. } => r.skip()?,
            Node::End => return Ok(()),
            Node::Text(_) | Node::Char(_) => {}
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        }
    }
}

/// Writes a `batchSub` document (tests, fuzzing, and a gateway that would subscribe batched).
pub fn encode_batch_sub(b: &BatchSub, out: &mut Vec<u8>) {
    out.extend_from_slice(b"<batchSub xmlns=\"");
    out.extend_from_slice(BATCH_NS.as_bytes());
    out.extend_from_slice(b"\" uri=\"");
    xml::push_attr(out, &b.uri);
    out.extend_from_slice(b"\" name=\"\">");
    if let Some((action, id)) = &b.action {
        out.extend_from_slice(b"<action name=\"");
        out.extend_from_slice(action.as_str().as_bytes());
        out.extend_from_slice(b"\" id=\"");
        xml::push_attr(out, id);
        out.extend_from_slice(b"\"><adhocList>");
        for uri in &b.resources {
            out.extend_from_slice(b"<resource uri=\"");
            xml::push_attr(out, uri);
            out.extend_from_slice(b"\"/>");
        }
        out.extend_from_slice(b"</adhocList><categoryList xmlns=\"");
        out.extend_from_slice(CATEGORYLIST_NS.as_bytes());
        out.extend_from_slice(b"\">");
        for c in &b.categories {
            out.extend_from_slice(b"<category name=\"");
            xml::push_attr(out, c);
            out.extend_from_slice(b"\"/>");
        }
        out.extend_from_slice(b"</categoryList></action>");
    }
    out.extend_from_slice(b"</batchSub>");
}

/// An instance's subscription state (RFC 4662 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    Active,
    Pending,
    Terminated,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Pending => "pending",
            Self::Terminated => "terminated",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "pending" => Some(Self::Pending),
            "terminated" => Some(Self::Terminated),
            _ => None,
        }
    }
}

/// `<instance>` (RFC 4662 §5.2): `cid` names the body part with its state (active instances).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub state: InstanceState,
    /// RFC 6665 §4.1.3 reason of a terminated instance (`rejected`, `noresource`, ...).
    pub reason: Option<String>,
    pub cid: Option<String>,
}

/// `<resource>` (RFC 4662 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub uri: String,
    pub instances: Vec<Instance>,
}

/// `<list>` (RFC 4662 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List {
    pub uri: String,
    /// Increments by one with every RLMI document of the subscription (RFC 4662 §5.2).
    pub version: u32,
    /// `true`: every resource is listed; `false`: only those that changed (§5.2, §5.3).
    pub full_state: bool,
    pub resources: Vec<Resource>,
}

/// Writes an RLMI document.
pub fn encode_rlmi(l: &List, out: &mut Vec<u8>) {
    out.extend_from_slice(b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><list xmlns=\"");
    out.extend_from_slice(xml::uri::RLMI.as_bytes());
    out.extend_from_slice(b"\" uri=\"");
    xml::push_attr(out, &l.uri);
    out.extend_from_slice(b"\" version=\"");
    xml::push_int(out, i64::from(l.version));
    out.extend_from_slice(if l.full_state {
        b"\" fullState=\"true\">"
    } else {
        b"\" fullState=\"false\">"
    });
    for r in &l.resources {
        out.extend_from_slice(b"<resource uri=\"");
        xml::push_attr(out, &r.uri);
        out.extend_from_slice(b"\">");
        for i in &r.instances {
            out.extend_from_slice(b"<instance id=\"");
            xml::push_attr(out, &i.id);
            out.extend_from_slice(b"\" state=\"");
            out.extend_from_slice(i.state.as_str().as_bytes());
            if let Some(reason) = &i.reason {
                out.extend_from_slice(b"\" reason=\"");
                xml::push_attr(out, reason);
            }
            if let Some(cid) = &i.cid {
                out.extend_from_slice(b"\" cid=\"");
                xml::push_attr(out, cid);
            }
            out.extend_from_slice(b"\"/>");
        }
        out.extend_from_slice(b"</resource>");
    }
    out.extend_from_slice(b"</list>");
}

/// Decodes an RLMI document.
pub fn decode_rlmi(body: &[u8]) -> Result<List, CodecError> {
    xml::decode_with(body, Dialect::Document, rlmi_from)
}

fn rlmi_from(r: &mut XmlIn<'_>) -> Result<List, CodecError> {
    let (ns, root) = r.root()?;
    if ns != Ns::Rlmi || xml::local(&root) != "list" {
        return Err(CodecError::Invalid("root is not an RLMI <list>".into()));
    }
    let uri = required(r, &root, "uri", "<list>")?;
    let version = required(r, &root, "version", "<list>")?
        .parse::<u32>()
        .map_err(|_| CodecError::Invalid("<list> version is not a number".into()))?;
    let full_state = match required(r, &root, "fullState", "<list>")?.as_str() {
        "true" | "1" => true,
        "false" | "0" => false,
        _ => {
            return Err(CodecError::Invalid(
                "<list> fullState is not a boolean".into(),
            ))
        }
    };
    let mut resources = Vec::new();
    loop {
        match r.next()? {
            Node::Start { ns, elem } if ns == Ns::Rlmi && xml::local(&elem) == "resource" => {
                if resources.len() >= MAX_DECODED_RESOURCES {
                    return Err(CodecError::Invalid("too many <resource> elements".into()));
                }
                let uri = required(r, &elem, "uri", "<resource>")?;
                let instances = instances(r)?;
                resources.push(Resource { uri, instances });
            }
            Node::Start { .. } => r.skip()?,
            Node::End => break,
            Node::Text(_) | Node::Char(_) => {}
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        }
    }
    r.finish()?;
    Ok(List {
        uri,
        version,
        full_state,
        resources,
    })
}

fn instances(r: &mut XmlIn<'_>) -> Result<Vec<Instance>, CodecError> {
    let mut out = Vec::new();
    loop {
        match r.next()? {
            Node::Start { ns, elem } if ns == Ns::Rlmi && xml::local(&elem) == "instance" => {
                let id = required(r, &elem, "id", "<instance>")?;
                let state = InstanceState::parse(&required(r, &elem, "state", "<instance>")?)
                    .ok_or_else(|| CodecError::Invalid("unknown <instance> state".into()))?;
                let reason = r.attr(&elem, "reason")?.map(Cow::into_owned);
                let cid = r.attr(&elem, "cid")?.map(Cow::into_owned);
                if out.len() >= MAX_DECODED_RESOURCES {
                    return Err(CodecError::Invalid("too many <instance> elements".into()));
                }
                out.push(Instance {
                    id,
                    state,
                    reason,
                    cid,
                });
                r.skip()?;
            }
            Node::Start { .. } => r.skip()?,
            Node::End => return Ok(out),
            Node::Text(_) | Node::Char(_) => {}
            Node::Eof => return Err(xml::not_well_formed("truncated document")),
        }
    }
}

/// One body part of a `multipart/related` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Without the angle brackets of the header (RFC 2392 `cid:` form).
    pub content_id: String,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// Why a multipart body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("Content-Type is not multipart/related with a boundary")]
    NotMultipart,
    #[error("body does not start with the boundary delimiter")]
    NoFirstBoundary,
    #[error("part {0} has no blank line after its headers")]
    PartHeaders(usize),
    #[error("part {0} has a header that is not UTF-8 `name: value`")]
    BadHeader(usize),
    #[error("no closing boundary delimiter")]
    Unterminated,
    #[error("more than {MAX_PARTS} parts")]
    TooManyParts,
}

/// A boundary (RFC 2046 §5.1.1: 1–70 characters) that occurs in none of `parts` (bodies or
/// header values): `seed` and a counter, so callers pass randomness in and the choice stays
/// testable.
pub fn pick_boundary(seed: &str, parts: &[Part]) -> String {
    let mut n = 0u32;
    loop {
        let b: String = format!("lgt{seed}{n}").chars().take(70).collect();
        let inside = |hay: &[u8]| find(hay, b.as_bytes()).is_some();
        let found = parts.iter().any(|p| {
            inside(&p.body) || inside(p.content_id.as_bytes()) || inside(p.content_type.as_bytes())
        });
        if !found {
            return b;
        }
        n += 1;
    }
}

/// The `Content-Type` header value of an RLMI multipart body (RFC 4662 §5.1, RFC 2387 §3).
pub fn related_content_type(boundary: &str) -> String {
    format!(
        "multipart/related;type=\"{RLMI_CONTENT_TYPE}\";start=\"<{RLMI_CID}>\";boundary=\"{boundary}\""
    )
}

/// Writes `parts` as a `multipart/related` body delimited by `boundary` (which must occur in
/// no part: see [`pick_boundary`]).
pub fn encode_related(boundary: &str, parts: &[Part], out: &mut Vec<u8>) {
    for p in parts {
        out.extend_from_slice(b"--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\nContent-Transfer-Encoding: binary\r\nContent-ID: <");
        out.extend_from_slice(p.content_id.as_bytes());
        out.extend_from_slice(b">\r\nContent-Type: ");
        out.extend_from_slice(p.content_type.as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&p.body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
}

/// The `boundary` parameter of a `multipart/related` Content-Type value.
pub fn boundary_of(content_type: &str) -> Option<String> {
    let mut it = content_type.split(';');
    let base = it.next()?.trim();
    if !base.eq_ignore_ascii_case("multipart/related") {
        return None;
    }
    it.filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .filter(|b| !b.is_empty() && b.len() <= 70)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads a `multipart/related` body (RFC 2046 §5.1.1; preamble and epilogue ignored; both CRLF
/// and bare LF line ends accepted since traces pasted from documentation have either).
pub fn decode_related(content_type: &str, body: &[u8]) -> Result<Vec<Part>, MultipartError> {
    let boundary = boundary_of(content_type).ok_or(MultipartError::NotMultipart)?;
    let delim = format!("--{boundary}");
    let start = find(body, delim.as_bytes()).ok_or(MultipartError::NoFirstBoundary)?;
    let mut rest = body.get(start + delim.len()..).unwrap_or_default();
    let mut parts = Vec::new();
    loop {
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        if parts.len() >= MAX_PARTS {
            return Err(MultipartError::TooManyParts);
        }
        let i = parts.len();
        // Skip the rest of the delimiter line (transport padding, RFC 2046 §5.1.1).
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(MultipartError::Unterminated)?;
        rest = rest.get(nl + 1..).unwrap_or_default();
        let next = find(rest, delim.as_bytes()).ok_or(MultipartError::Unterminated)?;
        let mut whole = rest.get(..next).unwrap_or_default();
        // The line end before the delimiter belongs to the delimiter.
        whole = whole.strip_suffix(b"\n").unwrap_or(whole);
        whole = whole.strip_suffix(b"\r").unwrap_or(whole);
        let (head, content) = match (find(whole, b"\r\n\r\n"), find(whole, b"\n\n")) {
            (Some(a), Some(b)) if b < a => (&whole[..b], &whole[b + 2..]),
            (Some(a), _) => (&whole[..a], &whole[a + 4..]),
            (None, Some(b)) => (&whole[..b], &whole[b + 2..]),
            (None, None) => return Err(MultipartError::PartHeaders(i)),
        };
        let head = std::str::from_utf8(head).map_err(|_| MultipartError::BadHeader(i))?;
        let mut part = Part {
            content_id: String::new(),
            content_type: String::new(),
            body: content.to_vec(),
        };
        for line in head.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (n, v) = line.split_once(':').ok_or(MultipartError::BadHeader(i))?;
            let v = v.trim();
            if n.trim().eq_ignore_ascii_case("content-id") {
                part.content_id = v.trim_start_matches('<').trim_end_matches('>').to_string();
            } else if n.trim().eq_ignore_ascii_case("content-type") {
                part.content_type = v.to_string();
            }
        }
        parts.push(part);
        rest = rest.get(next + delim.len()..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [MS-PRES] §2.2.2.4.1's example body, as kept under tests/data.
    const MS_PRES_BATCH: &[u8] =
        include_bytes!("../../../tests/data/sip/lync-batched/ms-pres-batchsub.xml");

    #[test]
    fn ms_pres_example_body_decodes() {
        let b = decode_batch_sub(MS_PRES_BATCH).expect("decodes");
        assert_eq!(b.uri, "sip:bob@contoso.com");
        assert_eq!(
            b.action,
            Some((BatchAction::Subscribe, "63792024".to_string()))
        );
        assert_eq!(
            b.resources,
            ["sip:alice@contoso.com", "sip:john@contoso.com"]
        );
        assert_eq!(
            b.categories,
            ["calendarData", "contactCard", "note", "services", "state"]
        );
    }

    #[test]
    fn batch_sub_round_trips() {
        let b = BatchSub {
            uri: "sip:w@partner.test".into(),
            action: Some((BatchAction::Unsubscribe, "7".into())),
            resources: vec!["sip:a&b@example.test".into(), "sip:c@example.test".into()],
            categories: vec!["state".into()],
        };
        let mut out = Vec::new();
        encode_batch_sub(&b, &mut out);
        assert_eq!(decode_batch_sub(&out), Ok(b));
    }

    #[test]
    fn batch_sub_refusals_are_specific() {
        let wrong_root = br#"<list xmlns="urn:ietf:params:xml:ns:rlmi"/>"#;
        assert!(matches!(
            decode_batch_sub(wrong_root),
            Err(CodecError::Invalid(_))
        ));
        let bad_action = format!(
            r#"<batchSub xmlns="{BATCH_NS}" uri="sip:a@b"><action name="explode" id="1"/></batchSub>"#
        );
        assert!(matches!(
            decode_batch_sub(bad_action.as_bytes()),
            Err(CodecError::Invalid(m)) if m.contains("subscribe")
        ));
        let no_uri = format!(
            r#"<batchSub xmlns="{BATCH_NS}" uri="sip:a@b"><action name="subscribe" id="1"><adhocList><resource/></adhocList></action></batchSub>"#
        );
        assert!(matches!(
            decode_batch_sub(no_uri.as_bytes()),
            Err(CodecError::Invalid(m)) if m.contains("uri")
        ));
        let dtd = br#"<!DOCTYPE x [<!ENTITY a "b">]><batchSub/>"#;
        assert!(matches!(
            decode_batch_sub(dtd),
            Err(CodecError::Restricted(_))
        ));
    }

    fn sample_list() -> List {
        List {
            uri: "sip:w@partner.test".into(),
            version: 3,
            full_state: false,
            resources: vec![
                Resource {
                    uri: "sip:alice@example.test".into(),
                    instances: vec![Instance {
                        id: "0".into(),
                        state: InstanceState::Active,
                        reason: None,
                        cid: Some("alice@example.test".into()),
                    }],
                },
                Resource {
                    uri: "sip:zed@elsewhere.test".into(),
                    instances: vec![Instance {
                        id: "0".into(),
                        state: InstanceState::Terminated,
                        reason: Some("noresource".into()),
                        cid: None,
                    }],
                },
            ],
        }
    }

    #[test]
    fn rlmi_round_trips() {
        let l = sample_list();
        let mut out = Vec::new();
        encode_rlmi(&l, &mut out);
        assert_eq!(decode_rlmi(&out), Ok(l));
    }

    #[test]
    fn ms_sip_example_notify_body_decodes() {
        let ct = "multipart/related; type=\"application/rlmi+xml\";start=resourceList; boundary=50UBfW7LSCVLtggUPe5z";
        let body = include_bytes!("../../../tests/data/sip/lync-batched/ms-sip-notify-body.txt");
        let parts = decode_related(ct, body).expect("multipart");
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0].content_id, "resourceList");
        let l = decode_rlmi(&parts[0].body).expect("rlmi");
        assert!(l.full_state);
        assert_eq!(l.resources.len(), 3);
        assert_eq!(
            l.resources[0].instances[0].cid.as_deref(),
            Some(parts[1].content_id.as_str())
        );
    }

    #[test]
    fn multipart_round_trips_and_boundary_avoids_bodies() {
        let parts = vec![
            Part {
                content_id: RLMI_CID.into(),
                content_type: RLMI_CONTENT_TYPE.into(),
                body: b"<list/>".to_vec(),
            },
            Part {
                content_id: "alice@example.test".into(),
                content_type: "application/msrtc-event-categories+xml".into(),
                body: b"lgtx0 is inside\r\n--lgtx1".to_vec(),
            },
        ];
        let b = pick_boundary("x", &parts);
        assert_eq!(b, "lgtx2");
        let mut out = Vec::new();
        encode_related(&b, &parts, &mut out);
        let ct = related_content_type(&b);
        assert_eq!(decode_related(&ct, &out), Ok(parts));
    }

    #[test]
    fn multipart_refusals() {
        assert_eq!(
            decode_related("text/plain", b""),
            Err(MultipartError::NotMultipart)
        );
        let ct = related_content_type("b1");
        assert_eq!(
            decode_related(&ct, b"nothing"),
            Err(MultipartError::NoFirstBoundary)
        );
        assert_eq!(
            decode_related(&ct, b"--b1\r\nContent-ID: <a>\r\n\r\nx"),
            Err(MultipartError::Unterminated)
        );
        assert_eq!(
            decode_related(&ct, b"--b1\r\nno blank line\r\n--b1--"),
            Err(MultipartError::PartHeaders(0))
        );
    }
}
