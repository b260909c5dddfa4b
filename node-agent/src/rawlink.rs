//! `bpf(BPF_LINK_CREATE)` + `bpf(BPF_OBJ_PIN)` for the one attachment aya
//! 0.14 cannot turn into a pinnable link: cgroup getsockopt. Without a pin
//! the attachment would die with node-agent and `SO_ORIGINAL_DST` would stop
//! answering during a restart.
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: BPF_CGROUP_GETSOCKOPT.
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// `union bpf_attr` is at most a few hundred bytes; zero the unused tail.
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size we pass.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches `prog` to the cgroup `target` with a BPF link and pins the link
/// at `pin`. The link (and so the attachment) lives as long as the pin.
pub fn link_and_pin(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32, pin: &Path) -> io::Result<()> {
    let mut attr = Attr([0; 128]);
    // link_create: { u32 prog_fd; u32 target_fd; u32 attach_type; u32 flags; ... }
    attr.0[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new descriptor that we own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = Attr([0; 128]);
    // obj_pin: { u64 pathname; u32 bpf_fd; u32 file_flags; ... }
    attr.0[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}
