//! The approval flow against the fake Mattermost (real cards, real clicks posting the real
//! callback body to the real HTTP router), real storage, and a recording firewall.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use session_manager::agent::markers::Marker;
use session_manager::approval::{
    signing, AgentMailbox, AliasWriter, ApplyError, ApprovalConfig, Approvals, Approvers,
};
use session_manager::chat::mattermost::adapter::MattermostAdapter;
use session_manager::chat::ChatOutbound;
use session_manager::health::HealthRegistry;
use session_manager::http::ratelimit::ClientRateLimiter;
use session_manager::http::{router, AppState};
use session_manager::session::MarkerHandler;
use session_manager::store::*;
use support::mattermost::{ClickOutcome, FakeMattermost};
use support::TestDatabase;
use tokio_util::sync::CancellationToken;

/// A firewall alias in memory: records additions and removals; can be told to fail.
#[derive(Default)]
struct RecordingAlias {
    /// What the alias holds now.
    content: Mutex<Vec<String>>,
    /// Every domain added, in order.
    added: Mutex<Vec<String>>,
    /// Every domain removed, in order.
    removed: Mutex<Vec<String>>,
    calls: Mutex<usize>,
    failing: Mutex<Option<ApplyError>>,
}

impl RecordingAlias {
    fn check(&self) -> Result<(), ApplyError> {
        *self.calls.lock().expect("lock") += 1;
        match self.failing.lock().expect("lock").clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn holds(&self, domain: &str) -> bool {
        self.content
            .lock()
            .expect("lock")
            .iter()
            .any(|d| d == domain)
    }
}

#[async_trait]
impl AliasWriter for RecordingAlias {
    async fn add(&self, domain: &str) -> Result<bool, ApplyError> {
        self.check()?;
        self.added.lock().expect("lock").push(domain.to_owned());
        if self.holds(domain) {
            return Ok(false);
        }
        self.content.lock().expect("lock").push(domain.to_owned());
        Ok(true)
    }

    async fn remove(&self, domain: &str) -> Result<bool, ApplyError> {
        self.check()?;
        self.removed.lock().expect("lock").push(domain.to_owned());
        let mut content = self.content.lock().expect("lock");
        let before = content.len();
        content.retain(|d| d != domain);
        Ok(content.len() != before)
    }

    async fn contains(&self, domain: &str) -> Result<bool, ApplyError> {
        self.check()?;
        Ok(self.holds(domain))
    }
}

/// Records what the agents are told.
#[derive(Default)]
struct Mailbox(Mutex<Vec<(String, String)>>);

#[async_trait]
impl AgentMailbox for Mailbox {
    async fn deliver(&self, session_id: &str, text: String) {
        self.0
            .lock()
            .expect("lock")
            .push((session_id.to_owned(), text));
    }
}

impl Mailbox {
    fn texts(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, t)| t.clone())
            .collect()
    }
}

struct World {
    fake: FakeMattermost,
    _db: TestDatabase,
    store: Store,
    approvals: Arc<Approvals>,
    alias: Arc<RecordingAlias>,
    mailbox: Arc<Mailbox>,
    session: Session,
    alice: String,
    bob: String,
    callback: String,
    cancel: CancellationToken,
}

const SECRET: &str = support::CALLBACK_SECRET;

/// The real Mattermost adapter, connected to the fake.
/// Stores a standard session on `acme/widgets` whose thread is `thread` in `channel`.
async fn create_widgets_session(
    store: &Store,
    channel: &str,
    thread: &str,
    started_by: &str,
) -> Session {
    store
        .create_session(&NewSession {
            id: new_session_id(),
            platform: Platform::Mattermost,
            channel_id: channel.to_owned(),
            thread_id: thread.to_owned(),
            kind: SessionKind::Standard,
            parent_id: None,
            started_by: started_by.to_owned(),
            repo_host: "github.com".into(),
            repo_org: "acme".into(),
            repo_name: "widgets".into(),
            branch: None,
            worktree: None,
        })
        .await
        .expect("session")
}

async fn connect_adapter(fake: &FakeMattermost, store: &Store) -> MattermostAdapter {
    MattermostAdapter::connect(
        session_manager::chat::mattermost::adapter::MattermostConfig {
            url: url::Url::parse(&fake.url()).expect("url"),
            token: secrecy::SecretString::from(fake.bot_token()),
            team_id: fake.team_id(),
            channel_category: "Claude Sessions".into(),
            request_timeout: Duration::from_secs(10),
            retry: session_manager::chat::mattermost::rest::RetryPolicy::default(),
            websocket: Default::default(),
            channel_privacy: session_manager::config::ChannelPrivacy::Private,
        },
        store.clone(),
    )
    .await
    .expect("connect")
}

/// `only_alice`: SM_ALLOWED_APPROVERS lists alice alone; otherwise any channel member.
async fn world(only_alice: bool, ttl: Duration) -> World {
    world_with(only_alice, ttl, None).await
}

/// Like [`world`], with another firewall than the recording one.
async fn world_with(
    only_alice: bool,
    ttl: Duration,
    firewall: Option<Arc<dyn AliasWriter>>,
) -> World {
    let fake = FakeMattermost::start().await;
    let alice = fake.add_user("alice");
    let bob = fake.add_user("bob");
    let channel = fake.create_channel(
        "acme-widgets",
        &[alice.as_str(), bob.as_str(), fake.bot_user_id().as_str()],
    );
    let db = TestDatabase::sqlite();
    let store = db.store().await;
    let adapter = Arc::new(connect_adapter(&fake, &store).await);
    let root = adapter
        .post(&channel, None, "session anchor")
        .await
        .expect("root");
    let session = create_widgets_session(&store, &channel, &root.post_id, &alice).await;

    // The real HTTP router, so clicks go through the real /callback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let callback = format!("http://{addr}/callback");
    let alias = Arc::new(RecordingAlias::default());
    let mailbox = Arc::new(Mailbox::default());
    let approvals = Approvals::new(
        store.clone(),
        adapter.clone(),
        firewall.unwrap_or_else(|| alias.clone() as Arc<dyn AliasWriter>),
        mailbox.clone(),
        ApprovalConfig {
            // alice owns the session; bob is an admin.
            admins: [bob.clone()].into_iter().collect(),
            ..ApprovalConfig::new(
                callback.clone(),
                secrecy::SecretString::from(SECRET.to_owned()),
                ttl,
                if only_alice {
                    Approvers::Only([alice.clone()].into_iter().collect())
                } else {
                    Approvers::OwnerAndAdmins
                },
                "llm_approved_domains".into(),
            )
        },
    );
    let clicks = session_manager::chat::ClickHandlers::new();
    clicks.set(approvals.clone());
    let (_, role) = tokio::sync::watch::channel(session_manager::leader::Role::Active);
    let state = AppState {
        store: store.clone(),
        health: HealthRegistry::new(),
        limiter: Arc::new(ClientRateLimiter::new(
            NonZeroU32::new(1000).expect("n"),
            NonZeroU32::new(1000).expect("n"),
            vec![],
        )),
        metrics: session_manager::telemetry::Metrics::get(),
        role,
        clicks,
    };
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            router(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    let cancel = CancellationToken::new();
    {
        let (a, c) = (approvals.clone(), cancel.clone());
        tokio::spawn(async move { a.run_workers(c).await })
    };
    World {
        fake,
        _db: db,
        store,
        approvals,
        alias,
        mailbox,
        session,
        alice,
        bob,
        callback,
        cancel,
    }
}

impl World {
    async fn request(&self, domain: &str) -> Vec<String> {
        self.approvals
            .on_marker(
                &self.session,
                Marker::NetworkRequest {
                    domain: domain.into(),
                },
            )
            .await
    }

    fn cards(&self) -> Vec<support::mattermost::Post> {
        self.fake
            .thread(&self.session.thread_id)
            .into_iter()
            .filter(|p| p.props.to_string().contains("attachments"))
            .collect()
    }

    async fn wait_for(&self, what: &str, mut check: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; told: {:?}",
                self.mailbox.texts()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post_callback(&self, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(&self.callback)
            .json(&body)
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn pending(&self, domain: &str) -> ApprovalRequest {
        let (r, _) = self
            .store
            .open_approval(&self.session.id, domain, now_ms(), now_ms() + 3_600_000)
            .await
            .expect("open");
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_puts_the_domain_in_the_alias_and_tells_the_agent() {
    let w = world(false, Duration::from_secs(3600)).await;
    assert!(
        w.request("PyPI.org").await.is_empty(),
        "the agent waits for the decision"
    );
    let cards = w.cards();
    assert_eq!(cards.len(), 1, "one card, its own reply in the thread");
    let card = &cards[0];
    assert_eq!(card.root_id, w.session.thread_id);
    assert!(
        card.props.to_string().contains("pypi.org"),
        "normalised domain shown: {}",
        card.props
    );
    // The card's buttons carry signed contexts (visible in the request the bot sent).
    let sent = w
        .fake
        .requests()
        .into_iter()
        .rev()
        .find(|r| {
            r.method == "POST"
                && r.path == "/api/v4/posts"
                && r.body.to_string().contains("actions")
        })
        .expect("card request");
    let action = &sent.body["props"]["attachments"][0]["actions"][0];
    assert_eq!(action["id"], "approve");
    assert!(action["id"]
        .as_str()
        .expect("id")
        .chars()
        .all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(
        action["integration"]["url"],
        Value::String(w.callback.clone())
    );
    let ctx = &action["integration"]["context"];
    assert!(signing::verify(
        &secrecy::SecretString::from(SECRET.to_owned()),
        ctx["request_id"].as_str().expect("id"),
        "approve",
        ctx["expires"].as_i64().expect("expires"),
        ctx["signature"].as_str().expect("sig"),
    ));

    // A repeated marker posts no second card.
    assert!(w.request("pypi.org").await.is_empty());
    assert_eq!(w.cards().len(), 1);

    let outcome = w.fake.click(&card.id, "approve", &w.alice).await;
    let ClickOutcome::Ok { response } = outcome else {
        panic!("click failed: {outcome:?}")
    };
    let update = response["update"]["props"].to_string();
    assert!(
        update.contains("Approving") && !update.contains("\"actions\":[{"),
        "buttons gone at once: {update}"
    );
    w.wait_for("the agent is told", |w| {
        w.mailbox
            .texts()
            .contains(&"[NETWORK_APPROVED: pypi.org]".to_owned())
    })
    .await;
    assert_eq!(w.alias.added.lock().expect("lock").as_slice(), ["pypi.org"]);
    let final_card = w.fake.post(&card.id).expect("card").props.to_string();
    assert!(final_card.contains("Approved by @alice"), "{final_card}");
    // Already approved: answered at once, no new card.
    assert_eq!(
        w.request("pypi.org").await,
        vec!["[NETWORK_APPROVED: pypi.org]"]
    );
    assert_eq!(w.cards().len(), 1);
    let audit: Vec<String> = w
        .store
        .audit_log(Some(&w.session.id), 50)
        .await
        .expect("audit")
        .into_iter()
        .map(|r| r.entry.action)
        .collect();
    assert_eq!(
        audit,
        vec!["requested", "approved", "granted", "firewall_applied"]
    );
    let records = w
        .store
        .audit_log(Some(&w.session.id), 50)
        .await
        .expect("audit");
    assert!(
        records
            .iter()
            .all(|r| r.entry.thread_id.as_deref() == Some(w.session.thread_id.as_str())),
        "every entry names the thread"
    );
    assert!(records
        .iter()
        .all(|r| r.entry.domain.as_deref() == Some("pypi.org")));
    let decision = &records[1].entry;
    assert_eq!(
        (
            decision.user_id.as_deref(),
            decision.user_name.as_deref(),
            decision.outcome.as_str()
        ),
        (Some(w.alice.as_str()), Some("alice"), "ok")
    );
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_tells_the_agent_and_never_touches_the_firewall() {
    let w = world(false, Duration::from_secs(3600)).await;
    w.request("evil.example.com").await;
    let card = w.cards().remove(0);
    let ClickOutcome::Ok { .. } = w.fake.click(&card.id, "deny", &w.bob).await else {
        panic!("click failed")
    };
    w.wait_for("denied", |w| {
        w.mailbox
            .texts()
            .iter()
            .any(|t| t.starts_with("[NETWORK_DENIED: evil.example.com]"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*w.alias.calls.lock().expect("lock"), 0, "no firewall call");
    assert!(w
        .fake
        .post(&card.id)
        .expect("card")
        .props
        .to_string()
        .contains("Denied by @bob"));
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_altered_replayed_expired_and_cross_request_signatures_are_rejected() {
    let w = world(false, Duration::from_secs(3600)).await;
    let secret = secrecy::SecretString::from(SECRET.to_owned());
    let a = w.pending("a.example.com").await;
    let b = w.pending("b.example.com").await;
    let body = |request: &str, action: &str, expires: i64, signature: String| {
        json!({"user_id": w.alice, "user_name": "alice", "post_id": "p", "context": {
            "request_id": request, "action": action, "expires": expires, "signature": signature }})
    };
    let forged = w
        .post_callback(body(&a.id, "approve", a.expires_at, "00".repeat(32)))
        .await;
    assert_eq!(forged.0, 403);
    let deny_sig = signing::sign(&secret, &a.id, "deny", a.expires_at);
    let altered = w
        .post_callback(body(&a.id, "approve", a.expires_at, deny_sig))
        .await;
    assert_eq!(altered.0, 403, "the action is signed");
    let later = w
        .post_callback(body(
            &a.id,
            "approve",
            a.expires_at + 1_000_000,
            signing::sign(&secret, &a.id, "approve", a.expires_at),
        ))
        .await;
    assert_eq!(later.0, 403, "the expiry is signed");
    let cross = w
        .post_callback(body(
            &b.id,
            "approve",
            a.expires_at,
            signing::sign(&secret, &a.id, "approve", a.expires_at),
        ))
        .await;
    assert_eq!(cross.0, 403, "a signature is bound to its request");
    let other_secret =
        secrecy::SecretString::from("another-secret-0123456789abcdef0123".to_owned());
    let wrong_key = w
        .post_callback(body(
            &a.id,
            "approve",
            a.expires_at,
            signing::sign(&other_secret, &a.id, "approve", a.expires_at),
        ))
        .await;
    assert_eq!(wrong_key.0, 403);
    assert_eq!(
        w.store
            .approval(&a.id)
            .await
            .expect("read")
            .expect("row")
            .state,
        ApprovalState::Pending,
        "nothing changed"
    );

    let good = body(
        &a.id,
        "approve",
        a.expires_at,
        signing::sign(&secret, &a.id, "approve", a.expires_at),
    );
    assert_eq!(w.post_callback(good.clone()).await.0, 200);
    let replay = w.post_callback(good).await;
    assert_eq!(replay.0, 200);
    assert!(
        replay.1["ephemeral_text"]
            .as_str()
            .is_some_and(|t| t.contains("Already decided by @alice")),
        "{}",
        replay.1
    );

    // Expired: a request whose expiry is in the past.
    let (c, _) = w
        .store
        .open_approval(
            &w.session.id,
            "c.example.com",
            now_ms() - 10_000,
            now_ms() - 1,
        )
        .await
        .expect("open");
    let expired = w
        .post_callback(body(
            &c.id,
            "approve",
            c.expires_at,
            signing::sign(&secret, &c.id, "approve", c.expires_at),
        ))
        .await;
    assert_eq!(expired.0, 200);
    assert!(expired.1["ephemeral_text"]
        .as_str()
        .is_some_and(|t| t.contains("expired")));
    assert_eq!(
        w.store
            .approval(&c.id)
            .await
            .expect("read")
            .expect("row")
            .state,
        ApprovalState::Expired
    );
    w.wait_for("the expiry is told", |w| {
        w.mailbox
            .texts()
            .iter()
            .any(|t| t.starts_with("[NETWORK_DENIED: c.example.com]"))
    })
    .await;

    for bad in [
        "not json",
        "{}",
        r#"{"user_id":"u","post_id":"p","context":{"request_id":"x"}}"#,
    ] {
        let r = reqwest::Client::new()
            .post(&w.callback)
            .body(bad)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 400, "{bad}");
    }
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_approvers_click_changes_nothing() {
    let w = world(true, Duration::from_secs(3600)).await;
    w.request("pypi.org").await;
    let card = w.cards().remove(0);
    let before = w.fake.post(&card.id).expect("card").props.to_string();
    let ClickOutcome::Ok { response } = w.fake.click(&card.id, "approve", &w.bob).await else {
        panic!("click")
    };
    assert!(
        response.get("update").is_none(),
        "the card stays: {response}"
    );
    assert!(
        response["ephemeral_text"]
            .as_str()
            .is_some_and(|t| t.contains("not allowed")),
        "{response}"
    );
    assert_eq!(
        w.fake.post(&card.id).expect("card").props.to_string(),
        before
    );
    let pending = w
        .store
        .approvals_due_for_firewall(i64::MAX)
        .await
        .expect("due");
    assert!(pending.is_empty(), "bob's click decided nothing");
    let ClickOutcome::Ok { response } = w.fake.click(&card.id, "approve", &w.alice).await else {
        panic!("click")
    };
    assert!(response.get("update").is_some(), "alice may: {response}");
    w.wait_for("approved", |w| {
        w.mailbox
            .texts()
            .contains(&"[NETWORK_APPROVED: pypi.org]".to_owned())
    })
    .await;
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_racing_deny_decides_once() {
    let w = world(false, Duration::from_secs(3600)).await;
    w.request("pypi.org").await;
    let card = w.cards().remove(0);
    // Race: approve and deny at the same time; exactly one decides.
    let (a, b) = tokio::join!(
        w.fake.click(&card.id, "approve", &w.alice),
        w.fake.click(&card.id, "deny", &w.bob)
    );
    let answers: Vec<Value> = [a, b]
        .into_iter()
        .map(|o| match o {
            ClickOutcome::Ok { response } => response,
            other => panic!("{other:?}"),
        })
        .collect();
    let decided = answers.iter().filter(|r| r.get("update").is_some()).count();
    let refused = answers
        .iter()
        .filter(|r| {
            r["ephemeral_text"]
                .as_str()
                .is_some_and(|t| t.contains("Already decided"))
        })
        .count();
    assert_eq!((decided, refused), (1, 1), "{answers:?}");
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_domains_are_refused_before_any_firewall_call() {
    let w = world(false, Duration::from_secs(3600)).await;
    let mut corpus: Vec<String> = Vec::new();
    for ip in [
        "10.0.0.1",
        "127.0.0.1",
        "127.1",
        "0x7f000001",
        "2130706433",
        "169.254.169.254",
        "::1",
        "[::1]",
        "fe80::1",
        "192.168.1.1.",
        "1.2.3.4",
    ] {
        corpus.push(ip.into());
    }
    for base in [
        "pypi.org",
        "example.com",
        "files.pythonhosted.org",
        "registry.npmjs.org",
    ] {
        corpus.push(format!("*.{base}"));
        corpus.push(format!("{base}:443"));
        corpus.push(format!("https://{base}"));
        corpus.push(format!("{base}/simple"));
        corpus.push(format!("user@{base}"));
        corpus.push(format!("{base};rm -rf /"));
        corpus.push(format!("{base}\nevil.com"));
        corpus.push(format!("{base} evil.com"));
        corpus.push(format!("{base}?x=1"));
        corpus.push(format!("{base}#frag"));
        corpus.push(format!("$({base})"));
        corpus.push(format!("`{base}`"));
        corpus.push(format!("'{base}'"));
        corpus.push(format!("{base}\t"));
        corpus.push(format!("{base}\u{0}"));
        corpus.push(format!("_{base}"));
        corpus.push(format!("-{base}"));
        corpus.push(format!("{base}.."));
        corpus.push(format!("{}.{base}", "a".repeat(64)));
        corpus.push(format!("{base}\u{202e}"));
        corpus.push(format!("{base}\u{200b}"));
    }
    for homoglyph in [
        "раураl.com",
        "аpple.com",
        "gοogle.com",
        "xn--80ak6aa92e.com",
        "раураl.com.",
        "micrоsoft.com",
        "ebаy.com",
    ] {
        corpus.push(homoglyph.into());
    }
    corpus.push(format!("{}.com", "a.".repeat(130)));
    corpus.push("localhost".into());
    corpus.push(String::new());
    assert!(corpus.len() >= 100, "{} cases", corpus.len());
    for bad in &corpus {
        let answer = w.request(bad).await;
        assert_eq!(answer.len(), 1, "{bad:?} answered once");
        assert!(
            answer[0].starts_with("[NETWORK_DENIED: "),
            "{bad:?} -> {answer:?}"
        );
    }
    assert!(w.cards().is_empty(), "no card for a bad domain");
    assert_eq!(
        *w.alias.calls.lock().expect("lock"),
        0,
        "nothing reached the firewall"
    );
    w.cancel.cancel();
}

fn opnsense_client(
    opn: &support::opnsense::FakeOpnsense,
) -> Arc<session_manager::firewall::opnsense::OpnsenseClient> {
    use session_manager::config::FirewallSettings;
    use session_manager::firewall::opnsense::OpnsenseClient;
    Arc::new(
        OpnsenseClient::new(&FirewallSettings {
            lease: std::time::Duration::from_secs(300),
            url: url::Url::parse(&opn.url()).expect("url"),
            key: secrecy::SecretString::from("key".to_owned()),
            secret: secrecy::SecretString::from("secret".to_owned()),
            alias: support::opnsense::ALIAS.into(),
            verify_tls: true,
            timeout: Duration::from_secs(5),
        })
        .expect("client"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firewall_outage_is_retried_and_survives_a_restart() {
    use support::opnsense::{FakeOpnsense, ALIAS};
    let opn = FakeOpnsense::start("key", "secret").await;
    opn.set_down(true);
    let w = world_with(
        false,
        Duration::from_secs(3600),
        Some(opnsense_client(&opn)),
    )
    .await;
    w.request("pypi.org").await;
    let card = w.cards().remove(0);
    let ClickOutcome::Ok { .. } = w.fake.click(&card.id, "approve", &w.alice).await else {
        panic!("click")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let posts = w.fake.thread(&w.session.thread_id);
        if posts.iter().any(|p| p.message.contains("keeps retrying")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the thread is told about the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        w.fake
            .post(&card.id)
            .expect("card")
            .props
            .to_string()
            .contains("not reachable yet"),
        "the card says so"
    );
    let request = w
        .store
        .approvals_due_for_firewall(i64::MAX)
        .await
        .expect("due")
        .remove(0);
    assert_eq!(request.state, ApprovalState::Approved);
    assert!(
        request.applied_at.is_none() && request.apply_attempts >= 1,
        "approved but not applied: {request:?}"
    );
    assert!(!opn.alias_content(ALIAS).contains(&"pypi.org".to_owned()));

    // "Restart": this instance stops; the firewall comes back; a new instance over the same
    // storage resumes the work.
    w.cancel.cancel();
    opn.set_down(false);
    let next = Approvals::new(
        w.store.clone(),
        Arc::new(connect_adapter(&w.fake, &w.store).await) as Arc<dyn ChatOutbound>,
        opnsense_client(&opn),
        w.mailbox.clone(),
        ApprovalConfig::new(
            w.callback.clone(),
            secrecy::SecretString::from(SECRET.to_owned()),
            Duration::from_secs(3600),
            Approvers::OwnerAndAdmins,
            ALIAS.into(),
        ),
    );
    // Make the retry due now rather than after its backoff.
    let _ = w
        .store
        .record_approval_attempt_failed(&request.id, "connection refused", now_ms())
        .await;
    let cancel = CancellationToken::new();
    {
        let (a, c) = (next.clone(), cancel.clone());
        tokio::spawn(async move { a.run_workers(c).await })
    };
    w.wait_for("applied after the restart", |w| {
        w.mailbox
            .texts()
            .contains(&"[NETWORK_APPROVED: pypi.org]".to_owned())
    })
    .await;
    assert!(opn.alias_content(ALIAS).contains(&"pypi.org".to_owned()));
    assert!(
        opn.applied_content(ALIAS).contains(&"pypi.org".to_owned()),
        "reconfigured"
    );
    let row = w
        .store
        .approval(&request.id)
        .await
        .expect("read")
        .expect("row");
    assert!(row.applied_at.is_some());
    assert!(w
        .fake
        .post(&card.id)
        .expect("card")
        .props
        .to_string()
        .contains("Approved by @alice"));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_domains_approved_at_once_by_two_replicas_all_end_up_in_the_alias() {
    use session_manager::config::FirewallSettings;
    use session_manager::firewall::opnsense::OpnsenseClient;
    use support::opnsense::{FakeOpnsense, ALIAS, INITIAL_DOMAIN};

    let opn = FakeOpnsense::start("key", "secret").await;
    let client = || {
        Arc::new(
            OpnsenseClient::new(&FirewallSettings {
                lease: std::time::Duration::from_secs(300),
                url: url::Url::parse(&opn.url()).expect("url"),
                key: secrecy::SecretString::from("key".to_owned()),
                secret: secrecy::SecretString::from("secret".to_owned()),
                alias: ALIAS.into(),
                verify_tls: true,
                timeout: Duration::from_secs(10),
            })
            .expect("client"),
        )
    };
    // Two replicas sharing one PostgreSQL database, each with its own firewall client.
    let db = TestDatabase::postgres().await;
    let store = db.store().await;
    let fake = FakeMattermost::start().await;
    let alice = fake.add_user("alice");
    let channel = fake.create_channel(
        "acme-widgets",
        &[alice.as_str(), fake.bot_user_id().as_str()],
    );
    let adapter = Arc::new(connect_adapter(&fake, &store).await);
    let root = adapter.post(&channel, None, "anchor").await.expect("root");
    let session = create_widgets_session(&store, &channel, &root.post_id, &alice).await;
    let mailbox = Arc::new(Mailbox::default());
    let cancel = CancellationToken::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let replica = Approvals::new(
            store.clone(),
            adapter.clone(),
            client(),
            mailbox.clone(),
            ApprovalConfig::new(
                "http://127.0.0.1:9/callback".into(),
                secrecy::SecretString::from(SECRET.to_owned()),
                Duration::from_secs(3600),
                Approvers::OwnerAndAdmins,
                ALIAS.into(),
            ),
        );
        replicas.push(replica);
    }
    let domains: Vec<String> = (0..10).map(|i| format!("pkg{i}.example.org")).collect();
    for domain in &domains {
        let (request, _) = store
            .open_approval(&session.id, domain, now_ms(), now_ms() + 3_600_000)
            .await
            .expect("open");
        let outcome = store
            .decide_approval(
                &request.id,
                Decision::Approve,
                GrantScope::Ttl,
                &alice,
                "alice",
                now_ms(),
            )
            .await
            .expect("decide");
        assert!(matches!(outcome, DecideOutcome::Decided(_)));
    }
    // Both replicas' workers race to apply them.
    for replica in &replicas {
        {
            let (a, c) = (replica.clone(), cancel.clone());
            tokio::spawn(async move { a.run_workers(c).await })
        };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let approved = mailbox
            .texts()
            .iter()
            .filter(|t| t.starts_with("[NETWORK_APPROVED: "))
            .count();
        if approved == domains.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {approved} of {} applied",
            domains.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    let content = opn.alias_content(ALIAS);
    for domain in &domains {
        assert!(content.contains(domain), "{domain} lost: {content:?}");
    }
    assert!(
        content.contains(&INITIAL_DOMAIN.to_owned()),
        "what was there stays"
    );
    let applied = opn.applied_content(ALIAS);
    for domain in &domains {
        assert!(
            applied.contains(domain),
            "{domain} saved but never reconfigured: {applied:?}"
        );
    }
    let told: HashSet<String> = mailbox.texts().into_iter().collect();
    assert_eq!(told.len(), domains.len(), "each agent answer exactly once");
}
