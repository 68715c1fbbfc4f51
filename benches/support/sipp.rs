//! sipp (Debian `sip-tester`) as a foreign SIP peer sending pager MESSAGEs over plain TCP,
//! for the benches that load `legate run` (`sip_pager`, `cluster_throughput`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// sipp's pager MESSAGE toward a local user, as in `tests/data/sipp/message.xml`.
pub const SCENARIO: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="Legate pager MESSAGE load">
  <send>
    <![CDATA[

      MESSAGE sip:alice@example.com SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      Max-Forwards: 70
      From: <sip:sipp@partner.test>;tag=[pid]SIPpTag00[call_number]
      To: <sip:alice@example.com>
      Call-ID: [call_id]
      CSeq: 1 MESSAGE
      Content-Type: text/plain; charset=UTF-8
      Content-Length: [len]

      Hello from sipp, message [call_number] with a body of typical chat length

    ]]>
  </send>

  <recv response="200" crlf="true">
  </recv>
</scenario>
"#;

/// One sipp client; killed on every exit path (by its own handle: never by name).
pub struct Sipp(pub Child);

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sipp program; fails naming the Debian package when it is missing.
pub fn sipp_program() -> Result<&'static Path> {
    let p = Path::new("/usr/bin/sipp");
    if !p.exists() {
        bail!(
            "sipp is missing: install the Debian package `sip-tester` (apt-get install sip-tester)"
        );
    }
    Ok(p)
}

/// Starts sipp `i` sending `calls` MESSAGEs of `scenario` to `sip` at `rate`/s with at most
/// `window` unanswered, giving up after `limit`; its errors go to `dir/sipp<i>_errors.log`.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    sipp: &Path,
    scenario: &Path,
    dir: &Path,
    i: usize,
    sip: SocketAddr,
    calls: usize,
    rate: usize,
    window: usize,
    limit: Duration,
) -> Result<Sipp> {
    // sipp's own listening port defaults to 5060 for each; a second one would fail.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(sipp)
        .arg("-sf")
        .arg(scenario)
        .args(["-t", "t1", "-i", "127.0.0.1", "-p", &port.to_string()])
        .args(["-m", &calls.to_string(), "-r", &rate.to_string()])
        .args(["-l", &window.to_string()])
        .args(["-timeout", &format!("{}s", limit.as_secs())])
        .args(["-timeout_error", "-nostdin", "-trace_err"])
        .args(["-error_file"])
        .arg(dir.join(format!("sipp{i}_errors.log")))
        .arg(sip.to_string())
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning sipp")?;
    Ok(Sipp(child))
}

/// The end of sipp `i`'s error log (what it could not send or match).
pub fn error_log(dir: &Path, i: usize) -> String {
    let log = std::fs::read_to_string(dir.join(format!("sipp{i}_errors.log"))).unwrap_or_default();
    let start = log.len().saturating_sub(2000);
    let start = (start..log.len())
        .find(|&k| log.is_char_boundary(k))
        .unwrap_or(0);
    log.get(start..).unwrap_or_default().to_owned()
}

/// Waits until `received` has grown by `total` from `base` (the home node counted them),
/// failing at once if a sipp run fails and after `limit` since `start`.
pub async fn wait_counted(
    clients: &mut [Sipp],
    dir: &Path,
    received: &AtomicUsize,
    base: usize,
    total: usize,
    start: Instant,
    limit: Duration,
) -> Result<()> {
    while received.load(Ordering::Relaxed) - base < total {
        for (i, c) in clients.iter_mut().enumerate() {
            if let Some(s) = c.0.try_wait()?.filter(|s| !s.success()) {
                bail!("sipp {i} failed ({s}): {}", error_log(dir, i));
            }
        }
        if start.elapsed() > limit {
            bail!(
                "gave up after {limit:?}: {} of {total} MESSAGEs reached the home node",
                received.load(Ordering::Relaxed) - base
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Every sipp run must end with every MESSAGE answered 200 (its exit status says so).
pub async fn all_succeeded(clients: &mut [Sipp], dir: &Path) -> Result<()> {
    for (i, c) in clients.iter_mut().enumerate() {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = c.0.try_wait()? {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("sipp {i} did not finish after the home node counted every MESSAGE");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !status.success() {
            bail!("sipp {i} failed ({status}): {}", error_log(dir, i));
        }
    }
    Ok(())
}
