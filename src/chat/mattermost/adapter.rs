//! The Mattermost adapter: Mattermost events in, platform-neutral [`ChatEvent`]s out, and
//! [`ChatOutbound`] implemented on the REST client.
//!
//! Inbound, every `posted` event and every post found by a catch-up goes through one path:
//! the bot's own posts, system posts and deleted posts are skipped, and each post is recorded in
//! storage with its content ([`Store::record_inbound`]) before it is delivered, so it is handled
//! once whether it arrived live, replayed on resume, or fetched after a reconnect, and a post
//! not yet handled when the bot stops is handled after it comes back (the dispatcher marks it
//! handled).
//!
//! A catch-up (after a connection that did not resume, and at start) fetches, for every channel
//! the bot serves (project channels and channels with active sessions), the posts created since
//! the newest one taken there, and delivers them oldest first before any newer live event.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use url::Url;

use super::model::{CreatePost, PatchPost, Post, SidebarCategory, User};
use super::rest::{MattermostClient, RetryPolicy};
use super::websocket::{self, WsNotice, WsSettings};
use super::MAX_POST_CHARS;
use crate::chat::render::split_message;
use crate::chat::{
    ActionCard, ChannelRef, ChatError, ChatEvent, ChatOutbound, ChatUser, InboundMessage, PostRef,
};
use crate::config::ChannelPrivacy;
use crate::health::{ComponentStatus, HealthRegistry};
use crate::store::{now_ms, Platform, Store};

/// Posts created this long before a channel's cursor are fetched again on catch-up (and
/// de-duplicated), to cover clock skew and posts sharing a millisecond.
const CATCH_UP_OVERLAP_MS: i64 = 5_000;
/// `GET …/posts?since` returns at most this many posts; a full page means "ask again".
const SINCE_PAGE_LIMIT: usize = 1000;
/// Bounds the pages fetched per channel in one catch-up.
const MAX_CATCH_UP_PAGES: usize = 50;

/// What the adapter needs to know.
#[derive(Debug, Clone)]
pub struct MattermostConfig {
    /// Server base URL.
    pub url: Url,
    /// Bot token.
    pub token: SecretString,
    /// Team the bot serves.
    pub team_id: String,
    /// Sidebar category for project channels.
    pub channel_category: String,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Retry policy for REST calls.
    pub retry: RetryPolicy,
    /// WebSocket timing.
    pub websocket: WsSettings,
    /// `SM_PROJECT_CHANNEL_PRIVACY`: the type of the project channels the bot creates.
    pub channel_privacy: ChannelPrivacy,
}

/// The adapter. Share it in an [`Arc`].
#[derive(Debug)]
pub struct MattermostAdapter {
    client: MattermostClient,
    bot: User,
    config: MattermostConfig,
    store: Store,
    started_at: i64,
    /// Set once the server refused an ephemeral post (logged once, then the fallback is used
    /// quietly).
    no_ephemeral: std::sync::atomic::AtomicBool,
}

impl MattermostAdapter {
    /// Connects the REST client and learns who the bot is (`GET /users/me`).
    ///
    /// # Errors
    /// [`ChatError`] when the server cannot be reached or refuses the token.
    pub async fn connect(config: MattermostConfig, store: Store) -> Result<Self, ChatError> {
        let client = MattermostClient::new(
            &config.url,
            &config.token,
            config.request_timeout,
            config.retry,
        )?;
        // The caller retries connecting; one attempt here reports an outage at once.
        let bot = client.with_retry(RetryPolicy::NONE).me().await?;
        info!(bot = %bot.username, id = %bot.id, "connected to Mattermost");
        Ok(Self {
            client,
            bot,
            config,
            store,
            started_at: now_ms(),
            no_ephemeral: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The REST client.
    pub fn client(&self) -> &MattermostClient {
        &self.client
    }

    /// Listens until `cancel` fires, delivering every new post in the channels the bot is in
    /// to `events` (waiting when the consumer is busy). Reports the connection in `health`
    /// as component `mattermost`.
    pub async fn run(
        self: Arc<Self>,
        events: mpsc::Sender<ChatEvent>,
        health: HealthRegistry,
        cancel: CancellationToken,
    ) {
        let (tx, mut rx) = mpsc::channel(256);
        let listener = tokio::spawn(websocket::run(
            self.client.clone(),
            self.config.websocket,
            tx,
            cancel.clone(),
        ));
        health.register("mattermost");
        while let Some(notice) = tokio::select! {
            () = cancel.cancelled() => None,
            notice = rx.recv() => notice,
        } {
            match notice {
                WsNotice::Connected {
                    resumed,
                    connection_id,
                } => {
                    health.report(
                        "mattermost",
                        ComponentStatus::Up,
                        Some(format!("WebSocket connected ({connection_id})")),
                    );
                    if !resumed && !self.catch_up(&events, &cancel).await {
                        break;
                    }
                }
                WsNotice::Disconnected { reason } => {
                    health.report("mattermost", ComponentStatus::Down, Some(reason));
                }
                WsNotice::Event(event) if event.event == "posted" => match event.post() {
                    Ok(post) => {
                        if !self
                            .deliver(post, event.data_str("sender_name"), &events, &cancel)
                            .await
                        {
                            break;
                        }
                    }
                    Err(e) => warn!(error = %e, "ignoring a posted event without a readable post"),
                },
                WsNotice::Event(_) => {}
            }
        }
        listener.abort();
        let _ = listener.await;
    }

    /// Fetches what was posted while the bot was not listening. Returns `false` when the
    /// adapter must stop.
    async fn catch_up(&self, events: &mpsc::Sender<ChatEvent>, cancel: &CancellationToken) -> bool {
        let channels = match self.served_channels().await {
            Ok(channels) => channels,
            Err(e) => {
                warn!(error = %e, "cannot list the channels to catch up on");
                return true;
            }
        };
        for channel in channels {
            let cursor = match self
                .store
                .inbound_cursor(Platform::Mattermost, &channel)
                .await
            {
                Ok(cursor) => cursor,
                Err(e) => {
                    warn!(error = %e, %channel, "cannot read the catch-up cursor");
                    continue;
                }
            };
            let floor = cursor.unwrap_or(self.started_at) - CATCH_UP_OVERLAP_MS;
            let mut since = floor;
            let mut delivered = 0usize;
            for _ in 0..MAX_CATCH_UP_PAGES {
                let page = match self.client.posts_since(&channel, since).await {
                    Ok(page) => page.into_chronological(),
                    Err(e) => {
                        warn!(error = %e, %channel, "catch-up failed for this channel");
                        break;
                    }
                };
                let full = page.len() >= SINCE_PAGE_LIMIT;
                let newest_update = page.iter().map(|p| p.update_at).max();
                for post in page.into_iter().filter(|p| p.create_at >= floor) {
                    if !self.deliver(post, None, events, cancel).await {
                        return false;
                    }
                    delivered += 1;
                }
                match newest_update {
                    Some(newest) if full && newest > since => since = newest,
                    _ => break,
                }
            }
            if delivered > 0 {
                info!(%channel, delivered, "caught up on posts made while disconnected");
            }
        }
        true
    }

    /// Channels whose posts matter after downtime: project channels and channels of active
    /// sessions.
    async fn served_channels(&self) -> Result<Vec<String>, crate::store::StoreError> {
        let mut channels: Vec<String> = self
            .store
            .project_channels(Platform::Mattermost)
            .await?
            .into_iter()
            .map(|c| c.channel_id)
            .collect();
        for session in self.store.active_sessions().await? {
            if session.platform == Platform::Mattermost {
                channels.push(session.channel_id);
            }
        }
        channels.sort();
        channels.dedup();
        Ok(channels)
    }

    /// Claims and forwards one post. Returns `false` when the adapter must stop.
    async fn deliver(
        &self,
        post: Post,
        sender_name: Option<&str>,
        events: &mpsc::Sender<ChatEvent>,
        cancel: &CancellationToken,
    ) -> bool {
        if post.user_id == self.bot.id || !post.post_type.is_empty() || post.delete_at != 0 {
            return true;
        }
        let message = InboundMessage {
            platform: Platform::Mattermost,
            channel_id: post.channel_id.clone(),
            root_id: post.root().map(str::to_owned),
            user_id: post.user_id.clone(),
            user_name: sender_name.map(|n| n.trim_start_matches('@').to_owned()),
            text: post.message,
            created_at: post.create_at,
            post_id: post.id,
        };
        // Storage must answer before the post can be taken (it is recorded, so it is handled
        // after a crash too); keep trying rather than drop it.
        let mut delay = Duration::from_millis(200);
        let recorded = loop {
            match message.record(&self.store).await {
                Ok(recorded) => break recorded,
                Err(e) => {
                    warn!(error = %e, post = %message.post_id, "cannot record an inbound post; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return false,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        if !recorded {
            return true;
        }
        metrics::counter!(crate::telemetry::names::CHAT_POSTS_RECEIVED_TOTAL, "platform" => "mattermost").increment(1);
        events.send(ChatEvent::Message(message)).await.is_ok()
    }

    /// Adds `channel_id` to the `SM_CHANNEL_CATEGORY` custom category of `user_id`, creating
    /// the category when the user has none.
    async fn file_under_category(&self, user_id: &str, channel_id: &str) -> Result<(), ChatError> {
        let team = &self.config.team_id;
        let wanted = &self.config.channel_category;
        let categories = self.client.sidebar_categories(user_id, team).await?;
        let existing = categories
            .categories
            .into_iter()
            .find(|c| c.category_type == "custom" && &c.display_name == wanted);
        match existing {
            Some(category) if category.channel_ids.iter().any(|c| c == channel_id) => Ok(()),
            Some(mut category) => {
                category.channel_ids.push(channel_id.to_owned());
                self.client
                    .update_sidebar_category(&category)
                    .await
                    .map(|_| ())
            }
            None => {
                let category = SidebarCategory {
                    id: String::new(),
                    user_id: user_id.to_owned(),
                    team_id: team.clone(),
                    category_type: "custom".into(),
                    display_name: wanted.clone(),
                    channel_ids: vec![channel_id.to_owned()],
                    extra: serde_json::Map::new(),
                };
                self.client
                    .create_sidebar_category(&category)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Finds the channel for `repo_slug` through storage, or creates one. A channel is never
    /// adopted by its name alone: when the name is taken (by another repository's channel
    /// whose name folds to the same, or by a channel the bot did not make), the new channel
    /// gets the name with a short suffix derived from `repo_slug`.
    async fn find_or_create_channel(&self, repo_slug: &str) -> Result<ChannelRef, ChatError> {
        let known = self
            .store
            .project_channel(Platform::Mattermost, repo_slug)
            .await
            .map_err(|e| ChatError::Storage(e.to_string()))?;
        if let Some(known) = known {
            if let Some(channel) = self.client.channel(&known.channel_id).await? {
                if channel.delete_at == 0 {
                    return Ok(ChannelRef {
                        team_id: self.config.team_id.clone(),
                        channel_id: channel.id,
                        name: channel.name,
                        created: false,
                    });
                }
            }
        }
        let private = self.config.channel_privacy == ChannelPrivacy::Private;
        for name in channel_names(repo_slug) {
            if self
                .client
                .channel_by_name(&self.config.team_id, &name)
                .await?
                .is_some()
            {
                continue; // someone else's (or another repository's): never adopted
            }
            match self
                .client
                .create_channel(
                    &self.config.team_id,
                    &name,
                    &display_name(repo_slug),
                    private,
                )
                .await
            {
                Ok(channel) => {
                    return Ok(ChannelRef {
                        team_id: self.config.team_id.clone(),
                        channel_id: channel.id,
                        name: channel.name,
                        created: true,
                    })
                }
                // Taken at the same moment: try the next name.
                Err(ChatError::Api {
                    status: 400,
                    ref code,
                    ..
                }) if code.contains("exists") => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ChatError::Decode(format!(
            "no free channel name for {repo_slug}"
        )))
    }
}

/// The names tried for `repo_slug`'s channel, in order: [`channel_name`], then that name with
/// a suffix from a hash of the slug (`-1a2b3c`), then with a counter too; each within
/// Mattermost's 64 characters.
pub fn channel_names(repo_slug: &str) -> Vec<String> {
    use sha2::Digest as _;
    let base = channel_name(repo_slug);
    let hash = hex::encode(sha2::Sha256::digest(repo_slug.as_bytes()));
    let mut names = vec![base.clone()];
    for n in 0..5 {
        let suffix = if n == 0 {
            format!("-{}", &hash[..6])
        } else {
            format!("-{}{n}", &hash[..6])
        };
        let keep = 64 - suffix.len();
        let head: String = base.chars().take(keep).collect();
        names.push(format!("{}{suffix}", head.trim_end_matches('-')));
    }
    names
}

#[async_trait]
impl ChatOutbound for MattermostAdapter {
    fn platform(&self) -> Platform {
        Platform::Mattermost
    }

    fn max_post_chars(&self) -> usize {
        MAX_POST_CHARS
    }

    fn bot_user_id(&self) -> &str {
        &self.bot.id
    }

    /// Text longer than a post is split (fences balanced) into a first post and continuation
    /// replies in the same thread; the first post is returned.
    async fn post(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        text: &str,
    ) -> Result<PostRef, ChatError> {
        let mut parts = split_message(text, MAX_POST_CHARS)
            .into_iter()
            .filter(|p| !p.trim().is_empty())
            .collect::<Vec<_>>();
        if parts.is_empty() {
            parts.push(if text.is_empty() {
                "\u{200b}".to_owned()
            } else {
                text.to_owned()
            });
        }
        let mut first: Option<PostRef> = None;
        for part in &parts {
            let root = first
                .as_ref()
                .map(|f| f.thread_id().to_owned())
                .or(root_id.map(str::to_owned));
            let created = self
                .client
                .create_post(&CreatePost {
                    channel_id,
                    message: part,
                    root_id: root.as_deref(),
                    props: None,
                })
                .await?;
            first.get_or_insert(PostRef {
                channel_id: created.channel_id.clone(),
                root_id: created.root().map(str::to_owned),
                post_id: created.id,
            });
        }
        first.ok_or_else(|| ChatError::Decode("nothing was posted".into()))
    }

    /// Mattermost's ephemeral post (`POST /posts/ephemeral`). Without the bot's
    /// `create_post_ephemeral` permission, the text goes to the thread for everyone, naming the
    /// user (and a warning says what to grant).
    async fn post_ephemeral(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        user_id: &str,
        text: &str,
    ) -> Result<(), ChatError> {
        let post = CreatePost {
            channel_id,
            message: text,
            root_id,
            props: None,
        };
        match self.client.create_ephemeral_post(user_id, &post).await {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(403) => {
                if !self
                    .no_ephemeral
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    warn!("the bot may not post ephemeral messages (grant its account the create_post_ephemeral permission, see the runbook); notices go into the thread, naming their reader");
                }
                let name = self
                    .resolve_user(user_id)
                    .await
                    .map_or_else(|_| "someone".to_owned(), |u| format!("@{}", u.username));
                self.post(channel_id, root_id, &format!("{name}: {text}"))
                    .await
                    .map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    async fn add_channel_members(&self, channel_id: &str, users: &[&str]) -> Result<(), ChatError> {
        for user in users {
            self.client.add_channel_member(channel_id, user).await?;
            if let Err(e) = self.file_under_category(user, channel_id).await {
                warn!(error = %e, user, "cannot put the project channel into the sidebar category");
            }
        }
        Ok(())
    }

    /// Text longer than a post is cut at the limit with a visible note (the renderer keeps
    /// streamed posts under it, so this only guards against misuse).
    async fn update(&self, post: &PostRef, text: &str) -> Result<(), ChatError> {
        let message = if text.chars().count() > MAX_POST_CHARS {
            let note = "\n\n… (cut: the post reached Mattermost's size limit)";
            let keep = MAX_POST_CHARS - note.chars().count();
            let mut cut: String = text.chars().take(keep).collect();
            cut.push_str(note);
            warn!(post = %post.post_id, "post update over the size limit was cut");
            cut
        } else {
            text.to_owned()
        };
        self.client
            .patch_post(
                &post.post_id,
                &PatchPost {
                    message: Some(&message),
                    props: None,
                },
            )
            .await
            .map(|_| ())
    }

    async fn post_card(
        &self,
        channel_id: &str,
        root_id: &str,
        card: &ActionCard,
    ) -> Result<PostRef, ChatError> {
        let props = card_props(card);
        let created = self
            .client
            .create_post(&CreatePost {
                channel_id,
                message: "",
                root_id: Some(root_id),
                props: Some(&props),
            })
            .await?;
        Ok(PostRef {
            channel_id: created.channel_id.clone(),
            root_id: created.root().map(str::to_owned),
            post_id: created.id,
        })
    }

    async fn update_card(&self, post: &PostRef, card: &ActionCard) -> Result<(), ChatError> {
        let props = card_props(card);
        self.client
            .patch_post(
                &post.post_id,
                &PatchPost {
                    message: Some(""),
                    props: Some(&props),
                },
            )
            .await
            .map(|_| ())
    }

    async fn typing(&self, channel_id: &str, root_id: Option<&str>) -> Result<(), ChatError> {
        self.client.typing(&self.bot.id, channel_id, root_id).await
    }

    async fn ensure_project_channel(
        &self,
        repo_slug: &str,
        members: &[&str],
    ) -> Result<ChannelRef, ChatError> {
        let channel = self.find_or_create_channel(repo_slug).await?;
        self.client
            .add_channel_member(&channel.channel_id, &self.bot.id)
            .await?;
        for member in members {
            self.client
                .add_channel_member(&channel.channel_id, member)
                .await?;
        }
        for user in std::iter::once(self.bot.id.as_str()).chain(members.iter().copied()) {
            if let Err(e) = self.file_under_category(user, &channel.channel_id).await {
                // The channel works without it; the sidebar is a convenience.
                warn!(error = %e, user, "cannot put the project channel into the sidebar category");
            }
        }
        Ok(channel)
    }

    async fn follow_thread(&self, user_id: &str, root: &PostRef) -> Result<(), ChatError> {
        self.client
            .follow_thread(user_id, &self.config.team_id, root.thread_id())
            .await
    }

    /// `<server>/_redirect/pl/<post id>`: Mattermost's permalink that needs no team name.
    fn permalink(&self, post_id: &str) -> String {
        format!(
            "{}/_redirect/pl/{post_id}",
            self.config.url.as_str().trim_end_matches('/')
        )
    }

    async fn resolve_user(&self, id_or_username: &str) -> Result<ChatUser, ChatError> {
        let wanted = id_or_username.trim().trim_start_matches('@');
        let looks_like_id = wanted.len() == 26
            && wanted
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let user = if looks_like_id {
            match self.client.user(wanted).await {
                Err(e) if e.status() == Some(404) => self.client.user_by_username(wanted).await,
                other => other,
            }
        } else {
            self.client.user_by_username(wanted).await
        }?;
        Ok(ChatUser {
            id: user.id,
            username: user.username,
        })
    }
}

/// A card as Mattermost post props: one attachment whose actions are buttons posting to the
/// card's callback URL with their context (`model.SlackAttachment`, `model.PostAction`).
pub fn card_props(card: &ActionCard) -> serde_json::Map<String, serde_json::Value> {
    let actions: Vec<serde_json::Value> = card
        .actions
        .iter()
        .map(|a| {
            serde_json::json!({
                "id": a.id,
                "type": "button",
                "name": a.label,
                "style": a.style,
                "integration": { "url": card.callback_url, "context": a.context },
            })
        })
        .collect();
    let mut attachment = serde_json::json!({
        "fallback": format!("{}: {}", card.title, card.text),
        "title": card.title,
        "text": card.text,
        "actions": actions,
    });
    if let (Some(color), Some(obj)) = (&card.color, attachment.as_object_mut()) {
        obj.insert("color".into(), serde_json::Value::String(color.clone()));
    }
    let mut props = serde_json::Map::new();
    props.insert(
        "attachments".into(),
        serde_json::Value::Array(vec![attachment]),
    );
    props
}

/// The channel name for `org/repo`: `org-repo`, lowercased, with every run of characters
/// outside `[a-z0-9]` turned into one `-`, at most 64 characters, matching Mattermost's
/// channel name rule (`model.IsValidChannelIdentifier`).
pub fn channel_name(repo_slug: &str) -> String {
    let mut name = String::with_capacity(repo_slug.len());
    for c in repo_slug.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            name.push(c);
        } else if !name.ends_with('-') && !name.is_empty() {
            name.push('-');
        }
    }
    let mut name: String = name.chars().take(64).collect();
    while name.ends_with('-') {
        name.pop();
    }
    if name.is_empty() {
        "project".to_owned()
    } else {
        name
    }
}

/// The display name for `org/repo` (at most 64 characters).
fn display_name(repo_slug: &str) -> String {
    repo_slug.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::channel_name;

    #[test]
    fn channel_names_follow_mattermost_rules() {
        assert_eq!(channel_name("acme/widgets"), "acme-widgets");
        assert_eq!(channel_name("Acme/My_Repo.rs"), "acme-my-repo-rs");
        assert_eq!(channel_name("--/.."), "project");
        let long = format!("{}/{}", "o".repeat(39), "r".repeat(100));
        let name = channel_name(&long);
        assert!(name.len() <= 64 && !name.ends_with('-'));
        for sample in ["a/b", "x-y/z__w", "9/9", "ÄÖ/ü"] {
            let n = channel_name(sample);
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{n}"
            );
            assert!(!n.starts_with('-') && !n.ends_with('-'), "{n}");
        }
    }
}
