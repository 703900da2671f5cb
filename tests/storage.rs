//! The storage suite: every test runs against PostgreSQL and against SQLite.

mod support;

use std::collections::HashSet;

use session_manager::store::*;
use support::{new_session, TestDatabase};

/// Instantiates each test function for both backends.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::TestDatabase::postgres().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::TestDatabase::sqlite();
                    super::$name(&db).await;
                }
            )*
        }
    };
}

on_both_backends!(
    migrations_run_twice_without_harm,
    session_lifecycle,
    a_thread_anchors_one_session,
    id_prefix_lookup_is_literal,
    children_of_an_orchestrator,
    concurrent_stop_claims_succeed_once,
    concurrent_decisions_succeed_once,
    approval_requests_flow,
    expired_requests_cannot_be_decided,
    project_channels,
    audit_log_appends_in_order,
    locks_are_exclusive_and_survive_reconnect,
    containers_and_their_users,
    unknown_stored_values_are_errors_not_panics,
    inbound_posts_are_claimed_once_and_keep_a_cursor,
    recorded_messages_wait_until_handled_and_are_handed_out_again,
    a_budget_card_raises_the_cap_once_and_the_mode_is_kept,
    spawns_are_claimed_once_within_the_window,
    teams_references_survive_a_new_pool_and_keep_known_fields,
    grants_live_end_and_uncover_domains,
    hibernation_is_stored_woken_and_ends_with_the_session,
    a_sessions_profile_is_recorded_whole,
    an_instance_key_is_made_once_and_kept,
    the_transcript_keeps_each_post_as_it_is_now_and_forgets_old_threads,
);

/// Pruning drops the versions of a post or card between its first (where a page places it)
/// and its latest (what it shows), never what people wrote, and, with a cutoff, every event of
/// threads whose session ended before it; live threads and recently ended ones keep their
/// events in order.
async fn the_transcript_keeps_each_post_as_it_is_now_and_forgets_old_threads(db: &TestDatabase) {
    let store = db.store().await;
    let old = store
        .create_session(&new_session("old-thread"))
        .await
        .expect("create");
    let recent = store
        .create_session(&new_session("recent-thread"))
        .await
        .expect("create");
    store
        .create_session(&new_session("live-thread"))
        .await
        .expect("create");
    for s in [&old, &recent] {
        store
            .end_session(&s.id, EndReason::UserRequested, None)
            .await
            .expect("end");
    }
    db.execute_raw(&format!(
        "UPDATE sessions SET ended_at = 1000 WHERE id = '{}'",
        old.id
    ))
    .await;
    let add = |thread: &'static str, post: &'static str, kind: TranscriptKind, text: &str| {
        let store = store.clone();
        let body = serde_json::json!({ "text": text }).to_string();
        async move {
            store
                .append_transcript(thread, post, kind, None, &body, now_ms())
                .await
                .expect("append")
                .expect("new")
                .id
        }
    };
    for thread in ["old-thread", "recent-thread"] {
        add(thread, "gone", TranscriptKind::Post, "a post").await;
    }
    let anchor = add("live-thread", "anchor", TranscriptKind::Post, "Session").await;
    let starting = add("live-thread", "progress", TranscriptKind::Post, "Starting").await;
    let asked = add("live-thread", "card", TranscriptKind::Card, "Approve?").await;
    let wrote = add("live-thread", "in-1", TranscriptKind::Inbound, "hello").await;
    add("live-thread", "progress", TranscriptKind::Post, "Cloning").await;
    add("live-thread", "progress", TranscriptKind::Post, "Pulling").await;
    let progress = add("live-thread", "progress", TranscriptKind::Post, "Ready").await;
    let card = add("live-thread", "card", TranscriptKind::Card, "Approved").await;

    let pruned = store.prune_transcript(Some(5_000)).await.expect("prune");
    assert_eq!(
        pruned,
        2 + 1,
        "the progress post's two middle versions, the old thread's post"
    );
    let kept: Vec<(i64, String)> = store
        .transcript_after("live-thread", 0, 100)
        .await
        .expect("read")
        .into_iter()
        .map(|e| (e.id, e.post_id))
        .collect();
    assert_eq!(
        kept,
        [
            (anchor, "anchor".to_owned()),
            (starting, "progress".to_owned()),
            (asked, "card".to_owned()),
            (wrote, "in-1".to_owned()),
            (progress, "progress".to_owned()),
            (card, "card".to_owned()),
        ]
    );
    assert!(store
        .transcript_after("old-thread", 0, 100)
        .await
        .expect("read")
        .is_empty());
    assert_eq!(
        store
            .transcript_after("recent-thread", 0, 100)
            .await
            .expect("read")
            .len(),
        1,
        "ended after the cutoff: kept"
    );
    assert_eq!(
        store.prune_transcript(None).await.expect("again"),
        0,
        "nothing left to prune; without a cutoff ended threads stay"
    );
    assert_eq!(
        store
            .transcript_latest("progress")
            .await
            .expect("latest")
            .map(|e| e.id),
        Some(progress)
    );
}

/// The first candidate for a name is kept; later and concurrent callers get it back, and other
/// names are separate.
async fn an_instance_key_is_made_once_and_kept(db: &TestDatabase) {
    let store = db.store().await;
    assert_eq!(
        store
            .instance_key("callback_secret", "first")
            .await
            .expect("make"),
        "first"
    );
    assert_eq!(
        store
            .instance_key("callback_secret", "second")
            .await
            .expect("read"),
        "first",
        "a later start reads the kept key"
    );
    let racing = futures_util::future::join_all((0..8).map(|i| {
        let store = store.clone();
        async move {
            store
                .instance_key("raced", &format!("candidate {i}"))
                .await
                .expect("race")
        }
    }))
    .await;
    assert!(
        racing.iter().all(|k| k == &racing[0]),
        "every racer gets the stored key: {racing:?}"
    );
    assert_eq!(
        store.instance_key("other", "third").await.expect("other"),
        "third"
    );
}

/// The profile a session starts with is stored with it and read back as it was; a stored
/// profile that is not one is an error, not a panic or a session without limits.
async fn a_sessions_profile_is_recorded_whole(db: &TestDatabase) {
    let store = db.store().await;
    let profiles = session_manager::profile::Profiles::parse(
        "[profile.locked]\nmodel = \"sonnet\"\ndenied_tools = [\"Bash\", \"Bash(curl:*)\"]\nbudget_usd = 0.5\nidle_secs = 60\n",
    )
    .expect("valid");
    let locked = profiles.get("locked").expect("locked").clone();
    let mut new = new_session("profile-thread");
    new.profile = Some(locked.clone());
    let s = store.create_session(&new).await.expect("create");
    assert_eq!(s.profile.as_ref(), Some(&locked));
    let read = store.session(&s.id).await.expect("read").expect("row");
    assert_eq!(read.profile, Some(locked));
    let plain = store
        .create_session(&new_session("plain-thread"))
        .await
        .expect("create");
    assert_eq!(plain.profile, None);
    db.execute_raw(&format!(
        "UPDATE sessions SET profile = '{{\"denied\": 1}}' WHERE id = '{}'",
        s.id
    ))
    .await;
    let err = store.session(&s.id).await.expect_err("corrupt");
    assert!(err.to_string().contains("sessions.profile"), "{err}");
}

/// A hibernating session is idle and active (listed, stoppable) with the time it went to
/// sleep; any move to an active state wakes it; `max_age` is a stored end reason.
async fn hibernation_is_stored_woken_and_ends_with_the_session(db: &TestDatabase) {
    let store = db.store().await;
    let s = store.create_session(&new_session("th")).await.expect("s");
    assert_eq!(s.hibernated_at, None);
    assert!(!s.is_hibernating());
    assert!(store.set_hibernating(&s.id, 5_000).await.expect("sleep"));
    let asleep = store.session(&s.id).await.expect("read").expect("row");
    assert_eq!(asleep.state(), SessionState::Idle);
    assert_eq!(asleep.hibernated_at, Some(5_000));
    assert!(asleep.is_hibernating());
    assert_eq!(
        store.active_sessions().await.expect("list").len(),
        1,
        "a hibernating session is still active"
    );
    assert!(store
        .set_session_state(&s.id, SessionState::Running)
        .await
        .expect("wake"));
    let awake = store.session(&s.id).await.expect("read").expect("row");
    assert_eq!(awake.hibernated_at, None, "a state change wakes it");
    assert!(store.set_hibernating(&s.id, 6_000).await.expect("sleep"));
    let claimed = store.claim_stop(&s.id).await.expect("claim").expect("won");
    assert!(
        !claimed.is_hibernating(),
        "a stopping session does not sleep"
    );
    assert!(
        !store.set_hibernating(&s.id, 7_000).await.expect("sleep"),
        "stopping is final"
    );
    assert!(store
        .end_session(&s.id, EndReason::MaxAge, Some("older than 5s"))
        .await
        .expect("end"));
    let ended = store.session(&s.id).await.expect("read").expect("row");
    assert_eq!(ended.hibernated_at, None);
    assert_eq!(ended.end().expect("ended").reason, EndReason::MaxAge);
}

fn grant_of(session: &Session, domain: &str, expires_at: Option<i64>) -> NewGrant {
    NewGrant {
        domain: domain.into(),
        session_id: session.id.clone(),
        scope: if expires_at.is_some() {
            GrantScope::Ttl
        } else {
            GrantScope::Session
        },
        request_id: None,
        source_grant_id: None,
        granted_by_id: Some("u1".into()),
        granted_by_name: Some("alice".into()),
        granted_at: 1_000,
        expires_at,
    }
}

/// Grants: which are live, how they end (expiry, session end, source end, revocation), and
/// which domains the bot added are left uncovered for removal; closed requests of ended
/// sessions; the repair request the bot decides itself.
async fn grants_live_end_and_uncover_domains(db: &TestDatabase) {
    let store = db.store().await;
    let a = store.create_session(&new_session("ta")).await.expect("a");
    let b = store.create_session(&new_session("tb")).await.expect("b");
    let ttl = store
        .insert_grant(&grant_of(&a, "pypi.org", Some(5_000)))
        .await
        .expect("grant");
    assert!(ttl.is_live(4_999) && !ttl.is_live(5_000));
    let whole = store
        .insert_grant(&grant_of(&b, "crates.io", None))
        .await
        .expect("grant");
    let shared = store
        .insert_grant(&NewGrant {
            source_grant_id: Some(whole.id.clone()),
            ..grant_of(&a, "crates.io", None)
        })
        .await
        .expect("shared");
    // a's own grant first; another live session's when a has none.
    let found = store
        .live_grant_for_domain("crates.io", &a.id, 2_000)
        .await
        .expect("lookup")
        .expect("live");
    assert_eq!(found.id, shared.id);
    let found = store
        .live_grant_for_domain("pypi.org", &b.id, 2_000)
        .await
        .expect("lookup")
        .expect("live");
    assert_eq!(found.id, ttl.id);
    assert!(store
        .live_grant_for_domain("pypi.org", &b.id, 6_000)
        .await
        .expect("lookup")
        .is_none());
    assert_eq!(
        store
            .live_grants(Some(&a.id), 2_000)
            .await
            .expect("list")
            .len(),
        2
    );
    assert_eq!(store.live_grants(None, 2_000).await.expect("list").len(), 3);

    // Domains the bot added: only uncovered ones are due for removal.
    for d in ["pypi.org", "crates.io", "orphan.example.org"] {
        store
            .record_firewall_domain(d, 1_000)
            .await
            .expect("record");
    }
    store
        .record_firewall_domain("pypi.org", 1_500)
        .await
        .expect("again");
    assert_eq!(
        store
            .firewall_domains_to_remove(2_000, None)
            .await
            .expect("due"),
        vec!["orphan.example.org".to_owned()]
    );
    // An approval waiting for the firewall covers its domain too.
    let (req, _) = store
        .open_approval(&a.id, "orphan.example.org", 2_000, 90_000)
        .await
        .expect("open");
    store
        .decide_approval(
            &req.id,
            Decision::Approve,
            GrantScope::Session,
            "u1",
            "alice",
            2_100,
        )
        .await
        .expect("decide");
    assert!(store
        .firewall_domains_to_remove(2_200, None)
        .await
        .expect("due")
        .is_empty());
    let decided = store.approval(&req.id).await.expect("read").expect("row");
    assert_eq!(decided.grant_scope, Some(GrantScope::Session));

    // Time ends the TTL grant; nothing else.
    let ended = store.end_due_grants(5_000).await.expect("end");
    assert_eq!(ended.len(), 1);
    assert_eq!(
        (ended[0].id.as_str(), ended[0].end_reason),
        (ttl.id.as_str(), Some(GrantEnd::Expired))
    );
    assert!(
        store.end_due_grants(5_001).await.expect("again").is_empty(),
        "ended once"
    );
    store
        .mark_approval_applied(&req.id, 5_100)
        .await
        .expect("applied");
    assert_eq!(
        store
            .firewall_domains_to_remove(6_000, Some("pypi.org"))
            .await
            .expect("due"),
        vec!["pypi.org".to_owned()]
    );
    // A failed removal waits for its next attempt.
    store
        .record_firewall_removal_failed("pypi.org", "firewall down", 9_000)
        .await
        .expect("failed");
    assert_eq!(
        store
            .firewall_removal_attempts("pypi.org")
            .await
            .expect("n"),
        1
    );
    assert!(store
        .firewall_domains_to_remove(8_999, Some("pypi.org"))
        .await
        .expect("due")
        .is_empty());
    store
        .forget_firewall_domain("pypi.org")
        .await
        .expect("forget");
    assert!(store
        .firewall_domains_to_remove(9_000, Some("pypi.org"))
        .await
        .expect("due")
        .is_empty());

    // b ends: its grant ends, but not the grant a shared from it (a grant of its own, until a
    // ends); a pending request of b is closed.
    let (pending, _) = store
        .open_approval(&b.id, "npmjs.org", 7_000, 90_000)
        .await
        .expect("open");
    store
        .end_session(&b.id, EndReason::UserRequested, None)
        .await
        .expect("end");
    let closed = store
        .close_approvals_of_ended_sessions(8_000)
        .await
        .expect("close");
    assert_eq!(closed.len(), 1);
    assert_eq!(
        (closed[0].id.as_str(), closed[0].state),
        (pending.id.as_str(), ApprovalState::Closed)
    );
    let ended = store.end_due_grants(8_000).await.expect("end");
    let reasons: HashSet<(String, Option<GrantEnd>)> =
        ended.into_iter().map(|g| (g.id, g.end_reason)).collect();
    assert_eq!(
        reasons,
        HashSet::from([(whole.id.clone(), Some(GrantEnd::SessionEnded))])
    );
    let kept = store
        .live_grant_for_domain("crates.io", &a.id, 8_000)
        .await
        .expect("lookup")
        .expect("a keeps its shared grant");
    assert_eq!(kept.id, shared.id);
    assert!(
        store
            .live_grant_for_domain("crates.io", &b.id, 8_000)
            .await
            .expect("lookup")
            .is_some_and(|g| g.session_id == a.id),
        "an ended session's grant is never offered"
    );

    // Revocation ends a's live grant for a domain, once.
    let again = store
        .insert_grant(&grant_of(&a, "example.org", Some(99_000)))
        .await
        .expect("grant");
    let revoked = store
        .revoke_grants(&a.id, "example.org", 9_000)
        .await
        .expect("revoke");
    assert_eq!(revoked.len(), 1);
    assert_eq!(
        (revoked[0].id.as_str(), revoked[0].end_reason),
        (again.id.as_str(), Some(GrantEnd::Revoked))
    );
    assert!(store
        .revoke_grants(&a.id, "example.org", 9_001)
        .await
        .expect("again")
        .is_empty());

    // A repair request: approved at once, due for the firewall, reused while it waits.
    let source = store
        .insert_grant(&grant_of(&a, "docs.rs", None))
        .await
        .expect("grant");
    let repair = store
        .open_grant_repair(&a.id, &source, 10_000)
        .await
        .expect("repair");
    assert_eq!(repair.state, ApprovalState::Approved);
    assert_eq!(repair.source_grant_id.as_deref(), Some(source.id.as_str()));
    assert_eq!(repair.decided_by_name.as_deref(), Some("alice"));
    let twice = store
        .open_grant_repair(&a.id, &source, 10_001)
        .await
        .expect("repair");
    assert_eq!(twice.id, repair.id);
    assert!(store
        .approvals_due_for_firewall(10_000)
        .await
        .expect("due")
        .iter()
        .any(|r| r.id == repair.id));
    assert_eq!(store.pending_approvals(&a.id).await.expect("count"), 0);
}

async fn migrations_run_twice_without_harm(db: &TestDatabase) {
    let store = db.store().await;
    let session = store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    store.migrate().await.expect("second migrate");
    store.migrate().await.expect("third migrate");
    let again = db.store().await; // a new pool migrating the same database
    let found = again
        .session(&session.id)
        .await
        .expect("read")
        .expect("still there");
    assert_eq!(found, session);
}

async fn session_lifecycle(db: &TestDatabase) {
    let store = db.store().await;
    let s = store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    assert_eq!(s.state(), SessionState::Starting);
    assert!(s.end().is_none());
    assert_eq!(s.id.len(), 36);
    assert_eq!(s.repo_slug(), "acme/widgets");
    assert_eq!(s.stats, SessionStats::default());

    let by_thread = store
        .session_by_thread(Platform::Mattermost, "channel0000000000000000001", "t1")
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!(by_thread.id, s.id);
    assert!(store
        .session_by_thread(Platform::Teams, "channel0000000000000000001", "t1")
        .await
        .expect("lookup")
        .is_none());

    assert!(store
        .set_session_state(&s.id, SessionState::Running)
        .await
        .expect("state"));
    assert!(
        store
            .set_session_state(&s.id, SessionState::Ended)
            .await
            .is_err(),
        "ending needs end_session"
    );
    store
        .set_session_container(
            &s.id,
            Some("c0ffee"),
            Some("/home/claude/repos/github.com/acme/widgets"),
            Some(&ContainerDetails {
                session_dir: "/home/claude/.local/share/session-manager/sessions/x".into(),
                user: "claude".into(),
                folder: "/workspaces/widgets".into(),
            }),
        )
        .await
        .expect("container");
    store
        .set_agent_session_id(&s.id, Some("conv-1"))
        .await
        .expect("agent id");
    store
        .add_usage(
            &s.id,
            &UsageDelta {
                messages: 1,
                compactions: 0,
                input_tokens: 100,
                output_tokens: 20,
                context_tokens: Some(1500),
                cost_usd: 0.25,
            },
            1_000,
        )
        .await
        .expect("usage");
    store
        .add_usage(
            &s.id,
            &UsageDelta {
                messages: 1,
                compactions: 1,
                input_tokens: 50,
                output_tokens: 5,
                context_tokens: None,
                cost_usd: 0.5,
            },
            2_000,
        )
        .await
        .expect("usage");
    let s2 = store.session(&s.id).await.expect("read").expect("found");
    assert_eq!(s2.state(), SessionState::Running);
    assert_eq!(s2.container_id.as_deref(), Some("c0ffee"));
    let details = s2.container.clone().expect("details recorded");
    assert_eq!(
        (details.user.as_str(), details.folder.as_str()),
        ("claude", "/workspaces/widgets")
    );
    assert_eq!(s2.agent_session_id.as_deref(), Some("conv-1"));
    assert_eq!(
        s2.stats,
        SessionStats {
            message_count: 2,
            compaction_count: 1,
            input_tokens: 150,
            output_tokens: 25,
            context_tokens: 1500,
            cost_usd: 0.75,
        }
    );
    assert_eq!(s2.last_activity_at, 2_000);
    assert_eq!(store.active_sessions().await.expect("list").len(), 1);

    let claimed = store.claim_stop(&s.id).await.expect("claim").expect("won");
    assert_eq!(claimed.state(), SessionState::Stopping);
    assert!(store.active_sessions().await.expect("list").is_empty());
    assert_eq!(
        store.unended_sessions().await.expect("list").len(),
        1,
        "stopping must be recovered"
    );
    assert!(
        !store
            .set_session_state(&s.id, SessionState::Idle)
            .await
            .expect("state"),
        "stopping is final"
    );

    assert!(store
        .end_session(&s.id, EndReason::UserRequested, Some("stopped by @alice"))
        .await
        .expect("end"));
    assert!(!store
        .end_session(&s.id, EndReason::Error, None)
        .await
        .expect("end twice"));
    let ended = store
        .session(&s.id)
        .await
        .expect("read")
        .expect("rows are never deleted");
    assert_eq!(ended.state(), SessionState::Ended);
    let end = ended.end().expect("end recorded");
    assert_eq!(
        end.reason,
        EndReason::UserRequested,
        "the first end reason stays"
    );
    assert_eq!(end.detail.as_deref(), Some("stopped by @alice"));
    assert!(store.unended_sessions().await.expect("list").is_empty());
    assert!(store.claim_stop(&s.id).await.expect("claim").is_none());
    assert!(matches!(
        store
            .end_session("no-such-session", EndReason::Error, None)
            .await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn a_thread_anchors_one_session(db: &TestDatabase) {
    let store = db.store().await;
    store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    let err = store
        .create_session(&new_session("t1"))
        .await
        .expect_err("duplicate thread");
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
}

async fn id_prefix_lookup_is_literal(db: &TestDatabase) {
    let store = db.store().await;
    let a = store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    let b = store
        .create_session(&new_session("t2"))
        .await
        .expect("create");
    let found = store
        .active_sessions_by_prefix(&a.id[..8])
        .await
        .expect("lookup");
    assert!(found.iter().any(|s| s.id == a.id));
    let upper = store
        .active_sessions_by_prefix(&a.id[..8].to_uppercase())
        .await
        .expect("lookup");
    assert!(
        upper.iter().any(|s| s.id == a.id),
        "prefixes are case-insensitive"
    );
    assert_eq!(
        store
            .active_sessions_by_prefix(&a.id)
            .await
            .expect("lookup")
            .len(),
        1
    );
    // LIKE wildcards are matched literally, never as "everything".
    for wildcard in ["%", "_", "%%%%", "____"] {
        assert!(store
            .active_sessions_by_prefix(wildcard)
            .await
            .expect("lookup")
            .is_empty());
    }
    store.claim_stop(&b.id).await.expect("claim");
    assert!(
        store
            .active_sessions_by_prefix(&b.id)
            .await
            .expect("lookup")
            .is_empty(),
        "only active"
    );
}

async fn children_of_an_orchestrator(db: &TestDatabase) {
    let store = db.store().await;
    let mut parent = new_session("orch");
    parent.kind = SessionKind::Orchestrator;
    let parent = store.create_session(&parent).await.expect("create");
    for (i, kind) in [SessionKind::Worker, SessionKind::Reviewer]
        .into_iter()
        .enumerate()
    {
        let mut child = new_session(&format!("child{i}"));
        child.kind = kind;
        child.parent_id = Some(parent.id.clone());
        child.worktree = Some(format!("widgets-{i}"));
        store.create_session(&child).await.expect("child");
    }
    let children = store.children(&parent.id).await.expect("children");
    assert_eq!(children.len(), 2);
    let mut kinds: Vec<&'static str> = children.iter().map(|c| c.kind.into()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        vec!["reviewer", "worker"],
        "both children, whatever their order within a millisecond"
    );
    assert!(children
        .iter()
        .all(|c| c.parent_id.as_deref() == Some(parent.id.as_str())));
    let mut orphan = new_session("orphan");
    orphan.parent_id = Some("no-such-parent".into());
    assert!(
        store.create_session(&orphan).await.is_err(),
        "parent must exist"
    );
}

async fn concurrent_stop_claims_succeed_once(db: &TestDatabase) {
    let store = db.store().await;
    for round in 0..3 {
        let s = store
            .create_session(&new_session(&format!("t{round}")))
            .await
            .expect("create");
        let mut handles = Vec::new();
        for _ in 0..16 {
            let store = store.clone();
            let id = s.id.clone();
            handles.push(tokio::spawn(async move { store.claim_stop(&id).await }));
        }
        let mut winners = 0;
        for h in handles {
            if h.await.expect("join").expect("claim").is_some() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

async fn concurrent_decisions_succeed_once(db: &TestDatabase) {
    let store = db.store().await;
    let s = store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    for round in 0..3 {
        let (req, _) = store
            .open_approval(&s.id, &format!("d{round}.example.com"), 1_000, i64::MAX)
            .await
            .expect("open");
        let mut handles = Vec::new();
        for i in 0..16 {
            let store = store.clone();
            let id = req.id.clone();
            let decision = if i % 2 == 0 {
                Decision::Approve
            } else {
                Decision::Deny
            };
            handles.push(tokio::spawn(async move {
                store
                    .decide_approval(
                        &id,
                        decision,
                        GrantScope::Ttl,
                        &format!("user{i}"),
                        &format!("name{i}"),
                        2_000,
                    )
                    .await
            }));
        }
        let mut decided = Vec::new();
        let mut already = Vec::new();
        for h in handles {
            match h.await.expect("join").expect("decide") {
                DecideOutcome::Decided(r) => decided.push(r),
                DecideOutcome::AlreadyDecided(r) => already.push(r),
            }
        }
        assert_eq!(
            decided.len(),
            1,
            "round {round}: approve racing deny decides once"
        );
        let winner = &decided[0];
        assert_eq!(already.len(), 15);
        for r in &already {
            assert_eq!(r.state, winner.state, "losers see the winner's decision");
            assert_eq!(r.decided_by_id, winner.decided_by_id);
        }
    }
}

async fn approval_requests_flow(db: &TestDatabase) {
    let store = db.store().await;
    let s = store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    let other = store
        .create_session(&new_session("t2"))
        .await
        .expect("create");

    let (req, created) = store
        .open_approval(&s.id, "pypi.org", 1_000, 10_000)
        .await
        .expect("open");
    assert!(created);
    assert_eq!(req.state, ApprovalState::Pending);
    let (again, created) = store
        .open_approval(&s.id, "pypi.org", 1_500, 10_500)
        .await
        .expect("open");
    assert!(!created, "one pending request per (session, domain)");
    assert_eq!(again.id, req.id);
    let (theirs, created) = store
        .open_approval(&other.id, "pypi.org", 1_500, 10_500)
        .await
        .expect("open");
    assert!(created, "another session gets its own request");
    assert_ne!(theirs.id, req.id);

    store
        .set_approval_card(&req.id, "post1")
        .await
        .expect("card");
    let decided = match store
        .decide_approval(
            &req.id,
            Decision::Approve,
            GrantScope::Ttl,
            "u1",
            "alice",
            2_000,
        )
        .await
        .expect("decide")
    {
        DecideOutcome::Decided(r) => r,
        other => panic!("expected a decision, got {other:?}"),
    };
    assert_eq!(decided.state, ApprovalState::Approved);
    assert_eq!(decided.decided_by_name.as_deref(), Some("alice"));
    assert_eq!(decided.card_post_id.as_deref(), Some("post1"));
    assert_eq!(
        decided.next_attempt_at,
        Some(2_000),
        "due for the firewall at once"
    );

    // Once decided, the same domain may be requested again (a new pending request).
    let (fresh, created) = store
        .open_approval(&s.id, "pypi.org", 2_100, 12_000)
        .await
        .expect("open");
    assert!(created);
    assert_ne!(fresh.id, req.id);

    assert_eq!(
        store
            .approvals_due_for_firewall(1_999)
            .await
            .expect("due")
            .len(),
        0
    );
    let due = store.approvals_due_for_firewall(2_000).await.expect("due");
    assert_eq!(
        due.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec![req.id.as_str()]
    );
    assert!(store
        .record_approval_attempt_failed(&req.id, "firewall down", 5_000)
        .await
        .expect("fail"));
    assert!(
        store
            .approvals_due_for_firewall(4_999)
            .await
            .expect("due")
            .is_empty(),
        "backoff respected"
    );
    let retry = store.approvals_due_for_firewall(5_000).await.expect("due");
    assert_eq!(retry[0].apply_attempts, 1);
    assert_eq!(retry[0].last_error.as_deref(), Some("firewall down"));

    assert!(store
        .mark_approval_applied(&req.id, 6_000)
        .await
        .expect("applied"));
    assert!(!store
        .mark_approval_applied(&req.id, 6_001)
        .await
        .expect("applied twice"));
    assert!(store
        .approvals_due_for_firewall(i64::MAX)
        .await
        .expect("due")
        .is_empty());
    let applied = store
        .approval(&req.id)
        .await
        .expect("lookup")
        .expect("applied");
    assert_eq!(applied.id, req.id);
    assert_eq!(applied.apply_attempts, 2);
    assert_eq!(applied.applied_at, Some(6_000));

    // A permanent firewall refusal.
    let (bad, _) = store
        .open_approval(&s.id, "files.example.com", 7_000, 70_000)
        .await
        .expect("open");
    store
        .decide_approval(
            &bad.id,
            Decision::Approve,
            GrantScope::Ttl,
            "u1",
            "alice",
            7_100,
        )
        .await
        .expect("decide");
    assert!(store
        .fail_approval(&bad.id, "validation: not a hostname")
        .await
        .expect("fail"));
    assert_eq!(
        store
            .approval(&bad.id)
            .await
            .expect("read")
            .expect("found")
            .state,
        ApprovalState::Failed
    );

    // Deny leaves nothing for the firewall.
    let (denied, _) = store
        .open_approval(&s.id, "evil.example.com", 8_000, 80_000)
        .await
        .expect("open");
    store
        .decide_approval(
            &denied.id,
            Decision::Deny,
            GrantScope::Ttl,
            "u2",
            "bob",
            8_100,
        )
        .await
        .expect("decide");
    assert!(store
        .approvals_due_for_firewall(i64::MAX)
        .await
        .expect("due")
        .is_empty());
    assert!(matches!(
        store
            .decide_approval("missing", Decision::Deny, GrantScope::Ttl, "u2", "bob", 1)
            .await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn expired_requests_cannot_be_decided(db: &TestDatabase) {
    let store = db.store().await;
    let s = store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    let (a, _) = store
        .open_approval(&s.id, "a.example.com", 0, 1_000)
        .await
        .expect("open");
    let (b, _) = store
        .open_approval(&s.id, "b.example.com", 0, 5_000)
        .await
        .expect("open");
    // Past its expiry, a click changes nothing even before the sweeper ran.
    let late = store
        .decide_approval(&a.id, Decision::Approve, GrantScope::Ttl, "u", "n", 1_000)
        .await
        .expect("decide");
    assert!(
        matches!(late, DecideOutcome::AlreadyDecided(ref r) if r.state == ApprovalState::Pending)
    );
    let expired = store.expire_approvals(1_000).await.expect("expire");
    assert_eq!(
        expired.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec![a.id.as_str()]
    );
    assert_eq!(expired[0].state, ApprovalState::Expired);
    assert!(
        store
            .expire_approvals(1_000)
            .await
            .expect("expire")
            .is_empty(),
        "each expires once"
    );
    let on_time = store
        .decide_approval(&b.id, Decision::Deny, GrantScope::Ttl, "u", "n", 4_999)
        .await
        .expect("decide");
    assert!(matches!(on_time, DecideOutcome::Decided(_)));
}

async fn project_channels(db: &TestDatabase) {
    let store = db.store().await;
    let pc = ProjectChannel {
        platform: Platform::Mattermost,
        repo_slug: "acme/widgets".into(),
        team_id: "team".into(),
        channel_id: "chan1".into(),
        channel_name: "widgets".into(),
        created_at: 1,
    };
    assert_eq!(store.upsert_project_channel(&pc).await.expect("insert"), pc);
    assert_eq!(
        store.upsert_project_channel(&pc).await.expect("again"),
        pc,
        "idempotent"
    );
    let moved = ProjectChannel {
        channel_id: "chan2".into(),
        channel_name: "widgets-2".into(),
        created_at: 99,
        ..pc.clone()
    };
    let stored = store.upsert_project_channel(&moved).await.expect("update");
    assert_eq!(stored.channel_id, "chan2");
    assert_eq!(stored.created_at, 1, "creation time kept");
    assert_eq!(
        store
            .project_channel(Platform::Mattermost, "acme/widgets")
            .await
            .expect("get"),
        Some(stored.clone())
    );
    assert_eq!(
        store
            .project_channel_by_id(Platform::Mattermost, "chan2")
            .await
            .expect("get"),
        Some(stored)
    );
    assert!(store
        .project_channel_by_id(Platform::Teams, "chan2")
        .await
        .expect("get")
        .is_none());
    let clash = ProjectChannel {
        repo_slug: "acme/gadgets".into(),
        ..moved
    };
    assert!(matches!(
        store.upsert_project_channel(&clash).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store
            .project_channels(Platform::Mattermost)
            .await
            .expect("list")
            .len(),
        1
    );
}

async fn audit_log_appends_in_order(db: &TestDatabase) {
    let store = db.store().await;
    let s = store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    let mut ids = Vec::new();
    for (i, action) in ["requested", "approved", "firewall_applied"]
        .iter()
        .enumerate()
    {
        ids.push(
            store
                .append_audit(&AuditEntry {
                    at: 1_000 + i as i64,
                    session_id: Some(s.id.clone()),
                    thread_id: Some("t1".into()),
                    domain: Some("pypi.org".into()),
                    action: (*action).into(),
                    user_id: Some("u1".into()),
                    user_name: Some("alice".into()),
                    outcome: "ok".into(),
                    detail: None,
                })
                .await
                .expect("append"),
        );
    }
    store
        .append_audit(&AuditEntry {
            at: 5_000,
            action: "expired".into(),
            outcome: "ok".into(),
            ..AuditEntry::default()
        })
        .await
        .expect("append");
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let mine = store.audit_log(Some(&s.id), 100).await.expect("list");
    assert_eq!(
        mine.iter()
            .map(|r| r.entry.action.as_str())
            .collect::<Vec<_>>(),
        vec!["requested", "approved", "firewall_applied"]
    );
    assert_eq!(mine[1].entry.user_name.as_deref(), Some("alice"));
    let all = store.audit_log(None, 2).await.expect("list");
    assert_eq!(
        all.iter()
            .map(|r| r.entry.action.as_str())
            .collect::<Vec<_>>(),
        vec!["firewall_applied", "expired"],
        "the newest records, oldest first"
    );
}

async fn locks_are_exclusive_and_survive_reconnect(db: &TestDatabase) {
    let store = db.store().await;
    let name = "clone:github.com/acme/widgets";
    assert_eq!(
        store.try_lock(name, "s1").await.expect("lock"),
        LockOutcome::Acquired
    );
    assert_eq!(
        store.try_lock(name, "s1").await.expect("relock"),
        LockOutcome::Acquired
    );
    assert_eq!(
        store.try_lock(name, "s2").await.expect("lock"),
        LockOutcome::Held {
            holder: "s1".into()
        }
    );
    // A restarted bot (a new pool) still sees the lock.
    store.close().await;
    let store = db.store().await;
    assert_eq!(
        store.lock_holder(name).await.expect("holder").as_deref(),
        Some("s1")
    );
    assert!(
        !store.unlock(name, "s2").await.expect("unlock"),
        "only the holder unlocks"
    );
    assert!(store.unlock(name, "s1").await.expect("unlock"));
    assert_eq!(
        store.try_lock(name, "s2").await.expect("lock"),
        LockOutcome::Acquired
    );

    // Many contenders, one winner.
    let mut handles = Vec::new();
    for i in 0..12 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store.try_lock("contended", &format!("h{i}")).await
        }));
    }
    let mut holders = HashSet::new();
    let mut acquired = 0;
    for h in handles {
        match h.await.expect("join").expect("lock") {
            LockOutcome::Acquired => acquired += 1,
            LockOutcome::Held { holder } => {
                holders.insert(holder);
            }
        }
    }
    assert_eq!(acquired, 1);
    assert!(holders.len() <= 1);

    // Leases: held until they expire, then taken over; renewed by their holder.
    let lease = "firewall:alias";
    assert_eq!(
        store
            .try_lease(lease, "i1", 1_000, 500)
            .await
            .expect("lease"),
        LockOutcome::Acquired
    );
    assert_eq!(
        store
            .try_lease(lease, "i2", 1_400, 500)
            .await
            .expect("lease"),
        LockOutcome::Held {
            holder: "i1".into()
        },
        "not yet expired"
    );
    assert_eq!(
        store
            .try_lease(lease, "i1", 1_400, 500)
            .await
            .expect("renew"),
        LockOutcome::Acquired,
        "the holder renews it (now until 1900)"
    );
    assert_eq!(
        store
            .try_lease(lease, "i2", 1_800, 500)
            .await
            .expect("lease"),
        LockOutcome::Held {
            holder: "i1".into()
        }
    );
    assert_eq!(
        store
            .try_lease(lease, "i2", 1_900, 500)
            .await
            .expect("take over"),
        LockOutcome::Acquired,
        "an expired lease is taken over"
    );
    assert_eq!(
        store
            .try_lease(name, "i3", i64::MAX / 4, 500)
            .await
            .expect("lock"),
        LockOutcome::Held {
            holder: "s2".into()
        },
        "a plain lock never expires"
    );
}

async fn containers_and_their_users(db: &TestDatabase) {
    let store = db.store().await;
    let id = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
    store
        .record_container(id, "vm1", "/home/claude/repos/x")
        .await
        .expect("record");
    assert_eq!(store.live_containers().await.expect("list").len(), 1);
    let a = store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    let b = store
        .create_session(&new_session("t2"))
        .await
        .expect("create");
    store
        .set_session_container(&a.id, Some(id), None, None)
        .await
        .expect("set");
    store
        .set_session_container(&b.id, Some(id), None, None)
        .await
        .expect("set");
    assert_eq!(store.container_users(id, None).await.expect("count"), 2);
    assert_eq!(
        store.container_users(id, Some(&a.id)).await.expect("count"),
        1
    );
    store
        .end_session(&b.id, EndReason::AgentExited, None)
        .await
        .expect("end");
    assert_eq!(
        store.container_users(id, Some(&a.id)).await.expect("count"),
        0
    );
    assert!(store.mark_container_removed(id).await.expect("removed"));
    assert!(!store
        .mark_container_removed(id)
        .await
        .expect("removed twice"));
    assert!(store.live_containers().await.expect("list").is_empty());
    store
        .record_container(id, "vm1", "/home/claude/repos/x")
        .await
        .expect("record again");
    assert_eq!(
        store.live_containers().await.expect("list")[0].removed_at,
        None
    );
}

async fn unknown_stored_values_are_errors_not_panics(db: &TestDatabase) {
    let store = db.store().await;
    let s = store
        .create_session(&new_session("t1"))
        .await
        .expect("create");
    db.execute_raw(&format!(
        "UPDATE sessions SET state = 'ended', end_reason = 'exploded' WHERE id = '{}'",
        s.id
    ))
    .await;
    let err = store.session(&s.id).await.expect_err("unknown end reason");
    assert!(
        matches!(err, StoreError::Corrupt { column: "end_reason", ref value, .. } if value == "exploded"),
        "{err}"
    );
    db.execute_raw(&format!(
        "UPDATE sessions SET platform = 'irc' WHERE id = '{}'",
        s.id
    ))
    .await;
    assert!(matches!(store.active_sessions().await, Ok(v) if v.is_empty()));
    assert!(matches!(
        store.unended_sessions().await,
        Ok(v) if v.is_empty()
    ));
    assert!(store.session(&s.id).await.is_err());
}

async fn a_budget_card_raises_the_cap_once_and_the_mode_is_kept(db: &TestDatabase) {
    let store = db.store().await;
    let s = store
        .create_session(&new_session("budget-thread"))
        .await
        .expect("create");
    assert_eq!(s.budget_added_usd, 0.0);
    assert_eq!(s.permission_mode, None);
    // The card showed a cap of 1 cent (a $0.01 budget, nothing added).
    assert!(store.add_budget(&s.id, 0.05, 0.01, 1).await.expect("add"));
    assert!(
        !store.add_budget(&s.id, 0.05, 0.01, 1).await.expect("again"),
        "the same card raises it once"
    );
    let s = store.session(&s.id).await.expect("read").expect("row");
    assert!(
        (s.budget_added_usd - 0.05).abs() < 1e-9,
        "{}",
        s.budget_added_usd
    );
    // The next card shows the new cap (6 cents) and raises it in turn.
    assert!(store.add_budget(&s.id, 0.01, 0.01, 6).await.expect("add"));
    store
        .set_session_permission_mode(&s.id, Some("plan"))
        .await
        .expect("mode");
    let s = store.session(&s.id).await.expect("read").expect("row");
    assert_eq!(s.permission_mode.as_deref(), Some("plan"));
    assert!(!store.deployment_id().await.expect("id").is_empty());
    assert_eq!(
        store.deployment_id().await.expect("id"),
        store.deployment_id().await.expect("id"),
        "made once"
    );
}

async fn recorded_messages_wait_until_handled_and_are_handed_out_again(db: &TestDatabase) {
    let store = db.store().await;
    for (id, at) in [("m2", 200), ("m1", 100), ("m3", 300)] {
        assert!(store
            .record_inbound(
                Platform::Mattermost,
                id,
                "c1",
                at,
                &format!("{{\"id\":\"{id}\"}}")
            )
            .await
            .expect("record"));
    }
    assert!(
        !store
            .record_inbound(Platform::Mattermost, "m1", "c1", 100, "again")
            .await
            .expect("record again"),
        "a message is recorded once"
    );
    // A card submit is taken and handled at once: never handed out again.
    assert!(store
        .claim_inbound_post(Platform::Mattermost, "click", "c1", 150)
        .await
        .expect("claim"));
    assert!(store
        .record_inbound(Platform::Teams, "t1", "19:a", 50, "teams")
        .await
        .expect("record"));
    let waiting = store
        .unhandled_inbound(Platform::Mattermost, 10)
        .await
        .expect("unhandled");
    assert_eq!(
        waiting,
        vec![r#"{"id":"m1"}"#, r#"{"id":"m2"}"#, r#"{"id":"m3"}"#],
        "oldest first, this platform only, the first payload kept"
    );
    assert!(store
        .mark_inbound_handled(Platform::Mattermost, "m2")
        .await
        .expect("mark"));
    assert!(
        !store
            .mark_inbound_handled(Platform::Mattermost, "m2")
            .await
            .expect("mark again"),
        "handled once"
    );
    assert_eq!(
        store
            .unhandled_inbound(Platform::Mattermost, 1)
            .await
            .expect("unhandled"),
        vec![r#"{"id":"m1"}"#],
        "the limit holds"
    );
    assert_eq!(
        store
            .unhandled_inbound(Platform::Mattermost, 10)
            .await
            .expect("unhandled")
            .len(),
        2
    );
    assert_eq!(
        store
            .inbound_cursor(Platform::Mattermost, "c1")
            .await
            .expect("cursor"),
        Some(300),
        "recorded messages move the catch-up cursor like claimed ones"
    );
}

async fn inbound_posts_are_claimed_once_and_keep_a_cursor(db: &TestDatabase) {
    let store = db.store().await;
    assert_eq!(
        store
            .inbound_cursor(Platform::Mattermost, "c1")
            .await
            .expect("cursor"),
        None
    );
    assert!(store
        .claim_inbound_post(Platform::Mattermost, "p1", "c1", 100)
        .await
        .expect("claim"));
    assert!(!store
        .claim_inbound_post(Platform::Mattermost, "p1", "c1", 100)
        .await
        .expect("again"));
    assert!(store
        .claim_inbound_post(Platform::Teams, "p1", "c1", 100)
        .await
        .expect("other platform"));
    assert!(store
        .claim_inbound_post(Platform::Mattermost, "p2", "c1", 300)
        .await
        .expect("claim"));
    assert!(store
        .claim_inbound_post(Platform::Mattermost, "p3", "c2", 200)
        .await
        .expect("claim"));
    assert_eq!(
        store
            .inbound_cursor(Platform::Mattermost, "c1")
            .await
            .expect("cursor"),
        Some(300)
    );

    let mut handles = Vec::new();
    for _ in 0..12 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store
                .claim_inbound_post(Platform::Mattermost, "raced", "c1", 400)
                .await
        }));
    }
    let mut winners = 0;
    for h in handles {
        winners += usize::from(h.await.expect("join").expect("claim"));
    }
    assert_eq!(winners, 1, "a post is taken exactly once");

    // Pruning forgets old rows but keeps each channel's newest, so the cursor survives.
    let pruned = store.prune_inbound_posts(i64::MAX).await.expect("prune");
    assert_eq!(
        pruned, 2,
        "p1 and p2 in c1 go; raced (c1), p3 (c2) and the Teams row stay"
    );
    assert_eq!(
        store
            .inbound_cursor(Platform::Mattermost, "c1")
            .await
            .expect("cursor"),
        Some(400)
    );
    assert_eq!(
        store
            .inbound_cursor(Platform::Mattermost, "c2")
            .await
            .expect("cursor"),
        Some(200)
    );
}

async fn spawns_are_claimed_once_within_the_window(db: &TestDatabase) {
    let store = db.store().await;
    let mut orch = new_session("orch");
    orch.kind = SessionKind::Orchestrator;
    let orch = store.create_session(&orch).await.expect("create");
    let key = "worker|acme/widgets|main|implement the parser";
    assert!(store
        .claim_spawn(&orch.id, key, 1_000, 600_000)
        .await
        .expect("claim"));
    assert!(
        !store
            .claim_spawn(&orch.id, key, 2_000, 600_000)
            .await
            .expect("again"),
        "a repeat within the window"
    );
    assert!(store
        .claim_spawn(&orch.id, "reviewer|acme/widgets|main|x", 2_000, 600_000)
        .await
        .expect("other key"));
    assert!(store
        .claim_spawn(&orch.id, key, 700_000, 600_000)
        .await
        .expect("after the window"));
    let mut handles = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let id = orch.id.clone();
        handles.push(tokio::spawn(async move {
            store.claim_spawn(&id, "raced", 5, 600_000).await
        }));
    }
    let mut won = 0;
    for h in handles {
        won += usize::from(h.await.expect("join").expect("claim"));
    }
    assert_eq!(won, 1, "concurrent repeats spawn once");
    store
        .set_spawn_child(&orch.id, key, "child-1")
        .await
        .expect("record");
}

async fn teams_references_survive_a_new_pool_and_keep_known_fields(db: &TestDatabase) {
    let store = db.store().await;
    let channel = "19:6decf54d86d945e4b3924b63a9161a78@thread.tacv2";
    assert!(store
        .teams_conversation(channel)
        .await
        .expect("read")
        .is_none());
    let reference = TeamsConversation {
        conversation_id: channel.into(),
        conversation_type: "channel".into(),
        service_url: "https://smba.trafficmanager.net/amer/".into(),
        tenant_id: "0d9b645f-aaaa".into(),
        team_id: "19:acca514e83cb497e960e0b014d405336@thread.tacv2".into(),
        name: "General".into(),
        bot_id: "28:app".into(),
        updated_at: 1,
    };
    store
        .upsert_teams_conversation(&reference)
        .await
        .expect("insert");
    // A later activity without tenant, team or name (as in some invokes) keeps them; a new
    // service URL replaces the old one.
    store
        .upsert_teams_conversation(&TeamsConversation {
            service_url: "https://smba.trafficmanager.net/emea/".into(),
            tenant_id: String::new(),
            team_id: String::new(),
            name: String::new(),
            updated_at: 2,
            ..reference.clone()
        })
        .await
        .expect("update");
    let again = db.store().await; // a new pool, as after a restart
    let found = again
        .teams_conversation(channel)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(
        found,
        TeamsConversation {
            service_url: "https://smba.trafficmanager.net/emea/".into(),
            updated_at: 2,
            ..reference
        }
    );

    let user = TeamsUser {
        user_id: "b130c271-d2eb-45f9-83ab-9eb3fe3788bc".into(),
        account_id: "29:1aBjVi5Mw".into(),
        name: "Olo Brockhouse".into(),
        last_conversation_id: Some(channel.into()),
        updated_at: 1,
    };
    store.upsert_teams_user(&user).await.expect("insert user");
    store
        .upsert_teams_user(&TeamsUser {
            name: String::new(),
            last_conversation_id: None,
            updated_at: 2,
            ..user.clone()
        })
        .await
        .expect("update user");
    let found = again
        .teams_user(&user.user_id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(
        found,
        TeamsUser {
            updated_at: 2,
            ..user.clone()
        }
    );
    store
        .upsert_teams_user(&TeamsUser {
            last_conversation_id: Some("a:1personal".into()),
            updated_at: 3,
            ..user.clone()
        })
        .await
        .expect("move");
    assert_eq!(
        again
            .teams_user(&user.user_id)
            .await
            .expect("read")
            .expect("stored")
            .last_conversation_id
            .as_deref(),
        Some("a:1personal")
    );
    assert!(again.teams_user("nobody").await.expect("read").is_none());
}

/// A new embedded database file, and the write-ahead log SQLite makes beside it, are readable
/// by their owner only: they hold transcripts, the audit log and one-machine mode's key.
#[tokio::test]
async fn a_new_sqlite_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let db = TestDatabase::sqlite();
    let store = db.store().await;
    store
        .instance_key("callback_secret", "kept")
        .await
        .expect("write");
    let path = db.url.trim_start_matches("sqlite://").to_owned();
    for file in [path.clone(), format!("{path}-wal")] {
        let mode = std::fs::metadata(&file)
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} has mode {:o}", mode & 0o777);
    }
    store.close().await;
}
