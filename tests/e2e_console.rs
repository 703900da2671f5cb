//! The web console end to end on the testbed: a client that logs in and follows Server-Sent
//! Events like a browser → the bot → real SSH → real podman → the real Claude Code CLI → the
//! scripted model, with the fake Mattermost, the fake Teams and the fake OPNsense on the other
//! side.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use session_manager::store::{Platform, SessionState};
use support::console::{plain_client, text_of, ConsoleClient};
use support::model_server::{Reply, Script as ModelScript};
use support::opnsense::{FakeOpnsense, ALIAS};
use support::stack::{Stack, READY_TIMEOUT};
use support::teams::FakeTeams;

const ALICE_TOKEN: &str = "alice-console-token-0123456789abcdef";
const BOB_TOKEN: &str = "bob-console-token-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(120);

fn console_settings(extra: &mut Vec<(&'static str, String)>) {
    extra.push(("console-auth", "token".into()));
    extra.push((
        "console-tokens",
        format!("{ALICE_TOKEN}=alice,{BOB_TOKEN}=bob"),
    ));
}

fn ids(entries: &[Value]) -> Vec<i64> {
    entries.iter().filter_map(|e| e["id"].as_i64()).collect()
}

fn has_buttons(post: &support::mattermost::Post) -> bool {
    post.props["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| a["actions"].as_array().is_some_and(|b| !b.is_empty()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chat_session_is_followed_driven_and_approved_from_the_console() {
    let opn = FakeOpnsense::start("opn-key", "opn-secret").await;
    let script = ModelScript::new()
        .asks_for_pypi()
        .on_last_user("hello from the console", Reply::text("Hello, **console**!"))
        .fallback(Reply::text("ok"));
    let mut extra = opn.bot_settings("opn-key", "opn-secret");
    console_settings(&mut extra);
    let stack = Stack::start_with(script, &extra).await;
    let base = stack.app.as_ref().expect("app").url("");

    // Nobody gets in without a login, a wrong token is refused.
    let anonymous = plain_client();
    let page = anonymous.get(format!("{base}/")).send().await.expect("get");
    assert_eq!(page.status(), StatusCode::UNAUTHORIZED);
    assert!(page.text().await.expect("body").contains("Log in"));
    let api = anonymous
        .post(format!("{base}/console/api/sessions"))
        .json(&json!({"repo": "acme/widgets"}))
        .send()
        .await
        .expect("post");
    assert_eq!(api.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        ConsoleClient::login(&base, "not-a-token-0123456789abcdef")
            .await
            .err(),
        Some(StatusCode::FORBIDDEN)
    );
    let alice = ConsoleClient::login(&base, ALICE_TOKEN)
        .await
        .expect("alice");
    let bob = ConsoleClient::login(&base, BOB_TOKEN).await.expect("bob");

    // A session started in Mattermost is in alice's list, not in bob's.
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let session = stack.session_at(&channel, &root).await;
    let short = &session.id[..8];
    let (status, list) = alice.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list.contains(short) && list.contains("acme/widgets"),
        "{list}"
    );
    let (status, list) = bob.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!list.contains(short), "bob may not see alice's session");
    let page = format!("/console/sessions/{}", session.id);
    assert_eq!(bob.get(&page).await.0, StatusCode::NOT_FOUND);
    let (status, _) = bob.say(&session.id, "let me in").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(alice.get(&page).await.0, StatusCode::OK);

    // A state-changing request without the CSRF token is refused.
    let forged = alice
        .http
        .post(format!(
            "{base}/console/api/sessions/{}/messages",
            session.id
        ))
        .header("cookie", &alice.cookie)
        .json(&json!({"text": "forged"}))
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);

    // The thread streams in; a message from the console reaches Claude, and the chat thread
    // shows who sent it.
    let mut events = alice.events(&session.id, None).await;
    events
        .until("the ready progress post", WAIT, |e| {
            text_of(e).contains("Ready")
        })
        .await;
    let (status, answer) = alice.say(&session.id, "hello from the console").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let reply = events
        .until("Claude's answer", WAIT, |e| {
            text_of(e).contains("Hello, **console**!")
        })
        .await;
    assert!(
        reply["html"]
            .as_str()
            .unwrap_or_default()
            .contains("<strong>console</strong>"),
        "rendered: {reply}"
    );
    stack
        .wait_for_bot_post(
            "the console's message in the thread",
            Some(&root),
            "**@alice** (web console): hello from the console",
        )
        .await;
    stack
        .wait_for_bot_post("the answer in chat", Some(&root), "Hello, **console**!")
        .await;

    // What people write in Mattermost shows in the console, and so does the card.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "install requests")
        .expect("post");
    let written = events
        .until("alice's Mattermost message", WAIT, |e| {
            e["kind"] == "inbound" && text_of(e).contains("install requests")
        })
        .await;
    assert_eq!(written["author"], "alice");
    let card = events
        .until("the approval card", WAIT, |e| {
            e["kind"] == "card" && text_of(e).contains("pypi.org")
        })
        .await;
    let actions = card["body"]["actions"].as_array().expect("buttons").clone();
    assert!(actions.iter().any(|a| a["id"] == "approve"), "{card}");
    assert!(
        actions.iter().all(|a| a.get("context").is_none()),
        "signed contexts never reach the browser: {card}"
    );

    // A reconnect from the middle gets exactly what came after; a reload gets everything, in
    // the same order: no gap, no duplicate.
    let middle = written["id"].as_i64().expect("id");
    let card_id = card["id"].as_i64().expect("id");
    let mut resumed = alice.events(&session.id, Some(middle)).await;
    resumed
        .until("the card again", WAIT, |e| {
            e["id"].as_i64() == Some(card_id)
        })
        .await;
    let after: Vec<i64> = ids(&events.seen)
        .into_iter()
        .filter(|id| *id > middle && *id <= card_id)
        .collect();
    assert_eq!(ids(&resumed.seen), after);
    let mut reloaded = alice.events(&session.id, None).await;
    reloaded
        .until("the card again", WAIT, |e| {
            e["id"].as_i64() == Some(card_id)
        })
        .await;
    let before: Vec<i64> = ids(&events.seen)
        .into_iter()
        .filter(|id| *id <= card_id)
        .collect();
    assert_eq!(ids(&reloaded.seen), before);
    let mut sorted = before.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, before, "increasing, each once");

    // Approve from the console: bob may not, alice's click decides once, the chat card
    // changes at once and the domain reaches the firewall.
    let post_id = card["post_id"].as_str().expect("post").to_owned();
    assert_eq!(
        bob.click(&post_id, "approve").await.0,
        StatusCode::NOT_FOUND
    );
    let (status, answer) = alice.click(&post_id, "approve").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    stack
        .wait_for("the chat card without buttons", WAIT, |s| {
            s.fake.post(&post_id).filter(|p| !has_buttons(p))
        })
        .await;
    events
        .until("the decided card", WAIT, |e| {
            e["post_id"] == post_id.as_str()
                && e["body"]["actions"].as_array().is_some_and(Vec::is_empty)
        })
        .await;
    stack
        .wait_for_bot_post(
            "the agent's answer after approval",
            Some(&root),
            "Thanks, pypi.org works now.",
        )
        .await;
    assert!(opn.alias_content(ALIAS).contains(&"pypi.org".to_owned()));
    let (status, _) = alice.click(&post_id, "approve").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a decided card has no buttons left"
    );

    // Stop from the console; the thread says it came from there.
    let (status, answer) = alice.command(&session.id, "stop").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    stack
        .wait_for_state(&session.id, SessionState::Ended, READY_TIMEOUT)
        .await;
    stack
        .wait_for_bot_post("the stop's echo", Some(&root), "(web console): !stop")
        .await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_started_in_the_console_lives_in_the_console() {
    let script = ModelScript::new()
        .on_tool_result("checked", Reply::text("The check ran."))
        .on_last_user(
            "run the check",
            Reply::bash("echo checked > /tmp/check && cat /tmp/check"),
        )
        .on_last_user("what is this", Reply::text("A console session."))
        .fallback(Reply::text("ok"));
    let mut extra = vec![
        ("allowed-repos", "acme/*".to_owned()),
        // Commands ask: their cards are answered in the console.
        ("permission-mode", "acceptEdits".to_owned()),
        ("callback-url", "{callback}".to_owned()),
    ];
    console_settings(&mut extra);
    let stack = Stack::start_with(script, &extra).await;
    let base = stack.app.as_ref().expect("app").url("");
    let alice = ConsoleClient::login(&base, ALICE_TOKEN)
        .await
        .expect("alice");
    let posts_before = stack.fake.posts().len();

    // Refused before anything is made: a bad value, a repository outside the allowlist.
    let (status, answer) = alice
        .post(
            "/console/api/sessions",
            json!({"repo": "acme/widgets; rm -rf /"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, answer) = alice
        .post("/console/api/sessions", json!({"repo": "elsewhere/tool"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("SM_ALLOWED_REPOS"),
        "{answer}"
    );

    let (status, answer) = alice
        .post(
            "/console/api/sessions",
            json!({"repo": "acme/widgets", "worktree": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let id = answer["session"].as_str().expect("id").to_owned();
    let session = stack.store.session(&id).await.expect("read").expect("row");
    assert_eq!(session.platform, Platform::Console);
    assert_eq!(session.started_by, "alice");
    assert!(session.worktree.is_some());

    let mut events = alice.events(&id, None).await;
    let anchor = events
        .until("the anchor", WAIT, |e| {
            text_of(e).contains("Session for `acme/widgets`")
        })
        .await;
    assert_eq!(anchor["post_id"], session.thread_id.as_str());
    events
        .until("the ready progress post", READY_TIMEOUT, |e| {
            text_of(e).contains("Ready")
        })
        .await;
    let (status, _) = alice.say(&id, "what is this").await;
    assert_eq!(status, StatusCode::OK);
    events
        .until("the message", WAIT, |e| {
            e["kind"] == "inbound" && text_of(e).contains("what is this")
        })
        .await;
    events
        .until("Claude's answer", WAIT, |e| {
            text_of(e).contains("A console session.")
        })
        .await;
    // A tool permission is asked and answered in the console, once.
    let (status, _) = alice.say(&id, "run the check").await;
    assert_eq!(status, StatusCode::OK);
    let card = events
        .until("the permission card", WAIT, |e| {
            e["kind"] == "card" && text_of(e).contains("Permission: Bash")
        })
        .await;
    let post = card["post_id"].as_str().expect("post").to_owned();
    let (status, answer) = alice.click(&post, "allowonce").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    events
        .until("the decided card", WAIT, |e| {
            e["post_id"] == post.as_str()
                && e["body"]["actions"].as_array().is_some_and(Vec::is_empty)
        })
        .await;
    events
        .until("the answer after the tool ran", WAIT, |e| {
            text_of(e).contains("The check ran.")
        })
        .await;
    let (status, _) = alice.click(&post, "allowonce").await;
    assert_eq!(status, StatusCode::CONFLICT, "single use");
    // `!status` works from the console as in a thread.
    let (status, _) = alice.say(&id, "!status").await;
    assert_eq!(status, StatusCode::OK);
    events
        .until("the status", WAIT, |e| {
            text_of(e).contains("Permission mode")
        })
        .await;
    assert_eq!(
        stack.fake.posts().len(),
        posts_before,
        "nothing of a console session goes to Mattermost"
    );
    let (status, _) = alice.command(&id, "stop").await;
    assert_eq!(status, StatusCode::OK);
    stack
        .wait_for_state(&id, SessionState::Ended, READY_TIMEOUT)
        .await;
    stack.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_teams_session_is_followed_driven_and_approved_from_the_console() {
    let teams = FakeTeams::start().await;
    let opn = FakeOpnsense::start("opn-key", "opn-secret").await;
    let script = ModelScript::new()
        .asks_for_pypi()
        .on_last_user(
            "hello from the console",
            Reply::text("Hello, Teams console."),
        )
        .fallback(Reply::text("ok"));
    let olo = teams.user("Olo Brockhouse");
    // Console logins: olo by his AAD object id (his Teams identity), alice by her
    // Mattermost username.
    let olo_token = "olo-console-token-0123456789abcdef";
    let mut extra = vec![
        ("allowed-users", format!("alice,{}", olo.aad)),
        ("teams-app-id", teams.app_id()),
        ("teams-app-password", teams.app_password()),
        ("teams-token-url", teams.token_url()),
        ("teams-openid-metadata-url", teams.metadata_url()),
        ("console-auth", "token".into()),
        (
            "console-tokens",
            format!("{ALICE_TOKEN}=alice,{olo_token}={}", olo.aad),
        ),
    ];
    extra.extend(opn.bot_settings("opn-key", "opn-secret"));
    let stack = Stack::start_with(script, &extra).await;
    let base = stack.app.as_ref().expect("app").url("");
    let endpoint = stack
        .app
        .as_ref()
        .expect("app")
        .url(session_manager::chat::teams::MESSAGES_PATH);
    let channel = teams.add_channel();
    let session = stack
        .start_teams_session(&teams, &channel, &olo, "start acme/widgets")
        .await;
    let thread_text = || -> Vec<String> {
        teams
            .thread(&channel, Some(&session.thread_id))
            .into_iter()
            .filter_map(|m| m.text)
            .collect()
    };
    let olo_console = ConsoleClient::login(&base, olo_token).await.expect("olo");
    let alice = ConsoleClient::login(&base, ALICE_TOKEN)
        .await
        .expect("alice");

    // Olo sees his Teams session, under his Teams name; alice (a Mattermost user, no Teams
    // identity) neither sees nor drives it.
    let short = &session.id[..8];
    let (status, list) = olo_console.get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        list.contains(short) && list.contains("@Olo Brockhouse"),
        "{list}"
    );
    let (_, list) = alice.get("/").await;
    assert!(!list.contains(short), "alice may not see olo's session");
    let page = format!("/console/sessions/{}", session.id);
    assert_eq!(alice.get(&page).await.0, StatusCode::NOT_FOUND);
    let (status, _) = alice.say(&session.id, "let me in").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A message from the console reaches Claude; the Teams thread shows who sent it (by name)
    // and the answer.
    let mut events = olo_console.events(&session.id, None).await;
    events
        .until("the ready progress post", WAIT, |e| {
            text_of(e).contains("Ready")
        })
        .await;
    let (status, answer) = olo_console.say(&session.id, "hello from the console").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    events
        .until("Claude's answer", WAIT, |e| {
            text_of(e).contains("Hello, Teams console.")
        })
        .await;
    stack
        .wait_for(
            "the console's message and the answer in Teams",
            WAIT,
            |_| {
                let texts = thread_text();
                (texts.iter().any(|t| {
                    t.contains("**@Olo Brockhouse** (web console): hello from the console")
                }) && texts.iter().any(|t| t.contains("Hello, Teams console.")))
                .then_some(())
            },
        )
        .await;

    // What olo writes in Teams shows in the console with its card; the console's Approve
    // replaces the Teams card for everyone, and the domain reaches the firewall.
    teams
        .reply(
            &endpoint,
            &channel,
            &session.thread_id,
            &olo,
            "install requests",
        )
        .await;
    let written = events
        .until("olo's Teams message", WAIT, |e| {
            e["kind"] == "inbound" && text_of(e).contains("install requests")
        })
        .await;
    assert_eq!(written["author"], "Olo Brockhouse");
    let card = events
        .until("the approval card", WAIT, |e| {
            e["kind"] == "card" && text_of(e).contains("pypi.org")
        })
        .await;
    let post_id = card["post_id"].as_str().expect("post").to_owned();
    assert!(
        teams.message(&post_id).is_some(),
        "the console's card is the Teams card {post_id}"
    );
    assert_eq!(
        alice.click(&post_id, "approve").await.0,
        StatusCode::NOT_FOUND
    );
    let (status, answer) = olo_console.click(&post_id, "approve").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    stack
        .wait_for("the Teams card replaced", WAIT, |_| {
            teams.message(&post_id).filter(|m| {
                m.updates >= 1
                    && m.attachments[0]
                        .to_string()
                        .contains("Approved by @Olo Brockhouse")
                    && !m.attachments[0].to_string().contains("Action.Execute")
            })
        })
        .await;
    stack
        .wait_for("the answer after approval in Teams", WAIT, |_| {
            thread_text()
                .iter()
                .any(|t| t.contains("Thanks, pypi.org works now."))
                .then_some(())
        })
        .await;
    assert!(opn.alias_content(ALIAS).contains(&"pypi.org".to_owned()));
    assert_eq!(
        olo_console.click(&post_id, "approve").await.0,
        StatusCode::CONFLICT,
        "decided once"
    );

    // Stop from the console; the Teams thread says it came from there.
    let (status, answer) = olo_console.command(&session.id, "stop").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    stack
        .wait_for_state(&session.id, SessionState::Ended, READY_TIMEOUT)
        .await;
    assert!(
        thread_text()
            .iter()
            .any(|t| t.contains("(web console): !stop")),
        "{:?}",
        thread_text()
    );
    stack.finish().await;
    teams.stop().await;
}
