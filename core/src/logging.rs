//! Logs, as every Skiff process writes them: to stderr, filtered by
//! `SKIFF_LOG` (tracing's `EnvFilter` syntax, e.g. `info` or
//! `info,skiff_l7=debug`), as text or, with `--log-format json` (or
//! `SKIFF_LOG_FORMAT=json`), as one JSON object per line for log
//! pipelines: `time` (RFC 3339, UTC), `level`, `target`, `message`, the
//! event's fields under their own names (ztunnel's access log uses Istio
//! ztunnel's: `src.addr`, `src.workload`, `src.identity`, `dst.addr`,
//! `dst.service`, `dst.workload`, `dst.identity`, `direction`,
//! `bytes_sent`, …) and `spans`, the enclosing spans outermost first,
//! each with its `name` and fields.

use std::{io::Write as _, str::FromStr};

use serde_json::{Map, Value};
use tracing::{
    field::{Field, Visit},
    span, Event, Subscriber,
};
use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan, reload, EnvFilter, Layer, Registry};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (tracing's default format).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            o => Err(format!("{o:?} is not a log format: text or json")),
        }
    }
}

/// Changes the filter of a running process (ztunnel's admin endpoint).
pub type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// Installs the process's logger: `SKIFF_LOG` (else `default_filter`) in
/// `format`, to stderr; and the access-event stream ([`events`]), which
/// sees every access line whatever the filter.
pub fn init(format: LogFormat, default_filter: &str) -> FilterHandle {
    let filter = EnvFilter::try_from_env("SKIFF_LOG").unwrap_or_else(|_| default_filter.into());
    let (filter, handle) = reload::Layer::new(filter);
    let output: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => JsonLines.boxed(),
    };
    tracing_subscriber::registry().with(output.with_filter(filter)).with(AccessEvents.with_filter(AccessFilter)).init();
    handle
}

/// The target of access-log lines (one per connection at ztunnel, one per
/// request or TCP stream at a waypoint or gateway).
pub const ACCESS_TARGET: &str = "access";

/// How many access events a slow `/events` reader may fall behind before
/// it loses the oldest (and is told how many).
pub const EVENTS_BUFFER: usize = 1024;

/// Readers of [`events`] at most at once: each costs the publisher a
/// wake-up per event.
pub const EVENTS_READERS: usize = 8;

static READERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// This process's access events, each the access line's fields as JSON
/// (as the JSON log format writes them, without `spans`). A reader that
/// falls more than [`EVENTS_BUFFER`] behind loses the oldest
/// (`RecvError::Lagged(n)` says how many); the data path never waits for
/// one. While no reader holds an [`EventsReader`], access events are not
/// even enabled for it (one atomic load per access line).
fn events() -> &'static tokio::sync::broadcast::Sender<std::sync::Arc<str>> {
    static BUS: std::sync::OnceLock<tokio::sync::broadcast::Sender<std::sync::Arc<str>>> = std::sync::OnceLock::new();
    BUS.get_or_init(|| tokio::sync::broadcast::channel(EVENTS_BUFFER).0)
}

/// One reader of the access events; counted while it lives.
pub struct EventsReader {
    pub rx: tokio::sync::broadcast::Receiver<std::sync::Arc<str>>,
}

impl Drop for EventsReader {
    fn drop(&mut self) {
        READERS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A new reader of the access events, or None when [`EVENTS_READERS`]
/// already read.
pub fn read_events() -> Option<EventsReader> {
    READERS
        .fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |n| (n < EVENTS_READERS).then_some(n + 1))
        .ok()?;
    Some(EventsReader { rx: events().subscribe() })
}

/// Publishes one access event (tests; the logging layer publishes the
/// real ones).
pub fn publish_event(line: &str) {
    let _ = events().send(line.into());
}

/// Access lines, while someone reads them: an INFO `access` event is
/// enabled for [`AccessEvents`] only then (decided per event), every
/// other callsite never.
struct AccessFilter;

impl<S> tracing_subscriber::layer::Filter<S> for AccessFilter {
    fn enabled(&self, m: &tracing::Metadata<'_>, _: &Context<'_, S>) -> bool {
        m.target() == ACCESS_TARGET && *m.level() <= tracing::Level::INFO && READERS.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    fn callsite_enabled(&self, m: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        if m.target() == ACCESS_TARGET && *m.level() <= tracing::Level::INFO && m.is_event() {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::INFO)
    }
}

/// Publishes access lines to [`events`].
struct AccessEvents;

impl<S> Layer<S> for AccessEvents
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut line = json_line(event, &ctx);
        line.pop();
        let _ = events().send(String::from_utf8_lossy(&line).into());
    }
}

/// The JSON-lines layer.
struct JsonLines;

/// A span's fields, kept with it for the events inside it.
struct SpanFields(Map<String, Value>);

impl<S> Layer<S> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut v = Fields::default();
        attrs.record(&mut v);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(v.0));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            if let Some(f) = ext.get_mut::<SpanFields>() {
                let mut v = Fields(std::mem::take(&mut f.0));
                values.record(&mut v);
                f.0 = v.0;
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let _ = std::io::stderr().lock().write_all(&json_line(event, &ctx));
    }
}

/// One event as a JSON line (newline included).
fn json_line<S>(event: &Event<'_>, ctx: &Context<'_, S>) -> Vec<u8>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let meta = event.metadata();
    let mut out = Map::new();
    out.insert("time".into(), Value::String(rfc3339(std::time::SystemTime::now())));
    out.insert("level".into(), Value::String(meta.level().as_str().to_ascii_lowercase()));
    out.insert("target".into(), Value::String(meta.target().to_owned()));
    let mut fields = Fields::default();
    event.record(&mut fields);
    out.extend(fields.0);
    if let Some(scope) = ctx.event_scope(event) {
        let spans: Vec<Value> = scope
            .from_root()
            .map(|span| {
                let mut m = Map::new();
                m.insert("name".into(), Value::String(span.name().to_owned()));
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    m.extend(f.0.clone());
                }
                Value::Object(m)
            })
            .collect();
        if !spans.is_empty() {
            out.insert("spans".into(), Value::Array(spans));
        }
    }
    let mut line = serde_json::to_vec(&Value::Object(out)).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Field values as JSON: numbers and booleans as such, the rest as text
/// (`%` fields by their Display, `?` fields by their Debug).
#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().to_owned(), Value::String(crate::report(value)));
    }
}

/// `t` as RFC 3339 in UTC with milliseconds (`2026-12-03T02:41:05.123Z`).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        let at = |s: u64, ms: u64| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(s * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z", "a leap day");
        assert_eq!(at(1_796_265_665, 123), "2026-12-03T02:41:05.123Z");
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().is_err());
    }

    /// An event with fields, in a span with fields, as one JSON object.
    #[test]
    fn an_event_is_one_json_object_with_its_fields_and_spans() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
            fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
                JsonLines.on_new_span(attrs, id, ctx)
            }
            fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
                self.0.lock().unwrap().extend(json_line(event, &ctx));
            }
        }
        let subscriber = tracing_subscriber::registry().with(Capture(buf.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("outbound", pod = "app/client");
            let _g = span.enter();
            let addr = "10.0.0.1:4000";
            tracing::info!(target: "access", bytes_sent = 12u64, src.addr = %addr, allowed = true, "connection complete");
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == 1, "{text}");
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "connection complete");
        assert_eq!((v["level"].as_str(), v["target"].as_str()), (Some("info"), Some("access")));
        assert_eq!((v["src.addr"].as_str(), v["bytes_sent"].as_u64(), v["allowed"].as_bool()), (Some("10.0.0.1:4000"), Some(12), Some(true)));
        assert_eq!(v["spans"][0], serde_json::json!({"name": "outbound", "pod": "app/client"}));
        assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
