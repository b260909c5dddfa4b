//! A tiny run of the HBONE benchmark: proves the harness works and every
//! path produced figures. No timing is asserted.

use std::path::Path;

use skiff_e2e::*;
use skiff_localmesh::bench;

#[test]
fn hbone_benchmark_harness_produces_figures_for_every_path() {
    // Skips (or, under CI, fails) like every privileged test.
    let Some(probe) = mesh("manifests/l4") else { return };
    drop(probe);
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bench");
    let results = bench::hbone(&bench::BenchOptions::quick(manifests, bin_dir())).expect("benchmark ran");
    let modes: Vec<&str> = results.iter().map(|r| r.mode).collect();
    assert_eq!(modes, ["direct", "ztunnel-plain", "hbone"]);
    for r in &results {
        assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us && r.gbit_per_s > 0.0, "{r:?}");
    }
}
