//! The admin endpoint through the real `legate run` (issue 14 items 7 and 8): every `legate_`
//! metric family is on `/metrics` before any traffic, with zero series; every series the
//! Grafana dashboard in `contrib/` queries exists then too; `--log-format json` writes one
//! JSON object per log line; with `node.admin_token_file` every path but `/healthz` wants the
//! bearer token, and `legate status --config` sends it.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::legate::Legate;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A node with no edge listening and no home node: nothing can reach it but the admin
/// endpoint, so `/metrics` shows the state at start.
const QUIET: &str = r#"
[node]
admin_listen = "127.0.0.1:0"
data_dir = "data"
[[local_domain]]
name = "example.test"
[listeners]
sip_tls = "off"
sip_tcp = "off"
xmpp_s2s = "off"
xmpp_s2s_direct_tls = "off"
"#;

fn start(dir: &Path, toml: &str, args: &[&str]) -> Legate {
    let path = dir.join("legate.toml");
    std::fs::write(&path, toml).expect("write config");
    Legate::start_args(&path, args, &["admin"]).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Every `"legate_…"` string literal in the crate's sources: the metric names the code
/// defines (a new metric is covered without editing this test).
fn metric_names_in_sources() -> BTreeSet<String> {
    metric_names(cfg!(feature = "cluster"))
}

/// Metric names in the sources; those of files only the `cluster` feature compiles when
/// `cluster_too`.
fn metric_names(cluster_too: bool) -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>, cluster_too: bool) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            // What only the `cluster` feature compiles has no series in a build without it.
            let cluster_only = ["replication.rs", "claims.rs", "takeover.rs", "peer"]
                .iter()
                .any(|f| p.ends_with(Path::new("cluster").join(f)));
            if cluster_only && !cluster_too {
                continue;
            }
            if p.is_dir() {
                walk(&p, out, cluster_too);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                for (i, _) in text.match_indices("\"legate_") {
                    let name: String = text[i + 1..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    let fallback_or_test =
                        name.starts_with("legate_invalid") || name.starts_with("legate_test");
                    if text[i + 1 + name.len()..].starts_with('"') && !fallback_or_test {
                        out.insert(name);
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut out,
        cluster_too,
    );
    out
}

/// The families with at least one sample in a Prometheus text.
fn families_with_samples(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        // A histogram's samples are its family name with a suffix.
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|_| n.contains("_seconds")))
                .unwrap_or(n)
                .to_string()
        })
        .collect()
}

/// Every `legate_…` name in the dashboard's queries.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana-legate.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut exprs = Vec::new();
    for p in doc["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(
        exprs.len() >= 20,
        "the dashboard queries too little: {exprs:?}"
    );
    let mut names = BTreeSet::new();
    for e in &exprs {
        for (i, _) in e.match_indices("legate_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

#[tokio::test]
async fn every_metric_family_and_every_dashboard_series_exists_at_start() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let legate = start(dir.path(), QUIET, &[]);
        let metrics = legate.metrics().await.expect("GET /metrics");
        let present = families_with_samples(&metrics);
        let defined = metric_names_in_sources();
        assert!(
            defined.len() >= 35,
            "too few metric names found: {defined:?}"
        );
        let missing: Vec<&String> = defined.difference(&present).collect();
        assert!(
            missing.is_empty(),
            "families without a series at start: {missing:?}\n{metrics}"
        );
        let on_dashboard = dashboard_metrics();
        // The dashboard's cluster panels query families a build without `cluster` lacks.
        let cluster_only: BTreeSet<String> = metric_names(true)
            .difference(&metric_names(false))
            .cloned()
            .collect();
        let unknown: Vec<&String> = on_dashboard
            .difference(&present)
            .filter(|n| cfg!(feature = "cluster") || !cluster_only.contains(*n))
            .collect();
        assert!(
            unknown.is_empty(),
            "contrib/grafana-legate.json queries series /metrics does not have: {unknown:?}"
        );
        // The main series are all on the dashboard.
        for main in [
            "legate_alarms_active",
            "legate_component_links_up",
            "legate_envelopes_total",
            "legate_sip_requests_total",
            "legate_s2s_streams_open",
        ] {
            assert!(
                on_dashboard.contains(main),
                "{main} is not on the dashboard"
            );
        }
        assert!(
            metrics.contains(r#"legate_sip_requests_total{direction="in",method="MESSAGE"} 0"#),
            "{metrics}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let legate = start(dir.path(), QUIET, &["--log-format", "json"]);
        legate
            .wait_output("the listening log line", Duration::from_secs(10), |t| {
                t.lines()
                    .any(|l| l.starts_with('{') && l.contains("\"listening\""))
            })
            .await
            .expect("log line");
        let out = legate.output();
        let mut objects = 0;
        for line in out.lines().filter(|l| !l.starts_with("legate: ")) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}\n{out}"));
            assert!(
                v["level"].is_string() && v["timestamp"].is_string(),
                "{line}"
            );
            assert!(!line.contains('\u{1b}'), "ANSI escape in {line}");
            objects += 1;
        }
        assert!(objects >= 2, "{out}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_token_guards_the_endpoint_and_legate_status_sends_it() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = "tok-0123456789abcdef0123";
        std::fs::write(dir.path().join("admin-token"), format!("{token}\n")).expect("token");
        let toml = format!("{QUIET}\n").replace(
            "data_dir = \"data\"",
            "data_dir = \"data\"\nadmin_token_file = \"admin-token\"",
        );
        let legate = start(dir.path(), &toml, &[]);
        let denied = legate.http_get("/status").await.expect("GET /status");
        assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
        assert!(
            denied
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{denied}"
        );
        let health = legate.http_get("/healthz").await.expect("GET /healthz");
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
            "{health}"
        );
        let admin = legate.addr("admin").to_string();
        let config = dir.path().join("legate.toml");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .args(["status", "--admin", &admin, "--json", "--config"])
            .arg(&config)
            .output()
            .expect("legate status");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_str(stdout.trim()).expect("status JSON");
        assert_eq!(doc["local_domains"][0], "example.test");
        // Without the configuration (hence without the token) the node refuses.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .args(["status", "--admin", &admin])
            .env_remove("LEGATE_ADMIN_TOKEN")
            .output()
            .expect("legate status");
        assert_eq!(out.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("wants its admin token (401)"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn systemd_hears_ready_once_the_node_listens() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("legate.toml");
    std::fs::write(&config, QUIET).expect("config");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_legate"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .env("NOTIFY_SOCKET", &sock_path);
    let log = dir.path().join("legate.log");
    let mut child = common::prosody::GuardedChild::spawn(&cmd, &log).expect("spawn legate");
    let got = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("no READY=1 within 20 s");
        (String::from_utf8_lossy(&buf[..n]).into_owned(), sock)
    })
    .await
    .expect("recv thread");
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(got.0, "READY=1", "{output}");
    assert!(
        output.contains("legate: listening admin"),
        "READY=1 came before the listeners were announced:\n{output}"
    );
    child.kill();
}

#[test]
fn the_systemd_unit_waits_for_readiness_and_is_hardened() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/legate.service");
    let unit = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for want in [
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/legate",
        "StateDirectory=legate",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "User=legate",
    ] {
        assert!(lines.contains(&want), "{} lacks `{want}`", path.display());
    }
    // The unit's data directory is the configuration's default `node.data_dir`.
    let cfg = legate::config::from_toml(
        "[[local_domain]]\nname = \"example.com\"\n",
        Path::new("t.toml"),
        legate::config::BUILTIN_SYSTEMS,
    )
    .unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(cfg.node.data_dir, Path::new("/var/lib/legate"));
    let exec = lines
        .iter()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(
        exec.contains(" run --config ") && exec.contains("--log-format"),
        "{exec}"
    );
}
