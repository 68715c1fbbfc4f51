//! Differential: the SIP edge validates a framed request in two halves (the connection task's
//! `validate_framed`, then the core's `Routing::check` on the routing headers, decoded once);
//! together they must refuse exactly what strict `validate` refuses, with the same status.
//! The reason may name a different header when several are bad (strict validation reports the
//! first bad header in message order, `Routing::check` checks Request-URI, Via, From, To in
//! that order: a first fuzz run found a message with a bad From before a bad Via); with one
//! bad routing header the unit test `framed_validation_plus_check_is_strict_validation` also
//! holds the reasons equal.
#![no_main]

use legate::sip::routing::Routing;
use legate::sip::validate::validate_framed;
use legate::sip::{parse_datagram, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = parse_datagram(data) else {
        return;
    };
    let strict = validate(&m).map_err(|r| r.status);
    let split = validate_framed(&m)
        .and_then(|()| Routing::of(&m).check(&m))
        .map_err(|r| r.status);
    assert_eq!(split, strict);
});
