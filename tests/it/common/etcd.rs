//! A real three-member etcd (Debian `etcd-server`) on loopback, for the cluster tests.
//!
//! Each member runs `etcd` in the foreground under [`GuardedChild`] (killed with the test,
//! by PID), with its own data directory in one temp dir, client and peer ports drawn free on
//! 127.0.0.1, a short heartbeat and election timeout so a lost member is noticed in tests'
//! time, and a fresh cluster token so two test clusters never join. A member can be stopped
//! and started again on its data directory (quorum tests).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::ports::free_local_port;
use super::prosody::GuardedChild;

pub const ETCD_BIN: &str = "/usr/bin/etcd";
const START_TIMEOUT: Duration = Duration::from_secs(15);

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<GuardedChild>,
}

/// A running etcd cluster; dropped, it kills its members.
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    token: String,
}

impl Etcd {
    /// Starts `n` members (1 or 3) and waits until every one answers its health endpoint.
    pub fn start(n: usize) -> Result<Etcd> {
        super::programs::require_program(ETCD_BIN, "etcd-server");
        let dir = tempfile::Builder::new()
            .prefix("legate-etcd-")
            .tempdir()
            .context("creating etcd temp dir")?;
        let token = format!("legate-test-{}-{}", std::process::id(), free_local_port());
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_local_port(),
                peer_port: free_local_port(),
                child: None,
            })
            .collect();
        let mut e = Etcd {
            members,
            dir,
            token,
        };
        for i in 0..n {
            e.spawn(i, "new")?;
        }
        e.wait_healthy((0..n).collect())?;
        Ok(e)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<()> {
        let initial = self.initial_cluster();
        let data = self.data_dir(i);
        let log = self
            .dir
            .path()
            .join(format!("{}.log", self.members[i].name));
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(&initial)
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .arg("--log-level")
            .arg("warn")
            // etcd 3.4 on arm64 and others refuses to start without it; harmless on amd64.
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        let child = GuardedChild::spawn(&cmd, &log)?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, which: Vec<usize>) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        for i in which {
            let port = self.members[i].client_port;
            loop {
                if let Some(c) = self.members[i].child.as_mut() {
                    if let Some(status) = c.try_wait()? {
                        bail!(
                            "etcd member {} exited ({status}) at start:\n{}",
                            self.members[i].name,
                            self.log(i)
                        );
                    }
                }
                if health(port) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "etcd member {} not healthy after {START_TIMEOUT:?}:\n{}",
                        self.members[i].name,
                        self.log(i)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The log of member `i` (for failure messages).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default()
    }

    /// How many keys start with `prefix`, asked of member 0 through etcd's JSON gateway
    /// (`/v3/kv/range`, `count_only`): what the nodes wrote, seen from outside them.
    pub fn count_prefix(&self, prefix: &str) -> Result<u64> {
        use base64::Engine;
        use std::io::{Read, Write};
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        // range_end: the prefix with its last byte incremented (etcd's "with prefix").
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = format!(
            "{{\"key\":\"{}\",\"range_end\":\"{}\",\"count_only\":true}}",
            b64(prefix.as_bytes()),
            b64(&end)
        );
        let port = self.members[0].client_port;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "POST /v3/kv/range HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let json = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        // The gateway may answer in chunks; the JSON object is the one line that starts "{".
        let json = json.lines().find(|l| l.starts_with('{')).unwrap_or(json);
        let v: serde_json::Value =
            serde_json::from_str(json).with_context(|| format!("etcd range answer: {answer}"))?;
        // int64 fields come as strings in etcd's JSON; an absent count is 0.
        Ok(v["count"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .or_else(|| v["count"].as_u64())
            .unwrap_or(0))
    }

    /// Client URLs of every member, as `cluster.etcd_endpoints` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The endpoints as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Kills member `i` (SIGKILL, by PID).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            c.kill();
        }
    }

    /// Starts member `i` again on its data directory and waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.stop(i);
        self.spawn(i, "existing")?;
        self.wait_healthy(vec![i])
    }
}

/// True when the member's `/health` says so (it needs a leader, so this also waits for quorum).
fn health(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
