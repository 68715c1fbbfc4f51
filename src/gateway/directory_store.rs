//! The learned user → home node directory in the state store (issue 11 item 2): what user
//! traffic taught the node survives a restart, so a foreign peer's first stanza after a start
//! reaches the right home node of a deployment with several. Loaded before the edges take
//! traffic, every new entry written through by one task (the router never waits), and kept in
//! step with the store by a watch (a cluster shares the directory through etcd).
//!
//! Keys: `directory/<user bare JID>`; value: the home node's name.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::{Address, Hub};
use crate::store::{Revision, SharedStore, StoreError};

/// The store prefix of every directory entry.
pub const PREFIX: &str = "directory/";

pub fn key(user: &str) -> String {
    format!("{PREFIX}{user}")
}

fn apply(hub: &Hub, key: &str, value: &[u8]) {
    let user = key
        .strip_prefix(PREFIX)
        .and_then(|u| Address::parse(u).ok())
        .filter(|u| u.resource.is_none());
    let (Some(user), Ok(home)) = (user, std::str::from_utf8(value)) else {
        tracing::warn!(key, "directory entry unreadable; ignored");
        return;
    };
    if !hub.directory().restore(&hub.config(), &user, home) {
        tracing::debug!(
            key,
            home,
            "directory entry not restored (node gone, user listed or directory full)"
        );
    }
}

fn forget(hub: &Hub, key: &str) {
    let user = key
        .strip_prefix(PREFIX)
        .and_then(|u| Address::parse(u).ok());
    if let Some(user) = user {
        hub.directory().forget(&user);
    }
}

/// Loads every entry; the revision to watch from.
pub async fn load(hub: &Hub, store: &SharedStore) -> Result<Revision, StoreError> {
    let listing = store.list(PREFIX).await?;
    for e in &listing.entries {
        apply(hub, &e.key, &e.value);
    }
    Ok(listing.revision)
}

/// Loads the directory, then writes what is learned and follows the store until `shutdown`.
pub async fn start(
    hub: Arc<Hub>,
    store: SharedStore,
    shutdown: watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), StoreError> {
    let revision = load(&hub, &store).await?;
    tracing::info!(users = hub.directory().len(), "learned directory loaded");
    // Unbounded in count (the directory itself bounds what can be learned), written in
    // batches so a burst of new users never outruns the writer.
    let (tx, rx) = mpsc::unbounded_channel::<(String, Arc<str>)>();
    hub.directory().set_sink(Box::new(move |user, home| {
        if tx.send((user.to_string(), home.clone())).is_err() {
            tracing::warn!("directory entry not persisted: the store writer is gone");
        }
    }));
    tasks.spawn(crate::store::sync::write_queue(
        store.clone(),
        rx,
        shutdown.clone(),
        encode,
        "directory entry",
    ));
    let (h, s) = (hub.clone(), store.clone());
    tasks.spawn(crate::store::sync::follow(
        store,
        PREFIX,
        revision + 1,
        shutdown,
        "learned directory",
        // A delete (`legate intercluster users remove`, or an operator's cleanup through
        // the store) is forgotten on every node at once.
        move |k, v| match v {
            Some(v) => apply(&hub, k, v),
            None => forget(&hub, k),
        },
        move || {
            let (h, s) = (h.clone(), s.clone());
            async move { load(&h, &s).await }
        },
    ));
    Ok(())
}

fn encode((user, home): (String, Arc<str>)) -> (String, Option<Vec<u8>>) {
    (key(&user), Some(home.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, BUILTIN_SYSTEMS};
    use crate::gateway::{Body, Envelope, MessageBody, Origin};
    use crate::presence::map::MappingStore;
    use crate::store::embedded::Embedded;
    use std::path::Path;

    const CONFIG: &str = r#"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
system = "lync"
[[home_node]]
name = "hn1"
addresses = ["127.0.0.1:5347"]
component_secret = "a-long-enough-secret-1"
users = ["carol@example.com"]
[[home_node]]
name = "hn2"
addresses = ["127.0.0.1:5348"]
component_secret = "a-long-enough-secret-2"
users = ["frank@example.com"]
"#;

    fn hub() -> Arc<Hub> {
        let cfg = config::from_toml(CONFIG, Path::new("t.toml"), BUILTIN_SYSTEMS).expect("cfg");
        Hub::new(cfg, MappingStore::open(None).expect("maps"))
    }

    fn addr(s: &str) -> Address {
        Address::parse(s).expect("addr")
    }

    #[tokio::test]
    async fn what_is_learned_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dave = addr("dave@example.com");
        {
            let store: SharedStore = Arc::new(Embedded::open(dir.path()).expect("open"));
            let h = hub();
            let (stop_tx, stop) = watch::channel(false);
            let mut tasks = tokio::task::JoinSet::new();
            start(h.clone(), store.clone(), stop, &mut tasks)
                .await
                .expect("start");
            // dave writes from hn2: the directory learns him, and the store gets him.
            let _ = h.submit(
                &Origin::Component {
                    home_node: Arc::from("hn2"),
                },
                Envelope {
                    from: dave.clone(),
                    to: addr("bob@partner.com"),
                    body: Body::Message(MessageBody {
                        text: "hi".into(),
                        ..MessageBody::default()
                    }),
                    stanza_id: None,
                    via_cluster: None,
                },
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while store
                .get(&key("dave@example.com"))
                .await
                .expect("get")
                .is_none()
            {
                assert!(std::time::Instant::now() < deadline, "not written");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            // What another node learned (written straight to the store) is seen here.
            store
                .put(&key("erin@example.com"), b"hn1".to_vec())
                .await
                .expect("put");
            let erin = addr("erin@example.com");
            while h.directory().lookup(&h.config(), &erin).as_deref() != Some("hn1") {
                assert!(std::time::Instant::now() < deadline, "watch not applied");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            // An entry deleted from the store (an admin's `intercluster users remove`) is
            // forgotten at once.
            let before = h.directory().len();
            store
                .delete(&key("erin@example.com"))
                .await
                .expect("delete");
            while h.directory().len() + 1 != before {
                assert!(std::time::Instant::now() < deadline, "delete not applied");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            // Entries the configuration now contradicts or cannot use are not restored.
            store
                .put(&key("carol@example.com"), b"hn2".to_vec())
                .await
                .expect("put");
            store
                .put(&key("zed@example.com"), b"hn9".to_vec())
                .await
                .expect("put");
            let _ = stop_tx.send(true);
            while tasks.join_next().await.is_some() {}
        }
        let store: SharedStore = Arc::new(Embedded::open(dir.path()).expect("reopen"));
        let h = hub();
        load(&h, &store).await.expect("load");
        let cfg = h.config();
        assert_eq!(h.directory().lookup(&cfg, &dave).as_deref(), Some("hn2"));
        // erin's entry was deleted: she is unknown after the restart too.
        assert_eq!(h.directory().lookup(&cfg, &addr("erin@example.com")), None);
        // carol is listed on hn1: the list wins over a stored entry.
        assert_eq!(
            h.directory()
                .lookup(&cfg, &addr("carol@example.com"))
                .as_deref(),
            Some("hn1")
        );
        // hn9 is not configured: zed stays unknown (no routing node: nowhere to go).
        assert_eq!(h.directory().lookup(&cfg, &addr("zed@example.com")), None);
        assert_eq!(h.directory().len(), 1);
    }
}
