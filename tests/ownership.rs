//! Who may do what (`session_manager::access`), on the fake Mattermost through the real
//! adapter: every row of the rules table allowed and refused with its notice, private project
//! channels, channel names that collide, and starts refused before anything is made.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use session_manager::access::{Access, Roles};
use session_manager::chat::mattermost::adapter::{MattermostAdapter, MattermostConfig};
use session_manager::chat::mattermost::rest::RetryPolicy;
use session_manager::chat::mattermost::websocket::WsSettings;
use session_manager::chat::InboundMessage;
use session_manager::config::{ChannelPrivacy, RepoAllowlist, RepoPattern};
use session_manager::dispatch::{DispatchConfig, Dispatcher};
use session_manager::session::short_id;
use session_manager::store::{Platform, ProjectChannel, Session, Store};
use support::mattermost::{FakeMattermost, Post};
use support::sessions::{Call, RecordingSessions};
use support::TestDatabase;

struct World {
    fake: FakeMattermost,
    _db: TestDatabase,
    store: Store,
    sessions: Arc<RecordingSessions>,
    dispatcher: Dispatcher,
    bot: String,
    /// Allowed user; starts the sessions.
    alice: String,
    /// Allowed user; invited by alice.
    bob: String,
    /// Admin.
    carol: String,
    /// Allowed user, never invited.
    dave: String,
    /// Not in SM_ALLOWED_USERS.
    eve: String,
    /// A public channel everyone is in.
    town: String,
}

fn config(fake: &FakeMattermost, privacy: ChannelPrivacy) -> MattermostConfig {
    MattermostConfig {
        url: url::Url::parse(&fake.url()).expect("url"),
        token: secrecy::SecretString::from(fake.bot_token()),
        team_id: fake.team_id(),
        channel_category: "Claude Sessions".into(),
        channel_privacy: privacy,
        request_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_retries: 2,
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(2),
        },
        websocket: WsSettings {
            ping_interval: Duration::from_secs(5),
            read_timeout: Duration::from_secs(15),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(300),
        },
    }
}

/// A world whose bot holds `create_post_ephemeral` when `ephemeral` is set.
async fn world(privacy: ChannelPrivacy, ephemeral: bool) -> World {
    let fake = FakeMattermost::start().await;
    let [alice, bob, carol, dave, eve] =
        ["alice", "bob", "carol", "dave", "eve"].map(|name| fake.add_user(name));
    let bot = fake.bot_user_id();
    if ephemeral {
        fake.grant_ephemeral_posts(&bot);
    }
    let town = fake.create_channel(
        "town-square",
        &[&alice, &bob, &carol, &dave, &eve, &bot].map(String::as_str),
    );
    let db = TestDatabase::sqlite();
    let store = db.store().await;
    let adapter = Arc::new(
        MattermostAdapter::connect(config(&fake, privacy), store.clone())
            .await
            .expect("connect"),
    );
    let sessions = Arc::new(RecordingSessions::new(store.clone(), false));
    let dispatcher = Dispatcher::new(
        adapter,
        store.clone(),
        sessions.clone(),
        DispatchConfig {
            trigger: "@claude".into(),
            default_org: None,
            repo_host: "github.com".into(),
            roles: Roles {
                users: Access::Only(HashSet::from([alice.clone(), bob.clone(), dave.clone()])),
                admins: HashSet::from([carol.clone()]),
            },
            allowlist: RepoAllowlist::Only(vec![RepoPattern::parse("acme/*").expect("pattern")]),
            limits: Default::default(),
            permission_mode: session_manager::permission::PermissionMode::AcceptEdits,
            budgets: Default::default(),
            profiles: Default::default(),
        },
    );
    World {
        fake,
        _db: db,
        store,
        sessions,
        dispatcher,
        bot,
        alice,
        bob,
        carol,
        dave,
        eve,
        town,
    }
}

impl World {
    fn name(&self, user: &str) -> &'static str {
        [
            (&self.alice, "alice"),
            (&self.bob, "bob"),
            (&self.carol, "carol"),
            (&self.dave, "dave"),
            (&self.eve, "eve"),
        ]
        .into_iter()
        .find(|(id, _)| id.as_str() == user)
        .map_or("nobody", |(_, name)| name)
    }

    /// `user` writes `text` (stored on the fake as the web client would) and the dispatcher
    /// handles it.
    async fn say(&self, user: &str, channel: &str, root: Option<&str>, text: &str) -> Post {
        let post = self
            .fake
            .post_as(user, channel, root, text)
            .unwrap_or_else(|e| panic!("{} cannot post {text:?}: {e}", self.name(user)));
        self.dispatcher
            .handle(InboundMessage {
                platform: Platform::Mattermost,
                channel_id: channel.to_owned(),
                post_id: post.id.clone(),
                root_id: root.map(str::to_owned),
                user_id: user.to_owned(),
                user_name: Some(self.name(user).to_owned()),
                text: text.to_owned(),
                created_at: post.create_at,
            })
            .await;
        post
    }

    /// `user` writes in `session`'s thread.
    async fn in_thread(&self, user: &str, session: &Session, text: &str) {
        self.say(user, &session.channel_id, Some(&session.thread_id), text)
            .await;
    }

    /// Everyone joins `session`'s (public) channel, as anyone on the team may.
    fn everyone_joins(&self, session: &Session) {
        for user in [&self.bob, &self.carol, &self.dave, &self.eve] {
            self.fake.add_channel_member(&session.channel_id, user);
        }
    }

    /// The direct-message channel between `user` and the bot.
    fn dm(&self, user: &str) -> String {
        self.fake.direct_channel(user, &self.bot)
    }

    /// Notices only `user` saw, oldest first.
    fn notices(&self, user: &str) -> Vec<String> {
        self.fake
            .ephemeral_posts()
            .into_iter()
            .filter(|(to, _)| to == user)
            .map(|(_, text)| text)
            .collect()
    }

    /// The newest notice `user` saw.
    fn last_notice(&self, user: &str) -> String {
        self.notices(user).pop().unwrap_or_default()
    }

    /// What the bot posted (for everyone) in the thread of `root`, oldest first.
    fn bot_replies(&self, root: &str) -> Vec<String> {
        self.fake
            .thread(root)
            .into_iter()
            .filter(|p| p.user_id == self.bot && p.id != root)
            .map(|p| p.message)
            .collect()
    }

    fn last_reply(&self, root: &str) -> String {
        self.bot_replies(root).pop().unwrap_or_default()
    }

    /// Starts `repo` as `user` from the town square and returns the new session.
    async fn start(&self, user: &str, repo: &str) -> Session {
        let before: HashSet<String> = self.active().await.into_iter().map(|s| s.id).collect();
        let asked = self
            .say(user, &self.town, None, &format!("@claude start {repo}"))
            .await;
        self.active()
            .await
            .into_iter()
            .find(|s| !before.contains(&s.id))
            .unwrap_or_else(|| {
                panic!(
                    "start {repo} started nothing: {:?}",
                    self.bot_replies(&asked.id)
                )
            })
    }

    /// The name of a channel on the fake.
    fn channel_name(&self, channel_id: &str) -> String {
        self.fake
            .channel_by_id(channel_id)
            .map(|c| c.name)
            .unwrap_or_default()
    }

    async fn active(&self) -> Vec<Session> {
        self.store.active_sessions().await.expect("list")
    }

    fn calls_since(&self, n: usize) -> Vec<Call> {
        self.sessions.calls().into_iter().skip(n).collect()
    }
}

/// Expected refusal texts (the rules table's "refused with the right notice").
fn talk_refusal(owner: &str) -> String {
    format!("Your message was not passed to Claude: only this session's owner @{owner}, the people they invited and admins can talk to it. Ask @{owner} to `!invite` you.")
}
fn look_refusal(owner: &str) -> String {
    format!("Only this session's owner @{owner}, the people they invited and admins can do that.")
}
fn manage_refusal(owner: &str, session: &Session) -> String {
    format!(
        "Only this session's owner @{owner} or an admin can do that to session `{}`.",
        short_id(&session.id)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_rules_table_is_allowed_and_refused_with_its_notice() {
    // A public project channel: anyone can write in the thread, which is the case to refuse.
    let w = world(ChannelPrivacy::Public, true).await;
    let (alice, bob, carol, dave, eve) = (&w.alice, &w.bob, &w.carol, &w.dave, &w.eve);
    let a = w.start(alice, "acme/widgets").await;
    assert_eq!(a.started_by, *alice, "the owner is stored");
    w.everyone_joins(&a);

    // Row: reply to the agent in the thread — owner, participants, admins.
    let n = w.sessions.calls().len();
    w.in_thread(alice, &a, "from alice").await;
    w.in_thread(carol, &a, "from carol").await;
    w.in_thread(dave, &a, "from dave").await;
    w.in_thread(bob, &a, "from bob, uninvited").await;
    assert_eq!(
        w.calls_since(n),
        [
            Call::Send(a.id.clone(), "from alice".into()),
            Call::Send(a.id.clone(), "from carol".into()),
        ],
        "outsiders' text never reaches the agent"
    );
    assert_eq!(w.notices(dave), [talk_refusal("alice")]);
    assert_eq!(w.notices(bob), [talk_refusal("alice")]);
    assert!(
        !w.bot_replies(&a.thread_id)
            .iter()
            .any(|r| r.contains("not passed")),
        "refusals are not posted for everyone"
    );

    // Invitation: bob becomes a participant (and a channel member, for private channels).
    w.in_thread(alice, &a, "!invite @bob").await;
    assert!(
        w.last_reply(&a.thread_id)
            .starts_with("@bob can now talk to this session (invited by @alice)"),
        "{:?}",
        w.bot_replies(&a.thread_id)
    );
    assert!(w.fake.channel_members(&a.channel_id).contains(bob));
    let n = w.sessions.calls().len();
    w.in_thread(bob, &a, "from bob, invited").await;
    assert_eq!(
        w.calls_since(n),
        [Call::Send(a.id.clone(), "from bob, invited".into())]
    );

    // Row: compact, context, status of this session — owner, participants, admins.
    for user in [alice, bob, carol] {
        let n = w.sessions.calls().len();
        w.in_thread(user, &a, "!compact").await;
        assert_eq!(w.calls_since(n), [Call::Compact(a.id.clone())]);
        w.in_thread(user, &a, "!context").await;
        assert!(w.last_reply(&a.thread_id).contains("messages:"));
        w.in_thread(user, &a, "!status").await;
        let status = w.last_reply(&a.thread_id);
        assert!(
            status.contains(short_id(&a.id)) && status.contains("acme/widgets"),
            "{status}"
        );
    }
    let n = w.sessions.calls().len();
    let replies = w.bot_replies(&a.thread_id).len();
    for cmd in ["!compact", "!context", "!status"] {
        w.in_thread(dave, &a, cmd).await;
        assert_eq!(w.last_notice(dave), look_refusal("alice"), "{cmd}");
    }
    assert_eq!(w.calls_since(n), []);
    assert_eq!(
        w.bot_replies(&a.thread_id).len(),
        replies,
        "nothing said for all"
    );

    // Row: stop, clear, restart, invite, kick — owner and admins only.
    for user in [bob, dave] {
        for cmd in [
            "!stop",
            "!clear",
            "!restart",
            "!invite @dave",
            "!kick @bob",
            "@claude clear",
        ] {
            w.in_thread(user, &a, cmd).await;
            assert_eq!(
                w.last_notice(user),
                manage_refusal("alice", &a),
                "{} {cmd}",
                w.name(user)
            );
        }
    }
    assert_eq!(w.calls_since(n), [], "refused commands did nothing");
    assert_eq!(
        w.store.participants(&a.id).await.expect("participants"),
        std::slice::from_ref(bob),
        "refused invite and kick changed nothing"
    );
    w.in_thread(carol, &a, "!clear").await;
    w.in_thread(alice, &a, "!restart").await;
    w.in_thread(carol, &a, "!invite @dave").await;
    w.in_thread(alice, &a, "!kick @dave").await;
    assert_eq!(
        w.calls_since(n),
        [Call::Clear(a.id.clone()), Call::Restart(a.id.clone())]
    );
    assert!(w
        .last_reply(&a.thread_id)
        .contains("@dave can no longer talk to this session"));

    // Row: top-level status — own and invited sessions; admins add `status all`.
    let d = w.start(dave, "acme/gadgets").await;
    let status_in = |user: &str| {
        let user = user.to_owned();
        let w = &w;
        async move {
            let dm = w.dm(&user);
            let asked = w.say(&user, &dm, None, "@claude status").await;
            w.last_reply(&asked.id)
        }
    };
    let of_alice = status_in(alice).await;
    assert!(
        of_alice.contains(short_id(&a.id)) && !of_alice.contains(short_id(&d.id)),
        "{of_alice}"
    );
    let of_bob = status_in(bob).await;
    assert!(
        of_bob.contains(short_id(&a.id)) && !of_bob.contains(short_id(&d.id)),
        "{of_bob}"
    );
    let of_dave = status_in(dave).await;
    assert!(
        !of_dave.contains(short_id(&a.id)) && of_dave.contains(short_id(&d.id)),
        "{of_dave}"
    );
    let of_carol = status_in(carol).await;
    assert_eq!(
        of_carol, "No active sessions.",
        "an admin's own list is their own"
    );
    let dm = w.dm(carol);
    let asked = w.say(carol, &dm, None, "@claude status all").await;
    let all = w.last_reply(&asked.id);
    assert!(
        all.contains(short_id(&a.id)) && all.contains(short_id(&d.id)),
        "{all}"
    );
    let dm = w.dm(bob);
    let asked = w.say(bob, &dm, None, "@claude status all").await;
    assert!(w.bot_replies(&asked.id).is_empty());
    assert_eq!(
        w.last_notice(bob),
        "Only admins can list every session (`status all`); `status` lists yours and those you were invited to."
    );

    // Row: top-level `stop <prefix>` — owner or admin, from anywhere.
    let n = w.sessions.calls().len();
    let prefix = short_id(&a.id).to_owned();
    let dm = w.dm(bob);
    w.say(bob, &dm, None, &format!("@claude stop {prefix}"))
        .await;
    assert_eq!(
        w.last_notice(bob),
        manage_refusal("alice", &a),
        "a participant may not stop it"
    );
    let dm = w.dm(dave);
    let asked = w
        .say(dave, &dm, None, &format!("@claude stop {prefix}"))
        .await;
    assert_eq!(
        w.last_reply(&asked.id),
        format!("None of your active sessions has an id starting with `{prefix}`; `@claude status` lists them."),
        "an outsider learns nothing about the session"
    );
    assert_eq!(w.calls_since(n), []);
    let dm = w.dm(carol);
    let asked = w
        .say(carol, &dm, None, &format!("@claude stop {prefix}"))
        .await;
    assert!(w.last_reply(&asked.id).starts_with("Stopping session"));
    let dm = w.dm(alice);
    w.say(alice, &dm, None, &format!("@claude stop {prefix}"))
        .await;
    assert_eq!(
        w.calls_since(n),
        [
            Call::Stop(a.id.clone(), carol.clone()),
            Call::Stop(a.id.clone(), alice.clone()),
        ]
    );

    // Row: start / orchestrate — allowed users, on allowed repositories.
    let sessions_before = w.active().await.len();
    let asked = w
        .say(eve, &w.town, None, "@claude start acme/widgets2")
        .await;
    assert_eq!(
        w.last_notice(eve),
        "Sorry, you are not on the list of people who may use this bot. Ask an administrator to add you to SM_ALLOWED_USERS."
    );
    assert!(w.bot_replies(&asked.id).is_empty());
    for text in ["@claude start evil/tool", "@claude orchestrate evil/tool"] {
        let asked = w.say(alice, &w.town, None, text).await;
        assert_eq!(
            w.last_reply(&asked.id),
            "`evil/tool` is not among the repositories sessions may use here (`acme/*`). Ask an administrator to add it to SM_ALLOWED_REPOS.",
            "{text}"
        );
    }
    assert_eq!(w.active().await.len(), sessions_before);
    assert!(w.fake.channel_by_name("evil-tool").is_none());
    w.say(dave, &w.town, None, "@claude orchestrate acme/orchestrated")
        .await;
    assert!(
        w.active().await.iter().any(|s| s.started_by == *dave
            && s.kind == session_manager::store::SessionKind::Orchestrator
            && s.repo_name == "orchestrated"),
        "an allowed user orchestrates an allowed repository"
    );

    // After a kick, the participant is an outsider again.
    w.in_thread(alice, &a, "!kick @bob").await;
    let n = w.sessions.calls().len();
    w.in_thread(bob, &a, "still there?").await;
    assert_eq!(w.calls_since(n), []);
    assert_eq!(w.last_notice(bob), talk_refusal("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ephemeral_permission_a_notice_names_its_reader_in_the_thread() {
    let w = world(ChannelPrivacy::Public, false).await;
    let a = w.start(&w.alice, "acme/widgets").await;
    w.everyone_joins(&a);
    let n = w.sessions.calls().len();
    w.in_thread(&w.dave, &a, "let me in").await;
    assert_eq!(w.calls_since(n), []);
    assert!(
        w.notices(&w.dave).is_empty(),
        "the server refused the ephemeral post"
    );
    assert_eq!(
        w.last_reply(&a.thread_id),
        format!("@dave: {}", talk_refusal("alice")),
        "the refusal still reaches its reader"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_channels_are_private_with_owner_and_participants_and_admins_join_on_request() {
    let w = world(ChannelPrivacy::Private, true).await;
    let a = w.start(&w.alice, "acme/widgets").await;
    let channel = w.fake.channel_by_name("acme-widgets").expect("channel");
    assert_eq!(channel.id, a.channel_id);
    assert_eq!(channel.channel_type, "P", "private by default");
    let members: HashSet<String> = w.fake.channel_members(&a.channel_id).into_iter().collect();
    assert_eq!(members, HashSet::from([w.alice.clone(), w.bot.clone()]));
    // dave cannot read it.
    assert!(
        w.fake
            .post_as(&w.dave, &a.channel_id, Some(&a.thread_id), "peek")
            .is_err(),
        "a non-member cannot write in a private channel"
    );

    // Participants become members when invited.
    w.in_thread(&w.alice, &a, "!invite @bob").await;
    assert!(w.fake.channel_members(&a.channel_id).contains(&w.bob));
    w.in_thread(&w.bob, &a, "hello from bob").await;

    // An admin joins on request, from a DM, by id prefix.
    let dm = w.dm(&w.carol);
    w.say(
        &w.carol,
        &dm,
        None,
        &format!("@claude join {}", short_id(&a.id)),
    )
    .await;
    assert!(w.fake.channel_members(&a.channel_id).contains(&w.carol));
    assert!(
        w.last_notice(&w.carol)
            .contains(&format!("/_redirect/pl/{}", a.thread_id)),
        "{:?}",
        w.notices(&w.carol)
    );
    // Someone else cannot.
    let dm = w.dm(&w.dave);
    let asked = w
        .say(
            &w.dave,
            &dm,
            None,
            &format!("@claude join {}", short_id(&a.id)),
        )
        .await;
    assert!(w
        .last_reply(&asked.id)
        .starts_with("None of your active sessions"));
    assert!(!w.fake.channel_members(&a.channel_id).contains(&w.dave));

    // An existing channel keeps its type: a recorded public channel stays public.
    let old = w.fake.create_channel("acme-gadgets", &[&w.bot]);
    w.store
        .upsert_project_channel(&ProjectChannel {
            platform: Platform::Mattermost,
            repo_slug: "acme/gadgets".into(),
            team_id: w.fake.team_id(),
            channel_id: old.clone(),
            channel_name: "acme-gadgets".into(),
            created_at: 0,
        })
        .await
        .expect("record");
    let g = w.start(&w.alice, "acme/gadgets").await;
    assert_eq!(g.channel_id, old);
    assert_eq!(
        w.fake
            .channel_by_name("acme-gadgets")
            .expect("channel")
            .channel_type,
        "O"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_is_never_adopted_by_name() {
    let w = world(ChannelPrivacy::Private, true).await;
    // `acme/widgets_` and `acme/widgets` fold to the same name.
    let first = w.start(&w.alice, "acme/widgets_").await;
    let second = w.start(&w.alice, "acme/widgets").await;
    assert_ne!(first.channel_id, second.channel_id);
    let names = [&first, &second].map(|s| w.channel_name(&s.channel_id));
    assert_eq!(names[0], "acme-widgets");
    assert!(
        names[1].starts_with("acme-widgets-") && names[1].len() == "acme-widgets-".len() + 6,
        "{names:?}"
    );
    // Each repository keeps finding its own channel.
    let again = w.start(&w.alice, "acme/widgets --worktree").await;
    assert_eq!(again.channel_id, second.channel_id);

    // A channel someone else made with the would-be name is not used.
    let squatter = w.fake.create_channel("acme-gadgets", &[&w.dave, &w.bot]);
    let g = w.start(&w.alice, "acme/gadgets").await;
    assert_ne!(g.channel_id, squatter);
    assert!(
        !w.fake.channel_members(&squatter).contains(&w.alice),
        "nobody was pulled into the squatter's channel"
    );

    // Long names stay within Mattermost's rules.
    let long = format!("acme/{}", "Long_Repo.Name-".repeat(6));
    let l = w.start(&w.alice, &long).await;
    let name = w.channel_name(&l.channel_id);
    assert!(name.len() <= 64, "{name}");
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
        "{name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_starts_leave_no_channel_thread_or_record() {
    let w = world(ChannelPrivacy::Private, true).await;
    let a = w.start(&w.alice, "acme/widgets").await;
    w.sessions.forget_repo("acme/nothing");
    let posts_before = w.fake.posts().len();
    let channels_before = w.fake.channel_count();
    let sessions_before = w.store.unended_sessions().await.expect("list").len();
    let cases = [
        (
            "@claude start acme/widgets",
            format!(
                "The main clone of `acme/widgets` is in use by session `{}`. Start with `--worktree` to work in a worktree of your own, e.g. `@claude start acme/widgets --worktree`.",
                short_id(&a.id)
            ),
        ),
        (
            "@claude start acme/nothing",
            "`acme/nothing` does not exist or cannot be read with the bot's token. Check the name (`org/repo`), or ask an administrator whether the bot may read it.".to_owned(),
        ),
        (
            "@claude orchestrate other/thing",
            "`other/thing` is not among the repositories sessions may use here (`acme/*`). Ask an administrator to add it to SM_ALLOWED_REPOS.".to_owned(),
        ),
    ];
    for (text, expected) in &cases {
        let asked = w.say(&w.bob, &w.town, None, text).await;
        assert_eq!(
            w.bot_replies(&asked.id),
            std::slice::from_ref(expected),
            "{text}"
        );
    }
    assert_eq!(
        w.fake.posts().len(),
        posts_before + 2 * cases.len(),
        "only the requests and their answers were posted: no anchor, no progress"
    );
    assert_eq!(w.fake.channel_count(), channels_before, "no channel made");
    assert_eq!(
        w.store.unended_sessions().await.expect("list").len(),
        sessions_before,
        "no session recorded"
    );
    assert!(w
        .store
        .project_channel(Platform::Mattermost, "acme/nothing")
        .await
        .expect("read")
        .is_none());
}
