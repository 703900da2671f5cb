//! Logs (tracing) and metrics (Prometheus text format through `metrics-exporter-prometheus`,
//! with process metrics from `metrics-process`).
//!
//! Metric names follow Prometheus conventions: the `session_manager_` prefix, base units
//! (seconds), `_total` on counters. Every name is a constant in [`names`] and described in
//! [`Metrics::get`], so `/metrics` carries `# HELP` and `# TYPE` lines for each.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Metric names exported by the bot.
pub mod names {
    /// Counter: HTTP requests, by `method`, `route` and `status`.
    pub const HTTP_REQUESTS_TOTAL: &str = "session_manager_http_requests_total";
    /// Histogram: HTTP request duration in seconds, by `method` and `route`.
    pub const HTTP_REQUEST_DURATION_SECONDS: &str = "session_manager_http_request_duration_seconds";
    /// Counter: requests refused with 429 by the per-client rate limiter.
    pub const HTTP_RATE_LIMITED_TOTAL: &str = "session_manager_http_rate_limited_total";
    /// Gauge: client IPs the rate limiter currently tracks.
    pub const RATE_LIMITER_CLIENTS: &str = "session_manager_rate_limiter_clients";
    /// Gauge: 1 when a component (label `component`) answers, 0 when it does not.
    pub const COMPONENT_UP: &str = "session_manager_component_up";
    /// Gauge: sessions running now (started, not ended), by `kind`.
    pub const SESSIONS_ACTIVE: &str = "session_manager_sessions_active";
    /// Counter: sessions started, by `kind`.
    pub const SESSIONS_STARTED_TOTAL: &str = "session_manager_sessions_started_total";
    /// Counter: sessions ended, by `reason`.
    pub const SESSIONS_ENDED_TOTAL: &str = "session_manager_sessions_ended_total";
    /// Counter: inbound chat posts taken for handling, by `platform`.
    pub const CHAT_POSTS_RECEIVED_TOTAL: &str = "session_manager_chat_posts_received_total";
    /// Counter: what the reconciler did, by `action` (`started`, `removed`).
    pub const RECONCILER_ACTIONS_TOTAL: &str = "session_manager_reconciler_actions_total";
    /// Gauge: always 1, labelled with the running `version`.
    pub const BUILD_INFO: &str = "session_manager_build_info";
    /// Gauge: egress grants live now (all sessions).
    pub const EGRESS_GRANTS_ACTIVE: &str = "session_manager_egress_grants_active";
    /// Counter: egress decisions and grant ends, by `event` (`granted`, `shared`, `denied`,
    /// `refused`, `expired`, `revoked`, `session_ended`).
    pub const EGRESS_GRANTS_TOTAL: &str = "session_manager_egress_grants_total";
    /// Counter: changes the bot made to the firewall alias, by `change` (`added`, `removed`).
    pub const FIREWALL_CHANGES_TOTAL: &str = "session_manager_firewall_changes_total";
    /// Counter: domains a live grant covers that the alias had lost, put back.
    pub const FIREWALL_DRIFT_REPAIRS_TOTAL: &str = "session_manager_firewall_drift_repairs_total";
    /// Counter: times the active instance lost its instance-lock connection and stopped acting
    /// until it took the lock back (or stood by).
    pub const LEADER_SUSPENSIONS_TOTAL: &str = "session_manager_leader_suspensions_total";
    /// Counter: inbound messages recorded but not handled when the bot stopped, handled after
    /// it came back.
    pub const INBOUND_REDELIVERED_TOTAL: &str = "session_manager_inbound_redelivered_total";
}

/// Every metric name the bot exports itself (process metrics come from `metrics-process`).
pub const ALL_METRICS: &[&str] = &[
    names::HTTP_REQUESTS_TOTAL,
    names::HTTP_REQUEST_DURATION_SECONDS,
    names::HTTP_RATE_LIMITED_TOTAL,
    names::RATE_LIMITER_CLIENTS,
    names::COMPONENT_UP,
    names::SESSIONS_ACTIVE,
    names::SESSIONS_STARTED_TOTAL,
    names::SESSIONS_ENDED_TOTAL,
    names::CHAT_POSTS_RECEIVED_TOTAL,
    names::RECONCILER_ACTIONS_TOTAL,
    names::BUILD_INFO,
    names::EGRESS_GRANTS_ACTIVE,
    names::EGRESS_GRANTS_TOTAL,
    names::FIREWALL_CHANGES_TOTAL,
    names::FIREWALL_DRIFT_REPAIRS_TOTAL,
    names::LEADER_SUSPENSIONS_TOTAL,
    names::INBOUND_REDELIVERED_TOTAL,
];

/// Histogram buckets for request durations, in seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global tracing subscriber: levels from `RUST_LOG` (default `info`), output to
/// stderr as text or JSON lines. Calling it again does nothing.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.fmt_fields(OneLineFields).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Field formatting for the text log format: the default `name=value` layout, with every
/// control, line-separating and invisible character in a value escaped (`\n`, `\u{202e}`), so
/// a value that came from chat, a callback or an agent (a user id, a domain, a stderr line)
/// can never start a forged log line or hide text. The JSON format needs no help: serde
/// escapes strings.
#[derive(Debug, Clone, Copy, Default)]
pub struct OneLineFields;

impl<'w> FormatFields<'w> for OneLineFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> std::fmt::Result {
        let mut visitor = OneLineVisitor {
            writer,
            padded: false,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct OneLineVisitor<'w> {
    writer: Writer<'w>,
    padded: bool,
    result: std::fmt::Result,
}

impl OneLineVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let escaped = escape_for_log(value);
        let sep = if self.padded { " " } else { "" };
        self.padded = true;
        self.result = match field.name() {
            "message" => write!(self.writer, "{sep}{escaped}"),
            name => write!(
                self.writer,
                "{sep}{}={escaped}",
                name.strip_prefix("r#").unwrap_or(name)
            ),
        };
    }
}

impl Visit for OneLineVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value);
        } else {
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.write(field, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

/// `text` with control characters (`\n`, `\r`, `\t`, the rest as `\u{…}`), the Unicode line
/// and paragraph separators and invisible characters ([`crate::text::is_invisible`]) escaped.
pub fn escape_for_log(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') || crate::text::is_invisible(c)
    };
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if bad(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The process-wide metrics recorder and its renderer.
pub struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

impl Metrics {
    /// The recorder, installed globally on first use (the `metrics` macros write to it).
    pub fn get() -> &'static Metrics {
        METRICS.get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets(DURATION_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                Err(e) => {
                    tracing::warn!(error = %e, "another metrics recorder is installed; /metrics will only show process metrics");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            let process = metrics_process::Collector::default();
            process.describe();
            describe();
            metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Metrics { handle, process }
        })
    }

    /// Renders every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        self.process.collect();
        self.handle.render()
    }

    /// Housekeeping for histograms; call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        names::HTTP_REQUESTS_TOTAL,
        "HTTP requests served, by method, route and status."
    );
    describe_histogram!(
        names::HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time to serve an HTTP request, by method and route."
    );
    describe_counter!(
        names::HTTP_RATE_LIMITED_TOTAL,
        "HTTP requests refused with 429 by the per-client rate limiter."
    );
    describe_gauge!(
        names::RATE_LIMITER_CLIENTS,
        "Client IPs the rate limiter currently tracks."
    );
    describe_gauge!(
        names::COMPONENT_UP,
        "1 when the component answers, 0 when it does not."
    );
    describe_counter!(
        names::RECONCILER_ACTIONS_TOTAL,
        "What the reconciler did to the bot's containers on the VM, by action (started, removed)."
    );
    describe_gauge!(
        names::EGRESS_GRANTS_ACTIVE,
        "Egress grants live now, over all sessions."
    );
    describe_counter!(
        names::EGRESS_GRANTS_TOTAL,
        "Egress decisions and grant ends, by event (granted, shared, denied, refused, expired, revoked, session_ended)."
    );
    describe_counter!(
        names::FIREWALL_CHANGES_TOTAL,
        "Changes the bot made to the firewall alias, by change (added, removed)."
    );
    describe_counter!(
        names::FIREWALL_DRIFT_REPAIRS_TOTAL,
        "Domains a live grant covers that the alias had lost, put back by the bot."
    );
    describe_counter!(
        names::LEADER_SUSPENSIONS_TOTAL,
        "Times this instance lost its instance-lock connection and stopped acting until it took the lock back."
    );
    describe_counter!(
        names::INBOUND_REDELIVERED_TOTAL,
        "Inbound messages recorded but not handled when the bot stopped, handled after it came back."
    );
    describe_gauge!(
        names::BUILD_INFO,
        "Always 1; the version label tells which build runs."
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the text format writes for the events `emit` sends.
    fn text_log(emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .fmt_fields(OneLineFields)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn hostile_field_values_cannot_forge_a_log_line() {
        let forged =
            "alice\n2026-12-06T00:00:00Z  INFO session_manager: admin approved\r\u{1b}[2J\u{202e}";
        let user_id = forged.to_owned();
        let log = text_log(|| {
            tracing::warn!(user = %user_id, post = ?forged, domain = forged, "refused");
            let e = std::io::Error::other(forged.to_owned());
            tracing::error!(error = &e as &(dyn std::error::Error + 'static), "failed");
        });
        assert_eq!(log.lines().count(), 2, "one line per event: {log}");
        assert!(!log.contains('\u{1b}') && !log.contains('\u{202e}') && !log.contains('\r'));
        let first = log.lines().next().expect("line");
        assert!(first.contains("refused user=alice\\n2026-12-06"), "{first}");
        assert!(first.contains("\\u{1b}[2J\\u{202e}"), "{first}");
        assert!(log.contains("error=alice\\n"), "{log}");
        assert_eq!(escape_for_log("plain text: ok"), "plain text: ok");
    }
}
