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
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Network-namespace cookie of the connecting socket.
    pub netns_cookie: u64,
    /// IPv4 address, network byte order.
    pub ip: u32,
    /// Port, network byte order (low 16 bits).
    pub port: u32,
    /// 1 when the application connected with an IPv4-mapped IPv6 address.
    pub v6_mapped: u32,
    pub _pad: u32,
}

/// Key of the `ORIG_BY_PORT` map: the loopback source port of a captured
/// connection as ztunnel's outbound listener sees it, in one netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortKey {
    pub netns_cookie: u64,
    /// Client's local port, host byte order.
    pub port: u32,
    pub _pad: u32,
}

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
}

/// Index into the `STATS` per-CPU array: connects redirected to ztunnel.
pub const STAT_CAPTURED_CONNECTS: u32 = 0;
/// Connects refused because the original destination could not be stored
/// (an internal map error: the maps are LRU and never full).
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
/// Number of counters.
pub const STAT_COUNT: u32 = 8;
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
];
