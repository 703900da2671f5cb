//! Spending caps end to end on the testbed (fake Mattermost → bot → real SSH → real podman →
//! the real Claude Code CLI, whose per-turn cost comes from the scripted model's usage).

mod support;

use std::time::Duration;

use support::mattermost::{ClickOutcome, Post};
use support::model_server::{Reply, Script as ModelScript};
use support::stack::Stack;

/// The open budget card in `root`'s thread, if any.
fn open_budget_card(stack: &Stack, root: &str) -> Option<Post> {
    stack.fake.thread(root).into_iter().find(|p| {
        p.props.to_string().contains("Budget reached")
            && p.props["attachments"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["actions"].as_array().is_some_and(|b| !b.is_empty()))
    })
}

/// How many of the model's requests had `text` as their newest user message.
fn requests_for(stack: &Stack, text: &str) -> usize {
    stack
        .model
        .requests()
        .iter()
        .filter(|r| r.last_user_text.contains(text))
        .count()
}

/// A session budget of a cent: the turn that crosses it finishes, the next message waits
/// with a card, `!cost` says so, and **Add** lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spent_session_budget_holds_messages_until_the_card_adds_to_it() {
    let script = ModelScript::new()
        .on_last_user("first question", Reply::text("First answer."))
        .on_last_user("second question", Reply::text("Second answer."))
        .fallback(Reply::text("ok"));
    let stack = Stack::start_with(
        script,
        &[
            ("callback-url", "{callback}".into()),
            ("session-budget-usd", "0.01".into()),
        ],
    )
    .await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let say = |text: &str| {
        stack
            .fake
            .post_as(&stack.alice, &channel, Some(&root), text)
            .expect("post");
    };
    say("first question");
    stack
        .wait_for_bot_post(
            "the first answer, past the cap",
            Some(&root),
            "First answer.",
        )
        .await;
    // The turn's cost is recorded with its result, right after its text.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let session = loop {
        let session = stack.session_at(&channel, &root).await;
        if session.stats.cost_usd >= 0.01 {
            break session;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the turn's cost was never recorded: {}",
            session.stats.cost_usd
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    say("second question");
    let card = stack
        .wait_for("the budget card", Duration::from_secs(60), |s| {
            open_budget_card(s, &root)
        })
        .await;
    // The card comes when the message would have gone to Claude: it did not.
    assert_eq!(requests_for(&stack, "second question"), 0, "held");
    assert!(
        card.props.to_string().contains("of $0.01"),
        "{}",
        card.props
    );
    say("!cost");
    stack
        .wait_for_bot_post("the cost report", Some(&root), "reached")
        .await;
    // Someone who is not the owner cannot raise it.
    stack.fake.add_channel_member(&channel, &stack.bob);
    match stack.fake.click(&card.id, "addbudget", &stack.bob).await {
        ClickOutcome::Ok { response } => assert!(
            response.to_string().contains("Only the session's owner"),
            "{response}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(requests_for(&stack, "second question"), 0, "still held");
    match stack.fake.click(&card.id, "addbudget", &stack.alice).await {
        ClickOutcome::Ok { .. } => {}
        other => panic!("{other:?}"),
    }
    stack
        .wait_for_bot_post("the held message's answer", Some(&root), "Second answer.")
        .await;
    assert_eq!(requests_for(&stack, "second question"), 1);
    let raised = stack.fake.post(&card.id).expect("card").props.to_string();
    assert!(raised.contains("added $0.01"), "{raised}");

    say("!stop");
    stack
        .wait_for_state(
            &session.id,
            session_manager::store::SessionState::Ended,
            Duration::from_secs(120),
        )
        .await;
    stack.finish().await;
}

/// An orchestrator's budget covers its children: once the orchestrator spent it, a worker's
/// first task waits with a card in the orchestrator's thread, and **Add** releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orchestrator_budget_holds_its_children() {
    let script = ModelScript::new()
        .on_last_user("write the parser", Reply::text("working on the parser"))
        .on_last_user(
            "plan the work",
            Reply::text("The plan.\n\n[CREATE_SESSION: acme/widgets] write the parser\n"),
        )
        .fallback(Reply::text("ok"));
    let stack = Stack::start_with(
        script,
        &[
            ("callback-url", "{callback}".into()),
            ("orchestrator-budget-usd", "0.01".into()),
            ("allowed-repos", "acme/*".into()),
        ],
    )
    .await;
    let (channel, root) = stack
        .start_session("@claude orchestrate acme/widgets")
        .await;
    let orch = stack.session_at(&channel, &root).await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "plan the work")
        .expect("post");
    let card = stack
        .wait_for("the family's budget card", Duration::from_secs(300), |s| {
            open_budget_card(s, &root)
        })
        .await;
    assert!(
        card.props.to_string().contains("and its sessions"),
        "{}",
        card.props
    );
    let children = stack.store.children(&orch.id).await.expect("children");
    assert_eq!(children.len(), 1, "the worker was started");
    // Once the worker is up, its task is the next thing it would send.
    stack
        .wait_for_bot_post("the worker ready", Some(&children[0].thread_id), "Ready")
        .await;
    assert_eq!(
        requests_for(&stack, "write the parser"),
        0,
        "the worker's task waits"
    );
    match stack.fake.click(&card.id, "addbudget", &stack.alice).await {
        ClickOutcome::Ok { .. } => {}
        other => panic!("{other:?}"),
    }
    let worker = &children[0];
    stack
        .wait_for_bot_post(
            "the worker's answer once released",
            Some(&worker.thread_id),
            "working on the parser",
        )
        .await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    for id in [&orch.id, &worker.id] {
        stack
            .wait_for_state(
                id,
                session_manager::store::SessionState::Ended,
                Duration::from_secs(120),
            )
            .await;
    }
    stack.finish().await;
}
