//! What the CNI plugin reported about pod sandboxes: one record per pod
//! (with its netns, opened when the ADD arrived) and the netns of sandboxes
//! torn down since.
//!
//! Written by the agent loop as `skiff-cni` requests arrive, read by the
//! agent loop and by the netns locators. It depends on neither side, so
//! both can use it without importing each other.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use skiff_core::netns;

/// (device, inode) of a netns.
pub type NetnsId = (u64, u64);

/// One sandbox the CNI plugin told node-agent about.
pub struct CniRecord {
    pub uid: Option<String>,
    pub container_id: String,
    pub netns_path: PathBuf,
    /// Opened when the ADD arrived, so the netns cannot vanish or be
    /// replaced under the path before node-agent uses it.
    pub netns: OwnedFd,
    pub id: NetnsId,
    /// IPv4 addresses from the primary plugin's result.
    pub ips: Vec<Ipv4Addr>,
    /// When the ADD arrived.
    pub added: Instant,
}

/// What the CNI plugin reported, shared between the socket server, the
/// agent loop and the locators.
#[derive(Default)]
pub struct CniState {
    /// By `namespace/name`.
    pub pods: BTreeMap<String, CniRecord>,
    /// Netns of torn-down sandboxes, with when they were torn down.
    pub released: HashMap<NetnsId, Instant>,
}

/// How long a torn-down sandbox's netns stays refused. Sandboxes' processes
/// exit within seconds of DEL; the netns inode could be reused long after.
pub const RELEASED_TTL: Duration = Duration::from_secs(600);

/// How long a CNI record may go without its pod in the config source before
/// it is dropped (a DEL node-agent missed; the record's fd would otherwise
/// keep the old netns alive). Longer than any lag of the source behind ADD.
pub const ORPHAN_TTL: Duration = Duration::from_secs(120);

impl CniState {
    /// Drops records whose pod the config source no longer shows.
    pub fn prune(&mut self, exists: impl Fn(&str) -> bool) -> Vec<String> {
        let gone: Vec<String> =
            self.pods.iter().filter(|(k, r)| !exists(k) && r.added.elapsed() > ORPHAN_TTL).map(|(k, _)| k.clone()).collect();
        for k in &gone {
            self.pods.remove(k);
        }
        gone
    }

    pub fn is_released(&mut self, id: NetnsId) -> bool {
        self.released.retain(|_, t| t.elapsed() < RELEASED_TTL);
        self.released.contains_key(&id)
    }
}

pub type SharedCni = Arc<Mutex<CniState>>;

/// Opens a netns path from a CNI ADD.
pub fn open_path(path: &Path) -> Result<(OwnedFd, NetnsId), String> {
    let fd = netns::open(path).map_err(|e| skiff_core::report(&e))?;
    let id = netns::identity(fd.as_fd()).map_err(|e| format!("fstat {}: {e}", path.display()))?;
    Ok((fd, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// Any file stands in for a netns here: only its identity is read.
    fn fd(path: &str) -> OwnedFd {
        OwnedFd::from(File::open(path).unwrap())
    }

    #[test]
    fn records_of_pods_gone_from_the_api_are_pruned_after_a_grace_period() {
        let Some(old) = Instant::now().checked_sub(ORPHAN_TTL + Duration::from_secs(1)) else { return };
        let mut st = CniState::default();
        for (key, added) in [("shop/old", old), ("shop/new", Instant::now()), ("shop/kept", old)] {
            let f = fd("/dev/null");
            let id = netns::identity(f.as_fd()).unwrap();
            st.pods.insert(
                key.into(),
                CniRecord { uid: None, container_id: key.into(), netns_path: "/dev/null".into(), netns: f, id, ips: vec![], added },
            );
        }
        // "shop/new" is not in the API yet either, but its ADD is recent.
        assert_eq!(st.prune(|k| k == "shop/kept"), ["shop/old"]);
        assert_eq!(st.pods.keys().collect::<Vec<_>>(), ["shop/kept", "shop/new"]);
    }
}
