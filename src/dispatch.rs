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
//! Who may start, stop and drive sessions is [`Access`]; others get a polite refusal.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::chat::{ChatEvent, ChatOutbound, InboundMessage};
use crate::command::{self, Command, ParseContext, RepoRef, WorktreeChoice};
use crate::session::{launch, short_id, Delivery, Launch, LaunchError, Launched, SessionControl};
use crate::store::{now_ms, Session, SessionKind, Store};
use crate::workers::OrderedWorkers;

/// Messages a thread's worker holds before the dispatcher waits.
const WORKER_QUEUE: usize = 256;
/// A worker with nothing to do for this long exits.
const WORKER_IDLE: Duration = Duration::from_secs(60);

/// What the dispatcher answers when storage does not answer.
const STORAGE_DOWN: &str = "Sorry, I cannot reach my database right now, so this message was not delivered. Please send it again in a minute.";

/// Who may start, stop and drive sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anyone in a channel the bot serves.
    Everyone,
    /// Only these user ids.
    Only(HashSet<String>),
}

impl Access {
    /// Whether `user_id` may act.
    pub fn allows(&self, user_id: &str) -> bool {
        match self {
            Self::Everyone => true,
            Self::Only(ids) => ids.contains(user_id),
        }
    }
}

/// The dispatcher's fixed inputs.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// `SM_BOT_TRIGGER`.
    pub trigger: String,
    /// `SM_DEFAULT_ORG`.
    pub default_org: Option<String>,
    /// Git host recorded on sessions (from `SM_GIT_BASE_URL`), e.g. `github.com`.
    pub repo_host: String,
    /// `SM_ALLOWED_USERS`, resolved.
    pub access: Access,
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
}

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
            }),
        }
    }

    /// Handles events until `events` closes or `cancel` fires, then waits for the workers to
    /// finish what they hold.
    pub async fn run(self, mut events: mpsc::Receiver<ChatEvent>, cancel: CancellationToken) {
        let this = self.clone();
        let mut workers = OrderedWorkers::new(WORKER_QUEUE, WORKER_IDLE, move |message| {
            let this = this.clone();
            async move { this.handle_guarded(message).await }
        });
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
            workers.send(key, message).await;
        }
        workers.shutdown().await;
    }

    /// Handles one message; a panic inside becomes an error reply, not a dead worker.
    async fn handle_guarded(&self, message: InboundMessage) {
        let this = self.clone();
        let copy = message.clone();
        let outcome = tokio::spawn(async move { this.handle(copy).await }).await;
        if let Err(e) = outcome {
            error!(error = %e, post = %message.post_id, "handling a message panicked");
            self.reply(&message, "Sorry, something went wrong while handling that message. It was not forwarded; please try again.")
                .await;
        }
    }

    /// Handles one message (see the module documentation for the rules).
    pub async fn handle(&self, message: InboundMessage) {
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
                    return;
                }
            },
            None => None,
        };
        let ctx = ParseContext {
            trigger: &inner.config.trigger,
            default_org: inner.config.default_org.as_deref(),
            in_session_thread: thread_session.is_some(),
        };
        match command::parse(&message.text, &ctx) {
            Some(Ok(cmd)) => self.command(cmd, &message, thread_session).await,
            Some(Err(e)) => self.reply(&message, &e.reply(&inner.config.trigger)).await,
            None => self.route(&message, thread_session).await,
        }
    }

    async fn route(&self, message: &InboundMessage, thread_session: Option<Session>) {
        let inner = &self.inner;
        if let Some(session) = thread_session {
            return self.forward(message, &session).await;
        }
        if message.root_id.is_some() {
            return; // a conversation in a thread the bot does not own
        }
        let project = match inner
            .store
            .project_channel_by_id(inner.chat.platform(), &message.channel_id)
            .await
        {
            Ok(Some(project)) => project,
            Ok(None) => return, // not a channel the bot serves
            Err(e) => {
                error!(error = %e, "cannot look up the channel");
                self.reply(message, STORAGE_DOWN).await;
                return;
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
                return self.reply(message, STORAGE_DOWN).await;
            }
        };
        let trigger = &inner.config.trigger;
        match candidates.as_slice() {
            [only] => self.forward(message, only).await,
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
    }

    async fn forward(&self, message: &InboundMessage, session: &Session) {
        if !self.inner.config.access.allows(&message.user_id) {
            return self.refuse(message).await;
        }
        if !session.state().is_active() {
            let why = session
                .end()
                .map(|e| format!(" ({})", e.reason))
                .unwrap_or_default();
            return self
                .reply(
                    message,
                    &format!(
                        "This session has ended{why}, so your message was not delivered. Start a new one with `{} start {}`.",
                        self.inner.config.trigger,
                        session.repo_slug()
                    ),
                )
                .await;
        }
        match self.inner.sessions.send(session, message).await {
            Ok(Delivery::Delivered) => {}
            Ok(Delivery::Queued { position }) => {
                self.reply(
                    message,
                    &format!("Claude is still working; your message is queued ({position} waiting) and will be delivered when this turn ends."),
                )
                .await;
            }
            Err(e) => {
                self.reply(message, &format!("Your message was not delivered: {e}"))
                    .await
            }
        }
    }

    async fn command(
        &self,
        cmd: Command,
        message: &InboundMessage,
        thread_session: Option<Session>,
    ) {
        let trigger = self.inner.config.trigger.clone();
        let needs_access = !matches!(cmd, Command::Help | Command::Status | Command::Context);
        if needs_access && !self.inner.config.access.allows(&message.user_id) {
            return self.refuse(message).await;
        }
        match cmd {
            Command::Help => {
                self.reply(
                    message,
                    &command::help_text(&trigger, thread_session.is_some()),
                )
                .await;
            }
            Command::Status => self.status(message).await,
            Command::Start { repo, worktree } => {
                let kind = SessionKind::Standard;
                self.start(message, &repo, worktree, kind).await;
            }
            Command::Orchestrate { repo } => {
                self.start(message, &repo, None, SessionKind::Orchestrator)
                    .await;
            }
            Command::Stop { target } => {
                self.stop(message, target.as_ref().map(|p| p.as_str()), thread_session)
                    .await
            }
            Command::Context => match thread_session {
                Some(session) => self.reply(message, &context_text(&session, now_ms())).await,
                None => {
                    self.reply(message, "`context` works in a session's thread.")
                        .await
                }
            },
            Command::Compact | Command::Clear | Command::Restart => {
                let Some(session) = thread_session else {
                    return self
                        .reply(message, "That command works in a session's thread.")
                        .await;
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

    async fn stop(
        &self,
        message: &InboundMessage,
        prefix: Option<&str>,
        thread_session: Option<Session>,
    ) {
        let session = match (prefix, thread_session) {
            (None, Some(session)) => session,
            (None, None) => {
                return self
                    .reply(
                        message,
                        "Say `stop` in a session's thread, or name it: `stop <id>`.",
                    )
                    .await
            }
            (Some(prefix), _) => match self.inner.store.active_sessions_by_prefix(prefix).await {
                Ok(found) => match found.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        return self
                            .reply(
                                message,
                                &format!("No active session has an id starting with `{prefix}`."),
                            )
                            .await
                    }
                    several => {
                        let ids = several
                            .iter()
                            .map(|s| format!("`{}`", short_id(&s.id)))
                            .collect::<Vec<_>>()
                            .join(", ");
                        return self
                            .reply(message, &format!("`{prefix}` matches several sessions ({ids}); give more of the id."))
                            .await;
                    }
                },
                Err(e) => {
                    error!(error = %e, "cannot look sessions up");
                    return self
                        .reply(
                            message,
                            "Sorry, I cannot reach my database right now; please try again.",
                        )
                        .await;
                }
            },
        };
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

    async fn start(
        &self,
        message: &InboundMessage,
        repo: &RepoRef,
        worktree: Option<WorktreeChoice>,
        kind: SessionKind,
    ) {
        let inner = &self.inner;
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
                "**{what} for `{repo}`**{worktree_label}, started by {starter}.\nReply in this thread to talk to Claude. Commands: `!help`."
            ),
            repo_host: &inner.config.repo_host,
        };
        let slug = repo.slug();
        let launched = launch(
            inner.chat.as_ref(),
            &inner.store,
            inner.sessions.as_ref(),
            request,
        )
        .await;
        let Launched {
            session, channel, ..
        } = match launched {
            Ok(launched) => launched,
            Err(e) => {
                let text = match &e {
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

    async fn status(&self, message: &InboundMessage) {
        let sessions = match self.inner.store.active_sessions().await {
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

    async fn refuse(&self, message: &InboundMessage) {
        self.reply(
            message,
            "Sorry, you are not on the list of people who may start, stop or drive sessions here. Ask an administrator to add you to SM_ALLOWED_USERS.",
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
            s.state(),
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
