# Skiff's one image: skiff-node-agent, skiff-cni, skiff-ztunnel,
# skiff-waypoint, skiff-gateway, skiff-signer, skiff-hbone-probe (the README's debugging
# tool) and skiff (the operator's CLI) in /usr/local/bin (deploy/ runs each by its command). Build from the repository root:
#   docker build -t REGISTRY/skiff:TAG . && docker push REGISTRY/skiff:TAG
# (Not built in this project's CI: the development machines have no
# container engine.)

# --- build: the same toolchain `cargo xtask setup` prepares ----------------
FROM rust:1.95-bookworm AS build
# The eBPF programs build with nightly and -Z build-std (rust-src).
RUN rustup toolchain install nightly --profile minimal --component rust-src
# bpf-linker linked against the LLVM 22 inside the Rust toolchain (a system
# LLVM of that version is not packaged); the prefix is the binary's rpath,
# so it stays in this stage.
RUN set -eux; \
    pfx=/opt/skiff-llvm; mkdir -p "$pfx/lib"; \
    so=$(ls "$(rustc --print sysroot)"/lib/libLLVM.so.22*); \
    ln -sf "$so" "$pfx/lib/libLLVM.so"; ln -sf "$so" "$pfx/lib/"; \
    LLVM_PREFIX="$pfx" cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN set -eux; \
    cargo build --release --bins; \
    mkdir /out; \
    for b in skiff-node-agent skiff-cni skiff-ztunnel skiff-waypoint skiff-gateway skiff-signer skiff-hbone-probe skiff; do \
        cp "target/release/$b" /out/; \
    done

# --- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
# iptables: node-agent's iptables capture (`skiff.dev/capture: iptables`)
# runs iptables-restore/iptables-save in each such pod's netns.
# curl: querying the admin and metrics ports from inside the pod
# (`kubectl exec ... -- curl -s localhost:15000/config_dump`), as the README
# shows. (Pod routing is set over netlink: no iproute2 needed.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
