//! Tool permissions answered from chat.
//!
//! The agent runs with `--permission-prompt-tool stdio` and a permission mode
//! ([`PermissionMode`], `SM_PERMISSION_MODE`, switched per session with `!mode`). Before a tool
//! the mode does not allow runs, the CLI writes a `can_use_tool` control request on stdout and
//! waits for the answer on stdin (`shared/reference/claude-code.md`; checked against the real
//! CLI in `tests/model_server.rs`). The session actor hands each question to [`Permissions`]
//! ([`PermissionEvent::Ask`]), which:
//!
//! 1. posts a card in the session's thread: the tool and a readable summary of its input
//!    ([`summarize`]), with **Allow once**, **Allow for this session** (the CLI's own
//!    `permission_suggestions`, answered as `updatedPermissions` with destination `session`,
//!    so nothing is written into the workspace) and **Deny**; every button carries an HMAC
//!    signature of (question id, action, expiry) like network cards;
//! 2. takes the first valid click of someone allowed to answer (the session's owner, its
//!    participants and the admins, [`Act::Talk`]): the decision is single-use (the question
//!    leaves the open set under a lock), replaces the buttons for everyone, and goes to the
//!    actor ([`PermissionSink::answer`]); after **Deny** the actor waits
//!    [`DENY_REASON_WAIT`] for a reply in the thread and passes it to the agent as the reason;
//! 3. denies a question nobody answered within `SM_PERMISSION_TIMEOUT_SECS` (the owner is
//!    mentioned once halfway), and closes the open questions of a session whose agent process
//!    ended ([`PermissionEvent::Closed`]): a new process never gets an answer meant for the
//!    old one.
//!
//! Open questions live in memory: they belong to one agent process, which a bot restart ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::access::{Act, Roles};
use crate::approval::signing;
use crate::chat::{
    ActionCard, CardClick, CardClickHandler, ChatOutbound, ClickError, ClickReply, PostRef,
};
use crate::session::short_id;
use crate::store::{now_ms, AuditEntry, Session, Store};

/// A session's permission mode: the CLI's `--permission-mode` values.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    strum::EnumString,
    strum::Display,
    strum::IntoStaticStr,
    serde::Serialize,
    serde::Deserialize,
)]
#[strum(ascii_case_insensitive)]
pub enum PermissionMode {
    /// The CLI asks before tools that change anything (edits included).
    #[strum(serialize = "default")]
    #[serde(rename = "default")]
    Default,
    /// Edits inside the container are allowed; commands and other tools ask.
    #[strum(serialize = "acceptEdits")]
    #[serde(rename = "acceptEdits")]
    AcceptEdits,
    /// The agent plans and changes nothing.
    #[strum(serialize = "plan")]
    #[serde(rename = "plan")]
    Plan,
    /// Nothing asks (the old `--dangerously-skip-permissions`).
    #[strum(serialize = "bypassPermissions")]
    #[serde(rename = "bypassPermissions")]
    BypassPermissions,
}

impl PermissionMode {
    /// The value for `--permission-mode` and `set_permission_mode`.
    pub fn as_cli(self) -> &'static str {
        self.into()
    }
}

/// The permission mode `session`'s agent runs with: `plan` for a reviewer, the mode `!mode`
/// chose, the mode of its profile, or `default` (the configured one).
pub fn mode_of(session: &Session, default: PermissionMode) -> PermissionMode {
    if session.kind == crate::store::SessionKind::Reviewer {
        return PermissionMode::Plan;
    }
    session
        .permission_mode
        .as_deref()
        .and_then(|m| m.parse().ok())
        .or_else(|| session.profile.as_ref().and_then(|p| p.permission_mode))
        .unwrap_or(default)
}

/// How long after **Deny** a reply in the thread is taken as the reason for the agent.
pub const DENY_REASON_WAIT: Duration = Duration::from_secs(120);

/// Card actions.
const ACTION_ALLOW: &str = "allowonce";
const ACTION_ALLOW_SESSION: &str = "allowsession";
const ACTION_DENY: &str = "deny";
/// The `kind` a permission card's context carries, so clicks reach [`Permissions`].
pub const CARD_KIND: &str = "tool";

/// A question from a session's agent: may it use this tool with this input?
#[derive(Debug, Clone)]
pub struct PermissionAsk {
    /// The session.
    pub session: Session,
    /// The CLI's control request id (answered with it).
    pub request_id: String,
    /// The tool, e.g. `Bash`.
    pub tool_name: String,
    /// The tool's input, as the CLI gave it.
    pub input: Value,
    /// The CLI's `permission_suggestions` (rules that would allow this use), or `null`.
    pub suggestions: Value,
}

/// What the session actor hands to [`Permissions`].
#[derive(Debug, Clone)]
pub enum PermissionEvent {
    /// A question to put to the thread.
    Ask(Box<PermissionAsk>),
    /// The agent process of this session ended (restart, clear, resume, stop): its open
    /// questions are closed.
    Closed {
        /// The session.
        session_id: String,
        /// Why, for the card.
        why: String,
    },
}

/// The answer for the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum PermissionAnswer {
    /// Allow, with the tool input and, for "this session", the rules to keep.
    Allow {
        /// The input the tool runs with (unchanged).
        input: Value,
        /// `updatedPermissions` (rules with destination `session`), when allowed for the
        /// session.
        rules: Option<Value>,
    },
    /// Deny with this reason.
    Deny {
        /// What the agent is told.
        message: String,
    },
    /// Denied by `by`: the next reply in the thread within `wait` is the reason; without one
    /// the agent is told who denied it.
    DenyAwaitingReason {
        /// Who denied it (display name).
        by: String,
        /// How long to wait for a reply.
        wait: Duration,
    },
}

impl PermissionAnswer {
    /// The `response` object of the control response (`behavior` allow or deny).
    pub fn response(&self) -> Value {
        match self {
            Self::Allow { input, rules } => {
                let mut response = json!({ "behavior": "allow", "updatedInput": input });
                if let Some(rules) = rules {
                    response["updatedPermissions"] = rules.clone();
                }
                response
            }
            Self::Deny { message } => json!({ "behavior": "deny", "message": message }),
            Self::DenyAwaitingReason { by, .. } => {
                json!({ "behavior": "deny", "message": format!("Denied by {by}.") })
            }
        }
    }
}

/// Where answers go: the session runtime (a recorder in tests).
#[async_trait]
pub trait PermissionSink: Send + Sync + 'static {
    /// Hands `answer` to the agent of `session_id` for its question `request_id`. A session
    /// that is not running drops it.
    async fn answer(&self, session_id: &str, request_id: &str, answer: PermissionAnswer);
}

/// Settings of [`Permissions`].
#[derive(Debug, Clone)]
pub struct PermissionConfig {
    /// `SM_CALLBACK_URL`: where clicks go.
    pub callback_url: String,
    /// `SM_CALLBACK_SECRET`: signs the buttons.
    pub secret: SecretString,
    /// `SM_PERMISSION_TIMEOUT_SECS`.
    pub timeout: Duration,
    /// Who may answer besides the owner and participants.
    pub roles: Roles,
}

/// An open question.
#[derive(Debug, Clone)]
struct Open {
    ask: PermissionAsk,
    card: Option<PostRef>,
    expires_at: i64,
}

/// The questions of every session, their cards and answers. Cheap to share (`Arc`).
pub struct Permissions {
    store: Store,
    chat: Arc<dyn ChatOutbound>,
    sink: Arc<dyn PermissionSink>,
    config: PermissionConfig,
    open: Mutex<HashMap<String, Open>>,
    tasks: TaskTracker,
}

impl Permissions {
    /// The permission flow over storage (audit, participants), chat and the session runtime.
    pub fn new(
        store: Store,
        chat: Arc<dyn ChatOutbound>,
        sink: Arc<dyn PermissionSink>,
        config: PermissionConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            chat,
            sink,
            config,
            open: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
        })
    }

    /// Handles `events` until they end or `cancel` fires, then waits for the timers and card
    /// updates it started (they stop at `cancel`).
    pub async fn run(
        self: Arc<Self>,
        mut events: mpsc::Receiver<PermissionEvent>,
        cancel: CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
            };
            match event {
                PermissionEvent::Ask(ask) => self.ask(*ask, &cancel).await,
                PermissionEvent::Closed { session_id, why } => {
                    self.close_session(&session_id, &why).await
                }
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Puts a question to the thread and starts its timer.
    async fn ask(self: &Arc<Self>, ask: PermissionAsk, cancel: &CancellationToken) {
        let id = format!("perm-{}", uuid::Uuid::new_v4().simple());
        let timeout_ms = i64::try_from(self.config.timeout.as_millis()).unwrap_or(i64::MAX / 4);
        let expires_at = now_ms() + timeout_ms;
        let card = self.card(&id, &ask, expires_at, None);
        let posted = self
            .chat
            .post_card(&ask.session.channel_id, &ask.session.thread_id, &card)
            .await;
        let card_post = match posted {
            Ok(post) => Some(post),
            Err(e) => {
                // Nobody can answer a card that is not there: deny at once, saying why.
                warn!(session = %ask.session.id, error = %e, "cannot post a permission card; denying");
                self.sink
                    .answer(
                        &ask.session.id,
                        &ask.request_id,
                        PermissionAnswer::Deny {
                            message: "The question could not be shown in the chat thread, so it was denied.".into(),
                        },
                    )
                    .await;
                return;
            }
        };
        info!(session = %ask.session.id, tool = %ask.tool_name, question = %id, "asked the thread for a tool permission");
        if let Ok(mut open) = self.open.lock() {
            open.insert(
                id.clone(),
                Open {
                    ask,
                    card: card_post,
                    expires_at,
                },
            );
        }
        let (me, cancel) = (Arc::clone(self), cancel.clone());
        let timeout = self.config.timeout;
        self.tasks.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(timeout / 2) => {}
            }
            me.remind(&id).await;
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(timeout - timeout / 2) => me.expire(&id).await,
            }
        });
    }

    /// Halfway: mentions the owner once when the question is still open.
    async fn remind(&self, id: &str) {
        let open = self.open.lock().ok().and_then(|o| o.get(id).cloned());
        let Some(open) = open else { return };
        let owner = match self.chat.resolve_user(&open.ask.session.started_by).await {
            Ok(user) => format!("@{}", user.username),
            Err(_) => "The session's owner".into(),
        };
        let text = format!(
            "{owner}: Claude is waiting for an answer to the permission question above (`{}`); without one it is denied in {} min.",
            open.ask.tool_name,
            (self.config.timeout / 2).as_secs().div_ceil(60)
        );
        if let Err(e) = self
            .chat
            .post(
                &open.ask.session.channel_id,
                Some(&open.ask.session.thread_id),
                &text,
            )
            .await
        {
            warn!(error = %e, "cannot remind the owner of a permission question");
        }
    }

    /// At the deadline: denies a question still open.
    async fn expire(&self, id: &str) {
        let Some(open) = self.take(id) else { return };
        let minutes = self.config.timeout.as_secs().div_ceil(60);
        self.finish(
            id,
            &open,
            &format!("⌛ Denied: nobody answered within {minutes} min."),
            None,
            "expired",
        )
        .await;
        self.sink
            .answer(
                &open.ask.session.id,
                &open.ask.request_id,
                PermissionAnswer::Deny {
                    message: format!("Nobody answered the permission question within {minutes} minutes, so it was denied."),
                },
            )
            .await;
    }

    /// Closes every open question of a session (its agent process ended).
    async fn close_session(&self, session_id: &str, why: &str) {
        let closed: Vec<(String, Open)> = match self.open.lock() {
            Ok(mut open) => {
                let ids: Vec<String> = open
                    .iter()
                    .filter(|(_, o)| o.ask.session.id == session_id)
                    .map(|(id, _)| id.clone())
                    .collect();
                ids.into_iter()
                    .filter_map(|id| open.remove(&id).map(|o| (id, o)))
                    .collect()
            }
            Err(_) => Vec::new(),
        };
        for (id, open) in closed {
            self.finish(&id, &open, &format!("🔒 Closed: {why}."), None, "closed")
                .await;
        }
    }

    /// Takes a question out of the open set: whoever gets it decides it (single use).
    fn take(&self, id: &str) -> Option<Open> {
        self.open.lock().ok()?.remove(id)
    }

    /// Replaces the card's buttons with `status` and audits the outcome (`by`: the deciding
    /// user's id and name).
    async fn finish(
        &self,
        id: &str,
        open: &Open,
        status: &str,
        by: Option<(&str, &str)>,
        outcome: &str,
    ) {
        if let Some(post) = &open.card {
            let card = self.card(id, &open.ask, open.expires_at, Some(status.to_owned()));
            if let Err(e) = self.chat.update_card(post, &card).await {
                warn!(error = %e, "cannot update a permission card");
            }
        }
        let entry = AuditEntry {
            at: now_ms(),
            session_id: Some(open.ask.session.id.clone()),
            thread_id: Some(open.ask.session.thread_id.clone()),
            domain: None,
            action: format!("tool_{outcome}"),
            user_id: by.map(|(id, _)| id.to_owned()),
            user_name: by.map(|(_, name)| name.to_owned()),
            outcome: "ok".into(),
            detail: Some(format!(
                "{}: {}",
                open.ask.tool_name,
                clip(&summarize(&open.ask.tool_name, &open.ask.input), 500)
            )),
        };
        if let Err(e) = self.store.append_audit(&entry).await {
            warn!(error = %e, "cannot audit a permission decision");
        }
    }

    /// The card for a question; `status` replaces the buttons once decided.
    fn card(
        &self,
        id: &str,
        ask: &PermissionAsk,
        expires_at: i64,
        status: Option<String>,
    ) -> ActionCard {
        let summary = summarize(&ask.tool_name, &ask.input);
        let rule = session_rule_label(&ask.suggestions);
        let mut text = format!(
            "Claude (session `{}`) wants to use **{}**:\n{summary}",
            short_id(&ask.session.id),
            ask.tool_name
        );
        let actions = match status {
            Some(status) => {
                text.push_str(&format!("\n\n{status}"));
                Vec::new()
            }
            None => {
                text.push_str("\n\nThe session's owner, the people they invited and admins may answer. After **Deny**, a reply in this thread tells Claude why.");
                let mut buttons = vec![(ACTION_ALLOW, "Allow once".to_owned(), "good")];
                if let Some(rule) = &rule {
                    buttons.push((
                        ACTION_ALLOW_SESSION,
                        format!("Allow {rule} for this session"),
                        "primary",
                    ));
                }
                buttons.push((ACTION_DENY, "Deny".to_owned(), "danger"));
                buttons
                    .into_iter()
                    .map(|(action, label, style)| {
                        signing::signed_action(
                            &self.config.secret,
                            CARD_KIND,
                            id,
                            action,
                            expires_at,
                            label,
                            style,
                        )
                    })
                    .collect()
            }
        };
        ActionCard {
            title: format!("🔐 Permission: {}", ask.tool_name),
            text,
            actions,
            callback_url: self.config.callback_url.clone(),
            color: Some("#1f6feb".into()),
        }
    }

    /// Whether `user_id` may answer questions of `session`: its owner, its participants and
    /// the admins.
    async fn may_answer(&self, user_id: &str, session: &Session) -> Result<bool, ClickError> {
        let participants = self.store.participants(&session.id).await.map_err(|e| {
            warn!(error = %e, "cannot read a session's participants");
            ClickError::Unavailable
        })?;
        Ok(self
            .config
            .roles
            .role(user_id, session, &participants)
            .may(Act::Talk))
    }

    async fn decide(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        let (id, action, _) = signing::verified_click(&self.config.secret, &click.context)
            .inspect_err(|e| {
                if *e == ClickError::Forbidden {
                    warn!(user = %click.user_id, "refused a permission click with a bad signature");
                }
            })?;
        if ![ACTION_ALLOW, ACTION_ALLOW_SESSION, ACTION_DENY].contains(&action) {
            return Err(ClickError::BadRequest(format!("unknown action {action:?}")));
        }
        let open = self.open.lock().ok().and_then(|o| o.get(id).cloned());
        let Some(open) = open else {
            return Ok(ClickReply::Notice(
                "This question is no longer open (answered, timed out, or Claude was restarted)."
                    .into(),
            ));
        };
        if !self.may_answer(&click.user_id, &open.ask.session).await? {
            return Ok(ClickReply::Notice(
                "Only the session's owner, the people they invited and admins may answer this."
                    .into(),
            ));
        }
        // Single use: the first valid click takes it.
        let Some(open) = self.take(id) else {
            return Ok(ClickReply::Notice(
                "This question was answered a moment ago.".into(),
            ));
        };
        let by = format!("@{}", click.user_name);
        let (answer, status, outcome) = match action {
            ACTION_ALLOW => (
                PermissionAnswer::Allow {
                    input: open.ask.input.clone(),
                    rules: None,
                },
                format!("✅ Allowed once by {by}."),
                "allowed_once",
            ),
            ACTION_ALLOW_SESSION => (
                PermissionAnswer::Allow {
                    input: open.ask.input.clone(),
                    rules: Some(session_rules(&open.ask.suggestions)),
                },
                format!(
                    "✅ Allowed {} for this session by {by}.",
                    session_rule_label(&open.ask.suggestions).unwrap_or_else(|| "this".into())
                ),
                "allowed_session",
            ),
            _ => (
                PermissionAnswer::DenyAwaitingReason {
                    by: by.clone(),
                    wait: DENY_REASON_WAIT,
                },
                format!(
                    "❌ Denied by {by}. A reply in this thread within {} min tells Claude why.",
                    DENY_REASON_WAIT.as_secs() / 60
                ),
                "denied",
            ),
        };
        self.finish(
            id,
            &open,
            &status,
            Some((&click.user_id, &click.user_name)),
            outcome,
        )
        .await;
        self.sink
            .answer(&open.ask.session.id, &open.ask.request_id, answer)
            .await;
        let card = self.card(id, &open.ask, open.expires_at, Some(status));
        Ok(ClickReply::ReplaceCard(card))
    }
}

#[async_trait]
impl CardClickHandler for Permissions {
    async fn on_click(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        self.decide(click).await
    }
}

/// Sends each click to the handler of its card's `kind` (permission cards: [`CARD_KIND`];
/// budget cards: [`crate::budget::CARD_KIND`]), and clicks of cards without a kind to `other`
/// (the network approvals).
pub struct ClickRouter {
    /// Network approval cards.
    pub other: Arc<dyn CardClickHandler>,
    /// The handler of each card kind.
    pub kinds: Vec<(&'static str, Arc<dyn CardClickHandler>)>,
}

#[async_trait]
impl CardClickHandler for ClickRouter {
    async fn on_click(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        let kind = click.context.get("kind").and_then(Value::as_str);
        match self.kinds.iter().find(|(k, _)| Some(*k) == kind) {
            Some((_, handler)) => handler.on_click(click).await,
            None => self.other.on_click(click).await,
        }
    }
}

/// The CLI's suggestions as rules kept for the session only (destination `session`), not in
/// the workspace's settings file the CLI proposes.
fn session_rules(suggestions: &Value) -> Value {
    let mut rules = suggestions.clone();
    if let Some(list) = rules.as_array_mut() {
        for rule in list.iter_mut().filter(|r| r.is_object()) {
            rule["destination"] = json!("session");
        }
        rules
    } else {
        json!([])
    }
}

/// A short label for what "for this session" would allow (`` `npm test:*` ``), or `None` when
/// the CLI suggests no rule (the button is then not offered).
fn session_rule_label(suggestions: &Value) -> Option<String> {
    let rules: Vec<String> = suggestions
        .as_array()?
        .iter()
        .filter(|s| s["behavior"] == "allow")
        .flat_map(|s| s["rules"].as_array().cloned().unwrap_or_default())
        .map(|rule| {
            let tool = rule["toolName"].as_str().unwrap_or("tool");
            match rule["ruleContent"].as_str() {
                Some(content) => format!("`{}`", clip(content, 80).replace('`', "'")),
                None => format!("every `{tool}` use"),
            }
        })
        .collect();
    if rules.is_empty() {
        None
    } else {
        Some(rules.join(", "))
    }
}

/// Longest part of a tool input shown on a card, in characters.
const SUMMARY_MAX: usize = 1500;

/// A readable summary of a tool's input for a card (Markdown): the command for `Bash`, the
/// path and a short diff for edits, the URL for fetches, the input as JSON otherwise.
pub fn summarize(tool: &str, input: &Value) -> String {
    let s = |k: &str| input.get(k).and_then(Value::as_str).unwrap_or_default();
    let fenced = |lang: &str, body: &str| {
        let body = clip(body, SUMMARY_MAX).replace("```", "ʼʼʼ");
        format!("```{lang}\n{body}\n```")
    };
    match tool {
        "Bash" => {
            let mut out = fenced("bash", s("command"));
            if !s("description").is_empty() {
                out.push_str(&format!("\n{}", clip(s("description"), 200)));
            }
            out
        }
        "Edit" | "MultiEdit" => {
            let mut diff = String::new();
            let mut edits: Vec<(&str, &str)> = Vec::new();
            if tool == "Edit" {
                edits.push((s("old_string"), s("new_string")));
            } else if let Some(list) = input.get("edits").and_then(Value::as_array) {
                for e in list {
                    edits.push((
                        e.get("old_string")
                            .and_then(Value::as_str)
                            .unwrap_or_default(),
                        e.get("new_string")
                            .and_then(Value::as_str)
                            .unwrap_or_default(),
                    ));
                }
            }
            for (old, new) in edits {
                for line in old.lines() {
                    diff.push_str(&format!("- {line}\n"));
                }
                for line in new.lines() {
                    diff.push_str(&format!("+ {line}\n"));
                }
            }
            format!("`{}`\n{}", s("file_path"), fenced("diff", diff.trim_end()))
        }
        "Write" => format!(
            "`{}` ({} lines)\n{}",
            s("file_path"),
            s("content").lines().count(),
            fenced("", s("content"))
        ),
        "WebFetch" => format!("<{}>", s("url")),
        "WebSearch" => format!("search: {}", clip(s("query"), 200)),
        _ => fenced(
            "json",
            &serde_json::to_string_pretty(input).unwrap_or_default(),
        ),
    }
}

/// `text` cut to `max` characters, with `…` when cut.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut out: String = text.chars().take(max).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_and_print_as_the_cli_names_them() {
        for (text, mode) in [
            ("default", PermissionMode::Default),
            ("acceptEdits", PermissionMode::AcceptEdits),
            ("acceptedits", PermissionMode::AcceptEdits),
            ("plan", PermissionMode::Plan),
            ("bypassPermissions", PermissionMode::BypassPermissions),
        ] {
            assert_eq!(text.parse::<PermissionMode>(), Ok(mode), "{text}");
        }
        assert_eq!(PermissionMode::AcceptEdits.as_cli(), "acceptEdits");
        assert_eq!(
            PermissionMode::BypassPermissions.to_string(),
            "bypassPermissions"
        );
        assert!("yolo".parse::<PermissionMode>().is_err());
    }

    #[test]
    fn answers_are_the_control_protocols_shapes() {
        let input = json!({"command": "ls"});
        assert_eq!(
            PermissionAnswer::Allow {
                input: input.clone(),
                rules: None
            }
            .response(),
            json!({"behavior": "allow", "updatedInput": {"command": "ls"}})
        );
        let rules = session_rules(
            &json!([{"type": "addRules", "behavior": "allow", "destination": "localSettings", "rules": [{"toolName": "Bash", "ruleContent": "ls"}]}]),
        );
        assert_eq!(
            rules[0]["destination"], "session",
            "never into the workspace"
        );
        let allow = PermissionAnswer::Allow {
            input,
            rules: Some(rules.clone()),
        }
        .response();
        assert_eq!(allow["updatedPermissions"], rules);
        assert_eq!(
            PermissionAnswer::Deny {
                message: "no".into()
            }
            .response(),
            json!({"behavior": "deny", "message": "no"})
        );
        assert_eq!(session_rules(&Value::Null), json!([]));
    }

    #[test]
    fn summaries_show_what_the_tool_would_do() {
        let bash = summarize(
            "Bash",
            &json!({"command": "rm -rf build", "description": "Clean"}),
        );
        assert!(bash.contains("```bash\nrm -rf build\n```"), "{bash}");
        assert!(bash.contains("Clean"));
        let edit = summarize(
            "Edit",
            &json!({"file_path": "/w/a.rs", "old_string": "let a = 1;", "new_string": "let a = 2;"}),
        );
        assert!(
            edit.contains("`/w/a.rs`")
                && edit.contains("- let a = 1;")
                && edit.contains("+ let a = 2;"),
            "{edit}"
        );
        assert_eq!(
            summarize("WebFetch", &json!({"url": "https://pypi.org/simple"})),
            "<https://pypi.org/simple>"
        );
        let other = summarize("Mystery", &json!({"x": "```"}));
        assert!(
            !other.contains("\"```\""),
            "a fence in the input cannot end the block: {other}"
        );
        let long = summarize("Bash", &json!({"command": "x".repeat(5000)}));
        assert!(long.chars().count() < 1600, "clipped");
        assert_eq!(
            session_rule_label(&json!([{"behavior": "allow", "rules": [{"toolName": "Bash", "ruleContent": "npm test:*"}]}])).as_deref(),
            Some("`npm test:*`")
        );
        assert_eq!(session_rule_label(&json!([])), None);
    }
}
