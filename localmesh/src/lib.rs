//! The local mesh: a Kubernetes-like cluster on one machine, built from a
//! directory of manifests, with network namespaces for nodes and pods and
//! the real Skiff node-agent and ztunnel on every node. The demo and the
//! end-to-end tests both run on it.

pub mod bench;
pub mod capture;
pub mod compare;
pub mod demo;
pub mod kubeproxy;
pub mod loadbalancer;
pub mod manifests;
pub mod mesh;
pub mod sys;

pub use mesh::{KubeProxy, LocalMesh, MeshOptions, PodRt};
