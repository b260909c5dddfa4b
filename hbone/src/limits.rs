//! Bounds on HBONE connections, shared by every HBONE server (ztunnel's
//! per-pod port 15008, the waypoint) and the client pool: how many
//! unauthenticated handshakes a server holds and for how long, how many
//! established connections it keeps per peer and in total, and when an
//! idle or silent connection is closed.
//!
//! Handshakes and established connections are counted apart. A handshake
//! slot is held only until the peer has proved its identity; a peer that
//! opens TCP connections and never speaks TLS can hold at most
//! `max_handshakes_per_peer` slots, for at most `handshake_timeout` each,
//! so it cannot starve other peers of the node-wide `max_handshakes`.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// HBONE limits and timeouts (one set of flags for every binary that
/// speaks HBONE). Every default is in ARCHITECTURE.md's "Limits and
/// timeouts" table.
#[derive(Clone, Debug, clap::Args)]
pub struct HboneLimits {
    /// HBONE connections still in their TLS or HTTP/2 handshake, node-wide.
    #[arg(long = "hbone-max-handshakes", default_value_t = 1024, value_name = "N", value_parser = at_least_one)]
    pub max_handshakes: usize,
    /// HBONE handshakes in progress from one peer address.
    #[arg(long = "hbone-max-handshakes-per-peer", default_value_t = 32, value_name = "N", value_parser = at_least_one)]
    pub max_handshakes_per_peer: usize,
    /// Time a peer has to complete the TLS and HTTP/2 handshakes.
    #[arg(long = "hbone-handshake-timeout", default_value = "10", value_name = "SECONDS", value_parser = seconds)]
    pub handshake_timeout: Duration,
    /// Established HBONE connections accepted, in total.
    #[arg(long = "hbone-max-connections", default_value_t = 16384, value_name = "N", value_parser = at_least_one)]
    pub max_connections: usize,
    /// Established HBONE connections accepted from one peer address (each
    /// may buffer up to its 16 MiB HTTP/2 window).
    #[arg(long = "hbone-max-connections-per-peer", default_value_t = 128, value_name = "N", value_parser = at_least_one)]
    pub max_connections_per_peer: usize,
    /// A pooled client connection with no open stream for this long is closed.
    #[arg(long = "hbone-pool-idle-timeout", default_value = "300", value_name = "SECONDS", value_parser = seconds)]
    pub pool_idle_timeout: Duration,
    /// A server connection with no open stream for this long is closed
    /// (GOAWAY). Longer than the pool's, so clients normally close first.
    #[arg(long = "hbone-server-idle-timeout", default_value = "600", value_name = "SECONDS", value_parser = seconds)]
    pub server_idle_timeout: Duration,
    /// Both ends send an HTTP/2 PING this often, and TCP keepalive probes
    /// start after this much silence.
    #[arg(long = "hbone-keepalive-interval", default_value = "30", value_name = "SECONDS", value_parser = seconds)]
    pub keepalive_interval: Duration,
    /// A PING not answered within this long closes the connection.
    #[arg(long = "hbone-keepalive-timeout", default_value = "10", value_name = "SECONDS", value_parser = seconds)]
    pub keepalive_timeout: Duration,
    /// A TCP connect (to a destination, a peer's 15008, an application in
    /// a pod) that has not completed in this long fails.
    #[arg(long = "connect-timeout", default_value = "10", value_name = "SECONDS", value_parser = seconds)]
    pub connect_timeout: Duration,
    /// Streams the client pool opens on one HBONE connection before it
    /// dials another to the same peer.
    #[arg(id = "hbone-max-streams-per-connection", long = "hbone-max-streams-per-connection", default_value_t = 100, value_name = "N", value_parser = at_least_one)]
    pub max_streams_per_connection: usize,
    /// Concurrent streams a server accepts on one HBONE connection (HTTP/2
    /// SETTINGS; more are refused with REFUSED_STREAM).
    #[arg(id = "hbone-max-concurrent-streams", long = "hbone-max-concurrent-streams", default_value_t = 200, value_name = "N", value_parser = at_least_one_u32)]
    pub max_concurrent_streams: u32,
    /// Largest CONNECT header block a server accepts (HTTP/2 header list
    /// size); a larger one fails only that stream.
    #[arg(id = "hbone-max-header-bytes", long = "hbone-max-header-bytes", default_value_t = 16384, value_name = "BYTES", value_parser = at_least_one_u32)]
    pub max_header_bytes: u32,
    /// Data sent on a socket made in a pod (HBONE or plain TCP to a
    /// destination) and not acknowledged for this long closes it
    /// (TCP_USER_TIMEOUT): a vanished peer is noticed.
    #[arg(id = "tcp-user-timeout", long = "tcp-user-timeout", default_value = "60", value_name = "SECONDS", value_parser = seconds)]
    pub tcp_user_timeout: Duration,
}

/// Longest duration a flag takes (a year): longer is a mistake, and keeps
/// deadline arithmetic far from overflow.
const MAX_FLAG_SECONDS: f64 = 365.0 * 86400.0;

/// Parses a flag's number of seconds (more than 0, at most a year).
pub fn seconds(s: &str) -> Result<Duration, String> {
    let n: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(n > 0.0 && n.is_finite()) {
        return Err(format!("{s:?}: must be more than 0 seconds"));
    }
    if n > MAX_FLAG_SECONDS {
        return Err(format!("{s:?}: at most {MAX_FLAG_SECONDS} seconds (a year)"));
    }
    Ok(Duration::from_secs_f64(n))
}

fn at_least_one_u32(s: &str) -> Result<u32, String> {
    at_least_one(s).and_then(|n| u32::try_from(n).map_err(|_| format!("{s:?}: at most {}", u32::MAX)))
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?}: must be a whole number, at least 1 (0 would refuse every connection)")),
    }
}

impl Default for HboneLimits {
    fn default() -> Self {
        HboneLimits {
            max_handshakes: 1024,
            max_handshakes_per_peer: 32,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 16384,
            max_connections_per_peer: 128,
            pool_idle_timeout: Duration::from_secs(300),
            server_idle_timeout: Duration::from_secs(600),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            connect_timeout: crate::transport::CONNECT_TIMEOUT,
            max_streams_per_connection: 100,
            max_concurrent_streams: 200,
            max_header_bytes: 16384,
            tcp_user_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    Handshakes,
    HandshakesPerPeer,
    Connections,
    ConnectionsPerPeer,
}

impl Refused {
    pub const ALL: [Refused; 4] = [Refused::Handshakes, Refused::HandshakesPerPeer, Refused::Connections, Refused::ConnectionsPerPeer];

    /// The metric label and log reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Handshakes => "handshakes",
            Refused::HandshakesPerPeer => "handshakes_per_peer",
            Refused::Connections => "connections",
            Refused::ConnectionsPerPeer => "connections_per_peer",
        }
    }

    /// The flag that raises the limit.
    pub fn flag(self) -> &'static str {
        match self {
            Refused::Handshakes => "--hbone-max-handshakes",
            Refused::HandshakesPerPeer => "--hbone-max-handshakes-per-peer",
            Refused::Connections => "--hbone-max-connections",
            Refused::ConnectionsPerPeer => "--hbone-max-connections-per-peer",
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Refused::Handshakes => "too many HBONE handshakes in progress",
            Refused::HandshakesPerPeer => "too many HBONE handshakes in progress from this peer",
            Refused::Connections => "too many established HBONE connections",
            Refused::ConnectionsPerPeer => "too many established HBONE connections from this peer",
        };
        write!(f, "{what} (limit set by {})", self.flag())
    }
}

#[derive(Default)]
struct State {
    handshakes: usize,
    established: usize,
    /// Per peer: (handshakes, established).
    peers: HashMap<IpAddr, (usize, usize)>,
    /// Per log key: last log time, lines not logged since.
    logged: HashMap<String, (Option<Instant>, u64)>,
}

/// Admission control for one HBONE server (node-wide in ztunnel).
pub struct Admission {
    limits: HboneLimits,
    state: Mutex<State>,
}

impl Admission {
    pub fn new(limits: HboneLimits) -> Arc<Admission> {
        Arc::new(Admission { limits, state: Mutex::new(State::default()) })
    }

    /// Takes a handshake slot for a new connection from `peer`.
    pub fn handshake(self: &Arc<Self>, peer: IpAddr) -> Result<Handshake, Refused> {
        let mut s = self.state.lock().expect("lock");
        if s.handshakes >= self.limits.max_handshakes {
            return Err(Refused::Handshakes);
        }
        let entry = s.peers.entry(peer).or_default();
        if entry.0 >= self.limits.max_handshakes_per_peer {
            return Err(Refused::HandshakesPerPeer);
        }
        entry.0 += 1;
        s.handshakes += 1;
        Ok(Handshake { adm: self.clone(), peer, open: true })
    }

    /// (handshakes in progress, established connections).
    pub fn counts(&self) -> (usize, usize) {
        let s = self.state.lock().expect("lock");
        (s.handshakes, s.established)
    }

    /// Whether to log a line with this key now: at most one line per key
    /// every 10 s (a flood would otherwise flood the log too). Returns how
    /// many lines with that key went unlogged before this one. Keys are
    /// admission reasons (`Refused::as_str`) or a failure's kind and text.
    pub fn log_now(&self, key: &str) -> Option<u64> {
        let mut s = self.state.lock().expect("lock");
        let now = Instant::now();
        if s.logged.len() >= 1024 && !s.logged.contains_key(key) {
            // Bounded: keys whose 10 s have passed carry nothing worth keeping.
            s.logged.retain(|_, (t, skipped)| *skipped > 0 || t.is_none_or(|t| now.duration_since(t) < Duration::from_secs(10)));
            if s.logged.len() >= 1024 {
                return None;
            }
        }
        let e = s.logged.entry(key.to_owned()).or_insert((None, 0));
        if e.0.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            let skipped = e.1;
            *e = (Some(now), 0);
            Some(skipped)
        } else {
            e.1 += 1;
            None
        }
    }

    fn release(&self, peer: IpAddr, handshake: bool) {
        let mut s = self.state.lock().expect("lock");
        if handshake {
            s.handshakes -= 1;
        } else {
            s.established -= 1;
        }
        if let Some(e) = s.peers.get_mut(&peer) {
            if handshake {
                e.0 -= 1;
            } else {
                e.1 -= 1;
            }
            if *e == (0, 0) {
                s.peers.remove(&peer);
            }
        }
    }
}

/// A handshake slot; released when dropped or when the connection is
/// established.
pub struct Handshake {
    adm: Arc<Admission>,
    peer: IpAddr,
    open: bool,
}

impl Handshake {
    /// The peer proved its identity: trade the handshake slot for an
    /// established-connection slot, if one is free.
    pub fn establish(mut self) -> Result<Established, Refused> {
        self.open = false;
        self.adm.release(self.peer, true);
        let mut s = self.adm.state.lock().expect("lock");
        if s.established >= self.adm.limits.max_connections {
            return Err(Refused::Connections);
        }
        let entry = s.peers.entry(self.peer).or_default();
        if entry.1 >= self.adm.limits.max_connections_per_peer {
            if *entry == (0, 0) {
                s.peers.remove(&self.peer);
            }
            return Err(Refused::ConnectionsPerPeer);
        }
        entry.1 += 1;
        s.established += 1;
        Ok(Established { adm: self.adm.clone(), peer: self.peer })
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if self.open {
            self.adm.release(self.peer, true);
        }
    }
}

/// An established-connection slot, held for the connection's life.
pub struct Established {
    adm: Arc<Admission>,
    peer: IpAddr,
}

impl Drop for Established {
    fn drop(&mut self) {
        self.adm.release(self.peer, false);
    }
}

/// TCP keepalive on a connection: probes after `idle` of silence, every
/// `idle / 3` after that, 3 unanswered probes close it. A peer that
/// vanished (node gone, cable cut) frees its descriptors instead of
/// holding them until the next write.
pub fn tcp_keepalive(s: &tokio::net::TcpStream, idle: Duration) {
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&crate::sock::keepalive(idle));
}

/// Sends an HTTP/2 PING every `interval` and resolves when one is not
/// answered within `timeout` (or the connection is gone): the caller then
/// closes the connection. Runs beside the task that polls the connection.
pub async fn keepalive_failed(mut pp: h2::PingPong, interval: Duration, timeout: Duration) -> &'static str {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pp.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "connection closed",
            Err(_) => return "PING not answered",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(hs: usize, hs_peer: usize, conns: usize, conns_peer: usize) -> Arc<Admission> {
        Admission::new(HboneLimits {
            max_handshakes: hs,
            max_handshakes_per_peer: hs_peer,
            max_connections: conns,
            max_connections_per_peer: conns_peer,
            ..HboneLimits::default()
        })
    }

    #[test]
    fn one_peer_cannot_take_every_handshake_slot() {
        let a = adm(4, 2, 10, 10);
        let (x, y): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let held: Vec<_> = (0..2).map(|_| a.handshake(x).unwrap()).collect();
        assert_eq!(a.handshake(x).err(), Some(Refused::HandshakesPerPeer));
        let other = a.handshake(y).unwrap();
        assert_eq!(a.counts(), (3, 0));
        drop(held);
        drop(other);
        assert_eq!(a.counts(), (0, 0));
        assert!(a.state.lock().unwrap().peers.is_empty(), "no entry outlives its peer's connections");
    }

    #[test]
    fn the_total_handshake_bound_holds_across_peers() {
        let a = adm(2, 2, 10, 10);
        let _h: Vec<_> = (1..=2).map(|i| a.handshake(IpAddr::from([10, 0, 0, i])).unwrap()).collect();
        assert_eq!(a.handshake("10.0.0.9".parse().unwrap()).err(), Some(Refused::Handshakes));
    }

    #[test]
    fn an_established_connection_frees_its_handshake_slot() {
        // The bug this replaced: a slot was held for the connection's life,
        // so 1024 live peers closed the node to new ones for good.
        let a = adm(1, 1, 3, 2);
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let c1 = a.handshake(x).unwrap().establish().unwrap();
        let c2 = a.handshake(x).unwrap().establish().unwrap();
        assert_eq!(a.counts(), (0, 2));
        assert_eq!(a.handshake(x).unwrap().establish().err(), Some(Refused::ConnectionsPerPeer));
        let y: IpAddr = "10.0.0.2".parse().unwrap();
        let c3 = a.handshake(y).unwrap().establish().unwrap();
        assert_eq!(a.handshake("10.0.0.3".parse().unwrap()).unwrap().establish().err(), Some(Refused::Connections));
        drop((c1, c2, c3));
        assert_eq!(a.counts(), (0, 0));
        assert!(a.state.lock().unwrap().peers.is_empty());
    }

    #[test]
    fn refusals_are_logged_at_most_every_ten_seconds_per_reason() {
        let a = adm(1, 1, 1, 1);
        assert_eq!(a.log_now(Refused::Handshakes.as_str()), Some(0));
        assert_eq!(a.log_now(Refused::Handshakes.as_str()), None);
        assert_eq!(a.log_now(Refused::Handshakes.as_str()), None);
        assert_eq!(a.log_now(Refused::Connections.as_str()), Some(0), "each reason has its own budget");
        for i in 0..5000 {
            let _ = a.log_now(&format!("tls: reason {i}"));
        }
        assert!(a.state.lock().unwrap().logged.len() <= 1024, "the throttle's memory is bounded");
    }

    #[tokio::test]
    async fn an_unanswered_ping_ends_the_keepalive_and_an_answered_one_does_not() {
        let ms = Duration::from_millis;
        // A peer that never reads: the PING is never answered.
        let (ours, _silent) = tokio::io::duplex(64 * 1024);
        let (_send, mut conn) = h2::client::handshake(ours).await.unwrap();
        let pp = conn.ping_pong().unwrap();
        tokio::spawn(conn);
        let why = tokio::time::timeout(Duration::from_secs(5), keepalive_failed(pp, ms(50), ms(100))).await.unwrap();
        assert_eq!(why, "PING not answered");
        // A live peer answers every PING: the keepalive runs on.
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(theirs).await.unwrap();
            while server.accept().await.is_some() {}
        });
        let (_send, mut conn) = h2::client::handshake(ours).await.unwrap();
        let pp = conn.ping_pong().unwrap();
        tokio::spawn(conn);
        assert!(tokio::time::timeout(ms(600), keepalive_failed(pp, ms(50), ms(100))).await.is_err(), "a live peer's connection was given up");
    }

    #[test]
    fn flags_parse_seconds_and_refuse_zero() {
        assert_eq!(seconds("2.5").unwrap(), Duration::from_millis(2500));
        assert!(seconds("0").unwrap_err().contains("more than 0"));
        assert!(seconds("soon").unwrap_err().contains("not a number"));
        assert!(seconds("1e19").unwrap_err().contains("at most"), "a value that would overflow deadlines is refused");
        assert!(at_least_one("0").is_err() && at_least_one("-1").is_err());
        assert_eq!(at_least_one("7"), Ok(7));
    }
}
