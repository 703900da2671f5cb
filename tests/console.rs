//! The web console's doors over real sockets, without the testbed: who is let in (tokens,
//! the one-time link, a proxy's user header from trusted addresses only), the CSRF token on
//! every state-changing request, the security headers on every response, and the console being
//! off unless asked for.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::console::{plain_client, session_cookie};
use support::{settings, TestApp, TestDatabase};

const TOKEN: &str = "alice-console-token-0123456789abcdef";

/// The bot with the console on, `TOKEN` logging in as alice.
async fn token_console(db: &TestDatabase) -> TestApp {
    let tokens = format!("{TOKEN}=alice");
    TestApp::start(settings(
        &db.url,
        &[("console-auth", "token"), ("console-tokens", &tokens)],
    ))
    .await
}

#[tokio::test]
async fn the_console_is_off_unless_asked_for_when_chat_is_configured() {
    let db = TestDatabase::sqlite();
    let app = TestApp::start(settings(&db.url, &[])).await;
    let http = plain_client();
    for path in ["/", "/console/login?token=x", "/console/static/console.js"] {
        let status = http.get(app.url(path)).send().await.expect("get").status();
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn tokens_cookies_and_csrf_tokens_guard_the_console() {
    let db = TestDatabase::sqlite();
    let app = token_console(&db).await;
    let http = plain_client();
    // Not logged in: the page is the login form, the API says so.
    let page = http.get(app.url("/")).send().await.expect("get");
    assert_eq!(page.status(), StatusCode::UNAUTHORIZED);
    assert!(page.text().await.expect("body").contains("name=\"token\""));
    let events = http
        .get(app.url("/console/sessions/x/events"))
        .send()
        .await
        .expect("get");
    assert_eq!(events.status(), StatusCode::UNAUTHORIZED);
    // A wrong token, a forged cookie.
    let wrong = http
        .get(app.url("/console/login?token=alice-console-token-0123456789abcdeX"))
        .send()
        .await
        .expect("get");
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    assert!(session_cookie(&wrong).is_none());
    let forged = http
        .get(app.url("/"))
        .header("cookie", "sm_console=0123456789abcdef0123456789abcdef")
        .send()
        .await
        .expect("get");
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    // The login form works, and sets a strict, script-proof cookie.
    let login = http
        .post(app.url("/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .expect("post");
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let set = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("cookie")
        .to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = session_cookie(&login).expect("cookie");
    // Logged in: past the door (this bot has no chat connection, so it is not active: 503).
    let page = http
        .get(app.url("/"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("get");
    assert_eq!(page.status(), StatusCode::SERVICE_UNAVAILABLE);
    // State changes need the CSRF token; a wrong one counts as none.
    for csrf in [None, Some("0123")] {
        let mut request = http
            .post(app.url("/console/api/sessions"))
            .header("cookie", &cookie)
            .json(&json!({"repo": "acme/widgets"}));
        if let Some(csrf) = csrf {
            request = request.header("x-csrf-token", csrf);
        }
        let status = request.send().await.expect("post").status();
        assert_eq!(status, StatusCode::FORBIDDEN, "csrf {csrf:?}");
    }
    // Logging out ends the login.
    let out = http
        .post(app.url("/console/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("post");
    assert_eq!(
        out.status(),
        StatusCode::FORBIDDEN,
        "logging out needs the token too"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_proxys_user_header_counts_only_from_a_trusted_address() {
    let db = TestDatabase::sqlite();
    // The proxy is elsewhere: a header sent from here is anybody's.
    let app = TestApp::start(settings(
        &db.url,
        &[("console-auth", "proxy"), ("trusted-proxies", "10.0.0.0/8")],
    ))
    .await;
    let http = plain_client();
    for header in [None, Some("alice")] {
        let mut request = http.get(app.url("/"));
        if let Some(user) = header {
            request = request.header("x-forwarded-user", user);
        }
        let status = request.send().await.expect("get").status();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "header {header:?}");
    }
    app.stop().await;

    // The proxy is this address: its header is believed, and state changes still need the
    // CSRF token.
    let db = TestDatabase::sqlite();
    let app = TestApp::start(settings(
        &db.url,
        &[
            ("console-auth", "proxy"),
            ("trusted-proxies", "127.0.0.1/32"),
        ],
    ))
    .await;
    let status = http
        .get(app.url("/"))
        .header("x-forwarded-user", "alice")
        .send()
        .await
        .expect("get")
        .status();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "past the door");
    let status = http.get(app.url("/")).send().await.expect("get").status();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no header, no user");
    let status = http
        .post(app.url("/console/api/sessions"))
        .header("x-forwarded-user", "alice")
        .json(&json!({"repo": "acme/widgets"}))
        .send()
        .await
        .expect("post")
        .status();
    assert_eq!(status, StatusCode::FORBIDDEN, "no CSRF token");
    app.stop().await;
}

#[tokio::test]
async fn the_configuration_refuses_a_console_it_cannot_guard() {
    let db = TestDatabase::sqlite();
    let refused = |pairs: &[(&str, &str)]| {
        let mut argv = vec!["session-manager".to_owned(), "serve".to_owned()];
        argv.extend(pairs.iter().map(|(k, v)| format!("--{k}={v}")));
        argv.push(format!("--database-url={}", db.url));
        let matches = session_manager::config::Cli::raw_command()
            .try_get_matches_from(argv)
            .expect("arguments");
        session_manager::config::Settings::from_matches(&matches)
            .expect_err("refused")
            .to_string()
    };
    let err = refused(&[("console-auth", "token")]);
    assert!(err.contains("SM_CONSOLE_TOKENS"), "{err}");
    let err = refused(&[("console-auth", "proxy")]);
    assert!(err.contains("SM_TRUSTED_PROXIES"), "{err}");
    let err = refused(&[("console-tokens", "short=alice")]);
    assert!(
        err.contains("at least 16 characters") && !err.contains("short="),
        "the token is never repeated: {err}"
    );
    // Nothing but the console in one-machine mode: no chat platform needed, and the server
    // stays on this machine.
    let settings = settings(
        &db.url,
        &[
            ("mattermost-url", ""),
            ("mattermost-token", ""),
            ("mattermost-team-id", ""),
            ("listen-addr", ""),
        ],
    );
    assert!(!settings.has_chat_platform());
    assert_eq!(
        settings.console_auth(),
        session_manager::config::ConsoleAuth::Link
    );
    assert_eq!(settings.listen_addr().to_string(), "127.0.0.1:8000");
}

/// Every console response (the login page, a refusal, the script, a login) says: run only our
/// own script and style, never in a frame, no MIME sniffing, no Referer.
#[tokio::test]
async fn every_console_response_carries_the_security_headers() {
    let db = TestDatabase::sqlite();
    let app = token_console(&db).await;
    let http = plain_client();
    let login = format!("/console/login?token={TOKEN}");
    for (path, status) in [
        ("/", StatusCode::UNAUTHORIZED),
        ("/console/sessions/x/events", StatusCode::UNAUTHORIZED),
        ("/console/static/console.js", StatusCode::OK),
        (login.as_str(), StatusCode::SEE_OTHER),
    ] {
        let response = http.get(app.url(path)).send().await.expect("get");
        assert_eq!(response.status(), status, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let csp = header("content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp:?} lacks {directive}");
        }
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
    }
    app.stop().await;
}

/// The running bot prunes the console's transcript, at start and then hourly: the thread of a
/// session that ended longer ago than `SM_CONSOLE_RETENTION_SECS` is forgotten, a post's
/// versions between its first and its latest go, and a live thread keeps what its page shows.
#[tokio::test]
async fn the_running_bot_prunes_the_console_transcript() {
    use session_manager::store::{now_ms, EndReason, TranscriptKind};
    let db = TestDatabase::sqlite();
    let store = db.store().await;
    let old = store
        .create_session(&support::new_session("old-thread"))
        .await
        .expect("create");
    store
        .end_session(&old.id, EndReason::UserRequested, None)
        .await
        .expect("end");
    // Ended two hours ago.
    db.execute_raw(&format!(
        "UPDATE sessions SET ended_at = {} WHERE id = '{}'",
        now_ms() - 7_200_000,
        old.id
    ))
    .await;
    store
        .create_session(&support::new_session("live-thread"))
        .await
        .expect("create");
    let add = |thread: &'static str, post: &'static str, text: &'static str| {
        let store = store.clone();
        async move {
            store
                .append_transcript(
                    thread,
                    post,
                    TranscriptKind::Post,
                    None,
                    &json!({ "text": text }).to_string(),
                    now_ms(),
                )
                .await
                .expect("append");
        }
    };
    add("old-thread", "old-post", "from long ago").await;
    for text in ["Starting", "Cloning", "Ready"] {
        add("live-thread", "progress", text).await;
    }
    let tokens = format!("{TOKEN}=alice");
    let app = TestApp::start(settings(
        &db.url,
        &[
            ("console-auth", "token"),
            ("console-tokens", &tokens),
            ("console-retention-secs", "3600"),
        ],
    ))
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let old_left = store
            .transcript_after("old-thread", 0, 100)
            .await
            .expect("read");
        let live: Vec<String> = store
            .transcript_after("live-thread", 0, 100)
            .await
            .expect("read")
            .into_iter()
            .map(|e| e.body)
            .collect();
        if old_left.is_empty() && live.len() == 2 {
            assert!(
                live[0].contains("Starting") && live[1].contains("Ready"),
                "{live:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not pruned: old thread {old_left:?}, live thread {live:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app.stop().await;
}
