//! Starting a session, the one way both a person (`start`, `orchestrate`) and an orchestrator
//! (`[CREATE_SESSION: …]`) do it. First what can refuse it, before anything is made (so a
//! refused start leaves no channel, thread or record): the repository allowlist, the
//! repository's existence (`git ls-remote` on the VM), and a main clone or named worktree in
//! use by another session (a session that is ending is waited for, briefly). Then the project
//! channel (found or made, and recorded), the thread's anchor post, the session's record (an
//! orchestrator's child inherits its participants), the progress post, and the runtime brings
//! it up in the background.

use std::time::Duration;

use tracing::{info, warn};

use crate::chat::{ChannelRef, ChatError, ChatOutbound, PostRef};
use crate::command::{RepoRef, WorktreeChoice};
use crate::config::RepoAllowlist;
use crate::runtime::git::{clone_lock, worktree_lock};
use crate::store::{
    new_session_id, now_ms, NewSession, ProjectChannel, Session, SessionKind, SessionState, Store,
    StoreError,
};

use super::{auto_worktree_name, short_id, SessionControl, SessionError};

/// How long a start waits for a session that is ending to let go of its clone or worktree.
const ENDING_WAIT: Duration = Duration::from_secs(30);

/// The first line of a new session's progress post.
pub const STARTING_TEXT: &str = "⏳ Starting: preparing the repository…";

/// What to start.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The repository (and branch).
    pub repo: &'a RepoRef,
    /// What the session is for.
    pub kind: SessionKind,
    /// `None`: the main clone; otherwise a worktree (named, or named after the session).
    pub worktree: Option<WorktreeChoice>,
    /// The orchestrator that spawns it, if any.
    pub parent: Option<&'a Session>,
    /// User id of whoever the session belongs to (added to the project channel).
    pub started_by: &'a str,
    /// Whether `started_by` follows the new thread (a person who asked; not an orchestrator's
    /// owner, who follows the orchestrator's thread).
    pub follow: bool,
    /// The thread's anchor post (Markdown).
    pub anchor: String,
    /// Git host recorded on the session (from `SM_GIT_BASE_URL`).
    pub repo_host: &'a str,
    /// The repositories sessions may use.
    pub allowlist: &'a RepoAllowlist,
    /// How many sessions may live at once.
    pub limits: SessionLimits,
    /// The profile it runs with (already checked: the starter may pick it), recorded whole
    /// with the session.
    pub profile: Option<crate::profile::Profile>,
}

/// How many sessions may live at once (`SM_MAX_SESSIONS_PER_USER`, `SM_MAX_SESSIONS`); `0`
/// means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionLimits {
    /// Live sessions one person started themselves (spawned children do not count).
    pub per_user: u32,
    /// Live sessions in all.
    pub total: u32,
}

/// A session that was recorded and handed to the runtime.
#[derive(Debug, Clone)]
pub struct Launched {
    /// Its record, as created (state `starting`).
    pub session: Session,
    /// The project channel it lives in.
    pub channel: ChannelRef,
    /// The thread's anchor post.
    pub root: PostRef,
}

/// Why a session could not be launched. Every variant happens before the agent is involved;
/// from [`LaunchError::Start`] on, the thread itself says what went wrong too.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The repository is outside the allowlist.
    #[error("`{slug}` is not among the repositories sessions may use here ({allowed})")]
    NotAllowed {
        /// `org/repo`.
        slug: String,
        /// The allowlist, for the message.
        allowed: String,
    },
    /// The person already has as many live sessions as `SM_MAX_SESSIONS_PER_USER` allows.
    #[error("you already have {0} live sessions, the most one person may have here (SM_MAX_SESSIONS_PER_USER); stop one first")]
    TooManyOfYours(u32),
    /// The bot already runs as many sessions as `SM_MAX_SESSIONS` allows.
    #[error("the bot already runs {0} sessions, the most it may run at once (SM_MAX_SESSIONS); try again when one has ended")]
    TooManySessions(u32),
    /// The repository does not exist or the VM cannot read it.
    #[error("`{0}` does not exist or cannot be read with the bot's token")]
    UnknownRepository(String),
    /// The repository could not be checked.
    #[error("cannot check the repository: {0}")]
    CheckRepository(#[source] SessionError),
    /// Another session works in the main clone.
    #[error("the main clone of `{slug}` is in use by session `{}`", short_id(.holder))]
    CloneInUse {
        /// `org/repo`.
        slug: String,
        /// The session holding it.
        holder: String,
    },
    /// Another session works in the named worktree.
    #[error("the worktree `{name}` of `{slug}` belongs to session `{}`", short_id(.holder))]
    WorktreeInUse {
        /// `org/repo`.
        slug: String,
        /// The worktree's name.
        name: String,
        /// The session holding it.
        holder: String,
    },
    /// Storage failed while checking.
    #[error("cannot check who works in the repository: {0}")]
    Storage(#[source] StoreError),
    /// The project channel could not be found or made.
    #[error("cannot prepare the channel: {0}")]
    Channel(#[source] ChatError),
    /// The project channel could not be recorded.
    #[error("cannot record the project channel: {0}")]
    RecordChannel(#[source] StoreError),
    /// The anchor post could not be made.
    #[error("cannot open the session thread: {0}")]
    Thread(#[source] ChatError),
    /// The session could not be recorded (the thread says so).
    #[error("cannot record the session: {0}")]
    RecordSession(#[source] StoreError),
    /// The runtime refused to start it (the thread says so).
    #[error("the session could not start: {0}")]
    Start(#[source] SessionError),
}

/// Launches a session (see the module documentation).
///
/// # Errors
/// [`LaunchError`]; nothing is left half-made that the user is not told about in the thread.
pub async fn launch(
    chat: &dyn ChatOutbound,
    store: &Store,
    sessions: &dyn SessionControl,
    request: Launch<'_>,
) -> Result<Launched, LaunchError> {
    let repo = request.repo;
    let slug = repo.slug();
    let (org, name) = (repo.org().as_str(), repo.repo().as_str());
    if !request.allowlist.allows(org, name) {
        return Err(LaunchError::NotAllowed {
            slug,
            allowed: request.allowlist.describe(),
        });
    }
    check_limits(store, &request).await?;
    match sessions.repo_exists(org, name).await {
        Ok(true) => {}
        Ok(false) => return Err(LaunchError::UnknownRepository(slug)),
        Err(e) => return Err(LaunchError::CheckRepository(e)),
    }
    match &request.worktree {
        None => {
            let lock = clone_lock(request.repo_host, org, name);
            if let Some(holder) = busy(store, &lock).await? {
                return Err(LaunchError::CloneInUse { slug, holder });
            }
        }
        Some(WorktreeChoice::Named(wt)) => {
            let lock = worktree_lock(request.repo_host, org, name, wt.as_str());
            if let Some(holder) = busy(store, &lock).await? {
                return Err(LaunchError::WorktreeInUse {
                    slug,
                    name: wt.as_str().to_owned(),
                    holder,
                });
            }
        }
        Some(WorktreeChoice::Auto) => {} // a name of its own
    }
    // An orchestrator's child inherits its participants: they are members of its channel too.
    let inherited = match request.parent {
        Some(parent) => store
            .participants(&parent.id)
            .await
            .map_err(LaunchError::Storage)?,
        None => Vec::new(),
    };
    let members: Vec<&str> = std::iter::once(request.started_by)
        .chain(inherited.iter().map(String::as_str))
        .collect();
    let channel = chat
        .ensure_project_channel(&slug, &members)
        .await
        .map_err(LaunchError::Channel)?;
    store
        .upsert_project_channel(&ProjectChannel {
            platform: chat.platform(),
            repo_slug: slug.clone(),
            team_id: channel.team_id.clone(),
            channel_id: channel.channel_id.clone(),
            channel_name: channel.name.clone(),
            created_at: now_ms(),
        })
        .await
        .map_err(LaunchError::RecordChannel)?;
    let root = chat
        .post(&channel.channel_id, None, &request.anchor)
        .await
        .map_err(LaunchError::Thread)?;
    if request.follow {
        if let Err(e) = chat.follow_thread(request.started_by, &root).await {
            warn!(error = %e, "cannot make the starter follow the thread");
        }
    }
    let say = |text: &'static str| chat.post(&channel.channel_id, Some(&root.post_id), text);
    let id = new_session_id();
    let worktree = match request.worktree {
        None => None,
        Some(WorktreeChoice::Named(name)) => Some(name.as_str().to_owned()),
        Some(WorktreeChoice::Auto) => Some(auto_worktree_name(repo.repo().as_str(), &id)),
    };
    let new = NewSession {
        id,
        platform: chat.platform(),
        channel_id: channel.channel_id.clone(),
        thread_id: root.post_id.clone(),
        kind: request.kind,
        parent_id: request.parent.map(|p| p.id.clone()),
        started_by: request.started_by.to_owned(),
        repo_host: request.repo_host.to_owned(),
        repo_org: repo.org().as_str().to_owned(),
        repo_name: repo.repo().as_str().to_owned(),
        branch: repo.branch().map(|b| b.as_str().to_owned()),
        worktree,
        profile: request.profile,
    };
    let session = match store.create_session(&new).await {
        Ok(session) => session,
        Err(e) => {
            let _ = say("Could not record this session, so it was not started. Please try again.")
                .await;
            return Err(LaunchError::RecordSession(e));
        }
    };
    if let Some(parent) = request.parent {
        if let Err(e) = store
            .copy_participants(&parent.id, &session.id, now_ms())
            .await
        {
            // The owner and admins still reach it; the participants are told nothing wrong.
            warn!(error = %e, session = %session.id, "cannot pass the orchestrator's participants on");
        }
    }
    let progress = match say(STARTING_TEXT).await {
        Ok(progress) => progress,
        Err(e) => {
            warn!(error = %e, "cannot post the progress message");
            root.clone()
        }
    };
    info!(session = %session.id, repo = %repo, kind = %session.kind, "starting a session");
    if let Err(e) = sessions.start(session.clone(), progress).await {
        let _ = chat
            .post(
                &channel.channel_id,
                Some(&root.post_id),
                &format!("❌ The session could not start: {e}"),
            )
            .await;
        return Err(LaunchError::Start(e));
    }
    Ok(Launched {
        session,
        channel,
        root,
    })
}

/// The live session holding `lock`, if any. A session that is ending is waited for (up to
/// [`ENDING_WAIT`]); a lock left by an ended session is released.
/// Refuses a start past `SM_MAX_SESSIONS_PER_USER` (sessions the person started themselves) or
/// `SM_MAX_SESSIONS` (all live sessions).
async fn check_limits(store: &Store, request: &Launch<'_>) -> Result<(), LaunchError> {
    let limits = request.limits;
    if limits.per_user == 0 && limits.total == 0 {
        return Ok(());
    }
    let live = store
        .active_sessions()
        .await
        .map_err(LaunchError::Storage)?;
    if limits.total > 0 && live.len() >= limits.total as usize {
        return Err(LaunchError::TooManySessions(limits.total));
    }
    if limits.per_user > 0 && request.parent.is_none() {
        let mine = live
            .iter()
            .filter(|s| s.started_by == request.started_by && s.parent_id.is_none())
            .count();
        if mine >= limits.per_user as usize {
            return Err(LaunchError::TooManyOfYours(limits.per_user));
        }
    }
    Ok(())
}

async fn busy(store: &Store, lock: &str) -> Result<Option<String>, LaunchError> {
    let deadline = tokio::time::Instant::now() + ENDING_WAIT;
    loop {
        let Some(holder) = store
            .lock_holder(lock)
            .await
            .map_err(LaunchError::Storage)?
        else {
            return Ok(None);
        };
        let state = store
            .session(&holder)
            .await
            .map_err(LaunchError::Storage)?
            .map(|s| s.state());
        match state {
            Some(SessionState::Stopping) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Some(SessionState::Ended) | None => {
                // Left behind (a crash during a cleanup): nobody works there.
                store
                    .unlock(lock, &holder)
                    .await
                    .map_err(LaunchError::Storage)?;
                return Ok(None);
            }
            Some(_) => return Ok(Some(holder)),
        }
    }
}
