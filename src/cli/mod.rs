//! Implementations of the admin subcommands. Everything prints to stdout/stderr and returns
//! an exit code; the library does the work.

pub mod certs;
pub mod cluster;
pub mod doctor;
pub mod intercluster;
pub mod node;
pub mod policy;
pub mod status;

use anyhow::Result;
use legate::config;
use legate::diag::Diagnostics;
use legate::presence::map::{self, Facts, MappingSet, SystemId};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

fn load_mappings(dir: Option<&Path>) -> Result<MappingSet, Diagnostics> {
    match dir {
        Some(d) => map::load_dir(d),
        None => map::embedded(),
    }
}

/// The mapping set, or exit code 1 after printing its problems (the `check` format).
fn mappings_or_report(dir: Option<&Path>) -> Result<MappingSet, ExitCode> {
    load_mappings(dir).map_err(|d| {
        print_diags(&d);
        ExitCode::from(1)
    })
}

fn print_diags(d: &Diagnostics) {
    let mut err = std::io::stderr().lock();
    for x in &d.0 {
        let _ = writeln!(err, "{x}");
    }
}

pub fn check(config: Option<&Path>, mappings: Option<&Path>) -> ExitCode {
    let mut problems = Diagnostics::default();
    // The mapping directory: --mappings, else the one the configuration names, else embedded.
    // The configuration's own `[mappings] dir` is read before the configuration is validated,
    // because its `system` names are checked against that set.
    let dir = mappings
        .map(Path::to_path_buf)
        .or_else(|| config.and_then(configured_mappings_dir));
    let mut set = None;
    if let Some(dir) = &dir {
        match map::load_dir(dir) {
            Ok(s) => set = Some(s),
            Err(d) => problems.0.extend(d.0),
        }
    }
    if let Some(path) = config {
        // When that set is broken, the configuration is checked against the shipped systems
        // so that its own problems still show.
        let fallback = map::embedded().ok();
        let systems = set
            .as_ref()
            .or(fallback.as_ref())
            .map(config::systems_from_mappings)
            .unwrap_or_default();
        match config::load_file(path, &systems) {
            Ok(cfg) => {
                for note in cfg.notes() {
                    eprintln!("note: {}: {note}", path.display());
                }
                // Certificates are warnings, not errors: the node still starts (a partner
                // that tolerates them may exist), but the admin should act.
                let now = legate::ops::alarms::unix_now() as i64;
                for finding in legate::ops::certs::inspect(&cfg, now) {
                    eprintln!("warning: {finding}");
                }
                println!(
                    "{}: valid. `legate reload` (or SIGHUP) applies every change except these, \
                     which need a restart: {}",
                    path.display(),
                    legate::node::reload::RESTART_KEYS.join("; ")
                );
            }
            Err(d) => problems.0.extend(d.0),
        }
    }
    if mappings.is_none() && config.is_none() {
        if let Err(d) = map::embedded() {
            problems.0.extend(d.0);
        }
    }
    if problems.0.is_empty() {
        ExitCode::SUCCESS
    } else {
        print_diags(&problems);
        ExitCode::from(1)
    }
}

use legate::node::configured_mappings_dir;

pub struct RawInput {
    pub availability: Option<u32>,
    pub activity: Option<String>,
}

fn system_or_exit(set: &MappingSet, name: &str, role: &str) -> Result<SystemId, ExitCode> {
    set.system_id(name).ok_or_else(|| {
        eprintln!(
            "legate translate: unknown {role} system `{name}`; valid systems: {}",
            set.system_names().collect::<Vec<_>>().join(", ")
        );
        ExitCode::from(2)
    })
}

pub fn translate(
    from: &str,
    to: &str,
    state: Option<&str>,
    note: Option<&str>,
    raw: RawInput,
    mappings: Option<&Path>,
) -> Result<ExitCode> {
    let set = match mappings_or_report(mappings) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    let (fid, tid) = match (
        system_or_exit(&set, from, "source"),
        system_or_exit(&set, to, "target"),
    ) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(c), _) | (_, Err(c)) => return Ok(c),
    };
    let fsys = set.system(fid);
    let mut decode_step = None;
    let acts: Vec<String> = raw.activity.iter().cloned().collect();
    let (sid, input, user_note) = match state {
        Some(s) => match fsys.state_id(s) {
            Some(id) => (id, s.to_string(), note),
            None => {
                eprintln!(
                    "legate translate: unknown state `{s}` of system `{from}`; valid states: {}",
                    fsys.state_names().collect::<Vec<_>>().join(", ")
                );
                return Ok(ExitCode::from(2));
            }
        },
        None => {
            let facts = Facts {
                availability: raw.availability,
                activities: &acts,
                note,
                ..Facts::default()
            };
            let d = set.decode(fid, &facts);
            let mut input = Vec::new();
            if let Some(a) = raw.availability {
                input.push(format!("availability={a}"));
            }
            if let Some(a) = &raw.activity {
                input.push(format!("activity={a}"));
            }
            let input = input.join(" ");
            decode_step = Some(format!(
                "{}:{input} -> {} (decode rule {} in {})",
                fsys.name,
                fsys.state(d.state).name,
                d.rule + 1,
                fsys.file
            ));
            (d.state, input, d.note)
        }
    };
    let t = set.translate(fid, tid, sid, user_note);
    let mut path = set.describe_path(fid, tid, sid, &t);
    if let Some(step) = decode_step {
        path.insert(0, step);
    }
    let out = json!({
        "from": from,
        "to": to,
        "input": input,
        "state": set.system(tid).state(t.state).name.as_ref(),
        "note": t.note.as_deref(),
        "path": path,
    });
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn cell_text(state: &str, note: Option<&str>) -> String {
    match note {
        Some(n) => format!("{state} (note \"{n}\")"),
        None => state.to_string(),
    }
}

fn aligned(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths.get(c).copied().unwrap_or(0)))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    out
}

pub fn mappings_show(
    from: Option<&str>,
    to: Option<&str>,
    json_out: bool,
    mappings: Option<&Path>,
) -> Result<ExitCode> {
    let set = match mappings_or_report(mappings) {
        Ok(s) => s,
        Err(code) => return Ok(code),
    };
    for (n, role) in [(from, "source"), (to, "target")] {
        if let Some(n) = n {
            if let Err(c) = system_or_exit(&set, n, role) {
                return Ok(c);
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    if let (Some(f), Some(t)) = (from, to) {
        // The effective mapping for the pair, whichever route each state takes.
        let (fid, tid) = match (set.system_id(f), set.system_id(t)) {
            (Some(a), Some(b)) => (a, b),
            _ => return Ok(ExitCode::from(2)),
        };
        let fsys = set.system(fid);
        let tsys = set.system(tid);
        let mut rows = vec![vec![f.to_string(), t.to_string(), "via".to_string()]];
        let mut jrows = Vec::new();
        let mut entries: Vec<(map::StateId, Option<&str>, map::Translation)> = Vec::new();
        for (sid, _) in fsys.state_ids() {
            entries.push((sid, None, set.translate(fid, tid, sid, None)));
        }
        for (sid, note) in set.pair_note_rows(fid, tid) {
            entries.push((sid, Some(note), set.translate(fid, tid, sid, Some(note))));
        }
        for (sid, note, tr) in &entries {
            let (sid, note) = (*sid, *note);
            let input: &str = &fsys.state(sid).name;
            let path = set.describe_path(fid, tid, sid, tr);
            let via = path
                .get(1)
                .cloned()
                .filter(|_| path.len() > 2)
                .unwrap_or_else(|| "identity".into());
            rows.push(vec![
                cell_text(input, note),
                cell_text(&tsys.state(tr.state).name, tr.note.as_deref()),
                via,
            ]);
            jrows.push(json!({"input": input, "input_note": note, "state": tsys.state(tr.state).name.as_ref(), "note": tr.note.as_deref(), "path": path}));
        }
        if json_out {
            writeln!(stdout, "{}", json!({"from": f, "to": t, "rows": jrows}))?;
        } else {
            writeln!(stdout, "{} -> {}\n", fsys.name, tsys.name)?;
            write!(stdout, "{}", aligned(&rows))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut jtables = Vec::new();
    for tb in &set.tables {
        let fname = &set.system(tb.from).name;
        if from.is_some_and(|f| f != &**fname) {
            continue;
        }
        let tnames: Vec<&str> = tb.to.iter().map(|id| &*set.system(*id).name).collect();
        if to.is_some_and(|t| !tnames.contains(&t)) {
            continue;
        }
        let mut rows = vec![std::iter::once(fname.to_string())
            .chain(tnames.iter().map(|s| s.to_string()))
            .collect::<Vec<_>>()];
        let mut jrows = Vec::new();
        let fsys = set.system(tb.from);
        for r in &tb.rows {
            let mut line = vec![cell_text(
                &fsys.state(r.from).name,
                r.from_note_display.as_deref(),
            )];
            let mut cells = serde_json::Map::new();
            for (c, tid) in r.cells.iter().zip(&tb.to) {
                let tsys = set.system(*tid);
                line.push(cell_text(&tsys.state(c.state).name, c.note.as_deref()));
                cells.insert(
                    tsys.name.to_string(),
                    json!({"state": tsys.state(c.state).name.as_ref(), "note": c.note.as_deref()}),
                );
            }
            rows.push(line);
            jrows.push(json!({"from": fsys.state(r.from).name.as_ref(), "from_note": r.from_note_display, "to": cells, "line": r.line}));
        }
        if json_out {
            jtables.push(json!({"title": tb.title, "file": tb.file, "from": &**fname, "to": tnames, "fallback": if tb.fallback {Some("canonical")} else {None}, "rows": jrows}));
        } else {
            writeln!(stdout, "{}  [{}]", tb.title, tb.file)?;
            write!(stdout, "{}", aligned(&rows))?;
            if tb.fallback {
                writeln!(
                    stdout,
                    "(other {fname} states: through the canonical model)"
                )?;
            }
            writeln!(stdout)?;
        }
    }
    if json_out {
        writeln!(stdout, "{}", json!({"tables": jtables}))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn sip_check(
    print: bool,
    config: Option<&Path>,
    files: &[std::path::PathBuf],
) -> Result<ExitCode> {
    use legate::sip::check::SizeLimits;
    // The bounds the running edge would apply: the configuration's, else the defaults.
    let limits = match config {
        None => SizeLimits::default(),
        Some(path) => {
            let shipped = map::embedded().ok();
            let systems = shipped
                .as_ref()
                .map(config::systems_from_mappings)
                .unwrap_or_default();
            match config::load_file(path, &systems) {
                Ok(cfg) => SizeLimits::from_config(&cfg.limits),
                Err(d) => {
                    eprint!("{d}");
                    return Ok(ExitCode::from(1));
                }
            }
        }
    };
    if print {
        let [file] = files else {
            eprintln!("legate sip check --print takes exactly one FILE");
            return Ok(ExitCode::from(2));
        };
        let mut buf = Vec::new();
        return Ok(
            match legate::sip::check::print_file_with(file, limits, &mut buf) {
                Ok(()) => {
                    std::io::stdout().lock().write_all(&buf)?;
                    ExitCode::SUCCESS
                }
                Err(reason) => {
                    eprintln!("{reason}");
                    ExitCode::from(1)
                }
            },
        );
    }
    let mut out = std::io::stdout().lock();
    let all_ok = legate::sip::check::check_files_with(files, limits, &mut out)?;
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn run(config_path: Option<&Path>, mappings: Option<std::path::PathBuf>) -> Result<ExitCode> {
    // Validate everything before binding anything (the node reads the same files again on
    // each reload).
    let source = legate::node::ConfigSource {
        path: config_path.map(Path::to_path_buf),
        mappings,
    };
    if config_path.is_none() {
        // A newcomer's first run: say what this node is and what to do next, once, where
        // they look (stdout, beside the `listening` lines), instead of leaving only warnings.
        println!(
            "legate: running the embedded default (local domain example.com, no home node, no \
             partner): it accepts connections but has nowhere to deliver. Next: copy \
             legate.example.toml, declare your XMPP server under [[home_node]] (and a Component \
             per partner domain on it), your partners under [[sip.federated_domain]] or \
             [xmpp.federation], a certificate under [tls]; then `legate check --config FILE` \
             and `legate run --config FILE`."
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(async move {
        let node = legate::node::Node::build(source).await?;
        legate::node::signals::run_until_signalled(node).await
    });
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The `check` format: one `file:line:col: message` per line, exit 1.
        Err(legate::node::NodeError::Config(d) | legate::node::NodeError::Mappings(d)) => {
            print_diags(&d);
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}
