//! The records storage keeps, as the rest of the program sees them.
//!
//! Times are Unix milliseconds (`i64`), the unit Mattermost uses too. Enumerations are stored
//! as their `snake_case` names; a name the program does not know is reported as
//! [`StoreError::Corrupt`](super::StoreError::Corrupt), never a panic.

use serde::Serialize;

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// The chat platform a session lives on.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    serde::Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    /// Mattermost (REST API v4 + WebSocket).
    Mattermost,
    /// Microsoft Teams (Bot Framework).
    Teams,
    /// The bot's own web console ([`crate::console`]): threads live in its transcript.
    Console,
}

/// What a session is for.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// Started by a person with `start`.
    Standard,
    /// Started with `orchestrate`; spawns workers and reviewers.
    Orchestrator,
    /// Spawned by an orchestrator to do work.
    Worker,
    /// Spawned by an orchestrator to review, in plan mode.
    Reviewer,
}

/// The name of a lifecycle stage (see [`Lifecycle`] for the stages with their data), as
/// storage keeps it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Clone, container and agent are being prepared.
    Starting,
    /// The agent is working on a turn.
    Running,
    /// The agent waits for input.
    Idle,
    /// Cleanup was claimed and is in progress.
    Stopping,
    /// Over; see [`Lifecycle::Ended`].
    Ended,
}

impl SessionState {
    /// Whether the session still counts as active (not stopping, not ended).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Idle)
    }
}

/// Why a session ended.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Someone said `stop`.
    UserRequested,
    /// The agent process exited on its own.
    AgentExited,
    /// Clone, container or agent could not be started.
    StartFailed,
    /// An unexpected error.
    Error,
    /// The container disappeared (found at restart).
    ContainerGone,
    /// The parent orchestrator was stopped.
    ParentEnded,
    /// It was older than `SM_SESSION_MAX_AGE_SECS`.
    MaxAge,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionEnd {
    /// The reason.
    pub reason: EndReason,
    /// Human-readable detail, if any.
    pub detail: Option<String>,
    /// When (Unix ms).
    pub at: i64,
}

/// Usage counters of a session, as `context` and `status` show them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SessionStats {
    /// User messages delivered to the agent.
    pub message_count: i64,
    /// Compactions performed.
    pub compaction_count: i64,
    /// Input tokens, summed over calls.
    pub input_tokens: i64,
    /// Output tokens, summed over calls.
    pub output_tokens: i64,
    /// Context size of the latest call: input + cache-creation + cache-read tokens.
    pub context_tokens: i64,
    /// Cost in US dollars as reported by the CLI (`total_cost_usd`).
    pub cost_usd: f64,
}

/// A session row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    /// UUID v4, lowercase.
    pub id: String,
    /// Chat platform.
    pub platform: Platform,
    /// Channel the thread is in.
    pub channel_id: String,
    /// Thread anchor (Mattermost root post id, Teams conversation id).
    pub thread_id: String,
    /// Kind.
    pub kind: SessionKind,
    /// The orchestrator that spawned it, if any.
    pub parent_id: Option<String>,
    /// Where it is in its life (and, once ended, how it ended).
    pub lifecycle: Lifecycle,
    /// Chat user id of whoever started it.
    pub started_by: String,
    /// Claude Code conversation id, for `--session-id` and `--resume`.
    pub agent_session_id: Option<String>,
    /// Git host, e.g. `github.com`.
    pub repo_host: String,
    /// Organisation.
    pub repo_org: String,
    /// Repository.
    pub repo_name: String,
    /// Branch, if one was asked for.
    pub branch: Option<String>,
    /// Worktree name, `None` for the main clone.
    pub worktree: Option<String>,
    /// Path on the VM mounted into the container.
    pub workspace_path: Option<String>,
    /// Full container id.
    pub container_id: Option<String>,
    /// Where the container runs the agent, once known.
    pub container: Option<ContainerDetails>,
    /// Counters.
    pub stats: SessionStats,
    /// The permission mode `!mode` chose (the CLI's name, e.g. `plan`); `None`: the
    /// configured default.
    pub permission_mode: Option<String>,
    /// What budget cards added to this session's cap, in US dollars.
    pub budget_added_usd: f64,
    /// The profile it was started with (recorded whole, as JSON), `None`: the bot's settings.
    pub profile: Option<crate::profile::Profile>,
    /// Created (Unix ms).
    pub created_at: i64,
    /// Last row change (Unix ms).
    pub updated_at: i64,
    /// Last message in or out (Unix ms).
    pub last_activity_at: i64,
    /// Since when the session hibernates (Unix ms): its agent is closed and its container
    /// stopped until its next message wakes it (`SM_SESSION_IDLE_SECS`). `None` while awake.
    /// A hibernating session is `idle`: still active, owned, listed and stoppable.
    pub hibernated_at: Option<i64>,
}

impl Session {
    /// `org/repo`.
    pub fn repo_slug(&self) -> String {
        format!("{}/{}", self.repo_org, self.repo_name)
    }

    /// The lifecycle state, without its data.
    pub fn state(&self) -> SessionState {
        self.lifecycle.state()
    }

    /// Whether it hibernates (see [`Session::hibernated_at`]).
    pub fn is_hibernating(&self) -> bool {
        self.hibernated_at.is_some() && self.state().is_active()
    }

    /// How it ended, once it has.
    pub fn end(&self) -> Option<&SessionEnd> {
        match &self.lifecycle {
            Lifecycle::Ended(end) => Some(end),
            _ => None,
        }
    }
}

/// Where a session is in its life, each stage with only its own data: an end (reason, detail,
/// time) exists exactly for an ended session, and cannot be written for any other.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Lifecycle {
    /// Clone, container and agent are being prepared.
    Starting,
    /// The agent is working on a turn.
    Running,
    /// The agent waits for input.
    Idle,
    /// Cleanup was claimed and is in progress.
    Stopping,
    /// Over.
    Ended(SessionEnd),
}

impl Lifecycle {
    /// The state's name (what storage keeps in `sessions.state`).
    pub fn state(&self) -> SessionState {
        match self {
            Self::Starting => SessionState::Starting,
            Self::Running => SessionState::Running,
            Self::Idle => SessionState::Idle,
            Self::Stopping => SessionState::Stopping,
            Self::Ended(_) => SessionState::Ended,
        }
    }
}

/// How to run the agent in a session's container, recorded when the container is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerDetails {
    /// The session's own directory on the VM (absolute): its Claude Code state and generated
    /// devcontainer configuration.
    pub session_dir: String,
    /// The user the agent runs as in the container.
    pub user: String,
    /// The workspace folder in the container.
    pub folder: String,
}

/// A new session id: a lowercase UUID v4.
pub fn new_session_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// What is needed to create a session row (it starts in [`SessionState::Starting`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    /// Id, from [`new_session_id`] (chosen by the caller so names derived from it, such as an
    /// automatic worktree name, can be fixed before the row exists).
    pub id: String,
    /// Chat platform.
    pub platform: Platform,
    /// Channel.
    pub channel_id: String,
    /// Thread anchor.
    pub thread_id: String,
    /// Kind.
    pub kind: SessionKind,
    /// Parent orchestrator.
    pub parent_id: Option<String>,
    /// Starter's user id.
    pub started_by: String,
    /// Git host.
    pub repo_host: String,
    /// Organisation.
    pub repo_org: String,
    /// Repository.
    pub repo_name: String,
    /// Branch.
    pub branch: Option<String>,
    /// Worktree name.
    pub worktree: Option<String>,
    /// The profile it runs with, recorded whole.
    pub profile: Option<crate::profile::Profile>,
}

/// Usage to add to a session after a turn.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageDelta {
    /// Messages to add.
    pub messages: i64,
    /// Compactions to add.
    pub compactions: i64,
    /// Input tokens to add.
    pub input_tokens: i64,
    /// Output tokens to add.
    pub output_tokens: i64,
    /// New context size (replaces the stored one when `Some`).
    pub context_tokens: Option<i64>,
    /// Cost to add, in US dollars.
    pub cost_usd: f64,
}

/// The channel that serves one repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProjectChannel {
    /// Chat platform.
    pub platform: Platform,
    /// `org/repo`.
    pub repo_slug: String,
    /// Team.
    pub team_id: String,
    /// Channel id.
    pub channel_id: String,
    /// Channel name (URL slug).
    pub channel_name: String,
    /// Created (Unix ms).
    pub created_at: i64,
}

/// A Microsoft Teams conversation reference: what the bot needs to post into a Teams channel
/// or chat without an inbound activity in hand (after a restart, for example). Follows the
/// Bot Framework `ConversationReference` (`serviceUrl`, `conversation`, `bot`, tenant); see
/// `shared/reference/wire-formats.md` §3.3–3.4. A channel thread's conversation id is
/// `<conversation_id>;messageid=<root>`, so one record covers every thread of a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TeamsConversation {
    /// The channel id (`19:…@thread.tacv2`, without `;messageid=`) or the chat's id.
    pub conversation_id: String,
    /// Teams' `conversation.conversationType`: `channel`, `personal` or `groupChat`.
    pub conversation_type: String,
    /// The activity's `serviceUrl`: the base of the Connector REST API for this conversation.
    pub service_url: String,
    /// The tenant (`conversation.tenantId` or `channelData.tenant.id`); `""` when unknown.
    pub tenant_id: String,
    /// The team (`channelData.team.id`); `""` outside a team.
    pub team_id: String,
    /// The channel's or chat's name when Teams sent one; `""` otherwise.
    pub name: String,
    /// The bot's account in this conversation (`recipient.id`, `28:<app id>`).
    pub bot_id: String,
    /// Last written (Unix ms).
    pub updated_at: i64,
}

/// A Teams user the bot has heard from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TeamsUser {
    /// The user's id as the rest of the bot sees it: the AAD object id (lowercase), or the
    /// Teams account id (`29:…`) when Teams sent no AAD object id.
    pub user_id: String,
    /// The Teams account id (`from.id`, `29:…`).
    pub account_id: String,
    /// Display name (`from.name`); `""` when unknown.
    pub name: String,
    /// The conversation where the user last addressed the bot (a
    /// [`TeamsConversation::conversation_id`]); a write with `None` keeps the stored one.
    pub last_conversation_id: Option<String>,
    /// Last written (Unix ms).
    pub updated_at: i64,
}

/// The state of a network approval request.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for a decision.
    Pending,
    /// Approved; `applied_at` tells whether the firewall has it yet.
    Approved,
    /// Denied.
    Denied,
    /// Approved but the firewall refused it for good (e.g. a validation error).
    Failed,
    /// Nobody decided before `expires_at`.
    Expired,
    /// Its session ended while it was pending.
    Closed,
}

/// How long an approval grants its domain (`approval_requests.grant_scope`,
/// `egress_grants.scope`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum GrantScope {
    /// For `SM_EGRESS_GRANT_TTL_SECS` from the decision (and at most until the session ends).
    Ttl,
    /// Until the session ends.
    Session,
}

/// Why a grant ended (`egress_grants.end_reason`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::Display,
)]
#[strum(serialize_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum GrantEnd {
    /// Its time ran out.
    Expired,
    /// Revoked with `!revoke`.
    Revoked,
    /// Its session ended.
    SessionEnded,
}

/// A domain granted to one session (a row of `egress_grants`): live while `ended_at` is unset
/// and `expires_at` (Unix ms) is unset or in the future.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// UUID v4.
    pub id: String,
    /// Normalised domain.
    pub domain: String,
    /// The session it was granted to.
    pub session_id: String,
    /// How long it lasts.
    pub scope: GrantScope,
    /// The request it answered, if any.
    pub request_id: Option<String>,
    /// The other session's grant it was shared from, if any. A shared grant is a grant of its
    /// own: it ends at the same time as the source (a [`GrantScope::Ttl`] one) or when its own
    /// session ends (a [`GrantScope::Session`] one), not when the source ends.
    pub source_grant_id: Option<String>,
    /// Who decided (user id); for a shared grant, who decided the source.
    pub granted_by_id: Option<String>,
    /// Who decided (username).
    pub granted_by_name: Option<String>,
    /// When (Unix ms).
    pub granted_at: i64,
    /// Until when (Unix ms); `None`: until the session (or the source grant) ends.
    pub expires_at: Option<i64>,
    /// When it ended (Unix ms).
    pub ended_at: Option<i64>,
    /// Why it ended.
    pub end_reason: Option<GrantEnd>,
}

impl Grant {
    /// Whether it still grants its domain at `now` (Unix ms).
    pub fn is_live(&self, now: i64) -> bool {
        self.ended_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// A new grant to record with [`crate::store::Store::insert_grant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGrant {
    /// Normalised domain.
    pub domain: String,
    /// The session it is granted to.
    pub session_id: String,
    /// How long it lasts.
    pub scope: GrantScope,
    /// The request it answers, if any (at most one grant per request).
    pub request_id: Option<String>,
    /// The other session's grant it is shared from, if any.
    pub source_grant_id: Option<String>,
    /// Who decided (user id).
    pub granted_by_id: Option<String>,
    /// Who decided (username).
    pub granted_by_name: Option<String>,
    /// When (Unix ms).
    pub granted_at: i64,
    /// Until when (Unix ms), or `None` for the session's lifetime.
    pub expires_at: Option<i64>,
}

/// A decision on a pending request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allow the domain.
    Approve,
    /// Refuse it.
    Deny,
}

impl Decision {
    /// The state a request ends in after this decision.
    pub fn state(self) -> ApprovalState {
        match self {
            Self::Approve => ApprovalState::Approved,
            Self::Deny => ApprovalState::Denied,
        }
    }
}

/// An approval request row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalRequest {
    /// UUID v4.
    pub id: String,
    /// Session that asked.
    pub session_id: String,
    /// Normalised domain.
    pub domain: String,
    /// State.
    pub state: ApprovalState,
    /// Post holding the buttons.
    pub card_post_id: Option<String>,
    /// Asked (Unix ms).
    pub requested_at: i64,
    /// Expires (Unix ms).
    pub expires_at: i64,
    /// Decided or expired (Unix ms).
    pub decided_at: Option<i64>,
    /// Decider's user id.
    pub decided_by_id: Option<String>,
    /// Decider's username.
    pub decided_by_name: Option<String>,
    /// When the firewall accepted it (Unix ms).
    pub applied_at: Option<i64>,
    /// Firewall attempts so far.
    pub apply_attempts: i64,
    /// Next firewall attempt (Unix ms), while approved and not applied.
    pub next_attempt_at: Option<i64>,
    /// Last firewall error.
    pub last_error: Option<String>,
    /// What an approval grants (set with the decision).
    pub grant_scope: Option<GrantScope>,
    /// Set on a request the bot opened itself to restore or share this live grant.
    pub source_grant_id: Option<String>,
}

/// What happened to a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecideOutcome {
    /// This decision won; the row as it now is.
    Decided(ApprovalRequest),
    /// Someone decided first (or it expired); the row unchanged.
    AlreadyDecided(ApprovalRequest),
}

/// One audit record to append.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// When (Unix ms).
    pub at: i64,
    /// Session concerned.
    pub session_id: Option<String>,
    /// Thread concerned.
    pub thread_id: Option<String>,
    /// Domain concerned.
    pub domain: Option<String>,
    /// What happened, e.g. `requested`, `approved`, `denied`, `expired`, `firewall_applied`.
    pub action: String,
    /// Acting user id.
    pub user_id: Option<String>,
    /// Acting username.
    pub user_name: Option<String>,
    /// Result, e.g. `ok`, `rejected`, `failed`.
    pub outcome: String,
    /// Free text.
    pub detail: Option<String>,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// Sequence number.
    pub id: i64,
    /// The entry.
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// The result of trying to take a named lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOutcome {
    /// Taken now, or already held by the same holder.
    Acquired,
    /// Held by someone else.
    Held {
        /// The current holder.
        holder: String,
    },
}

/// A container the bot started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Container {
    /// Full container id.
    pub container_id: String,
    /// VM it runs on.
    pub vm_host: String,
    /// Workspace folder it was started for.
    pub workspace_folder: String,
    /// Created (Unix ms).
    pub created_at: i64,
    /// Removed (Unix ms), if it was.
    pub removed_at: Option<i64>,
}
