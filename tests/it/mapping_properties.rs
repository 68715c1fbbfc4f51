//! Properties of the default mapping set: totality (every state of every system reaches a valid
//! state of every other system), survival of the user's own status text, and wire round trips
//! (a state published by Legate reads back as the same state).

use legate::presence::map::{self, Facts, MappingSet, Via};
use proptest::prelude::*;
use std::path::Path;

fn set() -> MappingSet {
    map::embedded().expect("embedded defaults are valid")
}

#[test]
fn the_eight_systems_of_the_seed_are_defined() {
    let set = set();
    let mut names: Vec<&str> = set.system_names().collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "fed-jabber8",
            "fed-xmpp",
            "jabber8",
            "lync",
            "ocs",
            "sametime",
            "webex",
            "xmpp"
        ]
    );
}

#[test]
fn every_state_of_every_system_maps_to_a_valid_state_of_every_other() {
    let set = set();
    let mut pairs = 0;
    for from in &set.systems {
        let fid = set.system_id(&from.name).expect("id");
        for to in &set.systems {
            let tid = set.system_id(&to.name).expect("id");
            for (sid, st) in from.state_ids() {
                for note in [None, Some("Back at 3")] {
                    let t = set.translate(fid, tid, sid, note);
                    assert!(
                        to.states.get(t.state.index()).is_some(),
                        "{}:{} -> {}",
                        from.name,
                        st.name,
                        to.name
                    );
                    let path = set.describe_path(fid, tid, sid, &t);
                    assert_eq!(
                        path.first().map(String::as_str),
                        Some(format!("{}:{}", from.name, st.name).as_str())
                    );
                    assert_eq!(
                        path.last().map(String::as_str),
                        Some(format!("{}:{}", to.name, to.state(t.state).name).as_str())
                    );
                    if from.name == to.name {
                        assert_eq!(t.state, sid);
                        assert_eq!(t.via, Via::Identity);
                    }
                }
                pairs += 1;
            }
        }
    }
    assert!(pairs > 300, "{pairs}");
}

#[test]
fn offline_is_offline_everywhere() {
    let set = set();
    for from in &set.systems {
        let fid = set.system_id(&from.name).expect("id");
        let off = from.state_id("offline").expect("every system has offline");
        for to in &set.systems {
            let tid = set.system_id(&to.name).expect("id");
            let t = set.translate(fid, tid, off, None);
            assert_eq!(
                &*to.state(t.state).name,
                "offline",
                "{} -> {}",
                from.name,
                to.name
            );
        }
    }
}

#[test]
fn published_states_read_back_as_themselves() {
    let set = set();
    for sys in &set.systems {
        let id = set.system_id(&sys.name).expect("id");
        for (sid, st) in sys.state_ids() {
            let back = match sys.protocol {
                map::Protocol::Sip => {
                    let m = set.encode_msrtc(id, sid, None);
                    set.decode(id, &Facts::from_msrtc(&m)).state
                }
                map::Protocol::Xmpp => {
                    let p = set.encode_xmpp(id, sid, None);
                    set.decode(id, &Facts::from_xmpp(&p)).state
                }
            };
            assert_eq!(
                sys.state(back).name,
                st.name,
                "{}:{} does not read back",
                sys.name,
                st.name
            );
        }
    }
}

#[test]
fn embedded_defaults_are_exactly_the_files_in_mappings() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
    let on_disk = map::set::read_dir(&root).expect("read mappings/");
    let mut disk: Vec<(String, String)> = on_disk.into_iter().map(|f| (f.rel, f.text)).collect();
    disk.sort();
    let mut embedded: Vec<(String, String)> = map::defaults::FILES
        .iter()
        .map(|(r, t)| (r.to_string(), t.to_string()))
        .collect();
    embedded.sort();
    assert_eq!(
        disk.iter().map(|x| &x.0).collect::<Vec<_>>(),
        embedded.iter().map(|x| &x.0).collect::<Vec<_>>(),
        "add new mapping files to src/presence/map/defaults.rs"
    );
    assert_eq!(disk, embedded);
}

proptest! {
    /// A user's own status text survives translation, unless a row consumed it (it matched the
    /// row's note) or the cell replaces it by policy.
    #[test]
    fn user_text_survives(text in "[A-Za-z0-9 ,.!?éü日本]{1,40}", fi in 0usize..8, ti in 0usize..8, si in 0usize..16) {
        let set = set();
        let from = &set.systems[fi % set.systems.len()];
        let to = &set.systems[ti % set.systems.len()];
        let fid = set.system_id(&from.name).expect("id");
        let tid = set.system_id(&to.name).expect("id");
        let (sid, _) = from.state_ids().nth(si % from.states.len()).expect("state");
        prop_assume!(!text.trim().is_empty());
        let t = set.translate(fid, tid, sid, Some(&text));
        let consumed = matches!(t.via, Via::Row { table, row } if set.tables[table].rows[row].from_note.is_some());
        if !consumed {
            let note = t.note.as_deref().unwrap_or("");
            prop_assert!(note.contains(text.as_str()), "{}:{} -> {}: {:?}", from.name, from.state(sid).name, to.name, note);
        }
    }
}
