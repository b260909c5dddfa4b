//! A kube-proxy stand-in for pods that are not captured: each node answers
//! every ClusterIP:port itself (the addresses sit on the node's `lo`) and
//! forwards to a ready endpoint, round robin. Like kube-proxy's userspace
//! mode, the endpoint sees the node's address as the source.
//!
//! Captured pods never reach it: their ztunnel resolves ClusterIPs itself.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use skiff_core::netns::NetnsThread;
use tokio::net::{TcpListener, TcpStream};

/// One Service port and where it forwards to.
#[derive(Clone, Debug)]
pub struct Frontend {
    pub vip: SocketAddrV4,
    pub endpoints: Vec<SocketAddrV4>,
}

/// Starts forwarding every frontend in the netns of `node_ns`.
pub fn start(rt: &tokio::runtime::Handle, node: &str, node_ns: OwnedFd, frontends: Vec<Frontend>) -> anyhow::Result<()> {
    let net = Arc::new(NetnsThread::spawn(format!("kube-proxy-{node}"), node_ns)?);
    for fe in frontends {
        let vip = fe.vip;
        let std_listener = net.run(move || std::net::TcpListener::bind(vip))??;
        std_listener.set_nonblocking(true)?;
        let _guard = rt.enter();
        let listener = TcpListener::from_std(std_listener)?;
        rt.spawn(forward(listener, net.clone(), fe.endpoints));
    }
    Ok(())
}

/// Takes connections on `listener` and relays each to one of `endpoints`
/// (round robin), connecting from inside `net`'s netns. Also the local
/// mesh's load balancers' forwarder.
pub async fn forward(listener: TcpListener, net: Arc<NetnsThread>, endpoints: Vec<SocketAddrV4>) {
    let next = AtomicUsize::new(0);
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        if endpoints.is_empty() {
            continue;
        }
        let ep = endpoints[next.fetch_add(1, Ordering::Relaxed) % endpoints.len()];
        let net = net.clone();
        tokio::spawn(async move {
            let made = net.run(move || {
                let s = std::net::TcpStream::connect_timeout(&ep.into(), Duration::from_secs(5))?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            });
            let Ok(Ok(s)) = made else { return };
            let Ok(mut upstream) = TcpStream::from_std(s) else { return };
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}

/// `10.96.x.y` style address check used by callers.
pub fn is_vip(ip: Ipv4Addr) -> bool {
    ip.octets()[0..2] == [10, 96]
}

/// kube-proxy's iptables mode in spirit: DNAT each ClusterIP:port to one of
/// its endpoints, chosen at random per connection, for pods (PREROUTING)
/// and the node itself (OUTPUT). The rules live in the node's netns and go
/// with it.
pub fn iptables_rules(frontends: &[Frontend]) -> String {
    let mut r = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
         -A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n",
    );
    for f in frontends {
        let n = f.endpoints.len();
        for (i, ep) in f.endpoints.iter().enumerate() {
            let pick = if i + 1 < n { format!("-m statistic --mode random --probability {:.5} ", 1.0 / (n - i) as f64) } else { String::new() };
            r.push_str(&format!(
                "-A KUBE-SERVICES -d {}/32 -p tcp --dport {} {pick}-j DNAT --to-destination {ep}\n",
                f.vip.ip(),
                f.vip.port()
            ));
        }
        if n == 0 {
            r.push_str(&format!("-A KUBE-SERVICES -d {}/32 -p tcp --dport {} -j REJECT --reject-with tcp-reset\n", f.vip.ip(), f.vip.port()));
        }
    }
    r.push_str("COMMIT\n");
    r
}

/// Loads `rules` (iptables-restore input) into `netns`.
pub fn iptables_apply(netns: &str, rules: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore", "-w"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running iptables-restore (install the iptables package): {e}"))?;
    child.stdin.take().expect("piped").write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("iptables-restore in {netns}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
