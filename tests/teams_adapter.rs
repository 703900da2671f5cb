//! The Teams adapter against the fake Teams (issuer, token endpoint, Connector) on real
//! sockets: inbound token checks, activities parsed into events, card clicks, outbound shapes,
//! throttling, pacing, splitting, and references that survive a new adapter.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use session_manager::chat::mattermost::rest::RetryPolicy;
use session_manager::chat::teams::auth::{AuthConfig, AuthError, BotAuthenticator};
use session_manager::chat::teams::card::adaptive_card;
use session_manager::chat::teams::{
    routes, TeamsAdapter, TeamsConfig, MAX_POST_CHARS, MESSAGES_PATH,
};
use session_manager::chat::{
    ActionCard, CardAction, CardClick, CardClickHandler, ChatError, ChatEvent, ChatOutbound,
    ClickError, ClickHandlers, ClickReply, InboundMessage, PostRef,
};
use session_manager::dispatch::{DispatchConfig, Dispatcher};
use session_manager::session::{Delivery, SessionControl, SessionError};
use session_manager::store::{new_session_id, NewSession, Platform, Session, SessionKind, Store};
use support::teams::{FakeTeams, KeyChoice, TeamsUser};
use support::TestDatabase;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn config(fake: &FakeTeams, pace: Duration) -> TeamsConfig {
    TeamsConfig {
        app_id: fake.app_id(),
        app_password: secrecy::SecretString::from(fake.app_password()),
        token_url: url::Url::parse(&fake.token_url()).expect("url"),
        openid_metadata_url: url::Url::parse(&fake.metadata_url()).expect("url"),
        trigger: "@claude".into(),
        request_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_retries: 4,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(300),
            max_retry_after: Duration::from_secs(5),
        },
        pace_interval: pace,
    }
}

/// The bot's inbound side served on a port, over a fake Teams and a fresh database.
struct World {
    fake: FakeTeams,
    db: TestDatabase,
    store: Store,
    adapter: Arc<TeamsAdapter>,
    endpoint: String,
    events: mpsc::Receiver<ChatEvent>,
    clicks: ClickHandlers,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
    olo: TeamsUser,
    channel: String,
}

async fn world_with(pace: Duration) -> World {
    let fake = FakeTeams::start().await;
    let db = TestDatabase::sqlite();
    let store = db.store().await;
    let adapter = Arc::new(
        TeamsAdapter::connect(config(&fake, pace), store.clone())
            .await
            .expect("adapter"),
    );
    let (tx, events) = mpsc::channel(64);
    let clicks = ClickHandlers::new();
    let app = routes(Arc::clone(&adapter), tx, clicks.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!(
        "http://{}{MESSAGES_PATH}",
        listener.local_addr().expect("addr")
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    let olo = fake.user("Olo Brockhouse");
    let channel = fake.add_channel();
    World {
        fake,
        db,
        store,
        adapter,
        endpoint,
        events,
        clicks,
        shutdown,
        server,
        olo,
        channel,
    }
}

async fn world() -> World {
    world_with(Duration::from_millis(200)).await
}

impl World {
    async fn send(&self, activity: &Value) -> (u16, Value) {
        self.fake
            .send(&self.endpoint, activity, Some(&self.fake.valid_token()))
            .await
    }

    async fn next(&mut self) -> InboundMessage {
        match tokio::time::timeout(Duration::from_secs(5), self.events.recv()).await {
            Ok(Some(ChatEvent::Message(m))) => m,
            other => panic!("no event: {other:?}"),
        }
    }

    fn no_event(&mut self) {
        assert!(self.events.try_recv().is_err(), "an unexpected event");
    }

    /// A top-level channel post mentioning the bot, delivered; the conversation reference is
    /// now known.
    async fn greet(&mut self) -> InboundMessage {
        let activity = self
            .fake
            .channel_message(&self.channel, &self.olo, "status", true);
        assert_eq!(self.send(&activity).await.0, 200);
        self.next().await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.server.await;
        self.adapter.close().await;
        self.fake.stop().await;
        drop(self.db);
    }
}

/// Polls `check` until it holds (5 s at most).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn decided_card(status: &str) -> ActionCard {
    ActionCard {
        title: "Network access request".into(),
        text: format!("Network access to **example.com**\n{status}"),
        actions: Vec::new(),
        callback_url: "http://bot/callback".into(),
        color: Some("#FF8000".into()),
    }
}

fn pending_card() -> ActionCard {
    let context = |action: &str| {
        let mut c = Map::new();
        c.insert("request_id".into(), json!("r-123"));
        c.insert("action".into(), json!(action));
        c.insert("expires".into(), json!(4_102_444_800_000_i64));
        c.insert("signature".into(), json!(format!("sig-{action}")));
        c
    };
    ActionCard {
        actions: vec![
            CardAction {
                id: "approve".into(),
                label: "Approve".into(),
                style: "good".into(),
                context: context("approve"),
            },
            CardAction {
                id: "deny".into(),
                label: "Deny".into(),
                style: "danger".into(),
                context: context("deny"),
            },
        ],
        ..decided_card("")
    }
}

/// Records clicks and answers with what it was given.
struct Recording {
    clicks: Mutex<Vec<CardClick>>,
    answer: Result<ClickReply, ClickError>,
}

#[async_trait]
impl CardClickHandler for Recording {
    async fn on_click(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        self.clicks.lock().expect("clicks").push(click);
        self.answer.clone()
    }
}

fn recording(answer: Result<ClickReply, ClickError>) -> Arc<Recording> {
    Arc::new(Recording {
        clicks: Mutex::new(Vec::new()),
        answer,
    })
}

// ----- inbound auth ---------------------------------------------------------------------------

/// A `MakeWriter` into a shared buffer, to read what was logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// One thread, so the bot's request handling logs into this test's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn every_token_problem_is_a_401_and_no_token_is_logged() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut w = world().await;
    let chat = w.fake.add_personal_chat();

    let valid = w.fake.valid_token();
    let activity = w.fake.personal_message(&chat, &w.olo, "help");
    let (status, _) = w.fake.send(&w.endpoint, &activity, Some(&valid)).await;
    assert_eq!(status, 200, "a valid token is accepted");
    assert_eq!(w.next().await.text, "@claude help");

    let other_url = "https://smba.trafficmanager.net/emea/".to_owned();
    type Break = Box<dyn Fn(&mut support::teams::TokenSpec)>;
    let cases: Vec<(&str, Break)> = vec![
        (
            "wrong_issuer",
            Box::new(|s| s.iss = "https://sts.windows.net/evil/".into()),
        ),
        (
            "wrong_audience",
            Box::new(|s| s.aud = "someone-else".into()),
        ),
        ("expired", Box::new(|s| s.exp_in = -600)),
        ("not_yet_valid", Box::new(|s| s.nbf_in = 900)),
        ("bad_signature", Box::new(|s| s.tamper = true)),
        ("unknown_key", Box::new(|s| s.key = KeyChoice::Unpublished)),
        (
            "missing_endorsement",
            Box::new(|s| s.key = KeyChoice::NotEndorsed),
        ),
        (
            "serviceurl_mismatch",
            Box::new(move |s| s.service_url = Some(other_url.clone())),
        ),
        ("serviceurl_mismatch", Box::new(|s| s.service_url = None)),
    ];
    let mut tokens = vec![valid];
    for (reason, breaks) in &cases {
        let mut spec = w.fake.token_spec();
        breaks(&mut spec);
        let token = spec.sign();
        let activity = w.fake.personal_message(&chat, &w.olo, "help");
        let (status, body) = w.fake.send(&w.endpoint, &activity, Some(&token)).await;
        assert_eq!(status, 401, "{reason}");
        assert_eq!(body["error"], *reason, "{reason}");
        tokens.push(token);
    }
    // No header, another scheme, not a JWT.
    let activity = w.fake.personal_message(&chat, &w.olo, "help");
    assert_eq!(w.fake.send(&w.endpoint, &activity, None).await.0, 401);
    let basic = reqwest::Client::new()
        .post(&w.endpoint)
        .header("authorization", format!("Basic {}", tokens[0]))
        .json(&activity)
        .send()
        .await
        .expect("answer");
    assert_eq!(basic.status(), 401);
    assert_eq!(
        w.fake.send(&w.endpoint, &activity, Some("garbage")).await.0,
        401
    );
    // A token for another activity's service URL does not pass for this one.
    let mut moved = activity.clone();
    moved["serviceUrl"] = json!("https://smba.trafficmanager.net/emea/");
    assert_eq!(
        w.fake.send(&w.endpoint, &moved, Some(&tokens[0])).await.0,
        401
    );
    w.no_event();

    let logged = String::from_utf8(logs.0.lock().expect("log").clone()).expect("utf-8");
    assert!(
        logged.contains("wrong_audience") && logged.contains("missing_endorsement"),
        "reasons are logged:\n{logged}"
    );
    for token in &tokens {
        for part in token.split('.') {
            assert!(!logged.contains(part), "a token part was logged");
        }
    }
    w.stop().await;
}

#[tokio::test]
async fn unknown_keys_are_refetched_at_most_once_per_interval() {
    let fake = FakeTeams::start().await;
    let auth = |interval: Duration| {
        let mut config = AuthConfig::new(
            &fake.app_id(),
            url::Url::parse(&fake.metadata_url()).expect("url"),
        );
        config.refresh_interval = interval;
        BotAuthenticator::new(config).expect("auth")
    };
    let service = fake.service_url();
    let header = |token: &str| format!("Bearer {token}");
    let slow = auth(Duration::from_secs(60));
    let valid = fake.valid_token();
    slow.verify(Some(&header(&valid)), Some(&service), Some("msteams"))
        .await
        .expect("valid");
    slow.verify(Some(&header(&valid)), Some(&service), Some("msteams"))
        .await
        .expect("cached");
    assert_eq!(fake.key_fetches(), (1, 1), "keys are cached");
    let mut rotated = fake.token_spec();
    rotated.key = KeyChoice::Unpublished;
    let rotated = rotated.sign();
    fake.publish_rotated_key();
    assert!(matches!(
        slow.verify(Some(&header(&rotated)), Some(&service), Some("msteams"))
            .await,
        Err(AuthError::UnknownKey { .. })
    ));
    assert_eq!(fake.key_fetches(), (1, 1), "no refetch within the interval");
    let quick = auth(Duration::ZERO);
    quick
        .verify(Some(&header(&valid)), Some(&service), Some("msteams"))
        .await
        .expect("valid");
    quick
        .verify(Some(&header(&rotated)), Some(&service), Some("msteams"))
        .await
        .expect("an unknown kid triggers a refetch that finds the rotated key");
    assert_eq!(fake.key_fetches(), (2, 2));
    fake.stop().await;
}

// ----- activities -----------------------------------------------------------------------------

#[tokio::test]
async fn each_activity_kind_becomes_the_right_event() {
    let mut w = world().await;
    // A new post in a channel that mentions the bot: a top-level command.
    let activity = w
        .fake
        .channel_message(&w.channel, &w.olo, "start acme/widgets", true);
    assert_eq!(w.send(&activity).await, (200, Value::Null));
    let m = w.next().await;
    assert_eq!(m.platform, Platform::Teams);
    assert_eq!(m.channel_id, w.channel);
    assert_eq!(m.post_id, activity["id"].as_str().expect("id"));
    assert_eq!(m.root_id, None);
    assert_eq!(m.text, "@claude start acme/widgets");
    assert_eq!(m.user_id, w.olo.aad);
    assert_eq!(m.user_name.as_deref(), Some("Olo Brockhouse"));
    let reference = w
        .store
        .teams_conversation(&w.channel)
        .await
        .expect("read")
        .expect("the reference is stored");
    assert_eq!(reference.service_url, w.fake.service_url());
    assert_eq!(reference.conversation_type, "channel");
    assert_eq!(reference.tenant_id, support::teams::TENANT);
    assert_eq!(reference.bot_id, w.fake.bot_id());
    let root = m.post_id.clone();

    // A reply in that thread (no session there): still addressed to the bot.
    let reply = w.fake.thread_reply(&w.channel, &root, &w.olo, "help", true);
    assert_eq!(w.send(&reply).await.0, 200);
    let m = w.next().await;
    assert_eq!(m.root_id.as_deref(), Some(root.as_str()));
    assert_eq!(m.thread_id(), root);
    assert_eq!(m.text, "@claude help");

    // In a session's thread, text for Claude stays text; commands stay commands.
    w.store
        .create_session(&NewSession {
            id: new_session_id(),
            platform: Platform::Teams,
            channel_id: w.channel.clone(),
            thread_id: root.clone(),
            kind: SessionKind::Standard,
            parent_id: None,
            started_by: w.olo.aad.clone(),
            repo_host: "github.com".into(),
            repo_org: "acme".into(),
            repo_name: "widgets".into(),
            branch: None,
            worktree: None,
            profile: None,
        })
        .await
        .expect("session");
    let talk = w
        .fake
        .thread_reply(&w.channel, &root, &w.olo, "please fix the tests", true);
    w.send(&talk).await;
    assert_eq!(w.next().await.text, "please fix the tests");
    let stop = w.fake.thread_reply(&w.channel, &root, &w.olo, "stop", true);
    w.send(&stop).await;
    assert_eq!(w.next().await.text, "@claude stop");
    let bang = w
        .fake
        .thread_reply(&w.channel, &root, &w.olo, "!compact", true);
    w.send(&bang).await;
    assert_eq!(w.next().await.text, "!compact");

    // A personal chat: no mention needed; flat, so no root until a session lives there.
    let chat = w.fake.add_personal_chat();
    let personal = w.fake.personal_message(&chat, &w.olo, "status");
    assert_eq!(w.send(&personal).await.0, 200);
    let m = w.next().await;
    assert_eq!(
        (m.channel_id.as_str(), m.root_id.as_deref()),
        (chat.as_str(), None)
    );
    assert_eq!(m.text, "@claude status");
    let anchor = w
        .adapter
        .post(&chat, None, "**Session for `acme/tools`**")
        .await
        .expect("anchor in the chat");
    w.store
        .create_session(&NewSession {
            id: new_session_id(),
            platform: Platform::Teams,
            channel_id: chat.clone(),
            thread_id: anchor.post_id.clone(),
            kind: SessionKind::Standard,
            parent_id: None,
            started_by: w.olo.aad.clone(),
            repo_host: "github.com".into(),
            repo_org: "acme".into(),
            repo_name: "tools".into(),
            branch: None,
            worktree: None,
            profile: None,
        })
        .await
        .expect("session");
    let personal = w.fake.personal_message(&chat, &w.olo, "what changed?");
    w.send(&personal).await;
    let m = w.next().await;
    assert_eq!(
        m.root_id.as_deref(),
        Some(anchor.post_id.as_str()),
        "the chat is the session's thread"
    );
    assert_eq!(m.text, "what changed?");

    // Where Olo last addressed the bot is where a session Olo starts lives.
    let channel = w
        .adapter
        .ensure_project_channel("acme/tools", &[w.olo.aad.as_str()])
        .await
        .expect("channel");
    assert_eq!(channel.channel_id, chat);
    assert!(!channel.created);

    // Other activity types are acknowledged and ignored.
    let mut update = w.fake.personal_message(&chat, &w.olo, "x");
    update["type"] = json!("conversationUpdate");
    assert_eq!(w.send(&update).await.0, 200);
    w.no_event();
    w.stop().await;
}

#[tokio::test]
async fn a_redelivered_activity_is_handled_once() {
    let mut w = world().await;
    let activity = w.fake.channel_message(&w.channel, &w.olo, "status", true);
    assert_eq!(w.send(&activity).await.0, 200);
    assert_eq!(w.send(&activity).await.0, 200);
    w.next().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.no_event();
    w.stop().await;
}

#[tokio::test]
async fn files_and_images_are_answered_as_not_supported_yet() {
    let mut w = world().await;
    let root = w.greet().await.post_id;
    let mut with_image = w
        .fake
        .thread_reply(&w.channel, &root, &w.olo, "look at this", true);
    with_image["attachments"]
        .as_array_mut()
        .expect("attachments")
        .push(json!({"contentType":"image/png","contentUrl":"https://x/img.png","name":"img.png"}));
    assert_eq!(w.send(&with_image).await.0, 200);
    assert_eq!(w.next().await.text, "@claude look at this");
    let mut only_file = w.fake.thread_reply(&w.channel, &root, &w.olo, "", true);
    only_file["attachments"] = json!([{"contentType":"application/vnd.microsoft.teams.file.download.info",
        "contentUrl":"https://x/report.pdf","name":"report.pdf","content":{"downloadUrl":"https://x","fileType":"pdf"}}]);
    assert_eq!(w.send(&only_file).await.0, 200);
    let (fake, channel) = (&w.fake, w.channel.clone());
    eventually("two notices", || {
        fake.thread(&channel, Some(&root))
            .iter()
            .filter(|m| {
                m.text
                    .as_deref()
                    .is_some_and(|t| t.contains("not supported yet"))
            })
            .count()
            == 2
    })
    .await;
    let notices: Vec<String> = w
        .fake
        .thread(&w.channel, Some(&root))
        .into_iter()
        .filter_map(|m| m.text)
        .filter(|t| t.contains("not supported yet"))
        .collect();
    assert!(notices[0].contains("an image") && notices[0].contains("Only the text"));
    assert!(notices[1].contains("report.pdf") && !notices[1].contains("Only the text"));
    w.no_event();
    w.stop().await;
}

// ----- card clicks ----------------------------------------------------------------------------

#[tokio::test]
async fn an_execute_invoke_is_answered_with_the_card_and_the_card_is_replaced_for_everyone() {
    let mut w = world().await;
    let root = w.greet().await.post_id;
    let card = w
        .adapter
        .post_card(&w.channel, &root, &pending_card())
        .await
        .expect("card");
    assert_eq!(card.root_id.as_deref(), Some(root.as_str()));
    let posted = w.fake.message(&card.post_id).expect("posted");
    assert_eq!(posted.text, None, "a card carries no text");
    assert_eq!(
        posted.attachments[0]["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    let execute = &posted.attachments[0]["content"]["body"][2]["actions"][0];
    assert_eq!(execute["type"], "Action.Execute");
    assert_eq!(execute["fallback"]["type"], "Action.Submit");

    // No handler yet (a standby, or still starting): an error the client shows.
    let data = execute["data"].clone();
    let invoke = w
        .fake
        .card_invoke(&card.post_id, &w.olo, "approve", data.clone());
    let (status, body) = w.send(&invoke).await;
    assert_eq!(status, 200);
    assert_eq!(body["statusCode"], 503);
    assert_eq!(body["type"], "application/vnd.microsoft.error");

    let decided = decided_card("⏳ Approving example.com… (by @Olo Brockhouse)");
    let handler = recording(Ok(ClickReply::ReplaceCard(decided.clone())));
    w.clicks.set(handler.clone());
    let invoke = w
        .fake
        .card_invoke(&card.post_id, &w.olo, "approve", data.clone());
    let (status, body) = w.send(&invoke).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "statusCode": 200,
            "type": "application/vnd.microsoft.card.adaptive",
            "value": adaptive_card(&decided),
        })
    );
    let clicks = handler.clicks.lock().expect("clicks").clone();
    assert_eq!(clicks.len(), 1);
    assert_eq!(clicks[0].platform, Platform::Teams);
    assert_eq!(clicks[0].user_id, w.olo.aad);
    assert_eq!(clicks[0].user_name, "Olo Brockhouse");
    assert_eq!(clicks[0].post_id, card.post_id);
    assert_eq!(Value::Object(clicks[0].context.clone()), data);
    let (fake, id) = (&w.fake, card.post_id.clone());
    eventually("the card updated for everyone", || {
        fake.message(&id).is_some_and(|m| m.updates == 1)
    })
    .await;
    let updated = w.fake.message(&card.post_id).expect("card");
    assert_eq!(updated.attachments[0]["content"], adaptive_card(&decided));
    let put = w.fake.ops("update").pop().expect("a PUT");
    assert!(
        put.raw_path.contains("%3Bmessageid%3D"),
        "the conversation id is encoded"
    );
    assert_eq!(
        put.conversation.as_deref(),
        Some(format!("{};messageid={root}", w.channel).as_str())
    );
    w.stop().await;
}

#[tokio::test]
async fn invoke_notices_errors_and_malformed_invokes_have_the_documented_shapes() {
    let mut w = world().await;
    let root = w.greet().await.post_id;
    let card = w
        .adapter
        .post_card(&w.channel, &root, &pending_card())
        .await
        .expect("card");
    let data = json!({"request_id":"r-123","action":"approve"});
    w.clicks.set(recording(Ok(ClickReply::Notice(
        "Already decided by @Ann (approved).".into(),
    ))));
    let invoke = w
        .fake
        .card_invoke(&card.post_id, &w.olo, "approve", data.clone());
    assert_eq!(
        w.send(&invoke).await,
        (
            200,
            json!({"statusCode":200,"type":"application/vnd.microsoft.activity.message","value":"Already decided by @Ann (approved)."})
        )
    );
    // Not an Action.Execute: NotSupported; no value: BadRequest (as BBJS).
    let mut submit_type = w
        .fake
        .card_invoke(&card.post_id, &w.olo, "approve", data.clone());
    submit_type["value"]["action"]["type"] = json!("Action.Submit");
    let (status, body) = w.send(&submit_type).await;
    assert_eq!(
        (
            status,
            body["statusCode"].as_u64(),
            body["value"]["code"].as_str()
        ),
        (200, Some(400), Some("NotSupported"))
    );
    let mut no_value = w
        .fake
        .card_invoke(&card.post_id, &w.olo, "approve", data.clone());
    no_value.as_object_mut().expect("object").remove("value");
    let (_, body) = w.send(&no_value).await;
    assert_eq!(body["value"]["code"], "BadRequest");
    let mut other = w.fake.card_invoke(&card.post_id, &w.olo, "approve", data);
    other["name"] = json!("task/fetch");
    assert_eq!(w.send(&other).await.0, 501);
    assert_eq!(
        w.fake.message(&card.post_id).expect("card").updates,
        0,
        "a notice leaves the card"
    );
    w.stop().await;
}

#[tokio::test]
async fn a_refused_invoke_is_an_error_response() {
    let mut w = world().await;
    let root = w.greet().await.post_id;
    let card = w
        .adapter
        .post_card(&w.channel, &root, &pending_card())
        .await
        .expect("card");
    w.clicks.set(recording(Err(ClickError::Forbidden)));
    let invoke = w.fake.card_invoke(
        &card.post_id,
        &w.olo,
        "approve",
        json!({"request_id":"r-123"}),
    );
    assert_eq!(
        w.send(&invoke).await,
        (
            200,
            json!({"statusCode":403,"type":"application/vnd.microsoft.error","value":{"code":"Forbidden","message":"invalid signature"}})
        )
    );
    w.stop().await;
}

#[tokio::test]
async fn a_submit_click_goes_to_the_handler_and_replaces_the_card() {
    let mut w = world().await;
    let root = w.greet().await.post_id;
    let card = w
        .adapter
        .post_card(&w.channel, &root, &pending_card())
        .await
        .expect("card");
    let posted = w.fake.message(&card.post_id).expect("card");
    let fallback =
        posted.attachments[0]["content"]["body"][2]["actions"][1]["fallback"]["data"].clone();
    assert_eq!(fallback["verb"], "deny");
    let decided = decided_card("🚫 Denied by @Olo Brockhouse");
    let handler = recording(Ok(ClickReply::ReplaceCard(decided.clone())));
    w.clicks.set(handler.clone());
    let submit = w.fake.card_submit(&card.post_id, &w.olo, fallback.clone());
    assert_eq!(w.send(&submit).await, (200, Value::Null));
    assert_eq!(w.send(&submit).await.0, 200, "a redelivery");
    let clicks = handler.clicks.lock().expect("clicks").clone();
    assert_eq!(clicks.len(), 1, "handled once");
    assert_eq!(clicks[0].context["signature"], "sig-deny");
    assert_eq!(clicks[0].post_id, card.post_id);
    let (fake, id) = (&w.fake, card.post_id.clone());
    eventually("the card replaced", || {
        fake.message(&id).is_some_and(|m| m.updates == 1)
    })
    .await;
    w.no_event();
    w.stop().await;
}

// ----- outbound -------------------------------------------------------------------------------

#[tokio::test]
async fn posts_replies_updates_and_typing_have_the_real_shapes() {
    let mut w = world().await;
    w.greet().await;
    // A new thread in the channel: CreateConversation.
    let anchor = w
        .adapter
        .post(&w.channel, None, "**Session for `acme/widgets`**")
        .await
        .expect("anchor");
    assert_eq!(anchor.root_id, None);
    assert_eq!(anchor.channel_id, w.channel);
    let create = w.fake.ops("create").pop().expect("create");
    assert_eq!(create.body["isGroup"], true);
    assert_eq!(create.body["channelData"]["channel"]["id"], w.channel);
    assert_eq!(create.body["activity"]["type"], "message");
    assert_eq!(create.body["activity"]["textFormat"], "markdown");
    assert_eq!(create.body["tenantId"], support::teams::TENANT);
    assert_eq!(w.fake.bot_threads(&w.channel), vec![anchor.post_id.clone()]);
    // A reply in it: ReplyToActivity on <channel>;messageid=<root>.
    let reply = w
        .adapter
        .post(&w.channel, Some(&anchor.post_id), "⏳ Starting")
        .await
        .expect("reply");
    assert_eq!(reply.root_id.as_deref(), Some(anchor.post_id.as_str()));
    let sent = w.fake.ops("reply").pop().expect("reply");
    assert_eq!(sent.activity_id.as_deref(), Some(anchor.post_id.as_str()));
    assert_eq!(sent.body["replyToId"], anchor.post_id);
    // Updates replace the text.
    w.adapter.update(&reply, "✅ Ready").await.expect("update");
    let put = w.fake.ops("update").pop().expect("update");
    assert_eq!(put.method, "PUT");
    assert_eq!(put.body["id"], reply.post_id);
    let thread: Vec<String> = w
        .fake
        .thread(&w.channel, Some(&anchor.post_id))
        .into_iter()
        .filter_map(|m| m.text)
        .collect();
    assert_eq!(thread, ["**Session for `acme/widgets`**", "✅ Ready"]);
    // Typing goes to the thread's conversation.
    tokio::time::sleep(Duration::from_millis(250)).await;
    w.adapter
        .typing(&w.channel, Some(&anchor.post_id))
        .await
        .expect("typing");
    let typing = w.fake.ops("send").pop().expect("typing");
    assert_eq!(typing.body["type"], "typing");
    assert_eq!(
        typing.conversation.as_deref(),
        Some(format!("{};messageid={}", w.channel, anchor.post_id).as_str())
    );
    // Unknown conversations are a clear error, not a guess.
    let err = w
        .adapter
        .post("19:unknown@thread.tacv2", None, "x")
        .await
        .expect_err("unknown");
    assert!(matches!(err, ChatError::Api { status: 404, .. }), "{err:?}");
    // The bot's id, size limit, users.
    assert_eq!(w.adapter.bot_user_id(), w.fake.bot_id());
    assert_eq!(w.adapter.max_post_chars(), MAX_POST_CHARS);
    let user = w
        .adapter
        .resolve_user(&w.olo.aad.to_uppercase())
        .await
        .expect("user");
    assert_eq!(
        (user.id.as_str(), user.username.as_str()),
        (w.olo.aad.as_str(), "Olo Brockhouse")
    );
    assert!(matches!(
        w.adapter.resolve_user("alice").await,
        Err(ChatError::Api { status: 404, .. })
    ));
    assert!(w
        .adapter
        .permalink(&anchor.post_id)
        .starts_with("https://teams.microsoft.com/l/message/"));
    w.adapter
        .follow_thread(&w.olo.aad, &anchor)
        .await
        .expect("no-op");
    w.stop().await;
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried_honouring_retry_after() {
    let mut w = world().await;
    let root = w.greet().await.post_id;
    w.fake.fail_next(429, Some(1));
    w.fake.fail_next(503, None);
    let started = Instant::now();
    let reply = w
        .adapter
        .post(&w.channel, Some(&root), "after the storm")
        .await
        .expect("posted after retries");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
    let attempts: Vec<u16> = w
        .fake
        .requests()
        .iter()
        .filter(|r| r.op == "reply")
        .map(|r| r.status)
        .collect();
    assert_eq!(attempts, [429, 503, 201]);
    assert_eq!(
        w.fake
            .message(&reply.post_id)
            .and_then(|m| m.text)
            .as_deref(),
        Some("after the storm")
    );
    // A refusal that retrying cannot fix comes back typed.
    let gone = PostRef {
        channel_id: w.channel.clone(),
        post_id: "999".into(),
        root_id: Some(root.clone()),
    };
    let err = w
        .adapter
        .update(&gone, "x")
        .await
        .expect_err("unknown message");
    assert_eq!(err.status(), Some(404));
    w.stop().await;
}

#[tokio::test]
async fn operations_are_paced_per_conversation_keeping_the_newest_update() {
    let pace = Duration::from_millis(600);
    let mut w = world_with(pace).await;
    let root = w.greet().await.post_id;
    let post = w
        .adapter
        .post(&w.channel, Some(&root), "a")
        .await
        .expect("post");
    // Three updates queued at once: only the newest is sent, one interval after the post.
    let mut tasks = Vec::new();
    for text in ["ab", "abc", "abcd"] {
        let (adapter, post) = (Arc::clone(&w.adapter), post.clone());
        tasks.push(tokio::spawn(
            async move { adapter.update(&post, text).await },
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.expect("task").expect("update");
    }
    let reply = w.fake.ops("reply").pop().expect("reply");
    let updates = w.fake.ops("update");
    assert_eq!(updates.len(), 1, "only the newest state is sent");
    assert_eq!(updates[0].body["text"], "abcd");
    let gap = updates[0].at.duration_since(reply.at);
    assert!(gap >= pace - Duration::from_millis(50), "paced: {gap:?}");
    // Another conversation is not held up by this one's pace.
    let chat = w.fake.add_personal_chat();
    w.send(&w.fake.personal_message(&chat, &w.olo, "hi")).await;
    w.next().await;
    let before = Instant::now();
    w.adapter.post(&chat, None, "at once").await.expect("post");
    assert!(before.elapsed() < pace);
    w.stop().await;
}

#[tokio::test]
async fn long_answers_are_split_outside_code_fences_into_the_thread() {
    let mut w = world_with(Duration::from_millis(10)).await;
    w.greet().await;
    let mut text = String::from("Here is the file:\n\n```rust\n");
    for i in 0..600 {
        text.push_str(&format!("let line_{i} = \"{}\";\n", "x".repeat(12)));
    }
    text.push_str("```\n\nThat is all.");
    assert!(text.chars().count() > 2 * MAX_POST_CHARS);
    let first = w.adapter.post(&w.channel, None, &text).await.expect("post");
    let parts: Vec<String> = w
        .fake
        .thread(&w.channel, Some(&first.post_id))
        .into_iter()
        .filter_map(|m| m.text)
        .collect();
    assert!(parts.len() >= 3, "{} parts", parts.len());
    for part in &parts {
        assert!(part.chars().count() <= MAX_POST_CHARS);
        assert_eq!(
            part.matches("```").count() % 2,
            0,
            "fences balanced in every part"
        );
    }
    assert!(parts[0].starts_with("Here is the file:"));
    assert!(parts.last().expect("last").ends_with("That is all."));
    assert_eq!(
        w.fake.ops("create").len(),
        1,
        "one thread, the rest are replies in it"
    );
    w.stop().await;
}

#[tokio::test]
async fn references_survive_a_new_adapter_over_the_same_storage() {
    let mut w = world().await;
    let root = w.greet().await.post_id;
    w.adapter.close().await;
    // As after a restart: a new adapter, nothing in memory.
    let again = TeamsAdapter::connect(config(&w.fake, Duration::from_millis(10)), w.store.clone())
        .await
        .expect("adapter");
    let reply = again
        .post(&w.channel, Some(&root), "still here")
        .await
        .expect("posted after a restart");
    assert_eq!(
        w.fake
            .message(&reply.post_id)
            .and_then(|m| m.text)
            .as_deref(),
        Some("still here")
    );
    let channel = again
        .ensure_project_channel("acme/widgets", &[w.olo.aad.as_str()])
        .await
        .expect("the channel where Olo asked");
    assert_eq!(channel.channel_id, w.channel);
    assert_eq!(channel.name, "General");
    // Someone who never wrote to the bot, for a repository it never served: a clear error.
    let err = again
        .ensure_project_channel("acme/other", &["00000000-0000-0000-0000-000000000000"])
        .await
        .expect_err("nowhere to go");
    assert!(
        matches!(err, ChatError::Api { status: 404, ref code, .. } if code == "NoConversation")
    );
    w.stop().await;
}

#[tokio::test]
async fn the_bot_token_is_cached_and_refreshed_before_it_expires() {
    let mut w = world_with(Duration::from_millis(10)).await;
    let root = w.greet().await.post_id;
    w.fake.set_token_lifetime(2); // refreshed after half its life
    for i in 0..3 {
        w.adapter
            .post(&w.channel, Some(&root), &format!("m{i}"))
            .await
            .expect("post");
    }
    assert_eq!(w.fake.ops("token").len(), 1, "one token for several calls");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    w.adapter
        .post(&w.channel, Some(&root), "later")
        .await
        .expect("post");
    assert_eq!(w.fake.ops("token").len(), 2, "refreshed before expiry");
    // Wrong credentials are a clear, non-transient error.
    let mut bad = config(&w.fake, Duration::from_millis(10));
    bad.app_password = secrecy::SecretString::from("wrong".to_owned());
    let bad = TeamsAdapter::connect(bad, w.store.clone())
        .await
        .expect("adapter");
    let err = bad
        .post(&w.channel, Some(&root), "x")
        .await
        .expect_err("refused");
    assert!(
        matches!(err, ChatError::Api { status: 401, ref code, .. } if code == "invalid_client"),
        "{err:?}"
    );
    w.stop().await;
}

#[tokio::test]
async fn malformed_requests_never_break_the_endpoint() {
    let mut w = world().await;
    let token = w.fake.valid_token();
    let service = w.fake.service_url();
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        vec![0xff, 0xfe, 0x00],
        json!({"serviceUrl": service}).to_string().into_bytes(),
        json!({"serviceUrl": service, "type": 5}).to_string().into_bytes(),
        json!({"serviceUrl": service, "type": "message"}).to_string().into_bytes(),
        json!({"serviceUrl": service, "type": "message", "conversation": {"id": ""}}).to_string().into_bytes(),
        json!({"serviceUrl": service, "type": "message", "conversation": {"id": "a:1"}}).to_string().into_bytes(),
        json!({"serviceUrl": service, "type": "message", "id": "1", "conversation": {"id": "19:c@thread.tacv2;messageid="},
               "from": {"id": "29:x"}, "text": "<at></at>", "entities": [{"type": "mention"}, {"type": "mention", "text": ""}]}).to_string().into_bytes(),
        json!({"serviceUrl": service, "type": "message", "id": "2", "conversation": {"id": "a:1"}, "from": {"id": "29:x"},
               "value": {"verb": 1}}).to_string().into_bytes(),
        json!({"serviceUrl": service, "type": "invoke", "name": "adaptiveCard/action", "conversation": {"id": "a:1"}, "value": "x"}).to_string().into_bytes(),
        json!({"serviceUrl": service, "type": "invoke", "name": "adaptiveCard/action", "conversation": {"id": "a:1"},
               "value": {"action": {"type": "Action.Execute", "data": [1]}}}).to_string().into_bytes(),
        json!({"serviceUrl": service, "type": "message", "id": "3", "conversation": {"id": "a:1"}, "from": {"id": "29:x"},
               "attachments": [{"contentType": 7}]}).to_string().into_bytes(),
        json!({"serviceUrl": "file:///etc/passwd", "type": "message"}).to_string().into_bytes(),
    ];
    for body in bodies {
        let (status, _) = w
            .fake
            .send_raw(&w.endpoint, body.clone(), Some(&token))
            .await;
        assert!(
            matches!(status, 200 | 400 | 401 | 501),
            "{status} for {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    // Random byte noise inside a valid envelope.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..50 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut activity = w.fake.personal_message("a:1random", &w.olo, "x");
        let text: String = (0..(seed % 64))
            .map(|i| char::from_u32(((seed >> (i % 48)) % 0x2FF) as u32 + 32).unwrap_or('?'))
            .collect();
        activity["text"] = json!(text);
        activity["entities"] = json!([{"type": "mention", "text": text.clone(), "mentioned": {"id": w.fake.bot_id()}}]);
        let (status, _) = w.send(&activity).await;
        assert!(matches!(status, 200 | 400), "{status}");
    }
    while w.events.try_recv().is_ok() {}
    // Still serving.
    let activity = w.fake.channel_message(&w.channel, &w.olo, "status", true);
    assert_eq!(w.send(&activity).await.0, 200);
    w.next().await;
    w.stop().await;
}

// ----- with the dispatcher ----------------------------------------------------------------------

/// A session runtime that records what it is asked (the chat side is under test).
#[derive(Default)]
struct Sessions {
    started: Mutex<Vec<(Session, PostRef)>>,
    delivered: Mutex<Vec<(String, String)>>,
}

#[async_trait]
impl SessionControl for Sessions {
    async fn repo_exists(&self, _org: &str, _repo: &str) -> Result<bool, SessionError> {
        Ok(true)
    }
    async fn start(&self, session: Session, progress: PostRef) -> Result<(), SessionError> {
        self.started
            .lock()
            .expect("started")
            .push((session, progress));
        Ok(())
    }
    async fn send(
        &self,
        session: &Session,
        message: &InboundMessage,
    ) -> Result<Delivery, SessionError> {
        self.delivered
            .lock()
            .expect("delivered")
            .push((session.id.clone(), message.text.clone()));
        Ok(Delivery::Delivered)
    }
    async fn stop(&self, _session: &Session, _by: &str) -> Result<(), SessionError> {
        Ok(())
    }
    async fn compact(&self, _session: &Session) -> Result<(), SessionError> {
        Ok(())
    }
    async fn clear(&self, _session: &Session) -> Result<(), SessionError> {
        Ok(())
    }
    async fn restart(&self, _session: &Session) -> Result<(), SessionError> {
        Ok(())
    }
    async fn interrupt(&self, _session: &Session) -> Result<bool, SessionError> {
        Ok(false)
    }
    async fn set_permission_mode(
        &self,
        _session: &Session,
        _mode: session_manager::permission::PermissionMode,
    ) -> Result<(), SessionError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_teams_user_starts_a_session_and_talks_in_its_thread_through_the_dispatcher() {
    let mut w = world_with(Duration::from_millis(10)).await;
    let sessions = Arc::new(Sessions::default());
    let dispatcher = Dispatcher::new(
        w.adapter.clone(),
        w.store.clone(),
        sessions.clone(),
        DispatchConfig {
            trigger: "@claude".into(),
            default_org: None,
            repo_host: "github.com".into(),
            roles: session_manager::access::Roles::open(),
            allowlist: session_manager::config::RepoAllowlist::Any,
            limits: Default::default(),
            permission_mode: session_manager::permission::PermissionMode::AcceptEdits,
            budgets: Default::default(),
            profiles: Default::default(),
        },
    );
    let (_unused, placeholder) = mpsc::channel(1);
    let events = std::mem::replace(&mut w.events, placeholder);
    let cancel = CancellationToken::new();
    let running = tokio::spawn(dispatcher.run(events, cancel.clone()));

    let ask = w
        .fake
        .channel_message(&w.channel, &w.olo, "start acme/widgets", true);
    assert_eq!(w.send(&ask).await.0, 200);
    let started = Arc::clone(&sessions);
    eventually("the session started", || {
        !started.started.lock().expect("started").is_empty()
    })
    .await;
    let (session, progress) = sessions.started.lock().expect("started")[0].clone();
    // The session lives in a new thread of the channel where it was asked.
    assert_eq!(session.platform, Platform::Teams);
    assert_eq!(session.channel_id, w.channel);
    assert_eq!(
        w.fake.bot_threads(&w.channel),
        vec![session.thread_id.clone()]
    );
    let thread = w.fake.thread(&w.channel, Some(&session.thread_id));
    assert!(
        thread[0].text.as_deref().is_some_and(
            |t| t.contains("Session for `acme/widgets`") && t.contains("@Olo Brockhouse")
        )
    );
    assert_eq!(
        progress.root_id.as_deref(),
        Some(session.thread_id.as_str())
    );
    let project = w
        .store
        .project_channel(Platform::Teams, "acme/widgets")
        .await
        .expect("read")
        .expect("recorded");
    assert_eq!(project.channel_id, w.channel);

    // A reply in that thread reaches the session, as plain text.
    let reply = w.fake.thread_reply(
        &w.channel,
        &session.thread_id,
        &w.olo,
        "please run the tests",
        true,
    );
    assert_eq!(w.send(&reply).await.0, 200);
    let delivered = Arc::clone(&sessions);
    eventually("the reply delivered", || {
        !delivered.delivered.lock().expect("delivered").is_empty()
    })
    .await;
    assert_eq!(
        sessions.delivered.lock().expect("delivered")[0],
        (session.id.clone(), "please run the tests".to_owned())
    );
    cancel.cancel();
    running.await.expect("dispatcher");
    w.stop().await;
}
