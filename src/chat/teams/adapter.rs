//! The Teams adapter: [`ChatOutbound`] on the Bot Framework Connector, with the conversation
//! references that let it post anywhere it was spoken to, after a restart too.
//!
//! Where things go (ids: see the [module documentation](super)):
//!
//! - `post(channel, None, …)` in a Teams channel opens a new thread there (CreateConversation
//!   on the channel); `post(channel, Some(root), …)` replies in the thread
//!   (ReplyToActivity on `<channel>;messageid=<root>`). In a personal or group chat both send
//!   to the chat (SendToConversation). Text over [`MAX_POST_CHARS`] is split (code fences
//!   balanced, [`split_message`]) into continuation replies in the same thread.
//! - `update`/`update_card` replace a message (UpdateActivity, `PUT`), keeping only the newest
//!   state when several are queued; `post_card` sends the card as a reply of its own (Teams
//!   splits text and attachments into two activities, so cards never carry text).
//! - Every operation is paced per conversation ([`Pacer`], one per [`PACE_INTERVAL`], the
//!   first at once) and retried on 429 (honouring `Retry-After`) and 5xx.
//! - `ensure_project_channel`: a bot cannot create Teams channels, so the session lives where
//!   it was asked for: the conversation where the starting user last addressed the bot
//!   (recorded by the inbound route just before it hands the message on); failing that, the
//!   channel recorded for the repository; failing that, a 404 `NoConversation` error saying
//!   to ask in the channel the session should live in. Nobody is added anywhere (Teams has no
//!   bot API for that); `follow_thread` does nothing (Teams users follow threads they post in).
//!
//! Conversation references (service URL, tenant, team, the bot's id) are written to storage by
//! the inbound route whenever they change and read back through a small cache, so nothing
//! about Teams lives only in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use tokio_util::task::TaskTracker;
use tracing::warn;
use url::Url;

use super::auth::{AuthConfig, BotAuthenticator};
use super::card::card_attachment;
use super::model::{Activity, ConversationParameters};
use super::pacer::{Pacer, Ticket};
use super::rest::{ConnectorClient, TokenSource};
use super::{conversation_id, split_conversation_id, MAX_POST_CHARS, PACE_INTERVAL};
use crate::chat::mattermost::rest::RetryPolicy;
use crate::chat::render::split_message;
use crate::chat::{ActionCard, ChannelRef, ChatError, ChatOutbound, ChatUser, PostRef};
use crate::config::{is_guid, TeamsSettings};
use crate::store::{now_ms, Platform, Store, StoreResult, TeamsConversation};

/// Most message links remembered for [`ChatOutbound::permalink`].
const MAX_LINKS: usize = 10_000;

/// What the adapter needs to know.
#[derive(Debug, Clone)]
pub struct TeamsConfig {
    /// The bot's Microsoft App ID (`SM_TEAMS_APP_ID`).
    pub app_id: String,
    /// Its client secret (`SM_TEAMS_APP_PASSWORD`).
    pub app_password: SecretString,
    /// The token endpoint ([`TeamsSettings::token_endpoint`]).
    pub token_url: Url,
    /// OpenID metadata of inbound tokens (`SM_TEAMS_OPENID_METADATA_URL`).
    pub openid_metadata_url: Url,
    /// `SM_BOT_TRIGGER`: what a mention of the bot becomes when it starts a command, so the
    /// chat grammar is the same as on Mattermost.
    pub trigger: String,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Retries of Connector calls.
    pub retry: RetryPolicy,
    /// Least time between two operations in one conversation ([`PACE_INTERVAL`]).
    pub pace_interval: Duration,
}

impl TeamsConfig {
    /// The configuration from the settings, `None` when Teams is not configured
    /// (`SM_TEAMS_APP_ID` unset). Timeouts, retries and pacing take their defaults.
    pub fn from_settings(teams: &TeamsSettings, trigger: &str) -> Option<Self> {
        Some(Self {
            app_id: teams.app_id.clone()?,
            app_password: teams.app_password.clone()?,
            token_url: teams.token_endpoint(),
            openid_metadata_url: teams.openid_metadata_url.clone(),
            trigger: trigger.to_owned(),
            request_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            pace_interval: PACE_INTERVAL,
        })
    }
}

/// The Teams adapter. Share it in an [`Arc`]; serve its inbound side with
/// [`routes`](super::routes), and call [`TeamsAdapter::close`] at shutdown.
pub struct TeamsAdapter {
    config: TeamsConfig,
    store: Store,
    connector: ConnectorClient,
    auth: BotAuthenticator,
    pacer: Pacer,
    bot_id: String,
    references: Mutex<HashMap<String, TeamsConversation>>,
    /// Message id → the channel it is in and its thread root, for permalinks.
    links: Mutex<HashMap<String, (String, String)>>,
    /// Background work started by inbound requests (cards updated for everyone, notices).
    tasks: TaskTracker,
}

impl std::fmt::Debug for TeamsAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeamsAdapter")
            .field("bot_id", &self.bot_id)
            .finish_non_exhaustive()
    }
}

impl TeamsAdapter {
    /// Builds the adapter over `store` (nothing is fetched until needed: the bot's token on the
    /// first post, the signing keys on the first inbound request), and learns the threads of
    /// active Teams sessions for permalinks.
    ///
    /// # Errors
    /// [`ChatError::Transport`] when the HTTP client cannot be built.
    pub async fn connect(config: TeamsConfig, store: Store) -> Result<Self, ChatError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("session-manager/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ChatError::Transport(format!("cannot build the HTTP client: {e}")))?;
        let tokens = Arc::new(TokenSource::new(
            http.clone(),
            config.token_url.clone(),
            &config.app_id,
            config.app_password.clone(),
        ));
        let connector = ConnectorClient::new(http, tokens, config.retry);
        let mut auth_config = AuthConfig::new(&config.app_id, config.openid_metadata_url.clone());
        auth_config.request_timeout = config.request_timeout.min(Duration::from_secs(10));
        let auth = BotAuthenticator::new(auth_config).map_err(ChatError::Transport)?;
        let adapter = Self {
            bot_id: format!("28:{}", config.app_id),
            pacer: Pacer::new(config.pace_interval),
            config,
            store,
            connector,
            auth,
            references: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
        };
        match adapter.store.active_sessions().await {
            Ok(sessions) => {
                for s in sessions.iter().filter(|s| s.platform == Platform::Teams) {
                    adapter.learn_link(&s.thread_id, &s.channel_id, &s.thread_id);
                }
            }
            Err(e) => warn!(error = %e, "cannot list Teams sessions for permalinks"),
        }
        Ok(adapter)
    }

    /// The settings in force.
    pub fn config(&self) -> &TeamsConfig {
        &self.config
    }

    /// The inbound token check.
    pub fn authenticator(&self) -> &BotAuthenticator {
        &self.auth
    }

    /// The Connector client.
    pub fn connector(&self) -> &ConnectorClient {
        &self.connector
    }

    /// Storage.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Waits for the background work inbound requests started (cards updated for everyone,
    /// notices); call it at shutdown, after the HTTP server stopped.
    pub async fn close(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Runs `work` in the background, awaited by [`TeamsAdapter::close`].
    pub(crate) fn spawn<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(work);
    }

    /// The conversation reference of a channel or chat: from the cache, else storage.
    ///
    /// # Errors
    /// [`ChatError::Transport`] when storage fails.
    pub async fn reference(
        &self,
        conversation_id: &str,
    ) -> Result<Option<TeamsConversation>, ChatError> {
        if let Some(found) = self.lock_references().get(conversation_id) {
            return Ok(Some(found.clone()));
        }
        let stored = self
            .store
            .teams_conversation(conversation_id)
            .await
            .map_err(|e| ChatError::Transport(format!("storage: {e}")))?;
        if let Some(found) = &stored {
            self.lock_references()
                .insert(conversation_id.to_owned(), found.clone());
        }
        Ok(stored)
    }

    /// Records a conversation reference, writing to storage only when it changed.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn remember(&self, reference: TeamsConversation) -> StoreResult<()> {
        let same = |known: &TeamsConversation| {
            known.service_url == reference.service_url
                && known.conversation_type == reference.conversation_type
                && known.bot_id == reference.bot_id
                && (reference.tenant_id.is_empty() || known.tenant_id == reference.tenant_id)
                && (reference.team_id.is_empty() || known.team_id == reference.team_id)
                && (reference.name.is_empty() || known.name == reference.name)
        };
        if self
            .lock_references()
            .get(&reference.conversation_id)
            .is_some_and(same)
        {
            return Ok(());
        }
        self.store.upsert_teams_conversation(&reference).await?;
        if let Some(merged) = self
            .store
            .teams_conversation(&reference.conversation_id)
            .await?
        {
            self.lock_references()
                .insert(reference.conversation_id.clone(), merged);
        }
        Ok(())
    }

    /// Remembers where a message is, for [`ChatOutbound::permalink`].
    pub(crate) fn learn_link(&self, post_id: &str, channel_id: &str, root: &str) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.len() >= MAX_LINKS {
            links.clear();
        }
        links.insert(post_id.to_owned(), (channel_id.to_owned(), root.to_owned()));
    }

    fn lock_references(&self) -> std::sync::MutexGuard<'_, HashMap<String, TeamsConversation>> {
        self.references.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn require_reference(&self, channel_id: &str) -> Result<TeamsConversation, ChatError> {
        self.reference(channel_id).await?.ok_or_else(|| ChatError::Api {
            status: 404,
            code: "ConversationNotFound".into(),
            message: format!(
                "the bot has no reference for Teams conversation {channel_id}: it can only post where it was spoken to"
            ),
        })
    }

    /// Sends one activity into a thread (or opens one) and says where it landed.
    async fn send(
        &self,
        reference: &TeamsConversation,
        root: Option<&str>,
        mut activity: Activity,
    ) -> Result<PostRef, ChatError> {
        let channel = is_channel(reference);
        let channel_id = reference.conversation_id.as_str();
        let service_url = reference.service_url.as_str();
        let posted = match (channel, root) {
            (true, None) => {
                let params = ConversationParameters {
                    is_group: true,
                    channel_data: serde_json::json!({ "channel": { "id": channel_id } }),
                    activity,
                    tenant_id: (!reference.tenant_id.is_empty())
                        .then(|| reference.tenant_id.clone()),
                };
                let created = self
                    .pacer
                    .run(channel_id, || {
                        self.connector.create_conversation(service_url, &params)
                    })
                    .await?;
                let post_id = created
                    .activity_id
                    .filter(|id| !id.is_empty())
                    .or_else(|| split_conversation_id(&created.id).1.map(str::to_owned))
                    .ok_or_else(|| {
                        ChatError::Decode(
                            "CreateConversation answered without an activity id".into(),
                        )
                    })?;
                PostRef {
                    channel_id: channel_id.to_owned(),
                    post_id,
                    root_id: None,
                }
            }
            (true, Some(root)) => {
                let conversation = conversation_id(channel_id, Some(root), true);
                activity.reply_to_id = Some(root.to_owned());
                let sent = self
                    .pacer
                    .run(&conversation, || {
                        self.connector.reply_to_activity(
                            service_url,
                            &conversation,
                            root,
                            &activity,
                        )
                    })
                    .await?;
                PostRef {
                    channel_id: channel_id.to_owned(),
                    post_id: sent.id,
                    root_id: Some(root.to_owned()),
                }
            }
            (false, root) => {
                let sent = self
                    .pacer
                    .run(channel_id, || {
                        self.connector
                            .send_to_conversation(service_url, channel_id, &activity)
                    })
                    .await?;
                PostRef {
                    channel_id: channel_id.to_owned(),
                    post_id: sent.id,
                    root_id: root.map(str::to_owned),
                }
            }
        };
        if posted.post_id.is_empty() {
            return Err(ChatError::Decode(
                "the Connector answered without an id".into(),
            ));
        }
        self.learn_link(&posted.post_id, &posted.channel_id, posted.thread_id());
        Ok(posted)
    }

    /// Replaces a message (`PUT`), keeping only the newest queued state of it. `Ok` also when
    /// a newer state superseded this one.
    pub(crate) async fn replace(
        &self,
        post: &PostRef,
        activity: Activity,
    ) -> Result<(), ChatError> {
        let reference = self.require_reference(&post.channel_id).await?;
        let conversation = conversation_id(
            &reference.conversation_id,
            Some(post.thread_id()),
            is_channel(&reference),
        );
        let ticket = self.pacer.ticket(&conversation, &post.post_id);
        self.replace_with(ticket, &reference, &conversation, post, activity)
            .await
    }

    /// Queues the replacement of a message now (so a later update of it supersedes this one,
    /// never the other way round) and performs it in the background.
    pub(crate) fn replace_soon(
        self: &Arc<Self>,
        conversation: String,
        post: PostRef,
        activity: Activity,
    ) {
        let ticket = self.pacer.ticket(&conversation, &post.post_id);
        let me = Arc::clone(self);
        self.spawn(async move {
            let result = match me.require_reference(&post.channel_id).await {
                Ok(reference) => {
                    me.replace_with(ticket, &reference, &conversation, &post, activity)
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                warn!(error = %e, post = %post.post_id, "cannot update a Teams message");
            }
        });
    }

    async fn replace_with(
        &self,
        ticket: Ticket,
        reference: &TeamsConversation,
        conversation: &str,
        post: &PostRef,
        activity: Activity,
    ) -> Result<(), ChatError> {
        let activity = Activity {
            id: Some(post.post_id.clone()),
            ..activity
        };
        ticket
            .run(|| {
                self.connector.update_activity(
                    &reference.service_url,
                    conversation,
                    &post.post_id,
                    &activity,
                )
            })
            .await
            .unwrap_or(Ok(Default::default()))
            .map(|_| ())
    }
}

/// Whether the reference is a Teams channel (threads) rather than a chat (flat).
fn is_channel(reference: &TeamsConversation) -> bool {
    reference.conversation_type == "channel"
}

/// A Markdown text message.
pub(crate) fn text_activity(text: &str) -> Activity {
    Activity {
        activity_type: "message".into(),
        text_format: Some("markdown".into()),
        text: Some(text.to_owned()),
        ..Activity::default()
    }
}

/// A message holding only the card.
pub(crate) fn card_activity(card: &ActionCard) -> Activity {
    Activity {
        activity_type: "message".into(),
        attachments: vec![card_attachment(card)],
        ..Activity::default()
    }
}

#[async_trait]
impl ChatOutbound for TeamsAdapter {
    fn platform(&self) -> Platform {
        Platform::Teams
    }

    fn max_post_chars(&self) -> usize {
        MAX_POST_CHARS
    }

    /// `28:<app id>`, the bot's account in every conversation.
    fn bot_user_id(&self) -> &str {
        &self.bot_id
    }

    /// A bot cannot post a message only one member of a Teams channel sees: the notice is a
    /// reply in the thread, naming the user.
    async fn post_ephemeral(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        user_id: &str,
        text: &str,
    ) -> Result<(), ChatError> {
        let name = self
            .resolve_user(user_id)
            .await
            .map_or_else(|_| "someone".to_owned(), |u| u.username);
        self.post(channel_id, root_id, &format!("{name}: {text}"))
            .await
            .map(|_| ())
    }

    /// Teams channel membership is the team's (a bot adds no one): nothing to do.
    async fn add_channel_members(
        &self,
        _channel_id: &str,
        _users: &[&str],
    ) -> Result<(), ChatError> {
        Ok(())
    }

    async fn post(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        text: &str,
    ) -> Result<PostRef, ChatError> {
        let reference = self.require_reference(channel_id).await?;
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
            let posted = self
                .send(&reference, root.as_deref(), text_activity(part))
                .await?;
            first.get_or_insert(posted);
        }
        first.ok_or_else(|| ChatError::Decode("nothing was posted".into()))
    }

    /// Text longer than a message is cut at the limit with a visible note (the renderer keeps
    /// streamed posts under it, so this only guards against misuse).
    async fn update(&self, post: &PostRef, text: &str) -> Result<(), ChatError> {
        let text = if text.chars().count() > MAX_POST_CHARS {
            let note = "\n\n… (cut: the message reached Teams' size limit)";
            let keep = MAX_POST_CHARS - note.chars().count();
            let mut cut: String = text.chars().take(keep).collect();
            cut.push_str(note);
            warn!(post = %post.post_id, "message update over the size limit was cut");
            cut
        } else {
            text.to_owned()
        };
        self.replace(post, text_activity(&text)).await
    }

    async fn post_card(
        &self,
        channel_id: &str,
        root_id: &str,
        card: &ActionCard,
    ) -> Result<PostRef, ChatError> {
        let reference = self.require_reference(channel_id).await?;
        self.send(&reference, Some(root_id), card_activity(card))
            .await
    }

    async fn update_card(&self, post: &PostRef, card: &ActionCard) -> Result<(), ChatError> {
        self.replace(post, card_activity(card)).await
    }

    /// Sends a typing activity when the conversation's lane is free; skipped (still `Ok`)
    /// when a message is due there first.
    async fn typing(&self, channel_id: &str, root_id: Option<&str>) -> Result<(), ChatError> {
        let reference = self.require_reference(channel_id).await?;
        let channel = is_channel(&reference);
        let conversation = conversation_id(channel_id, root_id, channel);
        let typing = Activity {
            activity_type: "typing".into(),
            ..Activity::default()
        };
        let service_url = reference.service_url.as_str();
        self.pacer
            .try_run(&conversation, || {
                self.connector
                    .send_to_conversation(service_url, &conversation, &typing)
            })
            .await
            .unwrap_or(Ok(Default::default()))
            .map(|_| ())
    }

    async fn ensure_project_channel(
        &self,
        repo_slug: &str,
        members: &[&str],
    ) -> Result<ChannelRef, ChatError> {
        let storage = |e: crate::store::StoreError| ChatError::Transport(format!("storage: {e}"));
        let asked = match members.first() {
            Some(user) => self
                .store
                .teams_user(user)
                .await
                .map_err(storage)?
                .and_then(|u| u.last_conversation_id),
            None => None,
        };
        let recorded = self
            .store
            .project_channel(Platform::Teams, repo_slug)
            .await
            .map_err(storage)?
            .map(|p| p.channel_id);
        for candidate in asked.into_iter().chain(recorded) {
            if let Some(reference) = self.reference(&candidate).await? {
                let name = if !reference.name.is_empty() {
                    reference.name.clone()
                } else if is_channel(&reference) {
                    "the Teams channel".to_owned()
                } else {
                    "this chat".to_owned()
                };
                return Ok(ChannelRef {
                    team_id: reference.team_id.clone(),
                    channel_id: reference.conversation_id.clone(),
                    name,
                    created: false,
                });
            }
        }
        Err(ChatError::Api {
            status: 404,
            code: "NoConversation".into(),
            message: format!(
                "a Teams bot cannot create channels: ask for {repo_slug} in the Teams channel or chat the session should live in"
            ),
        })
    }

    async fn follow_thread(&self, _user_id: &str, _root: &PostRef) -> Result<(), ChatError> {
        Ok(())
    }

    /// A Teams deep link to the message (`https://teams.microsoft.com/l/message/<channel>/<id>`
    /// with its thread as `parentMessageId`) when the adapter knows where the message is (it
    /// posted or received it, or it anchors an active session); otherwise a link to Teams.
    fn permalink(&self, post_id: &str) -> String {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        match links.get(post_id) {
            Some((channel, root)) => {
                let mut url =
                    Url::parse("https://teams.microsoft.com/l/message/").expect("a constant URL");
                if let Ok(mut path) = url.path_segments_mut() {
                    path.pop_if_empty().push(channel).push(post_id);
                }
                url.query_pairs_mut().append_pair("parentMessageId", root);
                url.to_string()
            }
            None => "https://teams.microsoft.com/".to_owned(),
        }
    }

    /// Teams users are named by their AAD object id (a GUID) or their Teams account id
    /// (`29:…`); the display name comes from what the bot has seen. Anything else is not a
    /// Teams user: `Api { status: 404, code: "UserNotFound" }`.
    async fn resolve_user(&self, id_or_username: &str) -> Result<ChatUser, ChatError> {
        let wanted = id_or_username.trim();
        let id = if is_guid(wanted) {
            wanted.to_ascii_lowercase()
        } else if wanted.starts_with("29:") {
            wanted.to_owned()
        } else {
            return Err(ChatError::Api {
                status: 404,
                code: "UserNotFound".into(),
                message: format!(
                    "{wanted:?} is not a Teams user id (Teams users are named by their AAD object id)"
                ),
            });
        };
        let known = self
            .store
            .teams_user(&id)
            .await
            .map_err(|e| ChatError::Transport(format!("storage: {e}")))?;
        Ok(ChatUser {
            username: known
                .map(|u| u.name)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| id.clone()),
            id,
        })
    }
}

/// The reference an inbound activity carries (its conversation, service URL, tenant, team,
/// and the bot's account), stamped now.
pub(crate) fn reference_of(
    conversation_id: &str,
    conversation_type: &str,
    service_url: &str,
    tenant_id: &str,
    team_id: &str,
    name: &str,
    bot_id: &str,
) -> TeamsConversation {
    TeamsConversation {
        conversation_id: conversation_id.to_owned(),
        conversation_type: conversation_type.to_owned(),
        service_url: service_url.to_owned(),
        tenant_id: tenant_id.to_owned(),
        team_id: team_id.to_owned(),
        name: name.to_owned(),
        bot_id: bot_id.to_owned(),
        updated_at: now_ms(),
    }
}
