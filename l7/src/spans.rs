//! Distributed tracing: a span per request at the waypoint and the ingress
//! gateway — a server span for the request as it arrived, a client span
//! for the request as it goes upstream — with Istio's span attributes,
//! exported with the OpenTelemetry SDK over OTLP (HTTP/protobuf) and/or
//! Zipkin v2 JSON, to the collectors `--tracing-*` or Istio's `Telemetry`
//! name. Trace context is read and written by the OpenTelemetry
//! propagators: W3C `traceparent` (first) and B3, single and multi-header.
//!
//! Sampling is parent-based: a request that carries a sampling decision
//! keeps it (so the decision made at the edge holds end to end); a new
//! trace is sampled at the configured percentage. Spans that are not
//! sampled are never recorded, but their context still propagates.

use std::{
    sync::Mutex,
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use opentelemetry::{
    propagation::{TextMapCompositePropagator, TextMapPropagator},
    trace::{SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, Tracer as _, TracerProvider as _},
    Context, KeyValue,
};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, IdGenerator as _, RandomIdGenerator, Sampler, SdkTracer, SdkTracerProvider};
use tracing::{debug, warn};

/// Where spans go and how many: from `--tracing-*` or from Istio's
/// `Telemetry` (`tracing[]`) and mesh config `extensionProviders`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Settings {
    /// OTLP/HTTP protobuf traces endpoint (`http://host:4318/v1/traces`).
    pub otlp: Option<String>,
    /// Zipkin v2 endpoint (`http://host:9411/api/v2/spans`).
    pub zipkin: Option<String>,
    /// Percent of new traces sampled (0–100).
    pub sampling: f64,
    /// Spans are not exported (context still propagates).
    pub disable_reporting: bool,
    /// Which spans this proxy records.
    pub mode: Mode,
    /// `customTags`: added to every span.
    pub tags: Vec<(String, Tag)>,
}

pub use skiff_core::telemetry_api::{Mode, Tag};

impl Settings {
    /// Whether spans are exported anywhere.
    pub fn exports(&self) -> bool {
        !self.disable_reporting && (self.otlp.is_some() || self.zipkin.is_some())
    }
}

/// Where spans go without a `Telemetry` (one takes precedence where it
/// applies).
#[derive(Clone, Debug, clap::Args)]
pub struct TracingArgs {
    /// Export spans over OTLP (HTTP/protobuf) to this URL, e.g.
    /// http://otel-collector.observability:4318/v1/traces.
    #[arg(long = "tracing-otlp-endpoint", env = "SKIFF_TRACING_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp: Option<String>,
    /// Export spans as Zipkin v2 JSON to this URL, e.g.
    /// http://zipkin.observability:9411/api/v2/spans.
    #[arg(long = "tracing-zipkin-endpoint", env = "SKIFF_TRACING_ZIPKIN_ENDPOINT", value_name = "URL")]
    pub zipkin: Option<String>,
    /// Percent of new traces sampled (a request that carries a sampling
    /// decision keeps it). Istio's default: 1.
    #[arg(long = "tracing-sampling", default_value = "1", value_name = "PERCENT", value_parser = percent)]
    pub sampling: f64,
}

fn percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a percentage from 0 to 100"))
    }
}

impl TracingArgs {
    pub fn settings(&self) -> Settings {
        Settings { otlp: self.otlp.clone(), zipkin: self.zipkin.clone(), sampling: self.sampling, ..Default::default() }
    }
}

/// The span machinery of one proxy: the tracer for the settings in force,
/// rebuilt when they change.
pub struct Tracing {
    service_name: String,
    propagator: TextMapCompositePropagator,
    current: Mutex<Option<(Settings, SdkTracer, SdkTracerProvider)>>,
    handle: Option<tokio::runtime::Handle>,
}

impl Tracing {
    /// `service_name`: how the proxy names itself in its spans (Istio's
    /// `<canonical service>.<namespace>`).
    pub fn new(service_name: String) -> Tracing {
        let propagator = TextMapCompositePropagator::new(vec![
            // B3 first, W3C last: when both are present, traceparent wins.
            Box::new(opentelemetry_zipkin::Propagator::with_encoding(opentelemetry_zipkin::B3Encoding::SingleAndMultiHeader)),
            Box::new(opentelemetry_sdk::propagation::TraceContextPropagator::new()),
        ]);
        Tracing { service_name, propagator, current: Mutex::new(None), handle: tokio::runtime::Handle::try_current().ok() }
    }

    fn tracer(&self, s: &Settings) -> SdkTracer {
        let mut cur = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((have, tracer, _)) = cur.as_ref() {
            if have == s {
                return tracer.clone();
            }
        }
        let provider = self.provider(s);
        let tracer = provider.tracer("skiff");
        if let Some((_, _, old)) = cur.replace((s.clone(), tracer.clone(), provider)) {
            // Flushes what it holds; off the request path (in place if no
            // thread can be had).
            let (tx, rx) = std::sync::mpsc::channel::<SdkTracerProvider>();
            let spawned = std::thread::Builder::new().name("span-flush".into()).spawn(move || {
                if let Ok(old) = rx.recv() {
                    let _ = old.shutdown();
                }
            });
            match spawned {
                Ok(_) => {
                    let _ = tx.send(old);
                }
                Err(_) => {
                    let _ = old.shutdown();
                }
            }
        }
        tracer
    }

    fn provider(&self, s: &Settings) -> SdkTracerProvider {
        let sampler = if s.exports() || s.disable_reporting {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased((s.sampling / 100.0).clamp(0.0, 1.0))))
        } else {
            // Nowhere to send spans: context only, new traces marked
            // sampled (for what the application does with them).
            Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
        };
        let resource = opentelemetry_sdk::Resource::builder_empty().with_service_name(self.service_name.clone()).build();
        let mut b = SdkTracerProvider::builder().with_sampler(sampler).with_resource(resource);
        if s.exports() {
            // The SDK's default queue (2048 spans; beyond it spans are
            // dropped, never waited for) and batches of 256.
            let batch = || BatchConfigBuilder::default().with_scheduled_delay(Duration::from_secs(1)).with_max_queue_size(2048).with_max_export_batch_size(256).build();
            if let (Some(url), Some(h)) = (&s.otlp, &self.handle) {
                use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
                match opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(Poster::new(h.clone(), None))
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(url.clone())
                    .build()
                {
                    Ok(e) => b = b.with_span_processor(BatchSpanProcessor::builder(e).with_batch_config(batch()).build()),
                    Err(e) => warn!(endpoint = %url, error = %e, "OTLP span exporter cannot be made; spans not sent there"),
                }
            }
            if let (Some(url), Some(h)) = (&s.zipkin, &self.handle) {
                let poster = Poster::new(h.clone(), Some(self.service_name.clone()));
                match opentelemetry_zipkin::ZipkinExporter::builder().with_http_client(poster).with_collector_endpoint(url.clone()).build() {
                    Ok(e) => b = b.with_span_processor(BatchSpanProcessor::builder(e).with_batch_config(batch()).build()),
                    Err(e) => warn!(endpoint = %url, error = %e, "Zipkin span exporter cannot be made; spans not sent there"),
                }
            }
        }
        b.build()
    }

    /// The spans of one request arriving with `headers` (passed through
    /// [`normalize_traceparent`]): its server span started (child of the
    /// caller's context, if any).
    pub fn start(&self, s: &Settings, headers: &HeaderMap, name: String, attributes: Vec<KeyValue>) -> RequestSpans {
        let tracer = self.tracer(s);
        let parent = self.propagator.extract(&opentelemetry_http::HeaderExtractor(headers));
        if !s.exports() {
            // Nothing is exported: context only, no span recorded. The
            // trace continues (or starts, sampled at the configured
            // percentage with reporting off, else marked sampled for what
            // the application does with it) under a new span id of ours.
            let pc = parent.span().span_context().clone();
            let (trace_id, flags, state) = if pc.is_valid() {
                (pc.trace_id(), pc.trace_flags(), pc.trace_state().clone())
            } else {
                let sampled = !s.disable_reporting || fastrand::f64() * 100.0 < s.sampling;
                let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
                (RandomIdGenerator::default().new_trace_id(), flags, Default::default())
            };
            let server = (s.mode != Mode::Client).then(|| parent.with_remote_span_context(SpanContext::new(trace_id, RandomIdGenerator::default().new_span_id(), flags, false, state)));
            let parent = if pc.is_valid() { parent } else { Context::new().with_remote_span_context(SpanContext::new(trace_id, SpanId::INVALID, flags, false, Default::default())) };
            return RequestSpans { tracer, parent, server, client: None, mode: s.mode, name, tags: Vec::new(), light: true };
        }
        let mut attributes = attributes;
        if s.exports() {
            attributes.extend(custom_tags(&s.tags, headers));
        }
        let server = match s.mode {
            Mode::Client => None,
            _ => Some(parent.with_span(tracer.span_builder(name.clone()).with_kind(SpanKind::Server).with_attributes(attributes.clone()).start_with_context(&tracer, &parent))),
        };
        RequestSpans { tracer, parent, server, client: None, mode: s.mode, name, tags: attributes, light: false }
    }

    /// Writes `cx`'s span context into outgoing headers, in both formats,
    /// in place of every trace header the caller sent (a caller's
    /// `x-b3-flags` or parent id would otherwise ride along with ours).
    fn inject(&self, cx: &Context, headers: &mut HeaderMap) {
        for f in self.propagator.fields() {
            headers.remove(f);
        }
        headers.remove("x-b3-parentspanid");
        self.propagator.inject_context(cx, &mut opentelemetry_http::HeaderInjector(headers));
        if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
            headers.remove("tracestate");
        }
    }
}

/// The spans of one request.
pub struct RequestSpans {
    tracer: SdkTracer,
    parent: Context,
    server: Option<Context>,
    client: Option<Context>,
    /// Context only (nothing is exported): span contexts, no SDK spans.
    light: bool,
    mode: Mode,
    name: String,
    tags: Vec<KeyValue>,
}

impl RequestSpans {
    /// The trace id (32 hex digits), for the access log.
    pub fn trace_id(&self) -> String {
        let cx = self.server.as_ref().unwrap_or(&self.parent);
        let id = cx.span().span_context().trace_id();
        if id == opentelemetry::trace::TraceId::INVALID {
            // No server span and no caller: the client span's, once made.
            return self.client.as_ref().map(|c| c.span().span_context().trace_id().to_string()).unwrap_or_default();
        }
        id.to_string()
    }

    /// The request was routed: its spans are named after the destination
    /// (`<host>:<port>/*`, as Istio's), not after what the client asked.
    pub fn rename(&mut self, name: String) {
        if let Some(s) = &self.server {
            s.span().update_name(name.clone());
        }
        self.name = name;
    }

    /// Whether this request's trace is sampled.
    pub fn sampled(&self) -> bool {
        self.server.as_ref().or(self.client.as_ref()).is_some_and(|c| c.span().span_context().is_sampled())
    }

    /// The request goes upstream with `headers`: starts the client span
    /// (child of the server span) and writes its context into them. With
    /// client spans off, the server span's context goes instead.
    pub fn upstream(&mut self, tracing: &Tracing, headers: &mut HeaderMap, attributes: Vec<KeyValue>) {
        let base = self.server.clone().unwrap_or_else(|| self.parent.clone());
        if self.mode == Mode::Server {
            tracing.inject(&base, headers);
            return;
        }
        if self.light {
            let pc = base.span().span_context().clone();
            let child = SpanContext::new(pc.trace_id(), RandomIdGenerator::default().new_span_id(), pc.trace_flags(), false, pc.trace_state().clone());
            let client = self.client.get_or_insert_with(|| base.with_remote_span_context(child));
            tracing.inject(client, headers);
            return;
        }
        let client = self.client.get_or_insert_with(|| {
            let mut a = self.tags.clone();
            a.extend(attributes);
            base.with_span(self.tracer.span_builder(self.name.clone()).with_kind(SpanKind::Client).with_attributes(a).start_with_context(&self.tracer, &base))
        });
        tracing.inject(client, headers);
    }

    /// The response was sent: both spans end with its outcome.
    pub fn end(self, code: u16, attributes: Vec<KeyValue>) {
        for cx in [self.client, self.server].into_iter().flatten() {
            let span = cx.span();
            if !span.is_recording() {
                span.end();
                continue;
            }
            span.set_attribute(KeyValue::new("http.status_code", code.to_string()));
            for a in &attributes {
                span.set_attribute(a.clone());
            }
            if code >= 500 || code == 0 {
                span.set_attribute(KeyValue::new("error", "true"));
                span.set_status(Status::error(format!("HTTP {code}")));
            }
            span.end();
        }
    }
}

/// Longest value a span attribute or name taken from a request carries
/// (bytes; Envoy's `max_path_tag_length` and Istio's `maxTagLength`
/// default): a client's long URL or header costs the span queue no more.
pub const MAX_TAG: usize = 256;

/// `s`, cut to [`MAX_TAG`] bytes on a character boundary.
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_TAG {
        return s.to_owned();
    }
    let mut end = MAX_TAG;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn custom_tags(tags: &[(String, Tag)], headers: &HeaderMap) -> Vec<KeyValue> {
    tags.iter()
        .filter_map(|(k, t)| {
            let v = match t {
                Tag::Literal(v) => Some(v.clone()),
                Tag::Environment { name, default } => std::env::var(name).ok().or_else(|| default.clone()),
                Tag::Header { name, default } => headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(bounded).or_else(|| default.clone()),
            }?;
            Some(KeyValue::new(k.clone(), v))
        })
        .collect()
}

/// A version-00 `traceparent` with reserved flag bits set, with them
/// cleared: W3C Trace Context says a receiver ignores flags it does not
/// know (level 2 defines 0x02, the random-trace-id flag), where the
/// OpenTelemetry propagator refuses the whole header.
fn masked_traceparent(h: &HeaderMap) -> Option<String> {
    let v = h.get("traceparent")?.to_str().ok()?.trim();
    let parts: Vec<&str> = v.split('-').collect();
    if parts.len() == 4 && parts[0] == "00" && parts[3].len() == 2 {
        let flags = u8::from_str_radix(parts[3], 16).ok()?;
        if flags & !0x01 != 0 {
            return Some(format!("00-{}-{}-{:02x}", parts[1], parts[2], flags & 0x01));
        }
    }
    None
}

/// `headers` with a version-00 traceparent's unknown flag bits cleared.
pub fn normalize_traceparent(headers: &mut HeaderMap) {
    if let Some(v) = masked_traceparent(headers).and_then(|v| http::HeaderValue::from_str(&v).ok()) {
        headers.insert("traceparent", v);
    }
}

/// The exporters' HTTP client: each POST runs on the proxy's runtime (the
/// SDK's batch processor exports from its own thread).
#[derive(Debug, Clone)]
struct Poster {
    handle: tokio::runtime::Handle,
    /// For Zipkin: the service name each span's `localEndpoint` carries,
    /// which Zipkin's UI groups by and opentelemetry-zipkin 0.31 leaves
    /// out (its endpoint has an address only).
    zipkin_service: Option<String>,
}

impl Poster {
    fn new(handle: tokio::runtime::Handle, zipkin_service: Option<String>) -> Poster {
        Poster { handle, zipkin_service }
    }
}

/// A Zipkin v2 span list with `localEndpoint.serviceName` set on each span.
fn with_service_name(body: Bytes, service: &str) -> Bytes {
    let Ok(mut spans) = serde_json::from_slice::<Vec<serde_json::Value>>(&body) else { return body };
    for s in &mut spans {
        if let Some(obj) = s.as_object_mut() {
            let ep = obj.entry("localEndpoint").or_insert_with(|| serde_json::json!({}));
            if let Some(ep) = ep.as_object_mut() {
                ep.insert("serviceName".into(), serde_json::Value::String(service.to_owned()));
            }
        }
    }
    serde_json::to_vec(&spans).map(Bytes::from).unwrap_or(body)
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Poster {
    async fn send_bytes(&self, request: http::Request<Bytes>) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let request = match &self.zipkin_service {
            Some(service) => request.map(|b| with_service_name(b, service)),
            None => request,
        };
        self.handle.spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(10), post(request)).await.unwrap_or_else(|_| Err("timed out after 10 s".into()));
            let _ = tx.send(r);
        });
        rx.await.map_err(|_| -> opentelemetry_http::HttpError { "the runtime went away".into() })?
    }
}

async fn post(request: http::Request<Bytes>) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
    use http_body_util::BodyExt as _;
    let uri = request.uri().clone();
    if uri.scheme_str() != Some("http") {
        return Err(format!("{uri}: only http:// collectors are supported").into());
    }
    let host = uri.host().ok_or("no host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "span export connection ended");
        }
    });
    let (mut parts, body) = request.into_parts();
    // Host and port only (never userinfo).
    let authority = match uri.port_u16() {
        Some(p) => format!("{}:{p}", uri.host().unwrap_or_default()),
        None => uri.host().unwrap_or_default().to_owned(),
    };
    parts.uri = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").parse()?;
    if let Ok(v) = http::HeaderValue::from_str(&authority) {
        parts.headers.insert(http::header::HOST, v);
    }
    let resp = send.send_request(http::Request::from_parts(parts, http_body_util::Full::new(body))).await?;
    let (parts, body) = resp.into_parts();
    // A collector's answer is small; no more than 64 KiB is read.
    let body = http_body_util::Limited::new(body, 64 * 1024).collect().await?.to_bytes();
    if !parts.status.is_success() {
        warn!(collector = %uri, status = %parts.status, "the trace collector refused spans");
    }
    Ok(http::Response::from_parts(parts, body))
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
    const P: &str = "b7ad6b7169203331";

    /// W3C Trace Context (traceparent: version, trace-id, parent-id,
    /// flags; a future version may add fields; 0xff is invalid; unknown
    /// flags are ignored) and B3 (single `b3`, multi `x-b3-*`, 64-bit ids
    /// widened), as the OpenTelemetry propagators read them.
    #[test]
    fn incoming_context_is_continued_or_a_trace_started() {
        let t = Tracing::new("waypoint.shop".into());
        let s = Settings::default();
        // (case, headers, continued trace id, sampled)
        #[rustfmt::skip]
        let cases: Vec<(&str, HeaderMap, Option<&str>, bool)> = vec![
            ("none: new trace, sampled", headers(&[]), None, true),
            ("traceparent sampled", headers(&[("traceparent", &format!("00-{T}-{P}-01"))]), Some(T), true),
            ("traceparent not sampled", headers(&[("traceparent", &format!("00-{T}-{P}-00"))]), Some(T), false),
            ("level-2 random flag (03): sampled", headers(&[("traceparent", &format!("00-{T}-{P}-03"))]), Some(T), true),
            ("unknown flag only (02): not sampled", headers(&[("traceparent", &format!("00-{T}-{P}-02"))]), Some(T), false),
            ("a future version with more fields", headers(&[("traceparent", &format!("01-{T}-{P}-01-extra"))]), Some(T), true),
            ("version ff is invalid", headers(&[("traceparent", &format!("ff-{T}-{P}-01"))]), None, true),
            ("all-zero trace id is invalid", headers(&[("traceparent", &format!("00-{}-{P}-01", "0".repeat(32)))]), None, true),
            ("b3 multi", headers(&[("x-b3-traceid", T), ("x-b3-spanid", P), ("x-b3-sampled", "0")]), Some(T), false),
            ("b3 single", headers(&[("b3", &format!("{T}-{P}-1"))]), Some(T), true),
            ("b3 64-bit id widened", headers(&[("x-b3-traceid", "8448eb211c80319c"), ("x-b3-spanid", P), ("x-b3-sampled", "1")]), Some("00000000000000008448eb211c80319c"), true),
            ("traceparent wins over b3", headers(&[("traceparent", &format!("00-{T}-{P}-01")), ("b3", "11111111111111111111111111111111-2222222222222222-1")]), Some(T), true),
            ("garbage ignored", headers(&[("traceparent", "hello")]), None, true),
        ];
        for (name, mut h, trace, sampled) in cases {
            normalize_traceparent(&mut h);
            let spans = t.start(&s, &h, "x".into(), vec![]);
            match trace {
                Some(id) => assert_eq!(spans.trace_id(), id, "case {name}"),
                None => assert!(spans.trace_id().len() == 32 && spans.trace_id() != "0".repeat(32) && spans.trace_id() != T, "case {name}: {}", spans.trace_id()),
            }
            assert_eq!(spans.sampled(), sampled, "case {name}");
        }
    }

    #[test]
    fn upstream_headers_carry_the_client_span_in_both_formats() {
        let t = Tracing::new("waypoint.shop".into());
        let h = headers(&[("traceparent", &format!("00-{T}-{P}-01")), ("x-b3-parentspanid", "1111111111111111")]);
        let mut spans = t.start(&Settings::default(), &h, "x".into(), vec![]);
        let mut out = h.clone();
        spans.upstream(&t, &mut out, vec![]);
        let tp = out["traceparent"].to_str().unwrap().to_owned();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!((parts[0], parts[1], parts[3]), ("00", T, "01"), "{tp}");
        assert_ne!(parts[2], P, "a new span id: ours");
        assert_eq!(out["x-b3-traceid"], T);
        assert_eq!(out["x-b3-spanid"].to_str().unwrap(), parts[2]);
        assert_eq!(out["b3"].to_str().unwrap(), format!("{T}-{}-1", parts[2]));
        assert!(out.get("x-b3-parentspanid").is_none(), "the caller's parent id is not passed on as ours");
        // Server-only mode: the server span's context goes upstream.
        let s = Settings { mode: Mode::Server, ..Default::default() };
        let mut spans = t.start(&s, &h, "x".into(), vec![]);
        let mut out = h.clone();
        spans.upstream(&t, &mut out, vec![]);
        assert!(out["traceparent"].to_str().unwrap().starts_with(&format!("00-{T}-")));
    }

    #[test]
    fn custom_tags_take_literals_environment_and_headers() {
        let tags = vec![
            ("team".to_owned(), Tag::Literal("payments".into())),
            ("home".to_owned(), Tag::Environment { name: "SKIFF_TEST_NO_SUCH_VAR".into(), default: Some("none".into()) }),
            ("user".to_owned(), Tag::Header { name: "x-user".into(), default: None }),
            ("absent".to_owned(), Tag::Header { name: "x-absent".into(), default: None }),
        ];
        let got = custom_tags(&tags, &headers(&[("x-user", "ana")]));
        let got: Vec<(String, String)> = got.into_iter().map(|kv| (kv.key.to_string(), kv.value.to_string())).collect();
        assert_eq!(got, vec![("team".into(), "payments".into()), ("home".into(), "none".into()), ("user".into(), "ana".into())]);
    }

    #[test]
    fn values_from_requests_are_bounded_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(200);
        let b = bounded(&long);
        assert!(b.len() <= MAX_TAG && b.len() >= MAX_TAG - 1, "{}", b.len());
        assert!(long.starts_with(&b));
    }
}
