//! `legate doctor DOMAIN`: loads the configuration as `check` and `run` do, runs the federation
//! self-test (`legate::doctor`) and prints its report. Exit codes: 0 federation would work,
//! 1 a step failed, 2 usage or configuration error.

use legate::config::{self, Domain};
use legate::doctor::{self, Options};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub fn doctor(domain: &str, config_path: Option<&Path>, json: bool, timeout_secs: u64) -> ExitCode {
    let domain = match Domain::parse(domain) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("legate doctor: `{domain}` is not a domain name: {e}");
            return ExitCode::from(2);
        }
    };
    if timeout_secs == 0 {
        eprintln!("legate doctor: --timeout must be at least 1 second");
        return ExitCode::from(2);
    }
    let maps_dir = config_path.and_then(super::configured_mappings_dir);
    let systems_set = match super::mappings_or_report(maps_dir.as_deref()) {
        Ok(s) => s,
        Err(_) => return ExitCode::from(2),
    };
    let cfg = match config_path {
        Some(p) => match config::load_file(p, &config::systems_from_mappings(&systems_set)) {
            Ok(c) => c,
            Err(d) => {
                super::print_diags(&d);
                return ExitCode::from(2);
            }
        },
        None => config::embedded_default(),
    };
    let total = Duration::from_secs(timeout_secs);
    let opts = Options {
        timeout: total,
        per_step: total.min(Options::default().per_step),
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("legate doctor: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = rt.block_on(doctor::run(&cfg, &domain, opts));
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render_text());
    }
    ExitCode::from(report.exit_code())
}
