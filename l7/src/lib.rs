//! Skiff's L7 engine, shared by the waypoint and the ingress gateway: it
//! terminates HBONE (HTTP/2 CONNECT over mutual TLS) from
//! client ztunnels, speaks HTTP/1.1 or HTTP/2 (gRPC included) on each
//! stream, applies VirtualService and DestinationRule (routing, canary
//! weights, header operations, rewrites, redirects and direct responses,
//! faults, mirroring, retries, timeouts, circuit breaking, outlier
//! detection, load balancing), local rate limits and L7
//! AuthorizationPolicy, keeps or starts the trace context, and tunnels each
//! request (HBONE) on to the chosen pod's ztunnel, counting it with Istio's
//! metrics.
//!
//! The decisions themselves (route matching, weights, faults, policy, token
//! buckets) are `skiff_core`'s pure functions; this crate applies them to
//! live traffic. Modules, from the front: `gateway` (the ingress gateway's
//! listeners, following its Gateways; `tls` its servers' certificates) hands
//! connections to `server` (HBONE
//! termination, the request pipeline), which calls `normalize`, `route`, `authz`, `ratelimit`,
//! `resilience` and `upstream` (`origin`: the TLS it originates); `errors` turns every refusal into its
//! response; `metrics` and `trace` record. No module imports one nearer the
//! front than itself.

pub mod authz;
pub mod body;
pub mod errors;
pub mod gateway;
pub mod metrics;
pub mod normalize;
pub mod origin;
pub mod ratelimit;
pub mod resilience;
pub mod route;
pub mod server;
pub mod spans;
pub mod tls;
pub mod trace;
pub mod upstream;

pub use body::Body;
pub use errors::Failure;
pub use server::{Config, Proxy};
