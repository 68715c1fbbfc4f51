//! Fuzz the XMPP stream framer: arbitrary bytes in two fragments (split at the first byte's
//! value) must never panic, and every stanza framed must frame again, byte-identical, from the
//! concatenation of the stanza bytes after the same stream header (style.md §11 round trip).
#![no_main]

use legate::xmpp::stream::{Limits, StreamEvent, StreamFramer};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits { max_stanza_bytes: 64 * 1024, max_depth: 32, max_attrs: 64 };

/// Frames `chunks`, returning the header bytes and the stanza bytes seen before any error.
fn frame(chunks: &[&[u8]]) -> (Option<Vec<u8>>, Vec<Vec<u8>>) {
    let mut f = StreamFramer::new(LIMITS);
    let mut header = None;
    let mut stanzas = Vec::new();
    'outer: for c in chunks {
        f.push(c);
        loop {
            match f.next_event() {
                Ok(Some(StreamEvent::StreamOpen(h))) => {
                    if header.is_none() {
                        header = Some(h.raw().to_vec());
                    }
                }
                Ok(Some(StreamEvent::Stanza(s))) => {
                    // Accessors must not panic either.
                    let _ = (s.name(), s.namespace(), s.to(), s.from(), s.id(), s.stanza_type());
                    let _ = s.check_kind();
                    let _ = s.standalone();
                    stanzas.push(s.bytes().to_vec());
                }
                Ok(Some(StreamEvent::StreamClose)) => {}
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_xml();
                    break 'outer;
                }
            }
        }
    }
    (header, stanzas)
}

fuzz_target!(|data: &[u8]| {
    let Some(&first) = data.first() else { return };
    let at = (first as usize).min(data.len());
    let (a, b) = data.split_at(at);
    let (header, stanzas) = frame(&[a, b]);
    if let Some(h) = header {
        let mut again = h;
        for s in &stanzas {
            again.extend_from_slice(s);
        }
        let (_, stanzas2) = frame(&[&again]);
        assert_eq!(stanzas2, stanzas);
    }
});
