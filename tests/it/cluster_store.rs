//! The `Store` trait on a real three-member etcd (Debian `etcd-server`): the same contract as
//! the embedded store, plus what only a networked store meets — a member down, quorum lost,
//! compacted history.

use std::sync::Arc;
use std::time::{Duration, Instant};

use legate::store::etcd::{connect, Etcd as EtcdStore};
use legate::store::{Cas, SharedStore, StoreError, WatchEvent};

use crate::common::etcd::Etcd;

async fn store(etcd: &Etcd, cluster: &str) -> SharedStore {
    let client = connect(&etcd.endpoints()).await.expect("connect to etcd");
    Arc::new(EtcdStore::new(client, cluster))
}

async fn next_event(w: &mut legate::store::Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a watch event within 10 s")
        .expect("the watch is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_keeps_the_store_contract() {
    let etcd = Etcd::start(3).expect("three-member etcd");
    let s = store(&etcd, "c1").await;
    let other = store(&etcd, "c2").await;

    assert_eq!(s.get("a/1").await.expect("get"), None);
    let r1 = s.put("a/1", b"one".to_vec()).await.expect("put");
    let r2 = s.put("a/2", b"two".to_vec()).await.expect("put");
    other.put("a/1", b"not ours".to_vec()).await.expect("put");
    let e = s.get("a/1").await.expect("get").expect("present");
    assert_eq!(
        (e.value.as_slice(), e.create_revision, e.mod_revision),
        (&b"one"[..], r1, r1)
    );
    let l = s.list("a/").await.expect("list");
    assert!(l.revision > r2, "the listing is at the store's revision");
    assert_eq!(
        l.entries.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["a/1", "a/2"],
        "another cluster's keys in the same etcd are not seen"
    );
    let r4 = s.put("a/1", b"uno".to_vec()).await.expect("put");
    let e = s.get("a/1").await.expect("get").expect("present");
    assert_eq!((e.create_revision, e.mod_revision), (r1, r4));
    assert!(s.delete("a/2").await.expect("delete").is_some());
    assert_eq!(s.delete("a/2").await.expect("delete"), None);

    // Compare-and-swap: absent, present, stale token.
    assert_eq!(
        s.compare_and_swap("c", Some(1), b"x".to_vec())
            .await
            .expect("cas"),
        Cas::Conflict(None)
    );
    let Cas::Swapped(r6) = s
        .compare_and_swap("c", None, b"x".to_vec())
        .await
        .expect("cas")
    else {
        panic!("an absent key swaps with expected None");
    };
    let Cas::Conflict(Some(now)) = s
        .compare_and_swap("c", None, b"y".to_vec())
        .await
        .expect("cas")
    else {
        panic!("a present key conflicts with expected None");
    };
    assert_eq!((now.key.as_str(), now.mod_revision), ("c", r6));
    assert!(matches!(
        s.compare_and_swap("c", Some(r6), b"y".to_vec())
            .await
            .expect("cas"),
        Cas::Swapped(_)
    ));

    // A watch from a revision replays, then follows live changes.
    let mut w = s.watch("a/", r1).await.expect("watch");
    match next_event(&mut w).await {
        WatchEvent::Put(e) => assert_eq!((e.key.as_str(), e.mod_revision), ("a/1", r1)),
        other => panic!("expected the replayed put of a/1, got {other:?}"),
    }
    let mut seen = Vec::new();
    s.put("a/3", b"three".to_vec()).await.expect("put");
    while !seen.iter().any(|k: &String| k == "a/3") {
        match next_event(&mut w).await {
            WatchEvent::Put(e) => seen.push(e.key),
            WatchEvent::Delete { key, .. } => seen.push(format!("-{key}")),
            WatchEvent::Resync => panic!("no resync expected"),
        }
    }
    assert_eq!(seen, ["a/2", "a/1", "-a/2", "a/3"]);

    // Values over the limit are refused before they reach etcd.
    assert!(matches!(
        s.put("big", vec![0; legate::store::MAX_VALUE + 1]).await,
        Err(StoreError::ValueTooLarge { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_prefix_is_listed_in_pages_at_one_revision() {
    let etcd = Etcd::start(1).expect("one-member etcd");
    let s = store(&etcd, "pages").await;
    let changes = (0..2500)
        .map(|i| (format!("sub/{i:05}"), Some(vec![b'x'; 64])))
        .collect();
    assert!(legate::store::write_batch(&s, changes).await.is_empty());
    let l = s.list("sub/").await.expect("list");
    assert_eq!(l.entries.len(), 2500);
    assert!(
        l.entries.windows(2).all(|w| w[0].key < w[1].key),
        "in key order"
    );
    assert_eq!(l.entries[2499].key, "sub/02499");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_compacted_history_says_resync() {
    let etcd = Etcd::start(1).expect("one-member etcd");
    let client = connect(&etcd.endpoints()).await.expect("connect");
    let s: SharedStore = Arc::new(EtcdStore::new(client.clone(), "compact"));
    let r1 = s.put("k/1", b"1".to_vec()).await.expect("put");
    let r2 = s.put("k/2", b"2".to_vec()).await.expect("put");
    client
        .kv_client()
        .compact(r2 as i64, None)
        .await
        .expect("compact");
    let mut w = s.watch("k/", r1).await.expect("watch");
    assert_eq!(next_event(&mut w).await, WatchEvent::Resync);
    assert!(w.next().await.is_none(), "nothing follows a resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_down_changes_nothing_and_lost_quorum_is_a_clear_error() {
    let mut etcd = Etcd::start(3).expect("three-member etcd");
    let s = store(&etcd, "quorum").await;
    let mut w = s.watch("q/", 0).await.expect("watch");
    s.put("q/before", b"1".to_vec()).await.expect("put");
    assert!(matches!(next_event(&mut w).await, WatchEvent::Put(_)));

    // One member of three down: reads, writes and the running watch go on.
    etcd.stop(0);
    let t = Instant::now();
    s.put("q/one-down", b"2".to_vec())
        .await
        .expect("put with one member down");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    match next_event(&mut w).await {
        WatchEvent::Put(e) => assert_eq!(e.key, "q/one-down"),
        other => panic!("expected the put, got {other:?}"),
    }

    // Two of three down: no quorum. A write fails with a clear error within the deadline,
    // not a hang.
    etcd.stop(1);
    let t = Instant::now();
    let err = s
        .put("q/no-quorum", b"3".to_vec())
        .await
        .expect_err("no quorum, no write");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::Unavailable(_)) && text.contains("etcd"),
        "{text}"
    );

    // Quorum back: writes work again and the watch resumes where it stopped, losing nothing.
    etcd.restart(0).expect("member 0 back");
    etcd.restart(1).expect("member 1 back");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.put("q/after", b"4".to_vec()).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("quorum is back but writes fail: {e}"),
        }
    }
    loop {
        match next_event(&mut w).await {
            WatchEvent::Put(e) if e.key == "q/after" => break,
            WatchEvent::Put(e) if e.key == "q/no-quorum" => {
                // A write refused for lack of quorum may still have been proposed and commit
                // once quorum returns: etcd makes no promise either way, and neither do we.
            }
            other => panic!("expected q/after next, got {other:?}"),
        }
    }
}
