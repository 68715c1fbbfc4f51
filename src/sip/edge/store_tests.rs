//! The driver's side of persistence: records read back at start, and the state file of
//! earlier versions moved into the store once.

use super::*;
use crate::config::{self, BUILTIN_SYSTEMS};
use crate::presence::map::MappingStore;
use crate::store::embedded::Embedded;
use std::time::UNIX_EPOCH;

fn hub(dir: &Path) -> Arc<Hub> {
    let text = format!(
        r#"[node]
data_dir = "{}"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
"#,
        dir.display()
    );
    let cfg = config::from_toml(&text, &dir.join("legate.toml"), BUILTIN_SYSTEMS)
        .unwrap_or_else(|d| panic!("{d}"));
    Hub::new(
        cfg,
        MappingStore::open(None).unwrap_or_else(|d| panic!("{d}")),
    )
}

fn core() -> Core {
    Core::new(
        LocalIdentity {
            sent_by: "example.com:5061".into(),
            transport: "TLS",
        },
        Duration::from_secs(600),
    )
}

/// The state file as version 1 wrote it: one approved Lync watcher of alice.
fn legacy_file(expires_unix: u64) -> String {
    format!(
        r#"{{"version":1,"notifiers":[{{"dialog":{{"id":{{"call_id":"old-1","local_tag":"lt1","remote_tag":"rt1"}},
"local_uri":"sip:alice@example.com","remote_uri":"sip:bob@partner.com","remote_target":"sip:bob@10.0.0.1:5061;transport=tls",
"route_set":[],"local_cseq":7,"remote_cseq":1}},"watcher":"bob@partner.com","presentity":"alice@example.com",
"domain":"partner.com","active":true,"msrtc":true,"expires_unix":{expires_unix}}}]}}"#
    )
}

#[tokio::test]
async fn the_old_state_file_moves_into_the_store_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let in_an_hour = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    std::fs::write(dir.path().join(STATE_FILE), legacy_file(in_an_hour)).expect("write");
    let hub = hub(dir.path());
    let store: SharedStore = Arc::new(Embedded::open(dir.path()).expect("open"));
    let mut c = core();
    restore(&mut c, &hub, &store, dir.path())
        .await
        .expect("restore");
    assert_eq!(c.counts().0, 1);
    let l = store.list(core::NOTIFIER_PREFIX).await.expect("list");
    assert_eq!(l.entries.len(), 1);
    assert_eq!(l.entries[0].key, "sip/n/lt1/rt1/old-1");
    assert!(!dir.path().join(STATE_FILE).exists(), "renamed");
    assert!(dir.path().join("sip-subscriptions.json.migrated").exists());

    // The next start reads the store only, and finds the same subscription.
    let mut c2 = core();
    restore(&mut c2, &hub, &store, dir.path())
        .await
        .expect("restore");
    assert_eq!(c2.counts().0, 1);
    assert!(c2
        .take_store_ops(Instant::now(), SystemTime::now(), true)
        .is_empty());
}

/// A notifier keeps no domain of its own: its watcher's is the domain it came from, as every
/// build wrote it. A record saying otherwise was edited by hand: skipped, the others restored.
#[tokio::test]
async fn a_record_whose_domain_is_not_its_watchers_is_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let in_an_hour = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let good = legacy_file(in_an_hour);
    let odd = good
        .replace(
            "\"watcher\":\"bob@partner.com\"",
            "\"watcher\":\"bob@elsewhere.com\"",
        )
        .replace("old-1", "old-2");
    assert_ne!(good, odd);
    let both = good.replacen(
        "}]}",
        &format!("}},{}", odd.split_once("[").map_or("", |(_, r)| r)),
        1,
    );
    std::fs::write(dir.path().join(STATE_FILE), both).expect("write");
    let hub = hub(dir.path());
    let store: SharedStore = Arc::new(Embedded::memory());
    let mut c = core();
    restore(&mut c, &hub, &store, dir.path())
        .await
        .expect("restore");
    assert_eq!(
        c.counts().0,
        1,
        "only the record whose domain is its watcher's"
    );
}

#[tokio::test]
async fn an_unreadable_state_file_does_not_stop_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(STATE_FILE), "{ not json").expect("write");
    let hub = hub(dir.path());
    let store: SharedStore = Arc::new(Embedded::memory());
    let mut c = core();
    restore(&mut c, &hub, &store, dir.path())
        .await
        .expect("restore");
    assert_eq!(c.counts().0, 0);
}
