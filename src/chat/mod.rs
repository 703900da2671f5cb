//! Chat platforms behind one interface.
//!
//! Each platform adapter turns its wire format into [`ChatEvent`]s and implements
//! [`ChatOutbound`]; nothing past the adapter knows which platform it talks to.
//!
//! - [`mattermost`]: REST API v4 client, WebSocket listener and the adapter.
//! - [`progress`]: a progress post edited in place (start steps, ready or what failed).
//! - [`render`]: agent output as chat posts: splitting under the post limit with balanced code
//!   fences, coalescing streamed text into few edits, compact tool-use lines.
//! - [`stream`]: the task that streams agent turns into a thread with those rules.

pub mod mattermost;
pub mod progress;
pub mod render;
pub mod stream;

use std::time::Duration;

use async_trait::async_trait;

use crate::store::Platform;

/// Something a person wrote, as every platform delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl ChatError {
    /// Whether trying again later may succeed (rate limits, server errors, network).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::RateLimited { .. } | Self::Transport(_) => true,
            Self::Api { status, .. } => *status >= 500,
            Self::Decode(_) => false,
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

/// What the bot can do on a chat platform. Implemented once per platform.
#[async_trait]
pub trait ChatOutbound: Send + Sync + 'static {
    /// Which platform this is.
    fn platform(&self) -> Platform;

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
