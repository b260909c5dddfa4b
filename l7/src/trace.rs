//! Trace context: W3C `traceparent` and B3 (`x-b3-*`, single `b3`). Kept
//! when the request carries one (with this hop's own span id), generated
//! when it does not.

use http::HeaderMap;

/// The trace context of one request as it leaves the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 hex digits.
    pub trace_id: String,
    /// This hop's span, 16 hex digits.
    pub span_id: String,
    /// The caller's span, if any.
    pub parent_span_id: Option<String>,
    pub sampled: bool,
}

fn hex_ok(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// Reads the incoming context: `traceparent` first, then B3 multi, then B3
/// single. `new_span` is this hop's span id; `new_trace` is used when there
/// is no valid incoming context.
pub fn continue_or_start(h: &HeaderMap, new_trace: &str, new_span: &str) -> TraceContext {
    let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(tp) = get("traceparent") {
        let parts: Vec<&str> = tp.split('-').collect();
        if parts.len() == 4 && parts[0] == "00" && hex_ok(parts[1], 32) && hex_ok(parts[2], 16) {
            return TraceContext {
                trace_id: parts[1].to_ascii_lowercase(),
                span_id: new_span.to_owned(),
                parent_span_id: Some(parts[2].to_ascii_lowercase()),
                sampled: parts[3].ends_with('1'),
            };
        }
    }
    if let (Some(t), Some(s)) = (get("x-b3-traceid"), get("x-b3-spanid")) {
        if (hex_ok(t, 32) || hex_ok(t, 16)) && hex_ok(s, 16) {
            let trace_id = if t.len() == 16 { format!("{:0>32}", t) } else { t.to_owned() };
            return TraceContext {
                trace_id: trace_id.to_ascii_lowercase(),
                span_id: new_span.to_owned(),
                parent_span_id: Some(s.to_ascii_lowercase()),
                sampled: get("x-b3-sampled") != Some("0"),
            };
        }
    }
    if let Some(b3) = get("b3") {
        let parts: Vec<&str> = b3.split('-').collect();
        if parts.len() >= 2 && (hex_ok(parts[0], 32) || hex_ok(parts[0], 16)) && hex_ok(parts[1], 16) {
            let trace_id = if parts[0].len() == 16 { format!("{:0>32}", parts[0]) } else { parts[0].to_owned() };
            return TraceContext {
                trace_id: trace_id.to_ascii_lowercase(),
                span_id: new_span.to_owned(),
                parent_span_id: Some(parts[1].to_ascii_lowercase()),
                sampled: parts.get(2) != Some(&"0"),
            };
        }
    }
    TraceContext { trace_id: new_trace.to_owned(), span_id: new_span.to_owned(), parent_span_id: None, sampled: true }
}

/// `bytes` random bytes as lowercase hex: a new trace id (16) or span id (8).
pub fn random_id(rng: &mut fastrand::Rng, bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rng.u8(..))).collect()
}

/// Writes the context into outgoing headers (both formats).
pub fn inject(ctx: &TraceContext, h: &mut HeaderMap) {
    let flag = if ctx.sampled { "1" } else { "0" };
    let set = |h: &mut HeaderMap, k: &'static str, v: String| {
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set(h, "traceparent", format!("00-{}-{}-0{}", ctx.trace_id, ctx.span_id, flag));
    set(h, "x-b3-traceid", ctx.trace_id.clone());
    set(h, "x-b3-spanid", ctx.span_id.clone());
    set(h, "x-b3-sampled", flag.to_owned());
    match &ctx.parent_span_id {
        Some(p) => set(h, "x-b3-parentspanid", p.clone()),
        None => {
            h.remove("x-b3-parentspanid");
        }
    }
    set(h, "b3", format!("{}-{}-{}", ctx.trace_id, ctx.span_id, flag));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const T: &str = "0af7651916cd43dd8448eb211c80319c";
    const NEW_T: &str = "11111111111111111111111111111111";
    const NEW_S: &str = "2222222222222222";

    #[test]
    fn contexts_are_kept_or_started() {
        #[rustfmt::skip]
        let cases: Vec<(&str, HeaderMap, &str, Option<&str>)> = vec![
            ("none: new trace", headers(&[]), NEW_T, None),
            ("traceparent kept", headers(&[("traceparent", &format!("00-{T}-b7ad6b7169203331-01"))]), T, Some("b7ad6b7169203331")),
            ("b3 multi kept", headers(&[("x-b3-traceid", T), ("x-b3-spanid", "b7ad6b7169203331")]), T, Some("b7ad6b7169203331")),
            ("b3 64-bit id widened", headers(&[("x-b3-traceid", "8448eb211c80319c"), ("x-b3-spanid", "b7ad6b7169203331")]), "00000000000000008448eb211c80319c", Some("b7ad6b7169203331")),
            ("b3 single kept", headers(&[("b3", &format!("{T}-b7ad6b7169203331-1"))]), T, Some("b7ad6b7169203331")),
            ("all-zero trace id is invalid", headers(&[("traceparent", "00-00000000000000000000000000000000-b7ad6b7169203331-01")]), NEW_T, None),
            ("garbage ignored", headers(&[("traceparent", "hello")]), NEW_T, None),
        ];
        for (name, h, trace, parent) in cases {
            let c = continue_or_start(&h, NEW_T, NEW_S);
            assert_eq!(c.trace_id, trace, "case {name}");
            assert_eq!(c.parent_span_id.as_deref(), parent, "case {name}");
            assert_eq!(c.span_id, NEW_S, "case {name}");
        }
        let mut out = HeaderMap::new();
        inject(&continue_or_start(&headers(&[]), NEW_T, NEW_S), &mut out);
        assert_eq!(out["traceparent"], format!("00-{NEW_T}-{NEW_S}-01"));
        assert_eq!(out["x-b3-traceid"], NEW_T);
        assert_eq!(out["b3"], format!("{NEW_T}-{NEW_S}-1"));
    }

    #[test]
    fn random_ids_are_hex_of_the_asked_length() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (t, s) = (random_id(&mut rng, 16), random_id(&mut rng, 8));
        assert_eq!((t.len(), s.len()), (32, 16));
        assert!(t.bytes().chain(s.bytes()).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{t} {s}");
        assert_eq!(t, random_id(&mut fastrand::Rng::with_seed(7), 16), "same seed, same id");
    }
}
