//! A faithful fake of the Microsoft side of a Teams bot, for the integration and end-to-end
//! tests: the token issuer of inbound requests, the token endpoint of outbound ones, and the
//! Bot Framework Connector, all on one server on `127.0.0.1:<random port>`.
//!
//! The wire formats follow `/work/shared/reference/wire-formats.md` section 3 and its gotchas
//! (section 4):
//!
//! - **Issuer** (§3.2): OpenID metadata at `/v1/.well-known/openidconfiguration` whose
//!   `jwks_uri` is `/v1/.well-known/keys`; a JWKS with RSA keys carrying `endorsements`; tokens
//!   signed RS256 with header `{"typ":"JWT","alg":"RS256","x5t":kid,"kid":kid}` and claims
//!   `aud`, `iss` (`https://api.botframework.com`), `nbf`, `exp`, `serviceurl`. Three keys are
//!   generated at test time (once per test process): one endorsed for `msteams`, one endorsed
//!   only for `webchat`, one never published. [`TokenSpec`] breaks any part of a token.
//! - **Token endpoint** (§3.1): `POST /{tenant}/oauth2/v2.0/token`, form-encoded client
//!   credentials; answers `{"token_type":"Bearer","expires_in":…,"ext_expires_in":…,
//!   "access_token":…}` or an OAuth error (400/401).
//! - **Connector** (§3.4) under the service URL `http://127.0.0.1:PORT/amer/`:
//!   CreateConversation, SendToConversation, ReplyToActivity, UpdateActivity, DeleteActivity.
//!   Every call needs a token the endpoint issued (401 otherwise); the conversation id must be
//!   percent-encoded in the path (400 otherwise); bodies over 28 KB get 413
//!   `MessageSizeTooBig`; unknown conversations 404 `ConversationNotFound`; injected failures
//!   (429 `Throttled` with `Retry-After`, 5xx) come first. Creates answer 201, updates 200,
//!   both with `{"id":…}`. Every request is recorded, and the messages' state (text,
//!   attachments, thread) is kept, user messages included, so a test reads a thread as a Teams
//!   client would show it.
//! - **Activities to the bot** (§3.3, §3.6): channel messages with the bot's `<at>` mention and
//!   its `entities`, Teams' `text/html` copy as an attachment and `channelData`; thread
//!   replies; personal chat messages; `Action.Submit` (`message` + `value`); `Action.Execute`
//!   (`invoke` `adaptiveCard/action`). [`FakeTeams::send`] posts one with a token.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Request, State as AxumState};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The issuer of Bot Framework tokens.
pub const ISSUER: &str = "https://api.botframework.com";
/// Largest activity body the Connector takes (Teams: about 28 KB per message).
pub const MAX_BODY_BYTES: usize = 28 * 1024;
/// The tenant every conversation is in.
pub const TENANT: &str = "0d9b645f-1c2e-4b5a-9d3c-2f1e0a9b8c7d";
/// The bot's display name, as its mentions show it.
pub const BOT_NAME: &str = "ApprovalBot";

/// One of the fake issuer's signing keys.
pub struct SigningKey {
    /// Key id (`kid` and `x5t`).
    pub kid: String,
    der: Vec<u8>,
    n: String,
    e: String,
}

/// The issuer's keys, generated once per test process (2048-bit RSA, as Microsoft's).
fn keys() -> &'static [SigningKey; 3] {
    static KEYS: OnceLock<[SigningKey; 3]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let make = |kid: &'static str| {
            std::thread::spawn(move || {
                let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                    .expect("generate an RSA key");
                SigningKey {
                    kid: kid.to_owned(),
                    der: key.to_pkcs1_der().expect("PKCS#1").as_bytes().to_vec(),
                    n: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                    e: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
                }
            })
        };
        let handles = [
            make("teams-key-1"),
            make("webchat-key-2"),
            make("rotated-key-3"),
        ];
        handles.map(|h| h.join().expect("key generation"))
    })
}

/// Which key signs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChoice {
    /// Published, endorsed for `msteams` (and `webchat`).
    Endorsed,
    /// Published, endorsed only for `webchat`.
    NotEndorsed,
    /// Never published (unless [`FakeTeams::publish_rotated_key`] is called).
    Unpublished,
}

/// How to build a token; [`TokenSpec::valid`] and then break one field.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// `iss`.
    pub iss: String,
    /// `aud`.
    pub aud: String,
    /// `serviceurl`; `None` leaves the claim out.
    pub service_url: Option<String>,
    /// Signing key.
    pub key: KeyChoice,
    /// `exp` relative to now, in seconds.
    pub exp_in: i64,
    /// `nbf` relative to now, in seconds.
    pub nbf_in: i64,
    /// Flip a byte of the signature.
    pub tamper: bool,
}

impl TokenSpec {
    /// What the Connector sends: valid for `app_id` and `service_url`, an hour long.
    pub fn valid(app_id: &str, service_url: &str) -> Self {
        Self {
            iss: ISSUER.into(),
            aud: app_id.into(),
            service_url: Some(service_url.into()),
            key: KeyChoice::Endorsed,
            exp_in: 3600,
            nbf_in: -60,
            tamper: false,
        }
    }

    /// The signed JWT.
    pub fn sign(&self) -> String {
        let key = match self.key {
            KeyChoice::Endorsed => &keys()[0],
            KeyChoice::NotEndorsed => &keys()[1],
            KeyChoice::Unpublished => &keys()[2],
        };
        let now = unix_now() as i64;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        header.x5t = Some(key.kid.clone());
        let mut claims = json!({
            "aud": self.aud,
            "iss": self.iss,
            "nbf": now + self.nbf_in,
            "exp": now + self.exp_in,
        });
        if let Some(url) = &self.service_url {
            claims["serviceurl"] = json!(url);
        }
        let token = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_der(&key.der),
        )
        .expect("sign");
        if !self.tamper {
            return token;
        }
        let (head, signature) = token.rsplit_once('.').expect("three parts");
        let mut bytes = URL_SAFE_NO_PAD.decode(signature).expect("signature");
        bytes[10] ^= 0x55;
        format!("{head}.{}", URL_SAFE_NO_PAD.encode(bytes))
    }
}

/// A Teams user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamsUser {
    /// `29:…`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// AAD object id (lowercase GUID).
    pub aad: String,
}

impl TeamsUser {
    fn account(&self) -> Value {
        json!({ "id": self.id, "name": self.name, "aadObjectId": self.aad })
    }
}

/// A message as the fake Connector holds it (bot and user messages alike).
#[derive(Debug, Clone, PartialEq)]
pub struct FakeMessage {
    /// Activity id.
    pub id: String,
    /// The conversation it was posted to (`<channel>;messageid=<root>` in a channel).
    pub conversation: String,
    /// Its thread's root (its own id for a thread's first message; `None` in a chat).
    pub root: Option<String>,
    /// Who wrote it (`28:<app id>` for the bot).
    pub from: String,
    /// Current text.
    pub text: Option<String>,
    /// Current attachments.
    pub attachments: Vec<Value>,
    /// How many times it was updated.
    pub updates: u32,
}

/// One request the Connector or the token endpoint received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `POST`, `PUT`, `DELETE`.
    pub method: String,
    /// The path as sent (percent-encoding intact).
    pub raw_path: String,
    /// What it was: `create`, `send`, `reply`, `update`, `delete`, `token`.
    pub op: &'static str,
    /// The decoded conversation id, for conversation calls.
    pub conversation: Option<String>,
    /// The activity id in the path, for reply/update/delete.
    pub activity_id: Option<String>,
    /// The JSON body (`Null` when there was none or it was not JSON).
    pub body: Value,
    /// The status answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

struct State {
    app_id: String,
    app_password: String,
    channels: HashSet<String>,
    chats: HashSet<String>,
    messages: BTreeMap<String, FakeMessage>,
    requests: Vec<Recorded>,
    failures: VecDeque<(u16, Option<u64>)>,
    tokens: HashSet<String>,
    token_lifetime: u64,
    rotated_published: bool,
    metadata_fetches: u32,
    jwks_fetches: u32,
    next_id: u64,
}

impl State {
    fn new_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    /// Whether a conversation id names something that exists: a chat, a channel, or a thread
    /// whose root message exists in that channel.
    fn knows(&self, conversation: &str) -> bool {
        if self.chats.contains(conversation) {
            return true;
        }
        match conversation.split_once(";messageid=") {
            Some((channel, root)) => {
                self.channels.contains(channel)
                    && self
                        .messages
                        .get(root)
                        .is_some_and(|m| m.conversation.starts_with(channel))
            }
            None => self.channels.contains(conversation),
        }
    }
}

struct Shared {
    state: Mutex<State>,
    base: String,
    shutdown: CancellationToken,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running fake (see the module documentation). Stop it with [`FakeTeams::stop`].
pub struct FakeTeams {
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
    http: reqwest::Client,
}

impl FakeTeams {
    /// Starts the fake with a fresh app id and password; the keys are generated on first use.
    pub async fn start() -> Self {
        let _ = keys();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Teams");
        let addr = listener.local_addr().expect("address");
        let start = u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                app_id: uuid::Uuid::new_v4().to_string(),
                app_password: format!("pw-{}", uuid::Uuid::new_v4().simple()),
                channels: HashSet::new(),
                chats: HashSet::new(),
                messages: BTreeMap::new(),
                requests: Vec::new(),
                failures: VecDeque::new(),
                tokens: HashSet::new(),
                token_lifetime: 3600,
                rotated_published: false,
                metadata_fetches: 0,
                jwks_fetches: 0,
                next_id: start,
            }),
            base: format!("http://{addr}"),
            shutdown: CancellationToken::new(),
        });
        let app = Router::new()
            .route("/v1/.well-known/openidconfiguration", get(metadata))
            .route("/v1/.well-known/keys", get(jwks))
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route("/amer/v3/conversations", post(create_conversation))
            .route(
                "/amer/v3/conversations/{conversation}/activities",
                post(send_to_conversation),
            )
            .route(
                "/amer/v3/conversations/{conversation}/activities/{activity}",
                post(reply_to_activity)
                    .put(update_activity)
                    .delete(delete_activity),
            )
            .with_state(Arc::clone(&shared));
        let shutdown = shared.shutdown.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
        });
        Self {
            shared,
            server: Some(server),
            http: reqwest::Client::new(),
        }
    }

    /// Stops the server and waits for it (at most 5 s).
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

    /// The bot's Microsoft App ID.
    pub fn app_id(&self) -> String {
        self.shared.lock().app_id.clone()
    }

    /// The bot's client secret.
    pub fn app_password(&self) -> String {
        self.shared.lock().app_password.clone()
    }

    /// The bot's account id, `28:<app id>`.
    pub fn bot_id(&self) -> String {
        format!("28:{}", self.app_id())
    }

    /// The Connector's service URL, `http://127.0.0.1:PORT/amer/`.
    pub fn service_url(&self) -> String {
        format!("{}/amer/", self.shared.base)
    }

    /// The OpenID metadata URL (`SM_TEAMS_OPENID_METADATA_URL`).
    pub fn metadata_url(&self) -> String {
        format!("{}/v1/.well-known/openidconfiguration", self.shared.base)
    }

    /// The token endpoint of a multi-tenant bot (`SM_TEAMS_TOKEN_URL`).
    pub fn token_url(&self) -> String {
        format!("{}/botframework.com/oauth2/v2.0/token", self.shared.base)
    }

    /// A token valid for this bot and the fake's service URL.
    pub fn valid_token(&self) -> String {
        TokenSpec::valid(&self.app_id(), &self.service_url()).sign()
    }

    /// A token spec valid for this bot, to break.
    pub fn token_spec(&self) -> TokenSpec {
        TokenSpec::valid(&self.app_id(), &self.service_url())
    }

    /// The lifetime of the tokens the endpoint issues from now on (seconds).
    pub fn set_token_lifetime(&self, secs: u64) {
        self.shared.lock().token_lifetime = secs;
    }

    /// Adds the never-published key to the JWKS (a key rotation).
    pub fn publish_rotated_key(&self) {
        self.shared.lock().rotated_published = true;
    }

    /// How often the metadata and the JWKS were fetched.
    pub fn key_fetches(&self) -> (u32, u32) {
        let s = self.shared.lock();
        (s.metadata_fetches, s.jwks_fetches)
    }

    /// A new channel in the team, `19:<hex>@thread.tacv2`.
    pub fn add_channel(&self) -> String {
        let id = format!("19:{}@thread.tacv2", uuid::Uuid::new_v4().simple());
        self.shared.lock().channels.insert(id.clone());
        id
    }

    /// A new personal chat with the bot, `a:1<hex>`.
    pub fn add_personal_chat(&self) -> String {
        let id = format!("a:1{}", uuid::Uuid::new_v4().simple());
        self.shared.lock().chats.insert(id.clone());
        id
    }

    /// A user with a fresh AAD object id.
    pub fn user(&self, name: &str) -> TeamsUser {
        TeamsUser {
            id: format!("29:1{}", uuid::Uuid::new_v4().simple()),
            name: name.to_owned(),
            aad: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// The next failures (status, `Retry-After` seconds) the Connector answers, before
    /// anything else is checked: `fail_next(429, Some(1))` is Teams' throttling.
    pub fn fail_next(&self, status: u16, retry_after: Option<u64>) {
        self.shared.lock().failures.push_back((status, retry_after));
    }

    /// Every request so far (token requests included), oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// The Connector requests of one kind (`create`, `send`, `reply`, `update`, `delete`,
    /// `token`) that succeeded.
    pub fn ops(&self, op: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.op == op && r.status < 300)
            .collect()
    }

    /// A message by id.
    pub fn message(&self, id: &str) -> Option<FakeMessage> {
        self.shared.lock().messages.get(id).cloned()
    }

    /// The messages of a channel thread (root first) or a chat, in posting order.
    pub fn thread(&self, channel_or_chat: &str, root: Option<&str>) -> Vec<FakeMessage> {
        let s = self.shared.lock();
        let mut messages: Vec<FakeMessage> = s
            .messages
            .values()
            .filter(|m| match root {
                Some(root) => m.conversation == format!("{channel_or_chat};messageid={root}"),
                None => m.conversation == channel_or_chat,
            })
            .cloned()
            .collect();
        messages.sort_by_key(|m| m.id.parse::<u64>().unwrap_or(0));
        messages
    }

    /// The thread roots the bot opened in a channel, oldest first.
    pub fn bot_threads(&self, channel: &str) -> Vec<String> {
        let bot = self.bot_id();
        let s = self.shared.lock();
        s.messages
            .values()
            .filter(|m| m.from == bot && m.root.as_deref() == Some(m.id.as_str()))
            .filter(|m| m.conversation.starts_with(channel))
            .map(|m| m.id.clone())
            .collect()
    }

    // ----- activities to the bot ------------------------------------------------------------

    fn record_user_message(
        &self,
        conversation: &str,
        root: Option<&str>,
        from: &TeamsUser,
        text: &str,
    ) -> String {
        let mut s = self.shared.lock();
        let id = s.new_id();
        let root = root
            .map(str::to_owned)
            .or_else(|| conversation.contains(";messageid=").then(|| id.clone()));
        s.messages.insert(
            id.clone(),
            FakeMessage {
                id: id.clone(),
                conversation: conversation.to_owned(),
                root,
                from: from.id.clone(),
                text: Some(text.to_owned()),
                attachments: Vec::new(),
                updates: 0,
            },
        );
        id
    }

    fn base_activity(
        &self,
        kind: &str,
        id: &str,
        conversation: Value,
        from: &TeamsUser,
        channel_data: Value,
    ) -> Value {
        json!({
            "type": kind,
            "id": id,
            "timestamp": "2024-01-19T12:53:10.123Z",
            "localTimestamp": "2024-01-19T13:53:10.123+01:00",
            "serviceUrl": self.service_url(),
            "channelId": "msteams",
            "from": from.account(),
            "conversation": conversation,
            "recipient": { "id": self.bot_id(), "name": BOT_NAME },
            "channelData": channel_data,
            "locale": "en-US",
        })
    }

    fn channel_data(channel: &str) -> Value {
        json!({
            "teamsChannelId": channel,
            "teamsTeamId": "19:acca514e83cb497e960e0b014d405336@thread.tacv2",
            "channel": { "id": channel, "name": "General" },
            "team": { "id": "19:acca514e83cb497e960e0b014d405336@thread.tacv2" },
            "tenant": { "id": TENANT },
        })
    }

    fn channel_conversation(conversation: &str) -> Value {
        json!({ "isGroup": true, "conversationType": "channel", "tenantId": TENANT, "id": conversation })
    }

    /// Text with the bot's `<at>` mention in front (when `mention`), its entities, and Teams'
    /// `text/html` copy of the message.
    fn mention_parts(&self, text: &str, mention: bool) -> (String, Value, Value) {
        let at = format!("<at>{BOT_NAME}</at>");
        let full = if mention {
            format!("{at} {text}")
        } else {
            text.to_owned()
        };
        let mut entities =
            vec![json!({"type":"clientInfo","locale":"en-US","country":"US","platform":"Web"})];
        if mention {
            entities.insert(
                0,
                json!({"type":"mention","mentioned":{"id": self.bot_id(),"name": BOT_NAME},"text": at}),
            );
        }
        let html = format!(
            "<div><div>{}{}</div></div>",
            if mention {
                format!("<span itemscope=\"\" itemtype=\"http://schema.skype.com/Mention\" itemid=\"0\">{BOT_NAME}</span> ")
            } else {
                String::new()
            },
            text.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        );
        (
            full,
            Value::Array(entities),
            json!([{ "contentType": "text/html", "content": html }]),
        )
    }

    /// A new top-level post in `channel` (its conversation is `<channel>;messageid=<its id>`).
    pub fn channel_message(
        &self,
        channel: &str,
        from: &TeamsUser,
        text: &str,
        mention: bool,
    ) -> Value {
        let (full, entities, attachments) = self.mention_parts(text, mention);
        let id = {
            let mut s = self.shared.lock();
            s.new_id()
        };
        let conversation = format!("{channel};messageid={id}");
        self.shared.lock().messages.insert(
            id.clone(),
            FakeMessage {
                id: id.clone(),
                conversation: conversation.clone(),
                root: Some(id.clone()),
                from: from.id.clone(),
                text: Some(full.clone()),
                attachments: Vec::new(),
                updates: 0,
            },
        );
        let mut activity = self.base_activity(
            "message",
            &id,
            Self::channel_conversation(&conversation),
            from,
            Self::channel_data(channel),
        );
        activity["textFormat"] = json!("plain");
        activity["text"] = json!(full);
        activity["entities"] = entities;
        activity["attachments"] = attachments;
        activity
    }

    /// A reply in the thread rooted at `root` in `channel`.
    pub fn thread_reply(
        &self,
        channel: &str,
        root: &str,
        from: &TeamsUser,
        text: &str,
        mention: bool,
    ) -> Value {
        let (full, entities, attachments) = self.mention_parts(text, mention);
        let conversation = format!("{channel};messageid={root}");
        let id = self.record_user_message(&conversation, Some(root), from, &full);
        let mut activity = self.base_activity(
            "message",
            &id,
            Self::channel_conversation(&conversation),
            from,
            Self::channel_data(channel),
        );
        activity["textFormat"] = json!("plain");
        activity["text"] = json!(full);
        activity["entities"] = entities;
        activity["attachments"] = attachments;
        activity["replyToId"] = json!(root);
        activity
    }

    /// A message in a personal chat (no mention needed; `channelData` has only the tenant).
    pub fn personal_message(&self, chat: &str, from: &TeamsUser, text: &str) -> Value {
        let id = self.record_user_message(chat, None, from, text);
        let mut activity = self.base_activity(
            "message",
            &id,
            json!({ "conversationType": "personal", "tenantId": TENANT, "id": chat }),
            from,
            json!({ "tenant": { "id": TENANT } }),
        );
        activity["textFormat"] = json!("plain");
        activity["text"] = json!(text);
        activity["entities"] = json!([{"type":"clientInfo","locale":"en-US"}]);
        activity
    }

    fn card_place(&self, card_id: &str) -> (String, Value) {
        let message = self.message(card_id).expect("the card exists");
        let channel = message
            .conversation
            .split(";messageid=")
            .next()
            .unwrap_or_default()
            .to_owned();
        let data = if self.shared.lock().channels.contains(&channel) {
            Self::channel_data(&channel)
        } else {
            json!({ "tenant": { "id": TENANT } })
        };
        (message.conversation, data)
    }

    /// An `Action.Submit` click on the card in message `card_id`: a `message` whose `value`
    /// is the button's data and whose `replyToId` is the card's message.
    pub fn card_submit(&self, card_id: &str, from: &TeamsUser, value: Value) -> Value {
        let (conversation, data) = self.card_place(card_id);
        let id = self.shared.lock().new_id();
        let conv = if conversation.contains(";messageid=") {
            Self::channel_conversation(&conversation)
        } else {
            json!({ "conversationType": "personal", "tenantId": TENANT, "id": conversation })
        };
        let mut activity = self.base_activity("message", &id, conv, from, data);
        activity["value"] = value;
        activity["replyToId"] = json!(card_id);
        activity
    }

    /// An `Action.Execute` click on the card in message `card_id`: an `invoke` named
    /// `adaptiveCard/action` with `value.action` = `{type, id, verb, data}`.
    pub fn card_invoke(&self, card_id: &str, from: &TeamsUser, verb: &str, data: Value) -> Value {
        let (conversation, channel_data) = self.card_place(card_id);
        let id = format!("f:{}", uuid::Uuid::new_v4().simple());
        let conv = if conversation.contains(";messageid=") {
            Self::channel_conversation(&conversation)
        } else {
            json!({ "conversationType": "personal", "tenantId": TENANT, "id": conversation })
        };
        let mut activity = self.base_activity("invoke", &id, conv, from, channel_data);
        activity["name"] = json!("adaptiveCard/action");
        activity["replyToId"] = json!(card_id);
        activity["value"] = json!({
            "action": { "type": "Action.Execute", "id": "", "verb": verb, "data": data },
            "trigger": "manual",
        });
        activity
    }

    /// Posts `activity` to the bot's messaging endpoint (`http://…/api/messages`) with
    /// `Authorization: Bearer <token>` (none when `None`); returns the status and body.
    pub async fn send(
        &self,
        endpoint: &str,
        activity: &Value,
        token: Option<&str>,
    ) -> (u16, Value) {
        self.send_raw(endpoint, activity.to_string().into_bytes(), token)
            .await
    }

    /// `from` writes `text` in the thread rooted at `root` (no mention), sent to the bot's
    /// messaging endpoint with a valid token; the bot must take it (200).
    pub async fn reply(
        &self,
        endpoint: &str,
        channel: &str,
        root: &str,
        from: &TeamsUser,
        text: &str,
    ) {
        let activity = self.thread_reply(channel, root, from, text, false);
        let (status, body) = self
            .send(endpoint, &activity, Some(&self.valid_token()))
            .await;
        assert_eq!(status, 200, "the bot did not take {text:?}: {body}");
    }

    /// Posts raw bytes as an activity.
    pub async fn send_raw(
        &self,
        endpoint: &str,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(endpoint)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = request.send().await.expect("the bot answers");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

impl Drop for FakeTeams {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

// ------------------------------------------------------------------------------------------
// Issuer and token endpoint
// ------------------------------------------------------------------------------------------

async fn metadata(AxumState(shared): AxumState<Arc<Shared>>) -> Json<Value> {
    shared.lock().metadata_fetches += 1;
    Json(json!({
        "issuer": ISSUER,
        "authorization_endpoint": "https://invalid.botframework.com",
        "jwks_uri": format!("{}/v1/.well-known/keys", shared.base),
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    }))
}

async fn jwks(AxumState(shared): AxumState<Arc<Shared>>) -> Json<Value> {
    let rotated = {
        let mut s = shared.lock();
        s.jwks_fetches += 1;
        s.rotated_published
    };
    let jwk = |k: &SigningKey, endorsements: &[&str]| {
        json!({"kty":"RSA","use":"sig","kid":k.kid,"x5t":k.kid,"n":k.n,"e":k.e,
               "x5c":["MIIDBTCCAe2gAwIBAgIQ"],"endorsements":endorsements})
    };
    let [teams, webchat, third] = keys();
    let mut list = vec![
        jwk(teams, &["msteams", "webchat", "skype"]),
        jwk(webchat, &["webchat"]),
    ];
    if rotated {
        list.push(jwk(third, &["msteams"]));
    }
    Json(json!({ "keys": list }))
}

async fn token(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    let mut s = shared.lock();
    let form_encoded = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let (status, answer) = if !form_encoded
        || form.get("grant_type").map(String::as_str) != Some("client_credentials")
    {
        (
            400,
            json!({"error":"unsupported_grant_type","error_description":"AADSTS70003: The app requested an unsupported grant type."}),
        )
    } else if form.get("scope").map(String::as_str) != Some("https://api.botframework.com/.default")
    {
        (
            400,
            json!({"error":"invalid_scope","error_description":"AADSTS70011: The provided value for scope is not valid."}),
        )
    } else if form.get("client_id") != Some(&s.app_id)
        || form.get("client_secret") != Some(&s.app_password)
    {
        (
            401,
            json!({"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}),
        )
    } else {
        let token = format!(
            "eyJ0eXAi.fake-bot-token-{}.{}",
            tenant,
            uuid::Uuid::new_v4().simple()
        );
        s.tokens.insert(token.clone());
        (
            200,
            json!({"token_type":"Bearer","expires_in":s.token_lifetime,"ext_expires_in":s.token_lifetime,"access_token":token}),
        )
    };
    s.requests.push(Recorded {
        method: "POST".into(),
        raw_path: format!("/{tenant}/oauth2/v2.0/token"),
        op: "token",
        conversation: None,
        activity_id: None,
        body: Value::Null,
        status,
        at: Instant::now(),
    });
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        Json(answer),
    )
        .into_response()
}

// ------------------------------------------------------------------------------------------
// Connector
// ------------------------------------------------------------------------------------------

fn error(status: u16, code: &str, message: &str) -> (u16, Value) {
    (
        status,
        json!({ "error": { "code": code, "message": message } }),
    )
}

/// What every Connector call goes through: recording, injected failures, the token, the
/// encoding of the conversation id, the size limit, the JSON body. `work` then answers.
fn connector_call(
    shared: &Shared,
    op: &'static str,
    request: &Request,
    conversation: Option<String>,
    activity_id: Option<String>,
    body: &Bytes,
    work: impl FnOnce(&mut State, &Value) -> (u16, Value),
) -> Response {
    let raw_path = request.uri().path().to_owned();
    let json_body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut s = shared.lock();
    let mut retry_after = None;
    let (status, answer) = if let Some((status, after)) = s.failures.pop_front() {
        retry_after = after;
        if status == 429 {
            error(429, "Throttled", "The request was throttled.")
        } else {
            error(status, "ServiceError", "Injected failure.")
        }
    } else {
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let raw_conversation = raw_path
            .split("/v3/conversations/")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
            .to_owned();
        if !s.tokens.contains(token) {
            error(
                401,
                "Unauthorized",
                "Authorization has been denied for this request.",
            )
        } else if raw_conversation.contains([';', '@', ':']) {
            error(
                400,
                "BadArgument",
                "The conversation id must be URL-encoded.",
            )
        } else if body.len() > MAX_BODY_BYTES {
            error(413, "MessageSizeTooBig", "Message size too big.")
        } else if !body.is_empty() && json_body.is_null() {
            error(400, "BadSyntax", "The request body is not JSON.")
        } else {
            work(&mut s, &json_body)
        }
    };
    s.requests.push(Recorded {
        method: request.method().to_string(),
        raw_path,
        op,
        conversation,
        activity_id,
        body: json_body,
        status,
        at: Instant::now(),
    });
    drop(s);
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(answer),
    )
        .into_response();
    if let Some(after) = retry_after {
        if let Ok(value) = HeaderValue::from_str(&after.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

/// Stores a message the bot sent; checks that it is a message with text or attachments.
fn store_bot_message(
    s: &mut State,
    conversation: &str,
    root: Option<String>,
    activity: &Value,
) -> (u16, Value) {
    match activity["type"].as_str() {
        Some("message") => {}
        Some("typing") => return (200, json!({})),
        _ => return error(400, "BadArgument", "Unknown activity type."),
    }
    let text = activity["text"].as_str().map(str::to_owned);
    let attachments = activity["attachments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if text.as_deref().unwrap_or_default().is_empty() && attachments.is_empty() {
        return error(
            400,
            "BadArgument",
            "Activity must contain text or attachments.",
        );
    }
    let id = s.new_id();
    let from = format!("28:{}", s.app_id);
    s.messages.insert(
        id.clone(),
        FakeMessage {
            id: id.clone(),
            conversation: conversation.to_owned(),
            root,
            from,
            text,
            attachments,
            updates: 0,
        },
    );
    (201, json!({ "id": id }))
}

async fn create_conversation(
    AxumState(shared): AxumState<Arc<Shared>>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let request = Request::from_parts(parts, axum::body::Body::empty());
    let service_url = format!("{}/amer/", shared.base);
    connector_call(
        &shared,
        "create",
        &request,
        None,
        None,
        &body,
        |s, params| {
            let Some(channel) = params["channelData"]["channel"]["id"].as_str() else {
                return error(400, "BadArgument", "channelData.channel.id is required.");
            };
            if params["isGroup"] != json!(true) {
                return error(
                    400,
                    "BadArgument",
                    "A channel conversation must be a group.",
                );
            }
            if !s.channels.contains(channel) {
                return error(404, "ConversationNotFound", "Conversation not found.");
            }
            let id = s.new_id();
            let conversation = format!("{channel};messageid={id}");
            let activity = &params["activity"];
            let from = format!("28:{}", s.app_id);
            s.messages.insert(
                id.clone(),
                FakeMessage {
                    id: id.clone(),
                    conversation: conversation.clone(),
                    root: Some(id.clone()),
                    from,
                    text: activity["text"].as_str().map(str::to_owned),
                    attachments: activity["attachments"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                    updates: 0,
                },
            );
            (
                201,
                json!({ "id": conversation, "activityId": id, "serviceUrl": service_url }),
            )
        },
    )
}

async fn send_to_conversation(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path(conversation): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let request = Request::from_parts(parts, axum::body::Body::empty());
    let conv = conversation.clone();
    connector_call(
        &shared,
        "send",
        &request,
        Some(conversation),
        None,
        &body,
        |s, activity| {
            if !s.knows(&conv) {
                return error(404, "ConversationNotFound", "Conversation not found.");
            }
            let root = conv.split_once(";messageid=").map(|(_, r)| r.to_owned());
            store_bot_message(s, &conv, root, activity)
        },
    )
}

async fn reply_to_activity(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path((conversation, activity_id)): Path<(String, String)>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let request = Request::from_parts(parts, axum::body::Body::empty());
    let conv = conversation.clone();
    let replied = activity_id.clone();
    connector_call(
        &shared,
        "reply",
        &request,
        Some(conversation),
        Some(activity_id),
        &body,
        |s, activity| {
            if !s.knows(&conv) || !s.messages.contains_key(&replied) {
                return error(404, "ConversationNotFound", "Conversation not found.");
            }
            // In a channel the reply joins the thread; a chat has no threads (falls back to send).
            let root = conv.split_once(";messageid=").map(|(_, r)| r.to_owned());
            store_bot_message(s, &conv, root, activity)
        },
    )
}

async fn update_activity(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path((conversation, activity_id)): Path<(String, String)>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let request = Request::from_parts(parts, axum::body::Body::empty());
    let conv = conversation.clone();
    let id = activity_id.clone();
    connector_call(
        &shared,
        "update",
        &request,
        Some(conversation),
        Some(activity_id),
        &body,
        |s, activity| {
            let bot = format!("28:{}", s.app_id);
            let Some(message) = s.messages.get_mut(&id).filter(|m| m.conversation == conv) else {
                return error(404, "NotFound", "Activity not found in this conversation.");
            };
            if message.from != bot {
                return error(
                    403,
                    "Forbidden",
                    "The bot can only update its own messages.",
                );
            }
            if activity["type"] != json!("message") {
                return error(400, "BadArgument", "Only messages can be updated.");
            }
            message.text = activity["text"].as_str().map(str::to_owned);
            message.attachments = activity["attachments"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            message.updates += 1;
            (200, json!({ "id": id }))
        },
    )
}

async fn delete_activity(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path((conversation, activity_id)): Path<(String, String)>,
    request: Request,
) -> Response {
    let id = activity_id.clone();
    connector_call(
        &shared,
        "delete",
        &request,
        Some(conversation),
        Some(activity_id),
        &Bytes::new(),
        |s, _| match s.messages.remove(&id) {
            Some(_) => (200, json!({})),
            None => error(404, "NotFound", "Activity not found."),
        },
    )
}
