//! The record of every thread: what the bot posted, edited and carded there, and what people
//! wrote, in order ([`crate::store::TranscriptEntry`]), with a live feed of new entries.
//!
//! [`Recording`] wraps a platform adapter and records each post, edit and card it makes; the
//! dispatcher records the messages people write in session threads; the console platform
//! ([`super::ConsoleChat`]) records everything it is asked to post. The console replays a
//! thread from storage and then follows [`Transcript::subscribe`].

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tracing::warn;

use crate::chat::{
    ActionCard, CardClick, CardClickHandler, ChannelRef, ChatError, ChatOutbound, ChatUser,
    ClickError, ClickReply, InboundMessage, PostRef,
};
use crate::store::{now_ms, Platform, Store, TranscriptEntry, TranscriptKind};

/// How many live entries a slow subscriber may fall behind before it re-reads storage.
const LIVE_BUFFER: usize = 1024;

/// The transcript: storage plus a live feed. Cheap to share in an [`Arc`].
#[derive(Debug)]
pub struct Transcript {
    store: Store,
    live: broadcast::Sender<TranscriptEntry>,
    /// One write at a time: ids then become visible (committed and announced) in increasing
    /// order, so a page that has seen id N has seen every entry below it.
    writing: tokio::sync::Mutex<()>,
}

impl Transcript {
    /// A transcript over `store`.
    pub fn new(store: Store) -> Arc<Self> {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Arc::new(Self {
            store,
            live,
            writing: tokio::sync::Mutex::new(()),
        })
    }

    /// Storage.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// New entries as they are recorded (an entry recorded before subscribing is in storage).
    pub fn subscribe(&self) -> broadcast::Receiver<TranscriptEntry> {
        self.live.subscribe()
    }

    /// Records one event and announces it. A failure is logged, never returned: the chat
    /// action it describes already happened.
    pub async fn record(
        &self,
        thread_id: &str,
        post_id: &str,
        kind: TranscriptKind,
        author: Option<&str>,
        body: &Value,
    ) {
        let _one_at_a_time = self.writing.lock().await;
        match self
            .store
            .append_transcript(
                thread_id,
                post_id,
                kind,
                author,
                &body.to_string(),
                now_ms(),
            )
            .await
        {
            Ok(Some(entry)) => {
                let _ = self.live.send(entry);
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, thread = thread_id, "cannot record in the transcript"),
        }
    }

    /// Records a message someone wrote in a session's thread (once per message, also when it
    /// is handed out again after a restart).
    pub async fn record_inbound(&self, message: &InboundMessage) {
        let author = message
            .user_name
            .clone()
            .unwrap_or_else(|| message.user_id.clone());
        self.record(
            message.thread_id(),
            &message.post_id,
            TranscriptKind::Inbound,
            Some(&author),
            &json!({ "text": message.text }),
        )
        .await;
    }

    /// Records a bot post (new or edited).
    pub async fn record_post(&self, post: &PostRef, text: &str, only: Option<&str>) {
        let mut body = json!({ "text": text, "channel_id": post.channel_id });
        if let Some(user) = only {
            body["only"] = json!(user);
        }
        self.record(
            post.thread_id(),
            &post.post_id,
            TranscriptKind::Post,
            None,
            &body,
        )
        .await;
    }

    /// Records a card (new or replaced).
    pub async fn record_card(&self, post: &PostRef, card: &ActionCard) {
        self.record(
            post.thread_id(),
            &post.post_id,
            TranscriptKind::Card,
            None,
            &card_body(post, card),
        )
        .await;
    }
}

/// A card as the transcript keeps it: what it shows, where it is, and its buttons with their
/// signed contexts (which never leave the server: see [`public_body`]).
pub fn card_body(post: &PostRef, card: &ActionCard) -> Value {
    json!({
        "channel_id": post.channel_id,
        "root_id": post.root_id,
        "title": card.title,
        "text": card.text,
        "color": card.color,
        "callback_url": card.callback_url,
        "actions": card.actions.iter().map(|a| json!({
            "id": a.id,
            "label": a.label,
            "style": a.style,
            "context": a.context,
        })).collect::<Vec<_>>(),
    })
}

/// An entry's body as a browser may see it: cards without their buttons' signed contexts.
pub fn public_body(entry: &TranscriptEntry) -> Value {
    let mut body: Value = serde_json::from_str(&entry.body).unwrap_or(Value::Null);
    if let Some(actions) = body.get_mut("actions").and_then(Value::as_array_mut) {
        for action in actions {
            if let Some(action) = action.as_object_mut() {
                action.remove("context");
            }
        }
    }
    if let Some(object) = body.as_object_mut() {
        object.remove("callback_url");
    }
    body
}

/// A platform adapter whose posts, edits and cards are recorded in the transcript. Ephemeral
/// posts are recorded for their one reader.
pub struct Recording {
    inner: Arc<dyn ChatOutbound>,
    transcript: Arc<Transcript>,
}

impl Recording {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ChatOutbound>, transcript: Arc<Transcript>) -> Arc<Self> {
        Arc::new(Self { inner, transcript })
    }
}

#[async_trait]
impl ChatOutbound for Recording {
    fn platform(&self) -> Platform {
        self.inner.platform()
    }

    fn max_post_chars(&self) -> usize {
        self.inner.max_post_chars()
    }

    fn bot_user_id(&self) -> &str {
        self.inner.bot_user_id()
    }

    async fn post(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        text: &str,
    ) -> Result<PostRef, ChatError> {
        let post = self.inner.post(channel_id, root_id, text).await?;
        self.transcript.record_post(&post, text, None).await;
        Ok(post)
    }

    async fn post_ephemeral(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        user_id: &str,
        text: &str,
    ) -> Result<(), ChatError> {
        self.inner
            .post_ephemeral(channel_id, root_id, user_id, text)
            .await
    }

    async fn add_channel_members(&self, channel_id: &str, users: &[&str]) -> Result<(), ChatError> {
        self.inner.add_channel_members(channel_id, users).await
    }

    async fn update(&self, post: &PostRef, text: &str) -> Result<(), ChatError> {
        self.inner.update(post, text).await?;
        self.transcript.record_post(post, text, None).await;
        Ok(())
    }

    async fn post_card(
        &self,
        channel_id: &str,
        root_id: &str,
        card: &ActionCard,
    ) -> Result<PostRef, ChatError> {
        let post = self.inner.post_card(channel_id, root_id, card).await?;
        self.transcript.record_card(&post, card).await;
        Ok(post)
    }

    async fn update_card(&self, post: &PostRef, card: &ActionCard) -> Result<(), ChatError> {
        self.inner.update_card(post, card).await?;
        self.transcript.record_card(post, card).await;
        Ok(())
    }

    async fn typing(&self, channel_id: &str, root_id: Option<&str>) -> Result<(), ChatError> {
        self.inner.typing(channel_id, root_id).await
    }

    async fn ensure_project_channel(
        &self,
        repo_slug: &str,
        members: &[&str],
    ) -> Result<ChannelRef, ChatError> {
        self.inner.ensure_project_channel(repo_slug, members).await
    }

    async fn follow_thread(&self, user_id: &str, root: &PostRef) -> Result<(), ChatError> {
        self.inner.follow_thread(user_id, root).await
    }

    fn permalink(&self, post_id: &str) -> String {
        self.inner.permalink(post_id)
    }

    async fn resolve_user(&self, id_or_username: &str) -> Result<ChatUser, ChatError> {
        self.inner.resolve_user(id_or_username).await
    }
}

/// A click handler that records the card a click replaced (a chat server applies the
/// replacement itself, from the click's answer, so no adapter call would record it).
pub struct RecordingClicks {
    inner: Arc<dyn CardClickHandler>,
    transcript: Arc<Transcript>,
}

impl RecordingClicks {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn CardClickHandler>, transcript: Arc<Transcript>) -> Self {
        Self { inner, transcript }
    }
}

#[async_trait]
impl CardClickHandler for RecordingClicks {
    async fn on_click(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        let post_id = click.post_id.clone();
        let reply = self.inner.on_click(click).await?;
        if let ClickReply::ReplaceCard(card) = &reply {
            if let Ok(Some(entry)) = self.transcript.store().transcript_latest(&post_id).await {
                let body: Value = serde_json::from_str(&entry.body).unwrap_or(Value::Null);
                let post = PostRef {
                    channel_id: body["channel_id"].as_str().unwrap_or_default().to_owned(),
                    post_id: post_id.clone(),
                    root_id: Some(entry.thread_id.clone()),
                };
                self.transcript.record_card(&post, card).await;
            }
        }
        Ok(reply)
    }
}
