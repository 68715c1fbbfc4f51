//! Configuration loading as an admin meets it: whole files in, `file:line:col` diagnostics out.
//!
//! `tests/data/config/bad/*.toml` holds one broken file per kind of mistake. Each starts with
//! `# expect: LINE:COL: substring` lines; the test requires the loader to report *exactly* that
//! many diagnostics, each at that position and containing that text, so a check that drifts to
//! the wrong line, or a mistake reported twice, fails. The other tests cover the embedded
//! default, the commented example file, SIP/XMPP overlap and exact domain matching.

use std::path::{Path, PathBuf};

use legate::config::{
    self, Config, Domain, FederationMode, HomeEndpoint, PresenceFormat, S2sAuth, Secret, Store,
    TlsPolicy, BUILTIN_SYSTEMS,
};
use legate::diag::Diagnostics;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/config")
        .join(name)
}

fn parse(src: &str) -> Result<Config, Diagnostics> {
    config::from_toml(src, Path::new("t.toml"), BUILTIN_SYSTEMS)
}

fn errors(src: &str) -> Vec<(usize, usize, String)> {
    match parse(src) {
        Ok(_) => panic!("expected errors, the config loaded:\n{src}"),
        Err(d) => {
            d.0.into_iter()
                .map(|d| (d.line, d.col, d.message))
                .collect()
        }
    }
}

fn dom(s: &str) -> Domain {
    match Domain::parse(s) {
        Ok(d) => d,
        Err(e) => panic!("{s}: {e}"),
    }
}

struct Expect {
    line: usize,
    col: usize,
    text: String,
}

fn expectations(src: &str) -> Vec<Expect> {
    src.lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|rest| {
            let mut it = rest.splitn(3, ':');
            let line = it.next().and_then(|s| s.trim().parse().ok());
            let col = it.next().and_then(|s| s.trim().parse().ok());
            let text = it.next().map(|s| s.trim().to_string());
            match (line, col, text) {
                (Some(line), Some(col), Some(text)) => Expect { line, col, text },
                _ => panic!("malformed expectation: {rest}"),
            }
        })
        .collect()
}

#[test]
fn every_broken_file_reports_exactly_its_expected_diagnostics() {
    let dir = data("bad");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    assert!(
        files.len() >= 15,
        "bad configs missing in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for path in &files {
        let src = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let want = expectations(&src);
        assert!(!want.is_empty(), "{} has no # expect line", path.display());
        let got = match config::load_file(path, BUILTIN_SYSTEMS) {
            Ok(_) => {
                failures.push(format!("{}: loaded without error", path.display()));
                continue;
            }
            Err(d) => d.0,
        };
        // Several expectations may describe the same diagnostic (two substrings of one message).
        let mut matched = vec![false; got.len()];
        let before = failures.len();
        for w in &want {
            let hit = got
                .iter()
                .position(|d| d.line == w.line && d.col == w.col && d.message.contains(&w.text));
            match hit {
                Some(i) => matched[i] = true,
                None => failures.push(format!(
                    "{}: expected {}:{}: {}",
                    path.display(),
                    w.line,
                    w.col,
                    w.text
                )),
            }
        }
        for (d, m) in got.iter().zip(&matched) {
            if !m {
                failures.push(format!("{}: unexpected diagnostic: {d}", path.display()));
            }
        }
        if failures.len() > before {
            failures.push(format!(
                "  all diagnostics:\n    {}",
                Diagnostics(got.clone()).to_string().replace('\n', "\n    ")
            ));
        }
        // The rendered form is what the CLI prints: it must start with the file name.
        for d in &got {
            assert!(d.to_string().starts_with(&path.display().to_string()));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn embedded_default_is_valid_and_local_only() {
    let cfg = config::embedded_default();
    assert_eq!(cfg.local_domains.len(), 1);
    assert_eq!(cfg.local_domains[0].name, dom("example.com"));
    for addr in [cfg.listeners.sip_tls, cfg.listeners.xmpp_s2s]
        .into_iter()
        .flatten()
        .chain([cfg.node.admin_listen])
    {
        assert!(addr.ip().is_loopback(), "{addr} is not loopback");
    }
    assert_eq!(cfg.listeners.sip_tcp, None);
    assert!(cfg.sip.federated_domains.is_empty());
    assert!(cfg.xmpp.federation.domains.is_empty());
    assert_eq!(cfg.xmpp.federation.mode, FederationMode::AllowList);
    assert_eq!(cfg.cluster.store, Store::Memory);
    // Same text, same result: the constant is the single source.
    assert_eq!(parse(config::DEFAULT_TOML), Ok(cfg));
}

#[test]
fn near_empty_file_gets_every_default() {
    let cfg = match parse("[[local_domain]]\nname = \"example.com\"\n") {
        Ok(c) => c,
        Err(d) => panic!("{d}"),
    };
    assert_eq!(cfg.node.id.as_str(), "local");
    assert_eq!(cfg.node.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(
        cfg.listeners.sip_tls.map(|a| a.to_string()),
        Some("0.0.0.0:5061".into())
    );
    assert_eq!(
        cfg.listeners.xmpp_s2s.map(|a| a.to_string()),
        Some("0.0.0.0:5269".into())
    );
    assert_eq!(cfg.listeners.sip_tcp, None);
    assert_eq!(cfg.listeners.xmpp_s2s_direct_tls, None);
    let l = &cfg.limits;
    assert_eq!(
        (
            l.sip_max_message_bytes,
            l.sip_max_header_bytes,
            l.xmpp_max_stanza_bytes,
            l.max_connections_per_listener,
            l.max_connections_per_peer,
        ),
        (65_536, 16_384, 262_144, 10_000, 64)
    );
    assert_eq!(
        (
            l.handshake_timeout_secs,
            l.idle_timeout_secs,
            l.im_session_idle_secs,
            l.max_subscriptions_per_user,
            l.outbound_queue_per_domain,
        ),
        (10, 600, 600, 1_000, 1_000)
    );
    assert_eq!(l.delivery_timeout_secs, 30);
    assert_eq!(cfg.intercluster.sync_interval_mins, 30);
    assert_eq!(cfg.intercluster.stuck_after_secs, 7_200);
    assert!(cfg.intercluster.auto_recovery);
    assert!(cfg.mappings.reload && cfg.mappings.dir.is_none());
    // No home node is legal but worth a note.
    assert!(cfg.notes().iter().any(|n| n.contains("home_node")));
}

#[test]
fn example_file_loads_cleanly_with_every_section() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("legate.example.toml");
    let cfg = match config::load_file(&path, BUILTIN_SYSTEMS) {
        Ok(c) => c,
        Err(d) => panic!("legate.example.toml does not load:\n{d}"),
    };
    // The example shows every section, including those a node does not act on yet: those,
    // and only those, are noted.
    let notes = cfg.notes();
    assert_eq!(notes.len(), 2, "notes: {notes:?}");
    assert!(notes
        .iter()
        .any(|n| n.starts_with("[cluster] is in effect")));
    assert!(notes
        .iter()
        .any(|n| n.starts_with("[intercluster]: user sync")));
    // Every optional section is present in the example, so each list has something in it.
    assert!(cfg.local_domains.len() >= 2);
    assert!(!cfg.sip.federated_domains.is_empty());
    assert!(!cfg.xmpp.federation.domains.is_empty());
    assert!(cfg.home_nodes.len() >= 2);
    assert!(cfg.routing_node.is_some());
    assert!(!cfg.chat_nodes.is_empty());
    assert!(!cfg.cluster.peers.is_empty() && cfg.cluster.name.is_some());
    assert!(!cfg.cluster.address_map.is_empty());
    assert!(!cfg.intercluster.peers.is_empty());
    assert!(cfg.mappings.dir.is_some());
}

#[test]
fn every_key_of_the_example_is_documented_by_a_comment() {
    // A key line must follow a comment line (or a key documented just above in the same
    // block), so no setting appears in the example without an explanation.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("legate.example.toml");
    let src = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) => panic!("{}: {e}", path.display()),
    };
    let mut prev_comment_or_key = false;
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        let is_key = !t.is_empty() && !t.starts_with('#') && !t.starts_with('[') && t.contains('=');
        if is_key && !prev_comment_or_key {
            panic!(
                "legate.example.toml:{}: `{t}` has no comment above it",
                i + 1
            );
        }
        prev_comment_or_key = t.starts_with('#') || (is_key && prev_comment_or_key);
    }
}

#[test]
fn the_example_shows_every_key_of_the_schema() {
    // Keep in step with src/config/schema.rs: a key missing from the example is undocumented.
    const KEYS: &[&str] = &[
        "routing_node",
        "[node]",
        "id",
        "data_dir",
        "admin_listen",
        "admin_allow_remote",
        "admin_token_file",
        "sip_host",
        "[[local_domain]]",
        "cert",
        "key",
        "[listeners]",
        "sip_tls",
        "sip_tcp",
        "xmpp_s2s",
        "xmpp_s2s_direct_tls",
        "[tls]",
        "trust_bundle",
        "min_version",
        "[[sip.federated_domain]]",
        "system",
        "route",
        "tolerate_no_client_auth_eku",
        "presence_format",
        "[xmpp.federation]",
        "mode",
        "dialback_secret",
        "[[xmpp.federation.domain]]",
        "tls",
        "auth",
        "deny",
        "[[home_node]]",
        "addresses",
        "srv",
        "component_secret",
        "component_secret_file",
        "users",
        "default_system",
        "connect_from_every_node",
        "[[chat_node]]",
        "alias",
        "home_node",
        "[limits]",
        "sip_max_message_bytes",
        "sip_max_header_bytes",
        "xmpp_max_stanza_bytes",
        "max_connections_per_listener",
        "max_connections_per_peer",
        "handshake_timeout_secs",
        "idle_timeout_secs",
        "im_session_idle_secs",
        "max_subscriptions_per_user",
        "outbound_queue_per_domain",
        "delivery_timeout_secs",
        "home_link_alarm_grace_secs",
        "drain_grace_secs",
        "[cluster]",
        "name",
        "primary",
        "tls_verify",
        "store",
        "etcd_endpoints",
        "lease_ttl_secs",
        "[[cluster.peers]]",
        "address",
        "federation",
        "[cluster.address_map]",
        "[intercluster]",
        "name",
        "listen",
        "transport",
        "sync_interval_mins",
        "stuck_after_secs",
        "auto_recovery",
        "[[intercluster.peer]]",
        "[mappings]",
        "dir",
        "reload",
    ];
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("legate.example.toml");
    let src = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) => panic!("{}: {e}", path.display()),
    };
    let lines: Vec<&str> = src.lines().map(str::trim).collect();
    for k in KEYS {
        let present = if k.starts_with('[') {
            lines.contains(k)
        } else {
            lines.iter().any(|l| l.starts_with(&format!("{k} =")))
        };
        assert!(present, "legate.example.toml does not show `{k}`");
    }
}

#[test]
fn sip_and_xmpp_overlap_is_refused_naming_both_lines() {
    let src = r#"[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
[[xmpp.federation.domain]]
name = "PARTNER.com."
"#;
    let errs = errors(src);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let (line, col, msg) = &errs[0];
    assert_eq!((*line, *col), (6, 8));
    assert!(msg.contains("line 4") && msg.contains("line 6"), "{msg}");
    assert!(msg.contains("SIP or XMPP, never both"), "{msg}");
}

#[test]
fn a_denied_xmpp_entry_for_a_sip_domain_is_not_an_overlap() {
    let src = r#"[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
[xmpp.federation]
mode = "deny_list"
[[xmpp.federation.domain]]
name = "partner.com"
deny = true
"#;
    assert!(parse(src).is_ok());
}

#[test]
fn subdomains_are_distinct_domains_never_suffix_matched() {
    // imp.example.com is ours, example.com is a partner's: legal, and each looks up exactly.
    let src = r#"[[local_domain]]
name = "imp.example.com"
[[sip.federated_domain]]
name = "example.com"
[[xmpp.federation.domain]]
name = "foreign.example.com"
"#;
    let cfg = match parse(src) {
        Ok(c) => c,
        Err(d) => panic!("{d}"),
    };
    assert!(cfg.is_local_domain(&dom("imp.example.com")));
    assert!(!cfg.is_local_domain(&dom("example.com")));
    assert!(!cfg.is_local_domain(&dom("x.imp.example.com")));
    assert!(cfg.sip_federated(&dom("example.com")).is_some());
    assert!(cfg.sip_federated(&dom("imp.example.com")).is_none());
    assert!(cfg.sip_federated(&dom("foreign.example.com")).is_none());
    assert!(cfg.xmpp_domain(&dom("foreign.example.com")).is_some());
    assert!(cfg.xmpp_domain(&dom("example.com")).is_none());
}

#[test]
fn xmpp_federation_policy_follows_the_mode_exactly() {
    let base = r#"[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "lync-partner.com"
[[xmpp.federation.domain]]
name = "jabber.org"
[[xmpp.federation.domain]]
name = "spam.example"
deny = true
"#;
    let closed = match parse(base) {
        Ok(c) => c,
        Err(d) => panic!("{d}"),
    };
    let open = match parse(&format!("{base}[xmpp.federation]\nmode = \"deny_list\"\n")) {
        Ok(c) => c,
        Err(d) => panic!("{d}"),
    };
    let cases = [
        // domain, allowed in allow_list mode, allowed in deny_list mode
        ("jabber.org", true, true),
        ("sub.jabber.org", false, true), // never inherits the parent's entry
        ("spam.example", false, false),
        ("other.org", false, true),
        ("lync-partner.com", false, false), // SIP federated: never over XMPP
        ("example.com", false, false),      // ours
    ];
    for (d, in_closed, in_open) in cases {
        assert_eq!(
            closed.xmpp_federation_allowed(&dom(d)),
            in_closed,
            "{d} (allow_list)"
        );
        assert_eq!(
            open.xmpp_federation_allowed(&dom(d)),
            in_open,
            "{d} (deny_list)"
        );
    }
}

#[test]
fn domains_normalise_case_and_trailing_dot() {
    assert_eq!(dom("Example.COM."), dom("example.com"));
    assert_eq!(dom("Example.COM.").as_str(), "example.com");
    let cfg = match parse("[[local_domain]]\nname = \"Example.COM.\"\n") {
        Ok(c) => c,
        Err(d) => panic!("{d}"),
    };
    assert_eq!(cfg.local_domains[0].name.as_str(), "example.com");
}

#[test]
fn every_problem_is_reported_at_once_in_file_order() {
    let src = r#"routing_node = "nowhere"
[[local_domain]]
name = "example.com"
[[local_domain]]
name = "example.com"
[limits]
idle_timeout_secs = 0
"#;
    let errs = errors(src);
    let pos: Vec<(usize, usize)> = errs.iter().map(|(l, c, _)| (*l, *c)).collect();
    assert_eq!(pos, vec![(1, 16), (5, 8), (7, 21)], "{errs:?}");
    assert!(errs[2].2.contains("allowed: 10 to 86400"));
}

#[test]
fn values_are_typed_and_defaults_applied_per_entry() {
    let src = r#"routing_node = "hn1"
[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
route = "[2001:db8::5]:5061"
[[xmpp.federation.domain]]
name = "jabber.org"
[[xmpp.federation.domain]]
name = "webex.com"
system = "webex"
tls = "optional"
auth = "dialback_only"
[[home_node]]
name = "hn1.example.com"
srv = true
component_secret_file = "secrets/hn1"
[[home_node]]
name = "hn1"
addresses = ["10.0.0.1:5347", "hn2.example.com:5347"]
component_secret = "0123456789abcdef"
users = ["Alice@example.com"]
default_system = "jabber8"
"#;
    let cfg = match config::from_toml(src, Path::new("/etc/legate/legate.toml"), BUILTIN_SYSTEMS) {
        Ok(c) => c,
        Err(d) => panic!("{d}"),
    };
    let sip = &cfg.sip.federated_domains[0];
    assert_eq!(sip.system, "lync");
    assert_eq!(sip.presence_format, PresenceFormat::Auto);
    assert!(!sip.tolerate_no_client_auth_eku);
    assert_eq!(
        sip.route.as_ref().map(|r| r.to_string()),
        Some("[2001:db8::5]:5061".into())
    );
    let x = &cfg.xmpp.federation.domains;
    assert_eq!(
        (x[0].system.as_str(), x[0].tls, x[0].auth, x[0].deny),
        (
            "fed-xmpp",
            TlsPolicy::Required,
            S2sAuth::ExternalOrDialback,
            false
        )
    );
    assert_eq!(
        (x[1].tls, x[1].auth),
        (TlsPolicy::Optional, S2sAuth::DialbackOnly)
    );
    let h0 = &cfg.home_nodes[0];
    assert_eq!(h0.endpoint, HomeEndpoint::Srv(dom("hn1.example.com")));
    // Relative paths are resolved against the config file's directory.
    assert_eq!(
        h0.component_secret,
        Secret::File(PathBuf::from("/etc/legate/secrets/hn1"))
    );
    assert_eq!(h0.default_system, "xmpp");
    let h1 = &cfg.home_nodes[1];
    assert!(matches!(&h1.endpoint, HomeEndpoint::Addresses(a) if a.len() == 2));
    assert_eq!(h1.users[0].to_string(), "alice@example.com");
    assert_eq!(h1.default_system, "jabber8");
    assert_eq!(cfg.routing_node.as_deref(), Some("hn1"));
}

#[test]
fn caller_supplied_systems_are_honoured() {
    let src = r#"[[local_domain]]
name = "example.com"
[[sip.federated_domain]]
name = "partner.com"
system = "teams"
"#;
    assert!(parse(src).is_err());
    let systems = [("teams", config::SystemKind::SipFederation)];
    assert!(config::from_toml(src, Path::new("t.toml"), &systems).is_ok());
    // An omitted system takes the default, which must exist in the caller's list as well.
    let src = "[[local_domain]]\nname = \"example.com\"\n[[sip.federated_domain]]\nname = \"partner.com\"\n";
    let errs = match config::from_toml(src, Path::new("t.toml"), &systems) {
        Ok(_) => panic!("default system `lync` accepted though not loaded"),
        Err(d) => d.0,
    };
    assert_eq!((errs[0].line, errs[0].col), (4, 8));
    assert!(errs[0].message.contains("default `lync`") && errs[0].message.contains("teams"));
}

#[test]
fn too_many_peer_clusters_are_refused() {
    let mut src = String::from(
        "[[local_domain]]\nname = \"example.com\"\n[intercluster]\nname = \"c0\"\n\
         listen = \"127.0.0.1:7401\"\ntransport = \"tcp\"\n",
    );
    for i in 1..=30 {
        src.push_str(&format!(
            "[[intercluster.peer]]\nname = \"c{i}\"\naddress = \"10.1.0.{i}:7401\"\n"
        ));
    }
    let errs = errors(&src);
    assert_eq!(errs.len(), 1, "{errs:?}");
    // The 30th peer's name: 6 header lines, then 3 lines per peer.
    assert_eq!((errs[0].0, errs[0].1), (6 + 29 * 3 + 2, 8));
    assert!(errs[0].2.contains("at most 30 clusters"));
}

#[test]
fn cluster_notes_but_no_errors_when_name_is_missing() {
    let src = r#"[node]
id = "gw1"
[[local_domain]]
name = "example.com"
[xmpp.federation]
dialback_secret = "0123456789abcdef0123"
[[home_node]]
name = "hn1"
addresses = ["10.0.0.1:5347"]
component_secret = "0123456789abcdef"
[cluster]
peers = [{ name = "gw1", address = "10.0.0.1:7000" }, { name = "gw2", address = "10.0.0.2:7000" }]
"#;
    let cfg = match parse(src) {
        Ok(c) => c,
        Err(d) => panic!("{d}"),
    };
    let notes = cfg.notes();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].contains("cluster.name"));
    assert!(notes[1].contains("cluster.store is \"memory\": this node runs alone"));
}

#[test]
fn unreadable_file_is_one_diagnostic_at_line_zero() {
    let path = data("does-not-exist.toml");
    let err = match config::load_file(&path, BUILTIN_SYSTEMS) {
        Ok(_) => panic!("a missing file loaded"),
        Err(d) => d,
    };
    assert_eq!(err.0.len(), 1);
    assert_eq!((err.0[0].line, err.0[0].col), (0, 0));
    assert!(err.0[0].message.contains("cannot read"));
}

#[test]
fn good_fixtures_load() {
    let dir = data("good");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        n += 1;
        if let Err(d) = config::load_file(&e.path(), BUILTIN_SYSTEMS) {
            panic!("{d}");
        }
    }
    assert!(n > 0, "no fixtures in {}", dir.display());
}

#[test]
fn a_mesh_component_is_a_name_of_its_own() {
    let src = r#"[[local_domain]]
name = "example.com"
mesh_component = "mesh.example.com"
[[local_domain]]
name = "other.example"
mesh_component = "example.com"
"#;
    let errs = errors(src);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let (line, col, msg) = &errs[0];
    assert_eq!((*line, *col), (6, 18));
    assert!(
        msg.contains("`example.com` is a local domain") && msg.contains("mesh.other.example"),
        "{msg}"
    );
    let ok =
        parse("[[local_domain]]\nname = \"example.com\"\nmesh_component = \"Mesh.Example.com.\"\n")
            .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        ok.local_domains[0].mesh_component,
        Some(dom("mesh.example.com"))
    );
    let errs =
        errors("[[local_domain]]\nname = \"example.com\"\nmesh_component = \"not a domain\"\n");
    assert_eq!(errs[0].0, 3, "{errs:?}");
}
