//! Skiff's capture programs. They only look up and rewrite: which pods are
//! enrolled, and where ztunnel listens, is decided in userspace (node-agent
//! fills `ENROLLED`, ztunnel fills `INBOUND_SOCKS`).
//!
//! Programs and what they do:
//! - `connect4` / `connect6`: a TCP connect from an enrolled netns goes to
//!   ztunnel's in-pod listener 127.0.0.1:15001; the destination the
//!   application asked for is kept under the socket's cookie.
//! - `sockops`: when that connect leaves (TCP_CONNECT_CB) the client's
//!   loopback port is known; the original destination is re-keyed by
//!   (netns, port) so the accepting side can find it.
//! - `getsockopt`: answers `SO_ORIGINAL_DST` on ztunnel's accepted socket,
//!   the interface iptables REDIRECT offers, so ztunnel reads it one way.
//! - `getpeername4` / `getpeername6`: the application sees its real peer.
//! - `bind4` / `bind6`: applications in enrolled pods cannot bind mesh ports.
//! - `inbound` (sk_lookup, attached per pod netns): TCP arriving from outside
//!   the pod is handed to ztunnel's inbound listener.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use skiff_ebpf_common::{
    EnrolledPod, OrigDst, PortKey, ENROLL_OUTBOUND, MARK_BYPASS, MARK_DELIVER,
    MESH_PORTS, PORT_INBOUND_HBONE, PORT_OUTBOUND, STAT_BIND_DENIED, STAT_CAPTURED_CONNECTS, STAT_COUNT,
    STAT_INBOUND_NO_LISTENER, STAT_INBOUND_REDIRECTS, STAT_ORIG_DST_ANSWERED,
    STAT_FORGED_MARK, STAT_REFUSED_NATIVE_V6, STAT_REFUSED_NO_STATE,
};

const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const SOL_IP: i32 = 0;
const SO_ORIGINAL_DST: i32 = 80;
const LOOPBACK_IFINDEX: u32 = 1;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
/// Return value of cgroup sock_addr / sockopt programs: let the call proceed.
const ALLOW: i32 = 1;
/// Return value of cgroup sock_addr programs: fail the call with EPERM.
const DENY: i32 = 0;

/// Enrolled pods, keyed by network-namespace cookie. Filled by node-agent.
#[map]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(16384, 0);

/// Original destinations, keyed by the client socket's cookie.
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// Original destinations, keyed by (netns cookie, client loopback port).
#[map]
static ORIG_BY_PORT: LruHashMap<PortKey, OrigDst> = LruHashMap::pinned(65536, 0);

/// ztunnel's inbound listener of each enrolled pod, keyed by pod IPv4
/// (network order). Filled by ztunnel; the kernel drops an entry when its
/// socket closes, which is what makes inbound fail closed.
#[map]
static INBOUND_SOCKS: SockHash<u32> = SockHash::pinned(16384, 0);

/// Sockets ztunnel made in pods, by socket cookie: ztunnel registers each
/// before it binds or connects it. The mesh marks alone are forgeable (a
/// process with CAP_NET_RAW, containerd's default, may set SO_MARK);
/// socket cookies are unique per boot and only ztunnel writes this map.
/// LRU: an entry is needed only until its socket's bind or connect.
#[map]
static MESH_SOCKS: LruHashMap<u64, u8> = LruHashMap::pinned(65536, 0);

/// The fingerprint of the node-agent build whose programs the pinned links
/// run (written by node-agent when it attaches them; no program reads it).
#[map]
static BUILD: Array<u64> = Array::pinned(1, 0);

/// Counters (per CPU) that node-agent reports: see `STAT_*`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

#[inline(always)]
fn count(stat: u32) {
    if let Some(v) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *v += 1 };
    }
}

/// 127.0.0.0/8, with the address as the kernel stores it (network order).
#[inline(always)]
fn is_loopback_v4(ip_be: u32) -> bool {
    ip_be.to_ne_bytes()[0] == 127
}

#[inline(always)]
fn loopback_v4() -> u32 {
    u32::from_ne_bytes([127, 0, 0, 1])
}

#[inline(always)]
fn outbound_port_be() -> u32 {
    PORT_OUTBOUND.to_be() as u32
}

#[inline(always)]
fn is_mesh_port(port_host: u16) -> bool {
    port_host == MESH_PORTS[0] || port_host == MESH_PORTS[1] || port_host == MESH_PORTS[2]
}

/// The enrolled pod of the calling socket's netns, if any.
#[inline(always)]
fn enrolled(ctx: &SockAddrContext) -> Option<(u64, EnrolledPod)> {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only copy of a plain value.
    let pod = unsafe { ENROLLED.get(&netns) }.copied()?;
    Some((netns, pod))
}

#[inline(always)]
fn socket_mark(ctx: &SockAddrContext) -> u32 {
    // SAFETY: `sk` of bpf_sock_addr is always a valid socket pointer here.
    unsafe {
        let sk: *mut bpf_sock = (*ctx.sock_addr).__bindgen_anon_1.sk;
        (*sk).mark
    }
}

/// Whether ztunnel registered this socket as its own.
#[inline(always)]
fn registered(ctx: &SockAddrContext) -> bool {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a presence check only.
    unsafe { MESH_SOCKS.get(&cookie) }.is_some()
}

/// ztunnel's own sockets: its mark (`MARK_BYPASS`, or with `or_deliver`
/// also `MARK_DELIVER`) *and* registered by ztunnel.
/// A mark without registration is forged: counted, and the socket is
/// treated as the application's (captured, guarded).
#[inline(always)]
fn is_mesh_socket(ctx: &SockAddrContext, or_deliver: bool) -> bool {
    let mark = socket_mark(ctx);
    if mark != MARK_BYPASS && !(or_deliver && mark == MARK_DELIVER) {
        return false;
    }
    if registered(ctx) {
        return true;
    }
    count(STAT_FORGED_MARK);
    false
}

#[cgroup_sock_addr(connect4)]
pub fn skiff_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(DENY)
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i64> {
    // SAFETY: ctx pointer supplied by the kernel.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return Ok(ALLOW);
    }
    let Some((netns, pod)) = enrolled(ctx) else {
        return Ok(ALLOW);
    };
    if pod.flags & ENROLL_OUTBOUND == 0 || is_loopback_v4(sa.user_ip4) || is_mesh_socket(ctx, true) {
        return Ok(ALLOW);
    }
    let orig = OrigDst {
        netns_cookie: netns,
        ip: sa.user_ip4,
        port: sa.user_port,
        v6_mapped: 0,
        _pad: 0,
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The map is LRU (the oldest entry makes room), so this fails only on
    // an internal error: refuse rather than bypass.
    ORIG_BY_COOKIE.insert(&cookie, &orig, 0).map_err(|_| {
        count(STAT_REFUSED_NO_STATE);
        0i64
    })?;
    sa.user_ip4 = loopback_v4();
    sa.user_port = outbound_port_be();
    count(STAT_CAPTURED_CONNECTS);
    Ok(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn skiff_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(DENY)
}

/// `::ffff:a.b.c.d` as the kernel stores it: word 2 is 0x0000ffff in network order.
#[inline(always)]
fn v4_mapped_marker() -> u32 {
    u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i64> {
    // SAFETY: ctx pointer supplied by the kernel.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return Ok(ALLOW);
    }
    let Some((netns, pod)) = enrolled(ctx) else {
        return Ok(ALLOW);
    };
    if pod.flags & ENROLL_OUTBOUND == 0 || is_mesh_socket(ctx, true) {
        return Ok(ALLOW);
    }
    let (w0, w1, w2, w3) = (sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]);
    if w0 == 0 && w1 == 0 && w2 == 0 && w3 == u32::from_ne_bytes([0, 0, 0, 1]) {
        // ::1 stays inside the pod.
        return Ok(ALLOW);
    }
    if !(w0 == 0 && w1 == 0 && w2 == v4_mapped_marker()) {
        // Native IPv6: ztunnel has no IPv6 path yet. Refuse rather than let
        // the connection leave the pod uncaptured.
        count(STAT_REFUSED_NATIVE_V6);
        return Ok(DENY);
    }
    if is_loopback_v4(w3) {
        return Ok(ALLOW);
    }
    let orig = OrigDst {
        netns_cookie: netns,
        ip: w3,
        port: sa.user_port,
        v6_mapped: 1,
        _pad: 0,
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE.insert(&cookie, &orig, 0).map_err(|_| {
        count(STAT_REFUSED_NO_STATE);
        0i64
    })?;
    sa.user_ip6[3] = loopback_v4();
    sa.user_port = outbound_port_be();
    count(STAT_CAPTURED_CONNECTS);
    Ok(ALLOW)
}

/// The original destination of a captured socket whose kernel-reported peer
/// is ztunnel's outbound listener.
#[inline(always)]
fn captured_peer(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only copy of a plain value.
    unsafe { ORIG_BY_COOKIE.get(&cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn skiff_peer4(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx pointer supplied by the kernel.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_ip4 != loopback_v4() || sa.user_port != outbound_port_be() {
        return ALLOW;
    }
    if let Some(orig) = captured_peer(&ctx) {
        sa.user_ip4 = orig.ip;
        sa.user_port = orig.port;
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn skiff_peer6(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx pointer supplied by the kernel.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_ip6[2] != v4_mapped_marker()
        || sa.user_ip6[3] != loopback_v4()
        || sa.user_port != outbound_port_be()
    {
        return ALLOW;
    }
    if let Some(orig) = captured_peer(&ctx) {
        sa.user_ip6[3] = orig.ip;
        sa.user_port = orig.port;
    }
    ALLOW
}

#[inline(always)]
fn bind_guard(ctx: &SockAddrContext) -> i32 {
    // SAFETY: ctx pointer supplied by the kernel.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    if !is_mesh_port(port) || enrolled(ctx).is_none() || is_mesh_socket(ctx, false) {
        return ALLOW;
    }
    count(STAT_BIND_DENIED);
    DENY
}

#[cgroup_sock_addr(bind4)]
pub fn skiff_bind4(ctx: SockAddrContext) -> i32 {
    bind_guard(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn skiff_bind6(ctx: SockAddrContext) -> i32 {
    bind_guard(&ctx)
}

#[sock_ops]
pub fn skiff_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only copy of a plain value.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    let key = PortKey {
        netns_cookie: orig.netns_cookie,
        port: ctx.local_port(),
        _pad: 0,
    };
    // If this fails ztunnel cannot learn the destination and closes the
    // connection: still closed, never bypassed.
    let _ = ORIG_BY_PORT.insert(&key, &orig, 0);
    1
}

#[cgroup_sockopt(getsockopt)]
pub fn skiff_sockopt(ctx: SockoptContext) -> i32 {
    try_getsockopt(&ctx);
    ALLOW
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) -> Option<()> {
    // SAFETY: ctx pointer supplied by the kernel.
    let so = unsafe { &mut *ctx.sockopt };
    if so.level != SOL_IP || so.optname != SO_ORIGINAL_DST {
        return None;
    }
    // SAFETY: `sk` of bpf_sockopt is always a valid full socket.
    let (src_port, dst_port) = unsafe {
        let sk: *mut bpf_sock = so.__bindgen_anon_1.sk;
        ((*sk).src_port, (*sk).dst_port)
    };
    if src_port != PORT_OUTBOUND as u32 {
        return None;
    }
    // SAFETY: helper valid for cgroup sockopt programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = PortKey {
        netns_cookie: netns,
        port: u16::from_be(dst_port) as u32,
        _pad: 0,
    };
    // SAFETY: read-only copy of a plain value.
    let orig = unsafe { ORIG_BY_PORT.get(&key) }.copied()?;
    // One answer per connection: a later socket reusing the port must not
    // inherit this destination.
    let _ = ORIG_BY_PORT.remove(&key);
    // SAFETY: bounds are checked against optval_end before any write, which
    // is what the verifier needs to accept the stores.
    unsafe {
        let start = so.__bindgen_anon_2.optval as *mut u8;
        let end = so.__bindgen_anon_3.optval_end as *mut u8;
        if start.add(16) > end {
            return None;
        }
        // struct sockaddr_in: family (host order), port, address, zero[8].
        (start as *mut u16).write_unaligned(AF_INET as u16);
        (start.add(2) as *mut u16).write_unaligned(orig.port as u16);
        (start.add(4) as *mut u32).write_unaligned(orig.ip);
        (start.add(8) as *mut u64).write_unaligned(0);
    }
    // Two separate 4-byte stores: the verifier rejects the single 8-byte
    // store the compiler would merge them into.
    // SAFETY: fields of the kernel-supplied context.
    unsafe {
        core::ptr::write_volatile(&mut so.optlen, 16);
        core::ptr::write_volatile(&mut so.retval, 0);
    }
    count(STAT_ORIG_DST_ANSWERED);
    Some(())
}

#[sk_lookup]
pub fn skiff_inbound(ctx: SkLookupContext) -> u32 {
    // SAFETY: ctx pointer supplied by the kernel.
    let l = unsafe { &*ctx.lookup };
    // Loopback carries ztunnel's own delivery to the app (and the pod's
    // traffic to itself): capturing it again would loop.
    if l.protocol != IPPROTO_TCP || l.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    if l.family != AF_INET {
        // IPv6 into an enrolled pod (link-local addresses exist on every
        // veth): ztunnel has no IPv6 path yet, so drop rather than let it
        // reach the app uncaptured.
        count(STAT_REFUSED_NATIVE_V6);
        return SK_DROP;
    }
    if l.local_port as u16 == PORT_INBOUND_HBONE {
        // ztunnel's HBONE listener on the pod's IP: the normal lookup.
        return SK_PASS;
    }
    if is_mesh_port(l.local_port as u16) {
        // ztunnel listens on 15001 and 15006 on loopback only, so from
        // outside these can only reach an application that got one of
        // them from the ephemeral range (bind(ip, 0) with a narrowed
        // ip_local_port_range, which the bind guard does not see): drop.
        count(STAT_BIND_DENIED);
        return SK_DROP;
    }
    let key = l.local_ip4;
    match INBOUND_SOCKS.redirect_sk_lookup(&ctx, key, 0) {
        Ok(()) => {
            count(STAT_INBOUND_REDIRECTS);
            SK_PASS
        }
        Err(_) => {
            // ztunnel's listener is gone: drop, never deliver uncaptured.
            count(STAT_INBOUND_NO_LISTENER);
            SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
