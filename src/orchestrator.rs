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

use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tracing::{info, warn};

use crate::agent::markers::Marker;
use crate::chat::router::ChatRouter;
use crate::chat::ChatOutbound;
use crate::command::{CommandError, IdPrefix, RepoRef, WorktreeChoice};
use crate::config::RepoAllowlist;
use crate::runtime::git::GitLayout;
use crate::session::{
    auto_worktree_name, launch, short_id, Launch, LaunchError, MarkerHandler, SessionControl,
    SessionError, SessionRuntime,
};
use crate::store::{now_ms, Session, SessionKind, Store, StoreError};

/// A repeated spawn marker within this window creates no second child.
pub const SPAWN_WINDOW: Duration = Duration::from_secs(600);

/// What the orchestrator is told in its appended system prompt.
pub const ORCHESTRATOR_PROMPT: &str = "You are an orchestrator. You plan work and hand it to worker and reviewer sessions, each a separate Claude Code session in its own git worktree and chat thread. Control them by printing these markers, each at the start of its own line and outside code blocks:
[CREATE_SESSION: org/repo@branch] the task for a new worker (the branch is optional; the task continues on the following lines up to a blank line; add --profile=name after the repository to give it one of the operator's profiles, otherwise it gets yours)
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
    /// `SM_ALLOWED_REPOS` (or its default): children are refused outside it.
    pub allowlist: RepoAllowlist,
    /// `SM_MAX_SESSIONS` (children count towards it).
    pub limits: crate::session::SessionLimits,
    /// `SM_PROFILES_FILE`: a marker may name a profile the orchestrator's owner may pick.
    pub profiles: std::sync::Arc<crate::profile::ProfileBook>,
    /// Who administers the bot (admins may pick every profile).
    pub roles: crate::access::Roles,
}

/// Handles the orchestrator markers. Share it in an [`Arc`](std::sync::Arc).
pub struct Orchestrator {
    store: Store,
    chat: ChatRouter,
    runtime: SessionRuntime,
    config: OrchestratorConfig,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").finish_non_exhaustive()
    }
}

/// Why a marker could not be carried out; the orchestrator receives it as
/// `[SESSION_ERROR: <message>]` ([`SpawnError::marker`]).
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The target is not `org/repo[@branch]`.
    #[error("{target:?} is not org/repo[@branch]: {}", one_line(&.source.to_string()))]
    BadTarget {
        /// The target as printed.
        target: String,
        /// What is wrong with it.
        source: CommandError,
    },
    /// The target names a profile that cannot be used, or carries something else after the
    /// repository.
    #[error("{0}")]
    Profile(String),
    /// The id prefix of a stop is malformed.
    #[error("{prefix:?} is not a session id prefix: {}", one_line(&.source.to_string()))]
    BadPrefix {
        /// The prefix as printed.
        prefix: String,
        /// What is wrong with it.
        source: CommandError,
    },
    /// The orchestrator runs `SM_MAX_CHILD_SESSIONS` sessions already.
    #[error("limit reached: {active} of {max} sessions are running; stop one first")]
    Limit {
        /// Running children.
        active: usize,
        /// `SM_MAX_CHILD_SESSIONS`.
        max: usize,
    },
    /// Storage failed while listing sessions.
    #[error("cannot list your sessions: {0}")]
    ListSessions(#[source] StoreError),
    /// Storage failed while looking sessions up.
    #[error("cannot look sessions up: {0}")]
    LookUp(#[source] StoreError),
    /// Storage failed while recording the request.
    #[error("cannot record the request: {0}")]
    RecordRequest(#[source] StoreError),
    /// Launching the child failed.
    #[error("{}", launch_message(.slug, .source))]
    Launch {
        /// `org/repo`.
        slug: String,
        /// Why.
        source: LaunchError,
    },
    /// The stop was refused by the runtime.
    #[error("cannot stop {id}: {source}")]
    Stop {
        /// The child's id.
        id: String,
        /// Why.
        source: SessionError,
    },
    /// A stop named a session of someone else.
    #[error("refused: {0} is not one of your sessions")]
    NotYours(String),
    /// A stop named no running child.
    #[error("none of your running sessions has an id starting with {0}")]
    NoMatch(String),
    /// A stop's prefix matches several children.
    #[error("{0} matches several of your sessions; give more of the id")]
    Ambiguous(String),
    /// A marker that does not parse.
    #[error("malformed marker {:?}: {reason}", one_line(.line))]
    Malformed {
        /// The line as printed.
        line: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl SpawnError {
    /// The reply the orchestrator receives.
    pub fn marker(&self) -> String {
        format!("[SESSION_ERROR: {self}]")
    }
}

fn launch_message(slug: &str, e: &LaunchError) -> String {
    match e {
        LaunchError::NotAllowed { .. } => {
            format!(
                "refused: {slug} is outside the repositories sessions may use (SM_ALLOWED_REPOS)"
            )
        }
        LaunchError::UnknownRepository(_) => {
            format!("unknown repository {slug}: it does not exist or cannot be read")
        }
        LaunchError::CheckRepository(e) => format!(
            "cannot check the repository {slug}: {}",
            one_line(&e.to_string())
        ),
        LaunchError::Channel(e) => format!(
            "cannot prepare the channel for {slug}: {}",
            one_line(&e.to_string())
        ),
        LaunchError::Thread(e) => format!(
            "cannot open the session thread: {}",
            one_line(&e.to_string())
        ),
        other => one_line(&other.to_string()),
    }
}

impl Orchestrator {
    /// The orchestrator over storage, a chat platform and the session runtime that starts and
    /// stops the children.
    pub fn new(
        store: Store,
        chat: ChatRouter,
        runtime: SessionRuntime,
        config: OrchestratorConfig,
    ) -> Self {
        Self {
            store,
            chat,
            runtime,
            config,
        }
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

    /// Splits a `CREATE_*` target into the repository and the child's profile: the one named
    /// by `--profile=name` after the repository (the orchestrator's owner must be allowed to
    /// pick it), else the orchestrator's own, so a child never runs with fewer limits than its
    /// orchestrator unless its owner could start it so.
    fn child_profile<'t>(
        &self,
        parent: &Session,
        target: &'t str,
    ) -> Result<(&'t str, Option<crate::profile::Profile>), SpawnError> {
        let words: Vec<&str> = target.split_whitespace().collect();
        if !words.iter().any(|w| w.starts_with("--profile=")) {
            // Just the repository (a malformed one is reported as such by its parser).
            return Ok((target, parent.profile.clone()));
        }
        let (repo, name) = match words.as_slice() {
            [repo, option] => (*repo, option.strip_prefix("--profile=").unwrap_or_default()),
            _ => {
                return Err(SpawnError::Profile(format!(
                    "{:?} is not understood: write org/repo[@branch] --profile=name",
                    one_line(target)
                )))
            }
        };
        if repo.starts_with("--") {
            return Err(SpawnError::Profile(format!(
                "{:?} is not understood: the repository comes first, then --profile=name",
                one_line(target)
            )));
        }
        if let Err(reason) = crate::profile::check_name(name) {
            return Err(SpawnError::Profile(format!(
                "{:?} is not a profile name: it {reason}",
                one_line(name)
            )));
        }
        self.config
            .profiles
            .pick(&self.config.roles, &parent.started_by, Some(name))
            .map(|profile| (repo, profile))
            .map_err(|e| SpawnError::Profile(e.to_string()))
    }

    /// `[CREATE_SESSION: …]` / `[CREATE_REVIEWER: …]`: the reply, or `None` for a repeated
    /// marker within [`SPAWN_WINDOW`].
    async fn spawn(
        &self,
        parent: &Session,
        target: &str,
        task: &str,
        kind: SessionKind,
    ) -> Result<Option<String>, SpawnError> {
        let (target, profile) = self.child_profile(parent, target)?;
        let repo = RepoRef::parse_with_default_org(target, self.config.default_org.as_deref())
            .map_err(|source| SpawnError::BadTarget {
                target: target.to_owned(),
                source,
            })?;
        // Outside the allowlist is a definite answer; say it before any limit.
        let (org, name) = (repo.org().as_str(), repo.repo().as_str());
        if !self.config.allowlist.allows(org, name) {
            return Err(SpawnError::Launch {
                slug: repo.slug(),
                source: LaunchError::NotAllowed {
                    slug: repo.slug(),
                    allowed: self.config.allowlist.describe(),
                },
            });
        }
        let active = self
            .store
            .children(&parent.id)
            .await
            .map_err(SpawnError::ListSessions)?
            .into_iter()
            .filter(|c| c.state().is_active())
            .count();
        if active >= self.config.max_children {
            return Err(SpawnError::Limit {
                active,
                max: self.config.max_children,
            });
        }
        let slug = repo.slug();
        let kind_name: &'static str = kind.into();
        let key = format!(
            "{kind_name}|{}|{}|{}",
            slug.to_ascii_lowercase(),
            repo.branch().map(|b| b.as_str()).unwrap_or_default(),
            task.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        let window = i64::try_from(SPAWN_WINDOW.as_millis()).unwrap_or(i64::MAX / 2);
        if !self
            .store
            .claim_spawn(&parent.id, &key, now_ms(), window)
            .await
            .map_err(SpawnError::RecordRequest)?
        {
            info!(parent = %parent.id, "repeated spawn marker ignored");
            return Ok(None);
        }
        // A child lives on its orchestrator's platform.
        let chat = self.chat.get(parent.platform);
        let anchor = format!(
            "**{} session for `{repo}`**, spawned by orchestrator `{}` ([its thread]({})).\n**Task:** {}",
            if kind == SessionKind::Reviewer { "Reviewer" } else { "Worker" },
            short_id(&parent.id),
            chat.permalink(&parent.thread_id),
            if task.is_empty() { "(none given)" } else { task },
        );
        let launched = launch(
            chat.as_ref(),
            &self.store,
            &self.runtime,
            Launch {
                repo: &repo,
                kind,
                worktree: Some(WorktreeChoice::Auto),
                parent: Some(parent),
                started_by: &parent.started_by,
                follow: false,
                anchor,
                repo_host: &self.config.repo_host,
                allowlist: &self.config.allowlist,
                limits: self.config.limits,
                profile,
            },
        )
        .await
        .map_err(|source| SpawnError::Launch {
            slug: slug.clone(),
            source,
        })?;
        let child = &launched.session;
        if let Err(e) = self
            .store
            .set_spawn_child(&parent.id, &key, &child.id)
            .await
        {
            warn!(error = %e, "cannot record the spawned session with its request");
        }
        if !task.is_empty() {
            // Queued by the child's actor until it is ready: its first message.
            let _ = self.runtime.inject(&child.id, task.to_owned()).await;
        }
        self.notice(
            parent,
            &format!(
                "🧩 Spawned {kind_name} `{}` for `{repo}`: [thread]({})",
                short_id(&child.id),
                chat.permalink(&launched.root.post_id)
            ),
        )
        .await;
        let worktree = child
            .worktree
            .clone()
            .unwrap_or_else(|| auto_worktree_name(repo.repo().as_str(), &child.id));
        let path =
            self.config
                .git
                .worktree_path(repo.org().as_str(), repo.repo().as_str(), &worktree);
        Ok(Some(format!(
            "[SESSION_CREATED: {} {kind_name} {path} {}]",
            child.id, launched.root.post_id
        )))
    }

    /// `[SESSION_STATUS]`.
    async fn status(&self, parent: &Session) -> Result<String, SpawnError> {
        let children = self
            .store
            .children(&parent.id)
            .await
            .map_err(SpawnError::ListSessions)?;
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
                    "state": c.state(),
                    "message_count": c.stats.message_count,
                    "compaction_count": c.stats.compaction_count,
                    "idle_seconds": (now - c.last_activity_at).max(0) / 1000,
                })
            })
            .collect();
        Ok(format!("[SESSIONS: {}]", serde_json::Value::Array(list)))
    }

    /// `[STOP_SESSION: …]`: nothing now (`[SESSION_ENDED: …]` follows when it has ended).
    async fn stop(&self, parent: &Session, prefix: &str) -> Result<Option<String>, SpawnError> {
        let prefix = IdPrefix::parse(prefix).map_err(|source| SpawnError::BadPrefix {
            prefix: prefix.to_owned(),
            source,
        })?;
        let matching = self
            .store
            .active_sessions_by_prefix(prefix.as_str())
            .await
            .map_err(SpawnError::LookUp)?;
        let (own, foreign): (Vec<Session>, Vec<Session>) = matching
            .into_iter()
            .partition(|s| s.parent_id.as_deref() == Some(parent.id.as_str()));
        let prefix = prefix.as_str().to_owned();
        match own.as_slice() {
            [child] => self
                .runtime
                .stop(child, &format!("orchestrator {}", short_id(&parent.id)))
                .await
                .map(|()| None)
                .map_err(|source| SpawnError::Stop {
                    id: child.id.clone(),
                    source,
                }),
            [] if !foreign.is_empty() => Err(SpawnError::NotYours(prefix)),
            [] => Err(SpawnError::NoMatch(prefix)),
            _ => Err(SpawnError::Ambiguous(prefix)),
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
            Marker::SessionStatus => self.status(session).await.map(Some),
            Marker::StopSession { id_prefix } => self.stop(session, &id_prefix).await,
            Marker::Malformed { line, reason } => Err(SpawnError::Malformed { line, reason }),
            Marker::NetworkRequest { .. } => Ok(None),
        };
        match reply {
            Ok(Some(reply)) => vec![reply],
            Ok(None) => Vec::new(),
            Err(e) => vec![e.marker()],
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
