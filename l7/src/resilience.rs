//! What keeps one bad destination or client from taking the proxy down
//! with it: retries and timeouts (per try and overall), circuit breaking
//! (in-flight requests per destination), outlier detection (ejecting
//! endpoints that keep failing), and caps on buffered request bodies.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use skiff_core::{
    model::{ServiceInfo, Workload},
    routing::{self, HttpRoute},
};
use tracing::warn;

use crate::{
    body::Body,
    errors::Failure,
    route::Resolved,
    upstream::{self, EndpointState, Upstreams},
};

/// Largest request body buffered, by default (bodies are buffered so a
/// retry can resend them).
pub const MAX_BUFFERED_BODY: usize = 16 * 1024 * 1024;
/// Request-body bytes buffered across all requests at once, by default.
pub const MAX_BUFFERED_TOTAL: usize = 256 * 1024 * 1024;
/// How long a client may take to send its request body, by default.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Request-body bytes currently buffered, across all requests, and the
/// bounds on them.
pub struct BodyBudget {
    buffered: AtomicUsize,
    max_body: usize,
    max_total: usize,
    read_timeout: Duration,
}

impl Default for BodyBudget {
    fn default() -> Self {
        BodyBudget::new(MAX_BUFFERED_BODY, MAX_BUFFERED_TOTAL, BODY_READ_TIMEOUT)
    }
}

/// Releases buffered-body accounting when a request ends.
pub struct Buffered<'a> {
    counter: &'a AtomicUsize,
    bytes: usize,
}

impl Drop for Buffered<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl BodyBudget {
    pub fn new(max_body: usize, max_total: usize, read_timeout: Duration) -> BodyBudget {
        BodyBudget { buffered: AtomicUsize::new(0), max_body, max_total, read_timeout }
    }

    /// Reads a request body, bounded in size (413) and time (400); its
    /// bytes count against the total (503, overflow) until the guard drops.
    /// The body is read before a pool slot is taken, so slow senders cannot
    /// hold slots.
    pub async fn read(&self, body: Incoming) -> Result<(Bytes, Buffered<'_>), Failure> {
        let body = match tokio::time::timeout(self.read_timeout, http_body_util::Limited::new(body, self.max_body).collect()).await {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(_)) => return Err(Failure::TooLarge),
            Err(_) => return Err(Failure::BadRequest),
        };
        let now = self.buffered.fetch_add(body.len(), Ordering::AcqRel) + body.len();
        let guard = Buffered { counter: &self.buffered, bytes: body.len() };
        if now > self.max_total {
            return Err(Failure::Overflow);
        }
        Ok((body, guard))
    }
}

/// Requests in flight per destination (Service + subset).
#[derive(Default)]
pub struct CircuitBreakers {
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// Releases a circuit-breaker slot when the request is done.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CircuitBreakers {
    /// Takes a slot in the destination's pool; a full pool answers at once
    /// (overflow) instead of queueing.
    pub fn acquire(&self, svc: &ServiceInfo, subset: Option<&str>, policy: &routing::TrafficPolicy, h2: bool) -> Result<Slot, Failure> {
        let key = format!("{}|{}", svc.hostname(), subset.unwrap_or(""));
        let counter = self.in_flight.lock().expect("lock").entry(key).or_default().clone();
        let now = counter.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(counter);
        if policy.connection_pool.max_in_flight(h2).is_some_and(|max| now as u32 >= max) {
            return Err(Failure::Overflow);
        }
        Ok(slot)
    }

    /// Forgets destinations with nothing in flight.
    pub fn sweep(&self) {
        self.in_flight.lock().expect("lock").retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Acquire) > 0);
    }
}

/// A response body that keeps a circuit-breaker slot until it ends.
struct HoldSlot<B> {
    inner: B,
    _slot: Option<Slot>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for HoldSlot<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// One request on its way upstream: where to and what to send.
pub struct Outbound<'a> {
    pub dest: &'a Resolved<'a>,
    pub route: &'a HttpRoute,
    /// The request as it goes upstream (headers done).
    pub parts: &'a http::request::Parts,
    pub body: &'a Bytes,
    /// Whether the upstream speaks HTTP/2.
    pub h2: bool,
    /// The request's consistent-hash key, if the destination hashes.
    pub hash: Option<u64>,
    /// The TLS the proxy originates to the endpoint, if any.
    pub tls: Option<&'a crate::origin::Originate>,
}

/// Sends the request with the route's retries (Istio's default policy when
/// it sets none; `attempts: 0` turns retrying off; the DestinationRule's
/// `maxRetries` caps them), each try bounded by the per-try timeout and
/// the route's overall timeout. The circuit-breaker slot goes with a
/// response's body; `retries` counts the retries made.
pub async fn forward(
    ups: &Upstreams,
    out: Outbound<'_>,
    slot: &mut Option<Slot>,
    retries_made: &mut u32,
    rng: &mut fastrand::Rng,
) -> Result<(Response<Body>, Option<Workload>), Failure> {
    let (eps, policy) = (&out.dest.endpoints, &out.dest.policy);
    let max_retries = policy.connection_pool.max_retries.unwrap_or(u32::MAX);
    let retries = out.route.retries.clone().unwrap_or_else(routing::Retries::istio_default);
    let attempts = 1 + retries.attempts.min(max_retries);
    let per_try = retries.per_try_timeout;
    let retry_on: Vec<String> = retries.retry_on.clone();
    let deadline = out.route.timeout.and_then(|t| Instant::now().checked_add(t));
    let mut outcome: Result<(Response<Body>, Option<&Workload>), Failure> = Err(Failure::NoHealthyUpstream);
    let mut tried: Vec<SocketAddrV4> = Vec::new();
    let idempotent = is_idempotent(&out.parts.method);
    for n in 0..attempts {
        if n > 0 {
            // Envoy's retry back-off: jittered, uniform in [0, (2^n - 1) x
            // 25 ms), at most 250 ms; never past the route's deadline.
            let cap = Duration::from_millis(25).saturating_mul((1u32 << n.min(10)) - 1).min(Duration::from_millis(250));
            let wait = Duration::from_micros(rng.u64(..cap.as_micros().max(1) as u64));
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                outcome = Err(Failure::Timeout);
                break;
            }
            tokio::time::sleep(wait).await;
        }
        let Some(chosen) = ups.choose(eps, policy, out.hash, &tried, rng) else {
            outcome = Err(Failure::NoHealthyUpstream);
            break;
        };
        let ep = chosen.addr();
        if retries.ignore_previous_hosts {
            tried.push(ep);
        }
        // Decrements `active` even if the client goes away mid-attempt.
        let _active = ups.begin(ep);
        let req = upstream::upstream_request(out.parts, out.body, out.h2);
        let limit = match (per_try, deadline) {
            (Some(p), Some(d)) => Some(p.min(d.saturating_duration_since(Instant::now()))),
            (Some(p), None) => Some(p),
            (None, Some(d)) => Some(d.saturating_duration_since(Instant::now())),
            (None, None) => None,
        };
        let fut = ups.attempt(&chosen, out.h2, policy.connection_pool.max_requests_per_connection, req, out.tls, upstream::mesh_only(policy));
        let r = match limit {
            Some(l) => tokio::time::timeout(l, fut).await.unwrap_or(Err(Failure::Timeout)),
            None => fut.await,
        };
        let members: Vec<SocketAddrV4> = eps.iter().map(|e| e.addr()).collect();
        observe(ups, ep, &r, policy, &members);
        let last = n + 1 == attempts || deadline.is_some_and(|d| Instant::now() >= d);
        match r {
            Ok(resp) => {
                let grpc = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
                if retriable_status(resp.status().as_u16(), grpc, &retry_on) && !last {
                    *retries_made += 1;
                    continue;
                }
                // The circuit-breaker slot is held until the response
                // body has been sent (or dropped), not just its headers.
                let held = slot.take();
                outcome = Ok((resp.map(|b| HoldSlot { inner: b, _slot: held }.boxed()), chosen.workload()));
                break;
            }
            Err(f) => {
                if retriable_failure(f, &retry_on, idempotent, per_try, deadline, Instant::now()) && !last {
                    *retries_made += 1;
                    continue;
                }
                outcome = Err(f);
                break;
            }
        }
    }
    outcome.map(|(r, w)| (r, w.cloned()))
}

/// Whether an upstream response is retried under `retry_on`: HTTP 5xx as
/// Envoy's `5xx`, `gateway-error`, `retriable-status-codes` (503) and
/// listed codes; 409 under `retriable-4xx`; and the gRPC status of a
/// trailers-only response (`grpc-status` in the headers) under `cancelled`
/// (1), `deadline-exceeded` (4), `resource-exhausted` (8), `internal` (13),
/// `unavailable` (14).
fn retriable_status(code: u16, grpc: Option<u32>, retry_on: &[String]) -> bool {
    retry_on.iter().any(|c| {
        let http = code >= 500
            && (c == "5xx"
                || c == &code.to_string()
                || (c == "gateway-error" && matches!(code, 502..=504))
                || (c == "retriable-status-codes" && code == 503));
        let conflict = code == 409 && c == "retriable-4xx";
        let grpc = grpc.is_some_and(|g| {
            matches!((c.as_str(), g), ("cancelled", 1) | ("deadline-exceeded", 4) | ("resource-exhausted", 8) | ("internal", 13) | ("unavailable", 14))
        });
        http || conflict || grpc
    })
}

/// RFC 9110 idempotent methods: sending one twice has the effect of once.
fn is_idempotent(m: &http::Method) -> bool {
    matches!(m.as_str(), "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// Whether a failed attempt is retried: a failure before the request was
/// written under `retry_on`'s connection conditions; a reset after it was
/// written only under `reset`, or under `5xx` for an idempotent method
/// (the upstream may have processed it: a POST is never sent twice unless
/// the route says `reset`); per-try timeouts while the overall deadline
/// has not passed.
fn retriable_failure(f: Failure, retry_on: &[String], idempotent: bool, per_try: Option<Duration>, deadline: Option<Instant>, now: Instant) -> bool {
    match f {
        Failure::UpstreamConnect => retry_on.iter().any(|c| matches!(c.as_str(), "connect-failure" | "5xx" | "reset" | "refused-stream")),
        Failure::UpstreamReset => retry_on.iter().any(|c| c == "reset" || (idempotent && c == "5xx")),
        Failure::Timeout => per_try.is_some() && deadline.is_none_or(|d| now < d),
        _ => false,
    }
}

/// Records an attempt's outcome for outlier detection.
fn observe(ups: &Upstreams, ep: SocketAddrV4, r: &Result<Response<Incoming>, Failure>, policy: &routing::TrafficPolicy, members: &[SocketAddrV4]) {
    let code = match r {
        Ok(resp) => Some(resp.status().as_u16()),
        Err(Failure::UpstreamConnect | Failure::UpstreamReset) => Some(503),
        Err(Failure::Timeout) => Some(504),
        Err(_) => None,
    };
    let mut states = ups.endpoints.lock().expect("lock");
    record_outcome(&mut states, ep, code, policy, members, Instant::now());
}

/// Outlier detection over the endpoints' states: `code` is the attempt's
/// status (a connect failure counts as 503, a timeout as 504; None: not an
/// upstream's doing). Consecutive 5xx (or gateway errors) past the
/// DestinationRule's threshold eject the endpoint for the base ejection
/// time times its ejections so far (at most an hour), unless that would
/// eject more than `maxEjectionPercent` of the destination (`members`).
fn record_outcome(
    states: &mut HashMap<SocketAddrV4, EndpointState>,
    ep: SocketAddrV4,
    code: Option<u16>,
    policy: &routing::TrafficPolicy,
    members: &[SocketAddrV4],
    now: Instant,
) {
    let total = members.len();
    // maxEjectionPercent counts this destination's endpoints only.
    let ejected = members.iter().filter(|m| states.get(m).is_some_and(|s| s.ejected_until.is_some_and(|t| t > now))).count();
    let s = states.entry(ep).or_default();
    if s.ejected_until.is_some_and(|t| t <= now) {
        // Back from ejection: starts with a clean slate.
        s.ejected_until = None;
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
    }
    let Some(code) = code else { return };
    if code >= 500 {
        s.consecutive_5xx += 1;
        if matches!(code, 502..=504) {
            s.consecutive_gateway += 1;
        }
    } else {
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        return;
    }
    let Some(o) = &policy.outlier else { return };
    let tripped = o.consecutive_5xx.is_some_and(|n| s.consecutive_5xx >= n) || o.consecutive_gateway.is_some_and(|n| s.consecutive_gateway >= n);
    let room = (ejected + 1) * 100 <= total * o.max_ejection_percent as usize || ejected == 0;
    if tripped && room && s.ejected_until.is_none() {
        s.ejections = s.ejections.saturating_add(1).min(100);
        let for_how_long = o.base_ejection_time.checked_mul(s.ejections).unwrap_or(Duration::from_secs(3600)).min(Duration::from_secs(3600));
        s.ejected_until = now.checked_add(for_how_long);
        warn!(endpoint = %ep, ejected_for_ms = for_how_long.as_millis() as u64, "outlier detection: endpoint ejected");
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn retried_statuses() {
        #[rustfmt::skip]
        let cases: [(u16, Option<u32>, &[&str], bool); 16] = [
            (503, None, &["retriable-status-codes"], true),
            (502, None, &["retriable-status-codes"], false),
            (502, None, &["gateway-error"], true),
            (504, None, &["gateway-error"], true),
            (500, None, &["gateway-error"], false),
            (500, None, &["5xx"], true),
            (429, None, &["5xx"], false),
            (503, None, &["503"], true),
            (404, None, &["404"], false),
            (503, None, &[], false),
            (409, None, &["retriable-4xx"], true),
            (404, None, &["retriable-4xx"], false),
            (200, Some(14), &["unavailable"], true),
            (200, Some(14), &["cancelled"], false),
            (200, Some(4), &["deadline-exceeded"], true),
            (200, Some(0), &["unavailable", "internal"], false),
        ];
        for (code, grpc, on, want) in cases {
            assert_eq!(retriable_status(code, grpc, &strs(on)), want, "{code} {grpc:?} {on:?}");
        }
    }

    /// The failure, `retry_on`, idempotent method, per-try timeout,
    /// deadline, whether retried.
    type FailureCase = (Failure, &'static [&'static str], bool, Option<Duration>, Option<Instant>, bool);

    #[test]
    fn retried_failures() {
        let now = Instant::now();
        let (s, later) = (Some(Duration::from_secs(1)), now.checked_add(Duration::from_secs(1)));
        #[rustfmt::skip]
        let cases: [FailureCase; 14] = [
            (Failure::UpstreamConnect, &["connect-failure"], false, None, None, true),
            (Failure::UpstreamConnect, &["reset"], false, None, None, true),
            (Failure::UpstreamConnect, &["gateway-error"], true, None, None, false),
            // Written, then reset: the upstream may have processed it.
            (Failure::UpstreamReset, &["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"], true, None, None, false),
            (Failure::UpstreamReset, &["5xx"], false, None, None, false),
            (Failure::UpstreamReset, &["5xx"], true, None, None, true),
            (Failure::UpstreamReset, &["reset"], false, None, None, true),
            (Failure::UpstreamReset, &["gateway-error"], true, None, None, false),
            (Failure::Timeout, &[], false, s, None, true),
            (Failure::Timeout, &[], false, s, later, true),
            (Failure::Timeout, &[], false, s, Some(now), false),
            (Failure::Timeout, &["5xx"], true, None, later, false),
            (Failure::NoHealthyUpstream, &["5xx"], true, s, None, false),
            (Failure::TooLarge, &["5xx"], true, s, None, false),
        ];
        for (f, on, idempotent, per_try, deadline, want) in cases {
            assert_eq!(retriable_failure(f, &strs(on), idempotent, per_try, deadline, now), want, "{f:?} {on:?} {idempotent} {per_try:?} {deadline:?}");
        }
    }

    #[test]
    fn outlier_detection_ejects_within_max_ejection_percent() {
        let policy = routing::TrafficPolicy {
            outlier: Some(routing::OutlierDetection {
                consecutive_5xx: Some(2),
                consecutive_gateway: None,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: 50,
            }),
            ..Default::default()
        };
        let (a, b) = (SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80), SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80));
        let members = [a, b];
        let mut states = HashMap::new();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let record = |states: &mut HashMap<_, EndpointState>, ep, code, t| record_outcome(states, ep, Some(code), &policy, &members, t);

        record(&mut states, a, 503, t0);
        assert_eq!(states[&a].ejected_until, None, "one 5xx is not enough");
        record(&mut states, a, 503, t0);
        assert_eq!(states[&a].ejected_until, Some(at(30)), "second consecutive 5xx ejects for the base time");
        record(&mut states, b, 500, at(1));
        record(&mut states, b, 500, at(1));
        assert_eq!(states[&b].ejected_until, None, "ejecting b too would pass 50% of the destination");
        record(&mut states, a, 200, at(31));
        assert_eq!((states[&a].ejected_until, states[&a].consecutive_5xx), (None, 0), "back from ejection, clean slate");
        record(&mut states, a, 503, at(32));
        record(&mut states, a, 503, at(32));
        assert_eq!(states[&a].ejected_until, Some(at(92)), "second ejection lasts twice the base time");
        record_outcome(&mut states, b, None, &policy, &members, at(33));
        assert_eq!(states[&b].consecutive_5xx, 2, "an outcome that is not the upstream's leaves the counters");
    }
}
