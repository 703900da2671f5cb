//! Routing: every inbound chat message becomes a command or input for a session.
//!
//! Order and parallelism: messages are handled by one ordered worker per thread (per channel
//! for top-level messages), so a thread's messages are handled in the order they arrived while
//! threads proceed in parallel: a slow `start` in one thread never holds up another. Each
//! worker's queue is bounded; when one is full the dispatcher waits (back-pressure), it never
//! drops. Idle workers exit, and a new worker for the same key starts only after the old one
//! finished, so order holds across that too.
//!
//! Rules, in order, for one message:
//! 1. A command (the trigger, or `!word` in a session thread) is handled first, never forwarded.
//! 2. A reply in a session's thread goes to that session (looked up by channel and root id).
//! 3. A top-level message in a project channel goes to the channel's only active non-worker
//!    session; with several the user is asked to reply in a thread, with none told how to start.
//! 4. Anything else (other channels, threads without a session) is not for the bot.
//!
//! Who may do what is [`crate::access`]: the session's owner, its participants and admins.
//! Anyone else who writes in a session's thread gets a short notice only they see, their text
//! never reaches the agent, and refusals say who may do it instead.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use crate::access::Access;
use crate::access::{Act, Roles};
use crate::approval;
use crate::chat::{ChatEvent, ChatOutbound, InboundMessage};
use crate::command::{self, Command, ParseContext, RepoRef, UserName, WorktreeChoice};
use crate::config::RepoAllowlist;
use crate::leader::Gate;
use crate::permission::PermissionMode;
use crate::session::{
    launch, short_id, Delivery, Launch, LaunchError, Launched, SessionControl, SessionError,
};
use crate::store::{now_ms, Session, SessionKind, Store};
use crate::workers::OrderedWorkers;

/// Messages a thread's worker holds; past it, a message is refused with a notice to its
/// sender (the dispatcher never waits for one thread).
const WORKER_QUEUE: usize = 256;
/// A worker with nothing to do for this long exits.
const WORKER_IDLE: Duration = Duration::from_secs(60);

/// What the dispatcher answers when storage does not answer.
const STORAGE_DOWN: &str = "Sorry, I cannot reach my database right now, so this message was not delivered. Please send it again in a minute.";

/// The dispatcher's fixed inputs.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// `SM_BOT_TRIGGER`.
    pub trigger: String,
    /// `SM_DEFAULT_ORG`.
    pub default_org: Option<String>,
    /// Git host recorded on sessions (from `SM_GIT_BASE_URL`), e.g. `github.com`.
    pub repo_host: String,
    /// `SM_ALLOWED_USERS` and `SM_ADMIN_USERS`, resolved.
    pub roles: Roles,
    /// `SM_ALLOWED_REPOS` (or its default).
    pub allowlist: RepoAllowlist,
    /// `SM_MAX_SESSIONS_PER_USER`, `SM_MAX_SESSIONS`.
    pub limits: crate::session::SessionLimits,
    /// The permission mode of agents `!mode` did not switch (`SM_PERMISSION_MODE`).
    pub permission_mode: PermissionMode,
    /// `SM_SESSION_BUDGET_USD`, `SM_ORCHESTRATOR_BUDGET_USD`, for `!cost`.
    pub budgets: crate::budget::BudgetLimits,
    /// `SM_PROFILES_FILE`, with who may pick each profile (empty without the file).
    pub profiles: Arc<crate::profile::ProfileBook>,
}

/// Routes chat events. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    chat: Arc<dyn ChatOutbound>,
    store: Store,
    sessions: Arc<dyn SessionControl>,
    config: DispatchConfig,
    /// Per session, the "messages are queued" notice of the current turn, edited in place as
    /// more messages queue up (one notice per turn, not one per message).
    queued_notices: std::sync::Mutex<std::collections::HashMap<String, crate::chat::PostRef>>,
    /// Messages are handled only while it is open (see [`crate::leader`]).
    gate: Gate,
    /// Where the messages written in session threads are recorded for the web console.
    transcript: Option<Arc<crate::console::Transcript>>,
}

/// What became of a message the dispatcher handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Dealt with: answered, refused, or handed to an agent that has it now.
    Done,
    /// Waiting in its session's queue behind a running turn; the session marks it handled
    /// once its agent has it (and a restart meanwhile hands it out again).
    Queued,
}

/// How many recorded-but-unhandled messages a dispatcher hands out again when it starts.
const REDELIVER_LIMIT: i64 = 1000;

/// Which worker handles a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WorkerKey {
    channel_id: String,
    /// The thread root; `None` for top-level messages (one worker per channel).
    root_id: Option<String>,
}

impl Dispatcher {
    /// A dispatcher over a chat platform, storage and the session runtime.
    pub fn new(
        chat: Arc<dyn ChatOutbound>,
        store: Store,
        sessions: Arc<dyn SessionControl>,
        config: DispatchConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                chat,
                store,
                sessions,
                config,
                queued_notices: std::sync::Mutex::default(),
                gate: Gate::always_open(),
                transcript: None,
            }),
        }
    }

    /// The same dispatcher, handling messages only while `gate` is open: while this instance
    /// is suspended they wait, recorded; on a standby they are left for the active instance
    /// (which hands out what was recorded and not handled when it starts).
    #[must_use]
    pub fn with_gate(self, gate: Gate) -> Self {
        self.rebuilt(|inner| inner.gate = gate)
    }

    /// The same dispatcher, recording the messages written in session threads in `transcript`
    /// (the web console shows them).
    #[must_use]
    pub fn with_transcript(self, transcript: Arc<crate::console::Transcript>) -> Self {
        self.rebuilt(|inner| inner.transcript = Some(transcript))
    }

    /// The same dispatcher with one part changed.
    fn rebuilt(self, change: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            // Already shared: a new one over the same parts.
            Err(inner) => Inner {
                chat: Arc::clone(&inner.chat),
                store: inner.store.clone(),
                sessions: Arc::clone(&inner.sessions),
                config: inner.config.clone(),
                queued_notices: std::sync::Mutex::default(),
                gate: inner.gate.clone(),
                transcript: inner.transcript.clone(),
            },
        };
        change(&mut inner);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Handles events until `events` closes or `cancel` fires, then waits for the workers to
    /// finish what they hold, and gives `events` back (a queue that outlives this dispatcher,
    /// such as the Teams route's, is read by the next one). Messages recorded and not handled
    /// when the bot last stopped are handled first.
    pub async fn run(
        self,
        mut events: mpsc::Receiver<ChatEvent>,
        cancel: CancellationToken,
    ) -> mpsc::Receiver<ChatEvent> {
        let this = self.clone();
        let mut workers = OrderedWorkers::new(WORKER_QUEUE, WORKER_IDLE, move |message| {
            let this = this.clone();
            async move { this.handle_guarded(message).await }
        });
        // Notices to senders whose thread was full; awaited before returning.
        let notices = tokio_util::task::TaskTracker::new();
        // What was recorded and not handled when the bot last stopped goes first, in order.
        for message in self.unhandled().await {
            let key = WorkerKey {
                channel_id: message.channel_id.clone(),
                root_id: message.root_id.clone(),
            };
            info!(post = %message.post_id, channel = %message.channel_id, "handling a message recorded before the bot stopped");
            metrics::counter!(crate::telemetry::names::INBOUND_REDELIVERED_TOTAL).increment(1);
            if let Err(refused) = workers.try_send(key, message) {
                warn!(post = %refused.post_id, "a thread's queue is full; a recorded message waits for the next start");
            }
        }
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => break,
                event = events.recv() => event,
            };
            let Some(ChatEvent::Message(message)) = event else {
                break;
            };
            let key = WorkerKey {
                channel_id: message.channel_id.clone(),
                root_id: message.root_id.clone(),
            };
            // Never wait for one thread: a flooded thread's extra messages are refused with a
            // notice to their sender, and every other thread goes on at once.
            if let Err(refused) = workers.try_send(key, message) {
                warn!(channel = %refused.channel_id, post = %refused.post_id, "a thread's queue is full; message refused");
                let this = self.clone();
                notices.spawn(async move {
                    // Refused and told: not to be handled after a restart either.
                    this.mark_handled(&refused).await;
                    this.notify(
                        &refused,
                        &format!(
                            "Slow down: this thread already has {WORKER_QUEUE} messages waiting, so your message was not taken. Send it again once Claude has caught up."
                        ),
                    )
                    .await;
                });
            }
        }
        workers.shutdown().await;
        notices.close();
        notices.wait().await;
        events
    }

    /// The messages recorded on this platform and not handled yet, oldest first.
    async fn unhandled(&self) -> Vec<InboundMessage> {
        let platform = self.inner.chat.platform();
        let payloads = match self
            .inner
            .store
            .unhandled_inbound(platform, REDELIVER_LIMIT)
            .await
        {
            Ok(payloads) => payloads,
            Err(e) => {
                warn!(error = %e, "cannot read the messages recorded before the bot stopped");
                return Vec::new();
            }
        };
        payloads
            .into_iter()
            .filter_map(
                |payload| match serde_json::from_str::<InboundMessage>(&payload) {
                    Ok(message) if message.platform == platform => Some(message),
                    Ok(_) => None,
                    Err(e) => {
                        warn!(error = %e, "a recorded message cannot be read; it is skipped");
                        None
                    }
                },
            )
            .collect()
    }

    /// Handles one message once this instance may act, then marks it handled unless its
    /// session queued it (the session marks it once its agent has it); a panic inside becomes
    /// an error reply, not a dead worker.
    async fn handle_guarded(&self, message: InboundMessage) {
        if self.inner.gate.opened().await.is_err() {
            // A standby: the active instance hands the recorded message out.
            return;
        }
        let this = self.clone();
        let copy = message.clone();
        let outcome = tokio::spawn(async move { this.handle(copy).await }).await;
        let taken = match outcome {
            Ok(taken) => taken,
            Err(e) => {
                error!(error = %e, post = %message.post_id, "handling a message panicked");
                self.reply(&message, "Sorry, something went wrong while handling that message. It was not forwarded; please try again.")
                    .await;
                Taken::Done
            }
        };
        if taken == Taken::Done {
            self.mark_handled(&message).await;
        }
    }

    /// `!cost`: what the session spent, against each budget that applies.
    async fn cost_text(&self, session: &Session) -> String {
        let limits = self.inner.config.budgets;
        let mut text = format!(
            "Session `{}` spent ${:.4}.",
            short_id(&session.id),
            session.stats.cost_usd
        );
        match crate::budget::budgets_of(&self.inner.store, limits, session).await {
            Ok(states) if states.is_empty() => text.push_str(
                " No budget applies (SM_SESSION_BUDGET_USD, SM_ORCHESTRATOR_BUDGET_USD).",
            ),
            Ok(states) => {
                for state in states {
                    let held = if state.reached() {
                        " — reached: messages wait for the budget card's answer"
                    } else {
                        ""
                    };
                    text.push_str(&format!("\n- {}{held}", state.line()));
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the budgets");
                text.push_str(" The budgets cannot be read right now.");
            }
        }
        text
    }

    /// The permission mode `session`'s agent runs with.
    fn permission_mode(&self, session: &Session) -> PermissionMode {
        crate::permission::mode_of(session, self.inner.config.permission_mode)
    }

    /// Marks a recorded message handled, so it is not handled again after a restart.
    async fn mark_handled(&self, message: &InboundMessage) {
        if let Err(e) = self
            .inner
            .store
            .mark_inbound_handled(message.platform, &message.post_id)
            .await
        {
            warn!(error = %e, post = %message.post_id, "cannot mark a message handled; it may be handled again after a restart");
        }
    }

    /// Handles one message (see the module documentation for the rules). Returns whether the
    /// message now waits in its session's queue ([`Taken::Queued`]: the session marks it
    /// handled once its agent has it) or was dealt with here ([`Taken::Done`]).
    pub async fn handle(&self, message: InboundMessage) -> Taken {
        let inner = &self.inner;
        let thread_session = match &message.root_id {
            Some(root) => match inner
                .store
                .session_by_thread(inner.chat.platform(), &message.channel_id, root)
                .await
            {
                Ok(session) => session,
                Err(e) => {
                    error!(error = %e, "cannot look up the thread's session");
                    self.reply(&message, STORAGE_DOWN).await;
                    return Taken::Done;
                }
            },
            None => None,
        };
        if let (Some(transcript), Some(_)) = (&inner.transcript, &thread_session) {
            // A console message on a chat platform is in the thread already, as the bot's
            // post that names who wrote it.
            let echoed = message.platform != crate::store::Platform::Console
                && message.post_id.starts_with(crate::console::ID_PREFIX);
            if !echoed {
                transcript.record_inbound(&message).await;
            }
        }
        let ctx = ParseContext {
            trigger: &inner.config.trigger,
            default_org: inner.config.default_org.as_deref(),
            in_session_thread: thread_session.is_some(),
        };
        match command::parse(&message.text, &ctx) {
            Some(Ok(cmd)) => {
                // A command acts at most once: one cut short by a crash is not run again after
                // the restart (a second `start` would open a second session); its sender sees
                // no answer and can send it again.
                self.mark_handled(&message).await;
                self.command(cmd, &message, thread_session).await;
            }
            Some(Err(e)) => self.reply(&message, &e.reply(&inner.config.trigger)).await,
            None => return self.route(&message, thread_session).await,
        }
        Taken::Done
    }

    async fn route(&self, message: &InboundMessage, thread_session: Option<Session>) -> Taken {
        let inner = &self.inner;
        if let Some(session) = thread_session {
            return self.forward(message, &session).await;
        }
        if message.root_id.is_some() {
            return Taken::Done; // a conversation in a thread the bot does not own
        }
        let project = match inner
            .store
            .project_channel_by_id(inner.chat.platform(), &message.channel_id)
            .await
        {
            Ok(Some(project)) => project,
            Ok(None) => return Taken::Done, // not a channel the bot serves
            Err(e) => {
                error!(error = %e, "cannot look up the channel");
                self.reply(message, STORAGE_DOWN).await;
                return Taken::Done;
            }
        };
        let candidates: Vec<Session> = match inner
            .store
            .active_sessions_in_channel(inner.chat.platform(), &message.channel_id)
            .await
        {
            Ok(sessions) => sessions
                .into_iter()
                .filter(|s| s.kind != SessionKind::Worker && s.kind != SessionKind::Reviewer)
                .collect(),
            Err(e) => {
                error!(error = %e, "cannot list the channel's sessions");
                self.reply(message, STORAGE_DOWN).await;
                return Taken::Done;
            }
        };
        let trigger = &inner.config.trigger;
        match candidates.as_slice() {
            [only] => return self.forward(message, only).await,
            [] => {
                self.reply(
                    message,
                    &format!(
                        "No session is running in this channel, so your message was not delivered. Start one with `{trigger} start {}`.",
                        project.repo_slug
                    ),
                )
                .await;
            }
            several => {
                let list = several
                    .iter()
                    .map(|s| format!("- `{}` {} {}", short_id(&s.id), s.kind, repo_label(s)))
                    .collect::<Vec<_>>()
                    .join("\n");
                self.reply(
                    message,
                    &format!("Several sessions run in this channel, so your message was not delivered. Reply in the thread of the one you mean:\n{list}"),
                )
                .await;
            }
        }
        Taken::Done
    }

    /// A message for a session's agent: only from its owner, participants and admins.
    async fn forward(&self, message: &InboundMessage, session: &Session) -> Taken {
        if !self.may(message, session, Act::Talk).await {
            return Taken::Done;
        }
        if !session.state().is_active() {
            let why = session
                .end()
                .map(|e| format!(" ({})", e.reason))
                .unwrap_or_default();
            self.reply(
                message,
                &format!(
                    "This session has ended{why}, so your message was not delivered. Start a new one with `{} start {}`.",
                    self.inner.config.trigger,
                    session.repo_slug()
                ),
            )
            .await;
            return Taken::Done;
        }
        match self.inner.sessions.send(session, message).await {
            Ok(Delivery::Delivered) => {
                // No turn runs: the next queued message starts a new notice.
                if let Ok(mut notices) = self.inner.queued_notices.lock() {
                    notices.remove(&session.id);
                }
                Taken::Done
            }
            Ok(Delivery::Queued { position }) => {
                self.queued(session, message, position).await;
                Taken::Queued
            }
            Ok(Delivery::Refused { waiting }) => {
                warn!(session = %session.id, post = %message.post_id, waiting, "a session's queue is full; message refused");
                self.notify(
                    message,
                    &format!(
                        "Slow down: {waiting} messages already wait for Claude in this session, so your message was not taken. Send it again once Claude has caught up."
                    ),
                )
                .await;
                Taken::Done
            }
            Err(e) => {
                self.reply(message, &format!("Your message was not delivered: {e}"))
                    .await;
                Taken::Done
            }
        }
    }

    /// Says that messages wait for the running turn: the first queued message of a turn posts
    /// a notice, later ones edit that notice with the new count.
    async fn queued(&self, session: &Session, message: &InboundMessage, position: usize) {
        let text = if position <= 1 {
            "⏳ Claude is still working; 1 message is queued and will be delivered when this turn ends.".to_owned()
        } else {
            format!("⏳ Claude is still working; {position} messages are queued and will be delivered in order when this turn ends.")
        };
        let existing = if position <= 1 {
            None
        } else {
            self.inner
                .queued_notices
                .lock()
                .ok()
                .and_then(|n| n.get(&session.id).cloned())
        };
        if let Some(notice) = existing {
            if self.inner.chat.update(&notice, &text).await.is_ok() {
                return;
            }
        }
        let root = message.thread_id();
        match self
            .inner
            .chat
            .post(&message.channel_id, Some(root), &text)
            .await
        {
            Ok(notice) => {
                if let Ok(mut notices) = self.inner.queued_notices.lock() {
                    notices.insert(session.id.clone(), notice);
                }
            }
            Err(e) => warn!(error = %e, "cannot say that a message is queued"),
        }
    }

    /// Whether the author of `message` may `act` on `session`; if not, they are told (only
    /// they) who may instead.
    async fn may(&self, message: &InboundMessage, session: &Session, act: Act) -> bool {
        let inner = &self.inner;
        let participants = match inner.store.participants(&session.id).await {
            Ok(participants) => participants,
            Err(e) => {
                error!(error = %e, "cannot read a session's participants");
                self.reply(message, STORAGE_DOWN).await;
                return false;
            }
        };
        let role = inner
            .config
            .roles
            .role(&message.user_id, session, &participants);
        if role.may(act) {
            return true;
        }
        info!(user = %message.user_id, session = %session.id, ?act, ?role, "refused");
        if !inner.config.roles.may_use(&message.user_id) {
            self.refuse(message).await;
            return false;
        }
        let owner = self.name_of(&session.started_by).await;
        let text = match act {
            Act::Talk => format!(
                "Your message was not passed to Claude: only this session's owner {owner}, the people they invited and admins can talk to it. Ask {owner} to `!invite` you."
            ),
            Act::Look => format!(
                "Only this session's owner {owner}, the people they invited and admins can do that."
            ),
            Act::Manage => format!(
                "Only this session's owner {owner} or an admin can do that to session `{}`.",
                short_id(&session.id)
            ),
        };
        self.notify(message, &text).await;
        false
    }

    /// `@name` of a user id (or `someone` when the platform cannot say).
    async fn name_of(&self, user_id: &str) -> String {
        self.inner
            .chat
            .resolve_user(user_id)
            .await
            .map_or_else(|_| "someone".to_owned(), |u| format!("@{}", u.username))
    }

    async fn command(
        &self,
        cmd: Command,
        message: &InboundMessage,
        thread_session: Option<Session>,
    ) {
        let trigger = self.inner.config.trigger.clone();
        if cmd != Command::Help && !self.inner.config.roles.may_use(&message.user_id) {
            return self.refuse(message).await;
        }
        // Commands about this thread's session.
        let needs = match &cmd {
            Command::Context | Command::Compact => Some(Act::Look),
            Command::Status { all: false } | Command::Grants | Command::Profile
                if thread_session.is_some() =>
            {
                Some(Act::Look)
            }
            Command::Interrupt | Command::Mode { mode: None } | Command::Cost => Some(Act::Talk),
            // A mode decides what Claude may do unasked: the owner's (or an admin's) call.
            Command::Mode { mode: Some(_) } => Some(Act::Manage),
            Command::Revoke { .. } => Some(Act::Manage),
            Command::Clear | Command::Restart | Command::Invite { .. } | Command::Kick { .. } => {
                Some(Act::Manage)
            }
            _ => None,
        };
        if let Some(act) = needs {
            let Some(session) = &thread_session else {
                return self
                    .reply(message, "That command works in a session's thread.")
                    .await;
            };
            if !self.may(message, session, act).await {
                return;
            }
        }
        match cmd {
            Command::Help => {
                self.reply(
                    message,
                    &command::help_text(&trigger, thread_session.is_some()),
                )
                .await;
            }
            Command::Status { all } => match thread_session {
                Some(session) if !all => {
                    let mut text = status_text(std::slice::from_ref(&session), now_ms());
                    text.push_str(&format!(
                        "\nPermission mode: `{}`.",
                        self.permission_mode(&session)
                    ));
                    self.reply(message, &text).await;
                }
                _ => self.status(message, all).await,
            },
            Command::Join { target } => {
                let prefix = target.as_ref().map(|p| p.as_str());
                if let Some(session) = self.target(message, "join", prefix, thread_session).await {
                    self.join(message, &session).await;
                }
            }
            Command::Start {
                repo,
                worktree,
                profile,
            } => {
                self.start(message, &repo, worktree, profile, SessionKind::Standard)
                    .await;
            }
            Command::Orchestrate { repo, profile } => {
                self.start(message, &repo, None, profile, SessionKind::Orchestrator)
                    .await;
            }
            Command::Profile => {
                let text = match &thread_session {
                    Some(session) => match &session.profile {
                        Some(profile) => profile.describe(),
                        None => "This session runs with no profile: the bot's own settings apply."
                            .to_owned(),
                    },
                    None => self.profiles_text(&message.user_id),
                };
                self.reply(message, &text).await;
            }
            Command::Stop { target } => {
                self.stop(message, target.as_ref().map(|p| p.as_str()), thread_session)
                    .await
            }
            Command::Context => {
                if let Some(session) = thread_session {
                    self.reply(message, &context_text(&session, now_ms())).await;
                }
            }
            Command::Invite { user } => {
                if let Some(session) = thread_session {
                    self.invite(message, &session, &user).await;
                }
            }
            Command::Grants => self.grants(message, thread_session.as_ref()).await,
            Command::Cost => {
                if let Some(session) = thread_session {
                    let text = self.cost_text(&session).await;
                    self.reply(message, &text).await;
                }
            }
            Command::Mode { mode } => {
                if let Some(session) = thread_session {
                    let text = match mode {
                        None => format!(
                            "Permission mode: `{}`. Switch with `!mode <default|acceptEdits|plan|bypassPermissions>`.",
                            self.permission_mode(&session)
                        ),
                        Some(mode) => match self
                            .inner
                            .sessions
                            .set_permission_mode(&session, mode)
                            .await
                        {
                            Ok(()) => format!("Permission mode is now `{mode}`."),
                            Err(e) => format!("Could not switch the permission mode: {e}"),
                        },
                    };
                    self.reply(message, &text).await;
                }
            }
            Command::Interrupt => {
                if let Some(session) = thread_session {
                    let text = match self.inner.sessions.interrupt(&session).await {
                        Ok(true) => "Interrupting Claude…".to_owned(),
                        Ok(false) => "Claude is not working on anything right now.".to_owned(),
                        Err(e) => format!("Could not do that: {e}"),
                    };
                    self.reply(message, &text).await;
                }
            }
            Command::Revoke { domain } => {
                if let Some(session) = thread_session {
                    self.revoke(message, &session, &domain).await;
                }
            }
            Command::Kick { user } => {
                if let Some(session) = thread_session {
                    self.kick(message, &session, &user).await;
                }
            }
            Command::Compact | Command::Clear | Command::Restart => {
                let Some(session) = thread_session else {
                    return;
                };
                let sessions = &self.inner.sessions;
                let (result, done) = match cmd {
                    Command::Compact => (sessions.compact(&session).await, "Compacting the conversation…"),
                    Command::Clear => (
                        sessions.clear(&session).await,
                        "Starting a fresh conversation (after the current turn, if one is running)…",
                    ),
                    _ => (
                        sessions.restart(&session).await,
                        "Restarting Claude and resuming the conversation (after the current turn, if one is running)…",
                    ),
                };
                match result {
                    Ok(()) => self.reply(message, done).await,
                    Err(e) => {
                        self.reply(message, &format!("Could not do that: {e}"))
                            .await
                    }
                }
            }
        }
    }

    /// The session a `stop`/`join` names: this thread's, or the active session whose id starts
    /// with `prefix` among those the asker may see (their own, those they were invited to, every
    /// one for admins), so an id prefix reveals nothing about other people's sessions. `None`
    /// after telling the asker why.
    async fn target(
        &self,
        message: &InboundMessage,
        command: &str,
        prefix: Option<&str>,
        thread_session: Option<Session>,
    ) -> Option<Session> {
        let prefix = match (prefix, thread_session) {
            (None, Some(session)) => return Some(session),
            (None, None) => {
                self.reply(
                    message,
                    &format!(
                        "Say `{command}` in a session's thread, or name it: `{command} <id>`."
                    ),
                )
                .await;
                return None;
            }
            (Some(prefix), _) => prefix,
        };
        let inner = &self.inner;
        let visible = async {
            let mut visible = Vec::new();
            for session in inner.store.active_sessions_by_prefix(prefix).await? {
                let participants = inner.store.participants(&session.id).await?;
                if inner
                    .config
                    .roles
                    .role(&message.user_id, &session, &participants)
                    .may(Act::Look)
                {
                    visible.push(session);
                }
            }
            Ok::<_, crate::store::StoreError>(visible)
        };
        let found = match visible.await {
            Ok(found) => found,
            Err(e) => {
                error!(error = %e, "cannot look sessions up");
                self.reply(message, STORAGE_DOWN).await;
                return None;
            }
        };
        match <[Session; 1]>::try_from(found) {
            Ok([one]) => Some(one),
            Err(found) if found.is_empty() => {
                self.reply(
                    message,
                    &format!("None of your active sessions has an id starting with `{prefix}`; `{} status` lists them.", inner.config.trigger),
                )
                .await;
                None
            }
            Err(several) => {
                let ids = several
                    .iter()
                    .map(|s| format!("`{}`", short_id(&s.id)))
                    .collect::<Vec<_>>()
                    .join(", ");
                self.reply(
                    message,
                    &format!("`{prefix}` matches several sessions ({ids}); give more of the id."),
                )
                .await;
                None
            }
        }
    }

    /// `stop` in a session's thread, or `stop <prefix>` from anywhere: its owner or an admin.
    async fn stop(
        &self,
        message: &InboundMessage,
        prefix: Option<&str>,
        thread_session: Option<Session>,
    ) {
        let Some(session) = self.target(message, "stop", prefix, thread_session).await else {
            return;
        };
        if !self.may(message, &session, Act::Manage).await {
            return;
        }
        if !session.state().is_active() {
            return self
                .reply(
                    message,
                    &format!("Session `{}` is not running.", short_id(&session.id)),
                )
                .await;
        }
        match self.inner.sessions.stop(&session, &message.user_id).await {
            Ok(()) => {
                self.reply(
                    message,
                    &format!(
                        "Stopping session `{}` ({}).",
                        short_id(&session.id),
                        repo_label(&session)
                    ),
                )
                .await;
            }
            Err(e) => {
                self.reply(message, &format!("Could not stop it: {e}"))
                    .await
            }
        }
    }

    /// `invite @user`: the user may talk to the session from now on (and is added to its
    /// channel and follows its thread).
    async fn invite(&self, message: &InboundMessage, session: &Session, user: &UserName) {
        let chat = &self.inner.chat;
        let Ok(found) = chat.resolve_user(user.as_str()).await else {
            return self
                .reply(message, &format!("I do not know a user {user}."))
                .await;
        };
        if found.id == session.started_by {
            return self
                .reply(message, &format!("{user} owns this session already."))
                .await;
        }
        if !self.inner.config.roles.may_use(&found.id) {
            return self
                .reply(
                    message,
                    &format!("{user} may not use this bot (SM_ALLOWED_USERS), so an invitation would not let them in. Ask an administrator."),
                )
                .await;
        }
        match self
            .inner
            .store
            .add_participant(&session.id, &found.id, &message.user_id, now_ms())
            .await
        {
            Ok(false) => {
                return self
                    .reply(message, &format!("{user} was invited already."))
                    .await
            }
            Ok(true) => {}
            Err(e) => {
                error!(error = %e, "cannot record a participant");
                return self.reply(message, STORAGE_DOWN).await;
            }
        }
        // An orchestrator's running children follow its participants.
        for child in self.active_children(session).await {
            if let Err(e) = self
                .inner
                .store
                .add_participant(&child.id, &found.id, &message.user_id, now_ms())
                .await
            {
                warn!(error = %e, session = %child.id, "cannot pass an invitation on to a child session");
            }
        }
        if let Err(e) = chat
            .add_channel_members(&session.channel_id, &[found.id.as_str()])
            .await
        {
            warn!(error = %e, "cannot add the participant to the project channel");
        }
        let root = crate::chat::PostRef {
            channel_id: session.channel_id.clone(),
            post_id: session.thread_id.clone(),
            root_id: None,
        };
        if let Err(e) = chat.follow_thread(&found.id, &root).await {
            warn!(error = %e, "cannot make the participant follow the thread");
        }
        info!(session = %session.id, user = %found.id, by = %message.user_id, "participant invited");
        let by = self.name_of(&message.user_id).await;
        self.reply(
            message,
            &format!("@{} can now talk to this session (invited by {by}); only its owner and admins can stop it.", found.username),
        )
        .await;
    }

    /// `join`: the asker (owner, participant or admin) becomes a member of the session's
    /// project channel and follows its thread; how admins reach a private channel.
    async fn join(&self, message: &InboundMessage, session: &Session) {
        if !self.may(message, session, Act::Look).await {
            return;
        }
        let chat = &self.inner.chat;
        if let Err(e) = chat
            .add_channel_members(&session.channel_id, &[message.user_id.as_str()])
            .await
        {
            warn!(error = %e, session = %session.id, "cannot add a member to the project channel");
            return self
                .notify(
                    message,
                    &format!("Could not add you to the session's channel: {e}"),
                )
                .await;
        }
        let root = crate::chat::PostRef {
            channel_id: session.channel_id.clone(),
            post_id: session.thread_id.clone(),
            root_id: None,
        };
        if let Err(e) = chat.follow_thread(&message.user_id, &root).await {
            warn!(error = %e, "cannot make the member follow the thread");
        }
        info!(session = %session.id, user = %message.user_id, "joined");
        self.notify(
            message,
            &format!(
                "You are a member of the channel of session `{}` and follow its thread: {}",
                short_id(&session.id),
                chat.permalink(&session.thread_id)
            ),
        )
        .await;
    }

    /// The running children of an orchestrator (none for other sessions, or when storage
    /// does not answer: the orchestrator's own record is what counts).
    async fn active_children(&self, session: &Session) -> Vec<Session> {
        if session.kind != SessionKind::Orchestrator {
            return Vec::new();
        }
        match self.inner.store.children(&session.id).await {
            Ok(children) => children
                .into_iter()
                .filter(|c| c.state().is_active())
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot list an orchestrator's children");
                Vec::new()
            }
        }
    }

    /// `kick @user`: takes an invitation back.
    async fn kick(&self, message: &InboundMessage, session: &Session, user: &UserName) {
        let Ok(found) = self.inner.chat.resolve_user(user.as_str()).await else {
            return self
                .reply(message, &format!("I do not know a user {user}."))
                .await;
        };
        for child in self.active_children(session).await {
            if let Err(e) = self
                .inner
                .store
                .remove_participant(&child.id, &found.id)
                .await
            {
                warn!(error = %e, session = %child.id, "cannot take an invitation back from a child session");
            }
        }
        match self
            .inner
            .store
            .remove_participant(&session.id, &found.id)
            .await
        {
            Ok(true) => {
                info!(session = %session.id, user = %found.id, by = %message.user_id, "participant removed");
                self.reply(
                    message,
                    &format!("@{} can no longer talk to this session.", found.username),
                )
                .await;
            }
            Ok(false) => {
                self.reply(message, &format!("{user} was not invited to this session."))
                    .await
            }
            Err(e) => {
                error!(error = %e, "cannot remove a participant");
                self.reply(message, STORAGE_DOWN).await;
            }
        }
    }

    /// `profile` outside a session thread: the profiles `user_id` may pick.
    fn profiles_text(&self, user_id: &str) -> String {
        let book = &self.inner.config.profiles;
        let trigger = &self.inner.config.trigger;
        if book.profiles().is_empty() {
            return "No profiles are configured here (SM_PROFILES_FILE): sessions run with the bot's settings.".to_owned();
        }
        let choices = book.choices(&self.inner.config.roles, user_id);
        if choices.is_empty() {
            return "You may not pick any profile here; sessions you start run with the bot's settings.".to_owned();
        }
        let mut text =
            format!("Profiles you may pick with `{trigger} start org/repo --profile=name`:");
        for name in choices {
            let Some(profile) = book.profiles().get(&name) else {
                continue;
            };
            let note = if name == crate::profile::DEFAULT_PROFILE {
                " (applies when you name none)"
            } else {
                ""
            };
            text.push_str(&format!("\n- `{name}`{note}"));
            if let Some(description) = &profile.description {
                text.push_str(&format!(": {description}"));
            }
        }
        text
    }

    async fn start(
        &self,
        message: &InboundMessage,
        repo: &RepoRef,
        worktree: Option<WorktreeChoice>,
        profile: Option<command::ProfileName>,
        kind: SessionKind,
    ) {
        let inner = &self.inner;
        let profile = match inner.config.profiles.pick(
            &inner.config.roles,
            &message.user_id,
            profile.as_ref().map(command::ProfileName::as_str),
        ) {
            Ok(profile) => profile,
            Err(e) => {
                let text = format!("No session was started: {e}.");
                return self.reply(message, &text).await;
            }
        };
        let profile_label = match &profile {
            Some(p) if p.name != crate::profile::DEFAULT_PROFILE => {
                format!(" with profile `{}`", p.name)
            }
            _ => String::new(),
        };
        let starter = message
            .user_name
            .as_deref()
            .map_or_else(|| "someone".to_owned(), |n| format!("@{n}"));
        let what = match kind {
            SessionKind::Orchestrator => "Orchestrator session",
            _ => "Session",
        };
        let worktree_label = match &worktree {
            Some(WorktreeChoice::Named(name)) => format!(" (worktree `{}`)", name.as_str()),
            Some(WorktreeChoice::Auto) => " (own worktree)".to_owned(),
            None => String::new(),
        };
        let request = Launch {
            repo,
            kind,
            worktree,
            parent: None,
            started_by: &message.user_id,
            follow: true,
            anchor: format!(
                "**{what} for `{repo}`**{worktree_label}{profile_label}, started by {starter}.\nReply in this thread to talk to Claude. Commands: `!help`."
            ),
            repo_host: &inner.config.repo_host,
            allowlist: &inner.config.allowlist,
            limits: inner.config.limits,
            profile,
        };
        let slug = repo.slug();
        let launched = launch(
            inner.chat.as_ref(),
            &inner.store,
            inner.sessions.as_ref(),
            request,
        )
        .await;
        let trigger = &inner.config.trigger;
        let Launched {
            session, channel, ..
        } = match launched {
            Ok(launched) => launched,
            Err(e) => {
                let text = match &e {
                    LaunchError::NotAllowed { .. } => format!(
                        "{}. Ask an administrator to add it to SM_ALLOWED_REPOS.",
                        capitalize(&e.to_string())
                    ),
                    LaunchError::UnknownRepository(_) => format!(
                        "{}. Check the name (`org/repo`), or ask an administrator whether the bot may read it.",
                        capitalize(&e.to_string())
                    ),
                    LaunchError::CheckRepository(SessionError::VmUnavailable(_))
                    | LaunchError::CheckRepository(_) => format!(
                        "Could not check `{slug}` on the VM, so no session was started: {e}. Please try again in a minute."
                    ),
                    LaunchError::TooManyOfYours(_) | LaunchError::TooManySessions(_) => {
                        capitalize(&e.to_string()) + "."
                    }
                    LaunchError::CloneInUse { .. } => format!(
                        "{}. Start with `--worktree` to work in a worktree of your own, e.g. `{trigger} start {slug} --worktree`.",
                        capitalize(&e.to_string())
                    ),
                    LaunchError::WorktreeInUse { .. } => format!(
                        "{}. Pick another name, or `--worktree` alone for one of your own.",
                        capitalize(&e.to_string())
                    ),
                    LaunchError::Storage(e) => {
                        error!(error = %e, "cannot check the repository's locks");
                        STORAGE_DOWN.to_owned()
                    }
                    LaunchError::Channel(e) => {
                        warn!(error = %e, repo = %slug, "cannot prepare the project channel");
                        format!("Could not prepare the channel for `{slug}`: {e}")
                    }
                    LaunchError::RecordChannel(e) => {
                        error!(error = %e, repo = %slug, "cannot record the project channel");
                        "Could not record the project channel; please try again.".to_owned()
                    }
                    LaunchError::Thread(e) => format!("Could not open the session thread: {e}"),
                    LaunchError::RecordSession(e) => {
                        error!(error = %e, "cannot record the session");
                        "Could not record the session; please try again.".to_owned()
                    }
                    LaunchError::Start(e) => format!("The session could not start: {e}"),
                };
                return self.reply(message, &text).await;
            }
        };
        // Tell the starter where it is, unless they wrote in that very channel's thread.
        if message.channel_id != channel.channel_id || message.root_id.is_some() {
            self.reply(
                message,
                &format!(
                    "Started session `{}` for `{repo}` in ~{}.",
                    short_id(&session.id),
                    channel.name
                ),
            )
            .await;
        }
    }

    /// `status`: the asker's sessions and those they were invited to; `status all`: every
    /// session, for admins.
    async fn status(&self, message: &InboundMessage, all: bool) {
        let inner = &self.inner;
        let is_admin = inner.config.roles.is_admin(&message.user_id);
        if all && !is_admin {
            return self
                .notify(
                    message,
                    "Only admins can list every session (`status all`); `status` lists yours and those you were invited to.",
                )
                .await;
        }
        let sessions = if all {
            inner.store.active_sessions().await
        } else {
            inner.store.active_sessions_of(&message.user_id).await
        };
        let sessions = match sessions {
            Ok(sessions) => sessions,
            Err(e) => {
                error!(error = %e, "cannot list sessions");
                return self
                    .reply(
                        message,
                        "Sorry, I cannot reach my database right now; please try again.",
                    )
                    .await;
            }
        };
        self.reply(message, &status_text(&sessions, now_ms())).await;
    }

    /// `grants`: this thread's session's live grants; at top level, those of the asker's
    /// sessions (owned or invited to), or every session's for admins.
    async fn grants(&self, message: &InboundMessage, thread_session: Option<&Session>) {
        let inner = &self.inner;
        let now = now_ms();
        let listed = match thread_session {
            Some(session) => inner
                .store
                .live_grants(Some(&session.id), now)
                .await
                .map(|g| (g, false)),
            None => {
                let all = inner.store.live_grants(None, now).await;
                let visible = if inner.config.roles.is_admin(&message.user_id) {
                    all.map(|g| (g, true))
                } else {
                    match (all, inner.store.active_sessions_of(&message.user_id).await) {
                        (Ok(all), Ok(mine)) => {
                            let mine: HashSet<&str> = mine.iter().map(|s| s.id.as_str()).collect();
                            Ok((
                                all.into_iter()
                                    .filter(|g| mine.contains(g.session_id.as_str()))
                                    .collect(),
                                true,
                            ))
                        }
                        (Err(e), _) | (_, Err(e)) => Err(e),
                    }
                };
                visible
            }
        };
        match listed {
            Ok((grants, with_session)) => {
                self.reply(message, &approval::grants_text(&grants, with_session))
                    .await;
            }
            Err(e) => {
                error!(error = %e, "cannot list grants");
                self.reply(message, STORAGE_DOWN).await;
            }
        }
    }

    /// `revoke <domain>`: ends this session's grant for the domain (the owner or an admin; the
    /// caller checked).
    async fn revoke(&self, message: &InboundMessage, session: &Session, domain: &str) {
        let user = (
            message.user_id.as_str(),
            message
                .user_name
                .as_deref()
                .unwrap_or(message.user_id.as_str()),
        );
        match approval::revoke(&self.inner.store, session, domain, user).await {
            Ok(ended) if ended.is_empty() => {
                self.reply(
                    message,
                    &format!("This session holds no live grant for `{domain}`; see `!grants`."),
                )
                .await;
            }
            Ok(_) => {
                self.reply(
                    message,
                    &format!("Revoked this session's grant for `{domain}`; the firewall alias drops it within a few seconds unless another session's grant still covers it."),
                )
                .await;
            }
            Err(e) => {
                error!(error = %e, "cannot revoke a grant");
                self.reply(message, STORAGE_DOWN).await;
            }
        }
    }

    async fn refuse(&self, message: &InboundMessage) {
        self.notify(
            message,
            "Sorry, you are not on the list of people who may use this bot. Ask an administrator to add you to SM_ALLOWED_USERS.",
        )
        .await;
    }

    /// Answers in the message's thread (or starts one under a top-level message).
    async fn reply(&self, message: &InboundMessage, text: &str) {
        let root = message.thread_id();
        if let Err(e) = self
            .inner
            .chat
            .post(&message.channel_id, Some(root), text)
            .await
        {
            warn!(error = %e, "cannot reply in chat");
        }
    }

    /// Tells only the message's author, in its thread.
    async fn notify(&self, message: &InboundMessage, text: &str) {
        if let Err(e) = self
            .inner
            .chat
            .post_ephemeral(
                &message.channel_id,
                Some(message.thread_id()),
                &message.user_id,
                text,
            )
            .await
        {
            warn!(error = %e, "cannot notify the user");
        }
    }
}

/// The sentence with its first letter upper-cased.
fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn repo_label(s: &Session) -> String {
    match &s.branch {
        Some(branch) => format!("{}@{branch}", s.repo_slug()),
        None => s.repo_slug(),
    }
}

/// `3h 05m`, `4m 12s`, `9s`.
pub fn human_duration(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    match secs {
        s if s >= 86_400 => format!("{}d {:02}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The `status` answer: active sessions, orchestrators with their children indented.
pub fn status_text(sessions: &[Session], now: i64) -> String {
    if sessions.is_empty() {
        return "No active sessions.".to_owned();
    }
    let ids: HashSet<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    let line = |s: &Session, indent: &str| {
        format!(
            "{indent}- `{}` {} `{}` · {} · {} messages · idle {}",
            short_id(&s.id),
            s.kind,
            repo_label(s),
            if s.is_hibernating() {
                "hibernating 💤".to_owned()
            } else {
                s.state().to_string()
            },
            s.stats.message_count,
            human_duration(now - s.last_activity_at)
        )
    };
    let mut out = vec![format!("**Active sessions ({})**", sessions.len())];
    for s in sessions
        .iter()
        .filter(|s| s.parent_id.as_deref().is_none_or(|p| !ids.contains(p)))
    {
        out.push(line(s, ""));
        for child in sessions
            .iter()
            .filter(|c| c.parent_id.as_deref() == Some(s.id.as_str()))
        {
            out.push(line(child, "    "));
        }
    }
    out.join("\n")
}

/// The `context` answer for one session.
pub fn context_text(s: &Session, now: i64) -> String {
    let st = &s.stats;
    format!(
        "**Session `{}`** ({} `{}`)\n- messages: {}\n- compactions: {}\n- tokens: {} in / {} out; context {}\n- cost: ${:.4}\n- age: {} · idle: {}",
        short_id(&s.id),
        s.kind,
        repo_label(s),
        st.message_count,
        st.compaction_count,
        st.input_tokens,
        st.output_tokens,
        st.context_tokens,
        st.cost_usd,
        human_duration(now - s.created_at),
        human_duration(now - s.last_activity_at),
    )
}
