//! Skiff ztunnel: one per node. Receives enrolled pods' network namespaces
//! from node-agent, opens listeners inside each (15001 outbound, 15006
//! inbound), and proxies every captured connection, counting it with Istio's
//! metrics and logging it.
//!
//! A process crate: no other crate imports it. The mesh identity, the
//! certificates and the HBONE tunnel it speaks are in `skiff-hbone`; the
//! config it reads comes through `skiff-kube-source`.

pub mod admin;
pub mod metrics;
pub mod proxy;
pub mod sockdiag;
pub mod zds_server;
