//! Egress grants end to end on the testbed (fake Mattermost → bot → real SSH → real podman
//! containers → the real Claude Code CLI → the scripted model, and the fake OPNsense): a
//! second session asking for a granted domain is told it is already allowed; the per-session
//! cap on open cards; domains refused by policy (a denied pattern, a name resolving to
//! 127.0.0.1) get no card; a session's end closes its pending cards and ends its grant; a
//! revocation takes the domain out of the alias.

mod support;

use std::time::Duration;

use session_manager::store::SessionState;
use support::mattermost::ClickOutcome;
use support::model_server::{Reply, Script as ModelScript};
use support::opnsense::{FakeOpnsense, ALIAS};
use support::stack::Stack;

/// Whether the model received a user turn containing `text`.
fn model_heard(stack: &Stack, text: &str) -> bool {
    stack
        .model
        .requests()
        .iter()
        .any(|r| r.last_user_text.contains(text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grants_are_shared_capped_refused_by_policy_and_end_with_their_session() {
    let opn = FakeOpnsense::start("opn-key", "opn-secret").await;
    let script = ModelScript::new()
        .asks_for_pypi()
        .on_last_user(
            "fetch three mirrors",
            Reply::text(
                "Three mirrors.\n[NETWORK_REQUEST: one.example.org]\n[NETWORK_REQUEST: two.example.org]\n[NETWORK_REQUEST: three.example.org]\n",
            ),
        )
        .on_last_user(
            "reach the inside",
            Reply::text(
                "Trying internal names.\n[NETWORK_REQUEST: 127.0.0.1.nip.io]\n[NETWORK_REQUEST: inside.egress.test]\n",
            ),
        )
        .fallback(Reply::text("ok"));
    let stack = Stack::start_with(
        script,
        &[
            opn.bot_settings("opn-key", "opn-secret"),
            vec![("max-pending-approvals", "2".into())],
        ]
        .concat(),
    )
    .await;

    // alice's session asks for pypi.org and she approves it for her session.
    let (channel, root_a) = stack.start_session("@claude start acme/widgets").await;
    let session_a = stack.session_at(&channel, &root_a).await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root_a), "install requests")
        .expect("post");
    let card = stack
        .wait_for("the approval card", Duration::from_secs(120), |s| {
            s.fake.thread(&root_a).into_iter().find(|p| {
                let props = p.props.to_string();
                props.contains("pypi.org") && props.contains("Approve for this session")
            })
        })
        .await;
    let ClickOutcome::Ok { .. } = stack
        .fake
        .click(&card.id, "approvesession", &stack.alice)
        .await
    else {
        panic!("the click failed")
    };
    stack
        .wait_for_bot_post("the answer after approval", Some(&root_a), "pypi.org works")
        .await;
    assert!(opn.applied_content(ALIAS).contains(&"pypi.org".to_owned()));

    // bob's session (a worktree of the same repository) asks for the same domain: no card, a
    // notice naming alice's grant, an audit row, and the agent is told at once.
    let (channel_b, root_b) = stack
        .start_session_as(&stack.bob, "@claude start acme/widgets --worktree")
        .await;
    let session_b = stack.session_at(&channel_b, &root_b).await;
    stack
        .fake
        .post_as(&stack.bob, &channel_b, Some(&root_b), "install requests")
        .expect("post");
    let notice = stack
        .wait_for_bot_post(
            "the already-allowed notice",
            Some(&root_b),
            "already allowed",
        )
        .await;
    assert!(
        notice.message.contains("granted by @alice")
            && notice
                .message
                .contains(session_manager::session::short_id(&session_a.id)),
        "{}",
        notice.message
    );
    stack
        .wait_for_bot_post("bob's agent is told", Some(&root_b), "pypi.org works")
        .await;
    assert!(
        !stack
            .fake
            .thread(&root_b)
            .iter()
            .any(|p| p.props.to_string().contains("Approve for")),
        "no card in bob's thread"
    );
    let shared = stack
        .store
        .audit_log(Some(&session_b.id), 50)
        .await
        .expect("audit")
        .into_iter()
        .find(|r| r.entry.action == "grant_shared")
        .expect("the shared grant is audited");
    assert_eq!(shared.entry.domain.as_deref(), Some("pypi.org"));

    // The per-session cap: two cards, the third request is denied without one.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root_a), "fetch three mirrors")
        .expect("post");
    stack
        .wait_for(
            "the denial of the third request",
            Duration::from_secs(120),
            |s| model_heard(s, "[NETWORK_DENIED: three.example.org]").then_some(()),
        )
        .await;
    assert!(model_heard(&stack, "SM_MAX_PENDING_APPROVALS"));
    let cards = |stack: &Stack, domain: &str| {
        stack
            .fake
            .thread(&root_a)
            .into_iter()
            .filter(|p| p.props.to_string().contains(domain))
            .count()
    };
    stack
        .wait_for("two open cards", Duration::from_secs(30), |s| {
            (cards(s, "one.example.org") == 1 && cards(s, "two.example.org") == 1).then_some(())
        })
        .await;
    assert_eq!(cards(&stack, "three.example.org"), 0, "no third card");

    // Policy: a denied pattern and a name resolving to 127.0.0.1 are refused without a card.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root_a), "reach the inside")
        .expect("post");
    stack
        .wait_for(
            "both refusals reach the agent",
            Duration::from_secs(120),
            |s| {
                (model_heard(s, "[NETWORK_DENIED: 127.0.0.1.nip.io]")
                    && model_heard(s, "[NETWORK_DENIED: inside.egress.test]"))
                .then_some(())
            },
        )
        .await;
    assert!(model_heard(&stack, "*.nip.io"), "the pattern is named");
    assert!(model_heard(&stack, "127.0.0.1"), "the address is named");
    assert_eq!(cards(&stack, "nip.io"), 0, "no card");
    assert_eq!(cards(&stack, "inside.egress.test"), 0, "no card");
    for domain in ["127.0.0.1.nip.io", "inside.egress.test"] {
        assert!(
            stack
                .bot_post(Some(&root_a), &format!("`{domain}`, which is refused"))
                .is_some(),
            "the thread is told why {domain} was refused"
        );
    }
    assert!(
        stack
            .dns
            .queries()
            .contains(&"inside.egress.test.".to_owned()),
        "resolved through the test resolver"
    );

    // `!grants` lists bob's shared grant.
    stack
        .fake
        .post_as(&stack.bob, &channel_b, Some(&root_b), "!grants")
        .expect("post");
    let listing = stack
        .wait_for_bot_post("the grants listing", Some(&root_b), "Network grants")
        .await;
    assert!(
        listing.message.contains("`pypi.org`")
            && listing.message.contains("until the session ends"),
        "{}",
        listing.message
    );

    // alice stops her session: its open cards close and its grant ends; bob's grant keeps
    // pypi.org in the alias.
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root_a), "!stop")
        .expect("post");
    stack
        .wait_for("the open cards closed", Duration::from_secs(120), |s| {
            s.fake
                .thread(&root_a)
                .into_iter()
                .filter(|p| p.props.to_string().contains("the session ended"))
                .nth(1)
        })
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !stack
        .store
        .live_grants(Some(&session_a.id), session_manager::store::now_ms())
        .await
        .expect("grants")
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "alice's grant never ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        opn.applied_content(ALIAS).contains(&"pypi.org".to_owned()),
        "bob's grant still covers it"
    );

    // bob revokes his grant: nothing covers pypi.org any more and it leaves the alias.
    stack
        .fake
        .post_as(&stack.bob, &channel_b, Some(&root_b), "!revoke pypi.org")
        .expect("post");
    stack
        .wait_for_bot_post("the revocation", Some(&root_b), "Revoked")
        .await;
    stack
        .wait_for("pypi.org out of the alias", Duration::from_secs(60), |_| {
            (!opn.applied_content(ALIAS).contains(&"pypi.org".to_owned())).then_some(())
        })
        .await;
    // The removal is audited right after the alias changes: wait for that row.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let actions: Vec<String> = loop {
        let actions: Vec<String> = stack
            .store
            .audit_log(None, 200)
            .await
            .expect("audit")
            .into_iter()
            .filter(|r| r.entry.domain.as_deref() == Some("pypi.org"))
            .map(|r| r.entry.action)
            .collect();
        if actions.iter().any(|a| a == "firewall_removed") || std::time::Instant::now() > deadline {
            break actions;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for expected in [
        "requested",
        "approved",
        "granted",
        "firewall_applied",
        "grant_shared",
        "grant_session_ended",
        "grant_revoked",
        "firewall_removed",
    ] {
        assert!(
            actions.contains(&expected.to_owned()),
            "{expected} missing from {actions:?}"
        );
    }
    stack
        .fake
        .post_as(&stack.bob, &channel_b, Some(&root_b), "!stop")
        .expect("post");
    stack
        .wait_for_state(&session_b.id, SessionState::Ended, Duration::from_secs(120))
        .await;
    stack.finish().await;
}
