//! Routing and in-chat commands, with a recording chat platform and session runtime over
//! real storage.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use session_manager::access::{Access, Roles};
use session_manager::chat::{
    ActionCard, ChannelRef, ChatError, ChatEvent, ChatOutbound, ChatUser, InboundMessage, PostRef,
};
use session_manager::config::RepoAllowlist;
use session_manager::dispatch::{DispatchConfig, Dispatcher};
use session_manager::store::{EndReason, Platform, Session, SessionKind, Store};
use support::sessions::{Call, RecordingSessions};
use support::TestDatabase;
use tokio_util::sync::CancellationToken;

const ALICE: &str = "alice0000000000000000000001";
const BOB: &str = "bob00000000000000000000002";
const GENERAL: &str = "general0000000000000000003";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Posted {
    channel: String,
    root: Option<String>,
    text: String,
    id: String,
}

/// `(channel, root, user, text)` of a notice only one user sees.
type Notice = (String, Option<String>, String, String);

#[derive(Default)]
struct RecordingChat {
    posts: Mutex<Vec<Posted>>,
    channels: Mutex<HashMap<String, String>>, // repo slug -> channel id
    members: Mutex<Vec<(String, String)>>,
    follows: Mutex<Vec<(String, String)>>,
    updates: Mutex<Vec<(String, String)>>,
    /// Every notice only one user sees.
    ephemerals: Mutex<Vec<Notice>>,
}

impl RecordingChat {
    fn posts(&self) -> Vec<Posted> {
        self.posts.lock().expect("lock").clone()
    }
    /// The notices `user` alone saw.
    fn notices_for(&self, user: &str) -> Vec<String> {
        self.ephemerals
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, _, u, _)| u == user)
            .map(|(_, _, _, text)| text.clone())
            .collect()
    }
    fn replies_to(&self, root: &str) -> Vec<String> {
        self.posts()
            .into_iter()
            .filter(|p| p.root.as_deref() == Some(root))
            .map(|p| p.text)
            .collect()
    }
}

#[async_trait]
impl ChatOutbound for RecordingChat {
    fn platform(&self) -> Platform {
        Platform::Mattermost
    }
    fn max_post_chars(&self) -> usize {
        session_manager::chat::mattermost::MAX_POST_CHARS
    }
    fn bot_user_id(&self) -> &str {
        "bot00000000000000000000000"
    }
    async fn post(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        text: &str,
    ) -> Result<PostRef, ChatError> {
        let mut posts = self.posts.lock().expect("lock");
        let id = format!("post{:022}", posts.len());
        posts.push(Posted {
            channel: channel_id.into(),
            root: root_id.map(str::to_owned),
            text: text.into(),
            id: id.clone(),
        });
        Ok(PostRef {
            channel_id: channel_id.into(),
            post_id: id,
            root_id: root_id.map(str::to_owned),
        })
    }
    async fn post_ephemeral(
        &self,
        channel_id: &str,
        root_id: Option<&str>,
        user_id: &str,
        text: &str,
    ) -> Result<(), ChatError> {
        self.ephemerals.lock().expect("lock").push((
            channel_id.into(),
            root_id.map(str::to_owned),
            user_id.into(),
            text.into(),
        ));
        Ok(())
    }
    async fn add_channel_members(&self, channel_id: &str, users: &[&str]) -> Result<(), ChatError> {
        let mut members = self.members.lock().expect("lock");
        for user in users {
            members.push((channel_id.to_owned(), (*user).to_owned()));
        }
        Ok(())
    }
    async fn update(&self, post: &PostRef, text: &str) -> Result<(), ChatError> {
        self.updates
            .lock()
            .expect("lock")
            .push((post.post_id.clone(), text.to_owned()));
        Ok(())
    }
    async fn typing(&self, _channel_id: &str, _root_id: Option<&str>) -> Result<(), ChatError> {
        Ok(())
    }
    async fn post_card(
        &self,
        channel_id: &str,
        root_id: &str,
        card: &ActionCard,
    ) -> Result<PostRef, ChatError> {
        self.post(channel_id, Some(root_id), &card.text).await
    }
    async fn update_card(&self, post: &PostRef, card: &ActionCard) -> Result<(), ChatError> {
        self.update(post, &card.text).await
    }
    async fn ensure_project_channel(
        &self,
        repo_slug: &str,
        members: &[&str],
    ) -> Result<ChannelRef, ChatError> {
        let mut channels = self.channels.lock().expect("lock");
        let n = channels.len();
        let created = !channels.contains_key(repo_slug);
        let id = channels
            .entry(repo_slug.to_owned())
            .or_insert_with(|| format!("chan{n:022}"))
            .clone();
        for m in members {
            self.members
                .lock()
                .expect("lock")
                .push((id.clone(), (*m).to_owned()));
        }
        Ok(ChannelRef {
            team_id: "team0000000000000000000000".into(),
            channel_id: id,
            name: repo_slug.replace('/', "-"),
            created,
        })
    }
    async fn follow_thread(&self, user_id: &str, root: &PostRef) -> Result<(), ChatError> {
        self.follows
            .lock()
            .expect("lock")
            .push((user_id.into(), root.post_id.clone()));
        Ok(())
    }
    fn permalink(&self, post_id: &str) -> String {
        format!("https://chat.test/_redirect/pl/{post_id}")
    }
    async fn resolve_user(&self, id_or_username: &str) -> Result<ChatUser, ChatError> {
        Ok(ChatUser {
            id: id_or_username.into(),
            username: id_or_username.into(),
        })
    }
}

struct World {
    _db: TestDatabase,
    store: Store,
    chat: Arc<RecordingChat>,
    sessions: Arc<RecordingSessions>,
    dispatcher: Dispatcher,
    next_post: Mutex<u32>,
}

async fn world(access: Access, jitter: bool) -> World {
    world_with(
        Roles {
            users: access,
            admins: HashSet::new(),
        },
        RepoAllowlist::Any,
        jitter,
    )
    .await
}

async fn world_with(roles: Roles, allowlist: RepoAllowlist, jitter: bool) -> World {
    world_full(roles, allowlist, jitter, Default::default()).await
}

async fn world_full(
    roles: Roles,
    allowlist: RepoAllowlist,
    jitter: bool,
    limits: session_manager::session::SessionLimits,
) -> World {
    let db = TestDatabase::sqlite();
    let store = db.store().await;
    let chat = Arc::new(RecordingChat::default());
    let sessions = Arc::new(RecordingSessions::new(store.clone(), jitter));
    let dispatcher = Dispatcher::new(
        chat.clone(),
        store.clone(),
        sessions.clone(),
        DispatchConfig {
            trigger: "@claude".into(),
            default_org: Some("acme".into()),
            repo_host: "github.com".into(),
            roles,
            allowlist,
            limits,
            permission_mode: session_manager::permission::PermissionMode::AcceptEdits,
            budgets: Default::default(),
            profiles: Default::default(),
        },
    );
    World {
        _db: db,
        store,
        chat,
        sessions,
        dispatcher,
        next_post: Mutex::new(0),
    }
}

impl World {
    fn message(&self, user: &str, channel: &str, root: Option<&str>, text: &str) -> InboundMessage {
        let mut n = self.next_post.lock().expect("lock");
        *n += 1;
        InboundMessage {
            platform: Platform::Mattermost,
            channel_id: channel.into(),
            post_id: format!("in{:024}", *n),
            root_id: root.map(str::to_owned),
            user_id: user.into(),
            user_name: Some(if user == ALICE {
                "alice".into()
            } else {
                "bob".into()
            }),
            text: text.into(),
            created_at: 0,
        }
    }

    async fn say(
        &self,
        user: &str,
        channel: &str,
        root: Option<&str>,
        text: &str,
    ) -> InboundMessage {
        let m = self.message(user, channel, root, text);
        self.dispatcher.handle(m.clone()).await;
        m
    }

    /// Starts a session from the general channel and returns it.
    async fn start(&self, text: &str) -> Session {
        let before: HashSet<String> = self
            .store
            .active_sessions()
            .await
            .expect("list")
            .into_iter()
            .map(|s| s.id)
            .collect();
        self.say(ALICE, GENERAL, None, text).await;
        let after = self.store.active_sessions().await.expect("list");
        after
            .into_iter()
            .find(|s| !before.contains(&s.id))
            .unwrap_or_else(|| panic!("{text} started nothing; posts: {:?}", self.chat.posts()))
    }
}

#[tokio::test]
async fn start_opens_a_channel_thread_and_session() {
    let w = world(Access::Everyone, false).await;
    let trigger = w
        .say(
            ALICE,
            GENERAL,
            None,
            "@claude start acme/widgets@main --worktree",
        )
        .await;
    let sessions = w.store.active_sessions().await.expect("list");
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(
        (
            s.repo_org.as_str(),
            s.repo_name.as_str(),
            s.branch.as_deref()
        ),
        ("acme", "widgets", Some("main"))
    );
    assert_eq!(s.kind, SessionKind::Standard);
    assert_eq!(s.started_by, ALICE);
    assert_eq!(s.repo_host, "github.com");
    assert_eq!(
        s.worktree.as_deref(),
        Some(format!("widgets-{}", &s.id[..8]).as_str()),
        "automatic worktree name"
    );
    let channel = w.chat.channels.lock().expect("lock")["acme/widgets"].clone();
    assert_eq!(s.channel_id, channel);
    let project = w
        .store
        .project_channel(Platform::Mattermost, "acme/widgets")
        .await
        .expect("read")
        .expect("recorded");
    assert_eq!(
        (project.channel_id.as_str(), project.channel_name.as_str()),
        (channel.as_str(), "acme-widgets")
    );
    assert!(w
        .chat
        .members
        .lock()
        .expect("lock")
        .contains(&(channel.clone(), ALICE.to_owned())));
    let root = w
        .chat
        .posts()
        .into_iter()
        .find(|p| p.id == s.thread_id)
        .expect("root post");
    assert_eq!(root.channel, channel);
    assert_eq!(root.root, None, "the anchor is a root post");
    assert!(
        root.text.contains("acme/widgets@main") && root.text.contains("@alice"),
        "{}",
        root.text
    );
    assert_eq!(
        w.chat.follows.lock().expect("lock").as_slice(),
        &[(ALICE.to_owned(), s.thread_id.clone())]
    );
    assert!(
        w.chat
            .replies_to(&s.thread_id)
            .iter()
            .any(|t| t.contains("Starting")),
        "progress posted in the thread"
    );
    assert_eq!(w.sessions.calls(), vec![Call::Start(s.id.clone())]);
    let told = w.chat.replies_to(&trigger.post_id);
    assert!(
        told.iter()
            .any(|t| t.contains(&s.id[..8]) && t.contains("acme-widgets")),
        "{told:?}"
    );

    // The default organisation and named worktrees.
    let s2 = w.start("@claude start widgets --worktree=feature-x").await;
    assert_eq!(
        (s2.repo_org.as_str(), s2.worktree.as_deref()),
        ("acme", Some("feature-x"))
    );
    assert_eq!(s2.channel_id, channel, "the project channel is reused");
    let orch = w.start("@claude orchestrate acme/widgets").await;
    assert_eq!(orch.kind, SessionKind::Orchestrator);
}

#[tokio::test]
async fn thread_replies_reach_the_right_session_among_several() {
    let w = world(Access::Everyone, false).await;
    let a = w.start("@claude start acme/widgets").await;
    let b = w.start("@claude start acme/widgets --worktree").await;
    let c = w.start("@claude start acme/gadgets").await;
    for (session, text) in [(&b, "to b"), (&a, "to a"), (&c, "to c"), (&a, "to a again")] {
        w.say(ALICE, &session.channel_id, Some(&session.thread_id), text)
            .await;
    }
    let sends: Vec<Call> = w
        .sessions
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Send(..)))
        .collect();
    assert_eq!(
        sends,
        vec![
            Call::Send(b.id.clone(), "to b".into()),
            Call::Send(a.id.clone(), "to a".into()),
            Call::Send(c.id.clone(), "to c".into()),
            Call::Send(a.id.clone(), "to a again".into()),
        ]
    );
}

#[tokio::test]
async fn top_level_messages_follow_the_channel_rules() {
    let w = world(Access::Everyone, false).await;
    let a = w.start("@claude start acme/widgets").await;
    let channel = a.channel_id.clone();

    // One active non-worker session: it gets the message.
    w.say(ALICE, &channel, None, "hello there").await;
    assert_eq!(
        w.sessions.calls().last(),
        Some(&Call::Send(a.id.clone(), "hello there".into()))
    );

    // A second one: the user is asked to pick a thread, nothing is forwarded.
    let b = w.start("@claude start acme/widgets --worktree").await;
    let sends_before = w.sessions.calls().len();
    let m = w.say(ALICE, &channel, None, "which one?").await;
    assert_eq!(w.sessions.calls().len(), sends_before);
    let reply = w.chat.replies_to(&m.post_id).join("\n");
    assert!(
        reply.contains("Several sessions")
            && reply.contains(&a.id[..8])
            && reply.contains(&b.id[..8]),
        "{reply}"
    );

    // None: how to start one.
    for s in [&a, &b] {
        w.store
            .end_session(&s.id, EndReason::UserRequested, None)
            .await
            .expect("end");
    }
    let m = w.say(ALICE, &channel, None, "anyone?").await;
    let reply = w.chat.replies_to(&m.post_id).join("\n");
    assert!(reply.contains("@claude start acme/widgets"), "{reply}");
    assert_eq!(w.sessions.calls().len(), sends_before);
}

#[tokio::test]
async fn messages_outside_served_channels_and_threads_are_ignored() {
    let w = world(Access::Everyone, false).await;
    let a = w.start("@claude start acme/widgets").await;
    let posts_before = w.chat.posts().len();
    let calls_before = w.sessions.calls().len();
    w.say(BOB, GENERAL, None, "just chatting about claude")
        .await;
    w.say(BOB, "elsewhere00000000000000000", None, "hello")
        .await;
    w.say(
        BOB,
        &a.channel_id,
        Some("someotherthread00000000000"),
        "side conversation",
    )
    .await;
    w.say(BOB, GENERAL, Some("someotherthread00000000000"), "!status")
        .await; // ! only counts in session threads
    assert_eq!(w.chat.posts().len(), posts_before, "the bot said nothing");
    assert_eq!(w.sessions.calls().len(), calls_before, "nothing forwarded");
}

#[tokio::test]
async fn commands_are_handled_before_anything_is_forwarded() {
    let w = world(Access::Everyone, false).await;
    let a = w.start("@claude start acme/widgets").await;
    let t = Some(a.thread_id.as_str());
    w.say(ALICE, &a.channel_id, t, "!compact").await;
    w.say(ALICE, &a.channel_id, t, "@claude clear").await;
    w.say(ALICE, &a.channel_id, t, "!restart").await;
    let m = w.say(ALICE, &a.channel_id, t, "!context").await;
    assert!(
        w.chat
            .replies_to(&a.thread_id)
            .iter()
            .any(|r| r.contains("messages:") && r.contains("cost:")),
        "context answered"
    );
    let _ = m;
    w.say(ALICE, &a.channel_id, t, "!stop").await;
    let calls: Vec<Call> = w.sessions.calls().into_iter().skip(1).collect();
    assert_eq!(
        calls,
        vec![
            Call::Compact(a.id.clone()),
            Call::Clear(a.id.clone()),
            Call::Restart(a.id.clone()),
            Call::Stop(a.id.clone(), ALICE.into()),
        ],
        "no command text reached the agent"
    );

    let status = w.say(ALICE, GENERAL, None, "@claude status").await;
    let reply = w.chat.replies_to(&status.post_id).join("\n");
    assert!(
        reply.contains(&a.id[..8]) && reply.contains("acme/widgets") && reply.contains("messages"),
        "{reply}"
    );
    let help = w.say(ALICE, GENERAL, None, "@claude help").await;
    assert!(w
        .chat
        .replies_to(&help.post_id)
        .join("\n")
        .contains("start"));
}

#[tokio::test]
async fn malformed_commands_get_a_specific_reply_and_nothing_else() {
    let w = world(Access::Everyone, false).await;
    let a = w.start("@claude start acme/widgets").await;
    let calls_before = w.sessions.calls().len();
    for (text, expected) in [
        ("@claude start acme/../etc", "`../etc`"),
        ("@claude frobnicate", "frobnicate"),
        ("@claude compact", "thread"),
        ("@claude stop", "stop"),
    ] {
        let m = w.say(BOB, GENERAL, None, text).await;
        let reply = w.chat.replies_to(&m.post_id).join("\n");
        assert!(reply.contains(expected), "{text}: {reply}");
    }
    let m = w
        .say(BOB, &a.channel_id, Some(&a.thread_id), "!stop now please")
        .await;
    assert!(!w.chat.replies_to(&a.thread_id).is_empty());
    let _ = m;
    assert_eq!(
        w.sessions.calls().len(),
        calls_before,
        "nothing forwarded or started"
    );
}

#[tokio::test]
async fn only_allowed_users_may_use_the_bot_even_when_invited() {
    let w = world(Access::Only(HashSet::from([ALICE.to_owned()])), false).await;
    let refused = w
        .say(BOB, GENERAL, None, "@claude start acme/widgets")
        .await;
    assert!(w.store.active_sessions().await.expect("list").is_empty());
    assert!(
        w.chat.replies_to(&refused.post_id).is_empty(),
        "the refusal is not posted for everyone"
    );
    assert_eq!(
        w.chat.notices_for(BOB),
        ["Sorry, you are not on the list of people who may use this bot. Ask an administrator to add you to SM_ALLOWED_USERS."]
    );
    assert!(
        w.chat.channels.lock().expect("lock").is_empty(),
        "no channel created for a refused start"
    );

    let a = w.start("@claude start acme/widgets").await;
    // Even an invitation does not let someone outside SM_ALLOWED_USERS drive it.
    w.say(ALICE, &a.channel_id, Some(&a.thread_id), "!invite @bob")
        .await;
    let calls_before = w.sessions.calls().len();
    w.say(BOB, &a.channel_id, Some(&a.thread_id), "do something")
        .await;
    w.say(BOB, &a.channel_id, Some(&a.thread_id), "!stop").await;
    assert_eq!(
        w.sessions.calls().len(),
        calls_before,
        "bob cannot drive or stop it"
    );
    let notices = w.chat.notices_for(BOB);
    assert_eq!(
        notices.len(),
        3,
        "each refusal is said, only to bob: {notices:?}"
    );
    assert!(
        notices.iter().all(|n| n.contains("not on the list")),
        "an invitation cannot widen SM_ALLOWED_USERS: {notices:?}"
    );
    // Help stays open to anyone.
    let help = w.say(BOB, GENERAL, None, "@claude help").await;
    assert!(w.chat.replies_to(&help.post_id).join("").contains("start"));
    w.say(ALICE, &a.channel_id, Some(&a.thread_id), "go").await;
    assert_eq!(
        w.sessions.calls().last(),
        Some(&Call::Send(a.id.clone(), "go".into()))
    );
}

#[tokio::test]
async fn ended_sessions_and_queued_turns_are_explained() {
    let w = world(Access::Everyone, false).await;
    let a = w.start("@claude start acme/widgets").await;
    *w.sessions.queue_next.lock().expect("lock") = true;
    let m = w
        .say(ALICE, &a.channel_id, Some(&a.thread_id), "first")
        .await;
    assert!(
        w.chat
            .replies_to(&a.thread_id)
            .iter()
            .any(|r| r.contains("queued")),
        "queueing is said"
    );
    let _ = m;
    w.store
        .end_session(&a.id, EndReason::AgentExited, None)
        .await
        .expect("end");
    let calls_before = w.sessions.calls().len();
    w.say(ALICE, &a.channel_id, Some(&a.thread_id), "hello?")
        .await;
    assert_eq!(w.sessions.calls().len(), calls_before);
    assert!(w
        .chat
        .replies_to(&a.thread_id)
        .iter()
        .any(|r| r.contains("ended") && r.contains("agent_exited")));
}

#[tokio::test]
async fn a_burst_of_queued_messages_gets_one_notice_per_turn_edited_in_place() {
    let w = world(Access::Everyone, false).await;
    let a = w.start("@claude start acme/widgets").await;
    w.sessions.positions.lock().expect("lock").extend(1..=30);
    for i in 1..=30 {
        w.say(
            ALICE,
            &a.channel_id,
            Some(&a.thread_id),
            &format!("message {i}"),
        )
        .await;
    }
    let notices: Vec<Posted> = w
        .chat
        .posts()
        .into_iter()
        .filter(|p| p.root.as_deref() == Some(a.thread_id.as_str()) && p.text.contains("queued"))
        .collect();
    assert_eq!(notices.len(), 1, "one notice, not thirty: {notices:?}");
    let edits: Vec<String> = w
        .chat
        .updates
        .lock()
        .expect("lock")
        .iter()
        .filter(|(id, _)| *id == notices[0].id)
        .map(|(_, text)| text.clone())
        .collect();
    assert_eq!(edits.len(), 29, "edited for each later message");
    assert!(edits
        .last()
        .is_some_and(|t| t.contains("30 messages are queued")));
    // The turn ended (a message went straight through); the next queue gets a new notice.
    w.say(
        ALICE,
        &a.channel_id,
        Some(&a.thread_id),
        "delivered at once",
    )
    .await;
    w.sessions.positions.lock().expect("lock").push_back(1);
    w.say(ALICE, &a.channel_id, Some(&a.thread_id), "queued again")
        .await;
    let notices = w
        .chat
        .replies_to(&a.thread_id)
        .into_iter()
        .filter(|t| t.contains("queued"))
        .count();
    assert_eq!(notices, 2);
    // Nothing was dropped: every message reached the session.
    assert_eq!(
        w.sessions
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Send(..)))
            .count(),
        32
    );
}

#[tokio::test]
async fn sessions_per_user_and_in_all_are_capped_before_anything_is_made() {
    let w = world_full(
        Roles {
            users: Access::Everyone,
            admins: HashSet::new(),
        },
        RepoAllowlist::Any,
        false,
        session_manager::session::SessionLimits {
            per_user: 1,
            total: 2,
        },
    )
    .await;
    w.start("@claude start acme/one").await;
    let count = |w: &World| {
        w.sessions
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Start(..)))
            .count()
    };
    let posts_before = w.chat.posts().len();
    w.say(ALICE, GENERAL, None, "@claude start acme/two").await;
    assert_eq!(count(&w), 1, "alice's second session was refused");
    let refusal = w.chat.posts();
    assert!(
        refusal
            .iter()
            .any(|p| p.text.contains("SM_MAX_SESSIONS_PER_USER")),
        "told why: {refusal:?}"
    );
    assert_eq!(
        refusal.len(),
        posts_before + 1,
        "only the refusal: no channel, thread or progress post"
    );
    // bob may start one; then the bot is full for everyone.
    w.say(BOB, GENERAL, None, "@claude start acme/three").await;
    assert_eq!(count(&w), 2);
    w.say(BOB, GENERAL, None, "@claude start acme/four").await;
    assert_eq!(count(&w), 2);
    assert!(w
        .chat
        .posts()
        .iter()
        .any(|p| p.text.contains("SM_MAX_SESSIONS)")));
    // When a session ends, room is made.
    let bobs = w
        .store
        .active_sessions()
        .await
        .expect("list")
        .into_iter()
        .find(|s| s.started_by == BOB)
        .expect("bob's session");
    w.store
        .end_session(&bobs.id, EndReason::UserRequested, None)
        .await
        .expect("end");
    w.say(BOB, GENERAL, None, "@claude start acme/five").await;
    assert_eq!(count(&w), 3);
}

#[tokio::test]
async fn stop_by_id_prefix() {
    let w = world(Access::Everyone, false).await;
    let a = w.start("@claude start acme/widgets").await;
    let b = w.start("@claude start acme/gadgets").await;
    let m = w
        .say(
            ALICE,
            GENERAL,
            None,
            &format!("@claude stop {}", &b.id[..8]),
        )
        .await;
    assert_eq!(
        w.sessions.calls().last(),
        Some(&Call::Stop(b.id.clone(), ALICE.into()))
    );
    assert!(w.chat.replies_to(&m.post_id).join("").contains("Stopping"));
    let m = w.say(ALICE, GENERAL, None, "@claude stop ffff0000").await;
    assert!(w
        .chat
        .replies_to(&m.post_id)
        .join("")
        .contains("None of your active sessions"));
    let _ = a;
}

#[tokio::test]
async fn each_thread_keeps_its_order_under_load() {
    let w = world(Access::Everyone, true).await;
    let mut threads = Vec::new();
    for repo in ["a1", "a2", "a3", "a4", "a5"] {
        threads.push(w.start(&format!("@claude start acme/{repo}")).await);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let cancel = CancellationToken::new();
    let runner = tokio::spawn(w.dispatcher.clone().run(rx, cancel.clone()));
    for i in 0..300 {
        let s = &threads[i % threads.len()];
        let m = w.message(ALICE, &s.channel_id, Some(&s.thread_id), &format!("{i}"));
        tx.send(ChatEvent::Message(m)).await.expect("send");
    }
    drop(tx);
    runner.await.expect("dispatcher");
    let mut per_session: HashMap<String, Vec<usize>> = HashMap::new();
    for call in w.sessions.calls() {
        if let Call::Send(id, text) = call {
            per_session
                .entry(id)
                .or_default()
                .push(text.parse().expect("number"));
        }
    }
    assert_eq!(
        per_session.values().map(Vec::len).sum::<usize>(),
        300,
        "nothing lost"
    );
    for (i, s) in threads.iter().enumerate() {
        let got = &per_session[&s.id];
        let want: Vec<usize> = (0..300).filter(|n| n % threads.len() == i).collect();
        assert_eq!(got, &want, "thread {i} in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_thread_never_holds_up_another_and_every_refusal_is_told() {
    let w = world(Access::Everyone, false).await;
    let flooded = w.start("@claude start acme/flooded").await;
    let quiet = w.start("@claude start acme/quiet").await;
    // The flooded session's first message hangs, as a turn that never ends would.
    *w.sessions.blocked_text.lock().expect("lock") = Some("0".into());
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let cancel = CancellationToken::new();
    let runner = tokio::spawn(w.dispatcher.clone().run(rx, cancel.clone()));
    let flood = 500;
    for i in 0..flood {
        let m = w.message(
            ALICE,
            &flooded.channel_id,
            Some(&flooded.thread_id),
            &format!("{i}"),
        );
        tx.send(ChatEvent::Message(m)).await.expect("send");
    }
    // Another thread's message goes through at once.
    let started = Instant::now();
    let m = w.message(
        ALICE,
        &quiet.channel_id,
        Some(&quiet.thread_id),
        "are you there?",
    );
    tx.send(ChatEvent::Message(m)).await.expect("send");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !w
        .sessions
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Send(id, t) if id == &quiet.id && t == "are you there?"))
    {
        assert!(
            Instant::now() < deadline,
            "the quiet thread was held up by the flood"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let delay = started.elapsed();
    eprintln!("quiet thread delivered {delay:?} after the flood of {flood}");
    // Release the hung turn; everything taken is delivered in order, and every refused
    // message's sender was told.
    w.sessions.gate.add_permits(1);
    drop(tx);
    runner.await.expect("dispatcher");
    let delivered: Vec<usize> = w
        .sessions
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Send(id, text) if id == flooded.id => text.parse().ok(),
            _ => None,
        })
        .collect();
    assert!(
        delivered.windows(2).all(|p| p[0] < p[1]),
        "delivered in order"
    );
    let refusals = w
        .chat
        .notices_for(ALICE)
        .into_iter()
        .filter(|t| t.contains("Slow down"))
        .count();
    assert!(refusals > 0, "the flood was bounded");
    assert_eq!(
        delivered.len() + refusals,
        flood,
        "every message was delivered or its sender told"
    );
}

#[tokio::test]
async fn progress_is_edited_in_place_and_ends_with_what_to_do() {
    use session_manager::chat::progress::Progress;
    let chat = Arc::new(RecordingChat::default());
    let post = chat
        .post("c", Some("root"), "⏳ Starting…")
        .await
        .expect("post");
    let mut progress = Progress::new(chat.clone(), post.clone());
    progress.step("Cloning acme/widgets").await;
    progress.step("Starting the container").await;
    progress
        .failed(
            "devcontainer up exited with 1: no such image",
            "check SM_CONTAINER_IMAGE on the VM",
        )
        .await;
    let updates = chat.updates.lock().expect("lock").clone();
    assert!(
        updates.iter().all(|(id, _)| id == &post.post_id),
        "one post, edited in place"
    );
    assert_eq!(updates[0].1, "⏳ Cloning acme/widgets…");
    assert_eq!(
        updates[1].1,
        "✅ Cloning acme/widgets\n⏳ Starting the container…"
    );
    assert!(updates[2].1.starts_with(
        "✅ Cloning acme/widgets\n❌ Starting the container failed: devcontainer up exited"
    ));
    assert!(updates[2]
        .1
        .contains("**What to do:** check SM_CONTAINER_IMAGE"));
    assert_eq!(chat.posts().len(), 1, "no extra posts");

    let mut ok = Progress::new(chat.clone(), post.clone());
    ok.step("Cloning").await;
    ok.ready("Ready: say hello in this thread").await;
    let last = chat
        .updates
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("update");
    assert_eq!(last.1, "✅ Cloning\n🟢 Ready: say hello in this thread");
}

#[tokio::test]
async fn status_shows_orchestrators_with_their_children_indented() {
    let w = world(Access::Everyone, false).await;
    let orch = w.start("@claude orchestrate acme/widgets").await;
    let mut child = session_manager::store::NewSession {
        id: session_manager::store::new_session_id(),
        platform: Platform::Mattermost,
        channel_id: orch.channel_id.clone(),
        thread_id: "childthread000000000000001".into(),
        kind: SessionKind::Worker,
        parent_id: Some(orch.id.clone()),
        started_by: ALICE.into(),
        repo_host: "github.com".into(),
        repo_org: "acme".into(),
        repo_name: "widgets".into(),
        branch: None,
        worktree: Some("widgets-x".into()),
        profile: None,
    };
    let worker = w.store.create_session(&child).await.expect("child");
    child.id = session_manager::store::new_session_id();
    child.thread_id = "childthread000000000000002".into();
    child.kind = SessionKind::Reviewer;
    let reviewer = w.store.create_session(&child).await.expect("child");
    let standalone = w.start("@claude start acme/gadgets").await;
    let text =
        session_manager::dispatch::status_text(&w.store.active_sessions().await.expect("list"), 0);
    let lines: Vec<&str> = text.lines().collect();
    let at = |id: &str| {
        lines
            .iter()
            .position(|l| l.contains(&id[..8]))
            .expect("listed")
    };
    let (o, wk, rv, st) = (
        at(&orch.id),
        at(&worker.id),
        at(&reviewer.id),
        at(&standalone.id),
    );
    assert!(
        !lines[o].starts_with(' ') && !lines[st].starts_with(' '),
        "top level: {text}"
    );
    assert!(
        lines[wk].starts_with("    -") && lines[rv].starts_with("    -"),
        "children indented: {text}"
    );
    assert!(
        o < wk && o < rv,
        "children under their orchestrator: {text}"
    );
    assert!(lines[wk].contains("worker") && lines[rv].contains("reviewer"));
}

/// Runs a fresh dispatcher over the world's parts (as after a restart) until `calls` sends
/// were recorded in total, then stops it.
async fn run_until_sends(w: &World, sends: usize) {
    let dispatcher = w.dispatcher.clone();
    let (_events_tx, events) = tokio::sync::mpsc::channel(8);
    let cancel = CancellationToken::new();
    let run = tokio::spawn(dispatcher.run(events, cancel.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while w
        .sessions
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Send(..)))
        .count()
        < sends
    {
        assert!(Instant::now() < deadline, "sends: {:?}", w.sessions.calls());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel.cancel();
    run.await.expect("dispatcher");
}

#[tokio::test]
async fn messages_recorded_before_a_stop_are_handled_once_when_the_dispatcher_starts() {
    let w = world(Access::Everyone, false).await;
    let s = w.start("@claude start acme/widgets").await;
    // Recorded by the adapter, then the bot stopped before the dispatcher took them.
    let first = w.message(ALICE, &s.channel_id, Some(&s.thread_id), "first");
    let second = w.message(ALICE, &s.channel_id, Some(&s.thread_id), "second");
    let chatter = w.message(BOB, GENERAL, None, "lunch?");
    for m in [&first, &second, &chatter] {
        assert!(m.record(&w.store).await.expect("record"));
    }
    // The session queues the first (a turn runs) and has the second at once.
    *w.sessions.queue_next.lock().expect("lock") = true;
    run_until_sends(&w, 2).await;
    let sends = |calls: Vec<Call>| -> Vec<String> {
        calls
            .into_iter()
            .filter_map(|c| match c {
                Call::Send(id, text) if id == s.id => Some(text),
                _ => None,
            })
            .collect()
    };
    assert_eq!(sends(w.sessions.calls()), ["first", "second"], "in order");
    // What the session holds in its queue waits for it; the rest is handled.
    let waiting = w
        .store
        .unhandled_inbound(Platform::Mattermost, 10)
        .await
        .expect("unhandled");
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert!(waiting[0].contains(&first.post_id), "{waiting:?}");

    // Another restart before the session got to it: the queued one is handed out again, once.
    run_until_sends(&w, 3).await;
    assert_eq!(sends(w.sessions.calls()), ["first", "second", "first"]);
    assert!(w
        .store
        .unhandled_inbound(Platform::Mattermost, 10)
        .await
        .expect("unhandled")
        .is_empty());
}
