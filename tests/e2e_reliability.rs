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
