//! Mattermost JSON objects, as `server/public/model/*.go` define them.
//!
//! Only the fields the bot uses are typed; unknown fields are ignored on input (the server
//! adds fields over time). Times are Unix milliseconds; ids are 26-character lowercase base32.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A post (`model.Post`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Post {
    /// Id.
    pub id: String,
    /// Created (Unix ms).
    #[serde(default)]
    pub create_at: i64,
    /// Last modified (Unix ms).
    #[serde(default)]
    pub update_at: i64,
    /// Last edited (Unix ms), 0 if never.
    #[serde(default)]
    pub edit_at: i64,
    /// Deleted (Unix ms), 0 if not.
    #[serde(default)]
    pub delete_at: i64,
    /// Author.
    #[serde(default)]
    pub user_id: String,
    /// Channel.
    #[serde(default)]
    pub channel_id: String,
    /// Thread root, `""` for a root post.
    #[serde(default)]
    pub root_id: String,
    /// Markdown text.
    #[serde(default)]
    pub message: String,
    /// `""` for a normal post; system posts have a type.
    #[serde(default, rename = "type")]
    pub post_type: String,
    /// Properties (`from_bot`, `attachments`, …); absent or null means none.
    #[serde(default)]
    pub props: Option<Map<String, Value>>,
}

impl Post {
    /// The thread root, `None` for a root post.
    pub fn root(&self) -> Option<&str> {
        (!self.root_id.is_empty()).then_some(self.root_id.as_str())
    }

    /// Whether a bot account wrote it (`props.from_bot == "true"`).
    pub fn is_from_bot(&self) -> bool {
        self.props
            .as_ref()
            .and_then(|p| p.get("from_bot"))
            .is_some_and(|v| v == "true" || v == &Value::Bool(true))
    }
}

/// A list of posts (`model.PostList`): `order` gives the ids, `posts` the objects.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PostList {
    /// Post ids in the server's order.
    #[serde(default)]
    pub order: Vec<String>,
    /// Posts by id.
    #[serde(default)]
    pub posts: HashMap<String, Post>,
}

impl PostList {
    /// The posts sorted by creation time (then id), whatever the server's order.
    pub fn into_chronological(self) -> Vec<Post> {
        let mut posts: Vec<Post> = self.posts.into_values().collect();
        posts.sort_by(|a, b| a.create_at.cmp(&b.create_at).then_with(|| a.id.cmp(&b.id)));
        posts
    }
}

/// The body of `POST /api/v4/posts`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreatePost<'a> {
    /// Channel.
    pub channel_id: &'a str,
    /// Markdown text (at most 16383 characters).
    pub message: &'a str,
    /// Thread root for a reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_id: Option<&'a str>,
    /// Properties (e.g. attachments with buttons).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub props: Option<&'a Map<String, Value>>,
}

/// The body of `PUT /api/v4/posts/{id}/patch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PatchPost<'a> {
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    /// New properties (replace the old ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub props: Option<&'a Map<String, Value>>,
}

/// A channel (`model.Channel`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    /// Id.
    pub id: String,
    /// Team.
    #[serde(default)]
    pub team_id: String,
    /// `O` public, `P` private, `D` direct, `G` group.
    #[serde(default, rename = "type")]
    pub channel_type: String,
    /// URL name.
    #[serde(default)]
    pub name: String,
    /// Display name.
    #[serde(default)]
    pub display_name: String,
    /// Deleted (Unix ms), 0 if not.
    #[serde(default)]
    pub delete_at: i64,
}

/// A user (`model.User`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Id.
    pub id: String,
    /// Username.
    pub username: String,
    /// Whether it is a bot account.
    #[serde(default)]
    pub is_bot: bool,
}

/// A sidebar category (`model.SidebarCategoryWithChannels`). Fields the bot does not use are
/// kept in `extra` so an update sends them back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SidebarCategory {
    /// Id (`""` when creating).
    #[serde(default)]
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// Team.
    pub team_id: String,
    /// `channels`, `direct_messages`, `favorites` or `custom`.
    #[serde(rename = "type")]
    pub category_type: String,
    /// Name shown in the sidebar.
    pub display_name: String,
    /// Channels in it.
    #[serde(default)]
    pub channel_ids: Vec<String>,
    /// Every other field, unchanged.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The answer of `GET …/channels/categories` (`model.OrderedSidebarCategories`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct OrderedSidebarCategories {
    /// The categories.
    #[serde(default)]
    pub categories: Vec<SidebarCategory>,
    /// Category ids in sidebar order.
    #[serde(default)]
    pub order: Vec<String>,
}

/// Mattermost's error body (`model.AppError`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct AppError {
    /// Error id, e.g. `api.post.create_post.root_id.app_error`.
    #[serde(default)]
    pub id: String,
    /// Message.
    #[serde(default)]
    pub message: String,
    /// Detail, if any.
    #[serde(default)]
    pub detailed_error: String,
    /// Request id, for the server's logs.
    #[serde(default)]
    pub request_id: String,
}

/// A WebSocket event frame (`webSocketEventJSON`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WsEvent {
    /// Event type, e.g. `hello`, `posted`, `post_edited`.
    pub event: String,
    /// Event data; `data.post` of `posted` is a JSON *string*.
    #[serde(default)]
    pub data: Map<String, Value>,
    /// Who it was sent to.
    #[serde(default)]
    pub broadcast: Option<Value>,
    /// Position in this connection's event sequence (hello is 0).
    #[serde(default)]
    pub seq: i64,
}

impl WsEvent {
    /// A string field of `data`.
    pub fn data_str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }

    /// The post carried by `posted` / `post_edited` (double-encoded as a JSON string).
    ///
    /// # Errors
    /// A description when `data.post` is missing or not a post.
    pub fn post(&self) -> Result<Post, String> {
        let raw = self.data_str("post").ok_or("event has no data.post")?;
        serde_json::from_str(raw).map_err(|e| format!("data.post is not a post: {e}"))
    }
}

/// A response frame to a request the client sent (`model.WebSocketResponse`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WsResponse {
    /// `OK` or `FAIL`.
    pub status: String,
    /// The `seq` of the request it answers.
    #[serde(default)]
    pub seq_reply: Option<i64>,
    /// Error detail on `FAIL`.
    #[serde(default)]
    pub error: Option<Value>,
}

/// Any frame the server sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum WsFrame {
    /// An event (has `event`).
    Event(WsEvent),
    /// A response (has `status`).
    Response(WsResponse),
}
