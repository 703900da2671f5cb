//! The Mattermost adapter against the fake Mattermost: request shapes, delivery under
//! reconnects, rate limits, long answers, cards.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use session_manager::chat::mattermost::adapter::{MattermostAdapter, MattermostConfig};
use session_manager::chat::mattermost::rest::RetryPolicy;
use session_manager::chat::mattermost::websocket::WsSettings;
use session_manager::chat::mattermost::MAX_POST_CHARS as MATTERMOST_MAX_POST_CHARS;
use session_manager::chat::render::CoalesceConfig;
use session_manager::chat::stream::{spawn_thread_output, TurnInput};
use session_manager::chat::{
    ActionCard, CardAction, ChatEvent, ChatOutbound, InboundMessage, PostRef,
};
use session_manager::config::ChannelPrivacy;
use session_manager::dispatch::{DispatchConfig, Dispatcher};
use session_manager::health::HealthRegistry;
use session_manager::session::{Delivery, SessionControl, SessionError};
use session_manager::store::{Platform, ProjectChannel, Session, Store};
use support::mattermost::FakeMattermost;
use support::TestDatabase;
use tokio_util::sync::CancellationToken;

struct World {
    fake: FakeMattermost,
    _db: TestDatabase,
    store: Store,
    adapter: Arc<MattermostAdapter>,
    alice: String,
}

fn config(fake: &FakeMattermost) -> MattermostConfig {
    MattermostConfig {
        url: url::Url::parse(&fake.url()).expect("url"),
        token: secrecy::SecretString::from(fake.bot_token()),
        team_id: fake.team_id(),
        channel_category: "Claude Sessions".into(),
        channel_privacy: ChannelPrivacy::Public,
        request_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_retries: 5,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            max_retry_after: Duration::from_secs(5),
        },
        websocket: WsSettings {
            ping_interval: Duration::from_secs(5),
            read_timeout: Duration::from_secs(15),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(300),
        },
    }
}

async fn world() -> World {
    let fake = FakeMattermost::start().await;
    let alice = fake.add_user("alice");
    let db = TestDatabase::sqlite();
    let store = db.store().await;
    let adapter = Arc::new(
        MattermostAdapter::connect(config(&fake), store.clone())
            .await
            .expect("connect"),
    );
    World {
        fake,
        _db: db,
        store,
        adapter,
        alice,
    }
}

/// A session runtime that accepts everything (the start flow's chat side is under test).
struct Accepting;

#[async_trait]
impl SessionControl for Accepting {
    async fn repo_exists(&self, _org: &str, _repo: &str) -> Result<bool, SessionError> {
        Ok(true)
    }
    async fn start(&self, _session: Session, _progress: PostRef) -> Result<(), SessionError> {
        Ok(())
    }
    async fn send(
        &self,
        _session: &Session,
        _message: &InboundMessage,
    ) -> Result<Delivery, SessionError> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_flow_creates_channel_category_and_root_post_with_the_real_shapes() {
    let w = world().await;
    let town = w.fake.create_channel(
        "town-square",
        &[w.alice.as_str(), w.fake.bot_user_id().as_str()],
    );
    let dispatcher = Dispatcher::new(
        w.adapter.clone(),
        w.store.clone(),
        Arc::new(Accepting),
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
    w.fake.clear_requests();
    let message = w
        .fake
        .post_as(&w.alice, &town, None, "@claude start acme/widgets@main")
        .expect("post");
    dispatcher
        .handle(InboundMessage {
            platform: Platform::Mattermost,
            channel_id: town.clone(),
            post_id: message.id.clone(),
            root_id: None,
            user_id: w.alice.clone(),
            user_name: Some("alice".into()),
            text: message.message.clone(),
            created_at: message.create_at,
        })
        .await;

    let channel = w
        .fake
        .channel_by_name("acme-widgets")
        .expect("project channel created");
    assert_eq!(channel.display_name, "acme/widgets");
    assert_eq!(channel.channel_type, "O");
    let members = w.fake.channel_members(&channel.id);
    assert!(
        members.contains(&w.alice) && members.contains(&w.fake.bot_user_id()),
        "{members:?}"
    );

    let requests = w.fake.requests();
    let find = |method: &str, path_end: &str| {
        requests
            .iter()
            .filter(|r| r.method == method && r.path.ends_with(path_end))
            .collect::<Vec<_>>()
    };
    let create = find("POST", "/api/v4/channels");
    assert_eq!(create.len(), 1);
    assert_eq!(
        create[0].body,
        json!({"team_id": w.fake.team_id(), "name": "acme-widgets", "display_name": "acme/widgets", "type": "O"})
    );
    let adds = find("POST", &format!("/api/v4/channels/{}/members", channel.id));
    let added: HashSet<String> = adds
        .iter()
        .map(|r| r.body["user_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        added.contains(&w.alice) && added.contains(&w.fake.bot_user_id()),
        "{added:?}"
    );
    let categories = find("POST", "/channels/categories");
    let bot_category = categories
        .iter()
        .find(|r| r.body["user_id"] == Value::String(w.fake.bot_user_id()))
        .expect("category created for the bot");
    assert_eq!(bot_category.body["type"], "custom");
    assert_eq!(bot_category.body["display_name"], "Claude Sessions");
    assert_eq!(
        bot_category.body["team_id"],
        Value::String(w.fake.team_id())
    );
    assert_eq!(bot_category.body["channel_ids"], json!([channel.id]));
    assert!(
        requests
            .iter()
            .any(|r| r.method == "GET" && r.path == format!("/api/v4/users/{}/teams/{}/channels/categories", w.alice, w.fake.team_id())),
        "the starter's sidebar is asked for too (the fake, like a server without admin rights for the bot, refuses it)"
    );
    let sidebar = w.fake.sidebar_categories(&w.fake.bot_user_id());
    assert!(
        sidebar.to_string().contains(&channel.id),
        "the channel is in the bot's category: {sidebar}"
    );

    let posts = find("POST", "/api/v4/posts");
    let root_req = posts
        .iter()
        .find(|r| {
            r.body["channel_id"] == Value::String(channel.id.clone())
                && r.body.get("root_id").is_none()
        })
        .expect("root post");
    assert!(root_req.body["message"]
        .as_str()
        .is_some_and(|m| m.contains("acme/widgets@main")));
    let root = w
        .fake
        .posts()
        .into_iter()
        .find(|p| {
            p.channel_id == channel.id
                && p.root_id.is_empty()
                && p.user_id == w.fake.bot_user_id()
                && p.post_type.is_empty()
        })
        .expect("root post stored");
    let progress = posts
        .iter()
        .find(|r| r.body["root_id"] == Value::String(root.id.clone()))
        .expect("progress reply in the thread");
    assert!(progress.body["message"]
        .as_str()
        .is_some_and(|m| m.contains("Starting")));
    assert!(
        requests
            .iter()
            .any(|r| r.method == "PUT"
                && r.path.ends_with(&format!("/threads/{}/following", root.id))),
        "the starter is made to follow the thread"
    );
    let session = w
        .store
        .session_by_thread(Platform::Mattermost, &channel.id, &root.id)
        .await
        .expect("read")
        .expect("session anchored at the root post");
    assert_eq!(session.branch.as_deref(), Some("main"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_posts_through_ten_socket_drops_arrive_once_each_in_order() {
    let w = world().await;
    let bot = w.fake.bot_user_id();
    let channel = w
        .fake
        .create_channel("acme-widgets", &[w.alice.as_str(), bot.as_str()]);
    w.store
        .upsert_project_channel(&ProjectChannel {
            platform: Platform::Mattermost,
            repo_slug: "acme/widgets".into(),
            team_id: w.fake.team_id(),
            channel_id: channel.clone(),
            channel_name: "acme-widgets".into(),
            created_at: 0,
        })
        .await
        .expect("project channel");
    let roots: Vec<String> = (0..5)
        .map(|i| {
            w.fake
                .post_as(&w.alice, &channel, None, &format!("thread {i}"))
                .expect("root")
                .id
        })
        .collect();

    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let cancel = CancellationToken::new();
    let runner = tokio::spawn(
        w.adapter
            .clone()
            .run(tx, HealthRegistry::new(), cancel.clone()),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.fake.websocket_connections() == 0 {
        assert!(Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let fake = &w.fake;
    let total = 1000usize;
    let mut sent_order: HashMap<String, Vec<String>> = HashMap::new();
    let mut received: Vec<InboundMessage> = Vec::new();
    for i in 0..total {
        let root = &roots[i % roots.len()];
        let post = fake
            .post_as(&w.alice, &channel, Some(root), &format!("msg {i}"))
            .expect("post");
        sent_order.entry(root.clone()).or_default().push(post.id);
        if i % 100 == 50 {
            fake.drop_websockets();
        }
        // Keep draining so back-pressure never stalls the posting loop.
        while let Ok(ChatEvent::Message(m)) = rx.try_recv() {
            received.push(m);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while received
        .iter()
        .filter(|m| m.text.starts_with("msg "))
        .count()
        < total
        && Instant::now() < deadline
    {
        if let Ok(Some(ChatEvent::Message(m))) =
            tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
        {
            received.push(m);
        }
    }
    // A little longer, to catch late duplicates.
    while let Ok(Some(ChatEvent::Message(m))) =
        tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await
    {
        received.push(m);
    }
    cancel.cancel();
    let _ = runner.await;

    let msgs: Vec<&InboundMessage> = received
        .iter()
        .filter(|m| m.text.starts_with("msg "))
        .collect();
    let ids: HashSet<&str> = msgs.iter().map(|m| m.post_id.as_str()).collect();
    assert_eq!(ids.len(), total, "every post arrived");
    assert_eq!(msgs.len(), total, "and each exactly once");
    for (root, sent) in &sent_order {
        let got: Vec<String> = msgs
            .iter()
            .filter(|m| m.root_id.as_deref() == Some(root))
            .map(|m| m.post_id.clone())
            .collect();
        assert_eq!(&got, sent, "thread {root} in order");
    }
    assert!(
        received.iter().all(|m| m.user_id != bot),
        "the bot's own posts are never delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bots_own_posts_and_system_posts_are_ignored() {
    let w = world().await;
    let bot = w.fake.bot_user_id();
    let channel = w
        .fake
        .create_channel("acme-widgets", &[w.alice.as_str(), bot.as_str()]);
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let cancel = CancellationToken::new();
    let runner = tokio::spawn(
        w.adapter
            .clone()
            .run(tx, HealthRegistry::new(), cancel.clone()),
    );
    while w.fake.websocket_connections() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.adapter
        .post(&channel, None, "the bot speaking")
        .await
        .expect("bot post");
    let bob = w.fake.add_user("bob");
    // Adding a member creates a system post (type system_add_to_channel).
    w.adapter
        .client()
        .add_channel_member(&channel, &bob)
        .await
        .expect("add");
    w.fake
        .post_as(&w.alice, &channel, None, "alice speaking")
        .expect("post");
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event")
        .expect("open");
    let ChatEvent::Message(m) = first;
    assert_eq!(
        m.text, "alice speaking",
        "the first thing delivered is alice's post"
    );
    assert_eq!(m.user_name.as_deref(), Some("alice"));
    assert!(
        tokio::time::timeout(Duration::from_millis(800), rx.recv())
            .await
            .is_err(),
        "nothing else"
    );
    cancel.cancel();
    let _ = runner.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_honoured() {
    let w = world().await;
    let channel = w.fake.create_channel(
        "acme-widgets",
        &[w.alice.as_str(), w.fake.bot_user_id().as_str()],
    );
    w.fake.clear_requests();
    w.fake.fail_next("/api/v4/posts", 1, 429, Some(1));
    let started = Instant::now();
    let post = w
        .adapter
        .post(&channel, None, "after the limit")
        .await
        .expect("retried until it worked");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the Retry-After"
    );
    let attempts: Vec<_> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/api/v4/posts")
        .collect();
    assert_eq!(attempts.len(), 2, "one refused, one accepted");
    assert!(attempts[1].at.duration_since(attempts[0].at) >= Duration::from_secs(1));
    assert_eq!(
        w.fake.post(&post.post_id).expect("stored").message,
        "after the limit"
    );

    // A 5xx is retried with backoff too; a 400 is not.
    w.fake.fail_next("/api/v4/posts", 2, 503, None);
    w.adapter
        .post(&channel, None, "after two 503s")
        .await
        .expect("retried");
    w.fake.clear_requests();
    let err = w
        .adapter
        .post(&channel, Some("nosuchroot0000000000000000"), "x")
        .await
        .expect_err("bad root");
    assert_eq!(err.status(), Some(400));
    assert_eq!(
        w.fake
            .requests()
            .iter()
            .filter(|r| r.path == "/api/v4/posts")
            .count(),
        1,
        "no retry for a 400"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_retried_after_a_lost_answer_makes_one_post() {
    let w = world().await;
    let channel = w.fake.create_channel(
        "acme-widgets",
        &[w.alice.as_str(), w.fake.bot_user_id().as_str()],
    );
    let before = w.fake.posts().len();
    w.fake.clear_requests();
    // The server makes the post, but the answer is lost twice (a gateway timeout).
    w.fake.lose_next_answers("/api/v4/posts", 2, 504);
    let post = w
        .adapter
        .post(&channel, None, "exactly once")
        .await
        .expect("retried until an answer arrived");
    let attempts: Vec<_> = w
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/api/v4/posts")
        .collect();
    assert_eq!(attempts.len(), 3, "two lost answers, then one heard");
    let ids: Vec<&str> = attempts
        .iter()
        .map(|r| {
            r.body["pending_post_id"]
                .as_str()
                .expect("a pending_post_id")
        })
        .collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]) && !ids[0].is_empty(),
        "every retry repeats the create's pending_post_id: {ids:?}"
    );
    let made: Vec<_> = w
        .fake
        .posts()
        .into_iter()
        .skip(before)
        .filter(|p| p.message == "exactly once")
        .collect();
    assert_eq!(made.len(), 1, "one post, not three");
    assert_eq!(
        made[0].id, post.post_id,
        "the answer names the post the first try made"
    );
    // A new create is a new post, with a new pending_post_id.
    w.fake.clear_requests();
    w.adapter
        .post(&channel, None, "exactly once")
        .await
        .expect("second post");
    let second = w
        .fake
        .requests()
        .into_iter()
        .find(|r| r.path == "/api/v4/posts")
        .expect("request");
    assert_ne!(second.body["pending_post_id"].as_str(), Some(ids[0]));
    assert_eq!(
        w.fake
            .posts()
            .into_iter()
            .filter(|p| p.message == "exactly once")
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kb_answer_becomes_posts_under_the_limit_with_balanced_fences() {
    let w = world().await;
    let channel = w.fake.create_channel(
        "acme-widgets",
        &[w.alice.as_str(), w.fake.bot_user_id().as_str()],
    );
    let root = w
        .adapter
        .post(&channel, None, "session anchor")
        .await
        .expect("root");
    let mut answer = String::new();
    let mut i = 0;
    while answer.len() < 100_000 {
        answer.push_str(&format!(
            "## Part {i}\n\nSome prose about step {i} — with “quotes” and ünïcödé.\n\n"
        ));
        answer.push_str("```rust\n");
        for line in 0..60 {
            answer.push_str(&format!(
                "fn f{i}_{line}() -> u32 {{ {line} }} // a fairly long line of code\n"
            ));
        }
        answer.push_str("```\n\n");
        i += 1;
    }
    let config = CoalesceConfig {
        min_edit_interval: Duration::from_millis(50),
        ..CoalesceConfig::for_post_limit(MATTERMOST_MAX_POST_CHARS)
    };
    let (tx, task) = spawn_thread_output(
        w.adapter.clone(),
        channel.clone(),
        root.post_id.clone(),
        config,
    );
    let chars: Vec<char> = answer.chars().collect();
    for chunk in chars.chunks(3_000) {
        tx.send(TurnInput::Text(chunk.iter().collect()))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tx.send(TurnInput::ToolUse {
        name: "Bash".into(),
        input: json!({"command": "cargo test"}),
    })
    .await
    .expect("send");
    tx.send(TurnInput::EndTurn).await.expect("send");
    drop(tx);
    task.await.expect("output task");

    let replies: Vec<String> = w
        .fake
        .thread(&root.post_id)
        .into_iter()
        .filter(|p| p.id != root.post_id)
        .map(|p| p.message)
        .collect();
    assert!(
        replies.len() >= 7,
        "100 KB needs several posts, got {}",
        replies.len()
    );
    for (n, text) in replies.iter().enumerate() {
        assert!(
            text.chars().count() <= MATTERMOST_MAX_POST_CHARS,
            "post {n} is over the limit"
        );
        let fences = text
            .lines()
            .filter(|l| l.trim_start().starts_with("```"))
            .count();
        assert_eq!(fences % 2, 0, "post {n} has unbalanced fences");
    }
    let joined = replies.join("");
    for probe in [
        "## Part 0",
        &format!("## Part {}", i - 1),
        "fn f3_59() -> u32 { 59 }",
    ] {
        assert!(joined.contains(probe), "{probe} lost");
    }
    assert!(
        joined.contains("`Bash`") && joined.contains("cargo test"),
        "tool call shown compactly"
    );
    assert!(
        !w.fake.typing_events().is_empty(),
        "typing was shown while the answer streamed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cards_carry_buttons_to_the_callback_and_lose_them_on_update() {
    let w = world().await;
    let channel = w.fake.create_channel(
        "acme-widgets",
        &[w.alice.as_str(), w.fake.bot_user_id().as_str()],
    );
    let root = w
        .adapter
        .post(&channel, None, "anchor")
        .await
        .expect("root");
    let mut context = serde_json::Map::new();
    context.insert("request_id".into(), json!("r-1"));
    let card = ActionCard {
        title: "Network access".into(),
        text: "Allow `pypi.org`?".into(),
        actions: vec![
            CardAction {
                id: "approve".into(),
                label: "Approve".into(),
                style: "good".into(),
                context: context.clone(),
            },
            CardAction {
                id: "deny".into(),
                label: "Deny".into(),
                style: "danger".into(),
                context,
            },
        ],
        callback_url: "http://127.0.0.1:9/callback".into(),
        color: Some("#FF8000".into()),
    };
    let post = w
        .adapter
        .post_card(&channel, &root.post_id, &card)
        .await
        .expect("card");
    assert_eq!(
        post.root_id.as_deref(),
        Some(root.post_id.as_str()),
        "its own reply in the thread"
    );
    let request = w
        .fake
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.method == "POST" && r.path == "/api/v4/posts")
        .expect("request");
    let actions = &request.body["props"]["attachments"][0]["actions"];
    assert_eq!(actions[0]["id"], "approve");
    assert_eq!(
        actions[0]["integration"]["url"],
        "http://127.0.0.1:9/callback"
    );
    assert_eq!(actions[0]["integration"]["context"]["request_id"], "r-1");
    let as_alice: Value = reqwest::Client::new()
        .get(format!("{}/api/v4/posts/{}", w.fake.url(), post.post_id))
        .bearer_auth(w.fake.user_token(&w.alice).expect("token"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert!(
        as_alice["props"].to_string().contains("Approve"),
        "{as_alice}"
    );
    assert!(
        !as_alice["props"].to_string().contains("integration"),
        "clients never see the signed context"
    );

    let decided = ActionCard {
        actions: Vec::new(),
        text: "`pypi.org` approved by @alice".into(),
        ..card
    };
    w.adapter
        .update_card(&post, &decided)
        .await
        .expect("update");
    let stored = w.fake.post(&post.post_id).expect("stored");
    assert!(
        !stored.props.to_string().contains("Approve"),
        "buttons gone: {}",
        stored.props
    );
    assert!(stored.props.to_string().contains("approved by @alice"));
}
