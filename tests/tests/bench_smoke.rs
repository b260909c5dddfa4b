//! A tiny run of the HBONE benchmark: proves the harness works and every
//! path produced figures. No timing is asserted.

use std::path::Path;

use skiff_e2e::*;
use skiff_localmesh::{bench, compare};

/// Envoy and oha as `cargo xtask test` installs them (`SKIFF_ENVOY`,
/// `SKIFF_OHA`); None (a skip, or under CI a failure) without them.
fn bench_tools() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let tool = |var: &str| std::env::var_os(var).map(std::path::PathBuf::from).filter(|p| p.exists());
    let (Some(envoy), Some(oha)) = (tool("SKIFF_ENVOY"), tool("SKIFF_OHA")) else {
        let msg = "SKIFF_ENVOY / SKIFF_OHA not set to installed tools: run the suite with `cargo xtask test`, which installs them";
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0") {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return None;
    };
    Some((envoy, oha))
}

#[test]
fn hbone_benchmark_harness_produces_figures_for_every_path() {
    // Skips (or, under CI, fails) like every privileged test.
    let Some(probe) = mesh("manifests/l4") else { return };
    drop(probe);
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bench");
    let results = bench::hbone(&bench::BenchOptions::quick(manifests, bin_dir())).expect("benchmark ran");
    let modes: Vec<&str> = results.iter().map(|r| r.mode).collect();
    assert_eq!(modes, ["direct", "ztunnel-plain", "hbone", "relay floor"]);
    for r in &results {
        assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us && r.gbit_per_s > 0.0, "{r:?}");
        // The proxies' CPU is read on every path that has proxies.
        assert_eq!(r.proxy_cpu_ms_per_1000.is_some(), r.mode != "direct", "{r:?}");
    }
}

/// A `--quick` run of `bench compare`: every mode (no mesh, Envoy sidecars,
/// ambient L4, ambient + waypoint, ambient with iptables capture) produced
/// valid figures, the in-bench correctness checks passed (they fail the
/// run otherwise), and the JSON, table and chart were written. No timing is
/// asserted.
#[test]
fn compare_benchmark_harness_produces_valid_figures_for_every_mode() {
    let Some(probe) = mesh("manifests/l4") else { return };
    drop(probe);
    let Some((envoy, oha)) = bench_tools() else { return };
    // Removed however the test ends.
    let dir = tempfile::Builder::new().prefix("skiff-bench-compare-").tempdir().expect("temporary directory");
    let out = dir.path().join("out");
    let o = compare::CompareOptions::quick(bin_dir(), envoy, oha, out.clone());
    let report = compare::compare(&o).expect("benchmark ran");
    let modes: Vec<compare::Mode> = report.summary.iter().map(|s| s.mode).collect();
    assert_eq!(modes, compare::Mode::ALL.to_vec());
    for r in &report.runs {
        assert!(r.http_valid, "{:?}: generator below target or failures: {r:?}", r.mode);
        assert!(r.http.p50 > 0.0 && r.http.p99 >= r.http.p50, "{r:?}");
        // Whether sockperf kept its target rate is a timing (a loaded CI
        // machine misses it now and then): reported, not asserted here.
        assert!(r.tcp_rr.p50 > 0.0 && r.tcp_rr.p99 >= r.tcp_rr.p50, "{r:?}");
        assert!(r.bulk_1_gbit_s > 0.0 && r.bulk_4_gbit_s > 0.0 && r.churn_per_s > 0.0, "{r:?}");
        assert!(r.usage.box_cpu_s > 0.0, "{r:?}");
        if r.mode != compare::Mode::M0 {
            assert!(!r.usage.process_cpu_s.is_empty() && r.usage.rss_mib.values().all(|&m| m > 0.0), "mesh processes not found: {r:?}");
        }
    }
    assert!(report.scale.iter().all(|p| p.sidecar_total_mib > 0.0 && p.ambient_ztunnel_mib > 0.0), "{:?}", report.scale);
    for f in ["compare.json", "compare.md", "compare.svg"] {
        let meta = std::fs::metadata(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(meta.len() > 100, "{f} is empty");
    }
}


/// A `--quick` run of `bench gateway`: HTTPS through Skiff's ingress
/// gateway and through Envoy as the same gateway, beside a direct call;
/// every path produced figures and the in-bench checks (the gateway served
/// and sent over HBONE) passed. No timing is asserted.
#[test]
fn gateway_benchmark_harness_produces_figures_for_every_path() {
    let Some(probe) = mesh("manifests/l4") else { return };
    drop(probe);
    let Some((envoy, oha)) = bench_tools() else { return };
    let o = bench::GatewayBenchOptions {
        l7: bench::L7BenchOptions {
            manifests: Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bench-gateway"),
            bin_dir: bin_dir(),
            oha,
            rate: 100,
            connections: 2,
            seconds: 1,
            repetitions: 1,
            out: None,
        },
        envoy,
    };
    let results = bench::gateway(&o).expect("benchmark ran");
    let modes: Vec<&str> = results.iter().map(|r| r.mode).collect();
    assert_eq!(modes, ["direct", "skiff-gateway", "envoy-gateway"]);
    for r in &results {
        assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us && r.achieved_rps > 0.0, "{r:?}");
    }
    assert!(results[1..].iter().all(|r| r.waypoint_cpu_ms_per_1000.is_some()), "{results:?}");
}

/// A tiny run of the waypoint benchmark with its traced path: every path
/// produced figures, the waypoint's CPU was measured with and without
/// tracing, and the traced runs' spans reached the collector (the
/// harness fails otherwise). No timing is asserted.
#[test]
fn waypoint_benchmark_harness_measures_tracing_on_and_off() {
    let Some(probe) = mesh("manifests/l4") else { return };
    drop(probe);
    let Some((_, oha)) = bench_tools() else { return };
    let o = bench::L7BenchOptions {
        manifests: Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bench-l7"),
        bin_dir: bin_dir(),
        oha,
        rate: 100,
        connections: 2,
        seconds: 1,
        repetitions: 1,
        out: None,
    };
    let results = bench::waypoint(&o).expect("benchmark ran");
    let modes: Vec<&str> = results.iter().map(|r| r.mode).collect();
    assert_eq!(modes, ["direct", "ambient-l4", "ambient-waypoint", "ambient-waypoint-traced"]);
    for r in &results {
        assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us && r.achieved_rps > 0.0, "{r:?}");
    }
    assert!(results[2..].iter().all(|r| r.waypoint_cpu_ms_per_1000.is_some()), "{results:?}");
}
