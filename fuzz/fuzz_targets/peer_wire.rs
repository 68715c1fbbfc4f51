//! What another cluster node sends on the peer link (issue 12): a `Batch` in protobuf, decoded
//! by prost, then each envelope read by `cluster::peer::wire::from_wire`, which checks it as
//! any input (addresses parsed again, stanza names and error conditions from closed sets).
//! Nothing may panic; an envelope that is accepted must write back (`to_wire`) to a message
//! that reads as the same envelope.
#![no_main]

use legate::cluster::peer::proto::Batch;
use legate::cluster::peer::wire::{from_wire, to_wire};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = Batch::decode(data) else {
        return;
    };
    for w in batch.envelopes {
        let Ok(env) = from_wire(w) else {
            continue;
        };
        let again = from_wire(to_wire(&env)).expect("an accepted envelope writes back readable");
        assert_eq!(again, env);
    }
});
