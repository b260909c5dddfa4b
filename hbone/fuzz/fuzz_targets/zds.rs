//! Arbitrary datagrams on the node-agent↔ztunnel (ZDS) socket, read as
//! each side reads them (`Conn::recv` of a `Request` in ztunnel, of a
//! `Response` in node-agent): a message is decoded whole or refused with
//! an error, never a panic; what decodes re-encodes to a message that
//! decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use skiff_core::zds::{Conn, Request, Response, ZdsError};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair");
    // An oversized message (ZDS allows 64 KiB) is also a case.
    let body: Vec<u8> = if which & 0x80 != 0 { body.iter().copied().cycle().take(70 * 1024).collect() } else { body.to_vec() };
    if body.is_empty() || send(std::os::fd::AsRawFd::as_raw_fd(&a), &body, MsgFlags::MSG_NOSIGNAL).is_err() {
        return;
    }
    let (tx, rx) = (Conn::from(a), Conn::from(b));
    if which & 1 == 0 {
        match rx.recv::<Request>() {
            Ok((req, fds)) => {
                assert!(fds.is_empty());
                tx.send(&req, None).expect("a decoded request re-encodes");
                let (again, _) = rx.recv::<Request>().expect("and decodes again");
                assert_eq!(format!("{again:?}"), format!("{req:?}"));
            }
            Err(ZdsError::Malformed(_) | ZdsError::TooLarge(_)) => {}
            Err(e) => panic!("unexpected error for a delivered message: {e}"),
        }
    } else {
        match rx.recv::<Response>() {
            Ok((resp, _)) => {
                tx.send(&resp, None).expect("a decoded response re-encodes");
                let (again, _) = rx.recv::<Response>().expect("and decodes again");
                assert_eq!(again, resp);
            }
            Err(ZdsError::Malformed(_) | ZdsError::TooLarge(_)) => {}
            Err(e) => panic!("unexpected error for a delivered message: {e}"),
        }
    }
});
