//! `LoadBalancer` Services, as a cloud's load balancer would serve them:
//! each gets an address on the machine running the mesh (a loopback
//! address of its own, `127.x.y.z`, unique to the run, so nothing on the
//! host's routing changes and several runs coexist) that forwards every
//! Service port to a ready endpoint, round robin, connecting from inside
//! the cluster (a node's netns). The address is written to the Service's
//! `status.loadBalancer.ingress`, as a cloud controller does.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    sync::Arc,
};

use anyhow::Context as _;
use skiff_core::netns::NetnsThread;
use tokio::net::TcpListener;

/// The address of the run's `k`-th load balancer: 127.(64 + r0 % 64).r1.(1 + k),
/// where r0, r1 are the first bytes of the run id.
pub fn address(run_id: &str, k: usize) -> Ipv4Addr {
    let r = u32::from_str_radix(run_id, 16).unwrap_or(0);
    Ipv4Addr::new(127, 64 + ((r >> 16) as u8 % 64), (r >> 8) as u8, 1 + (k % 250) as u8)
}

/// One load-balanced port: the address clients use and the endpoints.
#[derive(Clone, Debug)]
pub struct Frontend {
    pub listen: SocketAddrV4,
    pub endpoints: Vec<SocketAddrV4>,
}

/// Listens on every frontend's address (in this process's netns: the
/// host's) and forwards into the cluster through `node_ns`.
pub fn start(rt: &tokio::runtime::Handle, node_ns: OwnedFd, frontends: Vec<Frontend>) -> anyhow::Result<()> {
    let net = Arc::new(NetnsThread::spawn("load-balancer", node_ns)?);
    for fe in frontends {
        let listener = std::net::TcpListener::bind(fe.listen).with_context(|| format!("load balancer address {}", fe.listen))?;
        listener.set_nonblocking(true)?;
        let _guard = rt.enter();
        let listener = TcpListener::from_std(listener)?;
        rt.spawn(crate::kubeproxy::forward(listener, net.clone(), fe.endpoints));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_are_loopback_and_per_run() {
        let a = super::address("a1b2c3", 0);
        assert!(a.is_loopback() && a != std::net::Ipv4Addr::LOCALHOST);
        assert_ne!(a, super::address("a1b2c3", 1));
        assert_ne!(a, super::address("05b2c3", 0));
    }
}
