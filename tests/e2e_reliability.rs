//! Reliability end to end on the testbed (fake Mattermost → bot → real SSH → real podman →
//! the real Claude Code CLI → the scripted model): an agent output line past
//! `SM_MAX_AGENT_LINE_BYTES` ends its turn with a clear error, and the session goes on.

mod support;

use support::model_server::{Reply, Script as ModelScript};
use support::stack::Stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_over_long_output_line_ends_the_turn_with_an_error_and_the_session_goes_on() {
    let huge = "x".repeat(200 * 1024);
    let script = ModelScript::new()
        .on_last_user("a very long answer", Reply::text(&huge))
        .on_last_user("a short answer", Reply::text("Short and sweet."))
        .fallback(Reply::text("ok"));
    let stack = Stack::start_with(script, &[("max-agent-line-bytes", "65536".into())]).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "a very long answer")
        .expect("post");
    let error = stack
        .wait_for_bot_post(
            "the over-long line error",
            Some(&root),
            "SM_MAX_AGENT_LINE_BYTES",
        )
        .await;
    assert!(error.message.contains("65536 bytes"), "{}", error.message);
    assert!(
        stack.bot_post(Some(&root), &huge[..1000]).is_none(),
        "the over-long output was not relayed"
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "a short answer")
        .expect("post");
    stack
        .wait_for_bot_post("the next answer", Some(&root), "Short and sweet.")
        .await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    let session = stack.session_at(&channel, &root).await;
    stack
        .wait_for_state(
            &session.id,
            session_manager::store::SessionState::Ended,
            std::time::Duration::from_secs(120),
        )
        .await;
    stack.finish().await;
}

/// `!interrupt` stops a turn that would run for minutes, `!restart` during one works at once,
/// and a turn past `SM_TURN_TIMEOUT_SECS` is interrupted with a notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hung_turns_end_by_interrupt_restart_and_the_turn_timeout() {
    use std::time::{Duration, Instant};
    // The CLI merges an interrupted input into the next one, so later rules come first.
    let script = ModelScript::new()
        .on_last_user("ping", Reply::text("pong"))
        .on_last_user(
            "third slow",
            Reply::text("never").after(Duration::from_secs(300)),
        )
        .once()
        .on_last_user(
            "second slow",
            Reply::text("never").after(Duration::from_secs(300)),
        )
        .once()
        .on_last_user(
            "first slow",
            Reply::text("never").after(Duration::from_secs(300)),
        )
        .once()
        .fallback(Reply::text("ok"));
    let stack = Stack::start_with(script, &[("turn-timeout-secs", "20".into())]).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let post = |text: &str| {
        stack
            .fake
            .post_as(&stack.alice, &channel, Some(&root), text)
            .expect("post");
    };
    let reached = |text: &'static str| {
        let model = &stack.model;
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !model
                .requests()
                .iter()
                .any(|r| r.last_user_text.contains(text))
            {
                assert!(Instant::now() < deadline, "{text} never reached the model");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let count = |needle: &str| {
        stack
            .fake
            .thread(&root)
            .iter()
            .filter(|p| p.message.contains(needle))
            .count()
    };

    // !interrupt
    post("first slow");
    reached("first slow").await;
    let asked = Instant::now();
    post("!interrupt");
    stack
        .wait_for_bot_post(
            "the interrupt confirmed",
            Some(&root),
            "turn was interrupted",
        )
        .await;
    let took = asked.elapsed();
    eprintln!("interrupt took {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "interrupted within 5 s: {took:?}"
    );
    assert!(stack.bot_post(Some(&root), "Interrupting Claude").is_some());
    post("ping");
    stack
        .wait_for_bot_post("the session answers again", Some(&root), "pong")
        .await;

    // !restart during a hung turn does not wait for it.
    post("second slow");
    reached("second slow").await;
    let before = count("turn was interrupted");
    post("!restart");
    stack
        .wait_for(
            "the restart to interrupt the turn",
            Duration::from_secs(30),
            |_| (count("turn was interrupted") > before).then_some(()),
        )
        .await;
    let pongs = count("pong");
    post("ping");
    stack
        .wait_for(
            "an answer after the restart",
            Duration::from_secs(120),
            |_| (count("pong") > pongs).then_some(()),
        )
        .await;

    // The turn timeout.
    post("third slow");
    reached("third slow").await;
    stack
        .wait_for_bot_post("the timeout notice", Some(&root), "SM_TURN_TIMEOUT_SECS")
        .await;
    let interrupted = count("turn was interrupted");
    stack
        .wait_for(
            "the timed-out turn interrupted",
            Duration::from_secs(30),
            |_| (count("turn was interrupted") >= interrupted.max(3)).then_some(()),
        )
        .await;
    post("!stop");
    let session = stack.session_at(&channel, &root).await;
    stack
        .wait_for_state(
            &session.id,
            session_manager::store::SessionState::Ended,
            Duration::from_secs(120),
        )
        .await;
    stack.finish().await;
}
