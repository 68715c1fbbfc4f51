//! Fuzz the XMPP stream framer: arbitrary bytes in fragments (split at the first byte's value,
//! the rest in pieces of the second byte's value) must never panic, and every stanza framed
//! must frame again, byte-identical, from the concatenation of the stanza bytes after the same
//! stream header (style.md §11 round trip).
//!
//! Partial-element time tracking (issue 10 item 2): after each push is drained,
//! `observe_partial(now)` is called with a clock that advances one second per push. The time it
//! returns is never in the future, never older than the last complete element, stays the same
//! while the same element is pending, and is only given while bytes are buffered.
#![no_main]

use legate::xmpp::stream::{Limits, StreamEvent, StreamFramer};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

const LIMITS: Limits = Limits {
    max_stanza_bytes: 64 * 1024,
    max_depth: 32,
    max_attrs: 64,
};

/// Frames `chunks`, returning the header bytes and the stanza bytes seen before any error.
fn frame(chunks: &[&[u8]]) -> (Option<Vec<u8>>, Vec<Vec<u8>>) {
    let mut f = StreamFramer::new(LIMITS);
    let mut header = None;
    let mut stanzas = Vec::new();
    let t0 = Instant::now();
    // When the last complete element came out, and the partial time seen at the last call.
    let mut last_complete = t0;
    let mut last_partial: Option<Instant> = None;
    'outer: for (i, c) in chunks.iter().enumerate() {
        let now = t0 + Duration::from_secs(i as u64 + 1);
        f.push(c);
        let mut completed = false;
        loop {
            match f.next_event() {
                Ok(Some(StreamEvent::StreamOpen(h))) => {
                    completed = true;
                    if header.is_none() {
                        header = Some(h.raw().to_vec());
                    }
                }
                Ok(Some(StreamEvent::Stanza(s))) => {
                    // Accessors must not panic either.
                    let _ = (
                        s.name(),
                        s.namespace(),
                        s.to(),
                        s.from(),
                        s.id(),
                        s.stanza_type(),
                    );
                    let _ = s.check_kind();
                    let _ = s.standalone();
                    stanzas.push(s.bytes().to_vec());
                    completed = true;
                }
                Ok(Some(StreamEvent::StreamClose)) => completed = true,
                Ok(None) => break,
                Err(e) => {
                    let _ = e.to_xml();
                    break 'outer;
                }
            }
        }
        if completed {
            last_complete = now;
        }
        let seen = f.observe_partial(now);
        if let Some(t) = seen {
            assert!(t <= now, "partial element seen in the future");
            assert!(
                t >= last_complete,
                "partial element older than the last complete one"
            );
            assert!(
                f.buffered_len() > 0,
                "partial element with nothing buffered"
            );
            if !completed {
                if let Some(prev) = last_partial {
                    assert_eq!(t, prev, "the same pending element got a new time");
                }
            }
        }
        last_partial = seen;
    }
    (header, stanzas)
}

fuzz_target!(|data: &[u8]| {
    let Some(&first) = data.first() else { return };
    let at = (first as usize).min(data.len());
    let (a, b) = data.split_at(at);
    let step = usize::from(data.get(1).copied().unwrap_or(0)).max(1);
    let mut chunks = vec![a];
    chunks.extend(b.chunks(step));
    let (header, stanzas) = frame(&chunks);
    if let Some(h) = header {
        let mut again = h;
        for s in &stanzas {
            again.extend_from_slice(s);
        }
        let (_, stanzas2) = frame(&[&again]);
        assert_eq!(stanzas2, stanzas);
    }
});
