//! Builds the eBPF programs (ebpf/skiff-ebpf) with nightly for
//! bpfel-unknown-none and embeds them. `AYA_BUILD_SKIP=1` skips this (for
//! tooling that only needs the userspace code to type-check).

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).join("..").join("ebpf");
    let program_dir = root.join("skiff-ebpf");
    let common_dir = root.join("skiff-ebpf-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let program_dir = program_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "skiff-ebpf", root_dir: program_dir, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker",
    )
}
