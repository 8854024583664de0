//! `sagamesh-manifest-check`: checks ServiceRegistration and Saga manifests as the API server
//! and `sagamesh local` check them (CRD schema and CEL), naming file, line and field.
//!
//! - `sagamesh-manifest-check PATH...` (files, or directories of `*.yaml` / `*.yml`): prints each
//!   problem, then a summary; exits 1 when there is any problem.
//! - `sagamesh-manifest-check --json FILE...`: prints one report per file
//!   (`sagamesh_api::manifest_report::FileReport`) and exits 0; the sidecar's `--manifests` runs
//!   it this way, as a short-lived child, on every change of its files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sagamesh_manifest::manifest_files;
use sagamesh_manifest::report::check_files;

#[derive(Parser)]
#[command(name = "sagamesh-manifest-check", version, about)]
struct Args {
    /// Print one JSON report per file on stdout (the sidecar's format) and exit 0.
    #[arg(long)]
    json: bool,
    /// Manifest files, or directories of `*.yaml` / `*.yml` files (not recursive).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut files = Vec::new();
    for path in &args.paths {
        if path.is_dir() {
            match manifest_files(path) {
                Ok(found) => files.extend(found),
                Err(e) => {
                    eprintln!("{}: cannot read directory: {e}", path.display());
                    return ExitCode::from(2);
                }
            }
        } else {
            // A missing or unreadable file is a problem in its report.
            files.push(path.clone());
        }
    }
    let reports = check_files(&files);
    if args.json {
        return match serde_json::to_string(&reports) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot write the report: {e}");
                ExitCode::from(2)
            }
        };
    }
    let problems: usize = reports.iter().map(|r| r.problems.len()).sum();
    for problem in reports.iter().flat_map(|r| &r.problems) {
        eprintln!("{problem}");
    }
    let registrations: usize = reports.iter().map(|r| r.registrations.len()).sum();
    println!(
        "{} file(s): {registrations} ServiceRegistration(s) valid, {problems} problem(s)",
        reports.len()
    );
    if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
