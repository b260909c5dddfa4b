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
    /// Takes a token from the route's bucket, then the Service's; the first
    /// empty one refuses the request.
    pub fn check(&self, vs: Option<&VirtualService>, route: &HttpRoute, svc: &ServiceInfo) -> Result<(), Failure> {
        let route_limit = vs.zip(route.name.as_ref()).and_then(|(v, n)| {
            v.route_rate_limits.get(n).map(|l| (format!("route:{}/{}/{n}", v.namespace, v.name), *l))
        });
        let svc_limit = svc
            .annotations
            .get(routing::ANNOTATION_RATE_LIMIT)
            .and_then(|v| routing::RateLimit::parse(v))
            .map(|l| (format!("service:{}", svc.hostname()), l));
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
