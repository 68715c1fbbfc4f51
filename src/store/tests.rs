//! Behaviour of the embedded store through the `Store` trait (what an etcd implementation must
//! also pass), plus its journal across reopen.

use std::sync::Arc;
use std::time::Instant;

use super::embedded::{Embedded, HISTORY};
use super::*;

async fn basics(s: &dyn Store) {
    assert_eq!(s.get("a/1").await.expect("get"), None);
    let r1 = s.put("a/1", b"one".to_vec()).await.expect("put");
    let r2 = s.put("a/2", b"two".to_vec()).await.expect("put");
    let r3 = s.put("b/1", b"other".to_vec()).await.expect("put");
    assert!(r1 < r2 && r2 < r3, "revisions grow: {r1} {r2} {r3}");
    let e = s.get("a/1").await.expect("get").expect("present");
    assert_eq!(
        (e.value.as_slice(), e.create_revision, e.mod_revision),
        (&b"one"[..], r1, r1)
    );
    let l = s.list("a/").await.expect("list");
    assert_eq!(l.revision, r3);
    assert_eq!(
        l.entries.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
        ["a/1", "a/2"]
    );
    // An update keeps the create revision.
    let r4 = s.put("a/1", b"uno".to_vec()).await.expect("put");
    let e = s.get("a/1").await.expect("get").expect("present");
    assert_eq!((e.create_revision, e.mod_revision), (r1, r4));
    // Delete: a revision if present, None (and no revision used) if not.
    let r5 = s.delete("a/2").await.expect("delete").expect("existed");
    assert_eq!(r5, r4 + 1);
    assert_eq!(s.delete("a/2").await.expect("delete"), None);
    assert_eq!(s.list("").await.expect("list").revision, r5);
    // Compare-and-swap.
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
        panic!("absent key must swap with expected None");
    };
    let Cas::Conflict(Some(now)) = s
        .compare_and_swap("c", None, b"y".to_vec())
        .await
        .expect("cas")
    else {
        panic!("present key must conflict with expected None");
    };
    assert_eq!(now.mod_revision, r6);
    assert!(matches!(
        s.compare_and_swap("c", Some(r6), b"y".to_vec())
            .await
            .expect("cas"),
        Cas::Swapped(_)
    ));
    // Bad input gets a typed error.
    assert!(matches!(
        s.put("", vec![]).await,
        Err(StoreError::BadKey { .. })
    ));
    assert!(matches!(
        s.put("k", vec![0; MAX_VALUE + 1]).await,
        Err(StoreError::ValueTooLarge { .. })
    ));
}

#[tokio::test]
async fn memory_store_basics() {
    let s: Arc<dyn Store> = Arc::new(Embedded::memory());
    basics(s.as_ref()).await;
}

#[tokio::test]
async fn disk_store_basics_and_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rev = {
        let s = Embedded::open(dir.path()).expect("open");
        basics(&s).await;
        s.list("").await.expect("list").revision
    };
    let s = Embedded::open(dir.path()).expect("reopen");
    let l = s.list("").await.expect("list");
    assert_eq!(l.revision, rev, "the revision survives a restart");
    let keys: Vec<_> = l.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["a/1", "b/1", "c"]);
    assert_eq!(l.entries[0].value, b"uno");
    // Revisions are read back from the journal with the value: `a/1` was updated after it
    // was created.
    let a1 = s.get("a/1").await.expect("get").expect("a/1");
    assert!(a1.create_revision < a1.mod_revision, "{a1:?}");
    assert_eq!(
        (a1.create_revision, a1.mod_revision),
        (l.entries[0].create_revision, l.entries[0].mod_revision)
    );
    // The next change continues the revision sequence.
    assert_eq!(s.put("d", vec![]).await.expect("put"), rev + 1);
}

#[tokio::test]
async fn watch_replays_from_a_revision_then_follows_live_changes() {
    let s = Embedded::memory();
    let r1 = s.put("p/1", b"1".to_vec()).await.expect("put");
    s.put("q/1", b"x".to_vec()).await.expect("put");
    let r3 = s.delete("p/1").await.expect("delete").expect("existed");
    let mut w = s.watch("p/", r1).await.expect("watch");
    let Some(WatchEvent::Put(e)) = w.next().await else {
        panic!("replayed put expected");
    };
    assert_eq!((e.key.as_str(), e.mod_revision), ("p/1", r1));
    assert_eq!(
        w.next().await,
        Some(WatchEvent::Delete {
            key: "p/1".into(),
            revision: r3
        })
    );
    let r4 = s.put("p/2", b"2".to_vec()).await.expect("put");
    s.put("q/2", b"y".to_vec()).await.expect("put");
    let Some(WatchEvent::Put(e)) = w.next().await else {
        panic!("live put expected");
    };
    assert_eq!((e.key.as_str(), e.mod_revision), ("p/2", r4));
    // "From now on": nothing replayed.
    let mut now = s.watch("", 0).await.expect("watch");
    let r6 = s.put("z", vec![]).await.expect("put");
    let Some(WatchEvent::Put(e)) = now.next().await else {
        panic!("live put expected");
    };
    assert_eq!(e.mod_revision, r6);
}

/// With a journal the history keeps where each put's record is, not its key and value: a
/// replay reads them back, whether the record is still queued or already in the file, and
/// hands out superseded values too (revision order, as before).
#[tokio::test]
async fn a_journal_watch_replays_puts_read_back_from_their_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Embedded::open(dir.path()).expect("open");
    let r1 = s.put("p/1", b"first".to_vec()).await.expect("put");
    s.put("q/1", b"x".to_vec()).await.expect("put");
    let r3 = s.put("p/1", b"second".to_vec()).await.expect("put");
    let r4 = s.delete("p/1").await.expect("delete").expect("existed");
    let r5 = s.put("p/2", vec![9; 700]).await.expect("put");
    let mut w = s.watch("p/", r1).await.expect("watch");
    let mut got = Vec::new();
    for _ in 0..4 {
        match w.next().await {
            Some(WatchEvent::Put(e)) => {
                got.push((e.key, Some(e.value), e.create_revision, e.mod_revision))
            }
            Some(WatchEvent::Delete { key, revision }) => got.push((key, None, 0, revision)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        got,
        vec![
            ("p/1".to_string(), Some(b"first".to_vec()), r1, r1),
            ("p/1".to_string(), Some(b"second".to_vec()), r1, r3),
            ("p/1".to_string(), None, 0, r4),
            ("p/2".to_string(), Some(vec![9; 700]), r5, r5),
        ]
    );
}

/// A compaction moves every record: the history pointing at them is forgotten, and a watch
/// from before it answers `Resync` (its reader lists again); one from after it replays.
#[tokio::test]
async fn a_compaction_forgets_the_watch_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(Embedded::open(dir.path()).expect("open"));
    let value = vec![1u8; 1000];
    let r1 = s.put("k/0", value.clone()).await.expect("put");
    // Rewriting one key makes the journal mostly garbage: past 8 MiB it is compacted.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10_000 {
        let (s, v) = (Arc::clone(&s), value.clone());
        set.spawn(async move { s.put("k/0", v).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task").expect("put");
    }
    // The writer decides to compact before a commit, from the file's size then: when the
    // flood went out in a few large group commits, the last one took the file past 8 MiB
    // with no commit after it. One more write comes after it.
    s.put("k/0", value.clone()).await.expect("put");
    let size = std::fs::metadata(dir.path().join(journal::FILE_NAME))
        .expect("meta")
        .len();
    assert!(size < 8 << 20, "compacted: {size}");
    let mut w = s.watch("k/", r1).await.expect("watch");
    assert_eq!(w.next().await, Some(WatchEvent::Resync));
    let r = s.put("k/1", b"after".to_vec()).await.expect("put");
    let mut w = s.watch("k/", r).await.expect("watch");
    let Some(WatchEvent::Put(e)) = w.next().await else {
        panic!("replayed put expected");
    };
    assert_eq!((e.key.as_str(), e.value.as_slice()), ("k/1", &b"after"[..]));
}

#[tokio::test]
async fn watch_from_forgotten_history_says_resync() {
    let s = Embedded::memory();
    for i in 0..HISTORY + 10 {
        s.put(&format!("k/{i}"), vec![]).await.expect("put");
    }
    let mut w = s.watch("k/", 1).await.expect("watch");
    assert_eq!(w.next().await, Some(WatchEvent::Resync));
    assert_eq!(w.next().await, None);
    // After a restart no history is kept at all.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let d = Embedded::open(dir.path()).expect("open");
        d.put("a", vec![]).await.expect("put");
    }
    let d = Embedded::open(dir.path()).expect("reopen");
    let mut w = d.watch("", 1).await.expect("watch");
    assert_eq!(w.next().await, Some(WatchEvent::Resync));
}

#[tokio::test]
async fn a_watcher_that_falls_behind_gets_resync_after_what_it_had() {
    let s = Embedded::memory();
    let mut w = s.watch("", 0).await.expect("watch");
    for i in 0..20_000 {
        s.put(&format!("k/{i}"), vec![]).await.expect("put");
    }
    let mut puts = 0;
    loop {
        match w.next().await {
            Some(WatchEvent::Put(_)) => puts += 1,
            Some(WatchEvent::Resync) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(puts > 0 && puts < 20_000, "{puts}");
    assert_eq!(w.next().await, None);
}

#[tokio::test]
async fn torn_tail_is_cut_and_corruption_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Embedded::open(dir.path()).expect("open");
        s.put("a", b"1".to_vec()).await.expect("put");
        s.put("b", b"2".to_vec()).await.expect("put");
    }
    let path = dir.path().join(journal::FILE_NAME);
    let full = std::fs::read(&path).expect("read");
    // A crash in the middle of the last write.
    std::fs::write(&path, &full[..full.len() - 2]).expect("write");
    {
        let s = Embedded::open(dir.path()).expect("torn tail loads");
        assert_eq!(s.len(), 1);
        s.put("c", b"3".to_vec()).await.expect("put after cut");
    }
    let s = Embedded::open(dir.path()).expect("reopen");
    assert_eq!(s.len(), 2);
    drop(s);
    // A flipped byte in the first record (more records follow): refuse, and say where.
    let mut bad = std::fs::read(&path).expect("read");
    bad[20] ^= 0x40;
    std::fs::write(&path, &bad).expect("write");
    let err = Embedded::open(dir.path()).expect_err("corrupt");
    assert!(matches!(err, StoreError::Corrupt { .. }));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_share_fsyncs_and_compaction_keeps_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s: Arc<dyn Store> = Arc::new(Embedded::open(dir.path()).expect("open"));
    let n = 20_000;
    let value = vec![7u8; 300];
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let s = Arc::clone(&s);
        let v = value.clone();
        set.spawn(async move { s.put(&format!("sub/{i:06}"), v).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task").expect("put");
    }
    let took = t.elapsed();
    // One fsync each would take minutes on a disk; group commit makes it seconds at most.
    assert!(took.as_secs() < 20, "{n} puts took {took:?}");
    // Rewrite every key several times: the journal grows past the compaction threshold.
    for round in 0..4u8 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let s = Arc::clone(&s);
            let mut v = value.clone();
            v[0] = round;
            set.spawn(async move { s.put(&format!("sub/{i:06}"), v).await });
        }
        while let Some(r) = set.join_next().await {
            r.expect("task").expect("put");
        }
    }
    // Values are read back from the journal (the map keeps only their place): right after
    // the compactions, while the store is live, they are the last ones written.
    let live = s.list("sub/").await.expect("list");
    assert_eq!(live.entries.len(), n);
    assert!(live
        .entries
        .iter()
        .all(|e| e.value.len() == 300 && e.value[0] == 3));
    let one = s.get("sub/000123").await.expect("get").expect("present");
    assert_eq!(one.value[0], 3);
    let rev = s.list("").await.expect("list").revision;
    drop(s);
    let size = std::fs::metadata(dir.path().join(journal::FILE_NAME))
        .expect("meta")
        .len();
    assert!(
        size < 3 * n as u64 * 340,
        "compaction keeps the journal near the live size: {size}"
    );
    let s = Embedded::open(dir.path()).expect("reopen");
    let l = s.list("sub/").await.expect("list");
    assert_eq!(l.entries.len(), n);
    assert_eq!(l.revision, rev);
    assert!(l.entries.iter().all(|e| e.value[0] == 3));
}

#[tokio::test]
async fn one_process_per_data_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Embedded::open(dir.path()).expect("open");
    // A second opener (here the same process; another `legate` the same way) is refused
    // before it reads or writes anything, and says what to do.
    let err = Embedded::open(dir.path()).expect_err("second open");
    assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("node.data_dir"), "{err}");
    first
        .put("k", b"v".to_vec())
        .await
        .expect("first still writes");
    drop(first);
    // Released with the store (and by the OS when a process dies).
    let again = Embedded::open(dir.path()).expect("reopen after close");
    assert_eq!(again.len(), 1);
}

#[tokio::test]
async fn a_batch_is_written_whole_and_the_last_change_of_a_key_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s: SharedStore = Arc::new(Embedded::open(dir.path()).expect("open"));
    s.put("gone", b"x".to_vec()).await.expect("put");
    let mut changes: Vec<(String, Option<Vec<u8>>)> = (0..5000)
        .map(|i| (format!("k/{i}"), Some(format!("v{i}").into_bytes())))
        .collect();
    changes.push(("k/7".into(), Some(b"later".to_vec())));
    changes.push(("gone".into(), None));
    let failed = crate::store::write_batch(&s, changes).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(s.list("k/").await.expect("list").entries.len(), 5000);
    let k7 = s.get("k/7").await.expect("get").expect("k/7");
    assert_eq!(k7.value, b"later");
    assert!(s.get("gone").await.expect("get").is_none());
}
