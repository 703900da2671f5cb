//! Sessions: Claude Code in a devcontainer on the VM, one actor per session.
//!
//! [`SessionRuntime`] implements [`SessionControl`], the API the dispatcher and the
//! orchestrator use. Each session is an actor ([`actor`]) that owns its agent process
//! ([`agent`]); everyone else holds a [`SessionHandle`]. Markers the agent prints leave the
//! actor as [`MarkerEvent`]s on a channel ([`markers`]), so the runtime never calls the
//! approval flow or the orchestrator: they hold the runtime, not the other way round.
//!
//! Lifecycle: `starting` (clone, container, agent: [`prepare`]) → `idle`/`running` (turns) →
//! `stopping` (cleanup claimed) → `ended` with a reason. Cleanup is guarded by the atomic
//! [`Store::claim_stop`](crate::store::Store::claim_stop): whoever wins it (an explicit `stop`,
//! the agent's own exit, a failed start) cleans up, exactly once (`session/cleanup.rs`): stop the agent,
//! remove the container when no other session uses it, remove the worktree, release the clone
//! lock, end the row, tell the thread.
//!
//! Starting goes through one function, [`launch()`], for people and orchestrators alike.
//!
//! Tasks: every actor, and every cleanup started by a `stop`, runs on the runtime's
//! [`TaskTracker`]; [`SessionRuntime::detach_all`] ends the actors and waits for all of them,
//! bounded by a grace period.
//!
//! A bot restart loses nothing: [`SessionRuntime::recover`] finds the sessions that were not
//! ended, checks their containers (starting a stopped one, ending the session when it is gone)
//! and restarts each agent with `--resume` of its stored conversation id. A hibernating session
//! (no message for `SM_SESSION_IDLE_SECS`: agent closed, container stopped) gets its actor
//! back still hibernating, container stopped, until its next message wakes it.

pub mod actor;
pub mod agent;
mod cleanup;
mod control;
pub mod launch;
pub mod markers;
pub mod prepare;
pub mod reconcile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use actor::SessionHandle;
pub use agent::AgentError;
pub use control::{
    auto_worktree_name, short_id, Delivery, SessionControl, SessionError, MAX_QUEUED,
};
pub use launch::{launch, Launch, LaunchError, Launched, SessionLimits};
pub use markers::{MarkerEvent, MarkerHandler, MarkerHandlers};
pub use prepare::StartError;

use crate::chat::{ChatOutbound, InboundMessage, PostRef};
use crate::config::EnvEntry;
use crate::leader::Gate;
use crate::runtime::devcontainer::ContainerLayout;
use crate::runtime::git::{self, GitError, GitLayout};
use crate::runtime::ssh::SshPool;
use crate::store::{EndReason, Session, SessionState, Store};
use crate::telemetry::names;

/// The system prompt appended for every agent: the marker protocol.
pub const NETWORK_PROMPT: &str = "You run in a sandboxed container. Outbound network access is blocked by a firewall, except for domains a person has approved.
When you need a domain that is blocked (for example pypi.org for pip install), print a line that starts with exactly
[NETWORK_REQUEST: the.domain]
at the start of a line and outside any code block, then stop and wait. Ask only for host names: no URLs, IP addresses, ports or wildcards, one domain per line.
You will receive [NETWORK_APPROVED: the.domain] (then retry) or [NETWORK_DENIED: the.domain] with a reason (then do without it).";

/// What the runtime needs to know.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Repositories on the VM.
    pub git: GitLayout,
    /// Containers on the VM.
    pub containers: ContainerLayout,
    /// `SM_CLAUDE_COMMAND`, split, without the old skip-permissions flag.
    pub claude_command: Vec<String>,
    /// The permission mode of new agents (`SM_PERMISSION_MODE`, or bypassPermissions for an
    /// old `SM_CLAUDE_COMMAND`); `!mode` overrides it per session.
    pub permission_mode: crate::permission::PermissionMode,
    /// `SM_SESSION_BUDGET_USD`, `SM_ORCHESTRATOR_BUDGET_USD`.
    pub budgets: crate::budget::BudgetLimits,
    /// `SM_CONTAINER_ENV`.
    pub container_env: Vec<EnvEntry>,
    /// VM host, recorded with containers.
    pub vm_host: String,
    /// Bound for git steps.
    pub git_timeout: Duration,
    /// `SM_ORCHESTRATOR_COMPACT_THRESHOLD`: compact an orchestrator every N of its messages
    /// (0 = never).
    pub orchestrator_compact_threshold: u32,
    /// `SM_MAX_AGENT_LINE_BYTES`: the longest agent output line read.
    pub max_agent_line_bytes: usize,
    /// `SM_TURN_TIMEOUT_SECS`: a turn running longer is interrupted.
    pub turn_timeout: Duration,
    /// `SM_SESSION_IDLE_SECS`: a session without a message this long hibernates
    /// ([`Duration::ZERO`] = never).
    pub session_idle: Duration,
    /// `SM_SESSION_MAX_AGE_SECS`: a session older than this is ended ([`Duration::ZERO`] =
    /// no limit).
    pub session_max_age: Duration,
}

impl RuntimeConfig {
    /// `session`'s hibernation idle time: its profile's, else `SM_SESSION_IDLE_SECS`.
    pub fn idle_of(&self, session: &Session) -> Duration {
        match &session.profile {
            Some(profile) => profile.idle(self.session_idle),
            None => self.session_idle,
        }
    }

    /// The environment of `session`'s agent: `SM_CONTAINER_ENV`, then its profile's names
    /// (passed from the VM's environment) that the setting does not already name.
    pub fn env_of(&self, session: &Session) -> Vec<EnvEntry> {
        let mut env = self.container_env.clone();
        for name in session.profile.iter().flat_map(|p| &p.container_env) {
            let known = env.iter().any(|e| match e {
                EnvEntry::FromVm(n) | EnvEntry::Set(n, _) => n == name,
            });
            if !known {
                env.push(EnvEntry::FromVm(name.clone()));
            }
        }
        env
    }

    /// The containers of `session`: its profile's image for the generated devcontainer,
    /// else `SM_CONTAINER_IMAGE`.
    pub fn containers_of(&self, session: &Session) -> ContainerLayout {
        let mut layout = self.containers.clone();
        if let Some(image) = session
            .profile
            .as_ref()
            .and_then(|p| p.container_image.as_ref())
        {
            layout.image = image.clone();
        }
        layout
    }
}

/// The least time between two automatic compactions of an orchestrator.
pub const AUTO_COMPACT_COOLDOWN: Duration = Duration::from_secs(60);

/// When an orchestrator compacts itself (`SM_ORCHESTRATOR_COMPACT_THRESHOLD`): after every
/// `threshold` user messages (a `/compact` is not one), checked only between turns, and never
/// again within `cooldown` of the last one, so a compaction cannot trigger another.
#[derive(Debug, Clone)]
pub struct AutoCompact {
    threshold: u32,
    cooldown: Duration,
    since: u32,
    last: Option<tokio::time::Instant>,
}

impl AutoCompact {
    /// `threshold` 0 never compacts.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            since: 0,
            last: None,
        }
    }

    /// A user message was delivered.
    pub fn on_message(&mut self) {
        self.since = self.since.saturating_add(1);
    }

    /// Between turns: whether to compact now (and if so, the count starts over).
    pub fn due(&mut self, now: tokio::time::Instant) -> bool {
        if self.threshold == 0 || self.since < self.threshold {
            return false;
        }
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.cooldown)
        {
            return false;
        }
        self.since = 0;
        self.last = Some(now);
        true
    }
}

/// The container an agent runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentContainer {
    id: String,
    user: String,
    folder: String,
    /// Whether the session's private state directory is mounted (sessions of older versions
    /// kept Claude Code's state in the container's home).
    private_state: bool,
}

/// A session and where it runs.
#[derive(Debug, Clone)]
pub(crate) struct SessionPlan {
    session: Session,
    container: Option<AgentContainer>,
    /// Whether this is a resume after a bot restart.
    resume: bool,
}

/// What the actors share: the VM, storage, chat, settings, the marker channel, the registry of
/// running actors and the tracker their tasks run on.
pub(crate) struct Manager {
    ssh: Arc<SshPool>,
    store: Store,
    chat: Arc<dyn ChatOutbound>,
    config: RuntimeConfig,
    markers: mpsc::Sender<MarkerEvent>,
    /// Where agents' permission questions go (see [`crate::permission`]).
    permissions: mpsc::Sender<crate::permission::PermissionEvent>,
    /// Where sessions held by a budget are announced (see [`crate::budget`]).
    budgets: mpsc::Sender<crate::budget::BudgetEvent>,
    actors: Mutex<HashMap<String, SessionHandle>>,
    tasks: TaskTracker,
    /// Actors act (write to their agent, read its output) only while it is open.
    gate: Gate,
}

impl Manager {
    /// The handle of a running actor.
    fn handle(&self, session_id: &str) -> Option<SessionHandle> {
        self.actors.lock().ok()?.get(session_id).cloned()
    }

    /// Drops a session's handle (its actor ends once no handle is left).
    fn forget(&self, session_id: &str) {
        if let Ok(mut actors) = self.actors.lock() {
            actors.remove(session_id);
        }
    }
}

/// The session runtime. Cheap to clone.
#[derive(Clone)]
pub struct SessionRuntime {
    manager: Arc<Manager>,
}

impl std::fmt::Debug for SessionRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRuntime").finish_non_exhaustive()
    }
}

/// Where sessions' actors send what they find, to the parts that act on it (the ownership
/// stays a tree: those parts hold the runtime, the runtime holds only these senders).
#[derive(Debug, Clone)]
pub struct Outlets {
    /// Markers found in agents' output (see [`markers::route`]).
    pub markers: mpsc::Sender<MarkerEvent>,
    /// Agents' permission questions (see [`crate::permission`]).
    pub permissions: mpsc::Sender<crate::permission::PermissionEvent>,
    /// Sessions held by a spent budget (see [`crate::budget`]).
    pub budgets: mpsc::Sender<crate::budget::BudgetEvent>,
}

impl SessionRuntime {
    /// A runtime over an SSH pool, storage and a chat platform, sending what its actors find
    /// to `outlets`. Actors act only while `gate` is open: while this instance is suspended
    /// they hold their agents as they are, and once it is a standby they let their sessions
    /// go (see [`crate::leader`]).
    pub fn new(
        ssh: Arc<SshPool>,
        store: Store,
        chat: Arc<dyn ChatOutbound>,
        config: RuntimeConfig,
        outlets: Outlets,
        gate: Gate,
    ) -> Self {
        let Outlets {
            markers,
            permissions,
            budgets,
        } = outlets;
        Self {
            manager: Arc::new(Manager {
                ssh,
                store,
                chat,
                config,
                markers,
                permissions,
                budgets,
                actors: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                gate,
            }),
        }
    }

    /// The handle of a running session.
    pub fn handle(&self, session_id: &str) -> Option<SessionHandle> {
        self.manager.handle(session_id)
    }

    /// Delivers a message from the bot itself (e.g. `[NETWORK_APPROVED: …]`) to a session's
    /// agent, queued if a turn runs.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`] when the session has no running actor.
    pub async fn inject(&self, session_id: &str, text: String) -> Result<Delivery, SessionError> {
        self.running(session_id)?
            .message(actor::Turn::injected(text))
            .await
    }

    /// Whether `org/repo` exists at `SM_GIT_BASE_URL` and the VM can read it.
    ///
    /// # Errors
    /// [`GitError`] when the check cannot run (SSH down, for example).
    pub async fn repo_exists(&self, org: &str, repo: &str) -> Result<bool, GitError> {
        git::repo_exists(
            &self.manager.ssh,
            &self.manager.config.git,
            org,
            repo,
            self.manager.config.git_timeout,
        )
        .await
    }

    /// Brings back every session that was not ended when the bot stopped.
    pub async fn recover(&self) {
        let sessions = match self.manager.store.unended_sessions().await {
            Ok(sessions) => sessions,
            Err(e) => {
                error!(error = %e, "cannot list sessions to recover");
                return;
            }
        };
        for session in sessions {
            let id = session.id.clone();
            match session.state() {
                SessionState::Stopping => {
                    self.manager
                        .cleanup(
                            session,
                            EndReason::Error,
                            Some("the bot restarted while this session was stopping".into()),
                        )
                        .await;
                }
                _ if session.container_id.is_none() => {
                    if let Ok(Some(claimed)) = self.manager.store.claim_stop(&id).await {
                        self.manager
                            .cleanup(claimed, EndReason::StartFailed, Some("the bot restarted while this session was starting; please start it again".into()))
                            .await;
                    }
                }
                _ => {
                    if session.is_hibernating() {
                        info!(session = %id, "a hibernating session stays hibernating after restart");
                    } else {
                        info!(session = %id, "resuming a session after restart");
                    }
                    self.spawn_actor(
                        SessionPlan {
                            session,
                            container: None,
                            resume: true,
                        },
                        None,
                    );
                }
            }
        }
    }

    /// Stops every actor (for a bot shutdown) without ending the sessions, so they resume at
    /// the next start, and waits up to `grace` for them and for cleanups under way.
    pub async fn detach_all(&self, grace: Duration) {
        let handles: Vec<SessionHandle> = self
            .manager
            .actors
            .lock()
            .map(|mut a| a.drain().map(|(_, h)| h).collect())
            .unwrap_or_default();
        drop(handles); // dropping the senders ends each actor's loop
        let tasks = &self.manager.tasks;
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            warn!(
                left = tasks.len(),
                "session tasks did not finish within the shutdown grace period"
            );
        }
    }

    fn spawn_actor(&self, plan: SessionPlan, progress: Option<PostRef>) -> SessionHandle {
        let kind: &'static str = plan.session.kind.into();
        if !plan.resume {
            metrics::counter!(names::SESSIONS_STARTED_TOTAL, "kind" => kind).increment(1);
        }
        metrics::gauge!(names::SESSIONS_ACTIVE, "kind" => kind).increment(1.0);
        let (tx, rx) = mpsc::channel(256);
        let handle = SessionHandle { tx };
        if let Ok(mut actors) = self.manager.actors.lock() {
            actors.insert(plan.session.id.clone(), handle.clone());
        }
        let actor = actor::Actor::new(Arc::clone(&self.manager), plan, progress);
        self.manager.tasks.spawn(actor.run(rx));
        handle
    }

    fn running(&self, session_id: &str) -> Result<SessionHandle, SessionError> {
        self.handle(session_id)
            .ok_or_else(|| SessionError::NotRunning(short_id(session_id).to_owned()))
    }
}

#[async_trait]
impl crate::budget::BudgetRelease for SessionRuntime {
    async fn release(&self, session_id: &str) {
        if let Some(handle) = self.handle(session_id) {
            if let Err(e) = handle.release().await {
                info!(session = session_id, error = %e, "cannot release a held session");
            }
        }
    }

    async fn end(&self, owner: &Session, by: &str) -> Result<(), String> {
        SessionControl::stop(self, owner, by)
            .await
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl crate::permission::PermissionSink for SessionRuntime {
    async fn answer(
        &self,
        session_id: &str,
        request_id: &str,
        answer: crate::permission::PermissionAnswer,
    ) {
        let handle = match self.running(session_id) {
            Ok(handle) => handle,
            Err(e) => {
                info!(session = session_id, error = %e, "cannot hand a permission answer over (the session is not running)");
                return;
            }
        };
        if let Err(e) = handle.permission(request_id.to_owned(), answer).await {
            info!(session = session_id, error = %e, "cannot hand a permission answer over");
        }
    }
}

#[async_trait]
impl SessionControl for SessionRuntime {
    async fn repo_exists(&self, org: &str, repo: &str) -> Result<bool, SessionError> {
        SessionRuntime::repo_exists(self, org, repo)
            .await
            .map_err(|e| SessionError::VmUnavailable(e.to_string()))
    }

    async fn start(&self, session: Session, progress: PostRef) -> Result<(), SessionError> {
        self.spawn_actor(
            SessionPlan {
                session,
                container: None,
                resume: false,
            },
            Some(progress),
        );
        Ok(())
    }

    async fn send(
        &self,
        session: &Session,
        message: &InboundMessage,
    ) -> Result<Delivery, SessionError> {
        self.running(&session.id)?
            .message(actor::Turn {
                text: message.text.clone(),
                inbound: Some((message.platform, message.post_id.clone())),
            })
            .await
    }

    async fn stop(&self, session: &Session, requested_by: &str) -> Result<(), SessionError> {
        let claimed = match self.manager.store.claim_stop(&session.id).await {
            Ok(Some(claimed)) => claimed,
            Ok(None) => return Err(SessionError::NotRunning(short_id(&session.id).to_owned())),
            Err(e) => {
                error!(error = %e, session = %session.id, "cannot claim a session's stop");
                return Err(SessionError::StorageUnavailable);
            }
        };
        if let Some(handle) = self.handle(&session.id) {
            let _ = handle.shutdown().await;
        }
        let manager = Arc::clone(&self.manager);
        let detail = format!("stopped by user {requested_by}");
        self.manager.tasks.spawn(async move {
            manager
                .cleanup(claimed, EndReason::UserRequested, Some(detail))
                .await;
        });
        Ok(())
    }

    async fn compact(&self, session: &Session) -> Result<(), SessionError> {
        self.running(&session.id)?.compact().await
    }

    async fn clear(&self, session: &Session) -> Result<(), SessionError> {
        self.running(&session.id)?.clear().await
    }

    async fn restart(&self, session: &Session) -> Result<(), SessionError> {
        self.running(&session.id)?.restart().await
    }

    async fn interrupt(&self, session: &Session) -> Result<bool, SessionError> {
        self.running(&session.id)?.interrupt().await
    }

    async fn set_permission_mode(
        &self,
        session: &Session,
        mode: crate::permission::PermissionMode,
    ) -> Result<(), SessionError> {
        self.running(&session.id)?
            .set_mode(mode)
            .await?
            .map_err(|why| SessionError::Refused(format!("Claude could not switch: {why}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_compaction_fires_at_the_threshold_and_not_again_during_the_cooldown() {
        let start = tokio::time::Instant::now();
        let mut policy = AutoCompact::new(3, Duration::from_secs(60));
        for _ in 0..2 {
            policy.on_message();
        }
        assert!(!policy.due(start), "below the threshold");
        policy.on_message();
        assert!(policy.due(start), "at the threshold");
        assert!(!policy.due(start), "the count starts over");
        for _ in 0..5 {
            policy.on_message();
        }
        assert!(
            !policy.due(start + Duration::from_secs(30)),
            "within the cooldown"
        );
        assert!(
            policy.due(start + Duration::from_secs(61)),
            "after the cooldown"
        );
        let mut never = AutoCompact::new(0, Duration::ZERO);
        for _ in 0..100 {
            never.on_message();
        }
        assert!(!never.due(start), "0 = never");
    }
}
