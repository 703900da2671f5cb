//! Component health, as `/health` reports it.
//!
//! Each component reports its own status into a shared [`HealthRegistry`] (push, not poll), so
//! `/health` answers from memory and never waits on a slow dependency. The database is the
//! exception: `/health` pings it live, because readiness depends on it. The chat adapter, the
//! SSH pool and the firewall client each report their own component.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;

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
