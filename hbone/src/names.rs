//! Host names ServiceEntries are matched by and sent to, resolved in the
//! background: ztunnel matches a pod's connection to the addresses a DNS
//! entry's hosts resolve to; a waypoint sends a DNS entry's requests to
//! them (Istio's `resolution: DNS`, Envoy's DNS cluster).
//!
//! Names are resolved every 30 s and when the set of names changes, at
//! most 16 at a time, each as an absolute name first (the process's own
//! DNS search path is not the pod's), as written if that fails (a hosts
//! file knows names without the root's dot). A name that stops resolving
//! keeps its last addresses for 5 minutes, logged, then loses them: closed,
//! never open on stale addresses.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex, RwLock, RwLockReadGuard},
    time::{Duration, Instant},
};

use skiff_core::model::Snapshot;
use tracing::warn;

/// How long a name that stops resolving keeps its last addresses.
const KEEP: Duration = Duration::from_secs(300);

/// Names and their IPv4 addresses, as last resolved.
#[derive(Default)]
pub struct NameCache {
    resolved: RwLock<HashMap<String, Vec<Ipv4Addr>>>,
    last_ok: Mutex<HashMap<String, Instant>>,
}

impl NameCache {
    pub fn new() -> Arc<NameCache> {
        Arc::new(NameCache::default())
    }

    /// The addresses of every name, as last resolved.
    pub fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Vec<Ipv4Addr>>> {
        self.resolved.read().expect("lock")
    }

    /// Resolves `names` once; names not in the list are forgotten.
    pub async fn refresh(&self, names: Vec<String>) {
        let sem = Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = tokio::task::JoinSet::new();
        for name in names {
            let sem = sem.clone();
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let absolute = format!("{}.", name.trim_end_matches('.'));
                let r = tokio::time::timeout(Duration::from_secs(5), async {
                    match tokio::net::lookup_host((absolute, 0)).await {
                        Ok(a) => Ok(a),
                        Err(_) => tokio::net::lookup_host((name.clone(), 0)).await,
                    }
                })
                .await;
                let r = match r {
                    Ok(Ok(addrs)) => Ok(addrs
                        .filter_map(|a| match a.ip() {
                            std::net::IpAddr::V4(v4) => Some(v4),
                            std::net::IpAddr::V6(_) => None,
                        })
                        .collect::<Vec<Ipv4Addr>>()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                };
                (name, r)
            });
        }
        let mut results = Vec::new();
        while let Some(Ok(r)) = tasks.join_next().await {
            results.push(r);
        }
        let now = Instant::now();
        let mut out = HashMap::new();
        let mut last_ok = self.last_ok.lock().expect("lock");
        for (name, r) in results {
            match r {
                Ok(v4) => {
                    last_ok.insert(name.clone(), now);
                    out.insert(name, v4);
                }
                Err(error) => {
                    let fresh = last_ok.get(&name).is_some_and(|t| now.duration_since(*t) < KEEP);
                    warn!(host = %name, %error, kept = fresh, "a ServiceEntry's name does not resolve; its last addresses are kept for at most 5 minutes");
                    if fresh {
                        if let Some(prev) = self.read().get(&name).cloned() {
                            out.insert(name, prev);
                        }
                    }
                }
            }
        }
        last_ok.retain(|n, _| out.contains_key(n));
        *self.resolved.write().expect("lock") = out;
    }

    /// Keeps the names `names` picks from the cluster view resolved: every
    /// 30 s, and early when that set changes (not on every pod's churn).
    pub fn spawn<F>(self: &Arc<Self>, mut cluster: tokio::sync::watch::Receiver<Arc<Snapshot>>, names: F)
    where
        F: Fn(&Snapshot) -> Vec<String> + Send + Sync + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let before = names(&cluster.borrow());
                me.refresh(before.clone()).await;
                let due = tokio::time::Instant::now() + Duration::from_secs(30);
                loop {
                    tokio::select! {
                        r = cluster.changed() => {
                            if r.is_err() { return }
                            if names(&cluster.borrow()) != before { break }
                        }
                        _ = tokio::time::sleep_until(due) => break,
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `localhost`, which every resolver knows, resolves (as the absolute
    /// `localhost.` or as written); a name that never resolved has no
    /// addresses and is not kept.
    #[tokio::test]
    async fn names_resolve_and_unresolvable_ones_have_no_addresses() {
        let c = NameCache::new();
        c.refresh(vec!["localhost".into(), "no-such-host.invalid".into()]).await;
        assert!(c.read().get("localhost").is_some_and(|v| v.contains(&Ipv4Addr::LOCALHOST)), "{:?}", c.read());
        assert!(!c.read().contains_key("no-such-host.invalid"));
        c.refresh(vec![]).await;
        assert!(c.read().is_empty(), "names no longer asked for are forgotten");
    }
}
