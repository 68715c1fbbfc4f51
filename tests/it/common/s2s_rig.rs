//! The XMPP federation rig: the real `legate` binary between a foreign Prosody (`xmpp.test`,
//! user bob, SASL EXTERNAL with a certificate of the test CA) and a home Prosody
//! (`example.test`, user alice, the XEP-0114 component `xmpp.test` for Legate), both found
//! through a loopback dnsmasq. Tests choose the federation policy and extras of Legate's
//! configuration and of the home node, and the three loopback addresses, so they can run side
//! by side.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result};

use super::certs::CertFactory;
use super::dnsmasq::{DnsRecord, Dnsmasq};
use super::legate::Legate;
use super::ports;
use super::prosody::{CertPaths, Prosody, ProsodyConfig};
use super::xmpp_client::{ClientConfig, TlsOptions, XmppClient};

/// How long a rig test waits for one expected thing.
pub const WAIT: Duration = Duration::from_secs(15);
const SECRET: &str = "s2s-rig-component-secret-1";

/// What a test sets.
pub struct S2sRigSpec<'a> {
    /// Legate, the foreign Prosody and the home Prosody.
    pub ips: (Ipv4Addr, Ipv4Addr, Ipv4Addr),
    /// Names our s2s certificate and DNS cover besides `example.test` (chat-room aliases).
    pub extra_names: &'a [&'a str],
    /// `[xmpp.federation]` and what follows it, as TOML.
    pub federation: &'a str,
    /// More TOML sections (`[[chat_node]]`, `[limits]`...).
    pub extra: &'a str,
    /// Adjusts the home Prosody (a MUC service...).
    pub home: fn(ProsodyConfig) -> ProsodyConfig,
}

pub struct S2sRig {
    pub certs: CertFactory,
    pub legate: Legate,
    pub home: Prosody,
    pub foreign: Prosody,
    _dns: Dnsmasq,
    cfg: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl S2sRig {
    /// Starts dnsmasq, both Prosodys and `legate run`; returns once Legate is listening (the
    /// component links may still be connecting: see [`S2sRig::wait_component`]).
    pub async fn start(spec: S2sRigSpec<'_>) -> Result<S2sRig> {
        let (legate_ip, foreign_ip, home_ip) = spec.ips;
        let certs = CertFactory::new();
        let mut names = vec!["example.test"];
        names.extend_from_slice(spec.extra_names);
        let ours = certs.leaf("example.test", &names);
        let theirs = certs.leaf("xmpp.test", &["xmpp.test"]);
        let legate_port = ports::free_port(IpAddr::V4(legate_ip));
        let foreign_cfg = ProsodyConfig::new(foreign_ip)
            .host("xmpp.test")
            .user("xmpp.test", "bob", "pw")
            .host_cert(
                "xmpp.test",
                CertPaths {
                    cert: theirs.cert.clone(),
                    key: theirs.key.clone(),
                },
            )
            .secure_s2s(certs.ca_path());
        let mut records = vec![
            DnsRecord::a("xmpp.test", foreign_ip),
            DnsRecord::xmpp_server("xmpp.test", "xmpp.test", foreign_cfg.s2s_port),
        ];
        for n in &names {
            records.push(DnsRecord::a(n, legate_ip));
            records.push(DnsRecord::xmpp_server(n, n, legate_port));
        }
        let dns = Dnsmasq::start(&records)?;
        let home = Prosody::start((spec.home)(
            ProsodyConfig::new(home_ip)
                .host("example.test")
                .user("example.test", "alice", "pw")
                .component("xmpp.test", SECRET),
        ))?;
        let foreign = Prosody::start(foreign_cfg.dns(dns.unbound_forward()))?;

        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("legate.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"[node]
admin_listen = "127.0.0.1:0"
data_dir = "data"
[[local_domain]]
name = "example.test"
cert = "{cert}"
key = "{key}"
[listeners]
sip_tls = "127.0.0.1:0"
sip_tcp = "off"
xmpp_s2s = "{legate_ip}:{legate_port}"
xmpp_s2s_direct_tls = "off"
[tls]
trust_bundle = "{ca}"
[[sip.federated_domain]]
name = "partner.test"
system = "lync"
route = "127.0.0.1:9"
[[home_node]]
name = "hn1"
addresses = ["{home_addr}"]
component_secret = "{SECRET}"
default_system = "xmpp"
[dns]
nameservers = ["{dns_addr}"]
{federation}
{extra}
"#,
                cert = ours.cert.display(),
                key = ours.key.display(),
                ca = certs.ca_path().display(),
                home_addr = home.component_addr(),
                dns_addr = dns.addr(),
                federation = spec.federation,
                extra = spec.extra,
            ),
        )?;
        let legate = Legate::start(&cfg, &["xmpp_s2s", "sip_tls", "admin"])?;
        Ok(S2sRig {
            certs,
            legate,
            home,
            foreign,
            _dns: dns,
            cfg,
            _dir: dir,
        })
    }

    /// `kill -9`, then `legate run` again on the same configuration and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.legate.kill();
        self.legate = Legate::start(&self.cfg, &["xmpp_s2s", "sip_tls", "admin"])?;
        Ok(())
    }

    /// Waits until the home node's `xmpp.test` component link is up.
    pub async fn wait_component(&self) -> Result<()> {
        self.legate
            .wait_output("the xmpp.test component link", WAIT, |t| {
                t.contains("component xmpp.test connected to home node hn1")
            })
            .await
    }

    /// alice, logged in on the home node, available.
    pub async fn alice(&self) -> Result<XmppClient> {
        let mut a = XmppClient::connect(ClientConfig::plain(
            self.home.c2s_addr(),
            "example.test",
            "alice",
            "pw",
        ))
        .await?;
        a.send_presence(None, None).await?;
        Ok(a)
    }

    /// bob, logged in on the foreign server over TLS, available.
    pub async fn bob(&self) -> Result<XmppClient> {
        let mut cc = ClientConfig::plain(self.foreign.c2s_addr(), "xmpp.test", "bob", "pw");
        cc.tls = Some(TlsOptions {
            ca_pem: self.certs.ca_pem().as_bytes().to_vec(),
            server_name: "xmpp.test".into(),
        });
        let mut b = XmppClient::connect(cc).await.context("bob logs in")?;
        b.send_presence(None, None).await?;
        Ok(b)
    }

    /// Legate's and the home node's logs, for a failing assertion.
    pub fn why(&self, what: &str) -> String {
        format!(
            "{what}\n--- legate ---\n{}\n--- home prosody ---\n{}",
            self.legate.output(),
            self.home.log()
        )
    }
}
