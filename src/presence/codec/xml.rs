//! The hostile-XML guard every presence decoder reads through, and the escaper every encoder
//! writes through. quick-xml never expands DTD entities but never limits anything either, so
//! this module owns the limits: input size and UTF-8 are checked before parsing, then each
//! event is vetted (depth, DOCTYPE, PIs, entity references, prolog/epilogue content, attribute
//! syntax and prefixes) before a decoder sees it. Decoders only ever see a resolved namespace
//! class, start tags, character data and end tags. Nothing here allocates per event except
//! where quick-xml must normalise line ends or attribute values.
//!
//! It must not know about any presence format: it answers "is this XML acceptable and what does
//! it say", never "what does it mean".

use std::borrow::Cow;

use quick_xml::errors::{Error as QxError, SyntaxError};
use quick_xml::escape::EscapeError;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use quick_xml::XmlVersion;

use super::{CodecError, MAX_PRESENCE_DEPTH, MAX_PRESENCE_DOC};

/// Namespace URIs the presence codecs recognise. Compared by URI, never by prefix
/// (Namespaces in XML 1.0 §2; RFC 3863 §4 requires prefix-independence explicitly).
pub(crate) mod uri {
    /// RFC 3863 §4.
    pub const PIDF: &str = "urn:ietf:params:xml:ns:pidf";
    /// RFC 4480.
    pub const RPID: &str = "urn:ietf:params:xml:ns:pidf:rpid";
    /// RFC 4479 (data model: `<dm:person>`, `<dm:device>`).
    pub const DATA_MODEL: &str = "urn:ietf:params:xml:ns:pidf:data-model";
    /// RFC 6120 §4.8.3 content namespaces; RFC 8048 §4.3 embeds `<show/>` in `jabber:client`.
    pub const JABBER_CLIENT: &str = "jabber:client";
    pub const JABBER_SERVER: &str = "jabber:server";
    /// [MS-PRES] category document and its value namespaces.
    pub const MS_CATEGORIES: &str = "http://schemas.microsoft.com/2006/09/sip/categories";
    pub const MS_STATE: &str = "http://schemas.microsoft.com/2006/09/sip/state";
    pub const MS_NOTE: &str = "http://schemas.microsoft.com/2006/09/sip/note";
    /// Every Microsoft SIP schema lives under this prefix (`.../2006/09/sip/device`,
    /// `.../02/2006/sip/routing`, ...).
    pub const MS_PREFIX: &str = "http://schemas.microsoft.com/";
    /// RFC 4662 §5 resource list meta-information.
    pub const RLMI: &str = "urn:ietf:params:xml:ns:rlmi";
    /// XML Schema instance (`xsi:type` on msrtc `<state>`).
    pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
}

/// The namespace class of an element or attribute, resolved once per start tag so decoders
/// match on a `Copy` enum instead of comparing strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ns {
    /// No namespace (no default namespace declared, or `xmlns=""`).
    Unbound,
    Pidf,
    Rpid,
    DataModel,
    JabberClient,
    JabberServer,
    MsCategories,
    MsState,
    MsNote,
    /// Some other Microsoft SIP schema (device, services, contactCard, calendarData, routing).
    MsOther,
    Rlmi,
    Xsi,
    /// Anything else: an extension the decoders skip.
    Other,
}

fn classify(ns: &str) -> Ns {
    match ns {
        uri::PIDF => Ns::Pidf,
        uri::RPID => Ns::Rpid,
        uri::DATA_MODEL => Ns::DataModel,
        uri::JABBER_CLIENT => Ns::JabberClient,
        uri::JABBER_SERVER => Ns::JabberServer,
        uri::MS_CATEGORIES => Ns::MsCategories,
        uri::MS_STATE => Ns::MsState,
        uri::MS_NOTE => Ns::MsNote,
        uri::XSI => Ns::Xsi,
        uri::RLMI => Ns::Rlmi,
        // `xmlns=""` resets the default namespace; quick-xml reports it as bound to "".
        "" => Ns::Unbound,
        other if other.starts_with(uri::MS_PREFIX) => Ns::MsOther,
        _ => Ns::Other,
    }
}

/// Which restricted-XML profile applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// An XMPP stanza: comments are refused too (RFC 6120 §11.1).
    Stanza,
    /// A SIP body (PIDF, msrtc): comments are tolerated and skipped (real Lync/SfB traces carry
    /// them; they cannot expand to anything).
    Document,
}

/// One vetted piece of the document.
#[derive(Debug)]
pub(crate) enum Node<'x> {
    /// A start tag (an empty-element tag is reported as `Start` then `End`).
    Start {
        ns: Ns,
        elem: BytesStart<'x>,
    },
    End,
    /// Character data (text or CDATA, line ends normalised per XML 1.0 §2.11, or one of the
    /// five predefined entities).
    Text(Cow<'x, str>),
    /// A numeric character reference, already checked to be a legal XML `Char`.
    Char(char),
    /// End of input after a complete root element.
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prolog,
    Root,
    Epilogue,
}

/// A pull reader over one complete, size-capped, UTF-8 document that refuses hostile XML.
pub(crate) struct XmlIn<'x> {
    src: &'x str,
    reader: NsReader<&'x [u8]>,
    dialect: Dialect,
    depth: usize,
    phase: Phase,
    first: bool,
    /// quick-xml reports `<a/>` as one `Empty` event; decoders see `Start` + `End`.
    pending_end: bool,
}

/// Longest quick-xml message we pass on: errors may quote input (tag names), and a hostile peer
/// controls how long those are.
const MAX_ERROR_TEXT: usize = 160;

pub(crate) fn not_well_formed(msg: impl Into<String>) -> CodecError {
    let mut msg = msg.into();
    if msg.len() > MAX_ERROR_TEXT {
        let mut cut = MAX_ERROR_TEXT;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push('…');
    }
    CodecError::NotWellFormed(msg)
}

/// XML 1.0 §2.2 `Char`.
pub(crate) fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// Namespaces in XML 1.0 §3 `NCName`, exact for ASCII and permissive above it (every
/// non-ASCII character is accepted as a name character): quick-xml does not check names, and
/// decoders copy some names (RPID activities) into values that encoders write back as names.
pub(crate) fn is_ncname(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' || !c.is_ascii() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || !c.is_ascii())
}

/// `NCName` or `NCName:NCName`.
fn is_qname(s: &str) -> bool {
    match s.split_once(':') {
        Some((prefix, local)) => is_ncname(prefix) && is_ncname(local),
        None => is_ncname(s),
    }
}

/// The checks that come before any parsing, cheapest first: size, UTF-8, then one byte pass for
/// characters XML 1.0 §2.2 forbids (C0 controls other than TAB/LF/CR, U+FFFE, U+FFFF), so
/// quick-xml — which does not check `Char` — never hands such text to a decoder.
fn prepare(xml: &[u8]) -> Result<&str, CodecError> {
    if xml.len() > MAX_PRESENCE_DOC {
        return Err(CodecError::TooLarge {
            limit: MAX_PRESENCE_DOC,
        });
    }
    let text = std::str::from_utf8(xml).map_err(|e| CodecError::InvalidUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    // XML 1.0 Appendix F: a UTF-8 byte-order mark is allowed and is not part of the document.
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let bytes = text.as_bytes();
    // Branch-free so it vectorises: this pass sees every byte of every document.
    let any_control = bytes.iter().fold(false, |acc, &b| {
        acc | ((b < 0x20) & (b != b'\t') & (b != b'\n') & (b != b'\r'))
    });
    let forbidden = |i: usize, b: u8| {
        if b < 0x20 {
            !matches!(b, b'\t' | b'\n' | b'\r')
        } else {
            // U+FFFE / U+FFFF are EF BF BE / EF BF BF.
            b == 0xEF
                && bytes.get(i + 1) == Some(&0xBF)
                && matches!(bytes.get(i + 2), Some(0xBE | 0xBF))
        }
    };
    let first_bad = if any_control {
        bytes.iter().enumerate().position(|(i, &b)| forbidden(i, b))
    } else {
        memchr::memchr_iter(0xEF, bytes).find(|&i| forbidden(i, 0xEF))
    };
    if let Some(i) = first_bad {
        return Err(not_well_formed(format!(
            "character not allowed in XML at byte {i}"
        )));
    }
    Ok(text)
}

impl<'x> XmlIn<'x> {
    pub(crate) fn new(xml: &'x [u8], dialect: Dialect) -> Result<Self, CodecError> {
        let src = prepare(xml)?;
        let mut reader = NsReader::from_str(src);
        let cfg = reader.config_mut();
        // Whitespace is content for <status/> and <note/>: never trim.
        cfg.trim_text(false);
        cfg.check_end_names = true;
        cfg.check_comments = true;
        cfg.expand_empty_elements = false;
        cfg.allow_dangling_amp = false;
        cfg.allow_unmatched_ends = false;
        Ok(Self {
            src,
            reader,
            dialect,
            depth: 0,
            phase: Phase::Prolog,
            first: true,
            pending_end: false,
        })
    }

    fn map_err(&self, e: QxError) -> CodecError {
        match e {
            // An unterminated DOCTYPE is still a DOCTYPE: say so rather than "syntax error".
            QxError::Syntax(SyntaxError::UnclosedDoctype) => CodecError::Restricted("DTD"),
            // `<!ENTITY` outside a DOCTYPE is rejected by quick-xml as bad `<!` markup.
            QxError::Syntax(SyntaxError::InvalidBangMarkup) => {
                let pos = usize::try_from(self.reader.error_position()).unwrap_or(usize::MAX);
                let at = self.src.get(pos..).unwrap_or("");
                if at.starts_with("<!ENTITY") {
                    CodecError::Restricted("entity declaration")
                } else {
                    not_well_formed(e.to_string())
                }
            }
            QxError::Escape(EscapeError::UnrecognizedEntity(..)) => {
                CodecError::Restricted("entity reference")
            }
            other => not_well_formed(other.to_string()),
        }
    }

    fn close(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        if self.depth == 0 {
            self.phase = Phase::Epilogue;
        }
    }

    /// The next vetted node. After `Eof` is returned the document was complete and nothing but
    /// whitespace (and, in `Document`, comments) followed the root element.
    pub(crate) fn next(&mut self) -> Result<Node<'x>, CodecError> {
        if self.pending_end {
            self.pending_end = false;
            self.close();
            return Ok(Node::End);
        }
        loop {
            let first = std::mem::replace(&mut self.first, false);
            let (ns, event) = match self.reader.read_resolved_event() {
                Ok((ResolveResult::Unknown(prefix), Event::Start(_) | Event::Empty(_))) => {
                    return Err(not_well_formed(format!("unbound prefix '{prefix}'")));
                }
                Ok((ResolveResult::Bound(ns), event)) => (classify(ns.0), event),
                Ok((_, event)) => (Ns::Unbound, event),
                Err(e) => return Err(self.map_err(e)),
            };
            match event {
                Event::Start(elem) => {
                    self.open(&elem)?;
                    return Ok(Node::Start { ns, elem });
                }
                Event::Empty(elem) => {
                    self.open(&elem)?;
                    self.pending_end = true;
                    return Ok(Node::Start { ns, elem });
                }
                Event::End(_) => {
                    self.close();
                    return Ok(Node::End);
                }
                Event::Text(text) => {
                    if self.phase == Phase::Root {
                        return Ok(Node::Text(text.xml10_content()));
                    }
                    // XML 1.0 §2.8: only Misc (whitespace, comments, PIs) around the root.
                    if !text
                        .bytes()
                        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                    {
                        return Err(not_well_formed("text outside the root element"));
                    }
                }
                Event::CData(data) => {
                    if self.phase != Phase::Root {
                        return Err(not_well_formed("CDATA outside the root element"));
                    }
                    return Ok(Node::Text(data.xml10_content()));
                }
                Event::GeneralRef(r) => {
                    if self.phase != Phase::Root {
                        return Err(not_well_formed("reference outside the root element"));
                    }
                    if r.is_char_ref() {
                        return match r.resolve_char_ref() {
                            Ok(Some(c)) if is_xml_char(c) => Ok(Node::Char(c)),
                            _ => Err(not_well_formed("illegal character reference")),
                        };
                    }
                    // XML 1.0 §4.6: the five predefined entities; anything else would need a
                    // DTD we refuse to read (RFC 6120 §11.1).
                    let s: &'static str = match &*r {
                        "lt" => "<",
                        "gt" => ">",
                        "amp" => "&",
                        "quot" => "\"",
                        "apos" => "'",
                        _ => return Err(CodecError::Restricted("entity reference")),
                    };
                    return Ok(Node::Text(Cow::Borrowed(s)));
                }
                Event::Comment(_) => {
                    if self.dialect == Dialect::Stanza {
                        return Err(CodecError::Restricted("comment"));
                    }
                }
                Event::Decl(decl) => {
                    // XML 1.0 §2.8: the declaration, if any, is the very first thing.
                    if !first {
                        return Err(not_well_formed("XML declaration not at the start"));
                    }
                    let version = decl.version().map_err(|e| self.map_err(e))?;
                    if &*version != "1.0" {
                        return Err(not_well_formed("only XML 1.0 is accepted"));
                    }
                    if let Some(enc) = decl.encoding() {
                        let enc = enc.map_err(|e| not_well_formed(e.to_string()))?;
                        if !enc.eq_ignore_ascii_case("utf-8") && !enc.eq_ignore_ascii_case("utf8") {
                            return Err(CodecError::Invalid(
                                "declared encoding is not UTF-8".into(),
                            ));
                        }
                    }
                }
                Event::PI(_) => return Err(CodecError::Restricted("processing instruction")),
                Event::DocType(dtd) => {
                    return Err(if dtd.contains("<!ENTITY") {
                        CodecError::Restricted("entity declaration")
                    } else {
                        CodecError::Restricted("DTD")
                    });
                }
                Event::Eof => {
                    return match self.phase {
                        Phase::Epilogue => Ok(Node::Eof),
                        Phase::Prolog => Err(not_well_formed("no root element")),
                        Phase::Root => Err(not_well_formed("truncated document")),
                    };
                }
            }
        }
    }

    /// Bookkeeping and vetting for a start tag.
    fn open(&mut self, elem: &BytesStart<'x>) -> Result<(), CodecError> {
        if self.phase == Phase::Epilogue {
            return Err(not_well_formed("content after the root element"));
        }
        self.phase = Phase::Root;
        self.depth += 1;
        if self.depth > MAX_PRESENCE_DEPTH {
            return Err(CodecError::TooDeep {
                limit: MAX_PRESENCE_DEPTH,
            });
        }
        if !is_qname(elem.name().0) {
            return Err(not_well_formed("element name is not a QName"));
        }
        self.check_attributes(elem)
    }

    /// Every attribute of every element is vetted, including those of elements the decoders
    /// skip: a `&custom;` hidden in an ignored extension is as hostile as one in `<status/>`.
    fn check_attributes(&self, elem: &BytesStart<'_>) -> Result<(), CodecError> {
        for attr in elem.attributes() {
            // Duplicate names, missing quotes, missing `=`.
            let attr = attr.map_err(|e| not_well_formed(e.to_string()))?;
            if !is_qname(attr.key.0) {
                return Err(not_well_formed("attribute name is not a QName"));
            }
            if let Some(prefix) = attr.key.prefix() {
                let prefix = prefix.into_inner();
                if prefix != "xmlns" && prefix != "xml" {
                    let (res, _) = self.reader.resolver().resolve_attribute(attr.key);
                    if let ResolveResult::Unknown(p) = res {
                        return Err(not_well_formed(format!("unbound prefix '{p}'")));
                    }
                }
            }
            // One scan for both characters that need a closer look (the common value has
            // neither).
            if memchr::memchr2(b'<', b'&', attr.value.as_bytes()).is_none() {
                continue;
            }
            // XML 1.0 §3.1 WFC "No < in Attribute Values".
            if attr.value.contains('<') {
                return Err(not_well_formed("'<' in an attribute value"));
            }
            // Resolves references the same way `attr` will, refusing unknown entities and
            // character references to characters XML cannot carry.
            let value = attr
                .normalized_value(XmlVersion::Implicit1_0)
                .map_err(|e| self.map_err(e))?;
            if !value.chars().all(is_xml_char) {
                return Err(not_well_formed("illegal character reference"));
            }
        }
        Ok(())
    }

    /// Reads up to and including the root start tag.
    pub(crate) fn root(&mut self) -> Result<(Ns, BytesStart<'x>), CodecError> {
        loop {
            if let Node::Start { ns, elem } = self.next()? {
                return Ok((ns, elem));
            }
        }
    }

    /// Consumes the rest of the element whose start tag was just returned (still vetting it).
    pub(crate) fn skip(&mut self) -> Result<(), CodecError> {
        let mut level = 0usize;
        loop {
            match self.next()? {
                Node::Start { .. } => level += 1,
                Node::End if level == 0 => return Ok(()),
                Node::End => level -= 1,
                Node::Eof => return Err(not_well_formed("truncated document")),
                Node::Text(_) | Node::Char(_) => {}
            }
        }
    }

    /// Appends the character data directly inside the element whose start tag was just
    /// returned, and consumes through its end tag. Child elements are skipped (their text is not
    /// part of this element's value).
    pub(crate) fn read_text(&mut self, out: &mut String) -> Result<(), CodecError> {
        let mut level = 0usize;
        loop {
            match self.next()? {
                Node::Start { .. } => level += 1,
                Node::End if level == 0 => return Ok(()),
                Node::End => level -= 1,
                Node::Text(t) if level == 0 => out.push_str(&t),
                Node::Char(c) if level == 0 => out.push(c),
                Node::Text(_) | Node::Char(_) => {}
                Node::Eof => return Err(not_well_formed("truncated document")),
            }
        }
    }

    /// Consumes the epilogue; call after the root's end tag to make sure the input was one
    /// complete document and nothing else.
    pub(crate) fn finish(&mut self) -> Result<(), CodecError> {
        loop {
            match self.next()? {
                Node::Eof => return Ok(()),
                // `next` already refuses anything but whitespace/comments after the root.
                _ => continue,
            }
        }
    }

    /// Reads to the end of the input from wherever we are, still vetting every node. Decoders
    /// call it before answering [`CodecError::Invalid`], so that answer is only ever given for a
    /// complete, well-formed, non-hostile document: a hostile one always gets the specific
    /// refusal, whichever part of it the decoder looked at first.
    pub(crate) fn drain(&mut self) -> Result<(), CodecError> {
        loop {
            if let Node::Eof = self.next()? {
                return Ok(());
            }
        }
    }

    /// The value of the unprefixed attribute `name` (attribute-value normalised, XML 1.0
    /// §3.3.3, predefined entities and character references resolved).
    pub(crate) fn attr<'e>(
        &self,
        elem: &'e BytesStart<'x>,
        name: &str,
    ) -> Result<Option<Cow<'e, str>>, CodecError> {
        for attr in elem.attributes() {
            let attr = attr.map_err(|e| not_well_formed(e.to_string()))?;
            if attr.key.0 == name {
                let value = attr
                    .normalized_value(XmlVersion::Implicit1_0)
                    .map_err(|e| self.map_err(e))?;
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    /// The value of the namespaced attribute `{ns}local` (any prefix bound to `ns`).
    pub(crate) fn attr_ns<'e>(
        &self,
        elem: &'e BytesStart<'x>,
        ns: Ns,
        local: &str,
    ) -> Result<Option<Cow<'e, str>>, CodecError> {
        for attr in elem.attributes() {
            let attr = attr.map_err(|e| not_well_formed(e.to_string()))?;
            let (name, prefix) = attr.key.decompose();
            if prefix.is_none() || name.into_inner() != local {
                continue;
            }
            if let (ResolveResult::Bound(bound), _) =
                self.reader.resolver().resolve_attribute(attr.key)
            {
                if classify(bound.0) == ns {
                    let value = attr
                        .normalized_value(XmlVersion::Implicit1_0)
                        .map_err(|e| self.map_err(e))?;
                    return Ok(Some(value));
                }
            }
        }
        Ok(None)
    }
}

/// Runs `decode` over a fresh guard; an `Invalid` answer is only passed on once the rest of the
/// input has been vetted (see [`XmlIn::drain`]).
pub(crate) fn decode_with<'x, T>(
    xml: &'x [u8],
    dialect: Dialect,
    decode: impl FnOnce(&mut XmlIn<'x>) -> Result<T, CodecError>,
) -> Result<T, CodecError> {
    let mut r = XmlIn::new(xml, dialect)?;
    match decode(&mut r) {
        Err(CodecError::Invalid(msg)) => {
            r.drain()?;
            Err(CodecError::Invalid(msg))
        }
        other => other,
    }
}

/// The local name of a start tag.
pub(crate) fn local<'e>(elem: &'e BytesStart<'_>) -> &'e str {
    elem.local_name().into_inner()
}

/// A non-empty `xml:lang` on this element (the `xml` prefix is fixed by Namespaces in XML §3, so
/// the literal name is exact; `xml:lang=""` means "no language", XML 1.0 §2.12).
pub(crate) fn has_xml_lang(elem: &BytesStart<'_>) -> bool {
    elem.attributes()
        .flatten()
        .any(|a| a.key.0 == "xml:lang" && !a.value.is_empty())
}

/// Writes a decimal integer without going through a `String` (encoders sit on the hot path).
pub(crate) fn push_int(out: &mut Vec<u8>, n: i64) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut rest = n.unsigned_abs();
    loop {
        if let Some(slot) = digits.get_mut(len) {
            // `rest % 10` is below 10: the cast cannot truncate.
            *slot = b'0' + (rest % 10) as u8;
        }
        len += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend(digits.iter().take(len).rev());
}

/// Escapes `s` as character data. All five predefined entities are used, CR is written as
/// `&#13;` (a literal CR would be normalised to LF by the reader, XML 1.0 §2.11), and characters
/// XML cannot carry at all (C0 controls, U+FFFE/U+FFFF — never produced by our decoders, only
/// by callers building values by hand) become U+FFFD so the output is always well-formed.
pub(crate) fn push_text(out: &mut Vec<u8>, s: &str) {
    push_escaped(out, s, false);
}

/// Escapes `s` for a double- or single-quoted attribute value: as [`push_text`], plus TAB, LF
/// and CR as character references so attribute-value normalisation (XML 1.0 §3.3.3) does not
/// turn them into spaces on the way back in.
pub(crate) fn push_attr(out: &mut Vec<u8>, s: &str) {
    push_escaped(out, s, true);
}

/// Bytes [`push_escaped`] may replace (controls, markup, the first byte of U+FFFE/U+FFFF):
/// every other byte is copied in runs without being looked at twice.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0usize;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'<' as usize] = true;
    t[b'>' as usize] = true;
    t[b'&' as usize] = true;
    t[b'"' as usize] = true;
    t[b'\'' as usize] = true;
    t[0xEF] = true;
    t
};

fn push_escaped(out: &mut Vec<u8>, s: &str, attr: bool) {
    let bytes = s.as_bytes();
    let mut run_start = 0;
    let mut i = 0;
    while let Some(off) = bytes
        .get(i..)
        .and_then(|rest| rest.iter().position(|&b| SPECIAL[usize::from(b)]))
    {
        i += off;
        let Some(&b) = bytes.get(i) else { break };
        let mut skip = 0usize;
        let replacement: &[u8] = match b {
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'&' => b"&amp;",
            b'"' => b"&quot;",
            b'\'' => b"&apos;",
            b'\r' => b"&#13;",
            b'\n' if attr => b"&#10;",
            b'\t' if attr => b"&#9;",
            0xEF if bytes.get(i + 1) == Some(&0xBF)
                && matches!(bytes.get(i + 2), Some(0xBE | 0xBF)) =>
            {
                skip = 2;
                "\u{FFFD}".as_bytes()
            }
            b'\n' | b'\t' | 0xEF => {
                i += 1;
                continue;
            }
            _ => "\u{FFFD}".as_bytes(),
        };
        out.extend_from_slice(bytes.get(run_start..i).unwrap_or_default());
        out.extend_from_slice(replacement);
        i += 1 + skip;
        run_start = i;
    }
    out.extend_from_slice(bytes.get(run_start..).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(xml: &str, dialect: Dialect) -> Result<String, CodecError> {
        let mut r = XmlIn::new(xml.as_bytes(), dialect)?;
        let mut out = String::new();
        r.root()?;
        r.read_text(&mut out)?;
        r.finish()?;
        Ok(out)
    }

    #[test]
    fn predefined_and_numeric_references_resolve() {
        assert_eq!(
            collect(
                "<a>&lt;&gt;&amp;&quot;&apos;&#65;&#x42;</a>",
                Dialect::Stanza
            ),
            Ok("<>&\"'AB".to_string())
        );
    }

    #[test]
    fn line_ends_are_normalised_but_char_ref_cr_survives() {
        assert_eq!(
            collect("<a>x\r\ny\rz&#13;</a>", Dialect::Stanza),
            Ok("x\ny\nz\r".to_string())
        );
    }

    #[test]
    fn refusals() {
        let cases: &[(&str, CodecError)] = &[
            ("<!DOCTYPE a><a/>", CodecError::Restricted("DTD")),
            (
                "<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>",
                CodecError::Restricted("entity declaration"),
            ),
            ("<!DOCTYPE a [<!ENTITY x", CodecError::Restricted("DTD")),
            ("<a>&x;</a>", CodecError::Restricted("entity reference")),
            ("<a b='&x;'/>", CodecError::Restricted("entity reference")),
            (
                "<?pi x?><a/>",
                CodecError::Restricted("processing instruction"),
            ),
            (
                "<a><?pi x?></a>",
                CodecError::Restricted("processing instruction"),
            ),
            ("<a><!-- c --></a>", CodecError::Restricted("comment")),
        ];
        for (xml, want) in cases {
            assert_eq!(collect(xml, Dialect::Stanza).as_ref(), Err(want), "{xml}");
        }
    }

    #[test]
    fn not_well_formed() {
        for xml in [
            "<a>",
            "<a></b>",
            "<a/><b/>",
            "<a/>x",
            "x<a/>",
            "<p:a/>",
            "<a p:b='1'/>",
            "<a b='1' b='2'/>",
            "<a b='<'/>",
            "<a\"b/>",
            "<1a/>",
            "<a:b:c xmlns:a='u'/>",
            "<a b:='1'/>",
            "<a>&#0;</a>",
            "<a>&#xFFFE;</a>",
            "<a>\u{1}</a>",
            " <?xml version='1.0'?><a/>",
            "<a>&amp</a>",
            "",
        ] {
            assert!(
                matches!(
                    collect(xml, Dialect::Document),
                    Err(CodecError::NotWellFormed(_))
                ),
                "{xml:?} -> {:?}",
                collect(xml, Dialect::Document)
            );
        }
    }

    #[test]
    fn comments_are_skipped_in_documents() {
        assert_eq!(
            collect("<!-- x --><a>1<!-- y -->2</a><!-- z -->", Dialect::Document),
            Ok("12".to_string())
        );
    }

    #[test]
    fn limits() {
        let deep = "<a>".repeat(MAX_PRESENCE_DEPTH + 1);
        assert_eq!(
            collect(&deep, Dialect::Document),
            Err(CodecError::TooDeep {
                limit: MAX_PRESENCE_DEPTH
            })
        );
        let ok = format!(
            "{}{}",
            "<a>".repeat(MAX_PRESENCE_DEPTH),
            "</a>".repeat(MAX_PRESENCE_DEPTH)
        );
        assert!(collect(&ok, Dialect::Document).is_ok());
        let big = format!("<a>{}</a>", "x".repeat(MAX_PRESENCE_DOC));
        assert_eq!(
            collect(&big, Dialect::Document),
            Err(CodecError::TooLarge {
                limit: MAX_PRESENCE_DOC
            })
        );
        assert_eq!(
            XmlIn::new(b"<a>\xff</a>", Dialect::Document).err(),
            Some(CodecError::InvalidUtf8 { valid_up_to: 3 })
        );
    }

    #[test]
    fn encoding_declaration() {
        assert!(collect(
            "<?xml version='1.0' encoding='UTF-8'?><a/>",
            Dialect::Stanza
        )
        .is_ok());
        assert!(collect("\u{FEFF}<?xml version='1.0'?><a/>", Dialect::Stanza).is_ok());
        assert!(matches!(
            collect(
                "<?xml version='1.0' encoding='ISO-8859-1'?><a/>",
                Dialect::Stanza
            ),
            Err(CodecError::Invalid(_))
        ));
    }

    #[test]
    fn integers() {
        for n in [0, 7, -1, 127, -128, i64::from(u32::MAX), i64::MIN, i64::MAX] {
            let mut out = Vec::new();
            push_int(&mut out, n);
            assert_eq!(String::from_utf8(out), Ok(n.to_string()));
        }
    }

    #[test]
    fn escaping() {
        let mut out = Vec::new();
        push_text(&mut out, "a<b>&\"'\r\n\t\u{1}\u{FFFF}é");
        assert_eq!(
            String::from_utf8(out).as_deref(),
            Ok("a&lt;b&gt;&amp;&quot;&apos;&#13;\n\t\u{FFFD}\u{FFFD}é")
        );
        let mut out = Vec::new();
        push_attr(&mut out, "x\ty\nz\r");
        assert_eq!(String::from_utf8(out).as_deref(), Ok("x&#9;y&#10;z&#13;"));
        // U+EFxx and U+FFEx share the lead byte 0xEF but are kept; an escape at either end.
        let mut out = Vec::new();
        push_text(&mut out, "\u{F000}\u{FFEE}\u{FFFE}<x&");
        assert_eq!(
            String::from_utf8(out).as_deref(),
            Ok("\u{F000}\u{FFEE}\u{FFFD}&lt;x&amp;")
        );
        let mut out = Vec::new();
        push_attr(&mut out, "\u{0}");
        assert_eq!(String::from_utf8(out).as_deref(), Ok("\u{FFFD}"));
    }
}
