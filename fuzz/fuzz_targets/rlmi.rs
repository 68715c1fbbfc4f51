//! Round-trip fuzzing of the Lync batched-subscription codecs (style.md practice 11): the
//! `batchSub` request body, the RLMI document and the `multipart/related` body. Whatever a
//! decoder accepts is encoded and decoded again and must come back equal; nothing may panic.
//! For the multipart reader the input's first line is the Content-Type value, the rest the body.
#![no_main]

use legate::presence::codec::rlmi::{
    decode_batch_sub, decode_related, decode_rlmi, encode_batch_sub, encode_related,
    encode_rlmi, pick_boundary, related_content_type,
};
use legate::presence::codec::MAX_PRESENCE_DOC;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = decode_batch_sub(data) {
        let mut out = Vec::new();
        encode_batch_sub(&b, &mut out);
        if out.len() <= MAX_PRESENCE_DOC {
            assert_eq!(Ok(&b), decode_batch_sub(&out).as_ref(), "batchSub round trip");
        }
    }

    if let Ok(l) = decode_rlmi(data) {
        let mut out = Vec::new();
        encode_rlmi(&l, &mut out);
        if out.len() <= MAX_PRESENCE_DOC {
            assert_eq!(Ok(&l), decode_rlmi(&out).as_ref(), "rlmi round trip");
        }
    }

    let (ct, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(ct) = std::str::from_utf8(ct) {
        if let Ok(parts) = decode_related(ct, body) {
            let boundary = pick_boundary("fz", &parts);
            let mut out = Vec::new();
            encode_related(&boundary, &parts, &mut out);
            let again = decode_related(&related_content_type(&boundary), &out);
            assert_eq!(Ok(&parts), again.as_ref(), "multipart round trip");
        }
    }
});
