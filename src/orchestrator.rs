//! The orchestrator: a session that spawns worker and reviewer sessions by printing markers.
//!
//! Markers (line-anchored, outside code fences, see [`crate::agent::markers`]) and replies
//! (delivered to the orchestrator as user turns, queued during a turn):
//!
//! | marker | effect | reply |
//! |---|---|---|
//! | `[CREATE_SESSION: org/repo@branch] task…` | a worker in its own worktree and thread, the task as its first message | `[SESSION_CREATED: <id> worker <path> <thread_id>]` |
//! | `[CREATE_REVIEWER: org/repo@branch] task…` | the same, as a reviewer in plan mode | `[SESSION_CREATED: <id> reviewer <path> <thread_id>]` |
//! | `[SESSION_STATUS]` | | `[SESSIONS: <json array of the children>]` |
//! | `[STOP_SESSION: <id prefix>]` | stops one of its own children | `[SESSION_ENDED: <id>] <reason>` when it has ended |
//!
//! A malformed marker, an unknown repository, a refused stop or the child limit
//! (`SM_MAX_CHILD_SESSIONS`) is answered `[SESSION_ERROR: <message>]`. A spawn is
//! de-duplicated in storage: the same orchestrator, kind, repository, branch and task within
//! [`SPAWN_WINDOW`] creates one child. A child's end is told to its parent exactly once (by the
//! cleanup that wins the claim); stopping the orchestrator stops its children.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tracing::{info, warn};

use crate::agent::markers::Marker;
use crate::chat::ChatOutbound;
use crate::command::{IdPrefix, RepoRef};
use crate::dispatch::{auto_worktree_name, short_id, SessionControl};
use crate::runtime::git::GitLayout;
use crate::session::{MarkerHandler, SessionRuntime};
use crate::store::{
    new_session_id, now_ms, NewSession, ProjectChannel, Session, SessionKind, Store,
};

/// A repeated spawn marker within this window creates no second child.
pub const SPAWN_WINDOW: Duration = Duration::from_secs(600);

/// What the orchestrator is told in its appended system prompt.
pub const ORCHESTRATOR_PROMPT: &str = "You are an orchestrator. You plan work and hand it to worker and reviewer sessions, each a separate Claude Code session in its own git worktree and chat thread. Control them by printing these markers, each at the start of its own line and outside code blocks:
[CREATE_SESSION: org/repo@branch] the task for a new worker (the branch is optional; the task continues on the following lines up to a blank line)
[CREATE_REVIEWER: org/repo@branch] the task for a new reviewer (it works in plan mode and does not change files)
[SESSION_STATUS] to get the list of your sessions
[STOP_SESSION: id-prefix] to stop one of your sessions
You will receive [SESSION_CREATED: <id> <type> <path> <thread_id>], [SESSION_ENDED: <id>] with the reason, [SESSIONS: <json>] and [SESSION_ERROR: <message>] as messages.";

/// Settings of the orchestrator.
#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// `SM_MAX_CHILD_SESSIONS`.
    pub max_children: usize,
    /// Where worktrees go (for the path in `[SESSION_CREATED: …]`).
    pub git: GitLayout,
    /// `SM_DEFAULT_ORG`.
    pub default_org: Option<String>,
    /// Git host recorded on sessions.
    pub repo_host: String,
}

/// Handles the orchestrator markers. Share it in an [`Arc`].
pub struct Orchestrator {
    store: Store,
    chat: Arc<dyn ChatOutbound>,
    config: OrchestratorConfig,
    runtime: OnceLock<SessionRuntime>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").finish_non_exhaustive()
    }
}

impl Orchestrator {
    /// The orchestrator over storage and a chat platform.
    pub fn new(store: Store, chat: Arc<dyn ChatOutbound>, config: OrchestratorConfig) -> Self {
        Self {
            store,
            chat,
            config,
            runtime: OnceLock::new(),
        }
    }

    /// Connects the session runtime that starts and stops the children.
    pub fn attach_runtime(&self, runtime: SessionRuntime) {
        let _ = self.runtime.set(runtime);
    }

    async fn notice(&self, parent: &Session, text: &str) {
        if let Err(e) = self
            .chat
            .post(&parent.channel_id, Some(&parent.thread_id), text)
            .await
        {
            warn!(error = %e, "cannot post in the orchestrator's thread");
        }
    }

    async fn spawn(&self, parent: &Session, target: &str, task: &str, kind: SessionKind) -> String {
        let Some(runtime) = self.runtime.get() else {
            return "[SESSION_ERROR: the session runtime is not ready]".into();
        };
        let repo = match RepoRef::parse_with_default_org(target, self.config.default_org.as_deref())
        {
            Ok(repo) => repo,
            Err(e) => {
                return format!(
                    "[SESSION_ERROR: {:?} is not org/repo[@branch]: {}]",
                    target,
                    one_line(&e.to_string())
                )
            }
        };
        let active = match self.store.children(&parent.id).await {
            Ok(children) => children.into_iter().filter(|c| c.state.is_active()).count(),
            Err(e) => return format!("[SESSION_ERROR: cannot list your sessions: {e}]"),
        };
        if active >= self.config.max_children {
            return format!(
                "[SESSION_ERROR: limit reached: {active} of {} sessions are running; stop one first]",
                self.config.max_children
            );
        }
        match runtime
            .repo_exists(repo.org().as_str(), repo.repo().as_str())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                return format!(
                    "[SESSION_ERROR: unknown repository {}: it does not exist or cannot be read]",
                    repo.slug()
                )
            }
            Err(e) => {
                return format!(
                    "[SESSION_ERROR: cannot check the repository {}: {}]",
                    repo.slug(),
                    one_line(&e)
                )
            }
        }
        let kind_name: &'static str = kind.into();
        let key = format!(
            "{kind_name}|{}|{}|{}",
            repo.slug().to_ascii_lowercase(),
            repo.branch().map(|b| b.as_str()).unwrap_or_default(),
            task.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        let window = i64::try_from(SPAWN_WINDOW.as_millis()).unwrap_or(i64::MAX / 2);
        match self
            .store
            .claim_spawn(&parent.id, &key, now_ms(), window)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                info!(parent = %parent.id, "repeated spawn marker ignored");
                return String::new();
            }
            Err(e) => return format!("[SESSION_ERROR: cannot record the request: {e}]"),
        }
        let slug = repo.slug();
        let channel = match self
            .chat
            .ensure_project_channel(&slug, &[parent.started_by.as_str()])
            .await
        {
            Ok(channel) => channel,
            Err(e) => {
                return format!(
                    "[SESSION_ERROR: cannot prepare the channel for {slug}: {}]",
                    one_line(&e.to_string())
                )
            }
        };
        let _ = self
            .store
            .upsert_project_channel(&ProjectChannel {
                platform: self.chat.platform(),
                repo_slug: slug.clone(),
                team_id: channel.team_id.clone(),
                channel_id: channel.channel_id.clone(),
                channel_name: channel.name.clone(),
                created_at: now_ms(),
            })
            .await;
        let id = new_session_id();
        let worktree = auto_worktree_name(repo.repo().as_str(), &id);
        let anchor = format!(
            "**{} session for `{repo}`**, spawned by orchestrator `{}` ([its thread]({})).\n**Task:** {}",
            if kind == SessionKind::Reviewer { "Reviewer" } else { "Worker" },
            short_id(&parent.id),
            self.chat.permalink(&parent.thread_id),
            if task.is_empty() { "(none given)" } else { task },
        );
        let root = match self.chat.post(&channel.channel_id, None, &anchor).await {
            Ok(root) => root,
            Err(e) => {
                return format!(
                    "[SESSION_ERROR: cannot open the session thread: {}]",
                    one_line(&e.to_string())
                )
            }
        };
        let child = match self
            .store
            .create_session(&NewSession {
                id: id.clone(),
                platform: self.chat.platform(),
                channel_id: channel.channel_id.clone(),
                thread_id: root.post_id.clone(),
                kind,
                parent_id: Some(parent.id.clone()),
                started_by: parent.started_by.clone(),
                repo_host: self.config.repo_host.clone(),
                repo_org: repo.org().as_str().to_owned(),
                repo_name: repo.repo().as_str().to_owned(),
                branch: repo.branch().map(|b| b.as_str().to_owned()),
                worktree: Some(worktree.clone()),
            })
            .await
        {
            Ok(child) => child,
            Err(e) => return format!("[SESSION_ERROR: cannot record the session: {e}]"),
        };
        let _ = self
            .store
            .set_spawn_child(&parent.id, &key, &child.id)
            .await;
        let progress = match self
            .chat
            .post(
                &channel.channel_id,
                Some(&root.post_id),
                "⏳ Starting: preparing the repository…",
            )
            .await
        {
            Ok(p) => p,
            Err(_) => root.clone(),
        };
        if let Err(e) = runtime.start(child.clone(), progress).await {
            return format!("[SESSION_ERROR: the session could not start: {e}]");
        }
        if !task.is_empty() {
            // Queued by the child's actor until it is ready: its first message.
            let _ = runtime.inject(&child.id, task.to_owned()).await;
        }
        self.notice(
            parent,
            &format!(
                "🧩 Spawned {kind_name} `{}` for `{repo}`: [thread]({})",
                short_id(&child.id),
                self.chat.permalink(&root.post_id)
            ),
        )
        .await;
        let path =
            self.config
                .git
                .worktree_path(repo.org().as_str(), repo.repo().as_str(), &worktree);
        format!(
            "[SESSION_CREATED: {} {kind_name} {path} {}]",
            child.id, root.post_id
        )
    }

    async fn status(&self, parent: &Session) -> String {
        let children = match self.store.children(&parent.id).await {
            Ok(children) => children,
            Err(e) => return format!("[SESSION_ERROR: cannot list your sessions: {e}]"),
        };
        let now = now_ms();
        let list: Vec<serde_json::Value> = children
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "type": c.kind,
                    "repo": c.repo_slug(),
                    "branch": c.branch,
                    "worktree": c.worktree,
                    "thread_id": c.thread_id,
                    "state": c.state,
                    "message_count": c.stats.message_count,
                    "compaction_count": c.stats.compaction_count,
                    "idle_seconds": (now - c.last_activity_at).max(0) / 1000,
                })
            })
            .collect();
        format!("[SESSIONS: {}]", serde_json::Value::Array(list))
    }

    async fn stop(&self, parent: &Session, prefix: &str) -> String {
        let Some(runtime) = self.runtime.get() else {
            return "[SESSION_ERROR: the session runtime is not ready]".into();
        };
        let prefix = match IdPrefix::parse(prefix) {
            Ok(prefix) => prefix,
            Err(e) => {
                return format!(
                    "[SESSION_ERROR: {:?} is not a session id prefix: {}]",
                    prefix,
                    one_line(&e.to_string())
                )
            }
        };
        let matching = match self.store.active_sessions_by_prefix(prefix.as_str()).await {
            Ok(found) => found,
            Err(e) => return format!("[SESSION_ERROR: cannot look sessions up: {e}]"),
        };
        let (own, foreign): (Vec<Session>, Vec<Session>) = matching
            .into_iter()
            .partition(|s| s.parent_id.as_deref() == Some(parent.id.as_str()));
        match own.as_slice() {
            [child] => match runtime
                .stop(child, &format!("orchestrator {}", short_id(&parent.id)))
                .await
            {
                Ok(()) => String::new(), // [SESSION_ENDED: …] follows when it has ended
                Err(e) => format!("[SESSION_ERROR: cannot stop {}: {e}]", child.id),
            },
            [] if !foreign.is_empty() => format!(
                "[SESSION_ERROR: refused: {} is not one of your sessions]",
                prefix.as_str()
            ),
            [] => format!(
                "[SESSION_ERROR: none of your running sessions has an id starting with {}]",
                prefix.as_str()
            ),
            _ => format!(
                "[SESSION_ERROR: {} matches several of your sessions; give more of the id]",
                prefix.as_str()
            ),
        }
    }
}

#[async_trait]
impl MarkerHandler for Orchestrator {
    async fn on_marker(&self, session: &Session, marker: Marker) -> Vec<String> {
        if session.kind != SessionKind::Orchestrator {
            return Vec::new();
        }
        let reply = match marker {
            Marker::CreateSession { target, task } => {
                self.spawn(session, &target, &task, SessionKind::Worker)
                    .await
            }
            Marker::CreateReviewer { target, task } => {
                self.spawn(session, &target, &task, SessionKind::Reviewer)
                    .await
            }
            Marker::SessionStatus => self.status(session).await,
            Marker::StopSession { id_prefix } => self.stop(session, &id_prefix).await,
            Marker::Malformed { line, reason } => format!(
                "[SESSION_ERROR: malformed marker {:?}: {reason}]",
                one_line(&line)
            ),
            Marker::NetworkRequest { .. } => String::new(),
        };
        if reply.is_empty() {
            Vec::new()
        } else {
            vec![reply]
        }
    }
}

/// Network requests to the approval flow, the rest to the orchestrator.
pub struct MarkerRouter {
    /// `[NETWORK_REQUEST: …]`.
    pub network: Arc<dyn MarkerHandler>,
    /// Orchestrator markers.
    pub orchestrator: Arc<dyn MarkerHandler>,
}

#[async_trait]
impl MarkerHandler for MarkerRouter {
    async fn on_marker(&self, session: &Session, marker: Marker) -> Vec<String> {
        match marker {
            Marker::NetworkRequest { .. } => self.network.on_marker(session, marker).await,
            other => self.orchestrator.on_marker(session, other).await,
        }
    }
}

/// Text on one line (for replies that are a single marker).
fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(']', ")")
}
