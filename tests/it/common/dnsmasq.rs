//! A throw-away authoritative DNS server for the `test.` zone, for peers that resolve through DNS
//! (Prosody 0.12 uses libunbound and ignores /etc/hosts).
//!
//! Runs Debian's `dnsmasq` in the foreground on 127.0.0.1 and a free port, answering only from its
//! command line: `--no-resolv --no-hosts`, and `--local=/test/` so names in `test.` that have no
//! record get NXDOMAIN/NODATA at once instead of a REFUSED (which unbound turns into SERVFAIL).
//! Its log (with `--log-queries`) goes to a file in its temp dir; [`Dnsmasq::log`] reads it.
//! The process is killed on drop.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::ports;
use super::prosody::GuardedChild;

pub const DNSMASQ_BIN: &str = "/usr/sbin/dnsmasq";
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// One record dnsmasq serves.
#[derive(Debug, Clone)]
pub enum DnsRecord {
    /// `name A ip` (`--host-record`).
    A { name: String, ip: Ipv4Addr },
    /// `owner SRV priority weight port target` (`--srv-host`); `owner` is the full name,
    /// e.g. `_xmpp-server._tcp.xmpp.test`.
    Srv {
        owner: String,
        target: String,
        port: u16,
        priority: u16,
        weight: u16,
    },
    /// Raw `--naptr-record=` value: `name,order,preference,flags,service,regexp[,replacement]`.
    Naptr(String),
    /// One dnsmasq option as written on its command line, e.g. `--txt-record=...` (the
    /// resolver tests in `dns.rs` write their zones this way).
    Raw(String),
}

impl DnsRecord {
    pub fn a(name: &str, ip: Ipv4Addr) -> Self {
        DnsRecord::A {
            name: name.to_owned(),
            ip,
        }
    }

    pub fn srv(owner: &str, target: &str, port: u16) -> Self {
        DnsRecord::Srv {
            owner: owner.to_owned(),
            target: target.to_owned(),
            port,
            priority: 0,
            weight: 5,
        }
    }

    /// `_xmpp-server._tcp.<domain>` SRV → `target:port`.
    pub fn xmpp_server(domain: &str, target: &str, port: u16) -> Self {
        Self::srv(&format!("_xmpp-server._tcp.{domain}"), target, port)
    }

    fn to_arg(&self) -> String {
        match self {
            DnsRecord::A { name, ip } => format!("--host-record={name},{ip}"),
            DnsRecord::Srv {
                owner,
                target,
                port,
                priority,
                weight,
            } => format!("--srv-host={owner},{target},{port},{priority},{weight}"),
            DnsRecord::Naptr(v) => format!("--naptr-record={v}"),
            DnsRecord::Raw(option) => option.clone(),
        }
    }
}

/// A running dnsmasq; killed on drop.
pub struct Dnsmasq {
    child: GuardedChild,
    port: u16,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq with `records` on 127.0.0.1 and a free port; waits (≤ 5 s) until it accepts
    /// TCP connections.
    pub fn start(records: &[DnsRecord]) -> Result<Dnsmasq> {
        super::programs::require_program(DNSMASQ_BIN, "dnsmasq-base");
        let mut last_err = None;
        // One retry in case the port was taken between the probe and dnsmasq's bind.
        for _ in 0..2 {
            match Self::try_start(records) {
                Ok(d) => return Ok(d),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn try_start(records: &[DnsRecord]) -> Result<Dnsmasq> {
        let dir = tempfile::Builder::new()
            .prefix("legate-dnsmasq-")
            .tempdir()
            .context("creating dnsmasq temp dir")?;
        let port = ports::free_local_port();
        let log_path = dir.path().join("dnsmasq.log");
        let mut cmd = Command::new(DNSMASQ_BIN);
        cmd.args([
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--local-ttl=60",
            "--keep-in-foreground",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--pid-file=",
            "--log-facility=-",
            "--log-queries",
            "--local=/test/",
        ])
        .arg(format!("--port={port}"));
        for r in records {
            cmd.arg(r.to_arg());
        }
        let child = GuardedChild::spawn(&cmd, &log_path)?;
        let mut d = Dnsmasq {
            child,
            port,
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = d.addr();
        loop {
            if let Some(status) = d.child.try_wait()? {
                bail!(
                    "dnsmasq exited during start-up ({status}); args: {:?}\nlog:\n{}",
                    records.iter().map(DnsRecord::to_arg).collect::<Vec<_>>(),
                    d.log()
                );
            }
            // Probe over UDP: a TCP probe makes dnsmasq fork a child that keeps the listening
            // socket open for a while.
            if d.query_with_timeout("probe.test", 1, Duration::from_millis(200))
                .is_ok()
            {
                return Ok(d);
            }
            if Instant::now() >= deadline {
                bail!(
                    "dnsmasq did not listen on {addr} within {START_TIMEOUT:?}\nlog:\n{}",
                    d.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// One DNS query over UDP (`qtype`: 1 = A, 33 = SRV, 35 = NAPTR, ...), answered within 2 s.
    /// Returns (rcode, answer count).
    pub fn query(&self, name: &str, qtype: u16) -> Result<(u8, u16)> {
        self.query_with_timeout(name, qtype, Duration::from_secs(2))
    }

    fn query_with_timeout(&self, name: &str, qtype: u16, wait: Duration) -> Result<(u8, u16)> {
        let mut q = vec![0x4c, 0x47, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.trim_end_matches('.').split('.') {
            let len = u8::try_from(label.len()).context("label too long")?;
            q.push(len);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("udp bind")?;
        sock.set_read_timeout(Some(wait)).context("udp timeout")?;
        sock.send_to(&q, self.addr()).context("sending DNS query")?;
        let mut buf = [0u8; 1500];
        let n = sock.recv(&mut buf).context("no DNS answer")?;
        if n < 12 || buf[..2] != q[..2] {
            bail!("malformed DNS answer ({n} bytes)");
        }
        Ok((buf[3] & 0x0f, u16::from_be_bytes([buf[6], buf[7]])))
    }

    /// The forwarder spec libunbound wants: `127.0.0.1@port`.
    pub fn unbound_forward(&self) -> String {
        format!("127.0.0.1@{}", self.port)
    }

    /// dnsmasq's log so far (start-up lines and every query).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// The command line records as text, for diagnostics.
    pub fn describe(records: &[DnsRecord]) -> String {
        let mut s = String::new();
        for r in records {
            let _ = writeln!(s, "{}", r.to_arg());
        }
        s
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.child.kill();
        if std::thread::panicking() {
            eprintln!("--- dnsmasq on port {} ---\n{}", self.port, self.log());
        }
    }
}
