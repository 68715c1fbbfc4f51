//! The consent lists in the state store: loaded into the cache at start, every change written
//! through, and the cache kept current by watching the prefix (so nodes sharing one store —
//! etcd in a cluster — see each other's changes). A driver: the cache itself never waits.
//!
//! Keys: `policy/<user bare JID>/jid:<watcher bare JID>` or `policy/<user>/domain:<domain>`;
//! value `allow`, `block`, or `block-admin` (a block only the admin lifts).

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::{Change, Policies, Target, Verdict};
use crate::store::{Revision, SharedStore, StoreError};

/// The store prefix of every consent entry.
pub const PREFIX: &str = "policy/";

pub fn key(user: &str, target: &Target) -> String {
    format!("{PREFIX}{user}/{}", target.key())
}

/// Reads a key written by [`key`].
pub fn parse_key(key: &str) -> Option<(String, Target)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (user, target) = rest.split_once('/')?;
    let user = crate::gateway::Address::parse(user).ok()?;
    if user.resource.is_some() {
        return None;
    }
    Some((user.bare_string(), Target::from_key(target)?))
}

/// The stored value: `allow`, `block`, or `block-admin` for a block only the admin lifts.
fn stored_value(v: Verdict, by_admin: bool) -> &'static str {
    match (v, by_admin) {
        (Verdict::Block, true) => ADMIN_BLOCK,
        (v, _) => v.as_str(),
    }
}

const ADMIN_BLOCK: &str = "block-admin";

fn apply_entry(policies: &Policies, key: &str, value: Option<&[u8]>) {
    let Some((user, target)) = parse_key(key) else {
        tracing::warn!(key, "consent entry with an unreadable key ignored");
        return;
    };
    let text = value.map(std::str::from_utf8);
    let by_admin = matches!(text, Some(Ok(ADMIN_BLOCK)));
    let verdict = match text {
        None => None,
        Some(Ok(ADMIN_BLOCK)) => Some(Verdict::Block),
        Some(t) => match t.ok().and_then(Verdict::parse) {
            Some(v) => Some(v),
            None => {
                tracing::warn!(key, "consent entry with an unreadable value ignored");
                return;
            }
        },
    };
    if let Err(e) = policies.apply_as(&user, &target, verdict, by_admin) {
        tracing::warn!(key, error = %e, "consent entry not loaded");
    }
}

/// Loads every entry into `policies`; the revision to watch from.
pub async fn load(policies: &Policies, store: &SharedStore) -> Result<Revision, StoreError> {
    let listing = store.list(PREFIX).await?;
    for e in &listing.entries {
        apply_entry(policies, &e.key, Some(&e.value));
    }
    Ok(listing.revision)
}

/// Loads the listing and forgets entries the store no longer has (deleted while this node's
/// watch was behind).
async fn resync(policies: &Policies, store: &SharedStore) -> Result<Revision, StoreError> {
    let listing = store.list(PREFIX).await?;
    let kept: std::collections::HashSet<&str> =
        listing.entries.iter().map(|e| e.key.as_str()).collect();
    for (user, target) in policies.all_entries() {
        if !kept.contains(key(&user, &target).as_str()) {
            let _ = policies.apply(&user, &target, None);
        }
    }
    for e in &listing.entries {
        apply_entry(policies, &e.key, Some(&e.value));
    }
    Ok(listing.revision)
}

/// Loads the lists, then keeps them in step with the store until `shutdown`: changes made on
/// this node are written (in order, by one task), changes seen on the store are applied.
pub async fn start(
    policies: Arc<Policies>,
    store: SharedStore,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), StoreError> {
    let revision = load(&policies, &store).await?;
    tracing::info!(users = policies.len(), "consent lists loaded");
    // Unbounded in count, never dropping: every change is a cache entry already held in
    // memory, and the writer takes what waits in batches, so it keeps up with any burst (100 000
    // approvals of a sign-in wave used to overflow a bounded queue and be lost).
    let (tx, rx) = mpsc::unbounded_channel::<Change>();
    policies.set_sink(Box::new(move |c| {
        if tx.send(c).is_err() {
            tracing::error!("consent change not persisted: the store writer is gone");
        }
    }));
    tasks.spawn(crate::store::sync::write_queue(
        store.clone(),
        rx,
        shutdown.clone(),
        encode,
        "consent change",
    ));
    let (p, s) = (policies.clone(), store.clone());
    tasks.spawn(crate::store::sync::follow(
        store,
        PREFIX,
        revision + 1,
        shutdown,
        "consent lists",
        move |k, v| apply_entry(&policies, k, v),
        move || {
            let (p, s) = (p.clone(), s.clone());
            async move { resync(&p, &s).await }
        },
    ));
    Ok(())
}

fn encode(c: Change) -> (String, Option<Vec<u8>>) {
    (
        key(&c.user, &c.target),
        c.verdict
            .map(|v| stored_value(v, c.by_admin).as_bytes().to_vec()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Address;
    use crate::store::embedded::Embedded;

    #[test]
    fn keys_round_trip() {
        let t = Target::Jid("bob@partner.com".into());
        let k = key("alice@example.com", &t);
        assert_eq!(k, "policy/alice@example.com/jid:bob@partner.com");
        assert_eq!(parse_key(&k), Some(("alice@example.com".into(), t)));
        assert_eq!(parse_key("policy/alice@example.com"), None);
        assert_eq!(parse_key("policy/nobody/domain:x.com"), None);
    }

    #[tokio::test]
    async fn an_admin_block_is_stored_as_such_and_holds_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let alice = Address::parse("alice@example.com").expect("addr");
        let bob = Address::parse("bob@partner.com").expect("addr");
        {
            let store: SharedStore = Arc::new(Embedded::open(dir.path()).expect("open"));
            let (_stop_tx, stop) = watch::channel(false);
            let p = Policies::new();
            let mut tasks = tokio::task::JoinSet::new();
            start(p.clone(), store.clone(), stop, &mut tasks)
                .await
                .expect("start");
            p.admin_set(
                "alice@example.com",
                Target::Jid("bob@partner.com".into()),
                Some(Verdict::Block),
            )
            .expect("block");
            let k = key("alice@example.com", &Target::Jid("bob@partner.com".into()));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while store.get(&k).await.expect("get").map(|e| e.value)
                != Some(b"block-admin".to_vec())
            {
                assert!(std::time::Instant::now() < deadline, "not written");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let store: SharedStore = Arc::new(Embedded::open(dir.path()).expect("reopen"));
        let p = Policies::new();
        load(&p, &store).await.expect("load");
        assert_eq!(p.consent(&alice, &bob), super::super::Consent::Blocked);
        assert!(
            p.admin_held("alice@example.com", &bob),
            "the admin's hold survives"
        );
    }

    #[tokio::test]
    async fn a_burst_of_answers_is_persisted_whole() {
        // A sign-in wave: 20 000 approvals within moments used to overflow a 4 096 queue and be
        // lost (the users were asked again after a restart).
        let dir = tempfile::tempdir().expect("tempdir");
        let store: SharedStore = Arc::new(Embedded::open(dir.path()).expect("open"));
        let (_stop_tx, stop) = watch::channel(false);
        let p = Policies::new();
        let mut tasks = tokio::task::JoinSet::new();
        start(p.clone(), store.clone(), stop, &mut tasks)
            .await
            .expect("start");
        // 2 000 users with 10 watchers each (a user's lists are bounded).
        for i in 0..20_000 {
            p.set(
                &format!("u{}@example.com", i / 10),
                Target::Jid(format!("w{i}@partner.com")),
                Some(Verdict::Allow),
            )
            .expect("set");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let n = store.list(PREFIX).await.expect("list").entries.len();
            if n == 20_000 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} of 20000 persisted"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    #[tokio::test]
    async fn changes_are_written_reloaded_and_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let alice = Address::parse("alice@example.com").expect("addr");
        let bob = Address::parse("bob@partner.com").expect("addr");
        let (_stop_tx, stop) = watch::channel(false);
        {
            let store: SharedStore = Arc::new(Embedded::open(dir.path()).expect("open"));
            let p = Policies::new();
            let mut tasks = tokio::task::JoinSet::new();
            start(p.clone(), store.clone(), stop.clone(), &mut tasks)
                .await
                .expect("start");
            p.set(
                "alice@example.com",
                Target::Domain(crate::config::Domain::parse("partner.com").expect("d")),
                Some(Verdict::Block),
            )
            .expect("set");
            // Another node writing through the same store is seen here.
            store
                .put(
                    &key("alice@example.com", &Target::Jid("bob@partner.com".into())),
                    b"allow".to_vec(),
                )
                .await
                .expect("put");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while p.consent(&alice, &bob) != super::super::Consent::Allowed {
                assert!(std::time::Instant::now() < deadline, "watch not applied");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            while store.list(PREFIX).await.expect("list").entries.len() < 2 {
                assert!(std::time::Instant::now() < deadline, "write not done");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            tasks.abort_all();
            // The watch task holds the store: it must be gone before the directory lock
            // can be taken again.
            while tasks.join_next().await.is_some() {}
        }
        // A restart reads both back.
        let store: SharedStore = Arc::new(Embedded::open(dir.path()).expect("reopen"));
        let p = Policies::new();
        load(&p, &store).await.expect("load");
        assert_eq!(p.consent(&alice, &bob), super::super::Consent::Allowed);
        let carol = Address::parse("carol@partner.com").expect("addr");
        assert_eq!(p.consent(&alice, &carol), super::super::Consent::Blocked);
    }
}
