//! Local rate limits: token buckets (burst = the limit's request count)
//! per route (the VirtualService's annotation) and per Service (the
//! Service's annotation), held by the proxy that enforces them. The token
//! arithmetic is `skiff_core::routing::take_token`'s.

use std::{collections::HashMap, sync::Mutex, time::Instant};

use skiff_core::{
    model::ServiceInfo,
    routing::{self, HttpRoute, VirtualService},
};

use crate::errors::Failure;

/// The token buckets, by `route:<ns>/<vs>/<route>` or `service:<host>`.
#[derive(Default)]
pub struct RateLimits {
    buckets: Mutex<HashMap<String, routing::Bucket>>,
}

impl RateLimits {
    /// Drops the buckets of routes and Services no longer in `snap`.
    pub fn sweep(&self, snap: &skiff_core::model::Snapshot) {
        let mut live: std::collections::HashSet<String> = snap.services.values().map(|s| format!("service:{}", s.hostname())).collect();
        for v in &snap.virtual_services {
            live.extend(v.route_rate_limits.keys().map(|n| format!("route:{}/{}/{n}", v.namespace, v.name)));
        }
        self.buckets.lock().expect("lock").retain(|k, _| live.contains(k));
    }

    /// Buckets held now.
    pub fn buckets(&self) -> usize {
        self.buckets.lock().expect("lock").len()
    }

    /// Takes a token from the route's bucket, then the Service's; the first
    /// empty one refuses the request.
    pub fn check(&self, vs: Option<&VirtualService>, route: &HttpRoute, svc: Option<&ServiceInfo>) -> Result<(), Failure> {
        let route_limit = vs.zip(route.name.as_ref()).and_then(|(v, n)| {
            v.route_rate_limits.get(n).map(|l| (format!("route:{}/{}/{n}", v.namespace, v.name), *l))
        });
        // The Service's limit (a waypoint's Services; at the gateway the
        // destination is not known yet, and Service limits are the
        // waypoint's to apply).
        let svc_limit = svc.and_then(|s| {
            let limit = routing::RateLimit::parse(s.annotations.get(routing::ANNOTATION_RATE_LIMIT)?)?;
            Some((format!("service:{}", s.hostname()), limit))
        });
        for (key, limit) in route_limit.into_iter().chain(svc_limit) {
            let now = Instant::now();
            let mut buckets = self.buckets.lock().expect("lock");
            let b = buckets.entry(key).or_insert(routing::Bucket { tokens: limit.requests as f64, at: now });
            if !routing::take_token(&limit, b, now) {
                return Err(Failure::RateLimited);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_core::{k8s, model::Snapshot};

    fn snap(text: &str) -> Snapshot {
        Snapshot::from_objects(k8s::parse_documents(text).unwrap().into_iter().map(|o| ("t".to_owned(), o)).collect()).unwrap()
    }

    /// Issue 13 item 11: buckets of Services that are gone were kept for
    /// ever; the sweep drops them and keeps the live ones.
    #[test]
    fn buckets_of_services_that_left_are_swept() {
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns, annotations: {{skiff.dev/local-rate-limit: 100/s}}}}\nspec: {{clusterIP: 10.96.1.{}, ports: [{{port: 80}}]}}\n",
                i + 1
            ));
        }
        let busy = snap(&text);
        let limits = RateLimits::default();
        let route = HttpRoute::default();
        for svc in busy.services.values() {
            limits.check(None, &route, Some(svc)).unwrap();
        }
        assert_eq!(limits.buckets(), 100);
        limits.sweep(&busy);
        assert_eq!(limits.buckets(), 100, "live Services keep their buckets (and their tokens)");
        let text = text.split("---\n").take(2).collect::<Vec<_>>().join("---\n");
        limits.sweep(&snap(&text));
        assert_eq!(limits.buckets(), 1);
    }
}
