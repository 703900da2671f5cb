//! Ownership end to end (issue #12): fake Mattermost → bot → real SSH → real containers → the
//! real Claude Code CLI → the scripted model, with three people: alice owns a session, bob is
//! a member of its channel without rights until invited, carol is an admin.

mod support;

use std::time::{Duration, Instant};

use session_manager::session::short_id;
use session_manager::store::SessionState;
use support::model_server::{Reply, Script as ModelScript};
use support::stack::Stack;

/// Whether the model was ever sent `text` as a user turn.
fn model_heard(stack: &Stack, text: &str) -> bool {
    stack
        .model
        .requests()
        .iter()
        .any(|r| r.last_user_text.contains(text))
}

/// Waits for the newest notice only `user` sees to contain `needle`.
async fn wait_for_notice(stack: &Stack, user: &str, needle: &str) -> String {
    stack
        .wait_for(needle, Duration::from_secs(30), |s| {
            s.fake
                .ephemeral_posts()
                .into_iter()
                .rev()
                .find(|(to, text)| to == user && text.contains(needle))
                .map(|(_, text)| text)
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_owner_participants_and_admins_reach_a_session() {
    let stack = Stack::start_with(
        ModelScript::new()
            .on_last_user("hello from bob", Reply::text("hi bob, I heard you"))
            .fallback(Reply::text("ok")),
        // An entry nobody answers to is left out; the bot runs with the admins it found.
        &[("admin-users", "carol,ghost".into())],
    )
    .await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let session = stack.session_at(&channel, &root).await;
    let prefix = short_id(&session.id).to_owned();
    let project = stack.fake.channel_by_id(&channel).expect("project channel");
    assert_eq!(
        project.channel_type, "P",
        "a new project channel is private"
    );
    assert!(stack.fake.channel_members(&channel).contains(&stack.alice));
    assert!(!stack.fake.channel_members(&channel).contains(&stack.bob));
    // alice adds bob to the channel in the client: a member, not a participant.
    stack.fake.add_channel_member(&channel, &stack.bob);

    // bob cannot drive it, clear it or stop it; each time only he is told why.
    let bob_says = |text: &str| {
        stack
            .fake
            .post_as(&stack.bob, &channel, Some(&root), text)
            .expect("bob posts");
    };
    bob_says("please delete everything");
    wait_for_notice(
        &stack,
        &stack.bob,
        "was not passed to Claude: only this session's owner @alice",
    )
    .await;
    bob_says("!clear");
    wait_for_notice(&stack, &stack.bob, "or an admin can do that").await;
    bob_says("!stop");
    stack
        .wait_for("two refusals of commands", Duration::from_secs(30), |s| {
            let n = s
                .fake
                .ephemeral_posts()
                .iter()
                .filter(|(to, text)| to == &s.bob && text.contains("or an admin can do that"))
                .count();
            (n == 2).then_some(())
        })
        .await;
    // Nor see it in `status`, from a direct message.
    let bob_dm = stack
        .fake
        .direct_channel(&stack.bob, &stack.fake.bot_user_id());
    let asked = stack
        .fake
        .post_as(&stack.bob, &bob_dm, None, "@claude status")
        .expect("post");
    let status = stack
        .wait_for_bot_post("bob's status", Some(&asked.id), "session")
        .await;
    assert!(!status.message.contains(&prefix), "{}", status.message);
    assert!(!model_heard(&stack, "please delete everything"));
    assert_eq!(
        stack
            .store
            .session(&session.id)
            .await
            .expect("read")
            .expect("session")
            .state(),
        SessionState::Idle,
        "still running, its conversation untouched"
    );
    assert!(
        stack.bot_post(Some(&root), "@bob:").is_none(),
        "refusals were not posted for everyone"
    );

    // After `!invite @bob` he can drive it, but still not stop it.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!invite @bob")
        .expect("post");
    stack
        .wait_for_bot_post(
            "the invitation",
            Some(&root),
            "@bob can now talk to this session",
        )
        .await;
    bob_says("hello from bob");
    stack
        .wait_for_bot_post(
            "the agent's answer to bob",
            Some(&root),
            "hi bob, I heard you",
        )
        .await;
    assert!(model_heard(&stack, "hello from bob"));
    bob_says("!stop");
    stack
        .wait_for("a third refusal", Duration::from_secs(30), |s| {
            let n = s
                .fake
                .ephemeral_posts()
                .iter()
                .filter(|(to, text)| to == &s.bob && text.contains("or an admin can do that"))
                .count();
            (n == 3).then_some(())
        })
        .await;
    let asked = stack
        .fake
        .post_as(&stack.bob, &bob_dm, None, "@claude status")
        .expect("post");
    let status = stack
        .wait_for_bot_post("bob's status as a participant", Some(&asked.id), "session")
        .await;
    assert!(status.message.contains(&prefix), "{}", status.message);

    // An admin stops it from a direct message.
    let carol_dm = stack
        .fake
        .direct_channel(&stack.carol, &stack.fake.bot_user_id());
    let asked = stack
        .fake
        .post_as(
            &stack.carol,
            &carol_dm,
            None,
            &format!("@claude stop {prefix}"),
        )
        .expect("post");
    stack
        .wait_for_bot_post("the admin's stop", Some(&asked.id), "Stopping session")
        .await;
    let ended = stack
        .wait_for_state(&session.id, SessionState::Ended, Duration::from_secs(120))
        .await;
    let detail = ended
        .end()
        .and_then(|e| e.detail.clone())
        .unwrap_or_default();
    assert!(
        detail.contains(&stack.carol),
        "the stop is recorded as carol's: {detail}"
    );
    let container = session.container_id.clone().expect("container");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack
        .store
        .live_containers()
        .await
        .expect("containers")
        .iter()
        .any(|c| c.container_id == container)
    {
        assert!(Instant::now() < deadline, "the container was not removed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stack.finish().await;
}
