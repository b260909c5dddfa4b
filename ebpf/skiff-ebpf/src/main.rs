//! Skiff's capture programs. They only look up and rewrite: which pods are
//! enrolled, and where ztunnel listens, is decided in userspace (node-agent
//! fills `ENROLLED`, ztunnel fills `INBOUND_SOCKS`).
//!
//! Programs and what they do:
//! - `connect4` / `connect6`: a TCP connect from an enrolled netns goes to
//!   ztunnel's in-pod listener 127.0.0.1:15001; the destination the
//!   application asked for is kept in the socket's own storage (`ORIG`).
//! - `sockops`: when that connect leaves (TCP_CONNECT_CB) the client's
//!   address is known; the destination is put in `ORIG_BY_TUPLE` under
//!   (netns, client address and port). When ztunnel's listener completes
//!   the handshake (PASSIVE_ESTABLISHED_CB) it moves into the accepted
//!   socket's storage. So the only shared state is for handshakes in
//!   progress, bounded per pod (`POD_HANDSHAKES`, quota in `CONFIG`) and
//!   node-wide (the map's size); a socket's own storage goes with the
//!   socket and no pod can push out another's.
//! - `release` (cgroup/sock_release): a socket closed before its SYN left,
//!   or whose handshake can no longer complete, gives its slot back.
//! - `getsockopt`: answers `SO_ORIGINAL_DST` on ztunnel's accepted socket
//!   from its storage, the interface iptables REDIRECT offers, so ztunnel
//!   reads it one way.
//! - `getpeername4` / `getpeername6`: the application sees its real peer.
//! - `bind4` / `bind6`: applications in enrolled pods cannot bind mesh ports.
//! - `inbound` (sk_lookup, attached per pod netns): TCP arriving from outside
//!   the pod is handed to ztunnel's inbound listener.
#![no_std]
#![no_main]
// Atomic adds on map values: core's atomic types have no read-modify-write
// on the BPF target (no compare-and-swap), the intrinsic lowers to BPF's
// atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock, BPF_F_NO_PREALLOC, BPF_NOEXIST,
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
        generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use skiff_ebpf_common::{
    EnrolledPod, OrigDst, PodHandshakes, PortDst, PortKey, CONFIG_COUNT, CONFIG_POD_HANDSHAKES,
    DEFAULT_HANDSHAKES, DEFAULT_MESH_SOCKETS, DEFAULT_POD_HANDSHAKES, ENROLL_OUTBOUND, MARK_BYPASS, MARK_DELIVER, MAX_PODS,
    MESH_PORTS, ORIG_ARMED, ORIG_V6_MAPPED, PORT_INBOUND_HBONE, PORT_OUTBOUND, STAT_BIND_DENIED, STAT_CAPTURED_CONNECTS,
    STAT_COUNT, STAT_FORGED_MARK, STAT_INBOUND_NO_LISTENER, STAT_INBOUND_REDIRECTS, STAT_ORIG_DST_ANSWERED,
    STAT_REFUSED_NATIVE_V6, STAT_REFUSED_NO_STATE, STAT_REFUSED_POD_HANDSHAKES,
};

const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const SOL_IP: i32 = 0;
const SO_ORIGINAL_DST: i32 = 80;
const LOOPBACK_IFINDEX: u32 = 1;
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
/// `bpf_sock::state` values (include/net/tcp_states.h).
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;
/// Return value of cgroup sock_addr / sockopt programs: let the call proceed.
const ALLOW: i32 = 1;
/// Return value of cgroup sock_addr programs: fail the call with EPERM.
const DENY: i32 = 0;

/// Enrolled pods, keyed by network-namespace cookie. Filled by node-agent.
#[map]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(MAX_PODS, 0);

/// A socket-local storage map (BPF_MAP_TYPE_SK_STORAGE) in BTF form,
/// pinned by name like the other maps (aya-ebpf's own `SkStorage` cannot
/// be pinned, and its accessors take only sock_addr contexts).
#[repr(C)]
pub struct PinnedSkStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    /// LIBBPF_PIN_BY_NAME.
    pinning: *const [i32; 1],
}

// SAFETY: the fields are placeholders the loader reads as BTF; they are
// never dereferenced.
unsafe impl<T> Sync for PinnedSkStorage<T> {}

impl<T> PinnedSkStorage<T> {
    pub const fn new() -> Self {
        PinnedSkStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The value stored on `sk`; with `create`, made zeroed if missing
    /// (None if the kernel cannot: the socket's option memory is spent).
    ///
    /// SAFETY: `sk` must be a full socket pointer the kernel handed this
    /// program (or the context itself, for cgroup sock programs).
    #[inline(always)]
    unsafe fn get(&self, sk: *mut core::ffi::c_void, create: bool) -> Option<*mut T> {
        let flags = if create { BPF_SK_STORAGE_GET_F_CREATE as u64 } else { 0 };
        let map = core::ptr::from_ref(self).cast_mut().cast();
        // SAFETY: the caller's.
        let p = unsafe { bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags) };
        (!p.is_null()).then_some(p.cast())
    }

    /// Removes the value stored on `sk`.
    ///
    /// SAFETY: as for `get`.
    #[inline(always)]
    unsafe fn delete(&self, sk: *mut core::ffi::c_void) {
        let map = core::ptr::from_ref(self).cast_mut().cast();
        // SAFETY: the caller's.
        let _ = unsafe { bpf_sk_storage_delete(map, sk) };
    }
}

/// The original destination, on the socket itself: the application's
/// socket from its connect, ztunnel's accepted socket from the end of the
/// handshake. Freed with the socket; nothing shared to run out of.
#[btf_map]
static ORIG: PinnedSkStorage<OrigDst> = PinnedSkStorage::new();

/// Original destinations crossing the handshake, keyed by the connection's
/// client address in its netns (see `PortKey`): from the client's SYN until
/// ztunnel's listener completes the handshake, or the client socket is
/// released first while that can no longer happen, or node-agent removes
/// it as stale. Not LRU: when full, the new connection's destination is
/// not kept (ztunnel closes it, counted) and nothing else is pushed out.
/// Size set by node-agent when it creates the map
/// (`--max-captured-handshakes`); memory is taken per entry. (Renamed from
/// `ORIG_BY_TUPLE`, an LRU map keyed by port only, so a pin left by an older
/// build is never reused as this one.)
#[map]
static ORIG_BY_TUPLE: HashMap<PortKey, PortDst> = HashMap::pinned(DEFAULT_HANDSHAKES, BPF_F_NO_PREALLOC);

/// Per pod (netns cookie): its handshake slots and refusals (see
/// `PodHandshakes`). Made by the programs on a pod's first captured
/// connect; removed by node-agent with the pod.
#[map]
static POD_HANDSHAKES: HashMap<u64, PodHandshakes> = HashMap::pinned(MAX_PODS, 0);

/// Per pod (netns cookie): its `ORIG_BY_TUPLE` entries node-agent removed
/// as stale. Written by node-agent only (the programs' atomic counters
/// cannot be changed from userspace without losing their updates).
#[map]
static RECLAIMED: HashMap<u64, u64> = HashMap::pinned(MAX_PODS, 0);

/// Settings node-agent writes at start: see `CONFIG_*`.
#[map]
static CONFIG: Array<u64> = Array::pinned(CONFIG_COUNT, 0);

/// ztunnel's inbound listener of each enrolled pod, keyed by pod IPv4
/// (network order). Filled by ztunnel; the kernel drops an entry when its
/// socket closes, which is what makes inbound fail closed.
#[map]
static INBOUND_SOCKS: SockHash<u32> = SockHash::pinned(MAX_PODS, 0);

/// Sockets ztunnel made in pods, by socket cookie: ztunnel registers each
/// before it binds or connects it. The mesh marks alone are forgeable (a
/// process with CAP_NET_RAW, containerd's default, may set SO_MARK);
/// socket cookies are unique per boot and only ztunnel writes this map.
/// LRU: an entry is needed only until its socket's bind or connect (and is
/// removed when the socket is released).
#[map]
static MESH_SOCKS: LruHashMap<u64, u8> = LruHashMap::pinned(DEFAULT_MESH_SOCKETS, 0);

/// The fingerprint of the node-agent build whose programs the pinned links
/// run (written by node-agent when it attaches them; no program reads it).
#[map]
static BUILD: Array<u64> = Array::pinned(1, 0);

/// Counters (per CPU) that node-agent reports: see `STAT_*`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

/// Atomically adds `v` to a counter in a map value; the result is not
/// read back here (BPF's plain atomic add, which every kernel has).
///
/// SAFETY: `p` must point into a live map value.
#[inline(always)]
unsafe fn add<T: Copy>(p: *mut T, v: T) {
    // SAFETY: the caller's.
    let _ = unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(p, v) };
}

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

/// The pod's handshake counters, made on its first captured connect.
#[inline(always)]
fn pod_handshakes(netns: u64) -> Option<*mut PodHandshakes> {
    if let Some(p) = POD_HANDSHAKES.get_ptr_mut(&netns) {
        return Some(p);
    }
    // Another CPU may make it first (EEXIST): either way it exists now.
    let _ = POD_HANDSHAKES.insert(&netns, &PodHandshakes { pending: 0, refused: 0 }, BPF_NOEXIST as u64);
    POD_HANDSHAKES.get_ptr_mut(&netns)
}

#[inline(always)]
fn pod_quota() -> i64 {
    match CONFIG.get(CONFIG_POD_HANDSHAKES) {
        Some(&q) if q > 0 => q as i64,
        _ => DEFAULT_POD_HANDSHAKES as i64,
    }
}

/// One of the pod's handshake slots is given back (only whoever removed
/// its entry, or cleared its reservation, calls this: once per slot).
#[inline(always)]
fn handshake_done(netns: u64) {
    if let Some(h) = POD_HANDSHAKES.get_ptr_mut(&netns) {
        // SAFETY: a valid map value pointer, changed only atomically.
        unsafe { add(&raw mut (*h).pending, -1i64) };
    }
}

/// Removes `key`'s entry if `cookie`'s socket wrote it; gives its slot back.
#[inline(always)]
fn remove_own_entry(key: &PortKey, cookie: u64) {
    // SAFETY: read-only copy of a plain value.
    if unsafe { ORIG_BY_TUPLE.get(key) }.is_some_and(|p| p.cookie == cookie) && ORIG_BY_TUPLE.remove(key).is_ok() {
        handshake_done(key.netns_cookie);
    }
}

/// What an earlier connect of this socket left (a connect that failed, or
/// was undone with AF_UNSPEC, before this one): its entry and slot go back
/// and its storage goes, so only the connect being made now can ever act
/// on it.
#[inline(always)]
fn forget_previous(ctx: &SockAddrContext) {
    // SAFETY: `sk` of bpf_sock_addr is a full socket pointer.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }.cast();
    // SAFETY: as above; a copy of the socket's own storage.
    let Some(o) = (unsafe { ORIG.get(sk, false) }) else {
        return;
    };
    // SAFETY: as above. Cleared in place first (the socket is locked), so
    // nothing acts on it even if the delete below failed.
    let orig = unsafe {
        let orig = *o;
        (*o).flags = 0;
        (*o).local_port = 0;
        orig
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    give_back_entry(&orig, cookie);
    // SAFETY: as above.
    unsafe { ORIG.delete(sk) };
}

/// Gives back the `ORIG_BY_TUPLE` entry (and slot) that the socket `cookie`
/// whose storage is `orig` wrote, if it is still there.
#[inline(always)]
fn give_back_entry(orig: &OrigDst, cookie: u64) {
    if orig.flags & ORIG_ARMED == 0 && orig.local_port != 0 {
        remove_own_entry(&PortKey { netns_cookie: orig.netns_cookie, ip: orig.local_ip, port: orig.local_port }, cookie);
    }
}

/// The handshake slots pod `netns` (counters `h`) holds now: those the
/// programs took, less those node-agent reclaimed.
#[inline(always)]
fn slots_held(h: *mut PodHandshakes, netns: u64) -> i64 {
    // SAFETY: read-only copy of a plain value.
    let reclaimed = unsafe { RECLAIMED.get(&netns) }.copied().unwrap_or(0) as i64;
    // SAFETY: a valid map value pointer.
    let pending: i64 = unsafe { core::ptr::read_volatile(&raw const (*h).pending) };
    pending - reclaimed
}

/// Counts a captured connection refused because its pod holds its quota.
#[inline(always)]
fn refused_at_quota(h: *mut PodHandshakes) {
    // SAFETY: a valid map value pointer, changed only atomically.
    unsafe { add(&raw mut (*h).refused, 1u64) };
    count(STAT_REFUSED_POD_HANDSHAKES);
}

/// Keeps the original destination of a socket being captured on the
/// socket, armed for its SYN (which takes the slot). Err (refuse the
/// connect, never bypass) when the pod holds its quota of slots, or the
/// storage cannot be made; both are counted. No slot is held from here to
/// the SYN: a connect that never sends one (it fails, or runs on a kernel
/// socket, such as an MPTCP subflow, whose release the programs never see)
/// has nothing to give back.
#[inline(always)]
fn keep_orig(ctx: &SockAddrContext, netns: u64, ip: u32, port: u32, flags: u32) -> Result<(), i64> {
    let Some(h) = pod_handshakes(netns) else {
        count(STAT_REFUSED_NO_STATE);
        return Err(0);
    };
    if slots_held(h, netns) >= pod_quota() {
        refused_at_quota(h);
        return Err(0);
    }
    // SAFETY: `sk` of bpf_sock_addr is a full socket pointer.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    // SAFETY: as above.
    let Some(o) = (unsafe { ORIG.get(sk.cast(), true) }) else {
        count(STAT_REFUSED_NO_STATE);
        return Err(0);
    };
    // SAFETY: the socket's own storage (made just now: `forget_previous`
    // removed any earlier one); the socket is locked during connect.
    unsafe { *o = OrigDst { netns_cookie: netns, ip, port, flags: flags | ORIG_ARMED, local_port: 0, local_ip: 0, _pad: 0 } };
    Ok(())
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
    forget_previous(ctx);
    let Some((netns, pod)) = enrolled(ctx) else {
        return Ok(ALLOW);
    };
    if pod.flags & ENROLL_OUTBOUND == 0 || is_loopback_v4(sa.user_ip4) || is_mesh_socket(ctx, true) {
        return Ok(ALLOW);
    }
    keep_orig(ctx, netns, sa.user_ip4, sa.user_port, 0)?;
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
    forget_previous(ctx);
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
    keep_orig(ctx, netns, w3, sa.user_port, ORIG_V6_MAPPED)?;
    sa.user_ip6[3] = loopback_v4();
    sa.user_port = outbound_port_be();
    count(STAT_CAPTURED_CONNECTS);
    Ok(ALLOW)
}

/// The original destination of a captured socket whose kernel-reported peer
/// is ztunnel's outbound listener.
#[inline(always)]
fn captured_peer(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: `sk` of bpf_sock_addr is a full socket pointer; read-only
    // copy of the socket's own storage.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        ORIG.get(sk.cast(), false).map(|o| *o)
    }
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
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => syn_sent(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => accepted(&ctx),
        _ => {}
    }
    1
}

/// A captured socket's SYN is leaving: its address is known now, so its
/// destination goes into `ORIG_BY_TUPLE` for ztunnel's side to find, with
/// one of its pod's slots.
#[inline(always)]
fn syn_sent(ctx: &SockOpsContext) {
    // SAFETY: `sk` of bpf_sock_ops is a full socket at TCP_CONNECT_CB.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: as above.
    let Some(o) = (unsafe { ORIG.get(sk.cast(), false) }) else {
        return;
    };
    // SAFETY: the socket's own storage; the socket is locked while its SYN
    // is sent.
    let mut orig = unsafe { *o };
    // Only the connect that reserved a slot acts, once.
    if orig.flags & ORIG_ARMED == 0 {
        return;
    }
    orig.flags &= !ORIG_ARMED;
    // sock_ops gives the remote port as a 32-bit network-order value (the
    // port in the high half on little-endian hosts).
    if ctx.remote_ip4() != loopback_v4() || u32::from_be(ctx.remote_port()) != PORT_OUTBOUND as u32 {
        // Not the connect capture rewrote (cannot happen: connect4/6 arm
        // only what they send to 15001); keep nothing.
        // SAFETY: as above.
        unsafe { (*o).flags = orig.flags };
        return;
    }
    orig.local_port = ctx.local_port();
    orig.local_ip = ctx.local_ip4();
    // SAFETY: as above.
    unsafe { *o = orig };
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = PortKey { netns_cookie: orig.netns_cookie, ip: orig.local_ip, port: orig.local_port };
    // SAFETY: helper valid everywhere.
    let now = (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32;
    let value = PortDst { cookie, ip: orig.ip, port: orig.port, flags: orig.flags, created: now };
    // The key is this connection's 4-tuple, which the kernel keeps unique:
    // an entry already under it is an earlier connection's that is over
    // (its socket closed without ztunnel's listener completing it). It is
    // given back before this one takes its place.
    if ORIG_BY_TUPLE.remove(&key).is_ok() {
        handshake_done(orig.netns_cookie);
    }
    let Some(h) = pod_handshakes(orig.netns_cookie) else {
        count(STAT_REFUSED_NO_STATE);
        return;
    };
    // The slot is taken first, then the count looked at: SYNs racing for
    // the last slot may all go without, never all get one, so a pod never
    // holds more than its quota. (connect4/6 refused at the quota already;
    // only connects in flight at once get here past it.) Without an entry
    // ztunnel finds no destination and closes the connection: closed,
    // never bypassed.
    // SAFETY: a valid map value pointer, changed only atomically.
    let pending = unsafe { &raw mut (*h).pending };
    // SAFETY: as above.
    unsafe { add(pending, 1i64) };
    if slots_held(h, orig.netns_cookie) > pod_quota() {
        // SAFETY: as above.
        unsafe { add(pending, -1i64) };
        refused_at_quota(h);
        return;
    }
    if ORIG_BY_TUPLE.insert(&key, &value, BPF_NOEXIST as u64).is_err() {
        // Full (`--max-captured-handshakes`).
        count(STAT_REFUSED_NO_STATE);
        // SAFETY: as above.
        unsafe { add(pending, -1i64) };
    }
}

/// A handshake completed on a listener. On ztunnel's outbound listener
/// (127.0.0.1:15001, which only ztunnel can bind in an enrolled pod) the
/// client's destination moves from `ORIG_BY_TUPLE` into the accepted
/// socket's storage, before the socket waits in the accept queue.
#[inline(always)]
fn accepted(ctx: &SockOpsContext) {
    if ctx.local_port() != PORT_OUTBOUND as u32 || ctx.local_ip4() != loopback_v4() {
        return;
    }
    // SAFETY: helper valid for sock_ops programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = PortKey { netns_cookie: netns, ip: ctx.remote_ip4(), port: u32::from_be(ctx.remote_port()) };
    // SAFETY: read-only copy of a plain value.
    let Some(v) = (unsafe { ORIG_BY_TUPLE.get(&key) }).copied() else {
        return;
    };
    // SAFETY: `sk` of bpf_sock_ops is a full socket at PASSIVE_ESTABLISHED_CB.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: as above.
    match unsafe { ORIG.get(sk.cast(), true) } {
        // SAFETY: the new socket's own storage, not yet visible elsewhere.
        Some(o) => unsafe {
            *o = OrigDst { netns_cookie: netns, ip: v.ip, port: v.port, flags: v.flags, local_port: 0, local_ip: 0, _pad: 0 }
        },
        None => count(STAT_REFUSED_NO_STATE),
    }
    if ORIG_BY_TUPLE.remove(&key).is_ok() {
        handshake_done(netns);
    }
}

/// A socket is closed. ztunnel's sockets leave `MESH_SOCKS`. A captured
/// socket gives back its `ORIG_BY_TUPLE` entry (and slot) if ztunnel's
/// listener can no longer complete its
/// handshake (its SYN was never answered, or the connection is reset or
/// over); an established connection still waiting for the listener keeps
/// it (its data is delivered once ztunnel accepts; node-agent removes it
/// if that never happens). The sockets' own storage goes by itself.
#[cgroup_sock(sock_release)]
pub fn skiff_release(ctx: SockContext) -> i32 {
    // SAFETY: helper valid for cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = MESH_SOCKS.remove(&cookie);
    // SAFETY: the context is the released socket.
    let Some(o) = (unsafe { ORIG.get(ctx.as_ptr(), false) }) else {
        return ALLOW;
    };
    // SAFETY: the socket's own storage.
    let orig = unsafe { *o };
    // SAFETY: `sock` is the kernel-supplied socket of this program.
    let state = unsafe { (*ctx.sock).state };
    if state == TCP_SYN_SENT || state == TCP_CLOSE {
        give_back_entry(&orig, cookie);
    }
    ALLOW
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
    let sk: *mut bpf_sock = unsafe { so.__bindgen_anon_1.sk };
    // SAFETY: as above.
    if unsafe { (*sk).src_port } != PORT_OUTBOUND as u32 {
        return None;
    }
    // Only ztunnel's accepted sockets carry a destination in their storage
    // (the application's own sockets are never on port 15001 here).
    // SAFETY: as above; read-only copy of the socket's own storage.
    let orig = unsafe { ORIG.get(sk.cast(), false).map(|o| *o) }?;
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
