//! `skiff`: the operator's command-line tool.
//!
//! `skiff analyze DIR` reads a directory of Kubernetes and Istio manifests
//! exactly as node-agent, ztunnel and the waypoint read them, and prints one
//! line per problem: the file, the object, the field and why, and what the
//! mesh would serve instead. Nothing runs and nothing is contacted.
//!
//! `skiff check --pre` says whether this node can run Skiff's capture
//! (see `check.rs`).
//!
//! Exit codes (analyze): 0 no object refused (fail-closed readings are printed as
//! warnings; `--strict` counts them too), 1 some object refused, 2 the
//! directory could not be read or the command line is wrong.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

mod check;

/// skiff: check and explain a Skiff mesh.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a directory of manifests offline, as the mesh would read it:
    /// every refused object and every fail-closed reading, with file,
    /// object, field and reason.
    Analyze {
        /// The directory (searched recursively for *.yaml, *.yml, *.json).
        dir: PathBuf,
        /// Output: `text` (one line per problem) or `json`.
        #[arg(short, long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
        /// Also fail (exit 1) on warnings: fields read fail-closed.
        #[arg(long)]
        strict: bool,
    },
    /// `--pre`: whether this node can run Skiff's capture (kernel, cgroup
    /// v2, BTF, bpffs, and as root every capture program loaded into this
    /// kernel), one OK/WARN/FAIL line each; exit 1 on any FAIL. (The check
    /// of a running mesh is not built yet.)
    Check {
        /// This node's prerequisites, before installing.
        #[arg(long, required = true)]
        pre: bool,
        /// The skiff-node-agent binary that loads the programs (default:
        /// beside skiff, else on the PATH).
        #[arg(long)]
        node_agent: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Analyze { dir, output, strict } => analyze(&dir, &output, strict),
        Command::Check { pre: _, node_agent } => {
            let root = check::effective_uid() == Some(0);
            let lines = check::pre(node_agent.or_else(check::find_node_agent).as_deref(), root);
            for l in &lines {
                println!("{l}");
            }
            if lines.iter().any(|l| l.level == check::Level::Fail) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

fn analyze(dir: &std::path::Path, output: &str, strict: bool) -> ExitCode {
    let snap = match skiff_core::source::LocalDirSource::analyze(dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skiff analyze: {}", e.report());
            return ExitCode::from(2);
        }
    };
    if output == "json" {
        let v = serde_json::json!({
            "rejected": snap.rejected.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
            "warnings": snap.warnings,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for r in &snap.rejected {
            println!("error: {r}");
        }
        for w in &snap.warnings {
            println!("warning: {w}");
        }
        let objects = snap.namespaces.len()
            + snap.workloads.len()
            + snap.services.len()
            + snap.peer_authentications.len()
            + snap.authorization_policies.len()
            + snap.virtual_services.len()
            + snap.destination_rules.len();
        eprintln!(
            "skiff analyze {}: {} object(s) taken, {} refused, {} warning(s)",
            dir.display(),
            objects,
            snap.rejected.len(),
            snap.warnings.len()
        );
    }
    if !snap.rejected.is_empty() || (strict && !snap.warnings.is_empty()) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
