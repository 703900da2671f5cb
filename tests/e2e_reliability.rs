//! Reliability end to end on the testbed (fake Mattermost → bot → real SSH → real podman →
//! the real Claude Code CLI → the scripted model): an agent output line past
//! `SM_MAX_AGENT_LINE_BYTES` ends its turn with a clear error, and the session goes on; hung
//! turns end; a database outage in the middle of a turn is ridden out; and a message the bot
//! recorded but had not handed to its session when it died is delivered once after the
//! restart.

mod support;

use session_manager::runtime::shell::Script as VmScript;
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

/// How many of the model's requests had `text` as their newest user message.
fn requests_for(stack: &Stack, text: &str) -> usize {
    stack
        .model
        .requests()
        .iter()
        .filter(|r| r.last_user_text.contains(text))
        .count()
}

/// Waits (up to 120 s) until the model was asked about `text`; returns when it was.
async fn model_reached(stack: &Stack, text: &str) -> std::time::Instant {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(120);
    while requests_for(stack, text) == 0 {
        assert!(Instant::now() < deadline, "{text} never reached the model");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Instant::now()
}

/// The bot's posts in `root`'s thread that contain `needle`.
fn count_in_thread(stack: &Stack, root: &str, needle: &str) -> usize {
    let bot = stack.fake.bot_user_id();
    stack
        .fake
        .thread(root)
        .iter()
        .filter(|p| p.user_id == bot && p.message.contains(needle))
        .count()
}

/// PostgreSQL restarts in the middle of a turn, twice: the bot never exits, answers 503 on
/// readiness while it cannot know it still leads, posts nothing and writes nothing to the agent
/// meanwhile, and afterwards the turn's answer and the message written during the outage reach
/// the thread and the agent exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_in_the_middle_of_a_turn_is_ridden_out_twice() {
    use std::time::{Duration, Instant};
    const SLOW: Duration = Duration::from_secs(8);
    let script = ModelScript::new()
        .on_last_user(
            "slow round 1",
            Reply::text("Answer to slow round 1.").after(SLOW),
        )
        .on_last_user(
            "slow round 2",
            Reply::text("Answer to slow round 2.").after(SLOW),
        )
        .on_last_user("during round 1", Reply::text("Answer to during round 1."))
        .on_last_user("during round 2", Reply::text("Answer to during round 2."))
        .fallback(Reply::text("ok"));
    let (stack, proxy) = Stack::start_behind_proxy(script, &[]).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let app = stack.app.as_ref().expect("the bot runs in process");
    let http = reqwest::Client::new();
    let health = |probe: bool| {
        let url = app.url(if probe {
            "/health?probe=readiness"
        } else {
            "/health"
        });
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.expect("health");
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    for round in 1..=2 {
        let slow = format!("slow round {round}");
        let during = format!("during round {round}");
        stack
            .fake
            .post_as(&stack.alice, &channel, Some(&root), &slow)
            .expect("post");
        let asked = model_reached(&stack, &slow).await;

        // The database goes away while the model works on the turn.
        proxy.cut();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = health(true).await;
            if status == 503 && body["role"] == "suspended" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "never suspended: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let bot = stack.fake.bot_user_id();
        let bot_posts = || {
            stack
                .fake
                .thread(&root)
                .into_iter()
                .filter(|p| p.user_id == bot)
                .map(|p| (p.id, p.edit_at, p.message))
                .collect::<Vec<_>>()
        };
        let posts_when_suspended = bot_posts();
        stack
            .fake
            .post_as(&stack.alice, &channel, Some(&root), &during)
            .expect("post");
        // The model's answer left it (SLOW after the question, plus time for the CLI to print
        // it): a bot that acted would have posted it by now, and sent the next message on.
        let answered = asked + SLOW + Duration::from_secs(3);
        tokio::time::sleep_until(answered.into()).await;
        assert_eq!(
            bot_posts(),
            posts_when_suspended,
            "nothing is posted or edited while suspended: {:#?}",
            stack.fake.thread(&root)
        );
        assert_eq!(
            requests_for(&stack, &during),
            0,
            "no input reaches the agent while suspended"
        );
        assert!(app.is_running(), "the bot did not exit");

        proxy.restore().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while health(true).await.0 != 200 {
            assert!(Instant::now() < deadline, "never ready again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let answer = format!("Answer to slow round {round}.");
        stack
            .wait_for_bot_post("the turn's answer after the outage", Some(&root), &answer)
            .await;
        let later = format!("Answer to during round {round}.");
        stack
            .wait_for_bot_post(
                "the answer to the message written during the outage",
                Some(&root),
                &later,
            )
            .await;
        eprintln!("round {round}: ridden out");
    }
    // Exactly once each, to the thread and to the agent.
    for round in 1..=2 {
        for needle in [
            format!("Answer to slow round {round}."),
            format!("Answer to during round {round}."),
        ] {
            assert_eq!(count_in_thread(&stack, &root, &needle), 1, "{needle}");
        }
        assert_eq!(requests_for(&stack, &format!("during round {round}")), 1);
        assert_eq!(requests_for(&stack, &format!("slow round {round}")), 1);
    }
    assert!(app.is_running(), "the bot never exited");
    assert_eq!(health(false).await.1["role"], "active");
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
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

/// The bot is killed (SIGKILL) after it recorded a message and before it handed it to the
/// session, while another message waited in the session's queue: after the restart both are
/// delivered, once each. Then a graceful restart with a message queued behind a running turn:
/// delivered after the restart, not reported as undelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_recorded_but_not_handed_over_are_delivered_once_after_a_restart() {
    use std::time::{Duration, Instant};
    use support::stack::BotProcess;
    use support::testbed::Testbed;
    let tb = Testbed::load();
    let script = ModelScript::new()
        .on_last_user(
            "busy turn",
            Reply::text("Busy turn done.").after(Duration::from_secs(20)),
        )
        .on_last_user("queued one", Reply::text("Answer to queued one."))
        .on_last_user("recorded one", Reply::text("Answer to recorded one."))
        .on_last_user(
            "queued at shutdown",
            Reply::text("Answer to queued at shutdown."),
        )
        .fallback(Reply::text("ok"));
    let mut stack = Stack::start(script).await;
    let bot = stack.switch_to_process(&tb).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let post = |text: &str| {
        stack
            .fake
            .post_as(&stack.alice, &channel, Some(&root), text)
            .expect("post")
    };
    let recorded = |id: String| {
        let store = stack.store.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let waiting = store
                    .unhandled_inbound(session_manager::store::Platform::Mattermost, 100)
                    .await
                    .expect("read");
                if waiting.iter().any(|p| p.contains(&id)) {
                    return;
                }
                assert!(Instant::now() < deadline, "{id} was never recorded");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    post("busy turn");
    model_reached(&stack, "busy turn").await;
    // The session queues the next message; the bot's "queued" notice hangs at the chat server,
    // so the thread's next message is recorded but waits behind it, not handed over.
    stack.fake.hold_posts_containing("is queued");
    post("queued one");
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.fake.held_posts() == 0 {
        assert!(Instant::now() < deadline, "the queued notice never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = post("recorded one");
    recorded(second.id.clone()).await;
    bot.kill();
    stack.fake.release_posts();

    let connections = stack.fake.websocket_connections();
    let bot = BotProcess::start(&stack, &tb);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.fake.websocket_connections() <= connections {
        assert!(Instant::now() < deadline, "the bot process never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack
        .wait_for_bot_post(
            "the queued message's answer",
            Some(&root),
            "Answer to queued one.",
        )
        .await;
    stack
        .wait_for_bot_post(
            "the recorded message's answer",
            Some(&root),
            "Answer to recorded one.",
        )
        .await;
    assert_eq!(requests_for(&stack, "queued one"), 1, "delivered once");
    assert_eq!(requests_for(&stack, "recorded one"), 1, "delivered once");
    assert_eq!(count_in_thread(&stack, &root, "Answer to queued one."), 1);
    assert_eq!(count_in_thread(&stack, &root, "Answer to recorded one."), 1);

    // A graceful restart with a message queued behind a running turn.
    post("busy turn again");
    model_reached(&stack, "busy turn again").await;
    let notices = count_in_thread(&stack, &root, "is queued");
    let queued = post("queued at shutdown");
    let deadline = Instant::now() + Duration::from_secs(30);
    while count_in_thread(&stack, &root, "is queued") <= notices {
        assert!(Instant::now() < deadline, "the message was never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    recorded(queued.id.clone()).await;
    let pid = i32::try_from(bot.child.id()).expect("pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut bot = bot;
    let exited = tokio::task::spawn_blocking(move || {
        let status = bot.child.wait();
        (bot, status)
    })
    .await
    .expect("join");
    let (bot, status) = exited;
    assert!(status.expect("wait").success(), "a graceful stop");
    drop(bot);
    let connections = stack.fake.websocket_connections();
    let _bot = BotProcess::start(&stack, &tb);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.fake.websocket_connections() <= connections {
        assert!(Instant::now() < deadline, "the bot process never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack
        .wait_for_bot_post(
            "the answer to the message queued at shutdown",
            Some(&root),
            "Answer to queued at shutdown.",
        )
        .await;
    assert_eq!(
        requests_for(&stack, "queued at shutdown"),
        1,
        "delivered once"
    );
    assert_eq!(
        count_in_thread(&stack, &root, "not delivered"),
        0,
        "nothing is reported undelivered: {:#?}",
        stack.fake.thread(&root)
    );
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

/// The agent is lost and resuming it fails for a reason other than a conversation with no turn
/// (here: the CLI is missing from the container): the thread is told why, the session is kept,
/// and once the cause is gone `!restart` brings Claude back on the same conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_resume_is_reported_and_restart_brings_the_session_back() {
    use session_manager::runtime::shell::Script;
    use std::time::Duration;
    let script = ModelScript::new()
        .on_last_user("first question", Reply::text("First answer."))
        .on_last_user("after the restart", Reply::text("Back again."))
        .fallback(Reply::text("ok"));
    let stack = Stack::start(script).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let post = |text: &str| {
        stack
            .fake
            .post_as(&stack.alice, &channel, Some(&root), text)
            .expect("post")
    };
    post("first question");
    stack
        .wait_for_bot_post("the first answer", Some(&root), "First answer.")
        .await;
    let session = stack.session_at(&channel, &root).await;
    let container = session.container_id.clone().expect("a container");
    let in_container = |command: &str| {
        let mut s = Script::new();
        s.set("id", &container)
            .expect("id")
            .set("cmd", command)
            .expect("cmd")
            .raw(r#"podman exec -u root "$id" sh -c "$cmd""#);
        s
    };
    // The CLI disappears from the container, then the running agent dies.
    let out = stack
        .vm_run(&in_container(
            "mv /usr/local/bin/claude /usr/local/bin/claude.away && pkill -x claude",
        ))
        .await;
    assert!(out.success(), "{out:?}");
    let notice = stack
        .wait_for_bot_post(
            "the failed resume reported",
            Some(&root),
            "Claude could not be started again",
        )
        .await;
    assert!(
        notice.message.contains("not found") || notice.message.contains("no such file"),
        "the reason is given: {}",
        notice.message
    );
    eprintln!("the notice: {}", notice.message);
    let kept = stack.session_at(&channel, &root).await;
    assert!(
        kept.state().is_active(),
        "the session is kept: {:?}",
        kept.state()
    );

    // The cause is fixed; !restart brings Claude back on the same conversation.
    let out = stack
        .vm_run(&in_container(
            "mv /usr/local/bin/claude.away /usr/local/bin/claude",
        ))
        .await;
    assert!(out.success(), "{out:?}");
    post("!restart");
    stack
        .wait_for_bot_post("the restart", Some(&root), "Restarted Claude")
        .await;
    post("after the restart");
    stack
        .wait_for_bot_post("the answer after the restart", Some(&root), "Back again.")
        .await;
    let request = stack
        .model
        .last_request_with("after the restart")
        .expect("the request");
    assert!(
        request.all_messages_text().contains("first question"),
        "the same conversation"
    );
    post("!stop");
    stack
        .wait_for_state(
            &session.id,
            session_manager::store::SessionState::Ended,
            Duration::from_secs(120),
        )
        .await;
    stack.finish().await;
}

/// The SSH master of a session that never had a turn dies: the CLI has no conversation to
/// resume, so the agent starts it under the same id, the thread is told nothing was lost, and
/// the next message is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_lost_before_its_first_turn_starts_fresh_and_answers() {
    use support::stack::kill_ssh_masters_under;
    use support::testbed::Testbed;
    let tb = Testbed::load();
    let script = ModelScript::new()
        .on_last_user("hello after the loss", Reply::text("Hello, nothing lost."))
        .fallback(Reply::text("ok"));
    let mut stack = Stack::start(script).await;
    let bot = stack.switch_to_process(&tb).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let conversation = stack
        .session_at(&channel, &root)
        .await
        .agent_session_id
        .expect("a conversation id");
    let killed = kill_ssh_masters_under(bot.tmp.path());
    assert!(killed >= 1, "found the bot's SSH master");
    stack
        .wait_for_bot_post(
            "the notice that nothing was lost",
            Some(&root),
            "nothing was lost",
        )
        .await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "hello after the loss")
        .expect("post");
    stack
        .wait_for_bot_post("the answer", Some(&root), "Hello, nothing lost.")
        .await;
    let session = stack.session_at(&channel, &root).await;
    assert_eq!(
        session.agent_session_id.as_deref(),
        Some(conversation.as_str()),
        "the same session id"
    );
    assert!(session.state().is_active());
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    stack
        .wait_for_state(
            &session.id,
            session_manager::store::SessionState::Ended,
            std::time::Duration::from_secs(120),
        )
        .await;
    drop(bot);
    stack.finish().await;
}

/// One thread is flooded with 500 messages while its turn runs; another session's thread is
/// answered meanwhile without waiting for the flood. The flood is bounded: every message is
/// either queued for the agent or refused with a notice to its sender, and what is still queued
/// when the session is stopped is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooded_thread_is_bounded_and_holds_up_no_other_thread() {
    use std::time::{Duration, Instant};
    const FLOOD: usize = 500;
    let script = ModelScript::new()
        .on_last_user(
            "hang here",
            Reply::text("released").after(Duration::from_secs(600)),
        )
        .on_last_user("ping quiet", Reply::text("pong quiet"))
        .fallback(Reply::text("ok"));
    let stack = Stack::start(script).await;
    let (channel, flooded) = stack.start_session("@claude start acme/widgets").await;
    let (quiet_channel, quiet) = stack
        .start_session("@claude start acme/widgets --worktree")
        .await;
    let ping = |label: &'static str| {
        let (stack, channel, root) = (&stack, &quiet_channel, &quiet);
        async move {
            let before = count_in_thread(stack, root, "pong quiet");
            let sent = Instant::now();
            stack
                .fake
                .post_as(&stack.alice, channel, Some(root), "ping quiet")
                .expect("post");
            let deadline = Instant::now() + Duration::from_secs(120);
            while count_in_thread(stack, root, "pong quiet") == before {
                assert!(
                    Instant::now() < deadline,
                    "{label}: the quiet thread got no answer"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let took = sent.elapsed();
            eprintln!(
                "quiet thread answered {label} in {:.0} ms",
                took.as_secs_f64() * 1000.0
            );
            took
        }
    };
    let baseline = ping("before the flood").await;

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&flooded), "hang here")
        .expect("post");
    model_reached(&stack, "hang here").await;
    for i in 0..FLOOD {
        stack
            .fake
            .post_as(
                &stack.alice,
                &channel,
                Some(&flooded),
                &format!("flood {i}"),
            )
            .expect("post");
    }
    let during = ping("during the flood").await;
    eprintln!(
        "added delay: {:.0} ms",
        (during.as_secs_f64() - baseline.as_secs_f64()) * 1000.0
    );

    // Every flood message is accounted for: queued (the notice's count) or refused (told).
    let queued_count = || {
        stack
            .fake
            .thread(&flooded)
            .iter()
            .filter_map(|p| {
                p.message
                    .split_once(" messages are queued")
                    .and_then(|(head, _)| head.rsplit(' ').next()?.parse::<usize>().ok())
            })
            .max()
            .unwrap_or(0)
    };
    let refused = || {
        stack
            .fake
            .ephemeral_posts()
            .iter()
            .filter(|(user, text)| user == &stack.alice && text.contains("Slow down"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while queued_count() + refused() < FLOOD {
        assert!(
            Instant::now() < deadline,
            "queued {} + refused {} of {FLOOD}",
            queued_count(),
            refused()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (queued, refused) = (queued_count(), refused());
    eprintln!("flood of {FLOOD}: {queued} queued, {refused} refused with a notice");
    assert_eq!(
        queued + refused,
        FLOOD,
        "every message queued or its sender told"
    );
    assert!(refused > 0, "the flood was bounded");
    assert_eq!(requests_for(&stack, "flood"), 0, "the turn still runs");

    // Stopping the session reports what was still queued.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&flooded), "!stop")
        .expect("post");
    stack
        .wait_for_bot_post(
            "the undelivered report",
            Some(&flooded),
            &format!("{queued} queued message(s) were not delivered"),
        )
        .await;
    stack
        .fake
        .post_as(&stack.alice, &quiet_channel, Some(&quiet), "!stop")
        .expect("post");
    for root in [&flooded, &quiet] {
        let session = stack.session_at(&channel, root).await;
        stack
            .wait_for_state(
                &session.id,
                session_manager::store::SessionState::Ended,
                Duration::from_secs(120),
            )
            .await;
    }
    stack.finish().await;
}

/// Starts a session on a stack whose container runtime is `{vm_root}/<name>`: a script that
/// runs `events_step` (sh) when asked for `events`, then podman; asks the agent and waits for
/// `answer`. `up` is bounded at 90 s. Returns the stack, finished by the caller.
async fn start_with_runtime_events_step(name: &str, events_step: &str, answer: &str) -> Stack {
    let stack = Stack::start_with(
        ModelScript::new().fallback(Reply::text(answer)),
        &[
            ("container-runtime", format!("{{vm_root}}/{name}")),
            ("devcontainer-timeout-secs", "90".to_owned()),
        ],
    )
    .await;
    let mut runtime = VmScript::new();
    runtime
        .set("path", &format!("{}/{name}", stack.vm_root))
        .expect("q")
        .set(
            "body",
            &format!(
                "#!/bin/sh\nif [ \"$1\" = events ]; then {events_step}; fi\nexec podman \"$@\"\n"
            ),
        )
        .expect("q")
        .raw(r#"mkdir -p "$(dirname "$path")"; printf '%s' "$body" > "$path"; chmod 755 "$path""#);
    let out = stack.vm_run(&runtime).await;
    assert!(out.success(), "{}", out.stderr);
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "are you there?")
        .expect("post");
    stack
        .wait_for_bot_post("the answer", Some(&root), answer)
        .await;
    stack
}

/// `devcontainer up` waits for the container's start event from `podman events`, which it
/// starts just before `podman run`; on a busy VM podman events began listening after the
/// container had started, and `up` waited until its bound (devcontainers/cli issue 1236, the
/// 300 s stalls CI saw). Here the runtime's `events` always begins listening 3 s late: the
/// session still starts, because the bot's runtime shim replays the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_start_event_podman_events_missed_does_not_hold_up_the_start() {
    let stack =
        start_with_runtime_events_step("late-events-podman", "sleep 3", "Up and answering.").await;
    stack.finish().await;
}

/// `up` also waited after "Container started" where the start event was not missed that way
/// (CI and a benchmark run, with the replay in place): its `podman events` had ended by
/// itself, without an error. Here the runtime's `events` ends at once, printing nothing; the
/// session still starts, because the bot's runtime shim also shows the session's running
/// container as a start event every `EVENTS_POLL_SECS`, for as long as `up` waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_reader_that_hears_nothing_does_not_hold_up_the_start() {
    // `events` ends at once, printing nothing (and leaves a mark that it was asked).
    let stack = start_with_runtime_events_step(
        "deaf-events-podman",
        r#"touch "$0.deafened"; exit 0"#,
        "Up despite a deaf reader.",
    )
    .await;
    let mut check = VmScript::new();
    check
        .set(
            "path",
            &format!("{}/deaf-events-podman.deafened", stack.vm_root),
        )
        .expect("q")
        .raw(r#"test -f "$path""#);
    assert!(
        stack.vm_run(&check).await.success(),
        "the deaf reader was never asked: the test tests nothing"
    );
    stack.finish().await;
}
