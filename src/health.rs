//! Component health, as `/health` reports it.
//!
//! Each component reports its own status into a shared [`HealthRegistry`] (push, not poll), so
//! `/health` answers from memory and never waits on a slow dependency. The database is the
//! exception: `/health` pings it live, because readiness depends on it.
//!
//! Until a component has a client of its own that reports richer states, [`reachability_loop`]
//! checks that its TCP endpoint accepts connections.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::store::now_ms;
use crate::telemetry::names;

/// Whether a component works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentStatus {
    /// It answers.
    Up,
    /// It does not answer; see the detail.
    Down,
    /// Not checked yet.
    Unknown,
}

/// One component's last known state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentHealth {
    /// Status.
    pub status: ComponentStatus,
    /// What was checked or what failed (no secrets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When it was last checked (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<i64>,
}

/// Shared, cheap-to-clone map from component name to its last reported health.
#[derive(Debug, Clone, Default)]
pub struct HealthRegistry {
    inner: Arc<RwLock<BTreeMap<String, ComponentHealth>>>,
}

impl HealthRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lists a component as [`ComponentStatus::Unknown`] until it reports.
    pub fn register(&self, name: &str) {
        if let Ok(mut map) = self.inner.write() {
            map.entry(name.to_owned()).or_insert(ComponentHealth {
                status: ComponentStatus::Unknown,
                detail: None,
                checked_at: None,
            });
        }
    }

    /// Records a component's status and mirrors it in the `component_up` gauge.
    pub fn report(&self, name: &str, status: ComponentStatus, detail: Option<String>) {
        let up = if status == ComponentStatus::Up {
            1.0
        } else {
            0.0
        };
        metrics::gauge!(names::COMPONENT_UP, "component" => name.to_owned()).set(up);
        if let Ok(mut map) = self.inner.write() {
            map.insert(
                name.to_owned(),
                ComponentHealth {
                    status,
                    detail,
                    checked_at: Some(now_ms()),
                },
            );
        }
    }

    /// A copy of every component's state.
    pub fn snapshot(&self) -> BTreeMap<String, ComponentHealth> {
        self.inner.read().map(|m| m.clone()).unwrap_or_default()
    }
}

/// A TCP endpoint to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Component name in `/health`, e.g. `mattermost`.
    pub component: &'static str,
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// Checks every endpoint now and then every `interval`, until `cancel` fires. Each check is
/// bounded by `timeout`.
pub async fn reachability_loop(
    registry: HealthRegistry,
    endpoints: Vec<Endpoint>,
    interval: Duration,
    timeout: Duration,
    cancel: CancellationToken,
) {
    for e in &endpoints {
        registry.register(e.component);
    }
    loop {
        for e in &endpoints {
            let target = format!("{}:{}", e.host, e.port);
            let result =
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&target)).await;
            let (status, detail) = match result {
                Ok(Ok(_)) => (ComponentStatus::Up, format!("{target} accepts connections")),
                Ok(Err(err)) => (ComponentStatus::Down, format!("{target}: {err}")),
                Err(_) => (
                    ComponentStatus::Down,
                    format!("{target}: no answer within {timeout:?}"),
                ),
            };
            registry.report(e.component, status, Some(detail));
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
