//! sipp (Debian `sip-tester`) as the foreign SIP peer of the edge tests, and the check that
//! everything it sent reached the home side.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use legate::gateway::hub::Delivery;
use legate::gateway::{Body, Subscription};
use tokio::sync::mpsc;

/// The sipp program; fails the test, naming the package, when it is missing.
pub fn program() -> PathBuf {
    super::programs::require_program("sipp", "sip-tester")
}

/// The scenario file `name` under `tests/data/sipp`.
pub fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/sipp")
        .join(name)
}

/// Runs sipp as UAC over TCP against `target` (`calls` calls at `rate` per second), bounded in
/// time; the child is killed on drop. Fails with sipp's output unless every call succeeded.
pub async fn run_uac(scenario: &Path, target: SocketAddr, calls: u32, rate: u32) -> Result<()> {
    let child = tokio::process::Command::new(program())
        .arg("-sf")
        .arg(scenario)
        .args(["-t", "t1", "-i", "127.0.0.1"])
        .args(["-m", &calls.to_string(), "-r", &rate.to_string()])
        .args(["-timeout", "20s", "-timeout_error", "-nostdin"])
        .arg(target.to_string())
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("spawning sipp")?;
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .context("sipp did not finish in time")??;
    anyhow::ensure!(
        out.status.success(),
        "sipp {} against {target} failed: {}\n{}",
        scenario.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Forwards the home side's deliveries as they come (so the home outbox never fills while sipp
/// runs) to a channel the test reads afterwards.
pub fn forward_home(
    mut home: mpsc::Receiver<Delivery>,
) -> (tokio::task::JoinHandle<()>, mpsc::UnboundedReceiver<Body>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(d) = home.recv().await {
            let _ = tx.send(d.envelope.body);
        }
    });
    (task, rx)
}

/// Waits (at most `wait`) until the home side got exactly `messages` MESSAGEs and
/// `subscriptions` subscribes and as many ends of subscription (offline presence of the
/// watcher: RFC 8048 §5.3.3, an un-SUBSCRIBE never revokes): sipp fails unless every request
/// was answered 200, and a 200 means accepted for delivery, so each must arrive, none twice.
pub async fn expect_delivered(
    got: &mut mpsc::UnboundedReceiver<Body>,
    messages: u32,
    subscriptions: u32,
    wait: Duration,
) -> Result<()> {
    let want = (messages, subscriptions, subscriptions);
    let mut seen = (0u32, 0u32, 0u32);
    let count = |seen: &mut (u32, u32, u32), body: &Body| match body {
        Body::Message(_) => seen.0 += 1,
        Body::Subscription(Subscription::Subscribe) => seen.1 += 1,
        Body::Presence(p) if &*p.state == "offline" => seen.2 += 1,
        _ => {}
    };
    let deadline = tokio::time::Instant::now() + wait;
    while seen.0 < want.0 || seen.1 < want.1 || seen.2 < want.2 {
        let body = tokio::time::timeout_at(deadline, got.recv())
            .await
            .with_context(|| {
                format!("home side got (messages, subscribes, ends) = {seen:?}, want {want:?}")
            })?
            .context("the home side's forwarder stopped")?;
        count(&mut seen, &body);
    }
    // What is already queued must add nothing: a duplicate would show here.
    while let Ok(body) = got.try_recv() {
        count(&mut seen, &body);
    }
    anyhow::ensure!(
        seen == want,
        "home side got (messages, subscribes, ends) = {seen:?}, want {want:?}"
    );
    Ok(())
}
