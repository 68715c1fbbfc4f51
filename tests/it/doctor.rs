//! `legate doctor DOMAIN` end to end: the real binary as a subprocess, against partners set up
//! on loopback — a TLS SIP edge played by this test (answers OPTIONS with 200), a real Prosody
//! for XMPP, a loopback dnsmasq for `[dns] nameservers`, certificates from the test CA. Each
//! broken partner must make the doctor name the failing step and its fix (exit 1); a healthy
//! SIP edge and a healthy Prosody must pass (exit 0).
//!
//! Addresses: 127.0.7.0/24, used by no other test. Needs `/usr/bin/prosody` and
//! `/usr/sbin/dnsmasq` (`apt-get install prosody dnsmasq-base`).

use crate::common;

use anyhow::{anyhow, Context, Result};
use common::certs::{CertFactory, Eku, Leaf, LeafSpec};
use common::dnsmasq::{DnsRecord, Dnsmasq};
use common::ports;
use common::prosody::{CertPaths, Prosody, ProsodyConfig};
use legate::tls::{ServerTls, TlsSettings};
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const LOCAL: &str = "example.test";
const SIP_DOMAIN: &str = "lync.test";
const XMPP_DOMAIN: &str = "xmpp.test";

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 7, n)
}

/// Our side: a certificate for example.test and the configuration the doctor reads.
struct Ours {
    certs: CertFactory,
    dir: tempfile::TempDir,
}

impl Ours {
    fn new() -> Self {
        Ours {
            certs: CertFactory::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Writes the configuration: our domain and certificate, the test CA as trust bundle,
    /// `dns` as the only nameserver, `lync.test` as SIP partner (with `sip_extra` lines) and
    /// `xmpp.test` allowed over XMPP.
    fn config(&self, dns: SocketAddr, sip_extra: &str) -> PathBuf {
        self.config_with(dns, sip_extra, "")
    }

    /// [`Ours::config`] with extra `[xmpp.federation]` lines.
    fn config_with(&self, dns: SocketAddr, sip_extra: &str, federation_extra: &str) -> PathBuf {
        let ours = self.certs.leaf("example.test", &[LOCAL]);
        let text = format!(
            r#"[[local_domain]]
name = "{LOCAL}"
cert = "{}"
key = "{}"

[tls]
trust_bundle = "{}"

[dns]
nameservers = ["{dns}"]

[[sip.federated_domain]]
name = "{SIP_DOMAIN}"
system = "lync"
{sip_extra}

[xmpp.federation]
mode = "allow_list"
{federation_extra}

[[xmpp.federation.domain]]
name = "{XMPP_DOMAIN}"
"#,
            ours.cert.display(),
            ours.key.display(),
            self.certs.ca_path().display(),
        );
        let path = self.dir.path().join("legate.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// What one `legate doctor` run printed and returned.
struct Run {
    code: i32,
    json: Value,
}

impl Run {
    fn step(&self, name: &str) -> &Value {
        self.json["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["step"] == name))
            .unwrap_or(&Value::Null)
    }

    fn verdict(&self, name: &str) -> &str {
        self.step(name)["verdict"].as_str().unwrap_or("")
    }

    fn fix(&self, name: &str) -> String {
        self.step(name)["fix"].as_str().unwrap_or("").to_string()
    }

    fn summary(&self, name: &str) -> String {
        self.step(name)["summary"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Runs `legate doctor DOMAIN --config CONFIG --format json` (off the async runtime).
async fn doctor(config: &Path, domain: &str) -> Result<Run> {
    let (config, domain) = (config.to_path_buf(), domain.to_string());
    tokio::task::spawn_blocking(move || -> Result<Run> {
        let out = Command::new(env!("CARGO_BIN_EXE_legate"))
            .args([
                "doctor",
                &domain,
                "--format",
                "json",
                "--timeout",
                "20",
                "--config",
            ])
            .arg(&config)
            .output()
            .context("running legate doctor")?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let json: Value = serde_json::from_str(stdout.trim()).map_err(|e| {
            anyhow!(
                "doctor printed no JSON ({e}): stdout {stdout} stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(Run {
            code: out.status.code().unwrap_or(-1),
            json,
        })
    })
    .await?
}

/// The TLS SIP edge of `lync.test`: mutual TLS (our certificate requested and verified against
/// `trust`), every request answered with 200 OK and the request's dialog headers. Runs until
/// the runtime ends.
async fn sip_edge(ip: Ipv4Addr, leaf: &Leaf, trust: &Path) -> Result<SocketAddr> {
    let tls = ServerTls::new(&TlsSettings {
        default_cert: Some((leaf.cert.clone(), leaf.key.clone())),
        domain_certs: Vec::new(),
        trust_bundle: Some(trust.to_path_buf()),
        min_version: legate::config::TlsVersion::V1_2,
    })?;
    let listener = TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(mut s) = tls.accept(tcp, Duration::from_secs(5)).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&buf).to_string();
                let mut resp = String::from("SIP/2.0 200 OK\r\n");
                for l in req.lines() {
                    let name = l.split(':').next().unwrap_or("").to_ascii_lowercase();
                    if ["via", "from", "to", "call-id", "cseq"].contains(&name.as_str()) {
                        resp.push_str(l);
                        resp.push_str("\r\n");
                    }
                }
                resp.push_str(
                    "Allow: MESSAGE, OPTIONS, SUBSCRIBE, NOTIFY\r\nContent-Length: 0\r\n\r\n",
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.flush().await;
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut chunk)).await;
            });
        }
    });
    Ok(addr)
}

/// DNS for `lync.test`: `_sipfederationtls._tcp` SRV to `edge.lync.test:port`.
fn sip_dns(edge_ip: Ipv4Addr, port: u16) -> Result<Dnsmasq> {
    Dnsmasq::start(&[
        DnsRecord::a("edge.lync.test", edge_ip),
        DnsRecord::srv("_sipfederationtls._tcp.lync.test", "edge.lync.test", port),
    ])
}

/// A SIP partner whose edge presents `spec` (and trusts `trust`, default our CA); the doctor's
/// report for it.
async fn sip_case(n: u8, spec: LeafSpec, other_ca: bool) -> Result<Run> {
    let ours = Ours::new();
    let other = CertFactory::with_ca_name("Someone Else's CA");
    let theirs = ours.certs.leaf_with("lync", spec);
    let trust = if other_ca {
        other.ca_path()
    } else {
        ours.certs.ca_path()
    };
    let addr = sip_edge(ip(n), &theirs, trust).await?;
    let dns = sip_dns(ip(n), addr.port())?;
    let cfg = ours.config(dns.addr(), "");
    let run = doctor(&cfg, SIP_DOMAIN).await?;
    // The same run as text: the exit code does not depend on the format.
    let text_cfg = cfg.clone();
    let text = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_legate"))
            .args(["doctor", SIP_DOMAIN, "--timeout", "20", "--config"])
            .arg(&text_cfg)
            .output()
    })
    .await??;
    println!("{}", String::from_utf8_lossy(&text.stdout));
    assert_eq!(text.status.code(), Some(run.code));
    Ok(run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_sip_partner_passes() -> Result<()> {
    let run = sip_case(2, LeafSpec::new(&[SIP_DOMAIN]), false).await?;
    assert_eq!(run.code, 0, "{:#}", run.json);
    assert_eq!(run.json["passed"], true);
    assert_eq!(run.json["protocol"], "sip");
    for s in ["policy", "dns", "tcp", "tls", "protocol"] {
        assert_eq!(run.verdict(s), "ok", "{s}: {:#}", run.json);
    }
    assert!(
        run.summary("protocol").contains("SIP/2.0 200 OK"),
        "{:#}",
        run.json
    );
    assert!(run.summary("tls").contains("TLS"), "{:#}", run.json);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate_name_fails_at_tls() -> Result<()> {
    let run = sip_case(3, LeafSpec::new(&["other.test"]), false).await?;
    assert_eq!(run.code, 1, "{:#}", run.json);
    assert_eq!(run.json["failed_step"], "tls", "{:#}", run.json);
    assert!(
        run.summary("tls").contains("does not name lync.test"),
        "{:#}",
        run.json
    );
    assert!(run.summary("tls").contains("other.test"), "{:#}", run.json);
    assert!(run.fix("tls").contains("subjectAltName"), "{:#}", run.json);
    assert_eq!(run.verdict("protocol"), "skipped");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_fails_at_tls() -> Result<()> {
    let run = sip_case(4, LeafSpec::new(&[SIP_DOMAIN]).expired(), false).await?;
    assert_eq!(run.code, 1, "{:#}", run.json);
    assert_eq!(run.json["failed_step"], "tls", "{:#}", run.json);
    assert!(run.summary("tls").contains("expired"), "{:#}", run.json);
    assert!(run.fix("tls").contains("renew"), "{:#}", run.json);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_without_client_auth_fails_at_tls() -> Result<()> {
    let run = sip_case(5, LeafSpec::new(&[SIP_DOMAIN]).eku(Eku::ServerOnly), false).await?;
    assert_eq!(run.code, 1, "{:#}", run.json);
    assert_eq!(run.json["failed_step"], "tls", "{:#}", run.json);
    assert!(run.summary("tls").contains("clientAuth"), "{:#}", run.json);
    assert!(
        run.fix("tls").contains("tolerate_no_client_auth_eku"),
        "{:#}",
        run.json
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_refusing_our_certificate_fails_at_protocol() -> Result<()> {
    let run = sip_case(6, LeafSpec::new(&[SIP_DOMAIN]), true).await?;
    assert_eq!(run.code, 1, "{:#}", run.json);
    assert_eq!(run.verdict("tls"), "ok", "{:#}", run.json);
    assert_eq!(run.json["failed_step"], "protocol", "{:#}", run.json);
    assert!(
        run.fix("protocol").contains("refused our certificate"),
        "{:#}",
        run.json
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_srv_record_fails_at_dns() -> Result<()> {
    let ours = Ours::new();
    let dns = Dnsmasq::start(&[DnsRecord::a("unrelated.test", ip(7))])?;
    let cfg = ours.config(dns.addr(), "");
    let run = doctor(&cfg, SIP_DOMAIN).await?;
    assert_eq!(run.code, 1, "{:#}", run.json);
    assert_eq!(run.json["failed_step"], "dns", "{:#}", run.json);
    assert!(
        run.fix("dns").contains("_sipfederationtls._tcp.lync.test"),
        "{:#}",
        run.json
    );
    for s in ["tcp", "tls", "protocol"] {
        assert_eq!(run.verdict(s), "skipped", "{s}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_fails_at_tcp() -> Result<()> {
    let ours = Ours::new();
    let port = ports::free_port(IpAddr::V4(ip(8)));
    let dns = sip_dns(ip(8), port)?;
    let cfg = ours.config(dns.addr(), "");
    let run = doctor(&cfg, SIP_DOMAIN).await?;
    assert_eq!(run.code, 1, "{:#}", run.json);
    assert_eq!(run.json["failed_step"], "tcp", "{:#}", run.json);
    assert!(
        run.summary("tcp").contains(&format!("127.0.7.8:{port}")),
        "{:#}",
        run.json
    );
    assert!(run.fix("tcp").contains("firewall"), "{:#}", run.json);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_route_is_used_before_dns() -> Result<()> {
    let ours = Ours::new();
    let theirs = ours.certs.leaf("lync", &[SIP_DOMAIN]);
    let addr = sip_edge(ip(9), &theirs, ours.certs.ca_path()).await?;
    // No record at all: only the route can find the edge.
    let dns = Dnsmasq::start(&[DnsRecord::a("unrelated.test", ip(9))])?;
    let cfg = ours.config(dns.addr(), &format!("route = \"{addr}\""));
    let run = doctor(&cfg, SIP_DOMAIN).await?;
    assert_eq!(run.code, 0, "{:#}", run.json);
    let dns_details = run.step("dns")["details"].to_string();
    assert!(dns_details.contains("static route"), "{:#}", run.json);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_map_is_consulted_before_dns() -> Result<()> {
    let ours = Ours::new();
    let theirs = ours.certs.leaf("lync", &[SIP_DOMAIN]);
    let addr = sip_edge(ip(15), &theirs, ours.certs.ca_path()).await?;
    // The SRV target has no A record: only the address map knows where it is.
    let dns = Dnsmasq::start(&[DnsRecord::srv(
        "_sipfederationtls._tcp.lync.test",
        "edge.lync.test",
        addr.port(),
    )])?;
    let cfg = ours.config(dns.addr(), "");
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str(&format!(
        "\n[cluster.address_map]\n\"edge.lync.test\" = \"{}\"\n",
        ip(15)
    ));
    std::fs::write(&cfg, text)?;
    let run = doctor(&cfg, SIP_DOMAIN).await?;
    assert_eq!(run.code, 0, "{:#}", run.json);
    let details = run.step("dns")["details"].to_string();
    assert!(
        details.contains("address map: edge.lync.test -> 127.0.7.15"),
        "{:#}",
        run.json
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_not_allowed_by_our_policy_fails_at_policy() -> Result<()> {
    let ours = Ours::new();
    let dns = Dnsmasq::start(&[DnsRecord::a("unrelated.test", ip(10))])?;
    let cfg = ours.config(dns.addr(), "");
    let run = doctor(&cfg, "stranger.test").await?;
    assert_eq!(run.code, 1, "{:#}", run.json);
    assert_eq!(run.json["failed_step"], "policy", "{:#}", run.json);
    assert!(
        run.summary("policy").contains("allow list"),
        "{:#}",
        run.json
    );
    assert!(
        run.fix("policy").contains("[[xmpp.federation.domain]]"),
        "{:#}",
        run.json
    );
    assert_eq!(run.verdict("dns"), "skipped");
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Partner {
    /// Trusts our CA, certificates only (SASL EXTERNAL).
    TrustsUs,
    /// Does not trust our CA and has no dialback either.
    NoWay,
    /// Does not trust our CA, dialback loaded; our s2s listener (which dialback calls back)
    /// is not reachable.
    DialbackOnly,
}

/// A Prosody serving `xmpp.test` on `ip(n)` with its certificate, as `kind` says.
fn xmpp_partner(ours: &Ours, n: u8, kind: Partner) -> Result<(Prosody, Dnsmasq)> {
    let theirs = ours.certs.leaf("xmpp", &[XMPP_DOMAIN]);
    let mut pc = ProsodyConfig::new(ip(n)).host(XMPP_DOMAIN).host_cert(
        XMPP_DOMAIN,
        CertPaths {
            cert: theirs.cert.clone(),
            key: theirs.key.clone(),
        },
    );
    match kind {
        Partner::TrustsUs => pc = pc.secure_s2s(ours.certs.ca_path()),
        Partner::NoWay => {
            pc.dialback = false;
            pc.s2s_require_encryption = true;
        }
        Partner::DialbackOnly => pc.s2s_require_encryption = true,
    }
    // Our own domain points at a port where nothing listens: a dialback check-back fails.
    let ours_port = ports::free_port(IpAddr::V4(ip(1)));
    let dns = Dnsmasq::start(&[
        DnsRecord::a(XMPP_DOMAIN, ip(n)),
        DnsRecord::a(LOCAL, ip(1)),
        DnsRecord::xmpp_server(XMPP_DOMAIN, XMPP_DOMAIN, pc.s2s_port),
        DnsRecord::xmpp_server(LOCAL, LOCAL, ours_port),
    ])?;
    let prosody = Prosody::start(pc.dns(dns.unbound_forward()))?;
    Ok((prosody, dns))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_prosody_passes_with_sasl_external() -> Result<()> {
    let ours = Ours::new();
    let (prosody, dns) = xmpp_partner(&ours, 11, Partner::TrustsUs)?;
    let cfg = ours.config(dns.addr(), "");
    let run = doctor(&cfg, XMPP_DOMAIN).await?;
    assert_eq!(run.code, 0, "{:#}\n{}", run.json, prosody.log());
    assert_eq!(run.json["protocol"], "xmpp");
    assert!(
        run.summary("protocol").contains("SASL EXTERNAL"),
        "{:#}",
        run.json
    );
    let tls_details = run.step("tls")["details"].to_string();
    assert!(tls_details.contains("STARTTLS"), "{:#}", run.json);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_prosody_passes() -> Result<()> {
    let ours = Ours::new();
    let theirs = ours.certs.leaf("xmpp", &[XMPP_DOMAIN]);
    let direct_port = ports::free_port(IpAddr::V4(ip(16)));
    let mut pc = ProsodyConfig::new(ip(16))
        .host(XMPP_DOMAIN)
        .host_cert(
            XMPP_DOMAIN,
            CertPaths {
                cert: theirs.cert.clone(),
                key: theirs.key.clone(),
            },
        )
        .secure_s2s(ours.certs.ca_path());
    pc.extra_global_lua = format!(
        "s2s_direct_tls_ports = {{ {direct_port} }}\n\
         s2s_direct_tls_ssl = {{ certificate = {}; key = {}; }}",
        common::prosody::lua_str(&theirs.cert.to_string_lossy()),
        common::prosody::lua_str(&theirs.key.to_string_lossy()),
    );
    // Only the XEP-0368 record: the doctor must use direct TLS.
    let dns = Dnsmasq::start(&[
        DnsRecord::a(XMPP_DOMAIN, ip(16)),
        DnsRecord::srv("_xmpps-server._tcp.xmpp.test", XMPP_DOMAIN, direct_port),
    ])?;
    let prosody = Prosody::start(pc.dns(dns.unbound_forward()))?;
    let cfg = ours.config(dns.addr(), "");
    let run = doctor(&cfg, XMPP_DOMAIN).await?;
    assert_eq!(run.code, 0, "{:#}\n{}", run.json, prosody.log());
    let tls_details = run.step("tls")["details"].to_string();
    assert!(tls_details.contains("direct TLS"), "{:#}", run.json);
    assert!(
        run.summary("protocol").contains("SASL EXTERNAL"),
        "{:#}",
        run.json
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_without_dialback_or_trust_fails_at_protocol() -> Result<()> {
    let ours = Ours::new();
    let (prosody, dns) = xmpp_partner(&ours, 12, Partner::NoWay)?;
    let cfg = ours.config(dns.addr(), "");
    let run = doctor(&cfg, XMPP_DOMAIN).await?;
    assert_eq!(run.code, 1, "{:#}\n{}", run.json, prosody.log());
    assert_eq!(run.json["failed_step"], "protocol", "{:#}", run.json);
    assert!(
        run.summary("protocol")
            .contains("no way to authenticate us"),
        "{:#}",
        run.json
    );
    let fix = run.fix("protocol");
    assert!(
        fix.contains("trust the CA") && fix.contains("dialback"),
        "{fix}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialback_refused_fails_at_protocol() -> Result<()> {
    let ours = Ours::new();
    let (prosody, dns) = xmpp_partner(&ours, 13, Partner::DialbackOnly)?;
    let cfg = ours.config_with(
        dns.addr(),
        "",
        "dialback_secret = \"doctor-test-secret-0123456789\"",
    );
    let run = doctor(&cfg, XMPP_DOMAIN).await?;
    assert_eq!(run.code, 1, "{:#}\n{}", run.json, prosody.log());
    assert_eq!(run.json["failed_step"], "protocol", "{:#}", run.json);
    assert!(
        run.summary("protocol").contains("dialback"),
        "{:#}",
        run.json
    );
    assert!(
        run.fix("protocol").contains("reach our s2s listener"),
        "{:#}",
        run.json
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialback_without_our_secret_is_a_warning() -> Result<()> {
    let ours = Ours::new();
    let (prosody, dns) = xmpp_partner(&ours, 14, Partner::DialbackOnly)?;
    let cfg = ours.config(dns.addr(), "");
    let run = doctor(&cfg, XMPP_DOMAIN).await?;
    assert_eq!(run.code, 0, "{:#}\n{}", run.json, prosody.log());
    assert_eq!(run.verdict("protocol"), "warn", "{:#}", run.json);
    assert!(run.fix("protocol").contains("dialback"), "{:#}", run.json);
    Ok(())
}

#[test]
fn text_output_and_usage_errors() -> Result<()> {
    let ours = Ours::new();
    // A nameserver that is never asked: the policy step fails first.
    let cfg = ours.config("127.0.0.1:9".parse()?, "");
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["doctor", "stranger.test", "--config"])
        .arg(&cfg)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("1. our policy     FAIL"), "{text}");
    assert!(text.contains("fix: add stranger.test"), "{text}");
    assert!(text.contains("2. DNS            SKIPPED"), "{text}");
    assert!(text.contains("result: FAIL at step policy"), "{text}");
    let bad = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["doctor", "not a domain", "--config"])
        .arg(&cfg)
        .output()?;
    assert_eq!(bad.status.code(), Some(2));
    let missing = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["doctor", "x.test", "--config", "/nonexistent/legate.toml"])
        .output()?;
    assert_eq!(missing.status.code(), Some(2));
    Ok(())
}
