//! The web console as a chat platform ([`Platform::Console`]): sessions started from the
//! console live in it, and with no chat platform configured (one-machine mode) it is the only
//! one. A post is an entry of the transcript and nothing else; ids start with
//! [`super::ID_PREFIX`] so the router tells them from Mattermost's and Teams'.

use std::sync::Arc;

use async_trait::async_trait;

use super::transcript::Transcript;
use super::ID_PREFIX;
use crate::chat::{ActionCard, ChannelRef, ChatError, ChatOutbound, ChatUser, PostRef};
use crate::store::Platform;

/// The bot's user id on the console.
pub const CONSOLE_BOT_ID: &str = "console.bot";

/// The channel top-level console messages (`start`, `status`) are written in.
pub const LOBBY: &str = "console.lobby";

/// Longest post, in characters (the console has no limit of its own; long output is still
/// split so a page stays readable).
const MAX_POST_CHARS: usize = 16_000;

/// The console platform. Cheap to share.
#[derive(Debug)]
pub struct ConsoleChat {
    transcript: Arc<Transcript>,
}

impl ConsoleChat {
    /// The platform over `transcript`.
    pub fn new(transcript: Arc<Transcript>) -> Arc<Self> {
        Arc::new(Self { transcript })
    }

    /// A new id for a post or message.
    pub fn new_id() -> String {
        format!("{ID_PREFIX}{}", uuid::Uuid::new_v4().simple())
    }
}

/// Whether a name can be a console user: 1–64 letters, digits, `.`, `_`, `-` and `@`.
pub fn is_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

#[async_trait]
impl ChatOutbound for ConsoleChat {
    fn platform(&self) -> Platform {
        Platform::Console
    }

    fn max_post_chars(&self) -> usize {
        MAX_POST_CHARS
    }

    fn bot_user_id(&self) -> &str {
        CONSOLE_BOT_ID
    }

    async fn post(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        text: &str,
    ) -> Result<PostRef, ChatError> {
        let post = PostRef {
            channel_id: channel_id.to_owned(),
            post_id: Self::new_id(),
            root_id: root_id.map(str::to_owned),
        };
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
        let post = PostRef {
            channel_id: channel_id.to_owned(),
            post_id: Self::new_id(),
            root_id: root_id.map(str::to_owned),
        };
        self.transcript
            .record_post(&post, text, Some(user_id))
            .await;
        Ok(())
    }

    async fn add_channel_members(&self, _: &str, _: &[&str]) -> Result<(), ChatError> {
        Ok(())
    }

    async fn update(&self, post: &PostRef, text: &str) -> Result<(), ChatError> {
        self.transcript.record_post(post, text, None).await;
        Ok(())
    }

    async fn post_card(
        &self,
        channel_id: &str,
        root_id: &str,
        card: &ActionCard,
    ) -> Result<PostRef, ChatError> {
        let post = PostRef {
            channel_id: channel_id.to_owned(),
            post_id: Self::new_id(),
            root_id: Some(root_id.to_owned()),
        };
        self.transcript.record_card(&post, card).await;
        Ok(post)
    }

    async fn update_card(&self, post: &PostRef, card: &ActionCard) -> Result<(), ChatError> {
        self.transcript.record_card(post, card).await;
        Ok(())
    }

    async fn typing(&self, _: &str, _: Option<&str>) -> Result<(), ChatError> {
        Ok(())
    }

    async fn ensure_project_channel(
        &self,
        repo_slug: &str,
        _: &[&str],
    ) -> Result<ChannelRef, ChatError> {
        Ok(ChannelRef {
            team_id: "console".into(),
            channel_id: format!("{ID_PREFIX}{repo_slug}"),
            name: repo_slug.to_owned(),
            created: false,
        })
    }

    async fn follow_thread(&self, _: &str, _: &PostRef) -> Result<(), ChatError> {
        Ok(())
    }

    fn permalink(&self, post_id: &str) -> String {
        format!("/t/{post_id}")
    }

    async fn resolve_user(&self, id_or_username: &str) -> Result<ChatUser, ChatError> {
        let name = id_or_username.trim_start_matches('@');
        if is_user_name(name) {
            Ok(ChatUser {
                id: name.to_owned(),
                username: name.to_owned(),
            })
        } else {
            Err(ChatError::Api {
                status: 404,
                code: "console.user".into(),
                message: "not a console user name".into(),
            })
        }
    }
}
