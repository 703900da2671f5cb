//! The session API the rest of the bot uses: [`SessionControl`] (implemented by
//! [`SessionRuntime`](super::SessionRuntime), and by recorders in tests), its errors and what
//! a delivery reports.

use async_trait::async_trait;

use crate::chat::{InboundMessage, PostRef};
use crate::store::Session;

/// Errors from the session side, shown to the user as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The session is not running (ended, stopping, or not started). Carries the session's
    /// short id or what is known about why.
    #[error("the session is not running: {0}")]
    NotRunning(String),
    /// A request that cannot be met (e.g. the main clone is in use).
    #[error("{0}")]
    Refused(String),
    /// Storage could not be reached; the request was not carried out.
    #[error("the bot cannot reach its database right now; please try again in a minute")]
    StorageUnavailable,
    /// The VM could not be reached or did not answer; what failed.
    #[error("the VM cannot be reached right now ({0}); please try again in a minute")]
    VmUnavailable(String),
}

/// How a message reached a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The agent has it now.
    Delivered,
    /// The agent is busy; it gets the message when the current turn ends.
    Queued {
        /// Messages ahead of it, including this one (1 = next).
        position: usize,
    },
    /// Not taken: the session already holds [`MAX_QUEUED`] messages for its agent. The sender
    /// is to be told to send it again later.
    Refused {
        /// Messages waiting in the session.
        waiting: usize,
    },
}

/// How many messages a session holds for its agent behind a running turn (or while it starts,
/// restarts or wakes). One more is refused ([`Delivery::Refused`]) so that a flooded thread
/// cannot grow the bot's memory or the agent's backlog without bound.
pub const MAX_QUEUED: usize = 100;

/// What the dispatcher and the orchestrator ask of the session runtime.
#[async_trait]
pub trait SessionControl: Send + Sync + 'static {
    /// Brings up a session whose row exists (state `starting`) and whose thread is open.
    /// Progress is shown by editing `progress`. Returns at once; the bring-up runs in the
    /// session's own task.
    ///
    /// # Errors
    /// [`SessionError`] when it cannot even begin.
    async fn start(&self, session: Session, progress: PostRef) -> Result<(), SessionError>;

    /// Whether `org/repo` exists at `SM_GIT_BASE_URL` and the VM can read it (`git ls-remote`
    /// on the VM, with its token).
    ///
    /// # Errors
    /// [`SessionError::VmUnavailable`] when the check cannot run.
    async fn repo_exists(&self, org: &str, repo: &str) -> Result<bool, SessionError>;

    /// Delivers a user's message to the session's agent, queueing it during a turn.
    ///
    /// # Errors
    /// [`SessionError::NotRunning`] when the session has no running agent.
    async fn send(
        &self,
        session: &Session,
        message: &InboundMessage,
    ) -> Result<Delivery, SessionError>;

    /// Stops the session and cleans up after it (in the background: the call returns once the
    /// stop is claimed and the agent is told to stop).
    ///
    /// # Errors
    /// [`SessionError`].
    async fn stop(&self, session: &Session, requested_by: &str) -> Result<(), SessionError>;

    /// Compacts the agent's context (`/compact`).
    ///
    /// # Errors
    /// [`SessionError`].
    async fn compact(&self, session: &Session) -> Result<(), SessionError>;

    /// Restarts the agent with a new conversation.
    ///
    /// # Errors
    /// [`SessionError`].
    async fn clear(&self, session: &Session) -> Result<(), SessionError>;

    /// Restarts the agent, resuming its conversation.
    ///
    /// # Errors
    /// [`SessionError`].
    async fn restart(&self, session: &Session) -> Result<(), SessionError>;

    /// Interrupts the turn in flight (the CLI's `interrupt` control request); `Ok(false)` when
    /// none was running.
    ///
    /// # Errors
    /// [`SessionError`].
    async fn interrupt(&self, session: &Session) -> Result<bool, SessionError>;

    /// Switches the agent's permission mode (the CLI's `set_permission_mode`), kept for the
    /// rest of the session.
    ///
    /// # Errors
    /// [`SessionError`].
    async fn set_permission_mode(
        &self,
        session: &Session,
        mode: crate::permission::PermissionMode,
    ) -> Result<(), SessionError>;
}

/// The first 8 characters of an id (what people type after `stop`).
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The automatic worktree name: `<repo>-<first 8 of the session id>`.
pub fn auto_worktree_name(repo: &str, session_id: &str) -> String {
    format!("{repo}-{}", short_id(session_id))
}
