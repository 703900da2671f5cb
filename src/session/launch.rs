//! Starting a session, the one way both a person (`start`, `orchestrate`) and an orchestrator
//! (`[CREATE_SESSION: …]`) do it: the project channel (found or made, and recorded), the
//! thread's anchor post, the session's record, the progress post, then the runtime brings it up
//! in the background.

use tracing::{info, warn};

use crate::chat::{ChannelRef, ChatError, ChatOutbound, PostRef};
use crate::command::{RepoRef, WorktreeChoice};
use crate::store::{
    new_session_id, now_ms, NewSession, ProjectChannel, Session, SessionKind, Store, StoreError,
};

use super::{auto_worktree_name, SessionControl, SessionError};

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
    let channel = chat
        .ensure_project_channel(&slug, &[request.started_by])
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
    };
    let session = match store.create_session(&new).await {
        Ok(session) => session,
        Err(e) => {
            let _ = say("Could not record this session, so it was not started. Please try again.")
                .await;
            return Err(LaunchError::RecordSession(e));
        }
    };
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
