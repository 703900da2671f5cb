//! Profiles (`SM_PROFILES_FILE`) end to end on the testbed: fake Mattermost → bot → real SSH →
//! real podman → the real Claude Code CLI → the scripted model.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use session_manager::runtime::shell::Script;
use session_manager::store::SessionKind;
use support::model_server::{ModelRequest, Reply, Script as ModelScript};
use support::stack::{Stack, READY_TIMEOUT};

/// The tool names a model request offered the model.
fn tools_of(request: &ModelRequest) -> Vec<String> {
    request.body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect()
}

/// Whether a request came from the orchestrator (its system prompt says so).
fn from_orchestrator(request: &ModelRequest) -> bool {
    request.system_text.contains("You are an orchestrator")
}

/// Permission cards for `tool` in `root`'s thread.
fn cards(stack: &Stack, root: &str, tool: &str) -> usize {
    stack
        .fake
        .thread(root)
        .iter()
        .filter(|p| p.props.to_string().contains(&format!("Permission: {tool}")))
        .count()
}

/// The `args` of the processes in a container (`podman top`).
async fn container_args(stack: &Stack, container: &str) -> String {
    let mut top = Script::new();
    top.command("podman", &["top", container, "args"])
        .expect("quote");
    stack.vm_run(&top).await.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_profile_with_a_denied_tool_never_asks_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("profiles.toml");
    std::fs::write(
        &file,
        r#"
[profile.default]
description = "What everyone gets"
model = "claude-sonnet-4-5"

[profile.locked]
description = "No shell"
model = "claude-haiku-4-5"
denied_tools = ["Bash"]
users = ["alice"]

[profile.secret]
users = ["carol"]
"#,
    )
    .expect("write");
    let bash = Reply::tool_use(
        "Bash",
        json!({"command": "sh -c 'echo alpha > /tmp/alpha && cat /tmp/alpha'", "description": "a test command"}),
    );
    let plan = "Two workers.\n\n[CREATE_SESSION: acme/widgets --profile=locked] run alpha\n\n[CREATE_SESSION: acme/widgets --profile=secret] anything\n";
    let script = ModelScript::new()
        .on_last_user("spawn them", Reply::text(plan))
        .on_last_user("run alpha", bash)
        .fallback(Reply::text("ok"));
    let stack = Stack::start_with(
        script,
        &[
            ("profiles-file", file.display().to_string()),
            ("callback-url", "{callback}".into()),
            // Bash asks in this mode: only the profile keeps the card away.
            ("permission-mode", "acceptEdits".into()),
            ("allowed-repos", "acme/*".into()),
        ],
    )
    .await;

    // Who may pick what: bob is not among `locked`'s users, and nobody has `nope`.
    stack
        .fake
        .post_as(
            &stack.bob,
            &stack.town,
            None,
            "@claude start acme/widgets --profile=locked",
        )
        .expect("post");
    let refused = stack
        .wait_for_bot_post("bob's refusal", None, "may not use the profile `locked`")
        .await;
    assert!(
        refused.message.contains("profiles you may pick: `default`"),
        "{}",
        refused.message
    );
    stack
        .fake
        .post_as(
            &stack.alice,
            &stack.town,
            None,
            "@claude start acme/widgets --profile=nope",
        )
        .expect("post");
    let unknown = stack
        .wait_for_bot_post("the unknown profile", None, "there is no profile `nope`")
        .await;
    assert!(
        unknown.message.contains("`default`, `locked`"),
        "alice's choices: {}",
        unknown.message
    );
    assert!(
        !unknown.message.contains("`secret`"),
        "a profile alice may not pick is not offered: {}",
        unknown.message
    );
    let sessions = stack.store.active_sessions().await.expect("sessions");
    assert!(
        sessions.is_empty(),
        "refused starts start nothing: {sessions:?}"
    );

    // The orchestrator runs with the default profile.
    let (channel, orch_root) = stack
        .start_session("@claude orchestrate acme/widgets")
        .await;
    let orch = stack.session_at(&channel, &orch_root).await;
    assert_eq!(
        orch.profile.as_ref().map(|p| p.name.as_str()),
        Some("default")
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&orch_root), "spawn them")
        .expect("post");

    // Its worker gets the profile the marker names, and runs its task.
    let worker = {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let children = stack.store.children(&orch.id).await.expect("children");
            if let Some(worker) = children
                .into_iter()
                .find(|c| c.kind == SessionKind::Worker && c.container_id.is_some())
            {
                break worker;
            }
            assert!(Instant::now() < deadline, "no worker came up");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    assert_eq!(
        worker.profile.as_ref().map(|p| p.name.as_str()),
        Some("locked"),
        "recorded with the session"
    );
    // The worker's agent asked for Bash; the CLI refused it itself and the model was told.
    let refusal = stack
        .wait_for("the worker's Bash refusal", READY_TIMEOUT, |s| {
            s.model
                .requests()
                .into_iter()
                .filter(|r| !from_orchestrator(r))
                .flat_map(|r| r.tool_results())
                .find(|t| t.is_error)
        })
        .await;
    println!("the CLI's answer to a denied tool: {}", refusal.content);
    let worker_requests: Vec<ModelRequest> = stack
        .model
        .requests()
        .into_iter()
        .filter(|r| !from_orchestrator(r) && r.path.starts_with("/v1/messages"))
        .filter(|r| r.last_user_text.contains("run alpha") || !r.tool_results().is_empty())
        .collect();
    assert!(!worker_requests.is_empty());
    for request in &worker_requests {
        assert_eq!(request.model, "claude-haiku-4-5", "the profile's model");
        let tools = tools_of(request);
        assert!(
            !tools.iter().any(|t| t == "Bash"),
            "Bash is not even offered to the model: {tools:?}"
        );
    }
    let args = container_args(&stack, worker.container_id.as_deref().expect("container")).await;
    assert!(
        args.contains("--disallowedTools Bash") && args.contains("--model claude-haiku-4-5"),
        "the CLI runs with the profile's flags: {args}"
    );
    assert_eq!(
        cards(&stack, &worker.thread_id, "Bash"),
        0,
        "no card for a denied tool"
    );

    // The marker naming a profile alice may not pick was refused, and the orchestrator told.
    stack
        .wait_for("the refused spawn", Duration::from_secs(120), |s| {
            s.model.requests().into_iter().find(|r| {
                from_orchestrator(r)
                    && r.last_user_text.contains("[SESSION_ERROR:")
                    && r.last_user_text
                        .contains("may not use the profile `secret`")
            })
        })
        .await;
    let children = stack.store.children(&orch.id).await.expect("children");
    assert_eq!(children.len(), 1, "only the allowed worker: {children:?}");

    // `!profile` shows what the thread's session runs with.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&worker.thread_id), "!profile")
        .expect("post");
    let shown = stack
        .wait_for_bot_post("!profile", Some(&worker.thread_id), "**Profile `locked`**")
        .await;
    assert!(
        shown.message.contains("denied: `Bash`") && shown.message.contains("claude-haiku-4-5"),
        "{}",
        shown.message
    );

    // Without the profile, the same request asks: the orchestrator (default profile, Bash
    // allowed by the CLI but not by the mode) gets a card for it.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&orch_root), "run alpha")
        .expect("post");
    stack
        .wait_for("the orchestrator's card", Duration::from_secs(120), |s| {
            (cards(s, &orch_root, "Bash") > 0).then_some(())
        })
        .await;
    let orch_request = stack
        .model
        .requests()
        .into_iter()
        .find(|r| from_orchestrator(r) && r.last_user_text.contains("run alpha"))
        .expect("the orchestrator's request");
    assert_eq!(
        orch_request.model, "claude-sonnet-4-5",
        "the default profile's model"
    );
    assert!(tools_of(&orch_request).iter().any(|t| t == "Bash"));

    stack.finish().await;
}
