//! Which metric label sets are in use, and which name workloads or
//! Services that are gone: ztunnel's connection metrics and the waypoint's
//! request metrics both record every label set they touch here and remove
//! from their metric vectors what [`SeriesUse::take_gone`] hands back.
//! Without it, every short-lived workload (a Job, a CronJob run) would
//! leave series behind for the life of the process.

use std::{
    collections::{hash_map::DefaultHasher, HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::model::Snapshot;

/// Where a label set names a workload or a Service: the positions of its
/// namespace and name labels.
#[derive(Clone, Copy, Debug)]
pub struct NamedAt {
    pub namespace: usize,
    pub name: usize,
}

/// The label sets a metric family has used, with when each was last used.
/// Keyed by a hash of the values, so recording a set already known costs
/// no allocation (the data path records one per connection or request).
#[derive(Default)]
pub struct SeriesUse {
    sets: Mutex<HashMap<u64, Vec<LabelSet>>>,
}

/// One label set's values and when it was last used.
type LabelSet = (Vec<String>, Instant);

fn key(values: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    values.hash(&mut h);
    h.finish()
}

impl SeriesUse {
    /// Notes that a label set was used now.
    pub fn record(&self, values: &[&str]) {
        let now = Instant::now();
        let mut sets = self.sets.lock().expect("lock");
        let bucket = sets.entry(key(values)).or_default();
        match bucket.iter_mut().find(|(v, _)| v.iter().map(String::as_str).eq(values.iter().copied())) {
            Some((_, last)) => *last = now,
            None => bucket.push((values.iter().map(|v| v.to_string()).collect(), now)),
        }
    }

    /// Takes out, and returns, the label sets no one used for `grace` that
    /// name a workload (at `workloads`) or a Service (at `services`) no
    /// longer in `snap`; `unknown` names a peer outside the cluster, never
    /// gone. The caller removes them from its metric vectors.
    pub fn take_gone(&self, snap: &Snapshot, grace: Duration, workloads: &[NamedAt], services: &[NamedAt]) -> Vec<Vec<String>> {
        let live_workloads: HashSet<(&str, &str)> = snap.workloads.values().map(|w| (w.namespace.as_str(), w.workload_name.as_str())).collect();
        let live_services: HashSet<(&str, &str)> = snap.services.values().map(|s| (s.namespace.as_str(), s.name.as_str())).collect();
        let gone = |live: &HashSet<(&str, &str)>, at: &[NamedAt], v: &[String]| {
            at.iter().any(|a| {
                let (ns, name) = (v[a.namespace].as_str(), v[a.name].as_str());
                ns != "unknown" && name != "unknown" && !live.contains(&(ns, name))
            })
        };
        let mut taken = Vec::new();
        let mut sets = self.sets.lock().expect("lock");
        for bucket in sets.values_mut() {
            bucket.retain_mut(|(v, last)| {
                let stale = last.elapsed() >= grace && (gone(&live_workloads, workloads, v) || gone(&live_services, services, v));
                if stale {
                    taken.push(std::mem::take(v));
                }
                !stale
            });
        }
        sets.retain(|_, bucket| !bucket.is_empty());
        taken
    }

    /// Label sets recorded now.
    pub fn len(&self) -> usize {
        self.sets.lock().expect("lock").values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::parse_documents;

    #[test]
    fn sets_naming_what_is_gone_are_taken_after_the_grace_and_known_sets_are_not_duplicated() {
        let snap = |pods: &str| {
            let objs = parse_documents(pods).unwrap().into_iter().map(|o| ("t".to_owned(), o)).collect();
            Snapshot::from_objects(objs).unwrap()
        };
        let with_a = snap("apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: ns}\nspec: {containers: [{name: c}]}\n");
        let empty = snap("");
        let s = SeriesUse::default();
        let at = [NamedAt { namespace: 1, name: 0 }];
        s.record(&["a", "ns", "200"]);
        s.record(&["a", "ns", "200"]);
        s.record(&["unknown", "unknown", "200"]);
        assert_eq!(s.len(), 2, "a set recorded twice is one set");
        assert!(s.take_gone(&with_a, Duration::ZERO, &at, &[]).is_empty(), "a live workload's set stays");
        assert!(s.take_gone(&empty, Duration::from_secs(300), &at, &[]).is_empty(), "kept for the grace");
        assert_eq!(s.take_gone(&empty, Duration::ZERO, &at, &[]), vec![vec!["a".to_owned(), "ns".to_owned(), "200".to_owned()]]);
        assert_eq!(s.len(), 1, "the peer outside the cluster stays");
    }
}
