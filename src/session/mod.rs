//! Sessions: Claude Code in a devcontainer on the VM, one actor per session.
//!
//! [`SessionRuntime`] implements [`SessionControl`] for the dispatcher. Each session is an
//! actor ([`actor`]) that owns its agent process; everyone else holds a [`SessionHandle`].
//!
//! Lifecycle: `starting` (clone, container, agent) → `idle`/`running` (turns) → `stopping`
//! (cleanup claimed) → `ended` with a reason. Cleanup is guarded by the atomic
//! [`Store::claim_stop`](crate::store::Store::claim_stop): whoever wins it (an explicit `stop`,
//! the agent's own exit, a failed start) cleans up, exactly once: stop the agent, remove the
//! container when no other session uses it, remove the worktree, release the clone lock, end
//! the row, tell the thread.
//!
//! A bot restart loses nothing: [`SessionRuntime::recover`] finds the sessions that were not
//! ended, checks their containers (starting a stopped one, ending the session when it is gone)
//! and restarts each agent with `--resume` of its stored conversation id.

pub mod actor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

pub use actor::SessionHandle;

use crate::agent::markers::Marker;
use crate::chat::progress::Progress;
use crate::chat::render::CoalesceConfig;
use crate::chat::{ChatOutbound, InboundMessage, PostRef};
use crate::config::EnvEntry;
use crate::dispatch::{short_id, Delivery, SessionControl, SessionError};
use crate::runtime::devcontainer::{self, ContainerLayout, ContainerState};
use crate::runtime::git::{self, GitLayout};
use crate::runtime::shell::Script;
use crate::runtime::ssh::SshPool;
use crate::store::{EndReason, Session, SessionKind, SessionState, Store};
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
    /// `SM_CLAUDE_COMMAND`, split.
    pub claude_command: Vec<String>,
    /// `SM_CONTAINER_ENV`.
    pub container_env: Vec<EnvEntry>,
    /// VM host, recorded with containers.
    pub vm_host: String,
    /// Bound for git steps.
    pub git_timeout: Duration,
    /// Output coalescing.
    pub coalesce: CoalesceConfig,
    /// `SM_ORCHESTRATOR_COMPACT_THRESHOLD`: compact an orchestrator every N of its messages
    /// (0 = never).
    pub orchestrator_compact_threshold: u32,
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

/// What the agent's markers lead to. Approvals and orchestration implement it; a reply is a
/// message delivered to the agent (queued like a user's).
#[async_trait]
pub trait MarkerHandler: Send + Sync + 'static {
    /// Handles one marker from `session`'s agent; returns messages to deliver to it.
    async fn on_marker(&self, session: &Session, marker: Marker) -> Vec<String>;
}

/// The container an agent runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentContainer {
    id: String,
    user: String,
    folder: String,
}

/// A session and where it runs.
#[derive(Debug, Clone)]
pub(crate) struct SessionPlan {
    session: Session,
    container: Option<AgentContainer>,
    /// Whether this is a resume after a bot restart.
    resume: bool,
}

/// Shared state of the runtime.
pub(crate) struct Manager {
    ssh: Arc<SshPool>,
    store: Store,
    chat: Arc<dyn ChatOutbound>,
    config: RuntimeConfig,
    markers: Arc<dyn MarkerHandler>,
    actors: Mutex<HashMap<String, SessionHandle>>,
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

impl SessionRuntime {
    /// A runtime over an SSH pool, storage and a chat platform.
    pub fn new(
        ssh: Arc<SshPool>,
        store: Store,
        chat: Arc<dyn ChatOutbound>,
        config: RuntimeConfig,
        markers: Arc<dyn MarkerHandler>,
    ) -> Self {
        Self {
            manager: Arc::new(Manager {
                ssh,
                store,
                chat,
                config,
                markers,
                actors: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The handle of a running session.
    pub fn handle(&self, session_id: &str) -> Option<SessionHandle> {
        self.manager.actors.lock().ok()?.get(session_id).cloned()
    }

    /// Delivers a message from the bot itself (e.g. `[NETWORK_APPROVED: …]`) to a session's
    /// agent, queued if a turn runs.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`] when the session has no running actor.
    pub async fn inject(&self, session_id: &str, text: String) -> Result<Delivery, SessionError> {
        let handle = self
            .handle(session_id)
            .ok_or_else(|| SessionError::NotRunning(short_id(session_id).to_owned()))?;
        handle.message(text).await
    }

    /// Whether `org/repo` exists at `SM_GIT_BASE_URL` and the VM can read it.
    ///
    /// # Errors
    /// A message when the check cannot run (SSH down, for example).
    pub async fn repo_exists(&self, org: &str, repo: &str) -> Result<bool, String> {
        git::repo_exists(
            &self.manager.ssh,
            &self.manager.config.git,
            org,
            repo,
            self.manager.config.git_timeout,
        )
        .await
        .map_err(|e| e.to_string())
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
            match session.state {
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
                    info!(session = %id, "resuming a session after restart");
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
    /// the next start.
    pub async fn detach_all(&self) {
        let handles: Vec<SessionHandle> = self
            .manager
            .actors
            .lock()
            .map(|mut a| a.drain().map(|(_, h)| h).collect())
            .unwrap_or_default();
        drop(handles); // dropping the senders ends each actor's loop
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
        let actor = actor::Actor {
            manager: Arc::clone(&self.manager),
            plan,
            progress,
            injected: std::sync::Mutex::new(Vec::new()),
            last_total_cost: std::sync::Mutex::new(0.0),
            auto_compact: std::sync::Mutex::new(AutoCompact::new(
                self.manager.config.orchestrator_compact_threshold,
                AUTO_COMPACT_COOLDOWN,
            )),
        };
        tokio::spawn(actor.run(rx));
        handle
    }
}

#[async_trait]
impl SessionControl for SessionRuntime {
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
        let handle = self
            .handle(&session.id)
            .ok_or_else(|| SessionError::NotRunning(short_id(&session.id).to_owned()))?;
        handle.message(message.text.clone()).await
    }

    async fn stop(&self, session: &Session, requested_by: &str) -> Result<(), SessionError> {
        let claimed = self
            .manager
            .store
            .claim_stop(&session.id)
            .await
            .map_err(|e| SessionError::Failed(e.to_string()))?
            .ok_or_else(|| SessionError::NotRunning(short_id(&session.id).to_owned()))?;
        if let Some(handle) = self.handle(&session.id) {
            let _ = handle.shutdown().await;
        }
        let manager = Arc::clone(&self.manager);
        let by = requested_by.to_owned();
        tokio::spawn(async move {
            manager
                .cleanup(
                    claimed,
                    EndReason::UserRequested,
                    Some(format!("stopped by user {by}")),
                )
                .await;
        });
        Ok(())
    }

    async fn compact(&self, session: &Session) -> Result<(), SessionError> {
        self.running(session)?.compact().await
    }

    async fn clear(&self, session: &Session) -> Result<(), SessionError> {
        self.running(session)?.clear().await
    }

    async fn restart(&self, session: &Session) -> Result<(), SessionError> {
        self.running(session)?.restart().await
    }
}

impl SessionRuntime {
    fn running(&self, session: &Session) -> Result<SessionHandle, SessionError> {
        self.handle(&session.id)
            .ok_or_else(|| SessionError::NotRunning(short_id(&session.id).to_owned()))
    }
}

impl Manager {
    /// Posts a line in the session's thread.
    async fn say(&self, session: &Session, text: &str) {
        if let Err(e) = self
            .chat
            .post(&session.channel_id, Some(&session.thread_id), text)
            .await
        {
            warn!(error = %e, "cannot post in the session thread");
        }
    }

    /// Ends a session from inside its actor: cleans up if nobody else has claimed it.
    async fn finish(&self, session_id: &str, reason: EndReason, detail: Option<String>) {
        match self.store.claim_stop(session_id).await {
            Ok(Some(session)) => self.cleanup(session, reason, detail).await,
            Ok(None) => {} // someone else (an explicit stop) cleans up
            Err(e) => {
                error!(error = %e, session = session_id, "cannot claim the session for cleanup")
            }
        }
    }

    /// Cleanup of a session whose stop was claimed (state `stopping`). Each step is tried even
    /// when an earlier one failed; failures are logged and told in the thread.
    async fn cleanup(&self, session: Session, reason: EndReason, detail: Option<String>) {
        if let Ok(mut actors) = self.actors.lock() {
            actors.remove(&session.id);
        }
        if session.kind == SessionKind::Orchestrator {
            self.stop_children(&session).await;
        }
        let mut problems = Vec::new();
        let runtime = &self.config.containers.runtime;
        if let Some(container) = &session.container_id {
            match self
                .store
                .container_users(container, Some(&session.id))
                .await
            {
                Ok(0) => match devcontainer::remove(&self.ssh, runtime, container).await {
                    Ok(()) => {
                        let _ = self.store.mark_container_removed(container).await;
                    }
                    Err(e) => problems.push(format!("removing the container: {e}")),
                },
                Ok(_) => {} // another session still uses it
                Err(e) => problems.push(format!("checking the container's users: {e}")),
            }
        }
        match &session.worktree {
            Some(name) => {
                if let Err(e) = git::remove_worktree(
                    &self.ssh,
                    &self.config.git,
                    &session.repo_org,
                    &session.repo_name,
                    name,
                    self.config.git_timeout,
                )
                .await
                {
                    problems.push(format!("removing the worktree: {e}"));
                }
            }
            None => {
                let lock = self
                    .config
                    .git
                    .clone_lock(&session.repo_org, &session.repo_name);
                if let Err(e) = self.store.unlock(&lock, &session.id).await {
                    problems.push(format!("releasing the clone: {e}"));
                }
            }
        }
        let detail_text = detail.clone().unwrap_or_default();
        // Counted before the row ends, so an ended row implies a counted end.
        let kind: &'static str = session.kind.into();
        let reason_label: &'static str = reason.into();
        metrics::counter!(names::SESSIONS_ENDED_TOTAL, "reason" => reason_label).increment(1);
        metrics::gauge!(names::SESSIONS_ACTIVE, "kind" => kind).decrement(1.0);
        if let Err(e) = self
            .store
            .end_session(&session.id, reason, detail.as_deref())
            .await
        {
            error!(error = %e, session = %session.id, "cannot record the end of a session");
        }
        let mut text = format!("⏹️ Session ended ({reason})");
        if !detail_text.is_empty() {
            text.push_str(&format!(": {detail_text}"));
        }
        if !problems.is_empty() {
            text.push_str(&format!(
                "\n⚠️ Cleanup was incomplete: {}",
                problems.join("; ")
            ));
            warn!(session = %session.id, ?problems, "cleanup incomplete");
        }
        self.say(&session, &text).await;
        info!(session = %session.id, %reason, "session ended");
        if let Some(parent_id) = &session.parent_id {
            self.tell_parent(parent_id, &session, reason, detail.as_deref())
                .await;
        }
    }

    /// Stops every running child of an orchestrator that is ending (each told in its thread).
    async fn stop_children(&self, parent: &Session) {
        let children = self.store.children(&parent.id).await.unwrap_or_default();
        for child in children.into_iter().filter(|c| c.state.is_active()) {
            if let Ok(Some(claimed)) = self.store.claim_stop(&child.id).await {
                let handle = self
                    .actors
                    .lock()
                    .ok()
                    .and_then(|a| a.get(&child.id).cloned());
                if let Some(handle) = handle {
                    let _ = handle.shutdown().await;
                }
                Box::pin(self.cleanup(
                    claimed,
                    EndReason::ParentEnded,
                    Some(format!(
                        "its orchestrator `{}` stopped",
                        short_id(&parent.id)
                    )),
                ))
                .await;
            }
        }
    }

    /// Tells an orchestrator that one of its children ended (once: only the cleanup that won
    /// the claim gets here).
    async fn tell_parent(
        &self,
        parent_id: &str,
        child: &Session,
        reason: EndReason,
        detail: Option<&str>,
    ) {
        let Ok(Some(parent)) = self.store.session(parent_id).await else {
            return;
        };
        if !parent.state.is_active() {
            return; // the parent is ending too
        }
        let kind: &'static str = child.kind.into();
        let why = detail.map_or_else(|| reason.to_string(), |d| format!("{reason}: {d}"));
        self.say(
            &parent,
            &format!("⏹️ {kind} `{}` ended ({why})", short_id(&child.id)),
        )
        .await;
        let handle = self
            .actors
            .lock()
            .ok()
            .and_then(|a| a.get(parent_id).cloned());
        if let Some(handle) = handle {
            let _ = handle
                .message(format!("[SESSION_ENDED: {}] {why}", child.id))
                .await;
        }
    }

    /// Clone (or worktree) and container, or, when resuming, the existing container. On
    /// failure: what failed, what to do, and why the session ends.
    async fn prepare(
        &self,
        plan: &mut SessionPlan,
        mut progress: Option<&mut Progress>,
    ) -> Result<(), (String, String, EndReason)> {
        let session = plan.session.clone();
        let slug = session.repo_slug();
        let runtime = &self.config.containers.runtime;
        if plan.resume {
            let Some(container) = session.container_id.as_deref() else {
                return Err((
                    "this session never got a container".into(),
                    "start a new session".into(),
                    EndReason::StartFailed,
                ));
            };
            match devcontainer::inspect(&self.ssh, runtime, container).await {
                Ok(ContainerState::Gone) => {
                    return Err((
                        "its container is gone (removed or lost with the VM)".into(),
                        format!("start a new session for `{slug}`"),
                        EndReason::ContainerGone,
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err((
                        format!("cannot check the container: {e}"),
                        "try `!restart` later".into(),
                        EndReason::Error,
                    ))
                }
            }
        } else if let Some(p) = progress.as_deref_mut() {
            p.step(&format!("Cloning `{slug}`")).await;
        }
        let workspace = match (&session.workspace_path, plan.resume) {
            (Some(path), true) => path.clone(),
            _ => self.prepare_workspace(&session).await?,
        };
        if let (false, Some(p)) = (plan.resume, progress) {
            p.step("Starting the container").await;
        }
        // `devcontainer up` reuses the labelled container (starting it if it was stopped).
        let up = devcontainer::up(&self.ssh, &self.config.containers, &workspace, &session.id)
            .await
            .map_err(|e| {
                (
                    e.to_string(),
                    "check the repository's devcontainer.json, or SM_CONTAINER_IMAGE and the container runtime on the VM".to_owned(),
                    EndReason::StartFailed,
                )
            })?;
        if let Err(e) = self
            .store
            .record_container(&up.container_id, &self.config.vm_host, &workspace)
            .await
        {
            warn!(error = %e, "cannot record the container");
        }
        self.store
            .set_session_container(&session.id, Some(&up.container_id), Some(&workspace))
            .await
            .map_err(|e| {
                (
                    format!("cannot record the container: {e}"),
                    "try again".into(),
                    EndReason::Error,
                )
            })?;
        plan.session.container_id = Some(up.container_id.clone());
        plan.session.workspace_path = Some(workspace);
        plan.container = Some(AgentContainer {
            id: up.container_id,
            user: up.remote_user,
            folder: up.remote_workspace_folder,
        });
        Ok(())
    }

    async fn prepare_workspace(
        &self,
        session: &Session,
    ) -> Result<String, (String, String, EndReason)> {
        let slug = session.repo_slug();
        if session.worktree.is_none() {
            let lock = self
                .config
                .git
                .clone_lock(&session.repo_org, &session.repo_name);
            match self.store.try_lock(&lock, &session.id).await {
                Ok(crate::store::LockOutcome::Acquired) => {}
                Ok(crate::store::LockOutcome::Held { holder }) => {
                    return Err((
                        format!("the main clone of `{slug}` is in use by session `{}`", short_id(&holder)),
                        format!("start with `--worktree` to work in a separate worktree, e.g. `start {slug} --worktree`"),
                        EndReason::StartFailed,
                    ));
                }
                Err(e) => {
                    return Err((
                        format!("cannot lock the clone: {e}"),
                        "try again".into(),
                        EndReason::Error,
                    ))
                }
            }
        }
        let clone = git::ensure_clone(
            &self.ssh,
            &self.config.git,
            &session.repo_org,
            &session.repo_name,
            if session.worktree.is_none() { session.branch.as_deref() } else { None },
            self.config.git_timeout,
        )
        .await
        .map_err(|e| {
            (
                e.to_string(),
                "check the repository and branch names, and that GH_TOKEN on the VM can read a private repository".to_owned(),
                EndReason::StartFailed,
            )
        })?;
        match &session.worktree {
            None => Ok(clone),
            Some(name) => git::ensure_worktree(
                &self.ssh,
                &self.config.git,
                &session.repo_org,
                &session.repo_name,
                session.branch.as_deref(),
                name,
                self.config.git_timeout,
            )
            .await
            .map_err(|e| {
                (
                    e.to_string(),
                    "check that the branch exists".to_owned(),
                    EndReason::StartFailed,
                )
            }),
        }
    }

    /// The remote script that runs the agent in the container.
    fn agent_script(
        &self,
        session: &Session,
        container: &Option<AgentContainer>,
        conversation: &str,
        resume: bool,
    ) -> Result<Script, String> {
        let container = container.as_ref().ok_or("the session has no container")?;
        let mut args: Vec<String> = vec![
            "exec".into(),
            "-i".into(),
            "-u".into(),
            container.user.clone(),
            "-w".into(),
            container.folder.clone(),
        ];
        for entry in &self.config.container_env {
            args.push("-e".into());
            args.push(entry.exec_arg());
        }
        args.push(container.id.clone());
        args.extend(self.config.claude_command.iter().cloned());
        args.extend(
            [
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        args.push(if resume { "--resume" } else { "--session-id" }.into());
        args.push(conversation.to_owned());
        args.push("--append-system-prompt".into());
        args.push(if session.kind == SessionKind::Orchestrator {
            format!(
                "{NETWORK_PROMPT}\n\n{}",
                crate::orchestrator::ORCHESTRATOR_PROMPT
            )
        } else {
            NETWORK_PROMPT.to_owned()
        });
        if session.kind == SessionKind::Reviewer {
            args.push("--permission-mode".into());
            args.push("plan".into());
        }
        // `set -- <runtime> <args>` puts every word, quoted, into "$@"; `exec` replaces the
        // shell so the agent's stdio is the channel's.
        let mut words = vec!["--".to_owned(), self.config.containers.runtime.clone()];
        words.extend(args);
        let mut script = Script::new();
        script
            .command("set", &words)
            .map_err(|e| e.to_string())?
            .raw("exec \"$@\"");
        Ok(script)
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
