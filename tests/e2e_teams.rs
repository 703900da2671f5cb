//! Microsoft Teams end to end on the testbed: the whole bot (`serve`) with both a fake
//! Mattermost and a fake Teams (token issuer, Connector) configured, real SSH, real podman,
//! the real Claude Code CLI and the scripted model. A Teams user starts a session, talks in
//! its thread, approves a network request from an Adaptive Card with an `Action.Execute`
//! invoke; a Mattermost session runs in the same process at the same time without crossing.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::model_server::{Reply, Script as ModelScript};
use support::opnsense::{FakeOpnsense, ALIAS};
use support::stack::Stack;
use support::teams::FakeTeams;

/// The Adaptive Card action whose title starts with `title`, in a posted card message.
fn card_action(card: &Value, title: &str) -> Option<Value> {
    let content = &card["attachments"][0]["content"];
    let mut found = None;
    visit(content, &mut |v| {
        if found.is_none()
            && v["type"] == "Action.Execute"
            && v["title"].as_str().is_some_and(|t| t.starts_with(title))
        {
            found = Some(v.clone());
        }
    });
    found
}

fn visit(v: &Value, f: &mut impl FnMut(&Value)) {
    f(v);
    match v {
        Value::Array(items) => items.iter().for_each(|i| visit(i, f)),
        Value::Object(map) => map.values().for_each(|i| visit(i, f)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_teams_user_runs_a_session_and_approves_from_an_adaptive_card_beside_mattermost() {
    let teams = FakeTeams::start().await;
    let opn = FakeOpnsense::start("opn-key", "opn-secret").await;
    let script = ModelScript::new()
        .asks_for_pypi()
        .on_last_user("hello from teams", Reply::text("Hello, Teams thread."))
        .on_last_user(
            "hello from mattermost",
            Reply::text("Hello, Mattermost thread."),
        )
        .fallback(Reply::text("ok"));
    // People are named by AAD object id on Teams and by username on Mattermost, in the same
    // settings; each platform knows its own.
    let olo = teams.user("Olo Brockhouse");
    let mallory = teams.user("Mallory");
    let stack = Stack::start_with(
        script,
        &[
            ("allowed-users", format!("alice,{}", olo.aad)),
            ("allowed-approvers", olo.aad.clone()),
            ("teams-app-id", teams.app_id()),
            ("teams-app-password", teams.app_password()),
            ("teams-token-url", teams.token_url()),
            ("teams-openid-metadata-url", teams.metadata_url()),
        ]
        .into_iter()
        .chain(opn.bot_settings("opn-key", "opn-secret"))
        .collect::<Vec<_>>(),
    )
    .await;
    let endpoint = stack
        .app
        .as_ref()
        .expect("app")
        .url(session_manager::chat::teams::MESSAGES_PATH);
    let token = teams.valid_token();
    let channel = teams.add_channel();

    // Someone not on SM_ALLOWED_USERS is refused.
    let ask = teams.channel_message(&channel, &mallory, "start acme/widgets", true);
    assert_eq!(teams.send(&endpoint, &ask, Some(&token)).await.0, 200);
    stack
        .wait_for("the refusal", Duration::from_secs(30), |_| {
            teams
                .requests()
                .iter()
                .any(|r| r.body.to_string().contains("not on the list"))
                .then_some(())
        })
        .await;

    // A bad token is refused by the same server.
    let ask = teams.channel_message(&channel, &olo, "start acme/widgets --worktree", true);
    assert_eq!(
        teams.send(&endpoint, &ask, Some("not-a-token")).await.0,
        401
    );

    // The session lives in a new thread of the channel; its progress says Ready.
    let session = stack
        .start_teams_session(&teams, &channel, &olo, "start acme/widgets --worktree")
        .await;
    assert_eq!(session.channel_id, channel);
    let thread_text = |teams: &FakeTeams| -> Vec<String> {
        teams
            .thread(&channel, Some(&session.thread_id))
            .into_iter()
            .filter_map(|m| m.text)
            .collect()
    };

    // Meanwhile a Mattermost user runs a session in the same process.
    let (mm_channel, mm_root) = stack.start_session("@claude start acme/widgets").await;

    // Replies in each thread reach their own agent, and answers come back to their own thread.
    teams
        .reply(
            &endpoint,
            &channel,
            &session.thread_id,
            &olo,
            "hello from teams",
        )
        .await;
    stack
        .fake
        .post_as(
            &stack.alice,
            &mm_channel,
            Some(&mm_root),
            "hello from mattermost",
        )
        .expect("post");
    stack
        .wait_for("the Teams answer", Duration::from_secs(120), |_| {
            thread_text(&teams)
                .iter()
                .any(|t| t.contains("Hello, Teams thread."))
                .then_some(())
        })
        .await;
    stack
        .wait_for_bot_post(
            "the Mattermost answer",
            Some(&mm_root),
            "Hello, Mattermost thread.",
        )
        .await;
    assert!(
        !thread_text(&teams)
            .iter()
            .any(|t| t.contains("Mattermost thread")),
        "no Mattermost output in Teams"
    );
    assert!(
        stack.bot_post(None, "Hello, Teams thread.").is_none(),
        "no Teams output in Mattermost"
    );

    // A network request becomes an Adaptive Card; an Action.Execute invoke approves it.
    teams
        .reply(
            &endpoint,
            &channel,
            &session.thread_id,
            &olo,
            "install requests",
        )
        .await;
    let card = stack
        .wait_for("the Adaptive Card", Duration::from_secs(120), |_| {
            teams
                .thread(&channel, Some(&session.thread_id))
                .into_iter()
                .find(|m| {
                    m.attachments
                        .first()
                        .is_some_and(|a| a.to_string().contains("pypi.org"))
                })
        })
        .await;
    assert_eq!(
        card.attachments[0]["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    let posted = serde_json::json!({ "attachments": card.attachments });
    let approve = card_action(&posted, "Approve for").expect("an Approve button");
    assert_eq!(approve["fallback"]["type"], "Action.Submit");
    let verb = approve["verb"].as_str().expect("verb").to_owned();
    let invoke = teams.card_invoke(&card.id, &olo, &verb, approve["data"].clone());
    let (status, body) = teams.send(&endpoint, &invoke, Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(body["statusCode"], 200, "{body}");
    assert_eq!(body["type"], "application/vnd.microsoft.card.adaptive");
    assert!(body["value"].to_string().contains("Approving"), "{body}");
    stack
        .wait_for(
            "the answer after approval",
            Duration::from_secs(120),
            |_| {
                thread_text(&teams)
                    .iter()
                    .any(|t| t.contains("pypi.org works now"))
                    .then_some(())
            },
        )
        .await;
    assert!(opn.applied_content(ALIAS).contains(&"pypi.org".to_owned()));
    // The card is replaced for everyone with the decision.
    let (fake, id) = (&teams, card.id.clone());
    stack
        .wait_for("the card replaced", Duration::from_secs(30), |_| {
            fake.message(&id)
                .filter(|m| m.updates >= 1 && m.attachments[0].to_string().contains("Approved by"))
        })
        .await;
    let decided = teams.message(&card.id).expect("card");
    assert!(
        card_action(
            &serde_json::json!({ "attachments": decided.attachments }),
            "Approve"
        )
        .is_none(),
        "no buttons after the decision"
    );

    // Stop the Teams session from its thread.
    teams
        .reply(&endpoint, &channel, &session.thread_id, &olo, "!stop")
        .await;
    stack
        .wait_for_state(
            &session.id,
            session_manager::store::SessionState::Ended,
            Duration::from_secs(120),
        )
        .await;
    let mm_session = stack.session_at(&mm_channel, &mm_root).await;
    assert!(
        mm_session.state().is_active(),
        "the Mattermost session is untouched"
    );
    stack
        .fake
        .post_as(&stack.alice, &mm_channel, Some(&mm_root), "!stop")
        .expect("post");
    stack
        .wait_for_state(
            &mm_session.id,
            session_manager::store::SessionState::Ended,
            Duration::from_secs(120),
        )
        .await;
    stack.finish().await;
    teams.stop().await;
}
