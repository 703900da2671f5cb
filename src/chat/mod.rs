//! Chat platforms behind one interface.
//!
//! Each platform adapter turns its wire format into [`ChatEvent`]s and implements
//! [`ChatOutbound`]; nothing past the adapter knows which platform it talks to.
//!
//! - [`mattermost`]: REST API v4 client, WebSocket listener and the adapter.
//! - [`teams`]: Microsoft Teams through the Bot Framework: the verified messaging endpoint,
//!   the Connector client with pacing, Adaptive Cards, and the adapter.
//! - [`progress`]: a progress post edited in place (start steps, ready or what failed).
//! - [`render`]: agent output as chat posts: splitting under the post limit with balanced code
//!   fences, coalescing streamed text into few edits, compact tool-use lines.
//! - [`stream`]: the task that streams agent turns into a thread with those rules.

pub mod mattermost;
pub mod progress;
pub mod render;
pub mod router;
pub mod stream;
pub mod teams;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::store::Platform;

/// Something a person wrote, as every platform delivers it. Serialized (JSON) as the record
/// kept until it is handled ([`crate::store::Store::record_inbound`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InboundMessage {
    /// Platform it came from.
    pub platform: Platform,
    /// Channel.
    pub channel_id: String,
    /// The message's own id (unique per platform; used to handle it at most once).
    pub post_id: String,
    /// The thread anchor when the message is a reply; `None` for a top-level message.
    pub root_id: Option<String>,
    /// Author's user id (authorisation is by id, never by name).
    pub user_id: String,
    /// Author's username, for display only.
    pub user_name: Option<String>,
    /// The text as written.
    pub text: String,
    /// Creation time (Unix ms).
    pub created_at: i64,
}

impl InboundMessage {
    /// The thread this message belongs to: its root, or itself when it is top-level.
    pub fn thread_id(&self) -> &str {
        self.root_id.as_deref().unwrap_or(&self.post_id)
    }

    /// Records the message for handling ([`crate::store::Store::record_inbound`]): `true`
    /// the first time, `false` when it was recorded before (a replay or catch-up).
    ///
    /// # Errors
    /// [`crate::store::StoreError`].
    pub async fn record(&self, store: &crate::store::Store) -> crate::store::StoreResult<bool> {
        let payload = serde_json::to_string(self).unwrap_or_default();
        store
            .record_inbound(
                self.platform,
                &self.post_id,
                &self.channel_id,
                self.created_at,
                &payload,
            )
            .await
    }
}

/// An inbound event from a chat platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEvent {
    /// A message in a channel the bot can see.
    Message(InboundMessage),
}

/// Where a post the bot made lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PostRef {
    /// Channel.
    pub channel_id: String,
    /// The post.
    pub post_id: String,
    /// Its thread anchor, `None` when the post is itself a root post.
    pub root_id: Option<String>,
}

impl PostRef {
    /// The thread the post is in (its root, or itself).
    pub fn thread_id(&self) -> &str {
        self.root_id.as_deref().unwrap_or(&self.post_id)
    }
}

/// A chat user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatUser {
    /// Stable id.
    pub id: String,
    /// Current username (may change; never authorise by it).
    pub username: String,
}

/// A channel that serves one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRef {
    /// Team (Mattermost team id, Teams team id) the channel belongs to.
    pub team_id: String,
    /// Channel id.
    pub channel_id: String,
    /// Channel name (URL slug).
    pub name: String,
    /// Whether it was created now (rather than found).
    pub created: bool,
}

/// Errors from a chat platform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The platform asked us to slow down.
    #[error("rate limited by the chat server; retry in {retry_after:?}")]
    RateLimited {
        /// How long it asked us to wait.
        retry_after: Duration,
    },
    /// The platform refused the request; its own error id and message.
    #[error("chat server answered {status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The platform's error id (Mattermost `id`, Bot Framework `code`).
        code: String,
        /// The platform's message.
        message: String,
    },
    /// The platform could not be reached or the connection broke.
    #[error("cannot reach the chat server: {0}")]
    Transport(String),
    /// The platform answered something we could not read.
    #[error("unexpected answer from the chat server: {0}")]
    Decode(String),
    /// The bot's own records (which channel belongs to which repository) could not be read.
    #[error("cannot read the bot's records: {0}")]
    Storage(String),
    /// This instance is not the active one any more (see [`crate::leader`]): it must not
    /// change anything on the platform.
    #[error("this instance is not the active one")]
    NotActive,
}

impl ChatError {
    /// Whether trying again later may succeed (rate limits, server errors, network).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::RateLimited { .. } | Self::Transport(_) | Self::Storage(_) => true,
            Self::Api { status, .. } => *status >= 500,
            Self::Decode(_) | Self::NotActive => false,
        }
    }

    /// The HTTP status, when the platform answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::RateLimited { .. } => Some(429),
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A card with buttons (an approval request, for example). Platform-neutral: Mattermost
/// renders it as a message attachment with actions, Teams as an Adaptive Card.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionCard {
    /// Title line.
    pub title: String,
    /// Body text (Markdown).
    pub text: String,
    /// The buttons; none once decided.
    pub actions: Vec<CardAction>,
    /// Where clicks are sent (`SM_CALLBACK_URL`).
    pub callback_url: String,
    /// Accent colour, e.g. `#FF8000`.
    pub color: Option<String>,
}

/// One button of an [`ActionCard`].
#[derive(Debug, Clone, PartialEq)]
pub struct CardAction {
    /// Action id: letters and digits only (older Mattermost servers route only those).
    pub id: String,
    /// Label.
    pub label: String,
    /// `good`, `danger`, `primary` or `default`.
    pub style: String,
    /// Data sent back with the click (signed by the caller); never shown to users.
    pub context: serde_json::Map<String, serde_json::Value>,
}

/// A click on a card's button, as every platform delivers it (Mattermost's interactive
/// message callback, a Teams `Action.Execute`/`Action.Submit`). The adapter that received it
/// parsed it; nothing here is trusted but what the signature in `context` covers.
#[derive(Debug, Clone, PartialEq)]
pub struct CardClick {
    /// Platform it came from.
    pub platform: Platform,
    /// Clicking user's id (a claim of the chat server).
    pub user_id: String,
    /// Clicking user's name, for display.
    pub user_name: String,
    /// The post (message) holding the card.
    pub post_id: String,
    /// The button's context, as the bot put it on the card ([`CardAction::context`]).
    pub context: serde_json::Map<String, serde_json::Value>,
}

/// How the platform should answer the clicking user.
#[derive(Debug, Clone, PartialEq)]
pub enum ClickReply {
    /// A short notice only the clicking user sees; the card stays as it is.
    Notice(String),
    /// The card is replaced for everyone (e.g. without its buttons once decided).
    ReplaceCard(ActionCard),
}

/// Why a click was not taken. Adapters answer these with the matching HTTP status and a short
/// message that carries no internals.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClickError {
    /// The click does not carry what the bot's cards carry (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// The signature does not match (HTTP 403).
    #[error("invalid signature")]
    Forbidden,
    /// The request the card is about does not exist (HTTP 404).
    #[error("unknown request")]
    NotFound,
    /// Storage or the flow behind the card is not available right now (HTTP 503).
    #[error("not available right now; try again")]
    Unavailable,
}

/// Decides card clicks. The approval flow implements it; adapters call it with the clicks
/// they parsed and render its answer in their platform's form.
#[async_trait]
pub trait CardClickHandler: Send + Sync + 'static {
    /// Handles one click: verifies, records and answers at once; any slow work (firewall,
    /// telling the agent, updating other copies of the card) happens elsewhere.
    ///
    /// # Errors
    /// [`ClickError`].
    async fn on_click(&self, click: CardClick) -> Result<ClickReply, ClickError>;
}

/// Where adapters find the click handler. Empty until this instance is active and the flow
/// behind the cards runs, and again after it stood down (adapters answer 503 meanwhile).
/// Cheap to clone.
#[derive(Clone, Default)]
pub struct ClickHandlers(Arc<std::sync::RwLock<Option<Arc<dyn CardClickHandler>>>>);

impl ClickHandlers {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs the handler, replacing the one before.
    pub fn set(&self, handler: Arc<dyn CardClickHandler>) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(handler);
        }
    }

    /// Removes the handler (this instance stopped acting).
    pub fn clear(&self) {
        if let Ok(mut slot) = self.0.write() {
            *slot = None;
        }
    }

    /// The handler, while one is installed.
    pub fn get(&self) -> Option<Arc<dyn CardClickHandler>> {
        self.0.read().ok()?.clone()
    }
}

/// A click handler that answers [`ClickError::Unavailable`] while this instance may not act
/// (suspended or standby, see [`crate::leader::Gate`]), and passes clicks on otherwise.
pub struct GatedClicks {
    inner: Arc<dyn CardClickHandler>,
    gate: crate::leader::Gate,
}

impl GatedClicks {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn CardClickHandler>, gate: crate::leader::Gate) -> Self {
        Self { inner, gate }
    }
}

#[async_trait]
impl CardClickHandler for GatedClicks {
    async fn on_click(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        if !self.gate.is_open() {
            return Err(ClickError::Unavailable);
        }
        self.inner.on_click(click).await
    }
}

impl std::fmt::Debug for ClickHandlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHandlers")
            .field("installed", &self.get().is_some())
            .finish()
    }
}

/// A transport error with its causes ("error sending request: client error (Connect): dns
/// error: failed to lookup address information: …"): reqwest's own message alone drops them.
/// The URL is left out (the caller knows it, and a query could carry a token).
pub(crate) fn transport_cause(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// What the bot can do on a chat platform. Implemented once per platform.
#[async_trait]
pub trait ChatOutbound: Send + Sync + 'static {
    /// Which platform this is.
    fn platform(&self) -> Platform;

    /// The longest post the platform accepts, in Unicode scalar values (what the renderer
    /// splits streamed output under).
    fn max_post_chars(&self) -> usize;

    /// The bot's own user id on the platform.
    fn bot_user_id(&self) -> &str;

    /// Posts `text` (Markdown) in `channel_id`, as a reply in `root_id`'s thread when given.
    ///
    /// # Errors
    /// [`ChatError`] after the client's own retries.
    async fn post(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        text: &str,
    ) -> Result<PostRef, ChatError>;

    /// Posts `text` in `channel_id` (in `root_id`'s thread when given) so that only `user_id`
    /// sees it (a refusal, a notice). Where the platform cannot, the text is posted for
    /// everyone with the user named.
    ///
    /// # Errors
    /// [`ChatError`] after the client's own retries.
    async fn post_ephemeral(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        user_id: &str,
        text: &str,
    ) -> Result<(), ChatError>;

    /// Adds users to a channel (a participant invited into a session of a private project
    /// channel).
    ///
    /// # Errors
    /// [`ChatError`].
    async fn add_channel_members(&self, channel_id: &str, users: &[&str]) -> Result<(), ChatError>;

    /// Replaces the text of a post the bot made.
    ///
    /// # Errors
    /// [`ChatError`] after the client's own retries.
    async fn update(&self, post: &PostRef, text: &str) -> Result<(), ChatError>;

    /// Posts a card with buttons as its own reply in `root_id`'s thread (never a post that is
    /// later streamed into: edits would break the buttons).
    ///
    /// # Errors
    /// [`ChatError`] after the client's own retries.
    async fn post_card(
        &self,
        channel_id: &str,
        root_id: &str,
        card: &ActionCard,
    ) -> Result<PostRef, ChatError>;

    /// Replaces a card (e.g. without its buttons once decided).
    ///
    /// # Errors
    /// [`ChatError`] after the client's own retries.
    async fn update_card(&self, post: &PostRef, card: &ActionCard) -> Result<(), ChatError>;

    /// Shows the typing indicator in a channel or thread for a few seconds.
    ///
    /// # Errors
    /// [`ChatError`].
    async fn typing(&self, channel_id: &str, root_id: Option<&str>) -> Result<(), ChatError>;

    /// Finds or creates the channel that serves `repo_slug` (`org/repo`), makes sure the bot
    /// and `members` are in it, and files it under the configured sidebar category for them.
    /// The channel is found through storage, never adopted by name alone: a name taken by
    /// another repository's channel, or by one the bot did not make, gets a distinct name. A
    /// new channel is private unless `SM_PROJECT_CHANNEL_PRIVACY=public`.
    ///
    /// # Errors
    /// [`ChatError`].
    async fn ensure_project_channel(
        &self,
        repo_slug: &str,
        members: &[&str],
    ) -> Result<ChannelRef, ChatError>;

    /// Makes `user_id` follow the thread anchored at `root`.
    ///
    /// # Errors
    /// [`ChatError`].
    async fn follow_thread(&self, user_id: &str, root: &PostRef) -> Result<(), ChatError>;

    /// A link to a post that opens it in the chat client.
    fn permalink(&self, post_id: &str) -> String;

    /// Looks a user up by id or username.
    ///
    /// # Errors
    /// [`ChatError`] (`Api` with status 404 when there is no such user).
    async fn resolve_user(&self, id_or_username: &str) -> Result<ChatUser, ChatError>;
}
