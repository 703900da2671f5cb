//! Session lifetimes end to end on the testbed (fake Mattermost → bot → real SSH → real podman
//! → the real Claude Code CLI → the scripted model): a session without a message for
//! `SM_SESSION_IDLE_SECS` hibernates (agent closed, container stopped, not removed), its next
//! message wakes it with the conversation resumed, and it stays hibernating across bot
//! restarts (a graceful one and a kill) until that message; a session older than
//! `SM_SESSION_MAX_AGE_SECS` is ended with reason `max_age`.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use session_manager::runtime::devcontainer::LABEL_DEPLOYMENT;
use session_manager::runtime::shell::Script;
use session_manager::store::{
    new_session_id, EndReason, NewSession, Platform, SessionKind, SessionState,
};
use support::model_server::{Reply, Script as ModelScript};
use support::stack::{BotProcess, Stack};
use support::testbed::Testbed;

/// `podman inspect` of a container: whether it runs, and when it last started (Unix s).
async fn container_state(stack: &Stack, id: &str) -> (bool, i64) {
    let mut s = Script::new();
    s.command(
        "podman",
        &[
            "container",
            "inspect",
            "--format",
            "{{.State.Running}} {{.State.StartedAt.Unix}}",
            id,
        ],
    )
    .expect("q");
    let out = stack.vm_run(&s).await;
    assert!(out.success(), "inspect {id}: {}", out.stderr);
    let mut words = out.stdout.split_whitespace();
    let running = words.next() == Some("true");
    let started = words
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("inspect output: {}", out.stdout));
    (running, started)
}

/// Waits until the container's running state is `running`.
async fn wait_container(stack: &Stack, id: &str, running: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while container_state(stack, id).await.0 != running {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Proof that the bot's reconciler has looked at every container since now: a stopped
/// container of a live session (a row made here, after the bot's recovery, with no actor) is
/// made, and waited for until the reconciler (1 s interval) starts it. (A canary it would
/// remove instead needs a short grace, and would remove other tests' containers too.)
async fn reconciler_passes(stack: &Stack, tb: &Testbed) {
    let id = new_session_id();
    stack
        .store
        .create_session(&NewSession {
            id: id.clone(),
            platform: Platform::Mattermost,
            channel_id: stack.town.clone(),
            thread_id: format!("canary-{id}"),
            kind: SessionKind::Standard,
            parent_id: None,
            started_by: stack.alice.clone(),
            repo_host: "local".into(),
            repo_org: "acme".into(),
            repo_name: "canary".into(),
            branch: None,
            worktree: None,
            profile: None,
        })
        .await
        .expect("canary session");
    // This bot's deployment label: the reconcilers of other tests running meanwhile leave it.
    let deployment = stack.store.deployment_id().await.expect("deployment id");
    let mut s = Script::new();
    s.command(
        "podman",
        &[
            "create",
            "--label",
            "session-manager.managed=true",
            "--label",
            &format!("session-manager.session={id}"),
            "--label",
            &format!("{LABEL_DEPLOYMENT}={deployment}"),
            &tb.get("SM_TEST_SANDBOX_IMAGE"),
            "sleep",
            "300",
        ],
    )
    .expect("q");
    let out = stack.vm_run(&s).await;
    assert!(out.success(), "a canary container: {}", out.stderr);
    let canary = out.stdout.trim().to_owned();
    stack
        .store
        .set_session_container(&id, Some(&canary), Some("/nonexistent"), None)
        .await
        .expect("canary container");
    stack
        .store
        .set_session_state(&id, SessionState::Idle)
        .await
        .expect("canary state");
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        if container_state(stack, &canary).await.0 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut s = Script::new();
    s.command("podman", &["rm", "-f", "--time", "0", &canary])
        .expect("q");
    stack.vm_run(&s).await;
    stack
        .store
        .end_session(&id, EndReason::Error, Some("a test's canary"))
        .await
        .expect("end the canary");
    assert!(started, "the reconciler never started the canary container");
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("secs")
}

/// Waits for the bot process to listen to chat again.
async fn wait_connected(stack: &Stack) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.fake.websocket_connections() == 0 {
        assert!(Instant::now() < deadline, "the bot process never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_session_hibernates_wakes_with_its_conversation_and_sleeps_through_restarts() {
    let tb = Testbed::load();
    let script = ModelScript::new()
        .on_last_user("remember the word walrus", Reply::text("Noted."))
        .on_last_user("which word", Reply::text("It was walrus."))
        .on_last_user("and after the restarts", Reply::text("Still walrus."))
        .fallback(Reply::text("ok"));
    let mut stack = Stack::start_with(
        script,
        &[
            ("session-idle-secs", "2".into()),
            ("reconcile-interval-secs", "1".into()),
            // Never remove what another test running meanwhile made (unknown here).
            ("reconcile-grace-secs", "86400".into()),
        ],
    )
    .await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let session = stack.session_at(&channel, &root).await;
    let container = session.container_id.clone().expect("container");
    let post = |stack: &Stack, text: &str| {
        stack
            .fake
            .post_as(&stack.alice, &channel, Some(&root), text)
            .expect("post");
    };
    let count = |stack: &Stack, needle: &str| {
        stack
            .fake
            .thread(&root)
            .iter()
            .filter(|p| p.message.contains(needle))
            .count()
    };

    post(&stack, "remember the word walrus");
    stack
        .wait_for_bot_post("the first answer", Some(&root), "Noted.")
        .await;

    // Two seconds without a message: it hibernates, the container stopped but kept.
    let notice = stack
        .wait_for_bot_post("the hibernation notice", Some(&root), "💤 Hibernating")
        .await;
    assert!(
        notice.message.contains("the container is stopped")
            && notice.message.contains("The next message wakes it"),
        "{}",
        notice.message
    );
    wait_container(&stack, &container, false, "the container was not stopped").await;
    let asleep = stack.session_at(&channel, &root).await;
    assert!(asleep.is_hibernating(), "stored as hibernating");
    assert_eq!(
        asleep.state(),
        SessionState::Idle,
        "still an active session"
    );
    // The reconciler leaves it stopped.
    reconciler_passes(&stack, &tb).await;
    assert!(
        !container_state(&stack, &container).await.0,
        "the reconciler started a hibernating session's container"
    );
    // `status` lists it as hibernating.
    stack
        .fake
        .post_as(&stack.alice, &stack.town, None, "@claude status")
        .expect("post");
    stack.wait_for_bot_post("status", None, "hibernating").await;

    // The next message wakes it: the conversation goes on.
    let sent = unix_now();
    post(&stack, "which word");
    let woke = stack
        .wait_for_bot_post("the wake-up post", Some(&root), "awake in")
        .await;
    eprintln!("first wake: {}", woke.message);
    stack
        .wait_for_bot_post("the answer after waking", Some(&root), "It was walrus.")
        .await;
    let request = stack
        .model
        .last_request_with("which word")
        .expect("the request");
    assert!(
        request
            .all_messages_text()
            .contains("remember the word walrus"),
        "the woken conversation carries its history"
    );
    let (running, started) = container_state(&stack, &container).await;
    assert!(running, "the container runs again");
    assert!(
        started >= sent,
        "started for the message ({started} < {sent})"
    );
    assert!(!stack.session_at(&channel, &root).await.is_hibernating());

    // It hibernates again; the bot restarts (gracefully, then killed) meanwhile.
    stack
        .wait_for("the second hibernation", Duration::from_secs(60), |s| {
            (count(s, "💤 Hibernating") >= 2).then_some(())
        })
        .await;
    wait_container(
        &stack,
        &container,
        false,
        "the container was not stopped again",
    )
    .await;
    let bot = stack.switch_to_process(&tb).await;
    reconciler_passes(&stack, &tb).await;
    assert!(
        !container_state(&stack, &container).await.0,
        "after a restart the hibernating session's container was started"
    );
    bot.kill();
    let bot = BotProcess::start(&stack, &tb);
    wait_connected(&stack).await;
    reconciler_passes(&stack, &tb).await;
    assert!(
        !container_state(&stack, &container).await.0,
        "after a crash the hibernating session's container was started"
    );
    let still = stack.session_at(&channel, &root).await;
    assert!(still.is_hibernating(), "still stored as hibernating");
    assert_eq!(
        count(&stack, "The bot restarted"),
        0,
        "a hibernating session is not resumed at a restart"
    );

    // And the next message wakes it.
    let sent = unix_now();
    post(&stack, "and after the restarts");
    stack
        .wait_for("the second wake-up post", Duration::from_secs(120), |s| {
            (count(s, "awake in") >= 2).then_some(())
        })
        .await;
    stack
        .wait_for_bot_post(
            "the answer after the restarts",
            Some(&root),
            "Still walrus.",
        )
        .await;
    let request = stack
        .model
        .last_request_with("and after the restarts")
        .expect("the request");
    assert!(
        request
            .all_messages_text()
            .contains("remember the word walrus"),
        "the conversation survived the restarts"
    );
    let (running, started) = container_state(&stack, &container).await;
    assert!(running && started >= sent, "woken by the message");
    let wakes: Vec<String> = stack
        .fake
        .thread(&root)
        .iter()
        .filter(|p| p.message.contains("awake in"))
        .map(|p| p.message.clone())
        .collect();
    eprintln!("wakes: {wakes:?}");

    // A stop while it hibernates (it does again, 2 s later) cleans up as usual.
    stack
        .wait_for("the third hibernation", Duration::from_secs(60), |s| {
            (count(s, "💤 Hibernating") >= 3).then_some(())
        })
        .await;
    post(&stack, "!stop");
    let ended = stack
        .wait_for_state(&session.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    assert_eq!(ended.end().expect("end").reason, EndReason::UserRequested);
    // The cleanup after the end removes the stopped container.
    let mut s = Script::new();
    s.command("podman", &["container", "exists", &container])
        .expect("q");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.vm_run(&s).await.success() {
        assert!(
            Instant::now() < deadline,
            "the stopped container was never removed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(bot);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_older_than_the_max_age_is_ended() {
    let script = ModelScript::new()
        .on_last_user("hello", Reply::text("Hi there."))
        .fallback(Reply::text("ok"));
    let stack = Stack::start_with(script, &[("session-max-age-secs", "25".into())]).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let session = stack.session_at(&channel, &root).await;
    let ended = stack
        .wait_for_state(&session.id, SessionState::Ended, Duration::from_secs(120))
        .await;
    let end = ended.end().expect("end");
    assert_eq!(end.reason, EndReason::MaxAge);
    assert!(
        end.at - ended.created_at >= 25_000,
        "ended after {} ms",
        end.at - ended.created_at
    );
    let notice = stack
        .wait_for_bot_post("the max-age notice", Some(&root), "maximum age")
        .await;
    assert!(
        notice.message.contains("SM_SESSION_MAX_AGE_SECS"),
        "{}",
        notice.message
    );
    stack
        .wait_for_bot_post("the end notice", Some(&root), "Session ended (max_age)")
        .await;
    let mut s = Script::new();
    s.command(
        "podman",
        &[
            "container",
            "exists",
            session.container_id.as_deref().expect("container"),
        ],
    )
    .expect("q");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.vm_run(&s).await.success() {
        assert!(Instant::now() < deadline, "the container was never removed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hibernating_session_older_than_the_max_age_is_ended_and_its_container_removed() {
    let tb = Testbed::load();
    let script = ModelScript::new().fallback(Reply::text("ok"));
    let mut stack = Stack::start_with(script, &[("session-idle-secs", "2".into())]).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let session = stack.session_at(&channel, &root).await;
    let container = session.container_id.clone().expect("container");
    stack
        .wait_for_bot_post("the hibernation notice", Some(&root), "💤 Hibernating")
        .await;
    assert!(stack.session_at(&channel, &root).await.is_hibernating());
    // The bot comes back with a maximum age a few seconds past the session's age, however
    // long its start took: the session is recovered hibernating and ends while it sleeps.
    let now_ms = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms");
    let age_secs = (now_ms - session.created_at) / 1000;
    stack
        .extra
        .push(("session-max-age-secs".into(), (age_secs + 8).to_string()));
    let bot = stack.switch_to_process(&tb).await;
    let ended = stack
        .wait_for_state(&session.id, SessionState::Ended, Duration::from_secs(120))
        .await;
    assert_eq!(ended.end().expect("end").reason, EndReason::MaxAge);
    assert!(
        ended.end().expect("end").at - session.created_at >= (age_secs + 8) * 1000,
        "not before its maximum age"
    );
    stack
        .wait_for_bot_post("the max-age notice", Some(&root), "maximum age")
        .await;
    // The cleanup after the end removes the stopped container.
    let mut s = Script::new();
    s.command("podman", &["container", "exists", &container])
        .expect("q");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.vm_run(&s).await.success() {
        assert!(
            Instant::now() < deadline,
            "the stopped container was never removed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(bot);
    stack.finish().await;
}
