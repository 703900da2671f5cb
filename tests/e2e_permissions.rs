//! Tool permissions answered from chat, end to end on the testbed: fake Mattermost → bot →
//! real SSH → real podman → the real Claude Code CLI (`--permission-prompt-tool stdio`) → the
//! scripted model, whose tool calls the CLI runs for real in the container.

mod support;

use std::time::Duration;

use serde_json::json;
use support::mattermost::{ClickOutcome, Post};
use support::model_server::{Reply, Script as ModelScript};
use support::stack::Stack;

/// The open permission cards in `root`'s thread for `tool` (cards with buttons).
fn open_cards(stack: &Stack, root: &str, tool: &str) -> Vec<Post> {
    stack
        .fake
        .thread(root)
        .into_iter()
        .filter(|p| {
            let props = p.props.to_string();
            props.contains(&format!("Permission: {tool}")) && has_buttons(p)
        })
        .collect()
}

/// Whether a card still has buttons.
fn has_buttons(post: &Post) -> bool {
    post.props["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| a["actions"].as_array().is_some_and(|b| !b.is_empty()))
}

/// Every permission card for `tool` in `root`'s thread, open or decided.
fn all_cards(stack: &Stack, root: &str, tool: &str) -> Vec<Post> {
    stack
        .fake
        .thread(root)
        .into_iter()
        .filter(|p| p.props.to_string().contains(&format!("Permission: {tool}")))
        .collect()
}

/// Waits for a new open card for `tool` (one not in `seen`).
async fn next_card(stack: &Stack, root: &str, tool: &str, seen: usize) -> Post {
    stack
        .wait_for(
            &format!("permission card #{} for {tool}", seen + 1),
            Duration::from_secs(120),
            |s| {
                if all_cards(s, root, tool).len() > seen {
                    open_cards(s, root, tool).into_iter().last()
                } else {
                    None
                }
            },
        )
        .await
}

/// How many of the bot's posts in the thread contain `needle`.
fn count(stack: &Stack, root: &str, needle: &str) -> usize {
    let bot = stack.fake.bot_user_id();
    stack
        .fake
        .thread(root)
        .iter()
        .filter(|p| p.user_id == bot && p.message.contains(needle))
        .count()
}

async fn wait_count(stack: &Stack, root: &str, needle: &str, n: usize) {
    stack
        .wait_for(&format!("{n} × {needle}"), Duration::from_secs(120), |s| {
            (count(s, root, needle) >= n).then_some(())
        })
        .await;
}

/// Whether some tool result the model received contains `needle`.
fn model_saw_tool_result(stack: &Stack, needle: &str) -> bool {
    stack
        .model
        .requests()
        .iter()
        .any(|r| r.tool_results().iter().any(|t| t.content.contains(needle)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tool_permissions_are_answered_from_the_thread_and_the_mode_switches() {
    let bash = |command: &str| {
        Reply::tool_use(
            "Bash",
            json!({"command": command, "description": "a test command"}),
        )
    };
    let write = |name: &str| {
        Reply::tool_use(
            "Write",
            json!({"file_path": format!("/workspaces/widgets/{name}"), "content": "hello\n"}),
        )
    };
    // Tool results first: the CLI's follow-up request ends with the tool result.
    let script = ModelScript::new()
        .on_tool_result("alpha", Reply::text("alpha done"))
        .on_tool_result("not beta, use gamma", Reply::text("understood, no beta"))
        .on_tool_result("only plan", Reply::text("ok, planning only"))
        .on_tool_result("Nobody answered", Reply::text("gave up on delta"))
        .on_tool_result("notes.txt", Reply::text("notes saved"))
        .on_last_user("run alpha", bash("sh -c 'echo alpha'"))
        .on_last_user("try beta", bash("sh -c 'echo beta'"))
        .on_last_user("try delta", bash("sh -c 'echo delta'"))
        .on_last_user("write notes", write("notes.txt"))
        .on_last_user("write the plan", write("plan.txt"))
        .fallback(Reply::text("ok"));
    let stack = Stack::start_with(
        script,
        &[
            ("callback-url", "{callback}".into()),
            ("permission-mode", "acceptEdits".into()),
            ("permission-timeout-secs", "10".into()),
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
    let click = |post: &Post, action: &'static str, user: &str| {
        let (id, user) = (post.id.clone(), user.to_owned());
        let fake = &stack.fake;
        async move {
            match fake.click(&id, action, &user).await {
                ClickOutcome::Ok { response } => response,
                other => panic!("the click failed: {other:?}"),
            }
        }
    };

    // A command asks; someone who is not the session's is refused; Allow once runs it.
    say("run alpha");
    let card = next_card(&stack, &root, "Bash", 0).await;
    assert!(
        card.props.to_string().contains("echo alpha"),
        "the command is shown"
    );
    // Bob sees the channel but is not one of the session's people.
    stack.fake.add_channel_member(&channel, &stack.bob);
    let refused = click(&card, "allowonce", &stack.bob).await;
    assert!(
        refused.to_string().contains("Only the session's owner"),
        "{refused}"
    );
    assert_eq!(open_cards(&stack, &root, "Bash").len(), 1, "still open");
    click(&card, "allowonce", &stack.alice).await;
    wait_count(&stack, &root, "alpha done", 1).await;
    let decided = stack.fake.post(&card.id).expect("card");
    assert!(
        decided.props.to_string().contains("Allowed once by @alice") && !has_buttons(&decided),
        "the decision replaced the buttons: {}",
        decided.props
    );
    // Single use: the buttons are gone for everyone, so a second click cannot even be made.
    match stack.fake.click(&card.id, "deny", &stack.alice).await {
        ClickOutcome::Failed { status: 404, .. } => {}
        other => panic!("a decided card has no buttons: {other:?}"),
    }

    // The same command asks again; Allow for this session ends the asking.
    say("run alpha again");
    let card = next_card(&stack, &root, "Bash", 1).await;
    assert!(card.props.to_string().contains("for this session"));
    // Two people's clicks at once (the owner and an admin would race the same way): exactly
    // one decides.
    let (first, second) = tokio::join!(
        stack.fake.click(&card.id, "allowsession", &stack.alice),
        stack.fake.click(&card.id, "allowsession", &stack.alice),
    );
    wait_count(&stack, &root, "alpha done", 2).await;
    let session = stack.session_at(&channel, &root).await;
    let decisions = stack
        .store
        .audit_log(Some(&session.id), 100)
        .await
        .expect("audit")
        .into_iter()
        .filter(|e| e.entry.action == "tool_allowed_session")
        .count();
    assert_eq!(decisions, 1, "one decision: {first:?} / {second:?}");
    say("run alpha a third time");
    wait_count(&stack, &root, "alpha done", 3).await;
    assert_eq!(
        all_cards(&stack, &root, "Bash").len(),
        2,
        "allowed for the session: not asked again"
    );

    // Deny, then a reply in the thread: the agent gets it as the reason.
    say("try beta");
    let card = next_card(&stack, &root, "Bash", 2).await;
    click(&card, "deny", &stack.alice).await;
    say("not beta, use gamma");
    wait_count(&stack, &root, "understood, no beta", 1).await;
    assert!(model_saw_tool_result(
        &stack,
        "Denied by @alice: not beta, use gamma"
    ));
    assert!(
        !stack
            .model
            .requests()
            .iter()
            .any(|r| r.last_user_text == "not beta, use gamma"),
        "the reason went with the denial, not as a turn of its own"
    );

    // Nobody answers: the owner is reminded once, then the use is denied.
    say("try delta");
    next_card(&stack, &root, "Bash", 3).await;
    wait_count(&stack, &root, "gave up on delta", 1).await;
    assert!(model_saw_tool_result(&stack, "Nobody answered"));
    assert_eq!(
        count(&stack, &root, "is waiting for an answer"),
        1,
        "one reminder"
    );
    assert!(all_cards(&stack, &root, "Bash")
        .iter()
        .any(|c| c.props.to_string().contains("nobody answered")));
    assert!(open_cards(&stack, &root, "Bash").is_empty());

    // acceptEdits: an edit does not ask.
    say("write notes");
    wait_count(&stack, &root, "notes saved", 1).await;
    assert!(
        all_cards(&stack, &root, "Write").is_empty(),
        "an edit did not ask"
    );

    // !mode plan takes effect at once: the same kind of edit now asks.
    say("!mode plan");
    wait_count(&stack, &root, "Permission mode is now `plan`", 1).await;
    say("!status");
    wait_count(&stack, &root, "Permission mode: `plan`", 1).await;
    say("write the plan");
    let card = next_card(&stack, &root, "Write", 0).await;
    click(&card, "deny", &stack.alice).await;
    say("only plan for now");
    wait_count(&stack, &root, "ok, planning only", 1).await;

    say("!stop");
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
