//! Types and constants shared by Skiff's eBPF programs (`skiff-ebpf`) and the
//! userspace that loads them (`skiff-node-agent`).
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, with explicit padding, so
//! both sides agree on the layout byte for byte. Addresses and ports are
//! stored in network byte order, as the kernel hands them to the programs.
#![no_std]
#![deny(unsafe_code)]

/// SO_MARK that ztunnel sets on its own sockets: capture lets them through
/// (no loop) and the bind guard lets them onto the mesh ports.
pub const MARK_BYPASS: u32 = 0x539;
/// SO_MARK on ztunnel's delivery sockets (inbound, ztunnel -> app). The pod's
/// policy routing sends packets with this mark (and, through
/// `tcp_fwmark_accept`, the app's replies) back over loopback to ztunnel.
pub const MARK_DELIVER: u32 = 0x53a;
/// Routing table, in each enrolled pod's netns, that makes every address
/// local on `lo` for packets carrying [`MARK_DELIVER`].
pub const DELIVER_ROUTE_TABLE: u32 = 100;

/// ztunnel's in-pod outbound listener (127.0.0.1).
pub const PORT_OUTBOUND: u16 = 15001;
/// ztunnel's in-pod inbound listener for plaintext (reached only through
/// `sk_lookup`, bound to 127.0.0.1).
pub const PORT_INBOUND_PLAINTEXT: u16 = 15006;
/// ztunnel's in-pod inbound listener for HBONE (bound to the pod IP).
pub const PORT_INBOUND_HBONE: u16 = 15008;

/// Mesh ports inside a pod: applications may not bind them, and inbound
/// capture does not redirect connections addressed to them.
pub const MESH_PORTS: [u16; 3] = [PORT_OUTBOUND, PORT_INBOUND_PLAINTEXT, PORT_INBOUND_HBONE];

/// `EnrolledPod::flags` bit: capture outbound connects of this pod.
pub const ENROLL_OUTBOUND: u32 = 1;
/// `EnrolledPod::flags` bit: inbound capture is attached to this pod's netns.
/// Informational (reported by `inspect`): inbound capture is the per-netns
/// sk_lookup link itself, so the programs do not read this bit.
pub const ENROLL_INBOUND: u32 = 2;

/// Value of the `ENROLLED` map, keyed by the pod's network-namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Pod IPv4 address, network byte order.
    pub pod_ip: u32,
    /// `ENROLL_*` bits.
    pub flags: u32,
}

/// The destination an application asked for before connect4/6 rewrote it.
/// Kept in the socket's own storage (`ORIG`, a socket-local map: it lives
/// and dies with the socket, so no pod can push out another's): on the
/// application's socket from its connect, and on ztunnel's accepted socket
/// from the end of the handshake.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Network-namespace cookie of the connecting socket.
    pub netns_cookie: u64,
    /// IPv4 address, network byte order.
    pub ip: u32,
    /// Port, network byte order (low 16 bits).
    pub port: u32,
    /// `ORIG_*` bits.
    pub flags: u32,
    /// The client's loopback port once its SYN left (sock_ops), host byte
    /// order; 0 before. With `local_ip`, its `ORIG_BY_TUPLE` key.
    pub local_port: u32,
    /// The client's source address once its SYN left, network byte order.
    pub local_ip: u32,
    pub _pad: u32,
}

/// `OrigDst::flags` bit: the application connected with an IPv4-mapped
/// IPv6 address.
pub const ORIG_V6_MAPPED: u32 = 1;
/// `OrigDst::flags` bit: capture rewrote this socket's connect and its SYN
/// has not left yet; only then does the SYN write an `ORIG_BY_TUPLE` entry.
pub const ORIG_ARMED: u32 = 2;

/// Key of the `ORIG_BY_TUPLE` map: a captured connection's client address
/// as ztunnel's outbound listener (always 127.0.0.1:15001) sees it, in one
/// netns. With the listener's address fixed, this is the connection's
/// 4-tuple, which the kernel keeps unique: no other live connection can
/// have, or overwrite, this key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortKey {
    pub netns_cookie: u64,
    /// Client's source IPv4 address, network byte order.
    pub ip: u32,
    /// Client's local port, host byte order.
    pub port: u32,
}

/// Value of `ORIG_BY_TUPLE`, which carries a destination across the
/// handshake, from the application's socket to ztunnel's accepted one: the
/// destination, the cookie of the client socket that wrote it (so that
/// socket's release removes only its own entry) and when it was written.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortDst {
    /// Socket cookie of the client socket.
    pub cookie: u64,
    /// IPv4 address, network byte order.
    pub ip: u32,
    /// Port, network byte order (low 16 bits).
    pub port: u32,
    /// `ORIG_*` bits.
    pub flags: u32,
    /// CLOCK_MONOTONIC seconds when the SYN left: node-agent removes
    /// entries older than `--captured-handshake-timeout`.
    pub created: u32,
}

/// Value of `POD_HANDSHAKES`, keyed by a pod's netns cookie: its handshake
/// slots taken (one per `ORIG_BY_TUPLE` entry, until ztunnel's listener
/// completes the handshake), and connects refused because that reached
/// the quota. Only
/// the programs change it, with atomic adds. Entries node-agent removes as
/// stale are counted apart, in `RECLAIMED` (node-agent's only), and the
/// programs count `pending - reclaimed`. Signed: counters a pod's release
/// removed and the programs made again can go below zero as older
/// handshakes finish, which only ever lowers the count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodHandshakes {
    pub pending: i64,
    pub refused: u64,
}

/// Index into the `CONFIG` array (written by node-agent at start): the most
/// handshake slots (see `PodHandshakes`) one pod may hold at once.
pub const CONFIG_POD_HANDSHAKES: u32 = 0;
/// Number of `CONFIG` slots.
pub const CONFIG_COUNT: u32 = 1;
/// Used when `CONFIG_POD_HANDSHAKES` is 0 (not written yet).
pub const DEFAULT_POD_HANDSHAKES: u64 = 4096;
/// Default size of `ORIG_BY_TUPLE` (node-agent's `--max-captured-handshakes`
/// sets it when it creates the map).
pub const DEFAULT_HANDSHAKES: u32 = 65536;
/// Default size of `ENROLLED`, `INBOUND_SOCKS`, `POD_HANDSHAKES` and
/// `RECLAIMED` (node-agent's `--max-pods` sets it when it creates them).
pub const MAX_PODS: u32 = 16384;
/// Default size of `MESH_SOCKS` (node-agent's `--max-mesh-sockets`).
pub const DEFAULT_MESH_SOCKETS: u32 = 65536;

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod_impls {
    // SAFETY: plain #[repr(C)] integers with explicit padding: every bit
    // pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodHandshakes {}
}

/// Index into the `STATS` per-CPU array: connects redirected to ztunnel.
pub const STAT_CAPTURED_CONNECTS: u32 = 0;
/// Captured connects whose original destination could not be kept: the
/// socket's storage could not be made (refused), `POD_HANDSHAKES` is full
/// (refused), or `ORIG_BY_TUPLE` is full when the SYN leaves (ztunnel then
/// finds no destination and closes the connection).
pub const STAT_REFUSED_NO_STATE: u32 = 1;
/// Native IPv6 connects from, and IPv6 connections into, enrolled pods: refused.
pub const STAT_REFUSED_NATIVE_V6: u32 = 2;
/// Binds of a mesh port by an application in an enrolled pod, refused.
pub const STAT_BIND_DENIED: u32 = 3;
/// `SO_ORIGINAL_DST` queries answered.
pub const STAT_ORIG_DST_ANSWERED: u32 = 4;
/// Inbound connections handed to ztunnel.
pub const STAT_INBOUND_REDIRECTS: u32 = 5;
/// Inbound connections dropped because ztunnel's listener was missing.
pub const STAT_INBOUND_NO_LISTENER: u32 = 6;
/// Sockets in enrolled pods that carried a mesh mark without being one of
/// ztunnel's (registered in `MESH_SOCKS`): treated as the application's.
pub const STAT_FORGED_MARK: u32 = 7;
/// Connects refused because the pod already held its quota of handshake
/// slots (`CONFIG_POD_HANDSHAKES`).
pub const STAT_REFUSED_POD_HANDSHAKES: u32 = 8;
/// Number of counters.
pub const STAT_COUNT: u32 = 9;
/// Names of the counters, by index, for reports.
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "captured_connects",
    "refused_no_state",
    "refused_native_ipv6",
    "bind_denied",
    "orig_dst_answered",
    "inbound_redirects",
    "inbound_no_listener",
    "forged_mark",
    "refused_pod_handshakes",
];
