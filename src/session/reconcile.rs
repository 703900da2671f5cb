//! The reconciler: nothing runs on the VM that no session owns, and no live session is left
//! with a stopped container.
//!
//! Every `SM_RECONCILE_INTERVAL_SECS` it lists the containers carrying the bot's label and
//! compares them with the sessions in storage:
//! - a container of a live session (starting, running, idle) that is stopped is started again
//!   (`action="started"`), unless the session hibernates (its container is stopped on
//!   purpose until its next message);
//! - a container of an ended or unknown session, or one its live session does not use, is
//!   removed once it has been seen so for `SM_RECONCILE_GRACE_SECS` (`action="removed"`), with
//!   the session's directory when the session is ended or unknown.
//!
//! A session that is stopping is left to its cleanup. Each action is logged and counted in
//! `session_manager_reconciler_actions_total{action}`. Only the active instance reconciles.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::runtime::devcontainer::{self, ContainerLayout, ManagedContainer};
use crate::runtime::ssh::SshPool;
use crate::store::{SessionState, Store};
use crate::telemetry::names;

/// Settings of the reconciler.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// How containers are made (runtime, state directory).
    pub containers: ContainerLayout,
    /// `SM_RECONCILE_INTERVAL_SECS`.
    pub interval: Duration,
    /// `SM_RECONCILE_GRACE_SECS`.
    pub grace: Duration,
    /// Passes run only while this instance is active (see [`crate::leader`]).
    pub gate: crate::leader::Gate,
}

/// What the reconciler decided for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// It belongs to a live session and runs.
    Fine,
    /// It belongs to a live session and is stopped: start it.
    Start,
    /// Its session is stopping (its cleanup takes care of it), or hibernates (stopped on
    /// purpose).
    Leave,
    /// Nobody owns it; `session` names the ended or unknown session it was made for.
    Orphan { session: Option<String> },
}

/// Runs until `cancel` fires.
pub async fn run(
    ssh: Arc<SshPool>,
    store: Store,
    config: ReconcileConfig,
    cancel: CancellationToken,
) {
    let mut first_orphaned: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(config.interval) => {}
        }
        if !config.gate.is_open() {
            continue;
        }
        if let Err(e) = pass(&ssh, &store, &config, &mut first_orphaned).await {
            warn!(error = %e, "the reconciler could not look at the VM's containers");
        }
    }
}

/// One pass over the VM's containers.
async fn pass(
    ssh: &SshPool,
    store: &Store,
    config: &ReconcileConfig,
    first_orphaned: &mut HashMap<String, Instant>,
) -> anyhow::Result<()> {
    let runtime = &config.containers.runtime;
    let containers = devcontainer::managed_containers(ssh, runtime).await?;
    let mut seen = Vec::with_capacity(containers.len());
    let ours = config.containers.deployment.as_deref();
    for container in containers {
        // Another deployment's (another bot on the same VM user): never ours to judge.
        if container.deployment.is_some() && container.deployment.as_deref() != ours {
            continue;
        }
        seen.push(container.id.clone());
        match verdict(store, &container).await? {
            Verdict::Fine | Verdict::Leave => {
                first_orphaned.remove(&container.id);
            }
            Verdict::Start => {
                first_orphaned.remove(&container.id);
                match devcontainer::start(ssh, runtime, &container.id).await {
                    Ok(()) => {
                        info!(container = %container.id, session = ?container.session, "started a live session's stopped container");
                        metrics::counter!(names::RECONCILER_ACTIONS_TOTAL, "action" => "started")
                            .increment(1);
                    }
                    Err(e) => {
                        warn!(container = %container.id, error = %e, "cannot start a live session's container")
                    }
                }
            }
            Verdict::Orphan { session } => {
                let since = *first_orphaned
                    .entry(container.id.clone())
                    .or_insert_with(Instant::now);
                if since.elapsed() < config.grace {
                    continue;
                }
                let removed = match &session {
                    Some(id) => devcontainer::remove_session(ssh, &config.containers, id).await,
                    None => Ok(()),
                };
                let removed = match removed {
                    Ok(()) => devcontainer::remove(ssh, runtime, &container.id).await,
                    Err(e) => Err(e),
                };
                match removed {
                    Ok(()) => {
                        first_orphaned.remove(&container.id);
                        let _ = store.mark_container_removed(&container.id).await;
                        info!(container = %container.id, session = ?session, "removed a container no session owns");
                        metrics::counter!(names::RECONCILER_ACTIONS_TOTAL, "action" => "removed")
                            .increment(1);
                    }
                    Err(e) => {
                        warn!(container = %container.id, error = %e, "cannot remove a container no session owns")
                    }
                }
            }
        }
    }
    first_orphaned.retain(|id, _| seen.contains(id));
    Ok(())
}

/// Who owns a container, from its labels and storage.
async fn verdict(store: &Store, container: &ManagedContainer) -> anyhow::Result<Verdict> {
    let Some(session_id) = &container.session else {
        // Containers of older versions carry no session label: find the session using it.
        let users = store.container_users(&container.id, None).await?;
        return Ok(match (users, container.running) {
            (0, _) => Verdict::Orphan { session: None },
            (_, true) => Verdict::Fine,
            (_, false) => Verdict::Start,
        });
    };
    let Some(session) = store.session(session_id).await? else {
        return Ok(Verdict::Orphan {
            session: Some(session_id.clone()),
        });
    };
    let state = session.state();
    Ok(match state {
        SessionState::Stopping => Verdict::Leave,
        SessionState::Ended => Verdict::Orphan {
            session: Some(session.id),
        },
        // Still being made: its container id is not recorded yet.
        SessionState::Starting if session.container_id.is_none() => Verdict::Leave,
        _ if session.container_id.as_deref() != Some(container.id.as_str()) => {
            // A container of a live session that the session does not use (a leftover).
            Verdict::Orphan { session: None }
        }
        _ if container.running => Verdict::Fine,
        // Hibernating: stopped on purpose until its next message.
        _ if session.is_hibernating() => Verdict::Leave,
        _ => Verdict::Start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DatabaseSettings, DatabaseUrl};
    use crate::store::{new_session_id, NewSession, Platform, SessionKind};

    /// A live session's stopped container is started again, unless the session hibernates.
    #[tokio::test]
    async fn a_hibernating_sessions_stopped_container_is_left_stopped() {
        let store = Store::connect(&DatabaseSettings {
            url: DatabaseUrl::parse("sqlite::memory:").expect("url"),
            is_default: false,
            pool_size: 1,
        })
        .await
        .expect("connect");
        store.migrate().await.expect("migrate");
        let session = store
            .create_session(&NewSession {
                id: new_session_id(),
                platform: Platform::Mattermost,
                channel_id: "c".into(),
                thread_id: "t".into(),
                kind: SessionKind::Standard,
                parent_id: None,
                started_by: "u".into(),
                repo_host: "github.com".into(),
                repo_org: "acme".into(),
                repo_name: "widgets".into(),
                branch: None,
                worktree: None,
                profile: None,
            })
            .await
            .expect("session");
        store
            .set_session_container(&session.id, Some("c1"), Some("/w"), None)
            .await
            .expect("container");
        store
            .set_session_state(&session.id, SessionState::Idle)
            .await
            .expect("idle");
        let container = |running| ManagedContainer {
            id: "c1".into(),
            session: Some(session.id.clone()),
            workspace: Some("/w".into()),
            deployment: None,
            running,
        };
        let verdict_of = |running| {
            let (store, container) = (&store, container(running));
            async move { verdict(store, &container).await.expect("verdict") }
        };
        assert_eq!(verdict_of(false).await, Verdict::Start, "awake and stopped");
        store.set_hibernating(&session.id, 1).await.expect("sleep");
        assert_eq!(verdict_of(false).await, Verdict::Leave, "hibernating");
        assert_eq!(
            verdict_of(true).await,
            Verdict::Fine,
            "hibernating, running"
        );
        store
            .set_session_state(&session.id, SessionState::Running)
            .await
            .expect("wake");
        assert_eq!(verdict_of(false).await, Verdict::Start, "woken");
    }
}
