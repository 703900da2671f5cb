//! One [`ChatOutbound`] over every platform the bot serves at once (Mattermost and Microsoft
//! Teams), for the parts of the bot that act on a session wherever it lives: the session
//! runtime (output, progress), approvals (cards) and the orchestrator.
//!
//! Calls that name a channel go to the platform that channel belongs to, told apart by the
//! shape of its id: every Teams conversation id contains a colon (`19:…@thread.tacv2`,
//! `a:…`, `19:…@thread.v2`; Bot Framework "Conversation" docs), a Mattermost id never does (26
//! lowercase base-32 characters, `model.NewId`). Posts are told apart the same way: a Teams
//! message id is a decimal timestamp, a Mattermost post id is not all digits. Calls that name
//! no channel (`ensure_project_channel`, `platform`, `bot_user_id`) go to the *primary*
//! platform (Mattermost when it is configured); code that starts sessions on a given platform
//! asks for that platform's adapter with [`ChatRouter::get`] instead.
//!
//! The web console ([`crate::console`]) is a platform too: its channel and post ids start with
//! `console.`, which neither Mattermost nor Teams ids ever do. It is the primary platform only
//! when no chat platform is configured (one-machine mode).

use std::sync::Arc;

use async_trait::async_trait;

use super::{ActionCard, ChannelRef, ChatError, ChatOutbound, ChatUser, PostRef};
use crate::leader::Gate;
use crate::store::Platform;

/// The platforms the bot serves. Cheap to clone.
#[derive(Clone)]
pub struct ChatRouter {
    /// Mattermost when configured, else Teams.
    primary: Arc<dyn ChatOutbound>,
    mattermost: Option<Arc<dyn ChatOutbound>>,
    teams: Option<Arc<dyn ChatOutbound>>,
    /// The web console, when it is on.
    console: Option<Arc<dyn ChatOutbound>>,
    /// Every call that changes something on a platform waits for it
    /// ([`ChatRouter::with_gate`]).
    gate: Gate,
}

impl std::fmt::Debug for ChatRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatRouter")
            .field("mattermost", &self.mattermost.is_some())
            .field("teams", &self.teams.is_some())
            .field("console", &self.console.is_some())
            .finish()
    }
}

impl ChatRouter {
    /// A router over the configured platforms; `None` when there is none.
    pub fn new(
        mattermost: Option<Arc<dyn ChatOutbound>>,
        teams: Option<Arc<dyn ChatOutbound>>,
    ) -> Option<Self> {
        Self::with_console(mattermost, teams, None)
    }

    /// A router over the configured platforms and the web console; the console is the
    /// primary platform only when there is no other. `None` when there is none at all.
    pub fn with_console(
        mattermost: Option<Arc<dyn ChatOutbound>>,
        teams: Option<Arc<dyn ChatOutbound>>,
        console: Option<Arc<dyn ChatOutbound>>,
    ) -> Option<Self> {
        let primary = mattermost
            .clone()
            .or_else(|| teams.clone())
            .or_else(|| console.clone())?;
        Some(Self {
            primary,
            mattermost,
            teams,
            console,
            gate: Gate::always_open(),
        })
    }

    /// The same router, whose calls that change something on a platform (posts, edits, cards,
    /// typing, channel members) first wait until this instance is active, and fail with
    /// [`ChatError::NotActive`] on a standby. Reads (`resolve_user`, `permalink`) do not wait.
    #[must_use]
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    /// Waits for the gate.
    async fn acting(&self) -> Result<(), ChatError> {
        self.gate.opened().await.map_err(|_| ChatError::NotActive)
    }

    /// The adapter of `platform`, or the primary one when that platform is not served (a
    /// session recorded under a platform since removed from the configuration).
    pub fn get(&self, platform: Platform) -> Arc<dyn ChatOutbound> {
        let wanted = match platform {
            Platform::Mattermost => &self.mattermost,
            Platform::Teams => &self.teams,
            Platform::Console => &self.console,
        };
        wanted.clone().unwrap_or_else(|| self.primary())
    }

    /// Mattermost when configured, else Teams.
    fn primary(&self) -> Arc<dyn ChatOutbound> {
        Arc::clone(&self.primary)
    }

    /// The adapter a channel (or chat) id belongs to.
    fn for_channel(&self, channel_id: &str) -> Arc<dyn ChatOutbound> {
        self.get(if channel_id.starts_with(crate::console::ID_PREFIX) {
            Platform::Console
        } else if channel_id.contains(':') {
            Platform::Teams
        } else {
            Platform::Mattermost
        })
    }

    /// The adapter a post id belongs to.
    fn for_post(&self, post_id: &str) -> Arc<dyn ChatOutbound> {
        self.get(if post_id.starts_with(crate::console::ID_PREFIX) {
            Platform::Console
        } else if !post_id.is_empty() && post_id.bytes().all(|b| b.is_ascii_digit()) {
            Platform::Teams
        } else {
            Platform::Mattermost
        })
    }
}

#[async_trait]
impl ChatOutbound for ChatRouter {
    fn platform(&self) -> Platform {
        self.primary().platform()
    }

    /// The smallest limit of the platforms served, so a split post fits wherever it goes.
    fn max_post_chars(&self) -> usize {
        [&self.mattermost, &self.teams, &self.console]
            .into_iter()
            .flatten()
            .map(|a| a.max_post_chars())
            .min()
            .unwrap_or(usize::MAX)
    }

    fn bot_user_id(&self) -> &str {
        self.primary.bot_user_id()
    }

    async fn post(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        text: &str,
    ) -> Result<PostRef, ChatError> {
        self.acting().await?;
        self.for_channel(channel_id)
            .post(channel_id, root_id, text)
            .await
    }

    async fn post_ephemeral(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        user_id: &str,
        text: &str,
    ) -> Result<(), ChatError> {
        self.acting().await?;
        self.for_channel(channel_id)
            .post_ephemeral(channel_id, root_id, user_id, text)
            .await
    }

    async fn add_channel_members(&self, channel_id: &str, users: &[&str]) -> Result<(), ChatError> {
        self.acting().await?;
        self.for_channel(channel_id)
            .add_channel_members(channel_id, users)
            .await
    }

    async fn update(&self, post: &PostRef, text: &str) -> Result<(), ChatError> {
        self.acting().await?;
        self.for_channel(&post.channel_id).update(post, text).await
    }

    async fn post_card(
        &self,
        channel_id: &str,
        root_id: &str,
        card: &ActionCard,
    ) -> Result<PostRef, ChatError> {
        self.acting().await?;
        self.for_channel(channel_id)
            .post_card(channel_id, root_id, card)
            .await
    }

    async fn update_card(&self, post: &PostRef, card: &ActionCard) -> Result<(), ChatError> {
        self.acting().await?;
        self.for_channel(&post.channel_id)
            .update_card(post, card)
            .await
    }

    async fn typing(&self, channel_id: &str, root_id: Option<&str>) -> Result<(), ChatError> {
        self.acting().await?;
        self.for_channel(channel_id)
            .typing(channel_id, root_id)
            .await
    }

    async fn ensure_project_channel(
        &self,
        repo_slug: &str,
        members: &[&str],
    ) -> Result<ChannelRef, ChatError> {
        self.acting().await?;
        self.primary()
            .ensure_project_channel(repo_slug, members)
            .await
    }

    async fn follow_thread(&self, user_id: &str, root: &PostRef) -> Result<(), ChatError> {
        self.acting().await?;
        self.for_channel(&root.channel_id)
            .follow_thread(user_id, root)
            .await
    }

    fn permalink(&self, post_id: &str) -> String {
        self.for_post(post_id).permalink(post_id)
    }

    /// Asks each platform in turn (Mattermost first); the first that knows the user answers.
    async fn resolve_user(&self, id_or_username: &str) -> Result<ChatUser, ChatError> {
        let mut last = None;
        for adapter in [&self.mattermost, &self.teams, &self.console]
            .into_iter()
            .flatten()
        {
            match adapter.resolve_user(id_or_username).await {
                Ok(user) => return Ok(user),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ChatError::Transport("no chat platform is configured".into())))
    }
}
