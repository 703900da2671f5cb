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
    carol: String,
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
            profile: None,
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
    world_tweaked(only_alice, ttl, firewall, |_| {}).await
}

/// Like [`world_with`], with settings changed by `tweak`.
async fn world_tweaked(
    only_alice: bool,
    ttl: Duration,
    firewall: Option<Arc<dyn AliasWriter>>,
    tweak: impl FnOnce(&mut ApprovalConfig),
) -> World {
    let fake = FakeMattermost::start().await;
    let alice = fake.add_user("alice");
    let bob = fake.add_user("bob");
    let carol = fake.add_user("carol");
    let channel = fake.create_channel(
        "acme-widgets",
        &[
            alice.as_str(),
            bob.as_str(),
            carol.as_str(),
            fake.bot_user_id().as_str(),
        ],
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
    let mut config = ApprovalConfig {
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
    };
    tweak(&mut config);
    let approvals = Approvals::new(
        store.clone(),
        adapter.clone(),
        firewall.unwrap_or_else(|| alias.clone() as Arc<dyn AliasWriter>),
        mailbox.clone(),
        config,
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
        console: None,
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
        carol,
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
    // Its kind routes the click; contexts without one (cards posted before kinds existed, as
    // the signature tests below send) are network cards too.
    assert_eq!(ctx["kind"], session_manager::approval::CARD_KIND);

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
            url: Some(url::Url::parse(&opn.url()).expect("url")),
            key: Some(secrecy::SecretString::from("key".to_owned())),
            secret: Some(secrecy::SecretString::from("secret".to_owned())),
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
                url: Some(url::Url::parse(&opn.url()).expect("url")),
                key: Some(secrecy::SecretString::from("key".to_owned())),
                secret: Some(secrecy::SecretString::from("secret".to_owned())),
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

// ----- egress grants (issue #13) ---------------------------------------------------------

impl World {
    /// Another session on acme/widgets in the same channel, started by `owner`, with its own
    /// thread.
    async fn another_session(&self, owner: &str) -> Session {
        let root = self
            .fake
            .post_as(owner, &self.session.channel_id, None, "another session")
            .expect("root");
        create_widgets_session(&self.store, &self.session.channel_id, &root.id, owner).await
    }

    async fn request_for(&self, session: &Session, domain: &str) -> Vec<String> {
        self.approvals
            .on_marker(
                session,
                Marker::NetworkRequest {
                    domain: domain.into(),
                },
            )
            .await
    }

    fn cards_in(&self, thread: &str) -> Vec<support::mattermost::Post> {
        self.fake
            .thread(thread)
            .into_iter()
            .filter(|p| p.props.to_string().contains("attachments"))
            .collect()
    }

    fn told(&self, session: &Session, text: &str) -> bool {
        self.mailbox
            .0
            .lock()
            .expect("lock")
            .iter()
            .any(|(s, t)| s == &session.id && t == text)
    }

    async fn audit_actions(&self, session: &Session) -> Vec<String> {
        self.store
            .audit_log(Some(&session.id), 100)
            .await
            .expect("audit")
            .into_iter()
            .map(|r| r.entry.action)
            .collect()
    }

    /// Asks for `domain` from the session, approves it for the session as its owner, and
    /// waits until the agent is told it is approved.
    async fn approve_for_the_session(&self, domain: &str) {
        self.request(domain).await;
        self.click_card(&self.session, "approvesession", &self.alice)
            .await;
        let told = format!("[NETWORK_APPROVED: {domain}]");
        eventually("applied", || self.told(&self.session, &told)).await;
    }

    /// Clicks `action` on the only card of `session`'s thread as `user`; the reply.
    async fn click_card(&self, session: &Session, action: &str, user: &str) -> Value {
        let card = self
            .cards_in(&session.thread_id)
            .pop()
            .expect("a card in the thread");
        match self.fake.click(&card.id, action, user).await {
            ClickOutcome::Ok { response } => response,
            other => panic!("click failed: {other:?}"),
        }
    }
}

/// Waits until `check` holds (20 s), checking every 50 ms.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_grant_expires_and_leaves_the_alias_but_entries_the_bot_did_not_add_stay() {
    use support::opnsense::{FakeOpnsense, ALIAS, INITIAL_DOMAIN};
    let opn = FakeOpnsense::start("key", "secret").await;
    // The operator's own entry, added by hand next to the alias's seed.
    let mut own: Vec<String> = opn.alias_content(ALIAS);
    own.push("operator.example.org".into());
    let own_refs: Vec<&str> = own.iter().map(String::as_str).collect();
    opn.set_content(ALIAS, &own_refs);
    let w = world_tweaked(
        false,
        Duration::from_secs(3600),
        Some(opnsense_client(&opn)),
        |c| c.grant_ttl = Duration::from_secs(2),
    )
    .await;
    // The card offers the timed grant, the session grant and Deny.
    w.request("pypi.org").await;
    let card = w.cards().remove(0).props.to_string();
    for label in ["Approve for 2 s", "Approve for this session", "Deny"] {
        assert!(card.contains(label), "{label} missing: {card}");
    }
    let reply = w.click_card(&w.session, "approve", &w.alice).await;
    assert!(reply.to_string().contains("for 2 s"), "{reply}");
    // The operator's own entry is asked for too, and approved: already in the alias, so the
    // bot did not add it and must never remove it.
    w.request("operator.example.org").await;
    let second = w.cards().pop().expect("second card");
    let ClickOutcome::Ok { .. } = w.fake.click(&second.id, "approve", &w.alice).await else {
        panic!("click")
    };
    eventually("both approvals applied", || {
        w.told(&w.session, "[NETWORK_APPROVED: pypi.org]")
            && w.told(&w.session, "[NETWORK_APPROVED: operator.example.org]")
    })
    .await;
    assert!(opn.applied_content(ALIAS).contains(&"pypi.org".to_owned()));
    let grants = w
        .store
        .live_grants(Some(&w.session.id), now_ms())
        .await
        .expect("grants");
    assert_eq!(grants.len(), 2, "{grants:?}");
    assert!(grants
        .iter()
        .all(|g| g.scope == GrantScope::Ttl && g.expires_at.is_some()));
    // Two seconds later the grants end and the bot's own entry leaves the alias (reconfigured).
    eventually("pypi.org removed from the applied alias", || {
        !opn.applied_content(ALIAS).contains(&"pypi.org".to_owned())
    })
    .await;
    let content = opn.alias_content(ALIAS);
    for kept in [INITIAL_DOMAIN, "operator.example.org"] {
        assert!(
            content.contains(&kept.to_owned()),
            "{kept} removed: {content:?}"
        );
    }
    assert!(!content.contains(&"pypi.org".to_owned()));
    let actions = w.audit_actions(&w.session).await;
    assert_eq!(
        actions.iter().filter(|a| *a == "grant_expired").count(),
        2,
        "{actions:?}"
    );
    // The removal is audited once the firewall has it (a moment after the alias changes).
    let deadline = Instant::now() + Duration::from_secs(20);
    let removed = loop {
        let removed: Vec<String> = w
            .store
            .audit_log(None, 100)
            .await
            .expect("audit")
            .into_iter()
            .filter(|r| r.entry.action == "firewall_removed")
            .filter_map(|r| r.entry.domain)
            .collect();
        if !removed.is_empty() || Instant::now() > deadline {
            break removed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(removed, vec!["pypi.org".to_owned()]);
    // The thread hears that the grant ended.
    assert!(w
        .fake
        .thread(&w.session.thread_id)
        .iter()
        .any(|p| p.message.contains("`pypi.org` has expired")));
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_sharing_a_domain_keep_it_until_both_grants_end() {
    use support::opnsense::{FakeOpnsense, ALIAS};
    let opn = FakeOpnsense::start("key", "secret").await;
    let w = world_with(
        false,
        Duration::from_secs(3600),
        Some(opnsense_client(&opn)),
    )
    .await;
    w.approve_for_the_session("pypi.org").await;
    // carol's session asks for the same domain: no card, a notice, a grant of its own.
    let other = w.another_session(&w.carol).await;
    assert_eq!(
        w.request_for(&other, "pypi.org").await,
        vec!["[NETWORK_APPROVED: pypi.org]"]
    );
    assert!(w.cards_in(&other.thread_id).is_empty(), "no card");
    let notice = w
        .fake
        .thread(&other.thread_id)
        .into_iter()
        .find(|p| p.message.contains("already allowed"))
        .expect("a notice");
    assert!(
        notice.message.contains("granted by @alice")
            && notice
                .message
                .contains(session_manager::session::short_id(&w.session.id)),
        "{}",
        notice.message
    );
    assert_eq!(w.audit_actions(&other).await, vec!["grant_shared"]);
    // alice's session ends: carol's grant still covers the domain.
    w.store
        .end_session(&w.session.id, EndReason::UserRequested, None)
        .await
        .expect("end");
    let w_ref = &w;
    let mut ended = false;
    for _ in 0..200 {
        if w_ref
            .store
            .live_grants(Some(&w_ref.session.id), now_ms())
            .await
            .expect("grants")
            .is_empty()
        {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ended, "alice's session grant ended with her session");
    // Two full worker rounds after the end (the first may have started before it) removed
    // nothing.
    let seen = w.approvals.rounds();
    eventually("two more worker rounds", || {
        w.approvals.rounds() >= seen + 2
    })
    .await;
    assert!(
        opn.applied_content(ALIAS).contains(&"pypi.org".to_owned()),
        "kept while carol's grant lives"
    );
    // carol's session ends too: now the domain leaves the alias.
    w.store
        .end_session(&other.id, EndReason::UserRequested, None)
        .await
        .expect("end");
    eventually("removed after both ended", || {
        !opn.applied_content(ALIAS).contains(&"pypi.org".to_owned())
    })
    .await;
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_during_a_firewall_outage_is_applied_when_it_returns_after_a_restart() {
    use support::opnsense::{FakeOpnsense, ALIAS};
    let opn = FakeOpnsense::start("key", "secret").await;
    let w = world_tweaked(
        false,
        Duration::from_secs(3600),
        Some(opnsense_client(&opn)),
        |c| c.grant_ttl = Duration::from_secs(2),
    )
    .await;
    w.request("pypi.org").await;
    w.click_card(&w.session, "approve", &w.alice).await;
    eventually("applied", || {
        w.told(&w.session, "[NETWORK_APPROVED: pypi.org]")
    })
    .await;
    opn.set_down(true);
    // The grant expires; the removal fails and is recorded for a retry.
    let mut failed = false;
    for _ in 0..300 {
        if w.store
            .audit_log(None, 100)
            .await
            .expect("audit")
            .iter()
            .any(|r| r.entry.action == "firewall_remove_failed")
        {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed, "the removal was tried during the outage");
    assert!(opn.alias_content(ALIAS).contains(&"pypi.org".to_owned()));
    // "Restart": this instance stops; the firewall comes back; a new one resumes the removal.
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
    w.store
        .record_firewall_removal_failed("pypi.org", "down", now_ms())
        .await
        .expect("due now");
    let cancel = CancellationToken::new();
    {
        let (a, c) = (next.clone(), cancel.clone());
        tokio::spawn(async move { a.run_workers(c).await });
    }
    eventually("removed after the restart", || {
        !opn.applied_content(ALIAS).contains(&"pypi.org".to_owned())
    })
    .await;
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_domain_removed_by_hand_is_not_answered_approved_until_it_is_back() {
    use support::opnsense::{FakeOpnsense, ALIAS};
    let opn = FakeOpnsense::start("key", "secret").await;
    let w = world_with(
        false,
        Duration::from_secs(3600),
        Some(opnsense_client(&opn)),
    )
    .await;
    w.approve_for_the_session("pypi.org").await;
    let approved_before = w.mailbox.texts().len();
    // An operator removes it by hand (and applies that).
    let kept: Vec<String> = opn
        .alias_content(ALIAS)
        .into_iter()
        .filter(|d| d != "pypi.org")
        .collect();
    let refs: Vec<&str> = kept.iter().map(String::as_str).collect();
    opn.set_content(ALIAS, &refs);
    // Asked again: not answered "approved" from the bot's own record.
    assert!(
        w.request("pypi.org").await.is_empty(),
        "not approved while the alias lacks it"
    );
    assert!(w
        .fake
        .thread(&w.session.thread_id)
        .iter()
        .any(|p| p.message.contains("no longer has it")));
    // The bot puts it back, then tells the agent.
    eventually("told again", || w.mailbox.texts().len() > approved_before).await;
    assert_eq!(
        w.mailbox.texts().last().map(String::as_str),
        Some("[NETWORK_APPROVED: pypi.org]")
    );
    assert!(opn.alias_content(ALIAS).contains(&"pypi.org".to_owned()));
    assert!(opn.applied_content(ALIAS).contains(&"pypi.org".to_owned()));
    let actions = w.audit_actions(&w.session).await;
    assert!(actions.contains(&"drift".to_owned()), "{actions:?}");
    // Still one grant: putting it back is not a new grant.
    assert_eq!(
        w.store
            .live_grants(Some(&w.session.id), now_ms())
            .await
            .expect("grants")
            .len(),
        1
    );
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_are_the_owner_and_admins_and_the_two_person_rule_holds() {
    // Default: alice owns the session, bob is an admin, carol is only a channel member.
    let w = world(false, Duration::from_secs(3600)).await;
    w.request("pypi.org").await;
    let reply = w.click_card(&w.session, "approve", &w.carol).await;
    assert!(
        reply["ephemeral_text"]
            .as_str()
            .is_some_and(|t| t.contains("only its owner and the admins")),
        "{reply}"
    );
    assert_eq!(
        w.store
            .pending_approvals(&w.session.id)
            .await
            .expect("pending"),
        1,
        "carol's click changed nothing"
    );
    w.cancel.cancel();

    // Two-person rule: the owner may not approve her own request; an admin may.
    let w = world_tweaked(false, Duration::from_secs(3600), None, |c| {
        c.separate_approver = true;
    })
    .await;
    w.request("pypi.org").await;
    let reply = w.click_card(&w.session, "approve", &w.alice).await;
    assert!(
        reply["ephemeral_text"]
            .as_str()
            .is_some_and(|t| t.contains("Two-person rule")),
        "{reply}"
    );
    let reply = w.click_card(&w.session, "approvesession", &w.bob).await;
    assert!(reply.to_string().contains("for this session"), "{reply}");
    eventually("applied", || {
        w.told(&w.session, "[NETWORK_APPROVED: pypi.org]")
    })
    .await;
    let grant = w
        .store
        .live_grants(Some(&w.session.id), now_ms())
        .await
        .expect("grants")
        .remove(0);
    assert_eq!(
        (
            grant.scope,
            grant.granted_by_name.as_deref(),
            grant.expires_at
        ),
        (GrantScope::Session, Some("bob"), None)
    );
    let refused = w
        .store
        .audit_log(Some(&w.session.id), 50)
        .await
        .expect("audit")
        .into_iter()
        .find(|r| r.entry.action == "refused_approver")
        .expect("the refusal is audited");
    assert_eq!(refused.entry.user_name.as_deref(), Some("alice"));
    // The owner may still deny under the two-person rule.
    w.request("evil.example.com").await;
    let reply = w.click_card(&w.session, "deny", &w.alice).await;
    assert!(reply.to_string().contains("Denied by @alice"), "{reply}");
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_cards_are_capped_per_session_and_close_when_the_session_ends() {
    let w = world_tweaked(false, Duration::from_secs(3600), None, |c| {
        c.max_pending = 2
    })
    .await;
    assert!(w.request("one.example.org").await.is_empty());
    assert!(w.request("two.example.org").await.is_empty());
    let third = w.request("three.example.org").await;
    assert_eq!(third.len(), 1);
    assert!(
        third[0].starts_with("[NETWORK_DENIED: three.example.org]")
            && third[0].contains("SM_MAX_PENDING_APPROVALS"),
        "{third:?}"
    );
    assert!(
        w.request("one.example.org").await.is_empty(),
        "a repeated marker for a waiting card is neither a card nor a denial"
    );
    assert_eq!(w.cards().len(), 2, "no third card");
    // Another session has its own cap.
    let other = w.another_session(&w.alice).await;
    assert!(w.request_for(&other, "three.example.org").await.is_empty());

    // The first session ends: its cards close, and a click on one says so.
    w.store
        .end_session(&w.session.id, EndReason::UserRequested, None)
        .await
        .expect("end");
    eventually("both cards closed", || {
        w.cards()
            .iter()
            .all(|c| c.props.to_string().contains("the session ended"))
    })
    .await;
    assert!(
        w.cards()
            .iter()
            .all(|c| !c.props.to_string().contains("\"actions\":[{")),
        "no buttons left"
    );
    // A click replayed from a closed card's signed context is answered with the reason.
    let closed = w
        .store
        .pending_approval(&w.session.id, "one.example.org")
        .await
        .expect("read");
    assert!(closed.is_none(), "no longer pending");
    let request_id = w
        .store
        .audit_log(Some(&w.session.id), 50)
        .await
        .expect("audit")
        .into_iter()
        .find(|r| r.entry.action == "closed")
        .and_then(|r| r.entry.domain)
        .expect("closing is audited");
    assert!(request_id.ends_with("example.org"));
    let (request, _) = w
        .store
        .open_approval(&other.id, "x.example.org", now_ms(), now_ms() + 60_000)
        .await
        .expect("open");
    w.store
        .end_session(&other.id, EndReason::UserRequested, None)
        .await
        .expect("end");
    let mut state = ApprovalState::Pending;
    for _ in 0..200 {
        state = w
            .store
            .approval(&request.id)
            .await
            .expect("read")
            .expect("row")
            .state;
        if state == ApprovalState::Closed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, ApprovalState::Closed);
    let secret = secrecy::SecretString::from(SECRET.to_owned());
    let (status, body) = w
        .post_callback(
            json!({"user_id": w.alice, "user_name": "alice", "post_id": "p", "context": {
            "request_id": request.id, "action": "approve", "expires": request.expires_at,
            "signature": signing::sign(&secret, &request.id, "approve", request.expires_at) }}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        body["ephemeral_text"]
            .as_str()
            .is_some_and(|t| t.contains("its session has ended")),
        "{body}"
    );
    w.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_patterns_and_names_resolving_inside_are_refused_without_a_card() {
    use session_manager::firewall::policy::{DomainPattern, EgressPolicy};
    use std::net::Ipv4Addr;
    let dns = support::dns::FakeDns::start(&[
        ("inside.example.org", Ipv4Addr::new(127, 0, 0, 1)),
        ("rebind.example.org", Ipv4Addr::new(10, 1, 2, 3)),
        ("outside.example.org", Ipv4Addr::new(93, 184, 216, 34)),
    ])
    .await;
    let addr = dns.addr();
    let w = world_tweaked(false, Duration::from_secs(3600), None, |c| {
        c.policy = Arc::new(
            EgressPolicy::new(
                vec![DomainPattern::parse("*.nip.io").expect("pattern")],
                true,
                &[addr],
            )
            .expect("policy"),
        );
    })
    .await;
    for (domain, why) in [
        ("10.0.0.1.nip.io", "denied pattern *.nip.io"),
        ("inside.example.org", "127.0.0.1"),
        ("rebind.example.org", "10.1.2.3"),
    ] {
        let answer = w.request(domain).await;
        assert_eq!(answer.len(), 1, "{domain}: {answer:?}");
        assert!(
            answer[0].starts_with(&format!("[NETWORK_DENIED: {domain}]"))
                && answer[0].contains(why),
            "{domain}: {answer:?}"
        );
    }
    assert!(w.cards().is_empty(), "no card for a refused domain");
    assert_eq!(
        *w.alias.calls.lock().expect("lock"),
        0,
        "nothing reached the firewall"
    );
    assert!(dns.queries().contains(&"inside.example.org.".to_owned()));
    // A public name and one that does not resolve at all get a card.
    assert!(w.request("outside.example.org").await.is_empty());
    assert!(w.request("unknown.example.org").await.is_empty());
    assert_eq!(w.cards().len(), 2);
    let refusals = w
        .store
        .audit_log(Some(&w.session.id), 50)
        .await
        .expect("audit")
        .into_iter()
        .filter(|r| r.entry.outcome == "rejected")
        .count();
    assert_eq!(refusals, 3, "each refusal is audited");
    w.cancel.cancel();
}
