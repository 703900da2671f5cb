//! Logs (tracing) and metrics (Prometheus text format through `metrics-exporter-prometheus`,
//! with process metrics from `metrics-process`).
//!
//! Metric names follow Prometheus conventions: the `session_manager_` prefix, base units
//! (seconds), `_total` on counters. Every name is a constant in [`names`] and described in
//! [`Metrics::get`], so `/metrics` carries `# HELP` and `# TYPE` lines for each.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
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
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
        names::BUILD_INFO,
        "Always 1; the version label tells which build runs."
    );
}
