//! Checks that the fake Mattermost server (tests/support/mattermost.rs) speaks the real wire
//! format, using raw reqwest and tokio-tungstenite the way a client would.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::mattermost::{ClickOutcome, FakeMattermost};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);

// ---- REST helpers ---------------------------------------------------------------------------

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(fake: &FakeMattermost, token: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: fake.url(),
            token: token.to_owned(),
        }
    }

    fn as_user(fake: &FakeMattermost, user_id: &str) -> Self {
        Self::new(fake, &fake.user_token(user_id).expect("user token"))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request")
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        json_of(self.send(reqwest::Method::GET, path, None).await).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        json_of(self.send(reqwest::Method::POST, path, Some(body)).await).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        json_of(self.send(reqwest::Method::PUT, path, Some(body)).await).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        json_of(self.send(reqwest::Method::DELETE, path, None).await).await
    }
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Asserts the AppError shape and returns its id.
fn app_error(status: u16, body: &Value) -> String {
    assert_eq!(body["status_code"], json!(status), "status_code in {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message in {body}"
    );
    assert_eq!(
        body["detailed_error"],
        json!(""),
        "detailed_error in {body}"
    );
    assert!(
        body["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "request_id in {body}"
    );
    body["id"].as_str().expect("id").to_owned()
}

/// Asserts that the top-level keys of a raw JSON object appear in this order.
fn assert_key_order(raw: &str, keys: &[&str]) {
    let mut last = 0;
    for key in keys {
        let pos = raw
            .find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("missing key {key} in {raw}"));
        assert!(pos >= last, "key {key} out of order in {raw}");
        last = pos;
    }
}

// ---- WebSocket helpers ----------------------------------------------------------------------

async fn connect(fake: &FakeMattermost, token: Option<&str>, query: &str) -> Ws {
    let url = format!(
        "{}/api/v4/websocket{query}",
        fake.url().replace("http://", "ws://")
    );
    let mut request = url.into_client_request().expect("ws request");
    if let Some(token) = token {
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("ws connect");
    ws
}

/// The next text frame, skipping control frames.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        match msg {
            Message::Text(text) => return text.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    serde_json::from_str(&next_text(ws).await).expect("frame JSON")
}

/// The next event named `event`, skipping others.
async fn next_event(ws: &mut Ws, event: &str) -> Value {
    loop {
        let frame = next_json(ws).await;
        if frame["event"] == json!(event) {
            return frame;
        }
    }
}

/// Asserts the socket ends without a text frame and without a close frame.
async fn expect_dropped(ws: &mut Ws) {
    loop {
        match tokio::time::timeout(2 * WAIT, ws.next())
            .await
            .expect("socket still open")
        {
            None | Some(Err(_)) => return,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => panic!("expected an abrupt close, got {other:?}"),
        }
    }
}

async fn expect_silence(ws: &mut Ws, ms: u64) {
    if let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(ms), ws.next()).await {
        panic!("expected no frame, got {msg:?}");
    }
}

async fn send_json(ws: &mut Ws, value: Value) {
    ws.send(Message::Text(value.to_string().into()))
        .await
        .expect("ws send");
}

/// The `data.post` of an event, decoded from its JSON string.
fn event_post(event: &Value) -> Value {
    let raw = event["data"]["post"]
        .as_str()
        .expect("data.post is a JSON string");
    serde_json::from_str(raw).expect("post JSON")
}

struct Setup {
    fake: FakeMattermost,
    bot: String,
    alice: String,
    channel: String,
}

async fn setup() -> Setup {
    let fake = FakeMattermost::start().await;
    let bot = fake.bot_user_id();
    let alice = fake.add_user("alice");
    let channel = fake.create_channel("llm-approvals", &[&bot, &alice]);
    Setup {
        fake,
        bot,
        alice,
        channel,
    }
}

// ---- posts ----------------------------------------------------------------------------------

#[tokio::test]
async fn create_post_returns_201_with_every_field_in_order() {
    let s = setup().await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let response = bot
        .send(
            reqwest::Method::POST,
            "/api/v4/posts?set_online=false",
            Some(json!({"channel_id": s.channel, "message": "hello #tag", "pending_post_id": "pp-1"})),
        )
        .await;
    assert_eq!(response.status().as_u16(), 201);
    let raw = response.text().await.unwrap();
    assert_key_order(
        &raw,
        &[
            "id",
            "create_at",
            "update_at",
            "edit_at",
            "delete_at",
            "is_pinned",
            "user_id",
            "channel_id",
            "root_id",
            "original_id",
            "message",
            "type",
            "props",
            "hashtags",
            "file_ids",
            "pending_post_id",
            "remote_id",
            "reply_count",
            "last_reply_at",
            "participants",
            "metadata",
        ],
    );
    let post: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(post["id"].as_str().unwrap().len(), 26);
    assert_eq!(post["user_id"], json!(s.bot));
    assert_eq!(post["props"], json!({"from_bot": "true"}));
    assert_eq!(post["hashtags"], json!("#tag"));
    assert_eq!(post["pending_post_id"], json!("pp-1"));
    assert_eq!(post["file_ids"], json!([]));
    assert_eq!(post["participants"], Value::Null);
    assert_eq!(post["metadata"], json!({}));
    assert_eq!(post["remote_id"], json!(""));
    assert_eq!(post["update_at"], post["create_at"]);
    assert_eq!(post["edit_at"], json!(0));
    assert!(
        post.get("has_reactions").is_none(),
        "has_reactions is omitempty"
    );

    let alice = Api::as_user(&s.fake, &s.alice);
    let (status, human) = alice
        .post(
            "/api/v4/posts",
            json!({"channel_id": s.channel, "message": "hi", "root_id": null}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(human["props"], json!({}), "only bots get from_bot");
    assert_eq!(human["root_id"], json!(""));
    assert_eq!(s.fake.posts().len(), 2);
}

#[tokio::test]
async fn message_limit_counts_unicode_scalar_values() {
    let s = setup().await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    for fits in ["é".repeat(16_383), "😀".repeat(16_383)] {
        let (status, _) = bot
            .post(
                "/api/v4/posts",
                json!({"channel_id": s.channel, "message": fits}),
            )
            .await;
        assert_eq!(
            status, 201,
            "16383 runes must fit whatever their byte length"
        );
    }
    let (status, body) = bot
        .post(
            "/api/v4/posts",
            json!({"channel_id": s.channel, "message": "é".repeat(16_384)}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "model.post.is_valid.message_length.app_error"
    );
    let err = s
        .fake
        .post_as(&s.alice, &s.channel, None, &"a".repeat(16_384))
        .unwrap_err();
    assert_eq!(err.id, "model.post.is_valid.message_length.app_error");
}

#[tokio::test]
async fn root_id_must_be_a_root_post_of_the_same_channel() {
    let s = setup().await;
    let other = s.fake.create_channel("other", &[&s.bot]);
    let root = s.fake.post_as(&s.alice, &s.channel, None, "root").unwrap();
    let reply = s
        .fake
        .post_as(&s.alice, &s.channel, Some(&root.id), "reply")
        .unwrap();
    assert_eq!(reply.root_id, root.id);
    let bot = Api::new(&s.fake, &s.fake.bot_token());

    let (status, body) = bot
        .post(
            "/api/v4/posts",
            json!({"channel_id": s.channel, "message": "x", "root_id": reply.id}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "api.post.create_post.root_id.app_error"
    );

    let (status, body) = bot
        .post(
            "/api/v4/posts",
            json!({"channel_id": other, "message": "x", "root_id": root.id}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "api.post.create_post.channel_root_id.app_error"
    );

    let (status, body) = bot
        .post("/api/v4/posts", json!({"channel_id": s.channel, "message": "x", "root_id": "abcdefghijklmnopqrstuvwxyz"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "api.post.create_post.root_id.app_error"
    );

    let (status, created) = bot
        .post(
            "/api/v4/posts",
            json!({"channel_id": s.channel, "message": "ok", "root_id": root.id}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(created["reply_count"], json!(2));
    assert_eq!(s.fake.thread(&root.id).len(), 3);

    let carol = s.fake.add_user("carol");
    let (status, body) = Api::as_user(&s.fake, &carol)
        .post(
            "/api/v4/posts",
            json!({"channel_id": s.channel, "message": "not a member"}),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(app_error(403, &body), "api.context.permissions.app_error");
}

#[tokio::test]
async fn thread_returns_the_requested_post_first_then_the_thread() {
    let s = setup().await;
    let root = s.fake.post_as(&s.alice, &s.channel, None, "root").unwrap();
    let r1 = s
        .fake
        .post_as(&s.bot, &s.channel, Some(&root.id), "r1")
        .unwrap();
    let r2 = s
        .fake
        .post_as(&s.alice, &s.channel, Some(&root.id), "r2")
        .unwrap();
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let (status, list) = bot.get(&format!("/api/v4/posts/{}/thread", r1.id)).await;
    assert_eq!(status, 200);
    assert_eq!(list["order"], json!([r1.id, root.id, r2.id]));
    assert_eq!(list["posts"].as_object().unwrap().len(), 3);
    assert_eq!(list["posts"][&root.id]["reply_count"], json!(2));
    assert_eq!(list["has_next"], json!(false));
    assert_eq!(list["next_post_id"], json!(""));
    assert_eq!(list["prev_post_id"], json!(""));
    let (_, up) = bot
        .get(&format!("/api/v4/posts/{}/thread?direction=up", root.id))
        .await;
    assert_eq!(up["order"], json!([root.id, r2.id, r1.id]));
    let (status, body) = bot
        .get("/api/v4/posts/abcdefghijklmnopqrstuvwxyz/thread")
        .await;
    assert_eq!(status, 404);
    assert_eq!(app_error(404, &body), "app.post.get.app_error");
}

#[tokio::test]
async fn since_returns_posts_modified_after_the_time_newest_first() {
    let s = setup().await;
    let a = s.fake.post_as(&s.alice, &s.channel, None, "a").unwrap();
    let b = s.fake.post_as(&s.alice, &s.channel, None, "b").unwrap();
    let c = s.fake.post_as(&s.alice, &s.channel, None, "c").unwrap();
    let alice = Api::as_user(&s.fake, &s.alice);
    let (status, _) = alice
        .put(
            &format!("/api/v4/posts/{}/patch", a.id),
            json!({"message": "a2"}),
        )
        .await;
    assert_eq!(status, 200);

    let (status, list) = alice
        .get(&format!(
            "/api/v4/channels/{}/posts?since={}",
            s.channel, b.create_at
        ))
        .await;
    assert_eq!(status, 200);
    let order: Vec<String> = serde_json::from_value(list["order"].clone()).unwrap();
    let live: Vec<&String> = order
        .iter()
        .filter(|id| list["posts"][id.as_str()]["delete_at"] == json!(0))
        .collect();
    assert_eq!(
        live,
        vec![&c.id, &a.id],
        "modified posts, newest create_at first"
    );
    assert!(!order.contains(&b.id));
    let old_version = order
        .iter()
        .map(|id| &list["posts"][id.as_str()])
        .find(|p| p["original_id"] == json!(a.id))
        .expect("the edit leaves the old version, which since= returns");
    assert_eq!(old_version["message"], json!("a"));
    assert!(old_version["delete_at"].as_i64().unwrap() > 0);
    assert_eq!(list["posts"][&a.id]["message"], json!("a2"));
    assert!(list.get("has_next").is_none());

    // A reply modifies its root (update_at), as the store does.
    let r = s
        .fake
        .post_as(&s.bot, &s.channel, Some(&b.id), "reply")
        .unwrap();
    let (_, list) = alice
        .get(&format!(
            "/api/v4/channels/{}/posts?since={}",
            s.channel,
            s.fake.post(&a.id).unwrap().update_at
        ))
        .await;
    let order: Vec<String> = serde_json::from_value(list["order"].clone()).unwrap();
    assert_eq!(order, vec![r.id.clone(), b.id.clone()]);

    let (status, body) = alice
        .get(&format!(
            "/api/v4/channels/{}/posts?since={}&page=0",
            s.channel, b.create_at
        ))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "api.context.invalid_url_param.app_error"
    );
}

#[tokio::test]
async fn patch_and_update_emit_post_edited() {
    let s = setup().await;
    let mut ws = connect(&s.fake, Some(&s.fake.bot_token()), "").await;
    assert_eq!(next_json(&mut ws).await["event"], json!("hello"));
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let (_, post) = bot
        .post(
            "/api/v4/posts",
            json!({"channel_id": s.channel, "message": "v1"}),
        )
        .await;
    let id = post["id"].as_str().unwrap().to_owned();
    assert_eq!(next_json(&mut ws).await["event"], json!("posted"));

    let (status, patched) = bot
        .put(
            &format!("/api/v4/posts/{id}/patch"),
            json!({"message": "v2"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["message"], json!("v2"));
    assert!(patched["edit_at"].as_i64().unwrap() > 0);
    assert!(patched["update_at"].as_i64().unwrap() > patched["create_at"].as_i64().unwrap());
    assert_eq!(
        patched["props"],
        json!({"from_bot": "true"}),
        "patch without props keeps them"
    );
    let edited = next_json(&mut ws).await;
    assert_eq!(edited["event"], json!("post_edited"));
    assert_eq!(edited["seq"], json!(2));
    assert_eq!(edited["broadcast"]["channel_id"], json!(s.channel));
    assert_eq!(event_post(&edited)["message"], json!("v2"));

    let (status, body) = Api::as_user(&s.fake, &s.alice)
        .put(
            &format!("/api/v4/posts/{id}/patch"),
            json!({"message": "hijack"}),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(app_error(403, &body), "api.context.permissions.app_error");

    let (status, body) = bot
        .put(
            &format!("/api/v4/posts/{id}/patch"),
            json!({"message": "x".repeat(16_384)}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "model.post.is_valid.message_length.app_error"
    );

    let (status, updated) = bot
        .put(
            &format!("/api/v4/posts/{id}"),
            json!({"id": id, "message": "v3"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(updated["message"], json!("v3"));
    assert_eq!(
        updated["props"],
        json!({}),
        "a full update blanks omitted fields"
    );
    assert_eq!(
        event_post(&next_json(&mut ws).await)["message"],
        json!("v3")
    );
}

#[tokio::test]
async fn integration_is_stripped_from_responses_and_events() {
    let s = setup().await;
    let mut ws = connect(&s.fake, Some(&s.fake.bot_token()), "").await;
    next_json(&mut ws).await;
    let props = json!({"attachments": [{"text": "example.com", "actions": [
        {"id": "approve", "type": "button", "name": "Approve",
         "integration": {"url": "http://127.0.0.1:1/actions", "context": {"secret": "s3cr3t"}}},
        {"type": "button", "name": "Deny",
         "integration": {"url": "http://127.0.0.1:1/actions", "context": {"secret": "s3cr3t"}}}
    ]}]});
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let response = bot
        .send(
            reqwest::Method::POST,
            "/api/v4/posts",
            Some(json!({"channel_id": s.channel, "message": "Allow?", "props": props})),
        )
        .await;
    assert_eq!(response.status().as_u16(), 201);
    let raw = response.text().await.unwrap();
    assert!(
        !raw.contains("integration") && !raw.contains("s3cr3t"),
        "{raw}"
    );
    let post: Value = serde_json::from_str(&raw).unwrap();
    let actions = &post["props"]["attachments"][0]["actions"];
    assert_eq!(actions[0]["id"], json!("approve"));
    assert_eq!(
        actions[1]["id"].as_str().unwrap().len(),
        26,
        "missing action ids are generated"
    );
    let id = post["id"].as_str().unwrap();

    let event = next_json(&mut ws).await;
    assert!(!event["data"]["post"]
        .as_str()
        .unwrap()
        .contains("integration"));
    let (_, thread) = bot.get(&format!("/api/v4/posts/{id}/thread")).await;
    assert!(!thread.to_string().contains("integration"));
    let (_, single) = bot.get(&format!("/api/v4/posts/{id}")).await;
    assert!(!single.to_string().contains("integration"));

    let stored = s.fake.post(id).unwrap();
    assert_eq!(
        stored.props["attachments"][0]["actions"][0]["integration"]["context"]["secret"],
        json!("s3cr3t"),
        "the server keeps integration for itself"
    );
}

#[tokio::test]
async fn reactions_follow_the_server_rules() {
    let s = setup().await;
    let mut alice_ws = connect(&s.fake, s.fake.user_token(&s.alice).as_deref(), "").await;
    next_json(&mut alice_ws).await;
    let post = s
        .fake
        .post_as(&s.alice, &s.channel, None, "react to me")
        .unwrap();
    next_json(&mut alice_ws).await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());

    let (status, reaction) = bot
        .post(
            "/api/v4/reactions",
            json!({"user_id": s.bot, "post_id": post.id, "emoji_name": "thumbsup"}),
        )
        .await;
    assert_eq!(status, 200, "reactions are 200, not 201");
    assert_eq!(reaction["emoji_name"], json!("thumbsup"));
    assert_eq!(reaction["channel_id"], json!(s.channel));
    let event = next_json(&mut alice_ws).await;
    assert_eq!(event["event"], json!("reaction_added"));
    let inner: Value = serde_json::from_str(event["data"]["reaction"].as_str().unwrap()).unwrap();
    assert_eq!(inner["user_id"], json!(s.bot));
    assert!(s.fake.post(&post.id).unwrap().has_reactions);

    let (status, body) = bot
        .post(
            "/api/v4/reactions",
            json!({"user_id": s.bot, "post_id": post.id, "emoji_name": "thumbs up!"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "model.reaction.is_valid.emoji_name.app_error"
    );
    let (status, _) = bot
        .post(
            "/api/v4/reactions",
            json!({"user_id": s.alice, "post_id": post.id, "emoji_name": "x"}),
        )
        .await;
    assert_eq!(status, 403);

    let (_, list) = bot
        .get(&format!("/api/v4/posts/{}/reactions", post.id))
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (status, body) = bot
        .delete(&format!(
            "/api/v4/users/me/posts/{}/reactions/thumbsup",
            post.id
        ))
        .await;
    assert_eq!((status, body), (200, json!({"status": "OK"})));
    assert_eq!(
        next_json(&mut alice_ws).await["event"],
        json!("reaction_removed")
    );
    assert!(s.fake.reactions(&post.id).is_empty());
}

// ---- WebSocket ------------------------------------------------------------------------------

#[tokio::test]
async fn posted_event_has_the_server_shape_and_seq_counts_from_hello() {
    let s = setup().await;
    let mut ws = connect(&s.fake, Some(&s.fake.bot_token()), "").await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["event"], json!("hello"));
    assert_eq!(hello["seq"], json!(0));
    assert_eq!(hello["data"]["connection_id"].as_str().unwrap().len(), 26);
    assert_eq!(hello["data"]["server_version"], json!("10.0.0.0.fake.true"));
    assert_eq!(hello["broadcast"]["user_id"], json!(s.bot));
    assert_eq!(s.fake.websocket_connections(), 1);

    let carol = s.fake.add_user("carol");
    let mut outsider = connect(&s.fake, s.fake.user_token(&carol).as_deref(), "").await;
    next_json(&mut outsider).await;

    let post = s
        .fake
        .post_as(&s.alice, &s.channel, None, "please allow example.com")
        .unwrap();
    let raw = next_text(&mut ws).await;
    assert!(
        raw.starts_with("{\"event\": \"posted\", \"data\": "),
        "precomputed layout: {raw}"
    );
    let event: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(event["seq"], json!(1));
    assert_eq!(
        event["broadcast"],
        json!({"omit_users": null, "user_id": "", "channel_id": s.channel, "team_id": "",
               "connection_id": "", "omit_connection_id": ""})
    );
    let data = &event["data"];
    assert_eq!(data["channel_display_name"], json!("llm-approvals"));
    assert_eq!(data["channel_name"], json!("llm-approvals"));
    assert_eq!(data["channel_type"], json!("O"));
    assert_eq!(data["sender_name"], json!("@alice"));
    assert_eq!(data["set_online"], json!(true));
    assert_eq!(data["team_id"], json!(s.fake.team_id()));
    let inner = event_post(&event);
    assert_eq!(inner["id"], json!(post.id));
    assert_eq!(inner["message"], json!("please allow example.com"));

    let bot = Api::new(&s.fake, &s.fake.bot_token());
    bot.post(
        "/api/v4/posts",
        json!({"channel_id": s.channel, "message": "@alice done"}),
    )
    .await;
    let own = next_json(&mut ws).await;
    assert_eq!(own["seq"], json!(2), "the bot receives its own posts");
    assert_eq!(event_post(&own)["user_id"], json!(s.bot));
    assert!(
        own["data"].get("mentions").is_none(),
        "the author is not mentioned"
    );
    expect_silence(&mut outsider, 300).await;
}

#[tokio::test]
async fn challenge_auth_sends_hello_before_the_ok_response() {
    let s = setup().await;
    let mut ws = connect(&s.fake, None, "").await;
    send_json(&mut ws, json!({"seq": 1, "action": "ping"})).await;
    let refused = next_json(&mut ws).await;
    assert_eq!(refused["status"], json!("FAIL"));
    assert_eq!(refused["seq_reply"], json!(1));
    assert_eq!(
        refused["error"]["id"],
        json!("api.web_socket_router.not_authenticated.app_error")
    );
    assert_eq!(refused["error"]["status_code"], json!(401));

    send_json(&mut ws, json!({"seq": 0, "action": "authentication_challenge", "data": {"token": s.fake.bot_token()}})).await;
    assert_eq!(
        next_json(&mut ws).await["error"]["id"],
        json!("api.web_socket_router.bad_seq.app_error")
    );

    send_json(&mut ws, json!({"seq": 2, "action": "authentication_challenge", "data": {"token": s.fake.bot_token()}})).await;
    let first = next_json(&mut ws).await;
    assert_eq!(first["event"], json!("hello"));
    assert_eq!(first["seq"], json!(0));
    let second = next_text(&mut ws).await;
    assert_eq!(second, "{\"status\":\"OK\",\"seq_reply\":2}\n");
    assert_eq!(s.fake.websocket_connections(), 1);

    send_json(&mut ws, json!({"seq": 3, "action": "ping"})).await;
    let pong = next_json(&mut ws).await;
    assert_eq!(pong["status"], json!("OK"));
    assert_eq!(pong["seq_reply"], json!(3));
    assert_eq!(pong["data"]["text"], json!("pong"));
    assert!(pong["data"]["server_time"].as_i64().unwrap() > 0);
    assert!(pong.get("seq").is_none(), "responses carry no seq");

    send_json(&mut ws, json!({"seq": 4, "action": "authentication_challenge", "data": {"token": s.fake.bot_token()}})).await;
    expect_silence(&mut ws, 300).await;

    // Responses did not advance the event sequence.
    s.fake.post_as(&s.alice, &s.channel, None, "x").unwrap();
    assert_eq!(next_json(&mut ws).await["seq"], json!(1));

    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));
}

#[tokio::test]
async fn bad_challenge_or_no_auth_closes_the_socket() {
    let s = setup().await;
    let mut ws = connect(&s.fake, None, "").await;
    send_json(
        &mut ws,
        json!({"seq": 1, "action": "authentication_challenge", "data": {"token": "wrong"}}),
    )
    .await;
    expect_dropped(&mut ws).await;
    assert_eq!(s.fake.websocket_connections(), 0);

    let mut silent = connect(&s.fake, None, "").await;
    let started = std::time::Instant::now();
    expect_dropped(&mut silent).await;
    assert!(
        started.elapsed() >= Duration::from_millis(4_500),
        "closed after the 5 s auth window"
    );

    let mut no_seq = connect(
        &s.fake,
        Some(&s.fake.bot_token()),
        "?connection_id=abcdefghijklmnopqrstuvwxyz",
    )
    .await;
    expect_dropped(&mut no_seq).await;
}

#[tokio::test]
async fn resume_after_a_drop_replays_missed_events_without_hello() {
    let s = setup().await;
    let token = s.fake.bot_token();
    let mut ws = connect(&s.fake, Some(&token), "").await;
    let conn = next_json(&mut ws).await["data"]["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.fake.post_as(&s.alice, &s.channel, None, "one").unwrap();
    assert_eq!(next_json(&mut ws).await["seq"], json!(1));

    s.fake.drop_websockets();
    expect_dropped(&mut ws).await;
    assert_eq!(s.fake.websocket_connections(), 0);
    s.fake.post_as(&s.alice, &s.channel, None, "two").unwrap();
    s.fake.post_as(&s.alice, &s.channel, None, "three").unwrap();

    let mut ws = connect(
        &s.fake,
        Some(&token),
        &format!("?connection_id={conn}&sequence_number=2"),
    )
    .await;
    let replay = next_json(&mut ws).await;
    assert_eq!(replay["event"], json!("posted"), "no new hello on resume");
    assert_eq!(replay["seq"], json!(2));
    assert_eq!(event_post(&replay)["message"], json!("two"));
    let replay = next_json(&mut ws).await;
    assert_eq!(replay["seq"], json!(3));
    assert_eq!(event_post(&replay)["message"], json!("three"));
    s.fake.post_as(&s.alice, &s.channel, None, "four").unwrap();
    assert_eq!(next_json(&mut ws).await["seq"], json!(4));
    assert_eq!(s.fake.websocket_connections(), 1);

    // A stalled (half-open) socket gets nothing, and can be resumed the same way.
    s.fake.stall_websockets();
    assert_eq!(s.fake.websocket_connections(), 0);
    s.fake.post_as(&s.alice, &s.channel, None, "five").unwrap();
    expect_silence(&mut ws, 300).await;
    let mut ws = connect(
        &s.fake,
        Some(&token),
        &format!("?connection_id={conn}&sequence_number=5"),
    )
    .await;
    let replay = next_json(&mut ws).await;
    assert_eq!(
        (replay["event"].clone(), replay["seq"].clone()),
        (json!("posted"), json!(5))
    );
}

#[tokio::test]
async fn resume_from_an_unknown_or_lost_position_gets_a_new_hello() {
    let s = setup().await;
    let token = s.fake.bot_token();
    let unknown = "abcdefghijklmnopqrstuvwxyz";
    let mut ws = connect(
        &s.fake,
        Some(&token),
        &format!("?connection_id={unknown}&sequence_number=3"),
    )
    .await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["event"], json!("hello"));
    assert_eq!(hello["seq"], json!(0));
    let conn = hello["data"]["connection_id"].as_str().unwrap().to_owned();
    assert_ne!(conn, unknown);

    s.fake.drop_websockets();
    expect_dropped(&mut ws).await;
    for i in 0..130 {
        s.fake
            .post_as(&s.alice, &s.channel, None, &format!("m{i}"))
            .unwrap();
    }
    // seq 1 fell out of the 128-event dead queue.
    let mut ws = connect(
        &s.fake,
        Some(&token),
        &format!("?connection_id={conn}&sequence_number=1"),
    )
    .await;
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["event"], json!("hello"));
    assert_eq!(hello["seq"], json!(0));
    let new_conn = hello["data"]["connection_id"].as_str().unwrap().to_owned();
    assert_ne!(new_conn, conn);
    s.fake.post_as(&s.alice, &s.channel, None, "after").unwrap();
    assert_eq!(next_json(&mut ws).await["seq"], json!(1));

    // A position ahead of the server is not resumable either.
    s.fake.drop_websockets();
    expect_dropped(&mut ws).await;
    let mut ws = connect(
        &s.fake,
        Some(&token),
        &format!("?connection_id={new_conn}&sequence_number=9"),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["event"], json!("hello"));
}

#[tokio::test]
async fn paused_websockets_refuse_upgrades_with_503() {
    let s = setup().await;
    s.fake.pause_websockets();
    let url = format!(
        "{}/api/v4/websocket",
        s.fake.url().replace("http://", "ws://")
    );
    match tokio_tungstenite::connect_async(url.clone()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503)
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    s.fake.resume_websockets();
    let mut ws = connect(&s.fake, Some(&s.fake.bot_token()), "").await;
    assert_eq!(next_json(&mut ws).await["event"], json!("hello"));
}

// ---- channels, members, sidebar -------------------------------------------------------------

#[tokio::test]
async fn channel_creation_enforces_name_rules_and_uniqueness() {
    let s = setup().await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let team = s.fake.team_id();
    let create = |name: String| {
        let body = json!({"team_id": team, "name": name, "display_name": "Sessions", "type": "O"});
        let bot = &bot;
        async move { bot.post("/api/v4/channels", body).await }
    };
    let response = bot
        .send(
            reqwest::Method::POST,
            "/api/v4/channels",
            Some(json!({"team_id": team, "name": "sessions", "display_name": "Sessions", "type": "O", "purpose": "p"})),
        )
        .await;
    assert_eq!(response.status().as_u16(), 201);
    let raw = response.text().await.unwrap();
    assert_key_order(
        &raw,
        &[
            "id",
            "create_at",
            "update_at",
            "delete_at",
            "team_id",
            "type",
            "display_name",
            "name",
            "header",
            "purpose",
            "last_post_at",
            "total_msg_count",
            "extra_update_at",
            "creator_id",
        ],
    );
    let channel: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(channel["creator_id"], json!(s.bot));
    assert_eq!(channel["scheme_id"], Value::Null);
    let id = channel["id"].as_str().unwrap();
    assert_eq!(s.fake.channel_members(id), vec![s.bot.clone()]);

    let (status, body) = create("sessions".into()).await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "store.sql_channel.save_channel.exists.app_error"
    );
    for bad in ["Bad Name", "-abc", "", "UPPER", "dot.ted"] {
        let (status, body) = create(bad.into()).await;
        assert_eq!(status, 400, "{bad:?}");
        assert_eq!(
            app_error(400, &body),
            "model.channel.is_valid.1_or_more.app_error",
            "{bad:?}"
        );
    }
    let (status, _) = create("a".repeat(65)).await;
    assert_eq!(status, 400);
    let (status, _) = create("a".repeat(64)).await;
    assert_eq!(status, 201);
    let (status, _) = create("a_b-c__d9".into()).await;
    assert_eq!(status, 201);
    for dm_like in [
        "0123456789abcdef0123456789abcdef01234567".to_owned(),
        format!("{}__{}", s.bot, s.alice),
    ] {
        let (status, body) = create(dm_like.clone()).await;
        assert_eq!(status, 400, "{dm_like}");
        assert_eq!(
            app_error(400, &body),
            "model.channel.is_valid.name.app_error"
        );
    }
    let (status, body) = bot
        .post(
            "/api/v4/channels",
            json!({"team_id": team, "name": "typed", "display_name": "T", "type": "X"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "model.channel.is_valid.type.app_error"
    );

    let (status, found) = bot
        .get(&format!("/api/v4/teams/{team}/channels/name/sessions"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(found["id"], json!(id));
    let (status, body) = bot
        .get(&format!("/api/v4/teams/{team}/channels/name/nope"))
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        app_error(404, &body),
        "app.channel.get_by_name.missing.app_error"
    );
}

#[tokio::test]
async fn adding_a_member_is_201_and_idempotent() {
    let s = setup().await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let (_, channel) = bot
        .post(
            "/api/v4/channels",
            json!({"team_id": s.fake.team_id(), "name": "work", "display_name": "Work", "type": "P"}),
        )
        .await;
    let id = channel["id"].as_str().unwrap().to_owned();
    let root = s
        .fake
        .post_as(&s.bot, &id, None, "session started")
        .unwrap();

    let (status, member) = bot
        .post(
            &format!("/api/v4/channels/{id}/members"),
            json!({"user_id": s.alice, "post_root_id": root.id}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(member["channel_id"], json!(id));
    assert_eq!(member["user_id"], json!(s.alice));
    assert_eq!(member["roles"], json!("channel_user"));
    assert_eq!(
        s.fake.channel_members(&id),
        vec![s.bot.clone(), s.alice.clone()]
    );
    let system = s.fake.posts().into_iter().last().unwrap();
    assert_eq!(system.post_type, "system_add_to_channel");
    assert_eq!(system.root_id, root.id);
    assert_eq!(system.props["addedUserId"], json!(s.alice));

    let posts_before = s.fake.posts().len();
    let (status, _) = bot
        .post(
            &format!("/api/v4/channels/{id}/members"),
            json!({"user_id": s.alice}),
        )
        .await;
    assert_eq!(status, 201, "adding an existing member is still 201");
    assert_eq!(s.fake.channel_members(&id).len(), 2);
    assert_eq!(s.fake.posts().len(), posts_before);

    let carol = s.fake.add_user("carol");
    let (status, _) = Api::as_user(&s.fake, &carol)
        .post(
            &format!("/api/v4/channels/{id}/members"),
            json!({"user_id": carol}),
        )
        .await;
    assert_eq!(status, 403, "nobody joins a private channel alone");
    let (status, _) = bot
        .post(
            &format!("/api/v4/channels/{id}/members"),
            json!({"user_id": "abcdefghijklmnopqrstuvwxyz"}),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn sidebar_categories_follow_the_server_semantics() {
    let s = setup().await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let team = s.fake.team_id();
    let new_channel = |name: &str| {
        let body = json!({"team_id": team, "name": name, "display_name": name, "type": "O"});
        let bot = &bot;
        async move {
            bot.post("/api/v4/channels", body).await.1["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let c1 = new_channel("c1").await;
    let c2 = new_channel("c2").await;
    let foreign = s.fake.create_channel("foreign", &[&s.alice]);
    let foreign2 = s.fake.create_channel("foreign2", &[&s.alice]);
    let base = format!("/api/v4/users/{}/teams/{team}/channels/categories", s.bot);

    let (status, sidebar) = bot.get(&base).await;
    assert_eq!(status, 200);
    let fav = format!("favorites_{}_{team}", s.bot);
    let chans = format!("channels_{}_{team}", s.bot);
    let dms = format!("direct_messages_{}_{team}", s.bot);
    assert_eq!(sidebar["order"], json!([fav, chans, dms]));
    assert_eq!(sidebar["categories"][1]["type"], json!("channels"));
    assert_eq!(
        sidebar["categories"][1]["channel_ids"],
        json!([c1, c2, s.channel])
    );

    let (status, created) = bot
        .post(
            &base,
            json!({"user_id": s.bot, "team_id": team, "display_name": "Sessions", "type": "custom",
                   "channel_ids": [c1, foreign]}),
        )
        .await;
    assert_eq!(status, 200, "category create is 200");
    assert_eq!(
        created["channel_ids"],
        json!([c1]),
        "non-member channels are dropped silently"
    );
    assert_eq!(created["type"], json!("custom"));
    assert_eq!(
        created["sort_order"],
        json!(10),
        "placed right after Favorites"
    );
    let custom = created["id"].as_str().unwrap().to_owned();
    let (_, sidebar) = bot
        .get(&format!(
            "/api/v4/users/me/teams/{team}/channels/categories"
        ))
        .await;
    assert_eq!(sidebar["order"], json!([fav, custom, chans, dms]));
    assert_eq!(
        sidebar["categories"][2]["channel_ids"],
        json!([c2, s.channel]),
        "c1 left Channels"
    );
    assert_eq!(sidebar, s.fake.sidebar_categories(&s.bot));
    // The dropped channel was not remembered: joining it later puts it in Channels.
    s.fake.add_channel_member(&foreign, &s.bot);
    let (_, sidebar) = bot.get(&base).await;
    assert_eq!(sidebar["categories"][1]["channel_ids"], json!([c1]));
    assert_eq!(
        sidebar["categories"][2]["channel_ids"],
        json!([c2, foreign, s.channel])
    );

    let (status, body) = bot
        .post(
            &base,
            json!({"user_id": s.alice, "team_id": team, "display_name": "X", "type": "custom"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        app_error(400, &body),
        "api.context.invalid_body_param.app_error"
    );

    let (status, updated) = bot
        .put(
            &format!("{base}/{custom}"),
            json!({"id": custom, "user_id": s.bot, "team_id": team, "display_name": "Renamed",
                   "type": "custom", "channel_ids": [c2, foreign2]}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(updated["display_name"], json!("Renamed"));
    assert_eq!(updated["channel_ids"], json!([c2]));
    let (_, sidebar) = bot.get(&base).await;
    assert_eq!(
        sidebar["categories"][2]["channel_ids"],
        json!([c1, foreign, s.channel]),
        "c2 moved, c1 back"
    );

    let (status, bulk) = bot
        .put(
            &base,
            json!([{"id": chans, "display_name": "Nope", "type": "channels", "channel_ids": [c2]}]),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        bulk[0]["display_name"],
        json!("Channels"),
        "default categories keep their name"
    );
    assert_eq!(bulk[0]["channel_ids"], json!([c1, foreign, s.channel, c2]));
    let (_, sidebar) = bot.get(&base).await;
    assert_eq!(
        sidebar["categories"][1]["channel_ids"],
        json!([]),
        "c2 left the custom category"
    );

    let (status, order) = bot.get(&format!("{base}/order")).await;
    assert_eq!(status, 200);
    assert_eq!(order, json!([fav, custom, chans, dms]));
    let (status, order) = bot
        .put(&format!("{base}/order"), json!([dms, chans, custom, fav]))
        .await;
    assert_eq!(status, 200);
    assert_eq!(order, json!([dms, chans, custom, fav]));
    let (status, _) = bot.put(&format!("{base}/order"), json!([dms, chans])).await;
    assert_eq!(status, 400);
    let (status, _) = bot
        .get(&format!(
            "/api/v4/users/{}/teams/{team}/channels/categories",
            s.alice
        ))
        .await;
    assert_eq!(status, 403);
}

// ---- buttons --------------------------------------------------------------------------------

#[derive(Default)]
struct Receiver {
    calls: Vec<(HeaderMap, String)>,
    reply: (u16, String),
}

async fn start_receiver(state: Arc<Mutex<Receiver>>) -> String {
    let app = axum::Router::new().route(
        "/actions",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let state = Arc::clone(&state);
            async move {
                let mut st = state.lock().unwrap();
                st.calls.push((headers, body));
                let (status, body) = st.reply.clone();
                (axum::http::StatusCode::from_u16(status).unwrap(), body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}/actions")
}

fn buttons(url: &str) -> Value {
    json!({"attachments": [{"fallback": "approve/deny", "title": "Access request", "text": "example.com",
        "actions": [
            {"id": "approve", "type": "button", "name": "Approve", "style": "good",
             "integration": {"url": url, "context": {"request_id": "r-123", "secret": "s"}}},
            {"id": "deny", "type": "button", "name": "Deny", "style": "danger",
             "integration": {"url": url, "context": {"request_id": "r-123", "decision": "deny"}}}]}]})
}

#[tokio::test]
async fn click_posts_the_integration_request_and_applies_the_update() {
    let s = setup().await;
    let receiver = Arc::new(Mutex::new(Receiver::default()));
    let url = start_receiver(Arc::clone(&receiver)).await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let mut alice_ws = connect(&s.fake, s.fake.user_token(&s.alice).as_deref(), "").await;
    next_json(&mut alice_ws).await;
    let (_, post) = bot
        .post("/api/v4/posts", json!({"channel_id": s.channel, "message": "Allow example.com?", "props": buttons(&url)}))
        .await;
    let post_id = post["id"].as_str().unwrap().to_owned();
    next_json(&mut alice_ws).await;

    let answer = json!({"update": {"message": "✅ approved by @alice",
                                   "props": {"attachments": [{"text": "example.com approved"}]}},
                        "ephemeral_text": "Done."});
    receiver.lock().unwrap().reply = (200, answer.to_string());
    let outcome = s.fake.click(&post_id, "approve", &s.alice).await;
    assert_eq!(outcome, ClickOutcome::Ok { response: answer });

    let (headers, body) = receiver.lock().unwrap().calls[0].clone();
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["accept"], "application/json");
    assert!(
        headers.get("authorization").is_none(),
        "no signature or auth"
    );
    assert_key_order(
        &body,
        &[
            "user_id",
            "user_name",
            "channel_id",
            "channel_name",
            "team_id",
            "team_domain",
            "post_id",
            "trigger_id",
            "type",
            "data_source",
            "context",
        ],
    );
    let request: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(request["user_id"], json!(s.alice));
    assert_eq!(request["user_name"], json!("alice"));
    assert_eq!(request["channel_id"], json!(s.channel));
    assert_eq!(request["channel_name"], json!("llm-approvals"));
    assert_eq!(request["team_id"], json!(s.fake.team_id()));
    assert_eq!(request["team_domain"], json!("fake-team"));
    assert_eq!(request["post_id"], json!(post_id));
    assert!(request["trigger_id"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert_eq!(request["type"], json!("button"));
    assert_eq!(request["data_source"], json!(""));
    assert_eq!(
        request["context"],
        json!({"request_id": "r-123", "secret": "s"})
    );
    assert_eq!(request.as_object().unwrap().len(), 11);

    let updated = s.fake.post(&post_id).unwrap();
    assert_eq!(updated.message, "✅ approved by @alice");
    assert_eq!(
        updated.props,
        json!({"attachments": [{"text": "example.com approved"}]})
    );
    assert!(updated.edit_at > 0);
    let edited = next_event(&mut alice_ws, "post_edited").await;
    assert_eq!(
        event_post(&edited)["message"],
        json!("✅ approved by @alice")
    );
    assert_eq!(
        s.fake.ephemeral_posts(),
        vec![(s.alice.clone(), "Done.".to_owned())]
    );

    // `update` without props keeps the buttons and takes the message.
    let (_, second) = bot
        .post(
            "/api/v4/posts",
            json!({"channel_id": s.channel, "message": "Allow b.com?", "props": buttons(&url)}),
        )
        .await;
    let second_id = second["id"].as_str().unwrap().to_owned();
    receiver.lock().unwrap().reply = (
        200,
        json!({"update": {"message": "Waiting for a second approver"}}).to_string(),
    );
    assert!(matches!(
        s.fake.click(&second_id, "deny", &s.alice).await,
        ClickOutcome::Ok { .. }
    ));
    let kept = s.fake.post(&second_id).unwrap();
    assert_eq!(kept.message, "Waiting for a second approver");
    assert_eq!(
        kept.props["attachments"][0]["actions"][1]["id"],
        json!("deny")
    );
    assert_eq!(kept.props["from_bot"], json!("true"));

    // A non-200 answer fails the click and changes nothing.
    receiver.lock().unwrap().reply = (500, "boom".to_owned());
    assert_eq!(
        s.fake.click(&second_id, "approve", &s.alice).await,
        ClickOutcome::Failed {
            status: 500,
            body: "boom".to_owned()
        }
    );
    assert_eq!(
        s.fake.post(&second_id).unwrap().message,
        "Waiting for a second approver"
    );
    assert!(matches!(
        s.fake.click(&second_id, "nope", &s.alice).await,
        ClickOutcome::Failed { status: 404, .. }
    ));

    // The client-side endpoint runs the same flow.
    receiver.lock().unwrap().reply = (200, String::new());
    let (status, body) = Api::as_user(&s.fake, &s.alice)
        .post(
            &format!("/api/v4/posts/{second_id}/actions/approve"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], json!("OK"));
    assert_eq!(receiver.lock().unwrap().calls.len(), 4);
}

// ---- failures, typing, following, routing ---------------------------------------------------

#[tokio::test]
async fn fail_next_429_has_retry_after_and_a_plain_text_body() {
    let s = setup().await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    s.fake.fail_next("/api/v4/posts", 1, 429, Some(3));
    let body = json!({"channel_id": s.channel, "message": "retry me"});
    let response = bot
        .send(reqwest::Method::POST, "/api/v4/posts", Some(body.clone()))
        .await;
    assert_eq!(response.status().as_u16(), 429);
    let headers = response.headers().clone();
    assert_eq!(headers["retry-after"], "3");
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    assert!(headers.contains_key("x-ratelimit-limit") && headers.contains_key("x-ratelimit-reset"));
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(response.text().await.unwrap().trim_end(), "limit exceeded");
    let (status, _) = bot.post("/api/v4/posts", body.clone()).await;
    assert_eq!(status, 201);

    let posts: Vec<_> = s
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/api/v4/posts")
        .collect();
    assert_eq!(posts.len(), 2, "failed requests are recorded too");
    assert_eq!(posts[0].body, body);
    assert!(posts[0].at <= posts[1].at);

    s.fake.fail_next("/api/v4/users/me", 2, 503, None);
    for _ in 0..2 {
        let (status, err) = bot.get("/api/v4/users/me").await;
        assert_eq!(status, 503);
        assert_eq!(app_error(503, &err), "api.fake.injected_failure.app_error");
    }
    assert_eq!(bot.get("/api/v4/users/me").await.0, 200);
    s.fake.clear_requests();
    assert!(s.fake.requests().is_empty());
}

#[tokio::test]
async fn typing_is_recorded_and_sent_to_the_other_members() {
    let s = setup().await;
    let root = s.fake.post_as(&s.alice, &s.channel, None, "root").unwrap();
    let mut alice_ws = connect(&s.fake, s.fake.user_token(&s.alice).as_deref(), "").await;
    next_json(&mut alice_ws).await;
    let mut bot_ws = connect(&s.fake, Some(&s.fake.bot_token()), "").await;
    next_json(&mut bot_ws).await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let (status, body) = bot
        .post(
            "/api/v4/users/me/typing",
            json!({"channel_id": s.channel, "parent_id": root.id}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"status": "OK"})));
    assert_eq!(
        s.fake.typing_events(),
        vec![(s.bot.clone(), s.channel.clone(), root.id.clone())]
    );
    let typing = next_json(&mut alice_ws).await;
    assert_eq!(typing["event"], json!("typing"));
    assert_eq!(
        typing["data"],
        json!({"parent_id": root.id, "user_id": s.bot})
    );
    assert_eq!(
        typing["broadcast"]["omit_users"],
        json!({s.bot.clone(): true})
    );
    expect_silence(&mut bot_ws, 300).await;

    let (status, _) = bot
        .post(
            &format!("/api/v4/users/{}/typing", s.alice),
            json!({"channel_id": s.channel}),
        )
        .await;
    assert_eq!(status, 403);
    send_json(&mut bot_ws, json!({"seq": 1, "action": "user_typing", "data": {"channel_id": s.channel, "parent_id": ""}})).await;
    assert_eq!(
        next_json(&mut bot_ws).await,
        json!({"status": "OK", "seq_reply": 1})
    );
    assert_eq!(s.fake.typing_events().len(), 2);
}

#[tokio::test]
async fn following_a_thread_is_recorded() {
    let s = setup().await;
    let root = s.fake.post_as(&s.alice, &s.channel, None, "root").unwrap();
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let path = format!(
        "/api/v4/users/me/teams/{}/threads/{}/following",
        s.fake.team_id(),
        root.id
    );
    let (status, body) = bot.put(&path, json!({})).await;
    assert_eq!((status, body), (200, json!({"status": "OK"})));
    assert_eq!(s.fake.followers(&root.id), vec![s.bot.clone()]);
    let (status, _) = bot.delete(&path).await;
    assert_eq!(status, 200);
    assert!(s.fake.followers(&root.id).is_empty());
    let (status, _) = bot
        .put(
            &format!(
                "/api/v4/users/{}/teams/{}/threads/{}/following",
                s.alice,
                s.fake.team_id(),
                root.id
            ),
            json!({}),
        )
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn routing_auth_and_users() {
    let s = setup().await;
    let bot = Api::new(&s.fake, &s.fake.bot_token());
    let (status, body) = bot.get("/api/v4/does/not/exist").await;
    assert_eq!(status, 404);
    assert_eq!(app_error(404, &body), "api.context.404.app_error");
    let (status, body) = bot.delete("/api/v4/posts").await;
    assert_eq!(
        status, 404,
        "a known path with another method is a 404 too: {body}"
    );

    let anonymous = reqwest::Client::new();
    let response = anonymous
        .get(format!("{}/api/v4/users/me", s.fake.url()))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 401);
    assert_eq!(
        app_error(401, &body),
        "api.context.session_expired.app_error"
    );
    let response = anonymous
        .get(format!("{}/api/v4/system/ping", s.fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(response).await, (200, json!({"status": "OK"})));
    let response = anonymous
        .get(format!("{}/api/v4/users/me", s.fake.url()))
        .header("Authorization", format!("bearer {}", s.fake.bot_token()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "the Bearer prefix is case-insensitive"
    );
    let response = anonymous
        .get(format!("{}/api/v4/users/me", s.fake.url()))
        .query(&[("access_token", s.fake.bot_token())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);

    let (status, me) = bot.get("/api/v4/users/me").await;
    assert_eq!(status, 200);
    assert_eq!(me["id"], json!(s.bot));
    assert_eq!(me["username"], json!("claude-bot"));
    assert_eq!(me["is_bot"], json!(true));
    assert_eq!(me["roles"], json!("system_user"));
    let (_, alice) = bot.get(&format!("/api/v4/users/{}", s.alice)).await;
    assert_eq!(alice["username"], json!("alice"));
    assert!(alice.get("is_bot").is_none(), "is_bot is omitempty");
    let (_, by_name) = bot.get("/api/v4/users/username/alice").await;
    assert_eq!(by_name["id"], json!(s.alice));
    let (status, _) = bot.get("/api/v4/users/username/nobody").await;
    assert_eq!(status, 404);
    let (status, _) = bot.get("/api/v4/users/abcdefghijklmnopqrstuvwxyz").await;
    assert_eq!(status, 404);
    let (status, _) = bot.get("/api/v4/users/short").await;
    assert_eq!(status, 400);
    s.fake.stop().await;
}
