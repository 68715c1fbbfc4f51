//! The one harness that starts the real `legate` binary (`CARGO_BIN_EXE_legate`), as
//! hickory-dns's `server_harness` does: `legate run --config <file>` with listeners on port 0,
//! the addresses taken from its `legate: listening <name> <addr>` lines on stdout, everything it
//! prints (stdout and stderr) kept for failure messages, and the process killed by PID when the
//! handle is dropped (under `GuardedChild`, so it also dies when the test binary is killed).
//!
//! The metrics a test asserts on through this handle are those of the separate `legate`
//! process, so no other test in this binary can move them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::prosody::GuardedChild;

/// How long `legate run` may take to announce its listeners.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What the child printed, and a signal for each new line.
struct Output {
    text: Mutex<String>,
    /// Wakes blocking waiters (start-up) on each new line or end of output.
    grew: Condvar,
    /// Wakes async waiters: the number of lines seen so far.
    lines: watch::Sender<u64>,
    /// Readers still running (0: the child closed both pipes, so it has exited).
    open: Mutex<u8>,
}

impl Output {
    fn text(&self) -> String {
        self.text.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn closed(&self) -> bool {
        self.open.lock().map(|n| *n == 0).unwrap_or(true)
    }
}

/// A running `legate run`.
pub struct Legate {
    child: GuardedChild,
    out: Arc<Output>,
    listeners: Vec<(String, SocketAddr)>,
}

impl Legate {
    /// Starts `legate run --config <config>` in the config file's directory (so relative
    /// `data_dir`s stay in the test's temp dir) and waits until every listener named in `wanted`
    /// is announced. `LEGATE_LOG` is `LEGATE_TEST_LOG` when set, else `info`, so the log lines
    /// tests wait for are printed. Blocks: the start-up depends on nothing the caller runs.
    pub fn start(config: &Path, wanted: &[&str]) -> Result<Legate> {
        Self::start_args(config, &[], wanted)
    }

    /// `start` with more arguments after `run --config <config>` (e.g. `--log-format json`).
    pub fn start_args(config: &Path, args: &[&str], wanted: &[&str]) -> Result<Legate> {
        let dir = config
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_legate"));
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .args(args)
            .current_dir(dir)
            .env(
                "LEGATE_LOG",
                std::env::var("LEGATE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let (child, stdout, stderr) = GuardedChild::spawn_piped(&cmd).context("spawning legate")?;
        let (lines, _) = watch::channel(0);
        let out = Arc::new(Output {
            text: Mutex::new(String::new()),
            grew: Condvar::new(),
            lines,
            open: Mutex::new(2),
        });
        spawn_reader(stdout, out.clone());
        spawn_reader(stderr, out.clone());
        let mut legate = Legate {
            child,
            out,
            listeners: Vec::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut text = legate.out.text.lock().map_err(|_| anyhow!("output lock"))?;
        loop {
            let announced = parse_listeners(&text);
            if wanted.iter().all(|w| announced.iter().any(|(n, _)| n == w)) {
                drop(text);
                legate.listeners = announced;
                return Ok(legate);
            }
            if legate.out.closed() {
                bail!("legate exited before announcing {wanted:?}:\n{text}");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!("legate did not announce {wanted:?} within {START_TIMEOUT:?}:\n{text}");
            }
            text = legate
                .out
                .grew
                .wait_timeout(text, deadline - now)
                .map_err(|_| anyhow!("output lock"))?
                .0;
        }
    }

    /// The address announced for listener `name` (one named at start).
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| {
                panic!(
                    "legate announced no `{name}` listener (only {:?})",
                    self.listeners
                )
            })
    }

    /// Everything the process printed so far, stdout and stderr interleaved by line.
    pub fn output(&self) -> String {
        self.out.text()
    }

    /// Waits (at most `wait`) until the output satisfies `pred`, woken by each new line.
    pub async fn wait_output(
        &self,
        what: &str,
        wait: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let mut rx = self.out.lines.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Subscribed before reading: a line printed in between marks `rx` changed.
            let text = self.out.text();
            if pred(&text) {
                return Ok(());
            }
            if self.out.closed() {
                bail!("legate exited while waiting for {what}:\n{text}");
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so it cannot be gone; a timeout is the failure.
                Ok(Err(_)) | Err(_) => bail!("no {what} within {wait:?}:\n{text}"),
            }
        }
    }

    /// One HTTP GET on the admin listener (one request per connection); the whole response.
    pub async fn http_get(&self, path: &str) -> Result<String> {
        let addr = self.addr("admin");
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the admin endpoint {addr}"))?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .with_context(|| format!("GET {path} did not complete"))??;
        Ok(out)
    }

    /// The node's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        self.http_get("/metrics").await
    }

    /// Polls `/metrics` (every 50 ms, at most `wait`) until `pred` holds for it: the node has
    /// no event a test could await for a counter, so this is a bounded poll on the condition.
    pub async fn wait_metrics(
        &self,
        what: &str,
        wait: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let m = self.metrics().await?;
            if pred(&m) {
                return Ok(m);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{what}: not seen within {wait:?}\n{m}\n--- output ---\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Sends signal `name` (`HUP`, `TERM`, ...) to the `legate` process, by its PID.
    pub fn signal(&self, name: &str) -> Result<()> {
        let pid = self
            .child
            .program_pid("legate")
            .ok_or_else(|| anyhow!("the legate process is not running"))?;
        let st = Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .context("running kill")?;
        if !st.success() {
            bail!("kill -s {name} {pid} failed: {st}");
        }
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!("legate still running after {limit:?}\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs the process (by PID, through its guard) and waits for it to be gone: a crash,
    /// with no chance to write anything on the way out.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}

/// The value of the counter or gauge line `series` (name with its labels exactly as rendered,
/// e.g. `legate_component_links_up` or `x_total{a="b"}`) in a Prometheus text, if present.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (s, v) = l.trim().rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok()).flatten()
    })
}

/// Every `legate: listening <name> <addr>` line in `text`, in order.
fn parse_listeners(text: &str) -> Vec<(String, SocketAddr)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("legate: listening ")?.split_whitespace();
            let name = f.next()?;
            let addr = f.next()?.parse().ok()?;
            Some((name.to_string(), addr))
        })
        .collect()
}

/// Copies one pipe into `out` line by line, waking waiters after each line.
fn spawn_reader(pipe: impl std::io::Read + Send + 'static, out: Arc<Output>) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(pipe);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Ok(mut t) = out.text.lock() {
                        t.push_str(&line);
                        if !line.ends_with('\n') {
                            t.push('\n');
                        }
                    }
                    out.lines.send_modify(|n| *n += 1);
                    out.grew.notify_all();
                }
            }
        }
        if let Ok(mut n) = out.open.lock() {
            *n = n.saturating_sub(1);
        }
        // Taking the text lock orders this wake-up after a waiter's check of `closed()` (made
        // under that lock), so the waiter cannot miss it.
        drop(out.text.lock());
        out.lines.send_modify(|n| *n += 1);
        out.grew.notify_all();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_lines_and_metric_values_are_parsed() {
        let text =
            "noise\nlegate: listening admin 127.0.0.1:4000\nlegate: listening sip_tcp [::1]:5060\n";
        let l = parse_listeners(text);
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].0, "sip_tcp");
        assert_eq!(l[1].1, "[::1]:5060".parse().expect("addr"));
        let m = "# HELP x\nlegate_links_up 2\nx_total{a=\"b\"} 3\nx_total{a=\"c\"} 4\n";
        assert_eq!(metric_value(m, "legate_links_up"), Some(2.0));
        assert_eq!(metric_value(m, "x_total{a=\"c\"}"), Some(4.0));
        assert_eq!(metric_value(m, "x_total"), None);
    }
}
