//! The `legate` command line: the admin contract (`check`, `translate`, `mappings show`,
//! `sip check`, `policy`, `doctor`, `status`, `reload`, `drain`) and the gateway itself (`run`). Output formats here are relied on by tooling:
//! change them only with the README.

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;

/// mimalloc instead of glibc malloc: a pager MESSAGE allocates and frees a few dozen small
/// blocks across tasks on different threads, where glibc's arenas spent ~17 % of legate's CPU
/// (README, performance: the pager bench).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "legate", version, about = "SIP/XMPP federation gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Make a development CA and certificates (ECDSA P-256, serverAuth + clientAuth) so TLS
    /// works on a laptop: ca.pem/ca.key, <domain>.pem/.key per domain, node.pem/.key naming
    /// every domain. Never overwrites a file. Not for production. Exit codes: 0 written, 2
    /// refused.
    Dev {
        /// A domain to certify (repeat for several): your local domains.
        #[arg(long = "domain", required = true)]
        domains: Vec<String>,
        /// Directory to write into (created if missing; write outside the repository).
        #[arg(long, default_value = "legate-dev-certs")]
        out: PathBuf,
        /// Validity in days, 1 to 825.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (without --config: the embedded single-node default).
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        mappings: Option<PathBuf>,
        /// Log lines on stderr: `text` (coloured only on a terminal) or `json` (one object
        /// per line: timestamp, level, target, fields, span; for a log collector).
        #[arg(long, value_enum, default_value_t = Format::Text)]
        log_format: Format,
    },
    /// Validate a configuration file and mapping directory; one `file:line:col: message` per problem.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        mappings: Option<PathBuf>,
    },
    /// Translate one presence state from one system to another; prints one JSON object.
    Translate {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Source state token (e.g. `busy`); or use --availability / --activity for raw wire values.
        #[arg(required_unless_present_any = ["availability", "activity"])]
        state: Option<String>,
        /// The user's status text / note.
        #[arg(long)]
        note: Option<String>,
        /// Raw msrtc availability number (Lync/OCS), read through the source system's decode rules.
        #[arg(long, conflicts_with = "state")]
        availability: Option<u32>,
        /// Raw activity token (msrtc or RPID), read through the source system's decode rules.
        #[arg(long, conflicts_with = "state")]
        activity: Option<String>,
        #[arg(long)]
        mappings: Option<PathBuf>,
    },
    /// SIP diagnostics.
    Sip {
        #[command(subcommand)]
        cmd: SipCmd,
    },
    /// Inspect the availability mapping tables.
    Mappings {
        #[command(subcommand)]
        cmd: MappingsCmd,
    },
    /// Federation self-test with one partner domain: our policy, DNS, TCP reach, TLS
    /// handshake, then a SIP OPTIONS or an XMPP s2s stream; a verdict and a fix per step.
    /// Exit codes: 0 federation would work, 1 a step failed, 2 usage or configuration error.
    Doctor {
        /// The partner's domain.
        domain: String,
        /// The configuration, loaded as `check` and `run` load it (default: the embedded one).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Bound of the whole run, in seconds (each network step gets at most 10 s of it).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// A local user's consent lists (who may see their presence), on a RUNNING node: the
    /// command talks to the node's admin endpoint (`node.admin_listen`), and a change applies
    /// at once. Not usable while the node is stopped. Exit codes: 0 done, 1 node unreachable
    /// or failed, 2 bad user or target.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
        /// The node's admin endpoint (host:port); default: `node.admin_listen` of --config,
        /// else 127.0.0.1:9090.
        #[arg(long, global = true)]
        admin: Option<String>,
        /// The node's configuration, read for `node.admin_listen` only.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// Print the node's JSON answer as is.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Development certificates (`legate certs dev --domain example.com`).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// The RUNNING node at a glance, from its admin endpoint: listeners, home-node links
    /// (up/down, age of the last failure), partners connected per protocol, subscriptions,
    /// sessions and alarms (each with the action to take). Exit codes: 0 no critical or major
    /// alarm raised, 1 one is, 2 the node cannot be reached.
    Status {
        /// The node's admin endpoint (host:port); default: `node.admin_listen` of --config,
        /// else 127.0.0.1:9090.
        #[arg(long)]
        admin: Option<String>,
        /// The node's configuration, read for `node.admin_listen` only.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the node's `/status` JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Reload the RUNNING node (as SIGHUP does): it reads its configuration file, mapping files
    /// and certificates again; a valid change applies at once (new connections, and every
    /// next request is checked against the new policy), an invalid one changes nothing and
    /// raises the ConfigReloadRefused alarm. Keys that need a restart are named. Exit codes:
    /// 0 applied, 1 refused, 2 the node cannot be reached.
    Reload {
        /// The node's admin endpoint (host:port); default: `node.admin_listen` of --config,
        /// else 127.0.0.1:9090.
        #[arg(long)]
        admin: Option<String>,
        /// The node's configuration, read for `node.admin_listen` only.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the node's JSON report as is.
        #[arg(long)]
        json: bool,
    },
    /// Maintenance mode on the RUNNING node: new SIP INVITEs and SUBSCRIBEs get 503 with
    /// Retry-After and new s2s streams are refused, while existing sessions and subscriptions
    /// go on; prints progress until nothing is left ("done"). There is no undo but a restart.
    /// Exit codes: 0 done, 1 not done within --wait, 2 the node cannot be reached.
    Drain {
        /// The node's admin endpoint (host:port); default: `node.admin_listen` of --config,
        /// else 127.0.0.1:9090.
        #[arg(long)]
        admin: Option<String>,
        /// The node's configuration, read for `node.admin_listen` only.
        #[arg(long)]
        config: Option<PathBuf>,
        /// How long to follow the progress, in seconds (0: start the drain and report once).
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// One JSON progress document per change instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Intercluster peering of a RUNNING node, through its admin endpoint.
    Intercluster {
        #[command(subcommand)]
        cmd: InterclusterCmd,
        /// The node's admin endpoint (host:port); default: `node.admin_listen` of --config,
        /// else 127.0.0.1:9090.
        #[arg(long, global = true)]
        admin: Option<String>,
        /// The node's configuration, read for `node.admin_listen` only.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// Print the node's JSON answer as is.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Operations on a RUNNING cluster node, through its admin endpoint.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
        /// The node's admin endpoint (host:port); default: `node.admin_listen` of --config,
        /// else 127.0.0.1:9090.
        #[arg(long, global = true)]
        admin: Option<String>,
        /// The node's configuration, read for `node.admin_listen` only.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// Print the node's JSON answer as is.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum InterclusterCmd {
    /// Each peer cluster: reachable, in sync, users it contributed, last sync start/end and
    /// outcome, certificate status, whether it lists us; clusters that still list us but that
    /// we no longer list; the sync alarm. Exit codes: 0 every peer in sync, 1 not, 2 the node
    /// cannot be reached.
    Status,
    /// Sync with PEER (default: every peer) now, on the cluster leader; --full asks for the
    /// complete user list instead of the changes since the last sync.
    ForceSync {
        peer: Option<String>,
        #[arg(long)]
        full: bool,
    },
    /// Users this cluster contributes besides those its home nodes spoke for.
    Users {
        #[command(subcommand)]
        cmd: InterclusterUsersCmd,
    },
    /// The peer cluster USER lives in, as this node knows it.
    Lookup { user: String },
}

#[derive(Subcommand)]
enum InterclusterUsersCmd {
    /// Pin USER (a bare JID of a local domain) on HOME_NODE: written to the directory, so it
    /// is routed there locally and announced to the peer clusters at their next sync.
    Add { user: String, home_node: String },
    /// Remove USER's directory entry: the peers forget it at their next sync.
    Remove { user: String },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// This node's role (LEADER/FOLLOWER/DETACHED), the peers with the leader marked and
    /// which are live, the last change of role, the TLS material and etcd in use, and the
    /// cluster alarms (seed 003's `xmpp cluster status`). Exit codes: 0 healthy (a leader
    /// known, this node attached), 1 not (or not clustered), 2 the node cannot be reached.
    Status,
    /// On a subordinate: drop its copy of the configuration primary's cluster-wide
    /// configuration, read the primary's again and apply it (refused on the primary itself).
    /// Exit codes: 0 applied, 1 refused, 2 the node cannot be reached.
    ForceConfigUpdate,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Allow TARGET (a bare JID `user@domain`, or a whole domain): Legate never blocks it (a JID
    /// allow beats a domain block); its requests go to USER's home node, where an approval
    /// USER once gave is kept.
    Allow { user: String, target: String },
    /// Polite blocking: TARGET sees USER offline and is never told; its requests never reach
    /// USER. A JID entry beats a domain entry.
    Block { user: String, target: String },
    /// Remove USER's entry for TARGET (an allow or a block): TARGET is undecided again.
    Unblock { user: String, target: String },
    /// List USER's entries.
    Show { user: String },
}

#[derive(Subcommand)]
enum MappingsCmd {
    /// Show the tables (or, with --from and --to, the effective mapping of every source state).
    Show {
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[arg(long)]
        mappings: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SipCmd {
    /// Parse and validate SIP messages as Legate would (each FILE is one datagram). Prints one
    /// JSON object per file: {"file","verdict","status","reason","method"}; exit 1 if any is bad.
    /// With --print and one FILE: the message exactly as Legate re-serializes it.
    /// Size bounds: those of --config's `[limits]`, else the defaults (513 beyond them).
    Check {
        #[arg(long)]
        print: bool,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// The log subscriber of `legate run`: stderr, filtered by `LEGATE_LOG` (default `info`).
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        log.json().with_ansi(false).init();
    } else {
        // Colour only for a person at a terminal: a log file or a journal gets plain text
        // (NO_COLOR, https://no-color.org, turns it off there too).
        log.with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    }
}

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            mappings,
            log_format,
        } => {
            init_logging(matches!(log_format, Format::Json));
            cli::run(config.as_deref(), mappings)
        }
        Cmd::Doctor {
            domain,
            config,
            format,
            timeout,
        } => Ok(cli::doctor::doctor(
            &domain,
            config.as_deref(),
            matches!(format, Format::Json),
            timeout,
        )),
        Cmd::Certs {
            cmd: CertsCmd::Dev { domains, out, days },
        } => Ok(cli::certs::run(&out, &domains, days)),
        Cmd::Intercluster {
            cmd,
            admin,
            config,
            json,
        } => {
            let (a, c) = (admin.as_deref(), config.as_deref());
            Ok(match cmd {
                InterclusterCmd::Status => cli::intercluster::status(a, c, json),
                InterclusterCmd::ForceSync { peer, full } => {
                    cli::intercluster::force_sync(a, c, peer.as_deref(), full, json)
                }
                InterclusterCmd::Users {
                    cmd: InterclusterUsersCmd::Add { user, home_node },
                } => cli::intercluster::users(a, c, &user, Some(&home_node), json),
                InterclusterCmd::Users {
                    cmd: InterclusterUsersCmd::Remove { user },
                } => cli::intercluster::users(a, c, &user, None, json),
                InterclusterCmd::Lookup { user } => cli::intercluster::lookup(a, c, &user, json),
            })
        }
        Cmd::Cluster {
            cmd: ClusterCmd::Status,
            admin,
            config,
            json,
        } => Ok(cli::cluster::status(
            admin.as_deref(),
            config.as_deref(),
            json,
        )),
        Cmd::Status {
            admin,
            config,
            json,
        } => Ok(cli::status::status(
            admin.as_deref(),
            config.as_deref(),
            json,
        )),
        Cmd::Reload {
            admin,
            config,
            json,
        } => Ok(cli::node::reload(admin.as_deref(), config.as_deref(), json)),
        Cmd::Drain {
            admin,
            config,
            wait,
            json,
        } => Ok(cli::node::drain(
            admin.as_deref(),
            config.as_deref(),
            wait,
            json,
        )),
        Cmd::Cluster {
            cmd: ClusterCmd::ForceConfigUpdate,
            admin,
            config,
            json,
        } => Ok(cli::node::force_config_update(
            admin.as_deref(),
            config.as_deref(),
            json,
        )),
        Cmd::Check { config, mappings } => Ok(cli::check(config.as_deref(), mappings.as_deref())),
        Cmd::Sip {
            cmd:
                SipCmd::Check {
                    print,
                    config,
                    files,
                },
        } => cli::sip_check(print, config.as_deref(), &files),
        Cmd::Translate {
            from,
            to,
            state,
            note,
            availability,
            activity,
            mappings,
        } => {
            let raw = cli::RawInput {
                availability,
                activity,
            };
            cli::translate(
                &from,
                &to,
                state.as_deref(),
                note.as_deref(),
                raw,
                mappings.as_deref(),
            )
        }
        Cmd::Policy {
            cmd,
            admin,
            config,
            json,
        } => {
            let req = match &cmd {
                PolicyCmd::Allow { user, target } => cli::policy::Request::Change {
                    op: "allow",
                    user,
                    target,
                },
                PolicyCmd::Block { user, target } => cli::policy::Request::Change {
                    op: "block",
                    user,
                    target,
                },
                PolicyCmd::Unblock { user, target } => cli::policy::Request::Change {
                    op: "unblock",
                    user,
                    target,
                },
                PolicyCmd::Show { user } => cli::policy::Request::Show { user },
            };
            Ok(cli::policy::policy(
                req,
                admin.as_deref(),
                config.as_deref(),
                json,
            ))
        }
        Cmd::Mappings {
            cmd:
                MappingsCmd::Show {
                    from,
                    to,
                    format,
                    mappings,
                },
        } => cli::mappings_show(
            from.as_deref(),
            to.as_deref(),
            matches!(format, Format::Json),
            mappings.as_deref(),
        ),
    }
}
