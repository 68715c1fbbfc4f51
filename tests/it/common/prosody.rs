//! Harness for a real Prosody 0.12 (Debian's `/usr/bin/prosody`) started by a test on loopback.
//!
//! Each [`Prosody`] owns a temp dir holding its config (from
//! `tests/data/prosody/prosody.cfg.lua.in`), data dir, pidfile and log. It listens on one loopback
//! address (127.0.0.x) with the ports in its [`ProsodyConfig`], resolves peers through a test
//! [`Dnsmasq`](super::dnsmasq::Dnsmasq) when one is given, and is killed on drop. It never touches
//! the system service or /etc/prosody. Users are written as `mod_auth_internal_plain` account files
//! (no prosodyctl round trip, works before and after start-up).
//!
//! When a test panics while a `Prosody` is alive, its config and log are printed on drop; with
//! `LEGATE_KEEP_PROSODY_DIR=1` the temp dir is kept for inspection.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::ports;

pub const PROSODY_BIN: &str = "/usr/bin/prosody";
/// Set this environment variable to keep each Prosody's temp dir (config, data, logs) after the
/// test; the path is printed.
pub const KEEP_ENV: &str = "LEGATE_KEEP_PROSODY_DIR";
const TEMPLATE: &str = include_str!("../../data/prosody/prosody.cfg.lua.in");

/// PEM certificate chain and key for one host (`ssl = { certificate = ..., key = ... }`).
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A `VirtualHost` and its accounts.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub domain: String,
    /// (localpart, password)
    pub users: Vec<(String, String)>,
    pub cert: Option<CertPaths>,
    /// Raw Lua inside this `VirtualHost` section.
    pub extra_lua: String,
}

/// A `Component "domain"` entry with `component_secret` (XEP-0114).
#[derive(Debug, Clone)]
pub struct ComponentConfig {
    pub domain: String,
    pub secret: String,
    /// Raw Lua inside this `Component` section.
    pub extra_lua: String,
}

/// Everything that varies between test Prosodies. Start from [`ProsodyConfig::new`].
#[derive(Debug, Clone)]
pub struct ProsodyConfig {
    /// The loopback address Prosody binds (127.0.0.1, 127.0.0.2, ...).
    pub ip: Ipv4Addr,
    pub c2s_port: u16,
    pub s2s_port: u16,
    pub component_port: u16,
    pub hosts: Vec<HostConfig>,
    pub components: Vec<ComponentConfig>,
    /// Group-chat services (`Component "<domain>" "muc"`), rooms created unlocked.
    pub mucs: Vec<String>,
    /// Load mod_dialback (XEP-0220). Without it, s2s needs certificates (SASL EXTERNAL).
    pub dialback: bool,
    pub s2s_secure_auth: bool,
    pub s2s_require_encryption: bool,
    pub c2s_require_encryption: bool,
    /// CA bundle for verifying s2s peers (`ssl = { cafile = ... }`).
    pub cafile: Option<PathBuf>,
    /// libunbound forwarder, `127.0.0.1@port` (see `Dnsmasq::unbound_forward`). Without it
    /// Prosody uses the system resolver and cannot find `*.test` peers.
    pub dns_forward: Option<String>,
    pub extra_modules: Vec<String>,
    /// Raw Lua appended to the global section (before the hosts).
    pub extra_global_lua: String,
    /// Prosody log level: "debug" (default), "info", ...
    pub log_level: String,
    /// Bound on waiting for the listeners.
    pub start_timeout: Duration,
}

impl ProsodyConfig {
    /// Plaintext c2s allowed, s2s by dialback without TLS, free ports on `ip`, no hosts yet.
    pub fn new(ip: Ipv4Addr) -> Self {
        let ipa = IpAddr::V4(ip);
        ProsodyConfig {
            ip,
            c2s_port: ports::free_port(ipa),
            s2s_port: ports::free_port(ipa),
            component_port: ports::free_port(ipa),
            hosts: Vec::new(),
            components: Vec::new(),
            mucs: Vec::new(),
            dialback: true,
            s2s_secure_auth: false,
            s2s_require_encryption: false,
            c2s_require_encryption: false,
            cafile: None,
            dns_forward: None,
            extra_modules: Vec::new(),
            extra_global_lua: String::new(),
            log_level: "debug".to_owned(),
            start_timeout: Duration::from_secs(10),
        }
    }

    /// Adds a `VirtualHost`.
    pub fn host(mut self, domain: &str) -> Self {
        self.hosts.push(HostConfig {
            domain: domain.to_owned(),
            users: Vec::new(),
            cert: None,
            extra_lua: String::new(),
        });
        self
    }

    /// Adds an account on an already added host.
    pub fn user(mut self, domain: &str, localpart: &str, password: &str) -> Self {
        let h = self
            .hosts
            .iter_mut()
            .find(|h| h.domain == domain)
            .unwrap_or_else(|| panic!("user {localpart}@{domain}: add the host first"));
        h.users.push((localpart.to_owned(), password.to_owned()));
        self
    }

    /// Sets the certificate of an already added host.
    pub fn host_cert(mut self, domain: &str, cert: CertPaths) -> Self {
        let h = self
            .hosts
            .iter_mut()
            .find(|h| h.domain == domain)
            .unwrap_or_else(|| panic!("cert for {domain}: add the host first"));
        h.cert = Some(cert);
        self
    }

    /// Adds a `Component` with its secret.
    pub fn component(self, domain: &str, secret: &str) -> Self {
        self.component_lua(domain, secret, "")
    }

    /// Adds a `Component` with its secret and more options (raw Lua).
    pub fn component_lua(mut self, domain: &str, secret: &str, extra_lua: &str) -> Self {
        self.components.push(ComponentConfig {
            domain: domain.to_owned(),
            secret: secret.to_owned(),
            extra_lua: extra_lua.to_owned(),
        });
        self
    }

    /// Sets raw Lua inside an already added host's section.
    pub fn host_lua(mut self, domain: &str, lua: &str) -> Self {
        let h = self
            .hosts
            .iter_mut()
            .find(|h| h.domain == domain)
            .unwrap_or_else(|| panic!("options for {domain}: add the host first"));
        h.extra_lua = lua.to_owned();
        self
    }

    /// Adds a XEP-0045 group-chat service; anyone may create a room, which is usable at once
    /// (no configuration form to fill first).
    pub fn muc(mut self, domain: &str) -> Self {
        self.mucs.push(domain.to_owned());
        self
    }

    /// Resolve through the given libunbound forwarder (`Dnsmasq::unbound_forward()`).
    pub fn dns(mut self, forward: String) -> Self {
        self.dns_forward = Some(forward);
        self
    }

    /// Certificates only: TLS required, peers authenticated by certificate (SASL EXTERNAL),
    /// dialback not loaded, `cafile` as the trust store.
    pub fn secure_s2s(mut self, cafile: &Path) -> Self {
        self.dialback = false;
        self.s2s_secure_auth = true;
        self.s2s_require_encryption = true;
        self.cafile = Some(cafile.to_owned());
        self
    }

    /// The config file text for this instance, with paths under `dir`.
    pub fn render(&self, dir: &Path) -> String {
        let p = |name: &str| lua_str(&dir.join(name).to_string_lossy());
        let mut modules = vec!["roster", "saslauth", "disco", "ping"];
        // mod_tls offers STARTTLS even when no certificate is configured ("SNI will be
        // required"), and the handshake then fails; so load it only when some host has one.
        if self.hosts.iter().any(|h| h.cert.is_some()) {
            modules.push("tls");
        }
        if self.dialback {
            modules.push("dialback");
        }
        let mut module_list: Vec<String> = modules.iter().map(|m| lua_str(m)).collect();
        module_list.extend(self.extra_modules.iter().map(|m| lua_str(m)));

        let mut global_ssl = String::new();
        if let Some(ca) = &self.cafile {
            let _ = write!(global_ssl, "cafile = {};", lua_str(&ca.to_string_lossy()));
        }

        let unbound = match &self.dns_forward {
            Some(fwd) => format!(
                "unbound = {{\n\tresolvconf = false;\n\thoststxt = false;\n\tforward = {};\n\toptions = {{\n\t\t[\"do-not-query-localhost:\"] = \"no\";\n\t\t[\"local-zone:\"] = \"test. transparent\";\n\t}};\n}}",
                lua_str(fwd)
            ),
            None => "-- (no test DNS configured: system resolver)".to_owned(),
        };

        let mut hosts = String::new();
        for h in &self.hosts {
            let _ = writeln!(hosts, "VirtualHost {}", lua_str(&h.domain));
            if let Some(c) = &h.cert {
                let _ = write!(
                    hosts,
                    "\tssl = {{ certificate = {}; key = {};",
                    lua_str(&c.cert.to_string_lossy()),
                    lua_str(&c.key.to_string_lossy())
                );
                if let Some(ca) = &self.cafile {
                    let _ = write!(hosts, " cafile = {};", lua_str(&ca.to_string_lossy()));
                }
                hosts.push_str(" }\n");
            }
            if !h.extra_lua.is_empty() {
                let _ = writeln!(hosts, "{}", h.extra_lua);
            }
        }
        let mut components = String::new();
        for c in &self.components {
            let _ = writeln!(
                components,
                "Component {}\n\tcomponent_secret = {}",
                lua_str(&c.domain),
                lua_str(&c.secret)
            );
            if !c.extra_lua.is_empty() {
                let _ = writeln!(components, "{}", c.extra_lua);
            }
        }
        for m in &self.mucs {
            let _ = writeln!(
                components,
                "Component {} \"muc\"\n\trestrict_room_creation = false\n\tmuc_room_locking = false",
                lua_str(m)
            );
        }
        let ip = lua_str(&self.ip.to_string());
        TEMPLATE
            .replace("@PIDFILE@", &p("prosody.pid"))
            .replace("@DATA_PATH@", &p("data"))
            .replace("@CERT_DIR@", &p("certs"))
            .replace("@LOG_LEVEL@", &lua_str(&self.log_level))
            .replace("@LOG_FILE@", &p("prosody.log"))
            .replace("@IP@", &ip)
            .replace("@C2S_PORT@", &self.c2s_port.to_string())
            .replace("@S2S_PORT@", &self.s2s_port.to_string())
            .replace("@COMPONENT_PORT@", &self.component_port.to_string())
            .replace("@MODULES@", &module_list.join("; "))
            .replace(
                "@C2S_REQUIRE_ENCRYPTION@",
                &self.c2s_require_encryption.to_string(),
            )
            .replace(
                "@S2S_REQUIRE_ENCRYPTION@",
                &self.s2s_require_encryption.to_string(),
            )
            .replace("@S2S_SECURE_AUTH@", &self.s2s_secure_auth.to_string())
            .replace("@GLOBAL_SSL@", &global_ssl)
            .replace("@UNBOUND@", &unbound)
            .replace("@EXTRA@", &self.extra_global_lua)
            .replace("@HOSTS@", &hosts)
            .replace("@COMPONENTS@", &components)
    }
}

/// A Lua string literal for `s` (quotes, backslashes and control characters escaped).
pub fn lua_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\{b:03}");
            }
        }
    }
    out.push('"');
    out
}

/// Prosody's datamanager file-name encoding: every non-alphanumeric byte as `%xx`.
fn dm_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02x}");
        }
    }
    out
}

/// A running Prosody; killed on drop.
pub struct Prosody {
    child: GuardedChild,
    config: ProsodyConfig,
    dir: tempfile::TempDir,
    started_in: Duration,
}

impl Prosody {
    /// Writes the config and accounts, starts `prosody -F`, and waits (bounded by
    /// `config.start_timeout`) until Prosody logs that its c2s, s2s and (if any components)
    /// component listeners are active and has written its pidfile (written while global modules
    /// load, in no fixed order relative to the listeners). On failure the error carries the
    /// config, Prosody's output and log.
    pub fn start(config: ProsodyConfig) -> Result<Prosody> {
        super::programs::require_program(PROSODY_BIN, "prosody");
        let dir = tempfile::Builder::new()
            .prefix("legate-prosody-")
            .tempdir()
            .context("creating Prosody temp dir")?;
        std::fs::create_dir_all(dir.path().join("data")).context("creating data dir")?;
        std::fs::create_dir_all(dir.path().join("certs")).context("creating certs dir")?;
        let cfg_path = dir.path().join("prosody.cfg.lua");
        std::fs::write(&cfg_path, config.render(dir.path())).context("writing Prosody config")?;
        for h in &config.hosts {
            for (user, pw) in &h.users {
                write_account(&dir.path().join("data"), &h.domain, user, pw)?;
            }
        }
        let t0 = Instant::now();
        let mut cmd = Command::new(PROSODY_BIN);
        cmd.arg("--config")
            .arg(&cfg_path)
            .arg("-F")
            .env("HOME", dir.path())
            .current_dir(dir.path());
        let child = GuardedChild::spawn(&cmd, &dir.path().join("stdout.log"))?;
        let mut p = Prosody {
            child,
            config,
            dir,
            started_in: Duration::ZERO,
        };
        // Ready = Prosody's own "Activated service" line for every listener (a TCP probe would
        // be fooled by another process holding the port), and a pidfile.
        let ip = p.config.ip;
        let mut wanted = vec![
            format!("Activated service 'c2s' on [{ip}]:{}", p.config.c2s_port),
            format!("Activated service 's2s' on [{ip}]:{}", p.config.s2s_port),
        ];
        if !p.config.components.is_empty() {
            wanted.push(format!(
                "Activated service 'component' on [{ip}]:{}",
                p.config.component_port
            ));
        }
        let deadline = t0 + p.config.start_timeout;
        loop {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "Prosody exited during start-up ({status})\n{}",
                    p.diagnostics()
                );
            }
            let log = p.log();
            // Prosody keeps running when a port is taken; fail at once instead of waiting.
            if log.contains("Failed to open server port") {
                bail!(
                    "Prosody could not bind a port (taken by another process since it was \
                     chosen?)\n{}",
                    p.diagnostics()
                );
            }
            if wanted.iter().all(|w| log.contains(w.as_str())) && p.pid().is_some() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "Prosody not ready within {:?} (waiting for {wanted:?} and a pidfile)\n{}",
                    p.config.start_timeout,
                    p.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        p.started_in = t0.elapsed();
        Ok(p)
    }

    pub fn config(&self) -> &ProsodyConfig {
        &self.config
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.config.ip
    }

    pub fn c2s_addr(&self) -> SocketAddr {
        SocketAddr::from((self.config.ip, self.config.c2s_port))
    }

    pub fn s2s_addr(&self) -> SocketAddr {
        SocketAddr::from((self.config.ip, self.config.s2s_port))
    }

    pub fn component_addr(&self) -> SocketAddr {
        SocketAddr::from((self.config.ip, self.config.component_port))
    }

    /// How long it took until every listener accepted connections.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Prosody's own PID (from its pidfile; always written once `start` returned).
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("prosody.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Kills Prosody now (also done on drop).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds an account while running (the internal store is read from disk on each login).
    pub fn add_user(&self, domain: &str, localpart: &str, password: &str) -> Result<()> {
        write_account(&self.dir.path().join("data"), domain, localpart, password)
    }

    /// Prosody's log file so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prosody.log"))
            .unwrap_or_else(|e| format!("(no prosody.log: {e})"))
    }

    /// The generated config file.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prosody.cfg.lua")).unwrap_or_default()
    }

    /// Config, stdout/stderr and log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let stdout =
            std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default();
        format!(
            "--- Prosody {} config ---\n{}\n--- stdout/stderr ---\n{}\n--- prosody.log ---\n{}",
            self.config.ip,
            self.config_text(),
            stdout,
            self.log()
        )
    }
}

fn write_account(data: &Path, domain: &str, localpart: &str, password: &str) -> Result<()> {
    let dir = data.join(dm_encode(domain)).join("accounts");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join(format!("{}.dat", dm_encode(localpart)));
    std::fs::write(
        &file,
        format!(
            "return {{\n\t[\"password\"] = {};\n}};\n",
            lua_str(password)
        ),
    )
    .with_context(|| format!("writing {}", file.display()))
}

impl Drop for Prosody {
    fn drop(&mut self) {
        self.child.kill();
        if std::env::var_os(KEEP_ENV).is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("{KEEP_ENV}: kept {}", self.dir.path().display());
        }
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}

/// A child process that cannot outlive the test process.
///
/// The program runs under `/bin/sh`, which also starts a watchdog reading the pipe on its stdin;
/// the test holds the write end. When the test drops this (or dies, even by SIGKILL, so the
/// kernel closes the pipe), the watchdog SIGKILLs the program's process group. Plain `Child::kill` on drop would
/// leak the server whenever the test binary itself is killed (CI timeouts).
pub struct GuardedChild {
    wrapper: Child,
    stdin: Option<std::process::ChildStdin>,
}

// The watchdog's own stdout and stderr go to /dev/null: holding the program's pipes open, it
// would hide the program's exit from a reader waiting for end of output (a `legate run` that
// failed at start was reported only after the whole start timeout, as "did not announce").
// `setsid` gives the program its own process group (it does not fork here: a background job of
// a non-interactive shell is never a group leader), so the watchdog also kills anything the
// program forked (dnsmasq forks a child per TCP connection, which holds the listening socket).
const GUARD_SCRIPT: &str = r#"exec 3<&0 0</dev/null
setsid "$@" &
p=$!
( cat <&3 >/dev/null; kill -9 -"$p" 2>/dev/null || kill -9 "$p" 2>/dev/null ) >/dev/null 2>&1 &
exec 3<&-
wait "$p""#;

impl GuardedChild {
    /// Spawns `cmd` (program, args, env and cwd are taken from it) under the guard, with stdout
    /// and stderr appended to `log`.
    pub fn spawn(cmd: &Command, log: &Path) -> Result<GuardedChild> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone().context("cloning log handle")?;
        Self::spawn_with(cmd, Stdio::from(out), Stdio::from(err))
    }

    /// Spawns `cmd` under the guard with its stdout and stderr as pipes, returned for the caller
    /// to read (the `legate` harness reads announcements from them as they arrive).
    pub fn spawn_piped(
        cmd: &Command,
    ) -> Result<(
        GuardedChild,
        std::process::ChildStdout,
        std::process::ChildStderr,
    )> {
        let mut g = Self::spawn_with(cmd, Stdio::piped(), Stdio::piped())?;
        let out = g.wrapper.stdout.take().context("child stdout")?;
        let err = g.wrapper.stderr.take().context("child stderr")?;
        Ok((g, out, err))
    }

    fn spawn_with(cmd: &Command, out: Stdio, err: Stdio) -> Result<GuardedChild> {
        let mut sh = Command::new("/bin/sh");
        sh.arg("-c")
            .arg(GUARD_SCRIPT)
            .arg("guard")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            sh.current_dir(dir);
        }
        let mut wrapper = sh
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
        let stdin = wrapper.stdin.take();
        Ok(GuardedChild { wrapper, stdin })
    }

    /// `Some(status)` once the program has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.wrapper.try_wait().context("polling child")
    }

    /// The PID of the program itself: the child of the guard shell whose command name is
    /// `comm` (the guard's other child is its watchdog subshell).
    pub fn program_pid(&self, comm: &str) -> Option<u32> {
        let w = self.wrapper.id();
        let children = std::fs::read_to_string(format!("/proc/{w}/task/{w}/children")).ok()?;
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
            })
    }

    /// Kills the program and waits (≤ 5 s) for it to be gone.
    pub fn kill(&mut self) {
        // Closing the pipe makes the watchdog SIGKILL the program; the shell's `wait` returns.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.wrapper.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

impl Drop for GuardedChild {
    fn drop(&mut self) {
        self.kill();
    }
}
