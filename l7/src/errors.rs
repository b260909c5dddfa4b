//! Why a request gets an answer the proxy makes up instead of an
//! upstream's, and the one place such a `Failure` becomes that synthetic
//! response and its response flag (the access log's and
//! `istio_requests_total`'s `response_flags`).

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{full, Body};

/// Why a request got a synthetic response; becomes the response flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No route matched (404).
    NoRoute,
    /// No ready endpoint (503).
    NoHealthyUpstream,
    /// Connecting upstream failed, or the request was not written (503):
    /// the upstream did not see it, so a retry is safe.
    UpstreamConnect,
    /// The upstream connection ended after the request may have been
    /// written, before a response (503): the upstream may have processed
    /// it.
    UpstreamReset,
    /// The route's timeout passed (504).
    Timeout,
    /// Fault injection aborted the request with this HTTP status.
    FaultAbort(u16),
    /// Fault injection aborted a gRPC request with this gRPC status (200,
    /// the status in `grpc-status`).
    GrpcFaultAbort(u32),
    /// The request body was too large to buffer (413).
    TooLarge,
    /// The destination's connection pool is full (503, circuit breaking).
    Overflow,
    /// A local rate limit is exhausted (429).
    RateLimited,
    /// AuthorizationPolicy denied it (403).
    Denied,
    /// A path or authority that cannot be normalized safely (400).
    BadRequest,
    /// A TLS connection whose gateway server has gone or changed its TLS
    /// settings since the handshake (421: the client reconnects).
    Misdirected,
}

impl Failure {
    /// Status, response flag and body text.
    pub fn response(self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Failure::NoRoute => (StatusCode::NOT_FOUND, "NR", "route not found"),
            Failure::NoHealthyUpstream => (StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"),
            Failure::UpstreamConnect => (StatusCode::SERVICE_UNAVAILABLE, "UF", "upstream connect error"),
            Failure::UpstreamReset => (
                StatusCode::SERVICE_UNAVAILABLE,
                "UC",
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            ),
            Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "UT", "upstream request timeout"),
            Failure::FaultAbort(s) => (StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE), "FI", "fault filter abort"),
            Failure::GrpcFaultAbort(_) => (StatusCode::OK, "FI", "fault filter abort"),
            Failure::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "-", "request body too large"),
            Failure::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "RL", "local_rate_limited"),
            Failure::Overflow => (StatusCode::SERVICE_UNAVAILABLE, "UO", "upstream connect error or disconnect/reset before headers. reset reason: overflow"),
            Failure::Denied => (StatusCode::FORBIDDEN, "-", "RBAC: access denied"),
            Failure::BadRequest => (StatusCode::BAD_REQUEST, "-", "bad request: path or authority"),
            Failure::Misdirected => (StatusCode::MISDIRECTED_REQUEST, "-", "misdirected request: the server this connection was made for changed; reconnect"),
        }
    }
}

/// The one place a failure becomes a response: the synthetic response
/// (status, `x-skiff-response-flags`, text; gRPC aborts as gRPC) and the
/// response flag to log.
pub fn respond(f: Failure) -> (Response<Body>, &'static str) {
    let (status, flag, text) = f.response();
    let mut r = Response::new(full(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Ok(v) = HeaderValue::from_str(flag) {
        r.headers_mut().insert("x-skiff-response-flags", v);
    }
    if let Failure::GrpcFaultAbort(code) = f {
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        if let Ok(v) = HeaderValue::from_str(&code.to_string()) {
            r.headers_mut().insert("grpc-status", v);
        }
    }
    (r, flag)
}

/// gRPC status code from a name (`UNAVAILABLE`) or number; unknown names
/// are UNKNOWN (2).
pub fn grpc_code(s: &str) -> u32 {
    const NAMES: [&str; 17] = [
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
        "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    ];
    s.parse().ok().or_else(|| NAMES.iter().position(|n| n.eq_ignore_ascii_case(s)).map(|i| i as u32)).unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_become_status_flag_and_headers() {
        #[rustfmt::skip]
        let cases: [(Failure, u16, &str, &str, Option<&str>); 5] = [
            (Failure::NoRoute, 404, "NR", "text/plain", None),
            (Failure::Overflow, 503, "UO", "text/plain", None),
            (Failure::FaultAbort(418), 418, "FI", "text/plain", None),
            (Failure::FaultAbort(1000), 503, "FI", "text/plain", None),
            (Failure::GrpcFaultAbort(14), 200, "FI", "application/grpc", Some("14")),
        ];
        for (f, status, flag, content_type, grpc_status) in cases {
            let (r, got) = respond(f);
            assert_eq!((r.status().as_u16(), got), (status, flag), "{f:?}");
            assert_eq!(r.headers()["x-skiff-response-flags"], flag, "{f:?}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], content_type, "{f:?}");
            assert_eq!(r.headers().get("grpc-status").map(|v| v.to_str().unwrap()), grpc_status, "{f:?}");
        }
    }

    #[test]
    fn grpc_codes_by_name_or_number() {
        for (s, want) in [("UNAVAILABLE", 14), ("unavailable", 14), ("8", 8), ("no-such", 2)] {
            assert_eq!(grpc_code(s), want, "{s}");
        }
    }
}
