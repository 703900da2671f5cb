//! A faithful fake Mattermost server (REST API v4 and the WebSocket event stream) for the
//! integration tests, benchmarks and end-to-end tests.
//!
//! The wire formats follow `/work/shared/reference/wire-formats.md` section 1 and the
//! Mattermost server sources it cites: field names and order, status codes, AppError ids,
//! `data.post` / `data.reaction` as JSON *strings*, `seq` numbering, the resume rules of the
//! hub's dead queue, and `integration` being stripped from every client-visible copy of a post.
//!
//! Layout of this file:
//! 1. public types (`FakeMattermost`, `Post`, `Channel`, …) and the test-facing API;
//! 2. the server state (one `std::sync::Mutex`, never held across `.await`) and its domain
//!    operations: posts, channels, sidebar, reactions, the WebSocket hub;
//! 3. HTTP plumbing: router, request recording and failure injection, authentication;
//! 4. REST handlers grouped by area;
//! 5. the WebSocket connection task;
//! 6. interactive message buttons (`click`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, Request, State as AxumState};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// ------------------------------------------------------------------------------------------
// Constants taken from the server
// ------------------------------------------------------------------------------------------

/// `model.CurrentVersion` as reported by the `ping` WebSocket action.
const SERVER_VERSION: &str = "10.0.0";
/// `hello.data.server_version`: `<version>.<build>.<config hash>.<licensed>`.
const HELLO_SERVER_VERSION: &str = "10.0.0.0.fake.true";
/// `PostMessageMaxRunesV2`.
const MAX_POST_RUNES: usize = 16_383;
/// `PostPropsMaxRunes`.
const MAX_PROPS_RUNES: usize = 800_000;
/// `deadQueueSize` in `web_conn.go`.
const DEAD_QUEUE_SIZE: usize = 128;
/// `authCheckInterval`: an unauthenticated socket is closed after this long.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// `pingInterval`: the server sends a WebSocket ping frame this often.
const PING_INTERVAL: Duration = Duration::from_secs(60);
/// `SocketMaxMessageSizeKb` (8 KiB per client frame).
const SOCKET_MAX_MESSAGE: usize = 8 * 1024;
/// `OutgoingIntegrationRequestsTimeout` default.
const INTEGRATION_TIMEOUT: Duration = Duration::from_secs(30);
/// `MinimalSidebarSortDistance`.
const SIDEBAR_SORT_DISTANCE: i64 = 10;
/// `EmojiNameMaxLength`.
const EMOJI_NAME_MAX: usize = 64;

// ------------------------------------------------------------------------------------------
// 1. Public types
// ------------------------------------------------------------------------------------------

/// A Mattermost post (`model.Post`), serialized with the server's field names in the
/// server's field order.
///
/// The copies returned by [`FakeMattermost`] accessors are the server-side view: they still
/// carry `integration` inside `props.attachments[].actions[]`. Every REST response and
/// WebSocket event strips it, as `Post.ToJSON` does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Post {
    /// 26-character id.
    pub id: String,
    /// Creation time, Unix milliseconds.
    pub create_at: i64,
    /// Last modification time (edits, reactions, new replies for a root), Unix ms.
    pub update_at: i64,
    /// Time of the last edit of the message, 0 if never edited.
    pub edit_at: i64,
    /// Deletion time, 0 if live.
    pub delete_at: i64,
    /// Pinned to the channel.
    pub is_pinned: bool,
    /// Author.
    pub user_id: String,
    /// Channel.
    pub channel_id: String,
    /// Root post id for a reply, `""` for a root post.
    pub root_id: String,
    /// For an old version kept after an edit: the id of the edited post.
    pub original_id: String,
    /// Markdown text.
    pub message: String,
    /// `""` for a normal post, `system_*` for system messages.
    #[serde(rename = "type")]
    pub post_type: String,
    /// Free-form properties (`from_bot`, `attachments`, …).
    pub props: Value,
    /// Space-separated hashtags parsed from the message.
    pub hashtags: String,
    /// Attached file ids.
    pub file_ids: Vec<String>,
    /// The client's correlation id, echoed back.
    pub pending_post_id: String,
    /// Whether the post has reactions (omitted when false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub has_reactions: bool,
    /// `""` on API-created posts (an omitempty pointer on the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,
    /// Number of live replies in the thread.
    pub reply_count: i64,
    /// Only set by collapsed-threads queries; always 0 here.
    pub last_reply_at: i64,
    /// Thread participants; `null` outside collapsed-threads queries.
    pub participants: Value,
    /// Post metadata (`{}`: no embeds, emojis or files are computed).
    pub metadata: Value,
}

/// A channel (`model.Channel`) with the server's field names and order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    /// 26-character id.
    pub id: String,
    /// Creation time, Unix ms.
    pub create_at: i64,
    /// Last update, Unix ms.
    pub update_at: i64,
    /// Deletion time, 0 if live.
    pub delete_at: i64,
    /// Owning team.
    pub team_id: String,
    /// `"O"` public, `"P"` private, `"D"` direct, `"G"` group.
    #[serde(rename = "type")]
    pub channel_type: String,
    /// Display name.
    pub display_name: String,
    /// URL name, unique in the team.
    pub name: String,
    /// Header.
    pub header: String,
    /// Purpose.
    pub purpose: String,
    /// Time of the last post, Unix ms.
    pub last_post_at: i64,
    /// Number of posts.
    pub total_msg_count: i64,
    /// Always 0.
    pub extra_update_at: i64,
    /// Creator, `""` for channels made by the test helpers.
    pub creator_id: String,
    /// Always `null`.
    pub scheme_id: Option<String>,
    /// Always `null`.
    pub props: Option<Value>,
    /// Always `null`.
    pub group_constrained: Option<bool>,
    /// Always `null`.
    pub shared: Option<bool>,
    /// Number of root posts.
    pub total_msg_count_root: i64,
    /// Always `null`.
    pub policy_id: Option<String>,
    /// Time of the last root post, Unix ms.
    pub last_root_post_at: i64,
}

/// A user (`model.User`, the fields a bot reads).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// 26-character id.
    pub id: String,
    /// Creation time, Unix ms.
    pub create_at: i64,
    /// Last update, Unix ms.
    pub update_at: i64,
    /// Deletion time, 0 if active.
    pub delete_at: i64,
    /// Login name (without `@`).
    pub username: String,
    /// Always `""`.
    pub auth_data: String,
    /// Always `""`.
    pub auth_service: String,
    /// `<username>@fake.test`.
    pub email: String,
    /// Always true.
    pub email_verified: bool,
    /// Always `""`.
    pub nickname: String,
    /// Always `""`.
    pub first_name: String,
    /// Always `""`.
    pub last_name: String,
    /// Always `""`.
    pub position: String,
    /// Space-separated roles (`"system_user"`).
    pub roles: String,
    /// `"en"`.
    pub locale: String,
    /// Timezone object.
    pub timezone: Value,
    /// Bot account (omitted when false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub is_bot: bool,
    /// Bot description (omitted when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bot_description: String,
}

/// A reaction (`model.Reaction`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reaction {
    /// Who reacted.
    pub user_id: String,
    /// On which post.
    pub post_id: String,
    /// Emoji name without colons.
    pub emoji_name: String,
    /// Unix ms.
    pub create_at: i64,
    /// Unix ms.
    pub update_at: i64,
    /// Always 0 for listed reactions.
    pub delete_at: i64,
    /// Always `""`.
    pub remote_id: String,
    /// Channel of the post.
    pub channel_id: String,
}

/// Whether a [`PostWrite`] created a post or edited one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostWriteKind {
    /// `POST /api/v4/posts` (or [`FakeMattermost::post_as`]).
    Create,
    /// A patch or a full update.
    Edit,
}

/// One stored post creation or edit, as seen by [`FakeMattermost::watch_writes`].
#[derive(Clone, Debug)]
pub struct PostWrite {
    /// Wall-clock time the fake stored it (comparable with timestamps of other processes on
    /// this machine).
    pub at: SystemTime,
    /// Creation or edit.
    pub kind: PostWriteKind,
    /// The post's id.
    pub post_id: String,
    /// Its thread's root (`""` for a root post).
    pub root_id: String,
    /// Its channel.
    pub channel_id: String,
    /// Its author.
    pub user_id: String,
    /// The whole message after the write.
    pub message: String,
    /// Its properties after the write (attachments and their buttons included).
    pub props: Value,
}

/// One HTTP request the fake received (REST calls and WebSocket upgrades alike).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// Path without the query, e.g. `/api/v4/posts`.
    pub path: String,
    /// Raw query string without `?` (`""` if none).
    pub query: String,
    /// The body parsed as JSON, `Value::Null` if empty or not JSON.
    pub body: Value,
    /// When it arrived.
    pub at: Instant,
}

/// What [`FakeMattermost::click`] observed.
#[derive(Clone, Debug, PartialEq)]
pub enum ClickOutcome {
    /// The integration answered 200; its body (`Value::Null` if empty) was applied.
    Ok {
        /// The integration's `PostActionIntegrationResponse`.
        response: Value,
    },
    /// The click failed for the user. `status` is the integration's HTTP status (0 if it
    /// could not be reached), or the server's own error status (404 unknown post/action,
    /// 403 no access, 400 invalid integration response) with an AppError `body`.
    Failed {
        /// HTTP status, see above.
        status: u16,
        /// Response body text.
        body: String,
    },
}

/// A Mattermost `AppError`: returned by the test helpers and written (with a `request_id`)
/// as the body of every non-2xx REST response.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{status} {id}: {message}")]
pub struct FakeError {
    /// HTTP status.
    pub status: u16,
    /// Translation id, e.g. `api.post.create_post.root_id.app_error`.
    pub id: String,
    /// Human-readable message.
    pub message: String,
}

/// A running fake Mattermost server on `127.0.0.1:<random port>` (HTTP and WebSocket).
pub struct FakeMattermost {
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
    team_id: String,
    bot_user_id: String,
    bot_token: String,
}

impl FakeMattermost {
    /// Starts the server and pre-creates one team (`fake-team`) and one bot user
    /// (`claude-bot`, `is_bot: true`) with a bot token.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Mattermost");
        let addr = listener.local_addr().expect("fake Mattermost address");
        let mut state = State::new();
        let team_id = state.team.id.clone();
        let (bot_user_id, bot_token) = state.add_user("claude-bot", true);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            base_url: format!("http://{addr}"),
            shutdown: CancellationToken::new(),
            http: reqwest::Client::builder()
                .timeout(INTEGRATION_TIMEOUT)
                .build()
                .expect("integration HTTP client"),
            holds: Mutex::new(Vec::new()),
            held: std::sync::atomic::AtomicUsize::new(0),
            release: tokio::sync::watch::channel(false).0,
        });
        let app = router(Arc::clone(&shared));
        let shutdown = shared.shutdown.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
        });
        Self {
            shared,
            server: Some(server),
            team_id,
            bot_user_id,
            bot_token,
        }
    }

    /// `http://127.0.0.1:PORT` (the WebSocket is `ws://127.0.0.1:PORT/api/v4/websocket`).
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The pre-created team's id.
    pub fn team_id(&self) -> String {
        self.team_id.clone()
    }

    /// The bot user's id.
    pub fn bot_user_id(&self) -> String {
        self.bot_user_id.clone()
    }

    /// The bot's access token (send it as `Authorization: Bearer …` or in the WebSocket
    /// `authentication_challenge`).
    pub fn bot_token(&self) -> String {
        self.bot_token.clone()
    }

    /// Creates a human user on the team and returns its 26-character id. Its personal
    /// access token is available from [`FakeMattermost::user_token`]. Panics if the
    /// username is taken.
    pub fn add_user(&self, username: &str) -> String {
        let mut st = self.shared.lock();
        assert!(
            st.user_by_name(username).is_none(),
            "username {username} already exists"
        );
        st.add_user(username, false).0
    }

    /// The access token of a user created by [`FakeMattermost::add_user`] (or the bot).
    pub fn user_token(&self, user_id: &str) -> Option<String> {
        let st = self.shared.lock();
        st.tokens
            .iter()
            .find(|(_, uid)| uid.as_str() == user_id)
            .map(|(token, _)| token.clone())
    }

    /// Creates a public (`"O"`) channel on the team whose members are exactly `members`
    /// (user ids), and returns its id. No events or system posts. Panics on an invalid or
    /// duplicate name.
    pub fn create_channel(&self, name: &str, members: &[&str]) -> String {
        let mut st = self.shared.lock();
        let input = NewChannel {
            team_id: st.team.id.clone(),
            name: name.to_owned(),
            display_name: name.to_owned(),
            channel_type: "O".to_owned(),
            purpose: String::new(),
            header: String::new(),
        };
        let channel = st
            .create_channel(None, input)
            .unwrap_or_else(|e| panic!("create_channel({name}): {e}"));
        for member in members {
            st.join_channel(&channel.id, member);
        }
        channel.id
    }

    /// The direct-message channel (`"D"`, no team, named `{id}__{id}` with the ids sorted,
    /// as `POST /api/v4/channels/direct` makes it) between two users; made on first use.
    pub fn direct_channel(&self, a: &str, b: &str) -> String {
        let mut st = self.shared.lock();
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let name = format!("{lo}__{hi}");
        if let Some(c) = st.channels.iter().find(|c| c.name == name) {
            return c.id.clone();
        }
        let now = st.tick();
        let channel = Channel {
            id: new_id(),
            create_at: now,
            update_at: now,
            delete_at: 0,
            team_id: String::new(),
            channel_type: "D".to_owned(),
            display_name: String::new(),
            name,
            header: String::new(),
            purpose: String::new(),
            last_post_at: now,
            total_msg_count: 0,
            extra_update_at: 0,
            creator_id: String::new(),
            scheme_id: None,
            props: None,
            group_constrained: None,
            shared: None,
            total_msg_count_root: 0,
            policy_id: None,
            last_root_post_at: now,
        };
        let id = channel.id.clone();
        st.channels.push(channel);
        st.join_channel(&id, a);
        st.join_channel(&id, b);
        id
    }

    /// Adds `user_id` to a channel silently (no system post, no event), like a setup step.
    pub fn add_channel_member(&self, channel_id: &str, user_id: &str) {
        self.shared.lock().join_channel(channel_id, user_id);
    }

    /// A user writes a post as the web client would (`POST /api/v4/posts` with
    /// `set_online=true`): validated with the server's rules, stored with a server-assigned
    /// id and `create_at`, and broadcast as `posted` to every authenticated socket of a
    /// channel member (the author's own sockets included).
    pub fn post_as(
        &self,
        user_id: &str,
        channel_id: &str,
        root_id: Option<&str>,
        message: &str,
    ) -> Result<Post, FakeError> {
        let input = NewPost {
            channel_id: channel_id.to_owned(),
            message: message.to_owned(),
            root_id: root_id.unwrap_or_default().to_owned(),
            ..NewPost::default()
        };
        self.shared.lock().create_post(user_id, input, true)
    }

    /// Every live post and every deleted post (not the hidden old versions edits leave
    /// behind), in creation order, with edits applied.
    pub fn posts(&self) -> Vec<Post> {
        let st = self.shared.lock();
        st.posts.iter().map(|p| st.with_counts(p)).collect()
    }

    /// One post by id (current version).
    pub fn post(&self, id: &str) -> Option<Post> {
        let st = self.shared.lock();
        st.post(id).map(|p| st.with_counts(p))
    }

    /// The live posts of a thread: the root, then its replies in creation order.
    pub fn thread(&self, root_id: &str) -> Vec<Post> {
        let st = self.shared.lock();
        st.posts
            .iter()
            .filter(|p| p.delete_at == 0 && (p.id == root_id || p.root_id == root_id))
            .map(|p| st.with_counts(p))
            .collect()
    }

    /// Every post written by `user_id`, in creation order (system messages included).
    pub fn posts_by(&self, user_id: &str) -> Vec<Post> {
        let st = self.shared.lock();
        st.posts
            .iter()
            .filter(|p| p.user_id == user_id)
            .map(|p| st.with_counts(p))
            .collect()
    }

    /// Every HTTP request received so far, in arrival order (failed and rejected ones
    /// included, WebSocket upgrades included).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Sends every later post creation and edit (by anyone, the bot included) to the returned
    /// receiver, stamped with the time the fake stored it. A second call replaces the first
    /// receiver.
    pub fn watch_writes(&self) -> mpsc::UnboundedReceiver<PostWrite> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared.lock().write_watch = Some(tx);
        rx
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Simulates a user clicking the button `action_id` of `post_id` the way the server's
    /// `DoPostAction` does: POSTs the `PostActionIntegrationRequest` to the action's
    /// `integration.url` (JSON, no signature), then applies the integration's answer:
    /// `update` replaces the message (and the props when `update.props` is present, which
    /// keeps only `from_webhook`/`override_*` from the original), emitting `post_edited`;
    /// `ephemeral_text` is delivered to the clicker as an ephemeral post.
    pub async fn click(&self, post_id: &str, action_id: &str, user_id: &str) -> ClickOutcome {
        match do_post_action(&self.shared, post_id, action_id, user_id, None).await {
            Ok((response, _trigger_id)) => ClickOutcome::Ok { response },
            Err(ActionFailure::Api(e)) => ClickOutcome::Failed {
                status: e.status,
                body: e.body_json().to_string(),
            },
            Err(ActionFailure::Integration { status, body }) => {
                ClickOutcome::Failed { status, body }
            }
        }
    }

    /// Cuts every WebSocket abruptly, like a network loss: the TCP connection is closed
    /// without a close frame. Each connection stays known to the hub with its dead queue
    /// (the last 128 events), so a client can resume it; events published while it is
    /// disconnected are appended to that queue.
    pub fn drop_websockets(&self) {
        let mut st = self.shared.lock();
        for conn in &mut st.conns {
            if let Some(link) = conn.live.take() {
                link.cancel.cancel();
            }
        }
        for handle in st.sockets.values() {
            handle.cancel.cancel();
        }
    }

    /// Makes every WebSocket half-open: the TCP connection stays up but the server stops
    /// reading and writing (no events, no pongs, no ping frames), as when a peer vanishes
    /// without a FIN. Events are queued for resumption as after
    /// [`FakeMattermost::drop_websockets`]. The stalled sockets are closed by a later
    /// `drop_websockets` or `stop`.
    pub fn stall_websockets(&self) {
        let mut st = self.shared.lock();
        for conn in &mut st.conns {
            conn.live = None;
        }
        for handle in st.sockets.values() {
            handle.stall.cancel();
        }
    }

    /// While paused, WebSocket upgrade requests are refused with HTTP 503. Existing sockets
    /// are not touched (combine with [`FakeMattermost::drop_websockets`] for an outage).
    pub fn pause_websockets(&self) {
        self.shared.lock().ws_paused = true;
    }

    /// Accepts WebSocket upgrades again.
    pub fn resume_websockets(&self) {
        self.shared.lock().ws_paused = false;
    }

    /// Makes the next `n` HTTP requests whose path starts with `path_prefix` (for example
    /// `/api/v4/posts`) fail with `status` before any other processing. A 429 carries
    /// `X-Ratelimit-Limit/Remaining/Reset`, `Retry-After: retry_after_secs` when given, and
    /// the plain-text body `limit exceeded`; other statuses carry an AppError body with id
    /// `api.fake.injected_failure.app_error`.
    pub fn fail_next(
        &self,
        path_prefix: &str,
        n: usize,
        status: u16,
        retry_after_secs: Option<u64>,
    ) {
        self.shared.lock().failures.push(FailRule {
            path_prefix: path_prefix.to_owned(),
            remaining: n,
            status,
            retry_after_secs,
            after: false,
        });
    }

    /// Like [`FakeMattermost::fail_next`], but the request is handled first and only its answer
    /// is replaced by `status`: the server did the work and the client never heard (a gateway
    /// timeout). A client that retries a create must not make a second post.
    pub fn lose_next_answers(&self, path_prefix: &str, n: usize, status: u16) {
        self.shared.lock().failures.push(FailRule {
            path_prefix: path_prefix.to_owned(),
            remaining: n,
            status,
            retry_after_secs: None,
            after: true,
        });
    }

    /// From now on, a `POST /posts` whose message contains `needle` is not answered (nor the
    /// post made) until [`FakeMattermost::release_posts`]: a chat server that hangs.
    pub fn hold_posts_containing(&self, needle: &str) {
        self.shared
            .holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(needle.to_owned());
        self.shared.release.send_replace(false);
    }

    /// How many creates were held so far.
    pub fn held_posts(&self) -> usize {
        self.shared.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops holding: held creates go on (their client may be gone by then).
    pub fn release_posts(&self) {
        self.shared
            .holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.shared.release.send_replace(true);
    }

    /// Every typing notification received (REST or WebSocket `user_typing`), as
    /// `(user_id, channel_id, parent_id)`.
    pub fn typing_events(&self) -> Vec<(String, String, String)> {
        self.shared.lock().typing.clone()
    }

    /// Every ephemeral post sent, as `(recipient user_id, message)`: button
    /// `ephemeral_text` answers and `POST /api/v4/posts/ephemeral`.
    pub fn ephemeral_posts(&self) -> Vec<(String, String)> {
        self.shared.lock().ephemerals.clone()
    }

    /// Grants `user_id` the `create_post_ephemeral` permission, without which
    /// `POST /api/v4/posts/ephemeral` answers 403 (as on a real server, where only system
    /// admins hold it by default).
    pub fn grant_ephemeral_posts(&self, user_id: &str) {
        self.shared
            .lock()
            .ephemeral_posters
            .insert(user_id.to_owned());
    }

    /// The `OrderedSidebarCategories` JSON (`{"categories":[…],"order":[…]}`) of `user_id`
    /// for the team, exactly as `GET …/channels/categories` returns it (the default
    /// categories are created on first use, as the server does).
    pub fn sidebar_categories(&self, user_id: &str) -> Value {
        let mut st = self.shared.lock();
        let team = st.team.id.clone();
        st.sidebar_json(user_id, &team)
    }

    /// A channel of the team by name.
    pub fn channel_by_name(&self, name: &str) -> Option<Channel> {
        let st = self.shared.lock();
        st.channels.iter().find(|c| c.name == name).cloned()
    }

    /// A channel by id.
    pub fn channel_by_id(&self, id: &str) -> Option<Channel> {
        let st = self.shared.lock();
        st.channels.iter().find(|c| c.id == id).cloned()
    }

    /// How many channels exist (deleted ones and direct messages included).
    pub fn channel_count(&self) -> usize {
        self.shared.lock().channels.len()
    }

    /// The user ids of a channel's members, in join order.
    pub fn channel_members(&self, channel_id: &str) -> Vec<String> {
        let st = self.shared.lock();
        st.members
            .get(channel_id)
            .map(|m| m.iter().map(|(u, _)| u.clone()).collect())
            .unwrap_or_default()
    }

    /// The users following a thread through `PUT …/threads/{thread_id}/following`.
    pub fn followers(&self, thread_id: &str) -> Vec<String> {
        let st = self.shared.lock();
        st.followers.get(thread_id).cloned().unwrap_or_default()
    }

    /// The reactions on a post, in the order they were added.
    pub fn reactions(&self, post_id: &str) -> Vec<Reaction> {
        let st = self.shared.lock();
        st.reactions
            .iter()
            .filter(|r| r.post_id == post_id)
            .cloned()
            .collect()
    }

    /// Number of WebSocket connections currently open and authenticated (stalled ones are
    /// not counted).
    pub fn websocket_connections(&self) -> usize {
        self.shared
            .lock()
            .conns
            .iter()
            .filter(|c| c.live.is_some())
            .count()
    }

    /// Stops the server: closes every socket and waits (up to 5 s) for the HTTP server.
    pub async fn stop(mut self) {
        self.shared.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for FakeMattermost {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

// ------------------------------------------------------------------------------------------
// 2. Server state and domain operations
// ------------------------------------------------------------------------------------------

/// What every handler and socket task shares.
struct Shared {
    state: Mutex<State>,
    base_url: String,
    /// Cancelled by `stop`/drop: ends the HTTP server and every socket.
    shutdown: CancellationToken,
    /// Client for the button integrations.
    http: reqwest::Client,
    /// Creates of posts whose message contains one of these wait for
    /// [`FakeMattermost::release_posts`] (a server that hangs on a request).
    holds: Mutex<Vec<String>>,
    /// How many creates are (or were) held.
    held: std::sync::atomic::AtomicUsize,
    /// Releases the held creates.
    release: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// Locks the state. Never hold the guard across an `.await`.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Debug)]
struct Team {
    id: String,
    name: String,
    display_name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SidebarCategory {
    id: String,
    user_id: String,
    team_id: String,
    sort_order: i64,
    sorting: String,
    #[serde(rename = "type")]
    kind: String,
    display_name: String,
    muted: bool,
    collapsed: bool,
    /// Channels explicitly placed in this category (for `channels`, the implicit ones are
    /// added when the category is rendered).
    channel_ids: Vec<String>,
}

/// How long Mattermost remembers a `pending_post_id` (`PendingPostIDsCacheTTL`).
const PENDING_POST_IDS_TTL: Duration = Duration::from_secs(30);

struct FailRule {
    path_prefix: String,
    remaining: usize,
    status: u16,
    retry_after_secs: Option<u64>,
    /// Handle the request, then answer `status` instead of its real answer (a response lost
    /// on the way back, e.g. a gateway timeout after the server did the work).
    after: bool,
}

/// A hub connection: survives socket drops so that it can be resumed.
struct WsConn {
    id: String,
    user_id: String,
    /// The `seq` of the next event.
    next_seq: i64,
    /// The last `DEAD_QUEUE_SIZE` events sent or queued, as `(seq, frame)`.
    dead_queue: VecDeque<(i64, String)>,
    /// The socket currently attached, if any.
    live: Option<LiveLink>,
}

struct LiveLink {
    tx: mpsc::UnboundedSender<String>,
    cancel: CancellationToken,
    socket: u64,
}

/// Every open socket (authenticated or not), so that it can be cut or stalled.
struct SocketHandle {
    cancel: CancellationToken,
    stall: CancellationToken,
}

/// `WebsocketBroadcast`, in the server's field order.
#[derive(Clone, Debug, Default, Serialize)]
struct Broadcast {
    omit_users: Option<BTreeMap<String, bool>>,
    user_id: String,
    channel_id: String,
    team_id: String,
    connection_id: String,
    omit_connection_id: String,
}

impl Broadcast {
    fn channel(channel_id: &str) -> Self {
        Self {
            channel_id: channel_id.to_owned(),
            ..Self::default()
        }
    }

    fn user(user_id: &str) -> Self {
        Self {
            user_id: user_id.to_owned(),
            ..Self::default()
        }
    }
}

/// The fields of `POST /api/v4/posts` (nulls are accepted like Go's decoder does).
#[derive(Debug, Default, Deserialize)]
struct NewPost {
    #[serde(default, deserialize_with = "null_default")]
    channel_id: String,
    #[serde(default, deserialize_with = "null_default")]
    message: String,
    #[serde(default, deserialize_with = "null_default")]
    root_id: String,
    #[serde(default)]
    props: Option<Value>,
    #[serde(default, deserialize_with = "null_default")]
    file_ids: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    pending_post_id: String,
    #[serde(default, rename = "type", deserialize_with = "null_default")]
    post_type: String,
}

/// The fields of `POST /api/v4/channels`.
#[derive(Debug, Default, Deserialize)]
struct NewChannel {
    #[serde(default, deserialize_with = "null_default")]
    team_id: String,
    #[serde(default, deserialize_with = "null_default")]
    name: String,
    #[serde(default, deserialize_with = "null_default")]
    display_name: String,
    #[serde(default, rename = "type", deserialize_with = "null_default")]
    channel_type: String,
    #[serde(default, deserialize_with = "null_default")]
    purpose: String,
    #[serde(default, deserialize_with = "null_default")]
    header: String,
}

/// The mutable fields of a post, as `UpdatePost` receives them.
#[derive(Debug, Clone)]
struct PostUpdate {
    message: String,
    props: Value,
    file_ids: Vec<String>,
    is_pinned: bool,
    has_reactions: bool,
}

struct State {
    /// Last timestamp handed out; timestamps are strictly increasing.
    clock: i64,
    team: Team,
    users: Vec<User>,
    /// token -> user id
    tokens: HashMap<String, String>,
    channels: Vec<Channel>,
    /// channel id -> (user id, joined at), in join order
    members: HashMap<String, Vec<(String, i64)>>,
    /// Current versions, in creation order.
    posts: Vec<Post>,
    post_index: HashMap<String, usize>,
    /// Old versions left behind by edits (deleted, `original_id` set): only `?since=` sees them.
    history: Vec<Post>,
    reactions: Vec<Reaction>,
    /// (user id, team id) -> categories in sidebar order
    sidebars: HashMap<(String, String), Vec<SidebarCategory>>,
    followers: HashMap<String, Vec<String>>,
    typing: Vec<(String, String, String)>,
    ephemerals: Vec<(String, String)>,
    /// Users holding `create_post_ephemeral` (on a real server only system admins do).
    ephemeral_posters: HashSet<String>,
    requests: Vec<RecordedRequest>,
    failures: Vec<FailRule>,
    /// `pending_post_id` → (the post it made, when): Mattermost's de-duplication cache.
    pending_post_ids: HashMap<String, (String, Instant)>,
    conns: Vec<WsConn>,
    sockets: HashMap<u64, SocketHandle>,
    next_socket: u64,
    ws_paused: bool,
    /// Where [`FakeMattermost::watch_writes`] sends each stored post creation and edit.
    write_watch: Option<mpsc::UnboundedSender<PostWrite>>,
}

impl State {
    fn new() -> Self {
        Self {
            clock: 0,
            team: Team {
                id: new_id(),
                name: "fake-team".to_owned(),
                display_name: "Fake Team".to_owned(),
            },
            users: Vec::new(),
            tokens: HashMap::new(),
            channels: Vec::new(),
            members: HashMap::new(),
            posts: Vec::new(),
            post_index: HashMap::new(),
            history: Vec::new(),
            reactions: Vec::new(),
            sidebars: HashMap::new(),
            followers: HashMap::new(),
            typing: Vec::new(),
            ephemerals: Vec::new(),
            ephemeral_posters: HashSet::new(),
            requests: Vec::new(),
            failures: Vec::new(),
            pending_post_ids: HashMap::new(),
            conns: Vec::new(),
            sockets: HashMap::new(),
            next_socket: 0,
            ws_paused: false,
            write_watch: None,
        }
    }

    /// A fresh timestamp: wall-clock milliseconds, but strictly greater than the last one so
    /// that `create_at`/`update_at` order and `?since=` comparisons are exact.
    fn tick(&mut self) -> i64 {
        self.clock = now_ms().max(self.clock + 1);
        self.clock
    }

    // ---- users -------------------------------------------------------------------------

    fn add_user(&mut self, username: &str, is_bot: bool) -> (String, String) {
        let now = self.tick();
        let user = User {
            id: new_id(),
            create_at: now,
            update_at: now,
            delete_at: 0,
            username: username.to_owned(),
            auth_data: String::new(),
            auth_service: String::new(),
            email: format!("{username}@fake.test"),
            email_verified: true,
            nickname: String::new(),
            first_name: String::new(),
            last_name: String::new(),
            position: String::new(),
            roles: "system_user".to_owned(),
            locale: "en".to_owned(),
            timezone: json!({"automaticTimezone": "", "manualTimezone": "", "useAutomaticTimezone": "true"}),
            is_bot,
            bot_description: if is_bot {
                "Fake bot".to_owned()
            } else {
                String::new()
            },
        };
        let token = new_id();
        self.tokens.insert(token.clone(), user.id.clone());
        let id = user.id.clone();
        self.users.push(user);
        (id, token)
    }

    fn user(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    fn user_by_name(&self, username: &str) -> Option<&User> {
        self.users.iter().find(|u| u.username == username)
    }

    fn username(&self, id: &str) -> String {
        self.user(id)
            .map(|u| u.username.clone())
            .unwrap_or_default()
    }

    // ---- channels ----------------------------------------------------------------------

    fn channel(&self, id: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.id == id)
    }

    fn channel_mut(&mut self, id: &str) -> Option<&mut Channel> {
        self.channels.iter_mut().find(|c| c.id == id)
    }

    fn is_member(&self, channel_id: &str, user_id: &str) -> bool {
        self.members
            .get(channel_id)
            .is_some_and(|m| m.iter().any(|(u, _)| u == user_id))
    }

    fn member_ids(&self, channel_id: &str) -> Vec<String> {
        self.members
            .get(channel_id)
            .map(|m| m.iter().map(|(u, _)| u.clone()).collect())
            .unwrap_or_default()
    }

    /// Read access: members, and every team member for a public channel.
    fn can_read(&self, channel_id: &str, user_id: &str) -> bool {
        match self.channel(channel_id) {
            Some(c) => c.channel_type == "O" || self.is_member(channel_id, user_id),
            None => false,
        }
    }

    /// Validates and stores a channel (`Channel.IsValid` + the store's uniqueness check).
    fn create_channel(
        &mut self,
        creator: Option<&str>,
        input: NewChannel,
    ) -> Result<Channel, FakeError> {
        if input.team_id != self.team.id {
            return Err(FakeError::forbidden());
        }
        if input.channel_type != "O" && input.channel_type != "P" {
            return Err(channel_invalid(
                "model.channel.is_valid.type.app_error",
                "Invalid type.",
            ));
        }
        if input.display_name.chars().count() > 64 {
            return Err(channel_invalid(
                "model.channel.is_valid.display_name.app_error",
                "Invalid display name.",
            ));
        }
        if !is_valid_channel_identifier(&input.name) {
            return Err(channel_invalid(
                "model.channel.is_valid.1_or_more.app_error",
                "Name must be 1 or more lowercase alphanumeric characters.",
            ));
        }
        if input.header.chars().count() > 1024 {
            return Err(channel_invalid(
                "model.channel.is_valid.header.app_error",
                "Invalid header.",
            ));
        }
        if input.purpose.chars().count() > 250 {
            return Err(channel_invalid(
                "model.channel.is_valid.purpose.app_error",
                "Invalid purpose.",
            ));
        }
        if looks_like_dm_or_gm_name(&input.name) {
            return Err(channel_invalid(
                "model.channel.is_valid.name.app_error",
                "Invalid channel name.",
            ));
        }
        if self
            .channels
            .iter()
            .any(|c| c.team_id == input.team_id && c.name == input.name)
        {
            return Err(FakeError::new(
                400,
                "store.sql_channel.save_channel.exists.app_error",
                "A channel with that name already exists on the same team.",
            ));
        }
        let now = self.tick();
        let channel = Channel {
            id: new_id(),
            create_at: now,
            update_at: now,
            delete_at: 0,
            team_id: input.team_id,
            channel_type: input.channel_type,
            display_name: input.display_name,
            name: input.name,
            header: input.header,
            purpose: input.purpose,
            last_post_at: now,
            total_msg_count: 0,
            extra_update_at: 0,
            creator_id: creator.unwrap_or_default().to_owned(),
            scheme_id: None,
            props: None,
            group_constrained: None,
            shared: None,
            total_msg_count_root: 0,
            policy_id: None,
            last_root_post_at: now,
        };
        self.channels.push(channel.clone());
        self.members.insert(channel.id.clone(), Vec::new());
        if let Some(creator) = creator {
            self.join_channel(&channel.id, creator);
        }
        Ok(channel)
    }

    /// Adds a member without side effects; returns false if already a member.
    fn join_channel(&mut self, channel_id: &str, user_id: &str) -> bool {
        if self.is_member(channel_id, user_id) {
            return false;
        }
        let now = self.tick();
        self.members
            .entry(channel_id.to_owned())
            .or_default()
            .push((user_id.to_owned(), now));
        true
    }

    fn channel_member_json(&self, channel_id: &str, user_id: &str) -> Value {
        let joined = self
            .members
            .get(channel_id)
            .and_then(|m| m.iter().find(|(u, _)| u == user_id))
            .map(|(_, at)| *at)
            .unwrap_or_default();
        serde_json::to_value(ChannelMember {
            channel_id: channel_id.to_owned(),
            user_id: user_id.to_owned(),
            roles: "channel_user".to_owned(),
            last_viewed_at: 0,
            msg_count: 0,
            mention_count: 0,
            mention_count_root: 0,
            urgent_mention_count: 0,
            msg_count_root: 0,
            notify_props: json!({
                "desktop": "default", "email": "default", "ignore_channel_mentions": "default",
                "mark_unread": "all", "push": "default"
            }),
            last_update_at: joined,
            scheme_guest: false,
            scheme_user: true,
            scheme_admin: false,
            explicit_roles: String::new(),
        })
        .expect("channel member JSON")
    }

    // ---- posts -------------------------------------------------------------------------

    fn post(&self, id: &str) -> Option<&Post> {
        self.post_index.get(id).map(|&i| &self.posts[i])
    }

    fn post_mut(&mut self, id: &str) -> Option<&mut Post> {
        match self.post_index.get(id) {
            Some(&i) => Some(&mut self.posts[i]),
            None => None,
        }
    }

    /// Number of live replies in the thread `post` belongs to.
    fn reply_count(&self, post: &Post) -> i64 {
        let root = if post.root_id.is_empty() {
            &post.id
        } else {
            &post.root_id
        };
        self.posts
            .iter()
            .filter(|p| p.delete_at == 0 && &p.root_id == root)
            .count() as i64
    }

    /// The server-side copy with the computed reply count (integration kept).
    fn with_counts(&self, post: &Post) -> Post {
        let mut p = post.clone();
        p.reply_count = self.reply_count(post);
        p
    }

    /// What clients see: computed reply count, `integration` stripped.
    fn client_post(&self, post: &Post) -> Post {
        let mut p = self.with_counts(post);
        strip_action_integrations(&mut p.props);
        p
    }

    /// `CreatePost`: validation, storage, channel counters, the root's `update_at`, and the
    /// `posted` event. Returns the client view.
    fn create_post(
        &mut self,
        author: &str,
        input: NewPost,
        set_online: bool,
    ) -> Result<Post, FakeError> {
        // Mattermost's `deduplicateCreatePost` (server/channels/app/post.go): a create that
        // repeats a `pending_post_id` seen in the last 30 s (`PendingPostIDsCacheTTL`) returns
        // the post the first one made instead of making another.
        if !input.pending_post_id.is_empty() {
            let now = Instant::now();
            self.pending_post_ids
                .retain(|_, (_, at)| now.duration_since(*at) < PENDING_POST_IDS_TTL);
            if let Some((id, _)) = self.pending_post_ids.get(&input.pending_post_id) {
                let existing = self.post(id).cloned();
                if let Some(post) = existing {
                    return Ok(self.with_counts(&post));
                }
            }
        }
        let pending_key = input.pending_post_id.clone();
        let created = self.create_post_anew(author, input, set_online)?;
        if !pending_key.is_empty() {
            self.pending_post_ids
                .insert(pending_key, (created.id.clone(), Instant::now()));
        }
        Ok(created)
    }

    fn create_post_anew(
        &mut self,
        author: &str,
        input: NewPost,
        set_online: bool,
    ) -> Result<Post, FakeError> {
        let Some(channel) = self.channel(&input.channel_id).cloned() else {
            return Err(FakeError::forbidden());
        };
        if !self.is_member(&channel.id, author) {
            return Err(FakeError::forbidden());
        }
        if !input.root_id.is_empty() {
            let root = self.post(&input.root_id).filter(|p| p.delete_at == 0);
            let Some(root) = root else {
                return Err(root_id_error());
            };
            if !root.root_id.is_empty() {
                return Err(root_id_error());
            }
            if root.channel_id != channel.id {
                return Err(FakeError::new(
                    400,
                    "api.post.create_post.channel_root_id.app_error",
                    "Invalid ChannelId for RootId parameter.",
                ));
            }
        }
        let author_is_bot = self.user(author).is_some_and(|u| u.is_bot);
        let mut props = match input.props {
            Some(Value::Object(map)) => Value::Object(map),
            Some(Value::Null) | None => json!({}),
            Some(_) => return Err(FakeError::invalid_body("post")),
        };
        if author_is_bot {
            props["from_bot"] = json!("true");
        }
        generate_action_ids(&mut props);
        validate_post_content(&input.message, &props)?;
        if !is_valid_post_type(&input.post_type) {
            return Err(FakeError::new(
                400,
                "model.post.is_valid.type.app_error",
                "Invalid type.",
            ));
        }
        let now = self.tick();
        let mut file_ids: Vec<String> = Vec::new();
        for id in input.file_ids {
            if !file_ids.contains(&id) {
                file_ids.push(id);
            }
        }
        let post = Post {
            id: new_id(),
            create_at: now,
            update_at: now,
            edit_at: 0,
            delete_at: 0,
            is_pinned: false,
            user_id: author.to_owned(),
            channel_id: channel.id.clone(),
            root_id: input.root_id.clone(),
            original_id: String::new(),
            hashtags: parse_hashtags(&input.message),
            message: input.message,
            post_type: input.post_type,
            props,
            file_ids,
            pending_post_id: input.pending_post_id,
            has_reactions: false,
            remote_id: Some(String::new()),
            reply_count: 0,
            last_reply_at: 0,
            participants: Value::Null,
            metadata: json!({}),
        };
        self.post_index.insert(post.id.clone(), self.posts.len());
        self.posts.push(post.clone());
        if !post.root_id.is_empty() {
            if let Some(root) = self.post_mut(&post.root_id) {
                root.update_at = now;
            }
        }
        if let Some(c) = self.channel_mut(&post.channel_id) {
            c.last_post_at = now;
            c.total_msg_count += 1;
            if post.root_id.is_empty() {
                c.total_msg_count_root += 1;
                c.last_root_post_at = now;
            }
        }
        self.notify_write(PostWriteKind::Create, &post);
        let client = self.client_post(&post);
        self.publish_posted(&client, &channel, set_online);
        Ok(client)
    }

    /// Tells the [`FakeMattermost::watch_writes`] receiver, if any, about a stored write.
    fn notify_write(&mut self, kind: PostWriteKind, post: &Post) {
        let Some(tx) = &self.write_watch else { return };
        let write = PostWrite {
            at: SystemTime::now(),
            kind,
            post_id: post.id.clone(),
            root_id: post.root_id.clone(),
            channel_id: post.channel_id.clone(),
            user_id: post.user_id.clone(),
            message: post.message.clone(),
            props: post.props.clone(),
        };
        if tx.send(write).is_err() {
            self.write_watch = None;
        }
    }

    /// The `posted` event (`data.post` is a JSON string), with `mentions` added for the
    /// mentioned recipients as the broadcast hook does.
    fn publish_posted(&mut self, client: &Post, channel: &Channel, set_online: bool) {
        let mut data = Map::new();
        data.insert("channel_display_name".into(), json!(channel.display_name));
        data.insert("channel_name".into(), json!(channel.name));
        data.insert("channel_type".into(), json!(channel.channel_type));
        data.insert("post".into(), json!(post_json_string(client)));
        data.insert(
            "sender_name".into(),
            json!(format!("@{}", self.username(&client.user_id))),
        );
        data.insert("set_online".into(), json!(set_online));
        data.insert("team_id".into(), json!(channel.team_id));
        let mentioned = self.mentioned_users(&channel.id, &client.user_id, &client.message);
        self.publish("posted", data, Broadcast::channel(&channel.id), &mentioned);
    }

    /// Channel members mentioned by `@username`, `@channel`, `@all` or `@here` (never the author).
    fn mentioned_users(&self, channel_id: &str, author: &str, message: &str) -> Vec<String> {
        let everyone = ["@channel", "@all", "@here"]
            .iter()
            .any(|m| contains_mention(message, &m[1..]));
        self.member_ids(channel_id)
            .into_iter()
            .filter(|uid| uid != author)
            .filter(|uid| everyone || contains_mention(message, &self.username(uid)))
            .collect()
    }

    /// `UpdatePost` (safe_update = false): applies the received fields, sets `edit_at` when
    /// the message, the files or the attachments change, keeps the old version as a deleted
    /// copy, bumps the root's `update_at`, and emits `post_edited`.
    fn update_post(&mut self, post_id: &str, update: PostUpdate) -> Result<Post, FakeError> {
        let Some(old) = self.post(post_id).cloned() else {
            return Err(FakeError::new(
                400,
                "api.post.update_post.find.app_error",
                "We couldn't find the existing post or comment to update.",
            ));
        };
        if old.delete_at != 0 {
            return Err(FakeError::new(
                400,
                "api.post.update_post.permissions_details.app_error",
                "Already deleted id=".to_owned() + post_id,
            ));
        }
        let mut props = update.props;
        if !props.is_object() {
            props = json!({});
        }
        generate_action_ids(&mut props);
        validate_post_content(&update.message, &props)?;
        let now = self.tick();
        let mut new = old.clone();
        if new.message != update.message {
            new.message = update.message;
            new.edit_at = now;
            new.hashtags = parse_hashtags(&new.message);
        }
        new.is_pinned = update.is_pinned;
        new.has_reactions = update.has_reactions;
        new.file_ids = update.file_ids;
        new.props = props;
        if new.edit_at == old.edit_at
            && (new.file_ids != old.file_ids
                || new.props.get("attachments") != old.props.get("attachments"))
        {
            new.edit_at = now;
        }
        new.update_at = now;
        let mut kept = old;
        kept.original_id = kept.id.clone();
        kept.id = new_id();
        kept.delete_at = now;
        kept.update_at = now;
        self.history.push(kept);
        if !new.root_id.is_empty() {
            if let Some(root) = self.post_mut(&new.root_id) {
                root.update_at = root.update_at.max(now);
            }
        }
        *self.post_mut(post_id).expect("post exists") = new.clone();
        self.notify_write(PostWriteKind::Edit, &new);
        let client = self.client_post(&new);
        let mut data = Map::new();
        data.insert("post".into(), json!(post_json_string(&client)));
        self.publish(
            "post_edited",
            data,
            Broadcast::channel(&client.channel_id),
            &[],
        );
        Ok(client)
    }

    /// Soft-deletes a post (and its replies when it is a root) and emits `post_deleted`.
    fn delete_post(&mut self, post_id: &str, by: &str) {
        let now = self.tick();
        let mut deleted = None;
        for p in &mut self.posts {
            if p.delete_at == 0 && (p.id == post_id || p.root_id == post_id) {
                p.delete_at = now;
                p.update_at = now;
                p.props["deleteBy"] = json!(by);
                if p.id == post_id {
                    deleted = Some(p.clone());
                }
            }
        }
        if let Some(post) = deleted {
            let client = self.client_post(&post);
            let mut data = Map::new();
            data.insert("delete_by".into(), json!(by));
            data.insert("post".into(), json!(post_json_string(&client)));
            self.publish(
                "post_deleted",
                data,
                Broadcast::channel(&post.channel_id),
                &[],
            );
        }
    }

    /// `SendEphemeralPost`: recorded, and sent as `ephemeral_message` to the user only.
    fn send_ephemeral(
        &mut self,
        to_user: &str,
        from_user: &str,
        channel_id: &str,
        root_id: &str,
        message: &str,
    ) -> Post {
        let now = self.tick();
        let post = Post {
            id: new_id(),
            create_at: now,
            update_at: now,
            edit_at: 0,
            delete_at: 0,
            is_pinned: false,
            user_id: from_user.to_owned(),
            channel_id: channel_id.to_owned(),
            root_id: root_id.to_owned(),
            original_id: String::new(),
            message: message.to_owned(),
            post_type: "system_ephemeral".to_owned(),
            props: json!({}),
            hashtags: String::new(),
            file_ids: Vec::new(),
            pending_post_id: String::new(),
            has_reactions: false,
            remote_id: None,
            reply_count: 0,
            last_reply_at: 0,
            participants: Value::Null,
            metadata: json!({}),
        };
        self.ephemerals
            .push((to_user.to_owned(), message.to_owned()));
        let mut data = Map::new();
        data.insert("post".into(), json!(post_json_string(&post)));
        let mut broadcast = Broadcast::user(to_user);
        broadcast.channel_id = channel_id.to_owned();
        self.publish("ephemeral_message", data, broadcast, &[]);
        post
    }

    /// `PublishUserTyping`: recorded, and sent to the channel except the typer.
    fn user_typing(&mut self, user_id: &str, channel_id: &str, parent_id: &str) {
        self.typing.push((
            user_id.to_owned(),
            channel_id.to_owned(),
            parent_id.to_owned(),
        ));
        let mut data = Map::new();
        data.insert("parent_id".into(), json!(parent_id));
        data.insert("user_id".into(), json!(user_id));
        let mut broadcast = Broadcast::channel(channel_id);
        broadcast.omit_users = Some(BTreeMap::from([(user_id.to_owned(), true)]));
        self.publish("typing", data, broadcast, &[]);
    }

    /// Builds a `PostList`.
    fn post_list(&self, order: Vec<String>, extra: &[&Post], has_next: Option<bool>) -> PostList {
        let mut posts = BTreeMap::new();
        for p in extra {
            posts.insert(p.id.clone(), self.client_post(p));
        }
        PostList {
            order,
            posts,
            next_post_id: String::new(),
            prev_post_id: String::new(),
            has_next,
            first_inaccessible_post_time: 0,
        }
    }

    // ---- reactions ---------------------------------------------------------------------

    fn add_reaction(&mut self, user_id: &str, post_id: &str, emoji: &str) -> Reaction {
        let now = self.tick();
        let channel_id = self
            .post(post_id)
            .map(|p| p.channel_id.clone())
            .unwrap_or_default();
        let reaction = Reaction {
            user_id: user_id.to_owned(),
            post_id: post_id.to_owned(),
            emoji_name: emoji.to_owned(),
            create_at: now,
            update_at: now,
            delete_at: 0,
            remote_id: String::new(),
            channel_id: channel_id.clone(),
        };
        self.reactions
            .retain(|r| !(r.user_id == user_id && r.post_id == post_id && r.emoji_name == emoji));
        self.reactions.push(reaction.clone());
        if let Some(p) = self.post_mut(post_id) {
            p.has_reactions = true;
            p.update_at = now;
        }
        let mut data = Map::new();
        data.insert(
            "reaction".into(),
            json!(serde_json::to_string(&reaction).expect("reaction JSON")),
        );
        self.publish("reaction_added", data, Broadcast::channel(&channel_id), &[]);
        reaction
    }

    fn remove_reaction(&mut self, user_id: &str, post_id: &str, emoji: &str) {
        let Some(pos) = self
            .reactions
            .iter()
            .position(|r| r.user_id == user_id && r.post_id == post_id && r.emoji_name == emoji)
        else {
            return;
        };
        let mut reaction = self.reactions.remove(pos);
        let now = self.tick();
        reaction.update_at = now;
        reaction.delete_at = now;
        let still = self.reactions.iter().any(|r| r.post_id == post_id);
        if let Some(p) = self.post_mut(post_id) {
            p.has_reactions = still;
            p.update_at = now;
        }
        let mut data = Map::new();
        data.insert(
            "reaction".into(),
            json!(serde_json::to_string(&reaction).expect("reaction JSON")),
        );
        self.publish(
            "reaction_removed",
            data,
            Broadcast::channel(&reaction.channel_id),
            &[],
        );
    }

    // ---- sidebar -----------------------------------------------------------------------

    /// Creates the default categories on first use, as `GetSidebarCategories` does.
    fn ensure_sidebar(&mut self, user_id: &str, team_id: &str) {
        let key = (user_id.to_owned(), team_id.to_owned());
        if self.sidebars.contains_key(&key) {
            return;
        }
        let defaults = [
            ("favorites", "Favorites", ""),
            ("channels", "Channels", ""),
            ("direct_messages", "Direct Messages", "recent"),
        ];
        let categories = defaults
            .iter()
            .enumerate()
            .map(|(i, (kind, name, sorting))| SidebarCategory {
                id: format!("{kind}_{user_id}_{team_id}"),
                user_id: user_id.to_owned(),
                team_id: team_id.to_owned(),
                sort_order: i as i64 * SIDEBAR_SORT_DISTANCE,
                sorting: (*sorting).to_owned(),
                kind: (*kind).to_owned(),
                display_name: (*name).to_owned(),
                muted: false,
                collapsed: false,
                channel_ids: Vec::new(),
            })
            .collect();
        self.sidebars.insert(key, categories);
    }

    /// A category as the server renders it: channels the user left are gone, and the
    /// `channels` category also lists (first, by display name) every public/private channel
    /// of the team the user is in that no category holds.
    fn category_view(&self, cat: &SidebarCategory) -> SidebarCategory {
        let mut view = cat.clone();
        view.channel_ids.retain(|c| self.is_member(c, &cat.user_id));
        if cat.kind == "channels" {
            let key = (cat.user_id.clone(), cat.team_id.clone());
            let placed: HashSet<&String> = self
                .sidebars
                .get(&key)
                .map(|cats| cats.iter().flat_map(|c| c.channel_ids.iter()).collect())
                .unwrap_or_default();
            let mut implicit: Vec<&Channel> = self
                .channels
                .iter()
                .filter(|c| c.team_id == cat.team_id && c.delete_at == 0)
                .filter(|c| c.channel_type == "O" || c.channel_type == "P")
                .filter(|c| self.is_member(&c.id, &cat.user_id) && !placed.contains(&c.id))
                .collect();
            implicit.sort_by(|a, b| a.display_name.cmp(&b.display_name));
            let mut ids: Vec<String> = implicit.into_iter().map(|c| c.id.clone()).collect();
            ids.append(&mut view.channel_ids);
            view.channel_ids = ids;
        }
        view
    }

    fn sidebar_json(&mut self, user_id: &str, team_id: &str) -> Value {
        self.ensure_sidebar(user_id, team_id);
        let cats = &self.sidebars[&(user_id.to_owned(), team_id.to_owned())];
        let categories: Vec<SidebarCategory> = cats.iter().map(|c| self.category_view(c)).collect();
        let order: Vec<String> = cats.iter().map(|c| c.id.clone()).collect();
        json!({ "categories": categories, "order": order })
    }

    /// Keeps the channels `user_id` is a member of, without duplicates (others are dropped
    /// silently, as the server does).
    fn member_channels_only(&self, user_id: &str, ids: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for id in ids {
            if self.is_member(id, user_id) && !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    }

    fn create_category(
        &mut self,
        user_id: &str,
        team_id: &str,
        input: CategoryInput,
    ) -> SidebarCategory {
        self.ensure_sidebar(user_id, team_id);
        let channel_ids = self.member_channels_only(user_id, &input.channel_ids);
        let cats = self
            .sidebars
            .get_mut(&(user_id.to_owned(), team_id.to_owned()))
            .expect("sidebar exists");
        for cat in cats.iter_mut() {
            cat.channel_ids.retain(|c| !channel_ids.contains(c));
        }
        let category = SidebarCategory {
            id: new_id(),
            user_id: user_id.to_owned(),
            team_id: team_id.to_owned(),
            sort_order: 0,
            sorting: input.sorting,
            kind: "custom".to_owned(),
            display_name: input.display_name,
            muted: input.muted,
            collapsed: input.collapsed,
            channel_ids,
        };
        let at = usize::from(cats.first().is_some_and(|c| c.kind == "favorites"));
        cats.insert(at, category.clone());
        for (i, cat) in cats.iter_mut().enumerate() {
            cat.sort_order = i as i64 * SIDEBAR_SORT_DISTANCE;
        }
        let created = cats[at].clone();
        self.category_view(&created)
    }

    /// `UpdateSidebarCategories`: read-only fields are kept, only custom categories can be
    /// renamed, `channel_ids` replace the category's channels (non-member ones dropped) and
    /// leave every other category.
    fn update_categories(
        &mut self,
        user_id: &str,
        team_id: &str,
        inputs: Vec<CategoryInput>,
    ) -> Result<Vec<SidebarCategory>, FakeError> {
        self.ensure_sidebar(user_id, team_id);
        let key = (user_id.to_owned(), team_id.to_owned());
        for input in &inputs {
            let known = self.sidebars[&key].iter().any(|c| c.id == input.id);
            let foreign = (!input.user_id.is_empty() && input.user_id != user_id)
                || (!input.team_id.is_empty() && input.team_id != team_id);
            if !known || foreign {
                return Err(FakeError::invalid_body("category"));
            }
        }
        let mut updated_ids = Vec::new();
        for input in inputs {
            let channel_ids = self.member_channels_only(user_id, &input.channel_ids);
            let cats = self.sidebars.get_mut(&key).expect("sidebar exists");
            let is_dm = cats
                .iter()
                .any(|c| c.id == input.id && c.kind == "direct_messages");
            if !is_dm {
                for cat in cats.iter_mut().filter(|c| c.id != input.id) {
                    cat.channel_ids.retain(|c| !channel_ids.contains(c));
                }
            }
            let cat = cats
                .iter_mut()
                .find(|c| c.id == input.id)
                .expect("known category");
            if cat.kind == "custom" {
                cat.display_name = input.display_name;
            }
            cat.sorting = input.sorting;
            cat.collapsed = input.collapsed;
            if !is_dm {
                cat.channel_ids = channel_ids;
                cat.muted = input.muted;
            }
            updated_ids.push(cat.id.clone());
        }
        let cats = &self.sidebars[&key];
        Ok(updated_ids
            .iter()
            .filter_map(|id| cats.iter().find(|c| &c.id == id))
            .map(|c| self.category_view(c))
            .collect())
    }

    // ---- WebSocket hub -----------------------------------------------------------------

    /// Sends an event to every eligible connection, as the hub's `ShouldSendEvent` decides:
    /// a `user_id` broadcast goes to that user only, a `channel_id` one to the channel's
    /// members minus `omit_users`. Each connection stamps its own `seq`; the frame is kept
    /// in its dead queue and written to the socket when one is attached.
    fn publish(
        &mut self,
        event: &str,
        data: Map<String, Value>,
        broadcast: Broadcast,
        mentioned: &[String],
    ) {
        let recipients: Option<HashSet<String>> = if !broadcast.user_id.is_empty() {
            Some(HashSet::from([broadcast.user_id.clone()]))
        } else if !broadcast.channel_id.is_empty() {
            Some(self.member_ids(&broadcast.channel_id).into_iter().collect())
        } else {
            None
        };
        let omitted: HashSet<String> = broadcast
            .omit_users
            .as_ref()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let event_json = serde_json::to_string(event).expect("event name");
        let broadcast_json = serde_json::to_string(&broadcast).expect("broadcast JSON");
        let plain_data = serde_json::to_string(&data).expect("event data");
        for conn in &mut self.conns {
            let eligible = recipients
                .as_ref()
                .is_none_or(|r| r.contains(&conn.user_id))
                && !omitted.contains(&conn.user_id);
            if !eligible {
                continue;
            }
            let data_json = if mentioned.contains(&conn.user_id) {
                let mut with = data.clone();
                with.insert(
                    "mentions".into(),
                    json!(serde_json::to_string(&[&conn.user_id]).expect("mentions")),
                );
                serde_json::to_string(&with).expect("event data")
            } else {
                plain_data.clone()
            };
            // The precomputed-JSON layout of `WebSocketEvent.precomputedJSONBuf`.
            let frame = format!(
                "{{\"event\": {event_json}, \"data\": {data_json}, \"broadcast\": {broadcast_json}, \"seq\": {}}}",
                conn.next_seq
            );
            conn.push_event(frame);
        }
    }

    /// Registers an authenticated socket with the hub. A resumable `(connection_id,
    /// sequence_number)` of the same user re-attaches the connection and replays its dead
    /// queue from that seq (no hello); anything else starts a new connection with a new id
    /// and a `hello` at seq 0. Returns the connection id.
    fn attach(&mut self, user_id: &str, resume: Option<(String, i64)>, link: LiveLink) -> String {
        if let Some((conn_id, seq)) = resume {
            if let Some(pos) = self
                .conns
                .iter()
                .position(|c| c.id == conn_id && c.user_id == user_id)
            {
                let conn = &mut self.conns[pos];
                let resumable =
                    seq == conn.next_seq || conn.dead_queue.iter().any(|(s, _)| *s == seq);
                if resumable {
                    if let Some(old) = conn.live.take() {
                        old.cancel.cancel();
                    }
                    for (s, frame) in &conn.dead_queue {
                        if *s >= seq {
                            let _ = link.tx.send(frame.clone());
                        }
                    }
                    conn.live = Some(link);
                    return conn_id;
                }
                let old = self.conns.remove(pos);
                if let Some(old_link) = old.live {
                    old_link.cancel.cancel();
                }
            }
        }
        let conn_id = new_id();
        let hello = HelloFrame {
            event: "hello",
            data: HelloData {
                connection_id: conn_id.clone(),
                server_hostname: "fake".to_owned(),
                server_version: HELLO_SERVER_VERSION.to_owned(),
            },
            broadcast: Broadcast::user(user_id),
            seq: 0,
        };
        // The hello is written directly (json.Encoder: compact, trailing newline) and is not
        // part of the dead queue.
        let _ = link
            .tx
            .send(serde_json::to_string(&hello).expect("hello JSON") + "\n");
        self.conns.push(WsConn {
            id: conn_id.clone(),
            user_id: user_id.to_owned(),
            next_seq: 1,
            dead_queue: VecDeque::new(),
            live: Some(link),
        });
        conn_id
    }

    /// Detaches a socket from its connection (if it is still the attached one).
    fn detach(&mut self, conn_id: &str, socket: u64) {
        if let Some(conn) = self.conns.iter_mut().find(|c| c.id == conn_id) {
            if conn.live.as_ref().is_some_and(|l| l.socket == socket) {
                conn.live = None;
            }
        }
    }
}

impl WsConn {
    fn push_event(&mut self, frame: String) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(link) = &self.live {
            let _ = link.tx.send(frame.clone());
        }
        self.dead_queue.push_back((seq, frame));
        while self.dead_queue.len() > DEAD_QUEUE_SIZE {
            self.dead_queue.pop_front();
        }
    }
}

#[derive(Serialize)]
struct HelloFrame {
    event: &'static str,
    data: HelloData,
    broadcast: Broadcast,
    seq: i64,
}

#[derive(Serialize)]
struct HelloData {
    connection_id: String,
    server_hostname: String,
    server_version: String,
}

/// `model.WebSocketResponse`.
#[derive(Serialize)]
struct WsResponse {
    status: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    seq_reply: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

/// `model.PostList`.
#[derive(Serialize)]
struct PostList {
    order: Vec<String>,
    posts: BTreeMap<String, Post>,
    next_post_id: String,
    prev_post_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    has_next: Option<bool>,
    first_inaccessible_post_time: i64,
}

/// `model.ChannelMember`.
#[derive(Serialize)]
struct ChannelMember {
    channel_id: String,
    user_id: String,
    roles: String,
    last_viewed_at: i64,
    msg_count: i64,
    mention_count: i64,
    mention_count_root: i64,
    urgent_mention_count: i64,
    msg_count_root: i64,
    notify_props: Value,
    last_update_at: i64,
    scheme_guest: bool,
    scheme_user: bool,
    scheme_admin: bool,
    explicit_roles: String,
}

/// `model.SidebarCategoryWithChannels` as a request body.
#[derive(Debug, Default, Deserialize)]
struct CategoryInput {
    #[serde(default, deserialize_with = "null_default")]
    id: String,
    #[serde(default, deserialize_with = "null_default")]
    user_id: String,
    #[serde(default, deserialize_with = "null_default")]
    team_id: String,
    #[serde(default, deserialize_with = "null_default")]
    sorting: String,
    #[serde(default, deserialize_with = "null_default")]
    display_name: String,
    #[serde(default, deserialize_with = "null_default")]
    muted: bool,
    #[serde(default, deserialize_with = "null_default")]
    collapsed: bool,
    #[serde(default, deserialize_with = "null_default")]
    channel_ids: Vec<String>,
}

// ---- small model helpers -------------------------------------------------------------------

impl FakeError {
    fn new(status: u16, id: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            id: id.to_owned(),
            message: message.into(),
        }
    }

    fn forbidden() -> Self {
        Self::new(
            403,
            "api.context.permissions.app_error",
            "You do not have the appropriate permissions.",
        )
    }

    fn unauthorized() -> Self {
        Self::new(
            401,
            "api.context.session_expired.app_error",
            "Invalid or expired session, please login again.",
        )
    }

    fn invalid_body(param: &str) -> Self {
        Self::new(
            400,
            "api.context.invalid_body_param.app_error",
            format!("Invalid or missing {param} in request body."),
        )
    }

    fn invalid_url(param: &str) -> Self {
        Self::new(
            400,
            "api.context.invalid_url_param.app_error",
            format!("Invalid or missing {param} parameter in request URL."),
        )
    }

    fn route_not_found() -> Self {
        Self::new(
            404,
            "api.context.404.app_error",
            "Sorry, we could not find the page.",
        )
    }

    fn post_not_found() -> Self {
        Self::new(404, "app.post.get.app_error", "Unable to get the post.")
    }

    /// The AppError JSON in the server's field order.
    fn body_json(&self) -> Value {
        self.body_with_request_id(&new_id())
    }

    fn body_with_request_id(&self, request_id: &str) -> Value {
        serde_json::to_value(AppErrorBody {
            id: &self.id,
            message: &self.message,
            detailed_error: "",
            request_id,
            status_code: self.status,
        })
        .expect("AppError JSON")
    }
}

#[derive(Serialize)]
struct AppErrorBody<'a> {
    id: &'a str,
    message: &'a str,
    detailed_error: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    request_id: &'a str,
    status_code: u16,
}

impl IntoResponse for FakeError {
    fn into_response(self) -> Response {
        let request_id = new_id();
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.body_with_request_id(&request_id))).into_response();
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-request-id", v);
        }
        response
    }
}

fn root_id_error() -> FakeError {
    FakeError::new(
        400,
        "api.post.create_post.root_id.app_error",
        "Invalid RootId parameter.",
    )
}

fn channel_invalid(id: &str, message: &str) -> FakeError {
    FakeError::new(400, id, message)
}

/// `Post.IsValid` limits: message runes and props size.
fn validate_post_content(message: &str, props: &Value) -> Result<(), FakeError> {
    let runes = message.chars().count();
    if runes > MAX_POST_RUNES {
        return Err(FakeError::new(
            400,
            "model.post.is_valid.message_length.app_error",
            format!(
                "Message property must be less than {MAX_POST_RUNES} characters (got {runes})."
            ),
        ));
    }
    if props.to_string().chars().count() > MAX_PROPS_RUNES {
        return Err(FakeError::new(
            400,
            "model.post.is_valid.props.app_error",
            "Invalid props.",
        ));
    }
    Ok(())
}

fn is_valid_post_type(t: &str) -> bool {
    t.is_empty() || t == "slack_attachment" || t.starts_with("custom_") || t.starts_with("system_")
}

/// `IsValidChannelIdentifier`: `^[a-z0-9]+([a-z\-\_0-9]+|(__)?)[a-z0-9]*$`, 1 to 64 long.
/// (The middle alternative absorbs any run of `[a-z0-9_-]`, so this is "first character
/// lowercase alphanumeric, the rest lowercase alphanumeric, `-` or `_`".)
fn is_valid_channel_identifier(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    let mut chars = name.chars();
    match chars.next() {
        Some(first) if first.is_ascii_lowercase() || first.is_ascii_digit() => {}
        _ => return false,
    }
    name.len() <= 64 && chars.all(allowed)
}

/// Non-DM channels may not be named like a DM (`<id>__<id>`) or a GM (40 hex characters).
fn looks_like_dm_or_gm_name(name: &str) -> bool {
    let gm = name.len() == 40
        && name
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    let parts: Vec<&str> = name.split("__").collect();
    let dm = parts.len() == 2 && parts.iter().all(|p| is_valid_id(p));
    gm || dm
}

/// `model.IsValidId`: 26 ASCII letters or digits.
fn is_valid_id(id: &str) -> bool {
    id.len() == 26 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

fn is_valid_emoji_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= EMOJI_NAME_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '+' || c == '_')
}

/// Removes `integration` from every attachment action (`Post.StripActionIntegrations`).
fn strip_action_integrations(props: &mut Value) {
    for_each_action(props, |action| {
        action.remove("integration");
    });
}

/// Gives every attachment action without an id a new one (`Post.GenerateActionIds`).
fn generate_action_ids(props: &mut Value) {
    for_each_action(props, |action| {
        let missing = action
            .get("id")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        if missing {
            action.insert("id".into(), json!(new_id()));
        }
    });
}

fn for_each_action(props: &mut Value, mut f: impl FnMut(&mut Map<String, Value>)) {
    let Some(attachments) = props.get_mut("attachments").and_then(Value::as_array_mut) else {
        return;
    };
    for attachment in attachments {
        let Some(actions) = attachment.get_mut("actions").and_then(Value::as_array_mut) else {
            continue;
        };
        for action in actions {
            if let Some(obj) = action.as_object_mut() {
                f(obj);
            }
        }
    }
}

fn find_action<'a>(props: &'a Value, action_id: &str) -> Option<&'a Value> {
    props
        .get("attachments")?
        .as_array()?
        .iter()
        .filter_map(|a| a.get("actions").and_then(Value::as_array))
        .flatten()
        .find(|action| action.get("id").and_then(Value::as_str) == Some(action_id))
}

/// The JSON string clients get in `data.post` (`Post.ToJSON`).
fn post_json_string(client_post: &Post) -> String {
    serde_json::to_string(client_post).expect("post JSON")
}

/// `model.ParseHashtags`, simplified: `#` + letter + letters/digits/`-_.` ending in a
/// letter or digit, surrounding punctuation trimmed.
fn parse_hashtags(text: &str) -> String {
    let mut tags = Vec::new();
    for word in text.split_whitespace() {
        let word = word.trim_start_matches(|c: char| !c.is_alphanumeric() && c != '#');
        let word = word.trim_end_matches(|c: char| !c.is_alphanumeric());
        let body = word.trim_start_matches('#');
        if word.len() == body.len() {
            continue;
        }
        let chars: Vec<char> = body.chars().collect();
        let valid = chars.len() >= 2
            && chars[0].is_alphabetic()
            && chars
                .iter()
                .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && chars.last().is_some_and(|c| c.is_alphanumeric());
        if valid {
            tags.push(format!("#{body}"));
        }
    }
    tags.join(" ")
}

/// Whether `message` contains `@name` as a whole mention.
fn contains_mention(message: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let needle = format!("@{}", name.to_lowercase());
    let lower = message.to_lowercase();
    let mut from = 0;
    while let Some(pos) = lower[from..].find(&needle) {
        let start = from + pos;
        let end = start + needle.len();
        let before_ok = lower[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_' && c != '-' && c != '.');
        let rest = &lower[end..];
        let mut after = rest.chars();
        let after_ok = match after.next() {
            None => true,
            Some('.') => after.next().is_none_or(|c| !c.is_alphanumeric()),
            Some(c) => !c.is_alphanumeric() && c != '_' && c != '-',
        };
        if before_ok && after_ok {
            return true;
        }
        from = end;
    }
    false
}

/// `model.NewId`: 16 random bytes in base32 with Mattermost's alphabet, 26 characters.
fn new_id() -> String {
    const ALPHABET: &[u8; 32] = b"ybndrfg8ejkmcpqxot1uwisza345h769";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let mut out = String::with_capacity(26);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Standard base64 with padding (for the opaque `trigger_id`).
fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Like Go's decoder: a JSON `null` leaves the zero value.
fn null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

// ------------------------------------------------------------------------------------------
// 3. HTTP plumbing
// ------------------------------------------------------------------------------------------

type Fake = AxumState<Arc<Shared>>;

/// The authenticated user of a REST request.
#[derive(Clone, Debug)]
struct Caller {
    user_id: String,
}

fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        // users
        .route("/api/v4/users/{user_id}", get(get_user))
        .route(
            "/api/v4/users/username/{username}",
            get(get_user_by_username),
        )
        // posts
        .route("/api/v4/posts", post(create_post))
        .route("/api/v4/posts/ephemeral", post(create_ephemeral_post))
        .route(
            "/api/v4/posts/{post_id}",
            get(get_post).put(update_post).delete(delete_post),
        )
        .route("/api/v4/posts/{post_id}/patch", put(patch_post))
        .route("/api/v4/posts/{post_id}/thread", get(get_thread))
        .route("/api/v4/posts/{post_id}/reactions", get(list_reactions))
        .route(
            "/api/v4/posts/{post_id}/actions/{action_id}",
            post(post_action),
        )
        .route("/api/v4/channels/{channel_id}/posts", get(channel_posts))
        // channels
        .route("/api/v4/channels", post(create_channel))
        .route("/api/v4/channels/{channel_id}", get(get_channel))
        .route(
            "/api/v4/channels/{channel_id}/members",
            post(add_channel_member),
        )
        .route(
            "/api/v4/teams/{team_id}/channels/name/{channel_name}",
            get(channel_by_name),
        )
        // sidebar
        .route(
            "/api/v4/users/{user_id}/teams/{team_id}/channels/categories",
            get(get_categories)
                .post(create_category)
                .put(update_categories),
        )
        .route(
            "/api/v4/users/{user_id}/teams/{team_id}/channels/categories/order",
            get(get_category_order).put(update_category_order),
        )
        .route(
            "/api/v4/users/{user_id}/teams/{team_id}/channels/categories/{category_id}",
            get(get_category).put(update_category),
        )
        // typing, reactions, threads
        .route("/api/v4/users/{user_id}/typing", post(user_typing))
        .route("/api/v4/reactions", post(add_reaction))
        .route(
            "/api/v4/users/{user_id}/posts/{post_id}/reactions/{emoji_name}",
            axum::routing::delete(remove_reaction),
        )
        .route(
            "/api/v4/users/{user_id}/teams/{team_id}/threads/{thread_id}/following",
            put(follow_thread).delete(unfollow_thread),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            authenticate,
        ));

    Router::new()
        .route("/api/v4/system/ping", get(system_ping))
        .route("/api/v4/websocket", get(websocket_upgrade))
        .route("/api/v4/websocket/", get(websocket_upgrade))
        .merge(api)
        .fallback(route_not_found)
        .method_not_allowed_fallback(route_not_found)
        .layer(DefaultBodyLimit::max(16 << 20))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            record_and_inject,
        ))
        .with_state(shared)
}

/// Records every request, then applies a pending [`FakeMattermost::fail_next`] rule.
async fn record_and_inject(AxumState(shared): Fake, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let injected = {
        let mut st = shared.lock();
        st.requests.push(RecordedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            at: Instant::now(),
        });
        let rule = st
            .failures
            .iter_mut()
            .find(|r| r.remaining > 0 && path.starts_with(&r.path_prefix));
        rule.map(|r| {
            r.remaining -= 1;
            (r.status, r.retry_after_secs, r.after)
        })
    };
    let mut response = match injected {
        Some((status, retry_after, false)) => injected_failure(status, retry_after),
        Some((status, retry_after, true)) => {
            let _lost = next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
            injected_failure(status, retry_after)
        }
        None => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
    };
    let headers = response.headers_mut();
    if !headers.contains_key("x-request-id") {
        headers.insert(
            "x-request-id",
            HeaderValue::from_str(&new_id()).expect("id header"),
        );
    }
    headers.insert("x-version-id", HeaderValue::from_static("10.0.0.fake"));
    response
}

fn injected_failure(status: u16, retry_after: Option<u64>) -> Response {
    if status == 429 {
        let reset = retry_after.unwrap_or(1).to_string();
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
                (
                    header::HeaderName::from_static("x-content-type-options"),
                    "nosniff".to_owned(),
                ),
                (
                    header::HeaderName::from_static("x-ratelimit-limit"),
                    "10".to_owned(),
                ),
                (
                    header::HeaderName::from_static("x-ratelimit-remaining"),
                    "0".to_owned(),
                ),
                (header::HeaderName::from_static("x-ratelimit-reset"), reset),
            ],
            // Go's http.Error appends a newline.
            "limit exceeded\n",
        )
            .into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return response;
    }
    FakeError::new(
        status,
        "api.fake.injected_failure.app_error",
        format!("Injected failure (HTTP {status})."),
    )
    .into_response()
}

/// The session token, looked up where the server looks: the `MMAUTHTOKEN` cookie, then
/// `Authorization: Bearer …` / `Token …` (case-insensitive), then `?access_token=`.
fn request_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    for cookie in headers.get_all(header::COOKIE) {
        let Ok(cookie) = cookie.to_str() else {
            continue;
        };
        for pair in cookie.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                if k == "MMAUTHTOKEN" && !v.is_empty() {
                    return Some(v.to_owned());
                }
            }
        }
    }
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        for scheme in ["bearer ", "token "] {
            if auth.len() > scheme.len() && auth[..scheme.len()].eq_ignore_ascii_case(scheme) {
                return Some(auth[scheme.len()..].trim().to_owned());
            }
        }
    }
    query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.into_owned())
    })
}

/// Rejects requests without a valid token (401 AppError) and attaches the [`Caller`].
async fn authenticate(AxumState(shared): Fake, mut request: Request, next: Next) -> Response {
    let token = request_token(request.headers(), request.uri().query());
    let user_id = token.and_then(|t| shared.lock().tokens.get(&t).cloned());
    match user_id {
        Some(user_id) => {
            request.extensions_mut().insert(Caller { user_id });
            next.run(request).await
        }
        None => FakeError::unauthorized().into_response(),
    }
}

async fn route_not_found() -> FakeError {
    FakeError::route_not_found()
}

/// Parses a JSON body the way the handlers' `model.XFromJSON` calls do.
fn parse_body<T: DeserializeOwned>(body: &Bytes, param: &str) -> Result<T, FakeError> {
    serde_json::from_slice(body).map_err(|_| FakeError::invalid_body(param))
}

fn created(value: impl Serialize) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

fn ok(value: impl Serialize) -> Response {
    (StatusCode::OK, Json(value)).into_response()
}

fn status_ok() -> Response {
    ok(json!({"status": "OK"}))
}

/// `me` stands for the caller in user-id path segments.
fn resolve_user(path_user: &str, caller: &Caller) -> String {
    if path_user == "me" {
        caller.user_id.clone()
    } else {
        path_user.to_owned()
    }
}

/// The caller may only act as themselves (`SessionHasPermissionToUser`).
fn require_self(path_user: &str, caller: &Caller) -> Result<String, FakeError> {
    let user = resolve_user(path_user, caller);
    if user != caller.user_id {
        return Err(FakeError::forbidden());
    }
    Ok(user)
}

// ------------------------------------------------------------------------------------------
// 4. REST handlers
// ------------------------------------------------------------------------------------------

// ---- system and users ------------------------------------------------------------------

async fn system_ping() -> Response {
    ok(json!({"status": "OK"}))
}

async fn get_user(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(user_id): Path<String>,
) -> Result<Response, FakeError> {
    let user_id = resolve_user(&user_id, &caller);
    if !is_valid_id(&user_id) {
        return Err(FakeError::invalid_url("user_id"));
    }
    let st = shared.lock();
    let user = st.user(&user_id).ok_or_else(|| {
        FakeError::new(
            404,
            "app.user.missing_account.const",
            "Unable to find the user.",
        )
    })?;
    Ok(ok(user))
}

async fn get_user_by_username(
    AxumState(shared): Fake,
    Path(username): Path<String>,
) -> Result<Response, FakeError> {
    let st = shared.lock();
    let user = st.user_by_name(&username).ok_or_else(|| {
        FakeError::new(404, "app.user.get_by_username.app_error", "Unable to find an existing account matching your username for this team. This team may require an invite from the team owner to join.")
    })?;
    Ok(ok(user))
}

// ---- posts -----------------------------------------------------------------------------

async fn create_post(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let input: NewPost = parse_body(&body, "post")?;
    if input.post_type.starts_with("system_") {
        return Err(FakeError::invalid_body("post.type"));
    }
    let hold = shared
        .holds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|needle| input.message.contains(needle.as_str()));
    if hold {
        shared
            .held
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut release = shared.release.subscribe();
        let _ = release.wait_for(|released| *released).await;
    }
    let set_online = query.get("set_online").is_none_or(|v| v != "false");
    let post = shared
        .lock()
        .create_post(&caller.user_id, input, set_online)?;
    Ok(created(post))
}

#[derive(Deserialize)]
struct EphemeralRequest {
    #[serde(default, deserialize_with = "null_default")]
    user_id: String,
    #[serde(default)]
    post: Option<NewPost>,
}

async fn create_ephemeral_post(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let request: EphemeralRequest = parse_body(&body, "post")?;
    if request.user_id.is_empty() {
        return Err(FakeError::invalid_body("user_id"));
    }
    let Some(input) = request.post else {
        return Err(FakeError::invalid_body("post"));
    };
    if !shared.lock().ephemeral_posters.contains(&caller.user_id) {
        return Err(FakeError::forbidden());
    }
    let post = shared.lock().send_ephemeral(
        &request.user_id,
        &caller.user_id,
        &input.channel_id,
        &input.root_id,
        &input.message,
    );
    Ok(created(post))
}

async fn get_post(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(post_id): Path<String>,
) -> Result<Response, FakeError> {
    let st = shared.lock();
    let post = st
        .post(&post_id)
        .filter(|p| p.delete_at == 0)
        .ok_or_else(FakeError::post_not_found)?;
    if !st.can_read(&post.channel_id, &caller.user_id) {
        return Err(FakeError::forbidden());
    }
    Ok(ok(st.client_post(post)))
}

/// Only the author may edit (the fake has no admins); an unknown post is a permission error
/// as in `patchPost`.
fn editable_post(st: &State, post_id: &str, caller: &Caller) -> Result<Post, FakeError> {
    let post = st.post(post_id).cloned().ok_or_else(FakeError::forbidden)?;
    if post.user_id != caller.user_id || !st.is_member(&post.channel_id, &caller.user_id) {
        return Err(FakeError::forbidden());
    }
    Ok(post)
}

#[derive(Deserialize)]
struct PatchBody {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    props: Option<Value>,
    #[serde(default)]
    file_ids: Option<Vec<String>>,
    #[serde(default)]
    is_pinned: Option<bool>,
    #[serde(default)]
    has_reactions: Option<bool>,
}

async fn patch_post(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(post_id): Path<String>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let patch: PatchBody = parse_body(&body, "patch")?;
    let mut st = shared.lock();
    let post = editable_post(&st, &post_id, &caller)?;
    let update = PostUpdate {
        message: patch.message.unwrap_or(post.message),
        props: patch.props.unwrap_or(post.props),
        file_ids: patch.file_ids.unwrap_or(post.file_ids),
        is_pinned: patch.is_pinned.unwrap_or(post.is_pinned),
        has_reactions: patch.has_reactions.unwrap_or(post.has_reactions),
    };
    Ok(ok(st.update_post(&post_id, update)?))
}

#[derive(Deserialize)]
struct UpdateBody {
    #[serde(default, deserialize_with = "null_default")]
    id: String,
    #[serde(default, deserialize_with = "null_default")]
    message: String,
    #[serde(default, deserialize_with = "null_default")]
    props: Value,
    #[serde(default, deserialize_with = "null_default")]
    file_ids: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    is_pinned: bool,
    #[serde(default, deserialize_with = "null_default")]
    has_reactions: bool,
}

async fn update_post(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(post_id): Path<String>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let full: UpdateBody = parse_body(&body, "post")?;
    if full.id != post_id {
        return Err(FakeError::invalid_body("id"));
    }
    let mut st = shared.lock();
    editable_post(&st, &post_id, &caller)?;
    let update = PostUpdate {
        message: full.message,
        props: full.props,
        file_ids: full.file_ids,
        is_pinned: full.is_pinned,
        has_reactions: full.has_reactions,
    };
    Ok(ok(st.update_post(&post_id, update)?))
}

async fn delete_post(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(post_id): Path<String>,
) -> Result<Response, FakeError> {
    let mut st = shared.lock();
    let post = st
        .post(&post_id)
        .filter(|p| p.delete_at == 0)
        .cloned()
        .ok_or_else(FakeError::post_not_found)?;
    if post.user_id != caller.user_id {
        return Err(FakeError::forbidden());
    }
    st.delete_post(&post_id, &caller.user_id);
    Ok(status_ok())
}

/// `GET /posts/{id}/thread`: the requested post first, then the rest of the thread
/// (root and replies). Without `direction` the rest comes in creation order (the server
/// uses the database's order, which is insertion order in practice; clients must sort by
/// `create_at`); `direction=up` is newest first, `down` oldest first. `perPage`,
/// `fromCreateAt` and `fromPost` page the rest and set `has_next`.
async fn get_thread(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(post_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, FakeError> {
    let per_page: usize = match query.get("perPage") {
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| *n <= 200)
            .ok_or_else(|| FakeError::invalid_url("perPage"))?,
        None => 0,
    };
    let from_create_at: i64 = match query.get("fromCreateAt") {
        Some(v) => v
            .parse()
            .map_err(|_| FakeError::invalid_url("fromCreateAt"))?,
        None => 0,
    };
    let from_post = query.get("fromPost").cloned().unwrap_or_default();
    let direction = query.get("direction").cloned().unwrap_or_default();
    let st = shared.lock();
    let post = st
        .post(&post_id)
        .filter(|p| p.delete_at == 0)
        .ok_or_else(FakeError::post_not_found)?;
    if !st.can_read(&post.channel_id, &caller.user_id) {
        return Err(FakeError::forbidden());
    }
    let root_id = if post.root_id.is_empty() {
        post.id.clone()
    } else {
        post.root_id.clone()
    };
    let mut rest: Vec<&Post> = st
        .posts
        .iter()
        .filter(|p| {
            p.delete_at == 0 && p.id != post_id && (p.id == root_id || p.root_id == root_id)
        })
        .collect();
    if direction == "up" {
        rest.sort_by(|a, b| (b.create_at, &b.id).cmp(&(a.create_at, &a.id)));
    } else {
        rest.sort_by(|a, b| (a.create_at, &a.id).cmp(&(b.create_at, &b.id)));
    }
    if from_create_at != 0 {
        rest.retain(|p| {
            if direction == "down" {
                p.create_at > from_create_at
                    || (p.create_at == from_create_at && !from_post.is_empty() && p.id > from_post)
            } else {
                p.create_at < from_create_at
                    || (p.create_at == from_create_at && !from_post.is_empty() && p.id < from_post)
            }
        });
    }
    let mut has_next = false;
    if per_page != 0 && rest.len() > per_page {
        rest.truncate(per_page);
        has_next = true;
    }
    let mut order = vec![post.id.clone()];
    order.extend(rest.iter().map(|p| p.id.clone()));
    let mut all = vec![post];
    all.extend(rest);
    Ok(ok(st.post_list(order, &all, Some(has_next))))
}

/// `GET /channels/{id}/posts`. With `since`: every post of the channel *modified* after
/// that time (old versions left by edits and deleted posts included), newest first by
/// `create_at`, at most 1000, plus the roots of modified replies in `posts` only.
/// `since` combined with `page`/`per_page`/`before`/`after` is refused with 400 (the
/// documented contract; the real server silently prefers `since`). Without `since`: one
/// page (`page`, `per_page` ≤ 200, default 60) of live posts, newest first, optionally
/// `before`/`after` a post id.
async fn channel_posts(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(channel_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, FakeError> {
    let since: Option<i64> = match query.get("since") {
        Some(v) => Some(v.parse().map_err(|_| FakeError::invalid_url("since"))?),
        None => None,
    };
    let st = shared.lock();
    if st.channel(&channel_id).is_none() {
        return Err(FakeError::new(
            404,
            "app.channel.get.existing.app_error",
            "Unable to find the existing channel.",
        ));
    }
    if !st.can_read(&channel_id, &caller.user_id) {
        return Err(FakeError::forbidden());
    }
    if let Some(since) = since.filter(|s| *s > 0) {
        if ["page", "per_page", "before", "after"]
            .iter()
            .any(|k| query.contains_key(*k))
        {
            return Err(FakeError::invalid_url("since"));
        }
        let mut modified: Vec<&Post> = st
            .posts
            .iter()
            .chain(st.history.iter())
            .filter(|p| p.channel_id == channel_id && p.update_at > since)
            .collect();
        modified.sort_by(|a, b| (b.create_at, &b.id).cmp(&(a.create_at, &a.id)));
        modified.truncate(1000);
        let order: Vec<String> = modified.iter().map(|p| p.id.clone()).collect();
        let mut all = modified.clone();
        for p in &modified {
            if !p.root_id.is_empty() && !all.iter().any(|q| q.id == p.root_id) {
                if let Some(root) = st.post(&p.root_id) {
                    all.push(root);
                }
            }
        }
        return Ok(ok(st.post_list(order, &all, None)));
    }
    let page: usize = query.get("page").and_then(|v| v.parse().ok()).unwrap_or(0);
    let per_page: usize = query
        .get("per_page")
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
        .min(200);
    let mut live: Vec<&Post> = st
        .posts
        .iter()
        .filter(|p| p.channel_id == channel_id && p.delete_at == 0)
        .collect();
    live.sort_by(|a, b| (b.create_at, &b.id).cmp(&(a.create_at, &a.id)));
    if let Some(before) = query.get("before").and_then(|id| st.post(id)) {
        live.retain(|p| p.create_at < before.create_at);
    }
    if let Some(after) = query.get("after").and_then(|id| st.post(id)) {
        live.retain(|p| p.create_at > after.create_at);
    }
    let page_posts: Vec<&Post> = live
        .into_iter()
        .skip(page * per_page)
        .take(per_page)
        .collect();
    let order: Vec<String> = page_posts.iter().map(|p| p.id.clone()).collect();
    let mut all = page_posts.clone();
    for p in &page_posts {
        if !p.root_id.is_empty() && !all.iter().any(|q| q.id == p.root_id) {
            if let Some(root) = st.post(&p.root_id) {
                all.push(root);
            }
        }
    }
    Ok(ok(st.post_list(order, &all, None)))
}

// ---- channels --------------------------------------------------------------------------

async fn create_channel(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let input: NewChannel = parse_body(&body, "channel")?;
    let mut st = shared.lock();
    let channel = st.create_channel(Some(&caller.user_id), input)?;
    let mut data = Map::new();
    data.insert("channel_id".into(), json!(channel.id));
    data.insert("team_id".into(), json!(channel.team_id));
    st.publish(
        "channel_created",
        data,
        Broadcast::user(&caller.user_id),
        &[],
    );
    Ok(created(channel))
}

fn channel_not_found() -> FakeError {
    FakeError::new(
        404,
        "app.channel.get.existing.app_error",
        "Unable to find the existing channel.",
    )
}

async fn get_channel(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(channel_id): Path<String>,
) -> Result<Response, FakeError> {
    let st = shared.lock();
    let channel = st.channel(&channel_id).ok_or_else(channel_not_found)?;
    if !st.can_read(&channel_id, &caller.user_id) {
        return Err(FakeError::forbidden());
    }
    Ok(ok(channel))
}

async fn channel_by_name(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((team_id, name)): Path<(String, String)>,
) -> Result<Response, FakeError> {
    let st = shared.lock();
    let channel = st
        .channels
        .iter()
        .find(|c| c.team_id == team_id && c.name == name && c.delete_at == 0)
        .filter(|c| st.can_read(&c.id, &caller.user_id))
        .ok_or_else(|| {
            FakeError::new(
                404,
                "app.channel.get_by_name.missing.app_error",
                "Channel does not exist.",
            )
        })?;
    Ok(ok(channel))
}

#[derive(Deserialize)]
struct AddMemberBody {
    #[serde(default, deserialize_with = "null_default")]
    user_id: String,
    #[serde(default, deserialize_with = "null_default")]
    post_root_id: String,
}

/// `POST /channels/{id}/members`: 201 with the ChannelMember, also for an existing member.
/// A new member gets the server's system post (`system_add_to_channel`, or
/// `system_join_channel` when users add themselves), in the `post_root_id` thread if given,
/// and a `user_added` event.
async fn add_channel_member(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(channel_id): Path<String>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let input: AddMemberBody = parse_body(&body, "user_id")?;
    if !is_valid_id(&input.user_id) {
        return Err(FakeError::invalid_body("user_id"));
    }
    let mut st = shared.lock();
    let channel = st
        .channel(&channel_id)
        .cloned()
        .ok_or_else(channel_not_found)?;
    let joining_self = input.user_id == caller.user_id && channel.channel_type == "O";
    if !joining_self && !st.is_member(&channel_id, &caller.user_id) {
        return Err(FakeError::forbidden());
    }
    let Some(added) = st.user(&input.user_id).cloned() else {
        return Err(FakeError::new(
            404,
            "app.user.missing_account.const",
            "Unable to find the user.",
        ));
    };
    if !input.post_root_id.is_empty() {
        let root_ok = st.post(&input.post_root_id).is_some_and(|p| {
            p.channel_id == channel_id && p.root_id.is_empty() && p.delete_at == 0
        });
        if !root_ok {
            return Err(FakeError::invalid_body("post_root_id"));
        }
    }
    if st.join_channel(&channel_id, &added.id) {
        let actor = st.user(&caller.user_id).cloned().expect("caller exists");
        let system = if actor.id == added.id {
            NewPost {
                channel_id: channel_id.clone(),
                message: format!("{} joined the channel.", added.username),
                root_id: input.post_root_id.clone(),
                props: Some(json!({"username": added.username})),
                post_type: "system_join_channel".to_owned(),
                ..NewPost::default()
            }
        } else {
            NewPost {
                channel_id: channel_id.clone(),
                message: format!(
                    "{} added to the channel by {}.",
                    added.username, actor.username
                ),
                root_id: input.post_root_id.clone(),
                props: Some(json!({
                    "userId": actor.id, "username": actor.username,
                    "addedUserId": added.id, "addedUsername": added.username
                })),
                post_type: "system_add_to_channel".to_owned(),
                ..NewPost::default()
            }
        };
        st.create_post(&actor.id, system, false)?;
        let mut data = Map::new();
        data.insert("team_id".into(), json!(channel.team_id));
        data.insert("user_id".into(), json!(added.id));
        st.publish("user_added", data, Broadcast::channel(&channel_id), &[]);
    }
    Ok(created(st.channel_member_json(&channel_id, &added.id)))
}

// ---- sidebar ---------------------------------------------------------------------------

/// Checks the `{user_id}/teams/{team_id}` part of the sidebar routes.
fn sidebar_owner(
    st: &State,
    user: &str,
    team: &str,
    caller: &Caller,
) -> Result<(String, String), FakeError> {
    let user = require_self(user, caller)?;
    if team != st.team.id {
        return Err(FakeError::forbidden());
    }
    Ok((user, team.to_owned()))
}

async fn get_categories(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, team)): Path<(String, String)>,
) -> Result<Response, FakeError> {
    let mut st = shared.lock();
    let (user, team) = sidebar_owner(&st, &user, &team, &caller)?;
    Ok(ok(st.sidebar_json(&user, &team)))
}

/// Create: the body's `user_id`/`team_id` must equal the path, non-member channels are
/// dropped, the listed channels leave their old categories, and the new category goes
/// right after Favorites (or first). 200 with the category.
async fn create_category(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, team)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let input: CategoryInput = parse_body(&body, "category")?;
    let mut st = shared.lock();
    let (user, team) = sidebar_owner(&st, &user, &team, &caller)?;
    if input.user_id != user || input.team_id != team {
        return Err(FakeError::invalid_body("category"));
    }
    let category = st.create_category(&user, &team, input);
    let mut data = Map::new();
    data.insert("category_id".into(), json!(category.id));
    data.insert("team_id".into(), json!(team));
    st.publish(
        "sidebar_category_created",
        data,
        Broadcast::user(&user),
        &[],
    );
    Ok(ok(category))
}

fn publish_categories_updated(st: &mut State, user: &str, team: &str, updated: &[SidebarCategory]) {
    let mut data = Map::new();
    data.insert("team_id".into(), json!(team));
    data.insert(
        "updatedCategories".into(),
        json!(serde_json::to_string(updated).expect("categories JSON")),
    );
    st.publish("sidebar_category_updated", data, Broadcast::user(user), &[]);
}

async fn update_categories(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, team)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let inputs: Vec<CategoryInput> = parse_body(&body, "category")?;
    let mut st = shared.lock();
    let (user, team) = sidebar_owner(&st, &user, &team, &caller)?;
    let updated = st.update_categories(&user, &team, inputs)?;
    publish_categories_updated(&mut st, &user, &team, &updated);
    Ok(ok(updated))
}

async fn get_category(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, team, category_id)): Path<(String, String, String)>,
) -> Result<Response, FakeError> {
    let mut st = shared.lock();
    let (user, team) = sidebar_owner(&st, &user, &team, &caller)?;
    st.ensure_sidebar(&user, &team);
    let cat = st.sidebars[&(user, team)]
        .iter()
        .find(|c| c.id == category_id)
        .cloned()
        .ok_or_else(|| {
            FakeError::new(
                404,
                "app.channel.sidebar_categories.app_error",
                "Category not found.",
            )
        })?;
    Ok(ok(st.category_view(&cat)))
}

async fn update_category(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, team, category_id)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let input: CategoryInput = parse_body(&body, "category")?;
    if input.id != category_id {
        return Err(FakeError::invalid_body("category_id"));
    }
    let mut st = shared.lock();
    let (user, team) = sidebar_owner(&st, &user, &team, &caller)?;
    let updated = st.update_categories(&user, &team, vec![input])?;
    publish_categories_updated(&mut st, &user, &team, &updated);
    Ok(ok(&updated[0]))
}

async fn get_category_order(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, team)): Path<(String, String)>,
) -> Result<Response, FakeError> {
    let mut st = shared.lock();
    let (user, team) = sidebar_owner(&st, &user, &team, &caller)?;
    st.ensure_sidebar(&user, &team);
    let order: Vec<String> = st.sidebars[&(user, team)]
        .iter()
        .map(|c| c.id.clone())
        .collect();
    Ok(ok(order))
}

/// The new order must name exactly the user's categories.
async fn update_category_order(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, team)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let order: Vec<String> = parse_body(&body, "order")?;
    let mut st = shared.lock();
    let (user, team) = sidebar_owner(&st, &user, &team, &caller)?;
    st.ensure_sidebar(&user, &team);
    let cats = st
        .sidebars
        .get_mut(&(user.clone(), team.clone()))
        .expect("sidebar");
    let mut existing: Vec<&String> = cats.iter().map(|c| &c.id).collect();
    let mut wanted: Vec<&String> = order.iter().collect();
    existing.sort();
    wanted.sort();
    if existing != wanted {
        return Err(FakeError::new(
            400,
            "app.channel.sidebar_categories.app_error",
            "Cannot update category order: the list must contain exactly the existing categories.",
        ));
    }
    cats.sort_by_key(|c| order.iter().position(|id| id == &c.id));
    for (i, cat) in cats.iter_mut().enumerate() {
        cat.sort_order = i as i64 * SIDEBAR_SORT_DISTANCE;
    }
    let mut data = Map::new();
    data.insert("order".into(), json!(order));
    data.insert("team_id".into(), json!(team));
    st.publish(
        "sidebar_category_order_updated",
        data,
        Broadcast::user(&user),
        &[],
    );
    Ok(ok(order))
}

// ---- typing, reactions, threads --------------------------------------------------------

#[derive(Deserialize)]
struct TypingBody {
    #[serde(default, deserialize_with = "null_default")]
    channel_id: String,
    #[serde(default, deserialize_with = "null_default")]
    parent_id: String,
}

async fn user_typing(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(user): Path<String>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let user = require_self(&user, &caller)?;
    let input: TypingBody = parse_body(&body, "typing")?;
    if !is_valid_id(&input.channel_id) {
        return Err(FakeError::invalid_body("channel_id"));
    }
    let mut st = shared.lock();
    if !st.is_member(&input.channel_id, &user) {
        return Err(FakeError::forbidden());
    }
    st.user_typing(&user, &input.channel_id, &input.parent_id);
    Ok(status_ok())
}

#[derive(Deserialize)]
struct ReactionBody {
    #[serde(default, deserialize_with = "null_default")]
    user_id: String,
    #[serde(default, deserialize_with = "null_default")]
    post_id: String,
    #[serde(default, deserialize_with = "null_default")]
    emoji_name: String,
}

/// `POST /reactions`: 200 (not 201) with the Reaction.
async fn add_reaction(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let input: ReactionBody = parse_body(&body, "reaction")?;
    if !is_valid_id(&input.user_id)
        || !is_valid_id(&input.post_id)
        || input.emoji_name.is_empty()
        || input.emoji_name.len() > EMOJI_NAME_MAX
    {
        return Err(FakeError::new(
            400,
            "api.reaction.save_reaction.invalid.app_error",
            "Reaction is not valid.",
        ));
    }
    if input.user_id != caller.user_id {
        return Err(FakeError::new(
            403,
            "api.reaction.save_reaction.user_id.app_error",
            "You are not allowed to save reaction for the other user.",
        ));
    }
    let mut st = shared.lock();
    let readable = st
        .post(&input.post_id)
        .is_some_and(|p| p.delete_at == 0 && st.is_member(&p.channel_id, &caller.user_id));
    if !readable {
        return Err(FakeError::forbidden());
    }
    if !is_valid_emoji_name(&input.emoji_name) {
        return Err(FakeError::new(
            400,
            "model.reaction.is_valid.emoji_name.app_error",
            "Invalid emoji name.",
        ));
    }
    Ok(ok(st.add_reaction(
        &caller.user_id,
        &input.post_id,
        &input.emoji_name,
    )))
}

async fn list_reactions(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path(post_id): Path<String>,
) -> Result<Response, FakeError> {
    let st = shared.lock();
    let post = st.post(&post_id).ok_or_else(FakeError::forbidden)?;
    if !st.can_read(&post.channel_id, &caller.user_id) {
        return Err(FakeError::forbidden());
    }
    let list: Vec<&Reaction> = st
        .reactions
        .iter()
        .filter(|r| r.post_id == post_id)
        .collect();
    Ok(ok(list))
}

async fn remove_reaction(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, post_id, emoji)): Path<(String, String, String)>,
) -> Result<Response, FakeError> {
    let user = resolve_user(&user, &caller);
    if !is_valid_id(&user) {
        return Err(FakeError::invalid_url("user_id"));
    }
    if !is_valid_id(&post_id) {
        return Err(FakeError::invalid_url("post_id"));
    }
    if !is_valid_emoji_name(&emoji) {
        return Err(FakeError::invalid_url("emoji_name"));
    }
    if user != caller.user_id {
        return Err(FakeError::forbidden());
    }
    let mut st = shared.lock();
    let readable = st
        .post(&post_id)
        .is_some_and(|p| st.is_member(&p.channel_id, &caller.user_id));
    if !readable {
        return Err(FakeError::forbidden());
    }
    st.remove_reaction(&user, &post_id, &emoji);
    Ok(status_ok())
}

async fn follow_thread(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, team, thread_id)): Path<(String, String, String)>,
) -> Result<Response, FakeError> {
    set_following(&shared, &caller, &user, &team, &thread_id, true)
}

async fn unfollow_thread(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((user, team, thread_id)): Path<(String, String, String)>,
) -> Result<Response, FakeError> {
    set_following(&shared, &caller, &user, &team, &thread_id, false)
}

fn set_following(
    shared: &Shared,
    caller: &Caller,
    user: &str,
    team: &str,
    thread_id: &str,
    follow: bool,
) -> Result<Response, FakeError> {
    let user = require_self(user, caller)?;
    if !is_valid_id(thread_id) {
        return Err(FakeError::invalid_url("thread_id"));
    }
    let mut st = shared.lock();
    if team != st.team.id {
        return Err(FakeError::forbidden());
    }
    let readable = st
        .post(thread_id)
        .is_some_and(|p| st.can_read(&p.channel_id, &user));
    if !readable {
        return Err(FakeError::forbidden());
    }
    let followers = st.followers.entry(thread_id.to_owned()).or_default();
    followers.retain(|u| u != &user);
    if follow {
        followers.push(user);
    }
    Ok(status_ok())
}

// ---- interactive buttons (client side) -------------------------------------------------

#[derive(Deserialize, Default)]
struct ActionBody {
    #[serde(default, deserialize_with = "null_default")]
    selected_option: String,
}

/// `POST /posts/{id}/actions/{action_id}`, what the web client calls on a click.
async fn post_action(
    AxumState(shared): Fake,
    Extension(caller): Extension<Caller>,
    Path((post_id, action_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, FakeError> {
    let input: ActionBody = if body.is_empty() {
        ActionBody::default()
    } else {
        parse_body(&body, "post_action")?
    };
    let selected = Some(input.selected_option).filter(|s| !s.is_empty());
    match do_post_action(&shared, &post_id, &action_id, &caller.user_id, selected).await {
        Ok((_, trigger_id)) => Ok(ok(json!({"status": "OK", "trigger_id": trigger_id}))),
        Err(ActionFailure::Api(e)) => Err(e),
        Err(ActionFailure::Integration { .. }) => Err(integration_failed()),
    }
}

// ------------------------------------------------------------------------------------------
// 5. WebSocket
// ------------------------------------------------------------------------------------------

/// How the upgrade asked to resume.
#[derive(Clone, Debug)]
enum ResumeRequest {
    None,
    Resume(String, i64),
    /// `connection_id` without a usable `sequence_number`: the server closes the socket.
    Invalid,
}

async fn websocket_upgrade(
    AxumState(shared): Fake,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let raw_query = raw_query.unwrap_or_default();
    let query: HashMap<String, String> = url::form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();
    let (paused, user) = {
        let st = shared.lock();
        let user =
            request_token(&headers, Some(&raw_query)).and_then(|t| st.tokens.get(&t).cloned());
        (st.ws_paused, user)
    };
    if paused {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "websocket upgrades are paused",
        )
            .into_response();
    }
    let resume = match query.get("connection_id").filter(|id| !id.is_empty()) {
        None => ResumeRequest::None,
        Some(id) => match query.get("sequence_number").map(|s| s.parse::<i64>()) {
            Some(Ok(seq)) => ResumeRequest::Resume(id.clone(), seq),
            _ => ResumeRequest::Invalid,
        },
    };
    ws.max_message_size(SOCKET_MAX_MESSAGE)
        .max_frame_size(SOCKET_MAX_MESSAGE)
        .on_upgrade(move |socket| run_socket(shared, socket, user, resume))
}

/// Per-socket state of the connection task.
struct Session {
    socket_id: u64,
    tx: mpsc::UnboundedSender<String>,
    cancel: CancellationToken,
    resume: Option<(String, i64)>,
    /// Set once authenticated: (connection id, user id).
    conn: Option<(String, String)>,
}

impl Session {
    fn attach(&mut self, shared: &Shared, user_id: &str) {
        let link = LiveLink {
            tx: self.tx.clone(),
            cancel: self.cancel.clone(),
            socket: self.socket_id,
        };
        let conn_id = shared.lock().attach(user_id, self.resume.take(), link);
        self.conn = Some((conn_id, user_id.to_owned()));
    }

    /// Queues a response frame (json.Encoder layout: compact with a trailing newline).
    fn respond(&self, response: WsResponse) {
        let _ = self
            .tx
            .send(serde_json::to_string(&response).expect("response JSON") + "\n");
    }

    fn fail(&self, seq: i64, status: u16, id: &str, message: &str) {
        let error = serde_json::to_value(AppErrorBody {
            id,
            message,
            detailed_error: "",
            request_id: "",
            status_code: status,
        })
        .expect("AppError JSON");
        self.respond(WsResponse {
            status: "FAIL",
            seq_reply: seq,
            data: None,
            error: Some(error),
        });
    }
}

enum Flow {
    Continue,
    /// Close the socket without a response or close frame.
    Close,
}

async fn run_socket(
    shared: Arc<Shared>,
    socket: WebSocket,
    upgrade_user: Option<String>,
    resume: ResumeRequest,
) {
    let resume = match resume {
        // The server upgrades, fails to build the connection config, and closes.
        ResumeRequest::Invalid => return,
        ResumeRequest::None => None,
        ResumeRequest::Resume(id, seq) => Some((id, seq)),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let cancel = shared.shutdown.child_token();
    let stall = CancellationToken::new();
    let socket_id = {
        let mut st = shared.lock();
        st.next_socket += 1;
        let id = st.next_socket;
        st.sockets.insert(
            id,
            SocketHandle {
                cancel: cancel.clone(),
                stall: stall.clone(),
            },
        );
        id
    };
    let mut session = Session {
        socket_id,
        tx,
        cancel: cancel.clone(),
        resume,
        conn: None,
    };
    if let Some(user) = upgrade_user {
        session.attach(&shared, &user);
    }
    let (mut sink, mut stream) = socket.split();
    let auth_deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = stall.cancelled(), if !stalled => stalled = true,
            _ = tokio::time::sleep_until(auth_deadline), if session.conn.is_none() && !stalled => break,
            frame = rx.recv(), if !stalled => {
                let Some(frame) = frame else { break };
                if sink.send(Message::Text(frame.into())).await.is_err() {
                    break;
                }
            }
            _ = ping.tick(), if !stalled => {
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    break;
                }
            }
            incoming = stream.next(), if !stalled => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if let Flow::Close = handle_ws_request(&shared, &mut session, text.as_str()) {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    let mut st = shared.lock();
    if let Some((conn_id, _)) = &session.conn {
        st.detach(conn_id, socket_id);
    }
    st.sockets.remove(&socket_id);
    // Dropping `sink` and `stream` closes the TCP connection without a close frame.
}

/// The server's `WebSocketRouter.ServeWebSocket`.
fn handle_ws_request(shared: &Shared, session: &mut Session, text: &str) -> Flow {
    let Ok(request) = serde_json::from_str::<Value>(text) else {
        return Flow::Close;
    };
    let seq = request.get("seq").and_then(Value::as_i64).unwrap_or(0);
    let action = request.get("action").and_then(Value::as_str).unwrap_or("");
    let data = request.get("data").cloned().unwrap_or(Value::Null);
    if action.is_empty() {
        session.fail(
            seq,
            400,
            "api.web_socket_router.no_action.app_error",
            "No websocket action.",
        );
        return Flow::Continue;
    }
    if seq <= 0 {
        session.fail(
            seq,
            400,
            "api.web_socket_router.bad_seq.app_error",
            "Invalid sequence for WebSocket message.",
        );
        return Flow::Continue;
    }
    if action == "authentication_challenge" {
        if session.conn.is_some() {
            return Flow::Continue;
        }
        let token = data.get("token").and_then(Value::as_str).unwrap_or("");
        let user = shared.lock().tokens.get(token).cloned();
        let Some(user) = user else {
            return Flow::Close;
        };
        session.attach(shared, &user);
        session.respond(WsResponse {
            status: "OK",
            seq_reply: seq,
            data: None,
            error: None,
        });
        return Flow::Continue;
    }
    let Some((_, user_id)) = session.conn.clone() else {
        session.fail(
            seq,
            401,
            "api.web_socket_router.not_authenticated.app_error",
            "Not authenticated. Please login.",
        );
        return Flow::Continue;
    };
    let ok_with = |data: Option<Value>| WsResponse {
        status: "OK",
        seq_reply: seq,
        data,
        error: None,
    };
    match action {
        "ping" => session.respond(ok_with(Some(json!({
            "node_id": "",
            "server_time": now_ms(),
            "text": "pong",
            "version": SERVER_VERSION,
        })))),
        "user_typing" => {
            let channel_id = data.get("channel_id").and_then(Value::as_str).unwrap_or("");
            let parent_id = data.get("parent_id").and_then(Value::as_str).unwrap_or("");
            if !is_valid_id(channel_id) {
                session.fail(
                    seq,
                    400,
                    "api.websocket_handler.invalid_param.app_error",
                    "Invalid channel_id parameter.",
                );
            } else {
                shared.lock().user_typing(&user_id, channel_id, parent_id);
                session.respond(ok_with(None));
            }
        }
        "get_statuses" => {
            let st = shared.lock();
            let statuses: Map<String, Value> = st
                .users
                .iter()
                .map(|u| (u.id.clone(), json!("online")))
                .collect();
            session.respond(ok_with(Some(Value::Object(statuses))));
        }
        "get_statuses_by_ids" => {
            let ids = data
                .get("user_ids")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let statuses: Map<String, Value> = ids
                .iter()
                .filter_map(Value::as_str)
                .map(|id| (id.to_owned(), json!("online")))
                .collect();
            session.respond(ok_with(Some(Value::Object(statuses))));
        }
        _ => session.fail(
            seq,
            501,
            "api.web_socket_router.bad_action.app_error",
            "Unknown WebSocket action.",
        ),
    }
    Flow::Continue
}

// ------------------------------------------------------------------------------------------
// 6. Interactive message buttons
// ------------------------------------------------------------------------------------------

enum ActionFailure {
    /// The server refused before calling the integration (404, 403, …) or could not apply
    /// the answer.
    Api(FakeError),
    /// The integration failed (non-200, unreachable, invalid JSON).
    Integration { status: u16, body: String },
}

fn integration_failed() -> FakeError {
    FakeError::new(
        400,
        "api.post.do_action.action_integration.app_error",
        "Action integration error.",
    )
}

/// `model.PostActionIntegrationRequest`, in the server's field order.
#[derive(Serialize)]
struct PostActionIntegrationRequest {
    user_id: String,
    user_name: String,
    channel_id: String,
    channel_name: String,
    team_id: String,
    team_domain: String,
    post_id: String,
    trigger_id: String,
    #[serde(rename = "type")]
    action_type: String,
    data_source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Value>,
}

/// `DoPostActionWithCookie`: builds the request under the lock, calls the integration
/// without it, then applies the answer under the lock again. Returns the integration's
/// response body and the trigger id.
async fn do_post_action(
    shared: &Shared,
    post_id: &str,
    action_id: &str,
    user_id: &str,
    selected_option: Option<String>,
) -> Result<(Value, String), ActionFailure> {
    let (url, request) = {
        let st = shared.lock();
        let post = st
            .post(post_id)
            .filter(|p| p.delete_at == 0)
            .ok_or_else(|| ActionFailure::Api(FakeError::post_not_found()))?;
        if !st.can_read(&post.channel_id, user_id) {
            return Err(ActionFailure::Api(FakeError::forbidden()));
        }
        let action = find_action(&post.props, action_id).ok_or_else(|| {
            ActionFailure::Api(FakeError::new(
                404,
                "api.post.do_action.action_id.app_error",
                "Invalid action id.",
            ))
        })?;
        let url = action
            .pointer("/integration/url")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mut context = action
            .pointer("/integration/context")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if let Some(option) = selected_option {
            context.insert("selected_option".into(), json!(option));
        }
        let channel = st
            .channel(&post.channel_id)
            .cloned()
            .ok_or_else(|| ActionFailure::Api(channel_not_found()))?;
        let in_team = !channel.team_id.is_empty();
        let trigger = format!("{}:{}:{}:fake-signature", new_id(), user_id, now_ms());
        let request = PostActionIntegrationRequest {
            user_id: user_id.to_owned(),
            user_name: st.username(user_id),
            channel_id: channel.id.clone(),
            channel_name: channel.name.clone(),
            team_id: if in_team {
                channel.team_id.clone()
            } else {
                String::new()
            },
            team_domain: if in_team {
                st.team.name.clone()
            } else {
                String::new()
            },
            post_id: post_id.to_owned(),
            trigger_id: base64(trigger.as_bytes()),
            action_type: action
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("button")
                .to_owned(),
            data_source: action
                .get("data_source")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            context: Some(Value::Object(context))
                .filter(|c| c.as_object().is_some_and(|m| !m.is_empty())),
        };
        (url, request)
    };
    let trigger_id = request.trigger_id.clone();
    let reply = shared
        .http
        .post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json")
        .body(serde_json::to_vec(&request).expect("integration request JSON"))
        .send()
        .await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => {
            return Err(ActionFailure::Integration {
                status: 0,
                body: e.to_string(),
            })
        }
    };
    let status = reply.status().as_u16();
    let text = reply.text().await.unwrap_or_default();
    if status != 200 {
        return Err(ActionFailure::Integration { status, body: text });
    }
    let response: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).map_err(|_| ActionFailure::Integration {
            status,
            body: text.clone(),
        })?
    };
    apply_action_response(shared, post_id, user_id, &response).map_err(ActionFailure::Api)?;
    Ok((response, trigger_id))
}

/// Applies a `PostActionIntegrationResponse`: `update` goes through `UpdatePost` with the
/// original `is_pinned`/`has_reactions`; `update.props` null keeps the original props
/// (buttons included), otherwise replaces them except `from_webhook`, `override_username`
/// and `override_icon_url`, which follow the original. `ephemeral_text` goes to the clicker
/// in the post's thread.
fn apply_action_response(
    shared: &Shared,
    post_id: &str,
    user_id: &str,
    response: &Value,
) -> Result<(), FakeError> {
    let mut st = shared.lock();
    let Some(original) = st.post(post_id).cloned() else {
        return Err(FakeError::post_not_found());
    };
    if let Some(update) = response.get("update").filter(|u| u.is_object()) {
        let props = match update.get("props") {
            None | Some(Value::Null) => original.props.clone(),
            Some(new_props) => {
                let mut props = if new_props.is_object() {
                    new_props.clone()
                } else {
                    json!({})
                };
                for key in ["from_webhook", "override_username", "override_icon_url"] {
                    let map = props.as_object_mut().expect("object");
                    match original.props.get(key) {
                        Some(v) => map.insert(key.to_owned(), v.clone()),
                        None => map.remove(key),
                    };
                }
                props
            }
        };
        let message = update
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let file_ids = update
            .get("file_ids")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        st.update_post(
            post_id,
            PostUpdate {
                message,
                props,
                file_ids,
                is_pinned: original.is_pinned,
                has_reactions: original.has_reactions,
            },
        )?;
    }
    if let Some(text) = response
        .get("ephemeral_text")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        let root = if original.root_id.is_empty() {
            original.id.clone()
        } else {
            original.root_id.clone()
        };
        st.send_ephemeral(
            user_id,
            &original.user_id,
            &original.channel_id,
            &root,
            text,
        );
    }
    Ok(())
}
