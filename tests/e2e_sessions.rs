//! End to end: the whole bot (`serve`) against the fake Mattermost, the testbed's real sshd,
//! rootless podman, devcontainer CLI and Claude Code CLI, and the scripted model server.

mod support;

use std::time::{Duration, Instant};

use session_manager::runtime::shell::Script;
use session_manager::runtime::ssh::SshPool;
use session_manager::store::{EndReason, SessionKind, SessionState};
use support::model_server::{Reply, Script as ModelScript};
use support::stack::{kill_ssh_masters_under, vm_ssh_config, BotProcess, Stack, READY_TIMEOUT};
use support::testbed::Testbed;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thread_drives_the_real_cli_in_a_devcontainer() {
    let script = ModelScript::new()
        .on_last_user("hello there", Reply::text("Hi from the scripted model."))
        .on_last_user(
            "make the marker file",
            Reply::bash("echo tool-ran > marker.txt && ls marker.txt"),
        )
        .on_tool_result("marker.txt", Reply::text("The marker file is made."))
        .fallback(Reply::text("ok"));
    let stack = Stack::start(script).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let session = stack.session_at(&channel, &root).await;
    assert_eq!(session.state(), SessionState::Idle);
    let container = session.container_id.clone().expect("container recorded");
    // The image `devcontainer up` built for this workspace (the VM user's uid baked in).
    let mut image = Script::new();
    image
        .raw_then(
            "podman container inspect --format '{{.ImageName}}'",
            &[container.as_str()],
        )
        .expect("q");
    let uid_image = stack.vm_run(&image).await.stdout.trim().to_owned();
    assert!(
        uid_image.contains("/vsc-widgets-") && uid_image.contains("-uid"),
        "a per-workspace -uid image: {uid_image}"
    );

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "hello there")
        .expect("post");
    stack
        .wait_for_bot_post(
            "the model's answer in the thread",
            Some(&root),
            "Hi from the scripted model.",
        )
        .await;
    let first = stack.model.requests();
    assert!(
        first
            .iter()
            .any(|r| r.last_user_text.contains("hello there")),
        "the CLI sent the user's text"
    );
    assert!(
        first
            .iter()
            .any(|r| r.system_text.contains("NETWORK_REQUEST")),
        "the marker protocol is in the system prompt"
    );

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "make the marker file")
        .expect("post");
    stack
        .wait_for_bot_post(
            "the answer after the tool ran",
            Some(&root),
            "The marker file is made.",
        )
        .await;
    assert!(
        stack.bot_post(Some(&root), "Bash").is_some(),
        "the tool call is shown as a compact line"
    );
    let workspace = stack
        .store
        .session(&session.id)
        .await
        .expect("read")
        .and_then(|s| s.workspace_path)
        .expect("workspace");
    let mut check = Script::new();
    check
        .command("cat", &[format!("{workspace}/marker.txt")])
        .expect("q");
    let out = stack.vm_run(&check).await;
    assert_eq!(
        out.stdout.trim(),
        "tool-ran",
        "the real tool ran in the container on the VM"
    );
    let stats = stack
        .store
        .session(&session.id)
        .await
        .expect("read")
        .expect("row")
        .stats;
    assert_eq!(stats.message_count, 2);
    assert!(
        stats.output_tokens > 0 && stats.context_tokens > 0,
        "{stats:?}"
    );

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&session.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    let row = stack
        .store
        .session(&session.id)
        .await
        .expect("read")
        .expect("row");
    assert_eq!(row.end().expect("ended").reason, EndReason::UserRequested);
    let mut inspect = Script::new();
    inspect
        .raw_then("podman container exists", &[container.as_str()])
        .expect("q");
    assert_eq!(
        stack.vm_run(&inspect).await.status,
        Some(1),
        "the container is removed"
    );
    let mut image = Script::new();
    image
        .raw_then("podman image exists", &[uid_image.as_str()])
        .expect("q");
    // Removed in the background once no `devcontainer up` runs (the image lock), which the
    // removal waits for as long as the bot lets it: other tests' sessions start meanwhile.
    let deadline = Instant::now()
        + Duration::from_secs(
            u64::from(session_manager::runtime::devcontainer::IMAGE_LOCK_WAIT_SECS) + 30,
        );
    while stack.vm_run(&image).await.status != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the workspace's -uid image is removed with it"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut sandbox = Script::new();
    sandbox
        .raw_then(
            "podman image exists",
            &[Testbed::load().get("SM_TEST_SANDBOX_IMAGE")],
        )
        .expect("q");
    assert_eq!(
        stack.vm_run(&sandbox).await.status,
        Some(0),
        "the sandbox image stays"
    );
    assert_eq!(
        stack
            .store
            .lock_holder("clone:local/acme/widgets")
            .await
            .expect("lock"),
        None,
        "the clone lock is released"
    );
    let metrics = reqwest::get(stack.app.as_ref().expect("app").url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("session_manager_sessions_ended_total{reason=\"user_requested\"}")),
        "the end is counted: {metrics}"
    );
    assert!(
        metrics.contains("session_manager_chat_posts_received_total"),
        "inbound posts are counted"
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_bot_comes_back_and_the_thread_continues_the_same_conversation() {
    let tb = Testbed::load();
    let script = ModelScript::new()
        .on_last_user("which animal", Reply::text("You told me: zebra."))
        .on_last_user(
            "remember the word zebra",
            Reply::text("Noted, I will remember it."),
        )
        .fallback(Reply::text("ok"));
    let mut stack = Stack::start(script).await;
    // This test runs the bot as a process of its own.
    if let Some(app) = stack.app.take() {
        app.stop().await;
    }
    let connections = stack.fake.websocket_connections();
    let bot = BotProcess::start(&stack, &tb);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.fake.websocket_connections() <= connections.saturating_sub(1)
        || stack.fake.websocket_connections() == 0
    {
        assert!(Instant::now() < deadline, "the bot process never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    stack
        .fake
        .post_as(
            &stack.alice,
            &channel,
            Some(&root),
            "remember the word zebra",
        )
        .expect("post");
    stack
        .wait_for_bot_post(
            "the first answer",
            Some(&root),
            "Noted, I will remember it.",
        )
        .await;

    bot.kill();
    let session = stack.session_at(&channel, &root).await;
    assert!(
        session.state().is_active(),
        "a killed bot ends nothing: {:?}",
        session.state()
    );
    let conversation = session
        .agent_session_id
        .clone()
        .expect("conversation id stored");

    let _bot = BotProcess::start(&stack, &tb);
    stack
        .wait_for_bot_post("the resume notice", Some(&root), "continues where it was")
        .await;
    stack
        .fake
        .post_as(
            &stack.alice,
            &channel,
            Some(&root),
            "which animal did I name?",
        )
        .expect("post");
    stack
        .wait_for_bot_post(
            "the answer after the restart",
            Some(&root),
            "You told me: zebra.",
        )
        .await;
    let last = stack
        .model
        .last_request_with("which animal")
        .expect("request after the restart");
    assert!(
        last.all_messages_text().contains("remember the word zebra"),
        "the model saw the earlier conversation"
    );
    let after = stack
        .store
        .session(&session.id)
        .await
        .expect("read")
        .expect("row");
    assert_eq!(
        after.agent_session_id.as_deref(),
        Some(conversation.as_str()),
        "same conversation id"
    );
    drop(_bot);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_ssh_master_is_replaced_and_no_queued_message_is_lost() {
    let tb = Testbed::load();
    let script = ModelScript::new()
        .on_last_user(
            "second message",
            Reply::text("Answer to the second message."),
        )
        .on_last_user("first message", Reply::text("Answer to the first message."))
        .fallback(Reply::text("ok"));
    let mut stack = Stack::start(script).await;
    let bot = stack.switch_to_process(&tb).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "first message")
        .expect("post");
    stack
        .wait_for_bot_post(
            "the first answer",
            Some(&root),
            "Answer to the first message.",
        )
        .await;

    let killed = kill_ssh_masters_under(bot.tmp.path());
    assert!(killed >= 1, "found the bot's SSH master");
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "second message")
        .expect("post");
    stack
        .wait_for_bot_post(
            "the recovery notice",
            Some(&root),
            "connection to Claude was lost",
        )
        .await;
    stack
        .wait_for_bot_post(
            "the answer to the message sent during the outage",
            Some(&root),
            "Answer to the second message.",
        )
        .await;
    drop(bot);
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worktrees_the_clone_lock_and_parallel_sessions() {
    let script = ModelScript::new()
        .on_last_user(
            "ping-one",
            Reply::text("pong-one").after(Duration::from_millis(300)),
        )
        .on_last_user("ping-three", Reply::text("pong-three"))
        .fallback(Reply::text("ok"));
    let stack = Stack::start(script).await;
    let (channel, main_root) = stack.start_session("@claude start acme/widgets").await;
    let main = stack.session_at(&channel, &main_root).await;
    assert_eq!(main.worktree, None);
    assert_eq!(
        stack
            .store
            .lock_holder("clone:local/acme/widgets")
            .await
            .expect("lock")
            .as_deref(),
        Some(main.id.as_str())
    );

    // A second session on the main clone is refused and told to use --worktree.
    stack
        .fake
        .post_as(
            &stack.alice,
            &stack.town,
            None,
            "@claude start acme/widgets",
        )
        .expect("post");
    stack
        .wait_for("the clone-lock refusal", Duration::from_secs(60), |s| {
            s.fake.posts().into_iter().find(|p| {
                p.message.contains("in use by session") && p.message.contains("--worktree")
            })
        })
        .await;

    // With --worktree it runs beside the first one.
    stack
        .fake
        .post_as(
            &stack.alice,
            &stack.town,
            None,
            "@claude start acme/widgets --worktree=feature-one",
        )
        .expect("post");
    let wt_root = stack
        .wait_for(
            "the worktree session's thread",
            Duration::from_secs(30),
            |s| {
                s.bot_post(None, "worktree `feature-one`")
                    .filter(|p| p.root_id.is_empty())
            },
        )
        .await;
    stack
        .wait_for("the worktree session ready", READY_TIMEOUT, |s| {
            if let Some(failed) = s.bot_post(Some(&wt_root.id), "❌") {
                panic!("start failed: {}", failed.message);
            }
            s.bot_post(Some(&wt_root.id), "Ready")
        })
        .await;
    let wt = stack.session_at(&channel, &wt_root.id).await;
    let wt_path = wt.workspace_path.clone().expect("workspace");
    assert_eq!(
        wt_path,
        format!("{}/worktrees/acme/widgets/feature-one", stack.vm_root)
    );
    let mut branch = Script::new();
    branch
        .command(
            "git",
            &["-C", wt_path.as_str(), "rev-parse", "--abbrev-ref", "HEAD"],
        )
        .expect("q");
    assert_eq!(
        stack.vm_run(&branch).await.stdout.trim(),
        "feature-one",
        "the worktree has its own branch"
    );
    assert_ne!(
        wt.container_id, main.container_id,
        "each workspace has its own container"
    );

    // Two sessions at once, each answer in its own thread.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&main_root), "ping-one")
        .expect("post");
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&wt_root.id), "ping-three")
        .expect("post");
    stack
        .wait_for_bot_post("pong-one", Some(&main_root), "pong-one")
        .await;
    stack
        .wait_for_bot_post("pong-three", Some(&wt_root.id), "pong-three")
        .await;
    assert!(
        stack.bot_post(Some(&main_root), "pong-three").is_none(),
        "no crossing"
    );
    assert!(
        stack.bot_post(Some(&wt_root.id), "pong-one").is_none(),
        "no crossing"
    );

    // Stopping the worktree session removes its container and worktree; the lock stays with the first.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&wt_root.id), "!stop")
        .expect("post");
    stack
        .wait_for_state(&wt.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    let mut exists = Script::new();
    exists
        .command("test", &["-e", wt_path.as_str()])
        .expect("q");
    assert_eq!(
        stack.vm_run(&exists).await.status,
        Some(1),
        "the worktree is removed"
    );
    let mut listed = Script::new();
    listed
        .command(
            "git",
            &[
                "-C",
                &format!("{}/repos/local/acme/widgets", stack.vm_root),
                "worktree",
                "list",
            ],
        )
        .expect("q");
    assert!(
        !stack.vm_run(&listed).await.stdout.contains("feature-one"),
        "and pruned"
    );
    let mut container = Script::new();
    container
        .raw_then(
            "podman container exists",
            &[wt.container_id.as_deref().unwrap_or_default()],
        )
        .expect("q");
    assert_eq!(
        stack.vm_run(&container).await.status,
        Some(1),
        "its container is removed"
    );
    assert_eq!(
        stack
            .store
            .lock_holder("clone:local/acme/widgets")
            .await
            .expect("lock")
            .as_deref(),
        Some(main.id.as_str())
    );

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&main_root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&main.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    assert_eq!(
        stack
            .store
            .lock_holder("clone:local/acme/widgets")
            .await
            .expect("lock"),
        None
    );
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repositorys_devcontainer_and_the_thread_commands() {
    let script = ModelScript::new()
        .on_last_user("after restart", Reply::text("answer after restart"))
        .on_last_user("after clear", Reply::text("answer after clear"))
        .on_last_user(
            "show the marker",
            Reply::bash("echo REPO=$REPO_DEVCONTAINER"),
        )
        .on_tool_result("REPO=", Reply::text("I saw the marker."))
        .fallback(Reply::text("ok"));
    let stack = Stack::start(script).await;
    let (channel, root) = stack
        .start_session("@claude start acme/with-devcontainer")
        .await;
    let session = stack.session_at(&channel, &root).await;
    let mut config_dir = Script::new();
    config_dir
        .command(
            "test",
            &[
                "-e",
                &format!(
                    ".local/share/session-manager/devcontainers/{}/devcontainer.json",
                    session.id
                ),
            ],
        )
        .expect("q");
    assert_eq!(
        stack.vm_run(&config_dir).await.status,
        Some(1),
        "no fallback config was generated"
    );

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "show the marker")
        .expect("post");
    stack
        .wait_for_bot_post("the tool answer", Some(&root), "I saw the marker.")
        .await;
    let saw = stack
        .model
        .requests()
        .iter()
        .flat_map(|r| r.tool_results())
        .any(|t| t.content.contains("REPO=yes"));
    assert!(
        saw,
        "the repository's devcontainer.json (containerEnv REPO_DEVCONTAINER=yes) was used"
    );

    let t = Some(root.as_str());
    stack
        .fake
        .post_as(&stack.alice, &channel, t, "!context")
        .expect("post");
    let context = stack
        .wait_for("context", Duration::from_secs(30), |s| {
            s.bot_post(t, "messages: 1")
        })
        .await;
    assert!(
        context.message.contains("cost:") && context.message.contains("context"),
        "{}",
        context.message
    );
    stack
        .fake
        .post_as(&stack.alice, &stack.town, None, "@claude status")
        .expect("post");
    stack
        .wait_for("status", Duration::from_secs(30), |s| {
            s.bot_post(None, "Active sessions")
                .filter(|p| p.message.contains("acme/with-devcontainer"))
        })
        .await;

    stack
        .fake
        .post_as(&stack.alice, &channel, t, "!compact")
        .expect("post");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let row = stack
            .store
            .session(&session.id)
            .await
            .expect("read")
            .expect("row");
        if row.stats.compaction_count >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "compaction never reported: {:?}",
            row.stats
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let before = stack
        .store
        .session(&session.id)
        .await
        .expect("read")
        .expect("row")
        .agent_session_id;
    stack
        .fake
        .post_as(&stack.alice, &channel, t, "!clear")
        .expect("post");
    stack
        .wait_for_bot_post("the clear notice", t, "Started a fresh conversation")
        .await;
    let cleared = stack
        .store
        .session(&session.id)
        .await
        .expect("read")
        .expect("row")
        .agent_session_id;
    assert_ne!(
        cleared, before,
        "clear starts a new conversation id, stored"
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, t, "after clear")
        .expect("post");
    stack
        .wait_for_bot_post("answer after clear", t, "answer after clear")
        .await;
    let req = stack
        .model
        .last_request_with("after clear")
        .expect("request");
    assert!(
        !req.all_messages_text().contains("show the marker"),
        "a cleared conversation has no history"
    );

    stack
        .fake
        .post_as(&stack.alice, &channel, t, "!restart")
        .expect("post");
    stack
        .wait_for_bot_post("the restart notice", t, "conversation continues")
        .await;
    assert_eq!(
        stack
            .store
            .session(&session.id)
            .await
            .expect("read")
            .expect("row")
            .agent_session_id,
        cleared,
        "restart keeps the conversation"
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, t, "after restart")
        .expect("post");
    stack
        .wait_for_bot_post("answer after restart", t, "answer after restart")
        .await;
    let req = stack
        .model
        .last_request_with("after restart")
        .expect("request");
    assert!(
        req.all_messages_text().contains("after clear"),
        "restart resumed the same conversation"
    );

    stack
        .fake
        .post_as(&stack.alice, &channel, t, "!stop")
        .expect("post");
    stack
        .wait_for_state(&session.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_network_request_is_approved_into_the_firewall_and_the_agent_is_told() {
    use support::mattermost::ClickOutcome;
    use support::opnsense::{FakeOpnsense, ALIAS};
    let opn = FakeOpnsense::start("opn-key", "opn-secret").await;
    let script = ModelScript::new()
        .asks_for_pypi()
        .on_last_user(
            "[NETWORK_DENIED: registry.npmjs.org]",
            Reply::text("Understood, no npm then."),
        )
        .on_last_user(
            "install left-pad",
            Reply::text("That needs npm.\n[NETWORK_REQUEST: registry.npmjs.org]\n"),
        )
        .fallback(Reply::text("ok"));
    let stack = Stack::start_with(script, &opn.bot_settings("opn-key", "opn-secret")).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "install requests")
        .expect("post");
    let card = stack
        .wait_for("the approval card", Duration::from_secs(120), |s| {
            s.fake.thread(&root).into_iter().find(|p| {
                p.props.to_string().contains("pypi.org") && p.props.to_string().contains("Approve")
            })
        })
        .await;
    assert!(
        !stack
            .fake
            .thread(&root)
            .iter()
            .any(|p| p.message.contains("[NETWORK_REQUEST")),
        "the marker line is not shown as text"
    );
    let reconfigures = opn.reconfigure_count();
    let ClickOutcome::Ok { .. } = stack.fake.click(&card.id, "approve", &stack.alice).await else {
        panic!("the click failed")
    };
    stack
        .wait_for_bot_post(
            "the agent's answer after approval",
            Some(&root),
            "Thanks, pypi.org works now.",
        )
        .await;
    assert!(
        opn.alias_content(ALIAS).contains(&"pypi.org".to_owned()),
        "saved in the alias"
    );
    assert!(
        opn.applied_content(ALIAS).contains(&"pypi.org".to_owned()),
        "and reconfigured"
    );
    assert!(opn.reconfigure_count() > reconfigures);
    assert!(
        stack
            .model
            .requests()
            .iter()
            .any(|r| r.last_user_text.contains("[NETWORK_APPROVED: pypi.org]")),
        "the agent's next turn received the approval"
    );

    // Deny: the agent hears it, the firewall hears nothing.
    let calls_before = opn.requests().len();
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "install left-pad")
        .expect("post");
    let card = stack
        .wait_for("the second card", Duration::from_secs(120), |s| {
            s.fake.thread(&root).into_iter().find(|p| {
                p.props.to_string().contains("registry.npmjs.org")
                    && p.props.to_string().contains("Deny")
            })
        })
        .await;
    let ClickOutcome::Ok { .. } = stack.fake.click(&card.id, "deny", &stack.alice).await else {
        panic!("the click failed")
    };
    stack
        .wait_for_bot_post(
            "the agent's answer after denial",
            Some(&root),
            "Understood, no npm then.",
        )
        .await;
    let new_calls: Vec<_> = opn
        .requests()
        .into_iter()
        .skip(calls_before)
        .filter(|(method, _, _)| method == "POST")
        .collect();
    assert!(
        new_calls.is_empty(),
        "no firewall change on deny: {new_calls:?}"
    );
    assert!(!opn
        .alias_content(ALIAS)
        .contains(&"registry.npmjs.org".to_owned()));
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orchestrator_spawns_stops_and_lists_its_workers_and_reviewers() {
    let stack = Stack::start_with(
        ModelScript::new().fallback(Reply::text("ok")),
        &[
            ("max-child-sessions", "2".into()),
            ("allowed-repos", "acme/*".into()),
        ],
    )
    .await;
    // A session of someone else's, which the orchestrator must not be able to stop.
    let (foreign_channel, foreign_root) = stack
        .start_session("@claude start acme/with-devcontainer")
        .await;
    let foreign = stack.session_at(&foreign_channel, &foreign_root).await;
    let plan = format!(
        "Here is the plan.\n\n[CREATE_SESSION: acme/widgets] implement the parser\n\n[CREATE_SESSION: acme/widgets] implement the parser\n\n[CREATE_SESSION: acme/does-not-exist] anything\n\n[CREATE_REVIEWER: acme/widgets] review the parser\n\n[CREATE_SESSION: not a repo!!]\n\n[CREATE_SESSION: elsewhere/tool] outside the allowlist\n\n[STOP_SESSION: {}]\n",
        &foreign.id[..8]
    );
    stack.model.set_script(
        ModelScript::new()
            .on_last_user("implement the parser", Reply::text("working on the parser"))
            .on_last_user("review the parser", Reply::text("reviewing the parser"))
            .on_last_user("plan the work", Reply::text(plan))
            .on_last_user(
                "status please",
                Reply::text("[SESSION_STATUS]\n\n[CREATE_SESSION: acme/widgets] a third task\n"),
            )
            // Re-emitting the first spawn in a later turn creates nothing either.
            .on_last_user(
                "[SESSION_CREATED:",
                Reply::text("noted\n[CREATE_SESSION: acme/widgets] implement the parser\n"),
            )
            .fallback(Reply::text("ok")),
    );
    let (channel, orch_root) = stack
        .start_session("@claude orchestrate acme/widgets")
        .await;
    let orch = stack.session_at(&channel, &orch_root).await;
    assert_eq!(orch.kind, SessionKind::Orchestrator);
    // bob, invited to the orchestrator, is a participant of the children it spawns.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&orch_root), "!invite @bob")
        .expect("post");
    stack
        .wait_for_bot_post("the invitation", Some(&orch_root), "@bob can now talk")
        .await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&orch_root), "plan the work")
        .expect("post");

    // Both children come up in their own threads and get their task as first message.
    let children = {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let children = stack.store.children(&orch.id).await.expect("children");
            let answered = children.iter().filter(|c| {
                let needle = if c.kind == SessionKind::Worker {
                    "working on the parser"
                } else {
                    "reviewing the parser"
                };
                stack.bot_post(Some(&c.thread_id), needle).is_some()
            });
            if children.len() == 2 && answered.count() == 2 {
                break children;
            }
            assert!(Instant::now() < deadline, "children: {children:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let worker = children
        .iter()
        .find(|c| c.kind == SessionKind::Worker)
        .expect("worker")
        .clone();
    let reviewer = children
        .iter()
        .find(|c| c.kind == SessionKind::Reviewer)
        .expect("reviewer")
        .clone();
    for child in [&worker, &reviewer] {
        assert_eq!(child.parent_id.as_deref(), Some(orch.id.as_str()));
        assert_eq!(
            child.started_by, stack.alice,
            "the orchestrator's owner owns it"
        );
        assert_eq!(
            stack
                .store
                .participants(&child.id)
                .await
                .expect("participants"),
            std::slice::from_ref(&stack.bob),
            "children inherit the orchestrator's participants"
        );
        assert_eq!(
            child.channel_id, channel,
            "children live in the project channel"
        );
        let path = child.workspace_path.clone().expect("workspace");
        assert_eq!(
            path,
            format!(
                "{}/worktrees/acme/widgets/widgets-{}",
                stack.vm_root,
                &child.id[..8]
            ),
            "own worktree"
        );
        let root = stack.fake.post(&child.thread_id).expect("child root");
        assert!(
            root.message.contains(&orch.thread_id),
            "links to the orchestrator's thread: {}",
            root.message
        );
    }
    // The reviewer's agent runs in plan mode.
    let mut top = Script::new();
    top.command(
        "podman",
        &[
            "top",
            reviewer.container_id.as_deref().expect("container"),
            "args",
        ],
    )
    .expect("q");
    assert!(
        stack
            .vm_run(&top)
            .await
            .stdout
            .contains("--permission-mode plan"),
        "reviewer in plan mode"
    );

    // The orchestrator was told, with the right fields; duplicates and errors too.
    stack
        .wait_for("the replies", Duration::from_secs(120), |s| {
            let texts: Vec<String> = s
                .model
                .requests()
                .iter()
                .map(|r| r.last_user_text.clone())
                .collect();
            (texts
                .iter()
                .filter(|t| t.contains("[SESSION_ERROR:"))
                .count()
                >= 3)
                .then_some(())
        })
        .await;
    let told: Vec<String> = stack
        .model
        .requests()
        .iter()
        .map(|r| r.last_user_text.clone())
        .collect();
    let expected = format!(
        "[SESSION_CREATED: {} worker {} {}]",
        worker.id,
        worker.workspace_path.as_deref().unwrap_or_default(),
        worker.thread_id
    );
    assert!(
        told.iter().any(|t| t.contains(&expected)),
        "{expected} in {told:?}"
    );
    assert!(told
        .iter()
        .any(|t| t.contains(&format!("[SESSION_CREATED: {} reviewer", reviewer.id))));
    assert!(
        told.iter()
            .any(|t| t.contains("[SESSION_ERROR:") && t.contains("not a repo")),
        "malformed marker"
    );
    assert!(
        told.iter().any(|t| t.contains("[SESSION_ERROR: refused")),
        "foreign stop refused"
    );
    assert!(
        told.iter()
            .any(|t| t.contains("[SESSION_ERROR: unknown repository acme/does-not-exist")),
        "an unknown repository"
    );
    assert!(
        told.iter().any(|t| t.contains("[SESSION_ERROR:")
            && t.contains("refused: elsewhere/tool is outside the repositories sessions may use (SM_ALLOWED_REPOS)")),
        "a repository outside SM_ALLOWED_REPOS: {told:?}"
    );
    assert!(
        stack.fake.channel_by_name("elsewhere-tool").is_none(),
        "nothing made for it"
    );
    assert!(
        foreign_is_running(&stack, &foreign.id).await,
        "the foreign session still runs"
    );
    assert_eq!(
        stack
            .store
            .children(&orch.id)
            .await
            .expect("children")
            .len(),
        2,
        "repeated markers made one worker"
    );
    assert!(
        stack.bot_post(Some(&orch_root), "Spawned worker").is_some(),
        "a notice per spawn in its thread"
    );

    // Status: valid JSON describing both; a third child is over the limit.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&orch_root), "status please")
        .expect("post");
    let sessions = stack
        .wait_for("[SESSIONS: …]", Duration::from_secs(120), |s| {
            s.model.requests().into_iter().find_map(|r| {
                let start = r.last_user_text.find("[SESSIONS: ")? + "[SESSIONS: ".len();
                let end = r.last_user_text.rfind(']')?;
                serde_json::from_str::<serde_json::Value>(&r.last_user_text[start..end]).ok()
            })
        })
        .await;
    let list = sessions.as_array().expect("an array");
    assert_eq!(list.len(), 2);
    for entry in list {
        for field in [
            "id",
            "type",
            "repo",
            "branch",
            "worktree",
            "thread_id",
            "state",
            "message_count",
            "compaction_count",
            "idle_seconds",
        ] {
            assert!(entry.get(field).is_some(), "{field} missing in {entry}");
        }
    }
    assert!(list
        .iter()
        .any(|e| e["id"] == serde_json::Value::String(worker.id.clone()) && e["type"] == "worker"));
    stack
        .wait_for("the limit error", Duration::from_secs(120), |s| {
            s.model
                .requests()
                .iter()
                .any(|r| r.last_user_text.contains("[SESSION_ERROR: limit"))
                .then_some(())
        })
        .await;

    // STOP_SESSION stops the worker; the orchestrator hears it ended.
    stack.model.set_script(
        ModelScript::new()
            .on_last_user(
                "stop the worker",
                Reply::text(format!("[STOP_SESSION: {}]\n", &worker.id[..8])),
            )
            .fallback(Reply::text("ok")),
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&orch_root), "stop the worker")
        .expect("post");
    stack
        .wait_for_state(&worker.id, SessionState::Ended, Duration::from_secs(120))
        .await;
    stack
        .wait_for("[SESSION_ENDED: worker]", Duration::from_secs(120), |s| {
            s.model
                .requests()
                .iter()
                .any(|r| {
                    r.last_user_text
                        .contains(&format!("[SESSION_ENDED: {}]", worker.id))
                })
                .then_some(())
        })
        .await;

    // Stopping the orchestrator stops the reviewer.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&orch_root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&orch.id, SessionState::Ended, Duration::from_secs(120))
        .await;
    let reviewer_row = stack
        .wait_for_state(&reviewer.id, SessionState::Ended, Duration::from_secs(120))
        .await;
    assert_eq!(
        reviewer_row.end().expect("ended").reason,
        EndReason::ParentEnded
    );
    stack
        .fake
        .post_as(&stack.alice, &foreign_channel, Some(&foreign_root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&foreign.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    stack.finish().await;
}

/// A branch a test adds to one of the testbed's bare repositories (as the VM user, who owns
/// them), with a commit of its own on top of the default branch; removed when dropped, also
/// when the test fails.
struct RemoteBranch {
    git_dir: String,
    name: String,
    /// The branch's commit.
    commit: String,
}

impl RemoteBranch {
    async fn create(stack: &Stack, slug: &str, name: &str) -> Self {
        let base = Testbed::load().get("SM_TEST_GIT_BASE_URL");
        let root = base
            .strip_prefix("file://")
            .unwrap_or_else(|| panic!("SM_TEST_GIT_BASE_URL is not a file:// URL: {base}"));
        let git_dir = format!("{}/{slug}.git", root.trim_end_matches('/'));
        let mut s = Script::new();
        s.set("g", &git_dir)
            .and_then(|s| s.set("b", name))
            .expect("q")
            .raw(r#"c=$(git --git-dir="$g" -c user.name=sm-e2e -c user.email=sm-e2e@example.invalid commit-tree -p HEAD -m "the base of $b" "HEAD^{tree}")"#)
            // The empty old value: the branch must not exist yet.
            .raw(r#"git --git-dir="$g" update-ref "refs/heads/$b" "$c" """#)
            .raw(r#"printf '%s\n' "$c""#);
        let out = stack.vm_run(&s).await;
        assert!(out.success(), "cannot make {name}: {}", out.stderr);
        Self {
            git_dir,
            name: name.to_owned(),
            commit: out.stdout.trim().to_owned(),
        }
    }
}

impl Drop for RemoteBranch {
    fn drop(&mut self) {
        let (git_dir, name) = (self.git_dir.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let tb = Testbed::load();
                let Ok(vm) = SshPool::new(vm_ssh_config(&tb, Duration::from_secs(60), 1)) else {
                    return;
                };
                let mut s = Script::new();
                if s.set("g", &git_dir).and_then(|s| s.set("b", &name)).is_ok() {
                    s.raw(r#"git --git-dir="$g" update-ref -d "refs/heads/$b""#);
                    let _ = vm.run(&s).await;
                }
                vm.close().await;
            });
        })
        .join();
    }
}

/// `git -C dir ARGS…` on the VM, as its user: the trimmed output (panics when git fails).
async fn vm_git(stack: &Stack, dir: &str, args: &[&str]) -> String {
    let mut s = Script::new();
    let all: Vec<&str> = ["-C", dir].iter().chain(args).copied().collect();
    s.command("git", &all).expect("q");
    let out = stack.vm_run(&s).await;
    assert!(
        out.success(),
        "git {args:?} in {dir} failed: {}",
        out.stderr
    );
    out.stdout.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orchestrator_spawns_workers_on_new_branches_and_a_reviewer_on_an_existing_one() {
    let stack = Stack::start(ModelScript::new().fallback(Reply::text("ok"))).await;
    let (channel, orch_root) = stack
        .start_session("@claude orchestrate acme/widgets")
        .await;
    let orch = stack.session_at(&channel, &orch_root).await;
    let clone = orch
        .workspace_path
        .clone()
        .expect("the orchestrator's clone");
    let main_commit = vm_git(&stack, &clone, &["rev-parse", "origin/main"]).await;
    // Pushed after the orchestrator cloned: the children's fetch brings it.
    let review = RemoteBranch::create(
        &stack,
        "acme/widgets",
        &format!("review-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
    )
    .await;
    let commit = |branch: &str| {
        Reply::bash(format!(
            "printf '%s\\n' {branch} > {branch}.txt && git add {branch}.txt && git -c user.email=worker@example.invalid -c user.name=Worker commit -q -m 'work on {branch}' && echo COMMITTED-{branch}"
        ))
    };
    let plan = format!(
        "Two features and a review.\n\n[CREATE_SESSION: acme/widgets@feature-a] commit the feature-a work\n\n[CREATE_SESSION: acme/widgets@feature-b] commit the feature-b work\n\n[CREATE_REVIEWER: acme/widgets@{0}] look at {0}\n",
        review.name
    );
    stack.model.set_script(
        ModelScript::new()
            .on_tool_result("COMMITTED-feature-a", Reply::text("feature-a is committed"))
            .on_tool_result("COMMITTED-feature-b", Reply::text("feature-b is committed"))
            .on_last_user("commit the feature-a work", commit("feature-a"))
            .on_last_user("commit the feature-b work", commit("feature-b"))
            .on_last_user(
                format!("look at {}", review.name),
                Reply::text(format!("reviewing {}", review.name)),
            )
            .on_last_user("plan the work", Reply::text(plan))
            .fallback(Reply::text("ok")),
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&orch_root), "plan the work")
        .expect("post");

    // The three come up, each answering in its own thread once its work is done.
    let answer = |c: &session_manager::store::Session| match c.branch.as_deref() {
        Some("feature-a") => "feature-a is committed".to_owned(),
        Some("feature-b") => "feature-b is committed".to_owned(),
        _ => format!("reviewing {}", review.name),
    };
    let children = {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // A commit that failed in a worker's container: say how.
            if let Some(failed) = stack.model.requests().iter().find_map(|r| {
                r.tool_results()
                    .into_iter()
                    .find(|t| !t.content.contains("COMMITTED-"))
            }) {
                panic!("a worker's tool call failed: {failed:?}");
            }
            let children = stack.store.children(&orch.id).await.expect("children");
            for c in &children {
                if let Some(failed) = stack.bot_post(Some(&c.thread_id), "❌") {
                    panic!("a child failed to start: {}", failed.message);
                }
            }
            let answered = children
                .iter()
                .filter(|c| stack.bot_post(Some(&c.thread_id), &answer(c)).is_some())
                .count();
            if children.len() == 3 && answered == 3 {
                break children;
            }
            assert!(Instant::now() < deadline, "children: {children:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let child = |branch: &str| {
        children
            .iter()
            .find(|c| c.branch.as_deref() == Some(branch))
            .unwrap_or_else(|| panic!("no child on {branch}: {children:?}"))
            .clone()
    };
    let (a, b, reviewer) = (child("feature-a"), child("feature-b"), child(&review.name));
    assert_eq!(a.kind, SessionKind::Worker);
    assert_eq!(b.kind, SessionKind::Worker);
    assert_eq!(reviewer.kind, SessionKind::Reviewer);

    let worktrees: std::collections::HashSet<String> = children
        .iter()
        .map(|c| c.workspace_path.clone().expect("workspace"))
        .collect();
    assert_eq!(worktrees.len(), 3, "one worktree each: {worktrees:?}");
    assert!(!worktrees.contains(&clone), "none in the main clone");
    for (worker, other) in [(&a, "feature-b"), (&b, "feature-a")] {
        let branch = worker.branch.clone().expect("branch");
        let progress = stack
            .bot_post(Some(&worker.thread_id), "Ready")
            .expect("the start progress");
        assert!(
            progress.message.contains(&format!(
                "Branch `{branch}` did not exist: made it from `origin/main`"
            )),
            "the start says the branch was made from the default branch: {}",
            progress.message
        );
        let path = worker.workspace_path.clone().expect("workspace");
        assert!(
            path.starts_with(&format!("{}/worktrees/acme/widgets/", stack.vm_root)),
            "{path}"
        );
        assert_eq!(
            vm_git(&stack, &path, &["rev-parse", "--abbrev-ref", "HEAD"]).await,
            branch,
            "the worktree has its branch checked out"
        );
        assert_eq!(
            vm_git(&stack, &path, &["log", "-1", "--format=%s", &branch]).await,
            format!("work on {branch}"),
            "the worker's commit is on its branch"
        );
        assert_eq!(
            vm_git(&stack, &path, &["rev-parse", &format!("{branch}^")]).await,
            main_commit,
            "made from the default branch"
        );
        assert_eq!(
            vm_git(&stack, &path, &["status", "--porcelain"]).await,
            "",
            "nothing left uncommitted"
        );
        assert!(
            !vm_git(&stack, &clone, &["log", "--format=%s", other])
                .await
                .contains(&format!("work on {branch}")),
            "the commit is not on {other}"
        );
    }
    assert_eq!(
        vm_git(&stack, &clone, &["rev-parse", "HEAD"]).await,
        main_commit,
        "the orchestrator's clone stays on the default branch"
    );
    assert_ne!(a.container_id, b.container_id, "a container each");

    // The reviewer works on the existing branch, as it is on the remote.
    let path = reviewer.workspace_path.clone().expect("workspace");
    assert_eq!(
        vm_git(&stack, &path, &["rev-parse", "--abbrev-ref", "HEAD"]).await,
        review.name
    );
    assert_eq!(
        vm_git(&stack, &path, &["rev-parse", "HEAD"]).await,
        review.commit,
        "the existing branch's commit, not a new branch"
    );
    let progress = stack
        .bot_post(Some(&reviewer.thread_id), "Ready")
        .expect("the start progress");
    assert!(
        !progress.message.contains("did not exist"),
        "an existing branch is not made: {}",
        progress.message
    );

    // Stopping the orchestrator stops all three and removes their worktrees and containers.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&orch_root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&orch.id, SessionState::Ended, Duration::from_secs(120))
        .await;
    for c in &children {
        let ended = stack
            .wait_for_state(&c.id, SessionState::Ended, Duration::from_secs(120))
            .await;
        assert_eq!(ended.end().expect("ended").reason, EndReason::ParentEnded);
        let mut gone = Script::new();
        gone.set("wt", c.workspace_path.as_deref().unwrap_or_default())
            .and_then(|s| s.set("id", c.container_id.as_deref().unwrap_or_default()))
            .expect("q")
            .raw(r#"if [ -e "$wt" ]; then echo "worktree $wt"; fi; if podman container exists "$id"; then echo "container $id"; fi"#);
        assert_eq!(
            stack.vm_run(&gone).await.stdout.trim(),
            "",
            "left behind by {}",
            c.id
        );
    }
    assert!(
        !vm_git(&stack, &clone, &["worktree", "list"])
            .await
            .contains("/worktrees/"),
        "the worktrees are pruned"
    );
    drop(review);
    stack.finish().await;
}

async fn foreign_is_running(stack: &Stack, id: &str) -> bool {
    stack
        .store
        .session(id)
        .await
        .ok()
        .flatten()
        .is_some_and(|s| s.state().is_active())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orchestrator_compacts_at_the_threshold_and_not_again_during_the_cooldown() {
    let stack = Stack::start_with(
        ModelScript::new()
            .on_last_user("fifth", Reply::text("Answer to the fifth message."))
            .fallback(Reply::text("ok")),
        &[("orchestrator-compact-threshold", "2".into())],
    )
    .await;
    let (channel, root) = stack
        .start_session("@claude orchestrate acme/widgets")
        .await;
    let orch = stack.session_at(&channel, &root).await;
    let compactions = |stack: &Stack| {
        let store = stack.store.clone();
        let id = orch.id.clone();
        async move {
            store
                .session(&id)
                .await
                .expect("read")
                .expect("row")
                .stats
                .compaction_count
        }
    };
    for text in ["first", "second"] {
        stack
            .fake
            .post_as(&stack.alice, &channel, Some(&root), text)
            .expect("post");
        let deadline = Instant::now() + Duration::from_secs(60);
        while stack
            .model
            .requests()
            .iter()
            .all(|r| !r.last_user_text.contains(text))
        {
            assert!(Instant::now() < deadline, "{text} never reached the model");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while compactions(&stack).await < 1 {
        assert!(
            Instant::now() < deadline,
            "no compaction after the threshold"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Two more messages reach the threshold again, but within the cooldown: no second one.
    for text in ["third", "fourth"] {
        stack
            .fake
            .post_as(&stack.alice, &channel, Some(&root), text)
            .expect("post");
        let deadline = Instant::now() + Duration::from_secs(60);
        while stack
            .model
            .requests()
            .iter()
            .all(|r| !r.last_user_text.contains(text))
        {
            assert!(Instant::now() < deadline, "{text} never reached the model");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The orchestrator compacts between turns, before the next message goes to Claude (and
    // counts a compaction before that turn ends): once a fifth message has been answered, any
    // compaction the third and fourth would have caused has run and been counted.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "fifth")
        .expect("post");
    stack
        .wait_for_bot_post(
            "the answer to the fifth message",
            Some(&root),
            "Answer to the fifth message.",
        )
        .await;
    assert_eq!(
        compactions(&stack).await,
        1,
        "no compaction during the cooldown"
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&orch.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orchestrator_and_its_worker_survive_a_killed_bot() {
    let tb = Testbed::load();
    let script = ModelScript::new()
        .on_last_user("build it", Reply::text("working"))
        .on_last_user(
            "plan the work",
            Reply::text("[CREATE_SESSION: acme/widgets] build it\n"),
        )
        .fallback(Reply::text("ok"));
    let mut stack = Stack::start(script).await;
    let bot = stack.switch_to_process(&tb).await;
    let (channel, root) = stack
        .start_session("@claude orchestrate acme/widgets")
        .await;
    let orch = stack.session_at(&channel, &root).await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "plan the work")
        .expect("post");
    let worker = {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let children = stack.store.children(&orch.id).await.expect("children");
            if let Some(w) = children
                .iter()
                .find(|c| stack.bot_post(Some(&c.thread_id), "working").is_some())
            {
                break w.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no worker answered: {children:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };

    bot.kill();
    let _bot = BotProcess::start(&stack, &tb);
    for thread in [&root, &worker.thread_id] {
        stack
            .wait_for_bot_post("the resume notice", Some(thread), "continues where it was")
            .await;
    }
    let after = stack
        .store
        .session(&worker.id)
        .await
        .expect("read")
        .expect("row");
    assert_eq!(
        after.parent_id.as_deref(),
        Some(orch.id.as_str()),
        "the parent link survived"
    );
    assert!(after.state().is_active());

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    let ended = stack
        .wait_for_state(&worker.id, SessionState::Ended, Duration::from_secs(120))
        .await;
    assert_eq!(
        ended.end().expect("ended").reason,
        EndReason::ParentEnded,
        "stopping the resumed orchestrator stops its resumed worker"
    );
    drop(_bot);
    stack.finish().await;
}

/// `ssh` master processes whose control files live under `dir`.
fn ssh_masters_under(dir: &std::path::Path) -> usize {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("ssh ") && c.contains(&dir))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bot_stopped_with_sigterm_leaves_no_ssh_master_behind() {
    let tb = Testbed::load();
    let mut stack = Stack::start(ModelScript::new().fallback(Reply::text("ok"))).await;
    let mut bot = stack.switch_to_process(&tb).await;
    // The VM health check opens a master at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ssh_masters_under(bot.tmp.path()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the bot never connected to the VM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = i32::try_from(bot.child.id()).expect("pid");
    // SAFETY: signalling the bot process this test started, by its pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = bot.child.wait().expect("wait");
    assert!(status.success(), "graceful exit: {status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ssh_masters_under(bot.tmp.path()) > 0 {
        assert!(
            Instant::now() < deadline,
            "ssh master processes outlived the bot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(bot);
    stack.finish().await;
}
