//! RFC 7247 §6 address mapping: any text as a SIP URI. A URI that maps to a core address must
//! map back to a SIP URI that parses and maps to the same address (round trip), and XEP-0106
//! escaping must always be undone by unescaping. Never panics.
#![no_main]

use legate::gateway::interwork::address::{
    escape_localpart, instance_of_sip, sip_uri_of, unescape_localpart,
};
use legate::sip::uri::{parse_uri, UriContext};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    assert_eq!(unescape_localpart(&escape_localpart(text)), text);
    let Ok(uri) = parse_uri(text, UriContext::NameAddr) else {
        return;
    };
    let Some(sip) = uri.as_sip() else { return };
    let Ok(addr) = instance_of_sip(sip) else {
        return;
    };
    let back = sip_uri_of(&addr);
    let again = parse_uri(&back, UriContext::NameAddr).expect("our SIP URI parses");
    let again = instance_of_sip(again.as_sip().expect("a SIP URI")).expect("maps again");
    assert_eq!(again, addr, "{text} → {back}");
});
