//! RFC 4475 / RFC 5118 vectors through the parser and strict validator, one datagram per file,
//! against the expectation in each folder's `index.tsv` (copied from shared/vectors/sip).
//!
//! - `valid`, `valid (tolerate)`, `valid-but-semantically-bad`: accepted, and re-serialized
//!   byte-exact (minus the datagram's ignored trailing bytes).
//! - `invalid`: refused; requests with 400 (505 for `SIP/7.0`), responses dropped (no status).
//! - One documented exception: `ipv6-in-sdp.dat` is "valid-but-semantically-bad" *as published*
//!   and its index line says that over UDP its Content-Length past the end is the clerr case
//!   (400); its `clfix` twin is the acceptance test.

use std::path::{Path, PathBuf};

use legate::sip::{check_datagram, parse_datagram, HeaderName, Host, Uri};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sip")
}

fn read(folder: &str, file: &str) -> Vec<u8> {
    std::fs::read(data_dir().join(folder).join(file)).unwrap_or_default()
}

/// (file, expected) rows of an index.tsv.
fn index(folder: &str) -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(data_dir().join(folder).join("index.tsv")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split('\t');
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .collect()
}

/// Expected status for refused requests; everything else refused gets 400.
fn expected_status(file: &str) -> Option<u16> {
    match file {
        "badvers.dat" => Some(505),
        // Responses: dropped.
        "scalarlg.dat" | "bigcode.dat" => None,
        _ => Some(400),
    }
}

#[test]
fn every_vector_behaves_as_indexed() {
    let mut accepted = 0;
    let mut refused = 0;
    let mut failures = Vec::new();
    for folder in ["rfc4475", "rfc5118"] {
        let rows = index(folder);
        assert!(!rows.is_empty(), "{folder}/index.tsv missing");
        for (file, expected) in rows {
            let raw = read(folder, &file);
            assert!(!raw.is_empty(), "{folder}/{file} missing");
            let verdict = check_datagram(&raw);
            let want_ok = match expected.as_str() {
                "valid" | "valid (tolerate)" => true,
                "valid-but-semantically-bad" => file != "ipv6-in-sdp.dat",
                "invalid" => false,
                other => panic!("unknown expectation {other:?} for {file}"),
            };
            match (&verdict, want_ok) {
                (Ok(m), true) => {
                    accepted += 1;
                    // Byte-exact round trip (RFC 4475 §3.1.1.8: trailing octets discarded).
                    let out = m.to_bytes();
                    if !raw.starts_with(&out) || out.len() != m.encoded_len() {
                        failures.push(format!("{folder}/{file}: round trip differs"));
                    }
                    match parse_datagram(&out) {
                        Ok(again) if again.to_bytes() == out => {}
                        _ => failures.push(format!("{folder}/{file}: re-parse differs")),
                    }
                }
                (Err(r), false) => {
                    refused += 1;
                    let want = if file == "ipv6-in-sdp.dat" {
                        Some(400)
                    } else {
                        expected_status(&file)
                    };
                    if r.status != want {
                        failures.push(format!(
                            "{folder}/{file}: status {:?}, want {want:?} ({})",
                            r.status, r.reason
                        ));
                    }
                    if r.reason.is_empty() {
                        failures.push(format!("{folder}/{file}: empty reason"));
                    }
                }
                (Ok(_), false) => failures.push(format!("{folder}/{file}: accepted, want refused")),
                (Err(r), true) => {
                    failures.push(format!("{folder}/{file}: refused ({r}), want accepted"))
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // 4475: 50 files, 5118: 15 files.
    assert_eq!(accepted + refused, 65);
    eprintln!("accepted {accepted}, refused {refused}");
}

#[test]
fn wsinv_fields() {
    let raw = read("rfc4475", "wsinv.dat");
    let Ok(m) = check_datagram(&raw) else {
        panic!("wsinv must be accepted")
    };
    assert_eq!(m.vias().map(|v| v.len()), Ok(3));
    assert_eq!(m.max_forwards(), Ok(Some(68)));
    let cseq = m.cseq();
    assert_eq!(cseq.map(|c| (c.seq, c.method)), Ok((9, "INVITE")));
    assert_eq!(m.to().map(|t| t.tag()), Ok(Some("1918181833n")));
    assert_eq!(m.from().map(|t| t.tag()), Ok(Some("98asjd8")));
    assert_eq!(
        m.from().map(|f| f.display_name),
        Ok(Some("\"J Rosenberg \\\\\\\"\""))
    );
    assert_eq!(m.header(HeaderName::Subject).map(|h| h.value), Some(""));
    let contacts = m.contacts().unwrap_or_default();
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0].params().get("newparam"), Some(Some("newvalue")));
    assert_eq!(contacts[0].params().get("q"), Some(Some("0.33")));
    assert_eq!(m.body().len(), 150);
}

#[test]
fn selected_fields() {
    let m = check_datagram(&read("rfc4475", "esc02.dat"));
    assert_eq!(m.as_ref().map(|m| m.method()), Ok(Some("RE%47IST%45R")));
    assert_eq!(m.as_ref().map(|m| m.contacts().map(|c| c.len())), Ok(Ok(2)));

    let m = check_datagram(&read("rfc4475", "dblreq.dat"));
    assert_eq!(m.as_ref().map(|m| m.method()), Ok(Some("REGISTER")));

    let m = check_datagram(&read("rfc4475", "unkscm.dat"));
    let scheme = m
        .as_ref()
        .ok()
        .and_then(|m| m.request_uri())
        .and_then(Result::ok)
        .map(|u| u.scheme().to_owned());
    assert_eq!(scheme.as_deref(), Some("nobodyKnowsThisScheme"));

    let m = check_datagram(&read("rfc5118", "port-ambiguous.dat"));
    let uri = m
        .as_ref()
        .ok()
        .and_then(|m| m.request_uri())
        .and_then(Result::ok);
    match uri {
        Some(Uri::Sip(u)) => {
            assert_eq!(u.port(), None);
            assert!(matches!(u.host(), Host::V6(a, _) if a.to_string() == "2001:db8::10:5070"));
        }
        other => panic!("{other:?}"),
    }

    let m = check_datagram(&read("rfc5118", "via-received-param-no-delim.dat"));
    let via = m
        .as_ref()
        .ok()
        .map(|m| m.via_top().map(|v| (v.branch(), v.received())));
    assert_eq!(via, Some(Ok((Some("z9hG4bKas3"), Some("2001:db8::9:255")))));

    let m = check_datagram(&read("rfc4475", "inv2543.dat"));
    let m = m.as_ref().ok();
    assert_eq!(m.map(|m| m.via_top().map(|v| v.branch())), Some(Ok(None)));
    assert_eq!(m.map(|m| m.body().len()), Some(105));

    // Trailing bytes of a datagram are dropped; a short Content-Length truncates the body.
    let m = check_datagram(&read("rfc5118", "mult-ip-in-sdp.dat"));
    assert_eq!(m.map(|m| m.body().len()), Ok(181));
}

/// The same vectors over a stream: the framer must agree with the datagram verdict wherever
/// the message extent is known, and close the connection where it is not.
#[test]
fn vectors_over_a_stream() {
    use legate::sip::{Frame, Framer, FramingError};
    let mut mismatches = Vec::new();
    for folder in ["rfc4475", "rfc5118"] {
        for (file, _) in index(folder) {
            let raw = read(folder, &file);
            let mut f = Framer::default();
            f.push(&raw);
            let first = f.next();
            let datagram = check_datagram(&raw);
            let special = match file.as_str() {
                "mcl01.dat" => Some(Err(FramingError::ConflictingContentLength)),
                "ncl.dat" => Some(Err(FramingError::BadContentLength("negative"))),
                "inv2543.dat" => Some(Err(FramingError::MissingContentLength)),
                // Content-Length past the data: on a stream the framer waits for more.
                "clerr.dat" | "ipv6-in-sdp.dat" => Some(Ok(None)),
                _ => None,
            };
            if let Some(want) = special {
                if first != want {
                    mismatches.push(format!("{file}: {first:?}"));
                }
                continue;
            }
            let ok = match (&first, &datagram) {
                (Ok(Some(Frame::Message(m))), Ok(d)) => m.to_bytes() == d.to_bytes(),
                (Ok(Some(Frame::Bad { status, .. })), Err(r)) => *status == r.status,
                _ => false,
            };
            if !ok {
                mismatches.push(format!(
                    "{file}: stream {first:?} vs datagram {:?}",
                    datagram.err()
                ));
            }
            if file == "dblreq.dat" {
                // On a stream the trailing INVITE is the next message (RFC 4475 §3.1.1.8).
                let second = f.next();
                let is_invite =
                    matches!(&second, Ok(Some(Frame::Message(m))) if m.method() == Some("INVITE"));
                if !is_invite {
                    mismatches.push(format!("dblreq second: {second:?}"));
                }
            }
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// `legate sip check` logic over every vector: one JSON line per file, verdicts as indexed.
#[test]
fn sip_check_json_over_vectors() {
    let mut files = Vec::new();
    let mut expected = Vec::new();
    for folder in ["rfc4475", "rfc5118"] {
        for (file, exp) in index(folder) {
            files.push(data_dir().join(folder).join(&file));
            let ok = exp != "invalid" && file != "ipv6-in-sdp.dat";
            expected.push((file, ok));
        }
    }
    let mut out = Vec::new();
    let all_ok = legate::sip::check::check_files(&files, &mut out);
    assert!(matches!(all_ok, Ok(false)));
    let text = String::from_utf8(out).unwrap_or_default();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lines.len(), files.len());
    for (line, (file, ok)) in lines.iter().zip(&expected) {
        eprintln!("{line}");
        assert!(line["file"]
            .as_str()
            .is_some_and(|f| f.ends_with(file.as_str())));
        assert_eq!(line["verdict"], if *ok { "ok" } else { "bad" }, "{file}");
        if *ok {
            assert!(line["status"].is_null() && line["reason"].is_null());
        } else {
            assert!(line["reason"].as_str().is_some_and(|r| !r.is_empty()));
        }
    }
}
