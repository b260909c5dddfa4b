//! Skiff's mesh identity and tunnel, shared by every process that speaks
//! mutual TLS inside the mesh (ztunnel, the waypoint, the signer, the local
//! mesh's tools):
//!
//! - [`identity`]: SPIFFE identities, the mesh CA, workload certificates and
//!   the TLS verifiers that check a peer is exactly who it must be;
//! - [`certs`]: the certificates a process holds, issued by a local CA or by
//!   the in-cluster signer ([`signer_client`]), renewed in the background;
//! - [`tunnel`]: HBONE — TCP carried as HTTP/2 CONNECT streams over mutual
//!   TLS 1.3 to port 15008 — the client connection pool, the server-side
//!   request checks and settings, and the byte relay;
//! - [`drain`]: graceful stop (stop accepting, let open connections
//!   finish up to a deadline), for every HBONE server;
//! - [`limits`]: bounds on HBONE handshakes and connections (per peer and
//!   in total), idle timeouts and keepalives, with their flags;
//! - [`names`]: ServiceEntries' host names, resolved in the background;
//! - [`sock`] and [`transport`]: the sockets made inside a pod's network
//!   namespace (marked so capture lets them pass) and how they connect.
//!
//! The ztunnel process crate builds on this; nothing here knows about
//! enrollment, policy or the node.

pub mod certs;
pub mod drain;
pub mod events;
pub mod identity;
pub mod limits;
pub mod names;
pub mod signer_client;
pub mod sock;
pub mod transport;
pub mod tunnel;
