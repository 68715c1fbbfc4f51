//! Open federation (`[xmpp.federation] mode = "deny_list"`, issue 11 item 7): a foreign XMPP
//! domain that the configuration does not list gets its component links when it first sends,
//! and from then on local users reach it through their home node — through `legate run`, a
//! foreign Prosody over s2s and a home Prosody behind the component link. A denied domain
//! gets nothing through and no component. The domains opened this way are opened again after
//! a restart.
//!
//! Needs `/usr/bin/prosody` and `/usr/sbin/dnsmasq` (`apt-get install prosody dnsmasq-base`).

use crate::common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use common::legate::metric_value;
use common::s2s_rig::{S2sRig, S2sRigSpec, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_domain_gets_its_component_on_first_contact() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(90), scenario())
        .await
        .map_err(|_| anyhow!("scenario timed out"))?
}

async fn scenario() -> Result<()> {
    let mut rig = S2sRig::start(S2sRigSpec {
        ips: (
            Ipv4Addr::new(127, 0, 2, 20),
            Ipv4Addr::new(127, 0, 2, 21),
            Ipv4Addr::new(127, 0, 2, 22),
        ),
        extra_names: &[],
        // xmpp.test is nowhere in the configuration: open federation lets it in.
        federation: r#"[xmpp.federation]
mode = "deny_list"
dialback_allow_private_targets = true
[[xmpp.federation.domain]]
name = "denied.test"
deny = true"#,
        extra: "",
        home: |h| h,
    })
    .await?;
    // No component for xmpp.test yet: none is listed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !rig.legate
            .output()
            .contains("component xmpp.test connected"),
        "{}",
        rig.why("a component opened before anyone sent")
    );

    let mut alice = rig.alice().await?;
    let mut bob = rig.bob().await?;
    // bob writes first: Legate opens xmpp.test's component on the home node, and the message
    // waits for it instead of bouncing.
    bob.send_message("alice@example.test", "hello from an unlisted domain")
        .await?;
    let m = alice
        .expect_message_from("bob@xmpp.test", WAIT)
        .await
        .with_context(|| rig.why("bob's message did not reach alice"))?;
    assert_eq!(m.body.as_deref(), Some("hello from an unlisted domain"));
    // Now alice reaches xmpp.test through the component that opened.
    alice.send_message("bob@xmpp.test", "hi bob").await?;
    let m = bob
        .expect_message_from("alice@example.test", WAIT)
        .await
        .with_context(|| rig.why("alice's answer did not reach bob"))?;
    assert_eq!(m.body.as_deref(), Some("hi bob"));

    let metrics = rig.legate.metrics().await?;
    assert_eq!(
        metric_value(
            &metrics,
            "legate_component_domains_opened_total{outcome=\"opened\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let status = rig.legate.http_get("/status").await?;
    assert!(
        status.contains("\"domain\":\"xmpp.test\"") && status.contains("\"up\":true"),
        "{status}"
    );
    // A restart remembers the domains opened on demand: the component is back at start, so
    // alice reaches bob first, before xmpp.test writes anything.
    alice.close().await;
    rig.restart()?;
    rig.wait_component()
        .await
        .with_context(|| rig.why("xmpp.test's component not reopened after a restart"))?;
    let mut alice = rig.alice().await?;
    alice
        .send_message("bob@xmpp.test", "after the restart")
        .await?;
    let m = bob
        .expect_message_from("alice@example.test", WAIT)
        .await
        .with_context(|| rig.why("alice's first message after a restart did not reach bob"))?;
    assert_eq!(m.body.as_deref(), Some("after the restart"));
    alice.close().await;
    bob.close().await;
    Ok(())
}
