//! `skiff --help` and completions: every subcommand listed with a short
//! line, the concepts the output uses explained in the long help, and
//! completions that know the subcommands.

use std::process::Command;

fn skiff(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff")).args(args).output().unwrap();
    assert!(out.status.success(), "skiff {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const SUBCOMMANDS: [&str; 9] = ["analyze", "check", "explain", "install", "uninstall", "completions", "dashboard", "observe", "config"];

#[test]
fn help_lists_and_explains_and_completions_complete() {
    let top = skiff(&["--help"]);
    for c in SUBCOMMANDS {
        let line = top.lines().find(|l| l.trim_start().starts_with(&format!("{c} "))).unwrap_or_else(|| panic!("{c} not listed:\n{top}"));
        assert!(line.len() < 110, "one short line for {c}: {line}");
    }
    for (cmd, concept) in [
        ("explain", "A waypoint is the per-namespace L7 proxy"),
        ("explain", "STRICT: only mutual-TLS connections are accepted"),
        ("check", "the kernel hooks that send enrolled pods' connections to ztunnel"),
        ("observe", "the mesh never waits for it"),
        ("install", "its key goes into the Secret skiff-system/skiff-ca only"),
    ] {
        assert!(skiff(&[cmd, "--help"]).contains(concept), "skiff {cmd} --help explains: {concept}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let script = skiff(&["completions", shell]);
        for c in SUBCOMMANDS {
            assert!(script.contains(c), "{shell} completions know {c}");
        }
    }
}
