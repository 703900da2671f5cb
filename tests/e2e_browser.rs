//! The web console in a real browser (Debian's Chromium, headless, driven over WebDriver by
//! chromedriver and the fantoccini client) against the real bot process on the testbed: log
//! in with the link it printed, start a session, see the scripted answer come in, reload in
//! the middle of a turn (no gap, no duplicate), see hostile markup from the agent and in a
//! message shown as text and never run, approve a network request of a Mattermost
//! session and see the chat card change, stop the session.
//!
//! With `SM_TEST_SCREENSHOTS=docs` it writes the screenshots `docs/console.md` shows.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use session_manager::store::{Platform, SessionState};
use support::model_server::{Reply, Script as ModelScript};
use support::opnsense::{FakeOpnsense, ALIAS};
use support::stack::{Stack, READY_TIMEOUT};
use support::testbed::Testbed;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const WAIT: Duration = Duration::from_secs(120);

/// chromedriver on a free port, stopped when dropped, with a temporary directory of its own
/// for the browser's profile and shared memory (removed when dropped).
struct Driver {
    child: Child,
    port: u16,
    tmp: Option<tempfile::TempDir>,
}

impl Driver {
    fn start() -> Self {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists(),
            "{CHROMEDRIVER} is missing: scripts/testbed installs chromium and chromium-driver"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let tmp = tempfile::tempdir().expect("tmp");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        Self {
            child,
            port,
            tmp: Some(tmp),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The browser's last processes may still be writing there for a moment.
        std::thread::sleep(Duration::from_millis(500));
        if let Some(tmp) = self.tmp.take() {
            let path = tmp.path().to_owned();
            if tmp.close().is_err() {
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
}

async fn browser(driver: &Driver) -> Client {
    // Two TLS back ends are compiled in (the WebDriver client's is not used: chromedriver
    // speaks plain HTTP on 127.0.0.1); pick one so the client can be built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let caps = json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connected = ClientBuilder::rustls()
            .expect("tls")
            .capabilities(caps.as_object().expect("object").clone())
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await;
        match connected {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("cannot start the browser: {e}"),
        }
    }
}

/// The conversation's entries as the page shows them: (post id, text).
async fn entries(client: &Client) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for element in client
        .find_all(Locator::Css("#conversation .entry"))
        .await
        .unwrap_or_default()
    {
        let id = element.attr("id").await.ok().flatten().unwrap_or_default();
        let text = element.text().await.unwrap_or_default();
        out.push((id, text));
    }
    out
}

/// Waits until an entry's text contains `needle`.
async fn shows(client: &Client, what: &str, needle: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if entries(client)
            .await
            .iter()
            .any(|(_, t)| t.contains(needle))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {what} ({needle:?}); it shows {:?}",
            entries(client).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How many entries contain `needle`.
async fn count(client: &Client, needle: &str) -> usize {
    entries(client)
        .await
        .iter()
        .filter(|(_, t)| t.contains(needle))
        .count()
}

/// Takes a screenshot; with `SM_TEST_SCREENSHOTS=docs` it becomes `docs/<name>`.
async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG image");
    if std::env::var("SM_TEST_SCREENSHOTS").as_deref() == Ok("docs") {
        let docs = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
        std::fs::write(docs.join(name), png).expect("write the screenshot");
    }
}

/// An answer full of markup that would run script if a page rendered it as HTML.
const HOSTILE_ANSWER: &str = "Here is some markup.\n\n<script>window.__pwned = 'script'</script>\n\n<img src=x onerror=\"window.__pwned = 'img'\">\n\n[a link](javascript:window.__pwned='link') and ![an image](http://127.0.0.1:9/x.png)\n\n<iframe src=\"javascript:window.__pwned='frame'\"></iframe>\n\n<a href=\"javascript:window.__pwned='anchor'\">anchor</a> after the markup";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_in_a_real_browser() {
    let tb = Testbed::load();
    let opn = FakeOpnsense::start("opn-key", "opn-secret").await;
    let script = ModelScript::new()
        .asks_for_pypi()
        .on_tool_result(
            "two",
            Reply::text("Counted to two.").after(Duration::from_secs(6)),
        )
        .on_last_user("count slowly", Reply::bash("echo one; echo two"))
        .on_last_user("show markup", Reply::text(HOSTILE_ANSWER))
        .fallback(Reply::text("ok"));
    let mut extra = opn.bot_settings("opn-key", "opn-secret");
    extra.push(("console-auth", "link".into()));
    // The person running the bot is alice on Mattermost: the console acts as her there.
    extra.push(("console-operator", "alice".into()));
    let mut stack = Stack::start_with(script, &extra).await;
    // The real binary, whose login link is printed on its stderr.
    let bot = stack.switch_to_process(&tb).await;
    let line = bot.printed("/console/login?token=").await;
    let link = line.trim().to_owned();
    assert!(link.starts_with("http://127.0.0.1:"), "{link}");
    let base = link.split("/console/").next().expect("base").to_owned();

    // A Mattermost session, to be seen and decided in the console.
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let chat_session = stack.session_at(&channel, &root).await;

    let driver = Driver::start();
    let client = browser(&driver).await;
    client.goto(&format!("{base}/")).await.expect("goto");
    let body = client.source().await.expect("source");
    assert!(body.contains("Log in"), "not logged in yet");
    client.goto(&link).await.expect("the login link");
    client
        .wait()
        .for_element(Locator::Css("form#start"))
        .await
        .expect("the sessions list");

    // Start a session from the form (its own worktree: the main clone is in use).
    client
        .find(Locator::Css("form#start input[name=repo]"))
        .await
        .expect("repo")
        .send_keys("acme/widgets")
        .await
        .expect("type");
    client
        .find(Locator::Css("form#start input[name=worktree]"))
        .await
        .expect("worktree")
        .click()
        .await
        .expect("tick");
    client
        .find(Locator::Css("form#start button[type=submit]"))
        .await
        .expect("start")
        .click()
        .await
        .expect("click");
    client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("section.session"))
        .await
        .expect("the session page");
    let url = client.current_url().await.expect("url").to_string();
    let id = url.rsplit('/').next().expect("id").to_owned();
    let session = stack.store.session(&id).await.expect("read").expect("row");
    assert_eq!(session.platform, Platform::Console);
    shows(&client, "the ready progress post", "Ready").await;

    // A turn with a command, then an answer that takes a few seconds: reload in between.
    let say = |text: &'static str| {
        let client = client.clone();
        async move {
            client
                .find(Locator::Css("form#say textarea"))
                .await
                .expect("textarea")
                .send_keys(text)
                .await
                .expect("type");
            client
                .find(Locator::Css("form#say button[type=submit]"))
                .await
                .expect("send")
                .click()
                .await
                .expect("click");
        }
    };
    say("count slowly").await;
    shows(&client, "the command", "$ echo one; echo two").await;
    client.refresh().await.expect("reload");
    client
        .wait()
        .for_element(Locator::Css("section.session"))
        .await
        .expect("the page again");
    shows(&client, "the answer after the reload", "Counted to two.").await;
    let shown = entries(&client).await;
    let mut ids: Vec<&String> = shown.iter().map(|(id, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), shown.len(), "no post twice: {shown:?}");
    for needle in ["count slowly", "$ echo one; echo two", "Counted to two."] {
        assert_eq!(count(&client, needle).await, 1, "{needle} once: {shown:?}");
    }

    // Hostile markup, from the agent and in a message, is shown as text: nothing of it runs in
    // the page, and no script link, image, frame or script element is made of it.
    say("<img src=x onerror=\"window.__pwned='typed'\"> show markup").await;
    shows(&client, "the hostile answer", "after the markup").await;
    let ran = client
        .execute(
            "return window.__pwned === undefined ? null : String(window.__pwned);",
            vec![],
        )
        .await
        .expect("execute");
    assert!(ran.is_null(), "markup ran in the page: {ran}");
    let made = client
        .find_all(Locator::Css(
            "#conversation img, #conversation script, #conversation iframe, #conversation a[href^='javascript'], #conversation [onerror]",
        ))
        .await
        .expect("find");
    assert!(made.is_empty(), "{} elements made of markup", made.len());
    shows(&client, "the script tag as text", "<script>window.__pwned").await;
    shows(&client, "the typed tag as text", "<img src=x onerror=").await;

    // The list, with both sessions.
    client.goto(&format!("{base}/")).await.expect("goto");
    let list = client.source().await.expect("source");
    assert!(
        list.contains(&id[..8]) && list.contains(&chat_session.id[..8]),
        "{list}"
    );
    screenshot(&client, "console-sessions.png").await;

    // The Mattermost session: its card, approved in the browser, changes in Mattermost too.
    client
        .goto(&format!("{base}/console/sessions/{}", chat_session.id))
        .await
        .expect("goto");
    shows(&client, "the chat session's thread", "Ready").await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "install requests")
        .expect("post");
    shows(&client, "the message from Mattermost", "install requests").await;
    let approve = client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("#conversation button[data-action=approve]"))
        .await
        .expect("the Approve button");
    let card_post = approve
        .attr("data-post")
        .await
        .expect("attr")
        .expect("post id");
    approve.click().await.expect("approve");
    stack
        .wait_for("the Mattermost card decided", WAIT, |s| {
            s.fake.post(&card_post).filter(|p| {
                !p.props["attachments"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|a| a["actions"].as_array().is_some_and(|b| !b.is_empty()))
            })
        })
        .await;
    shows(&client, "the agent's answer", "Thanks, pypi.org works now.").await;
    assert!(opn.alias_content(ALIAS).contains(&"pypi.org".to_owned()));
    let buttons = client
        .find_all(Locator::Css(&format!(
            "#p-{} button",
            card_post.replace('.', "\\.")
        )))
        .await
        .expect("buttons");
    assert!(
        buttons.is_empty(),
        "the card has no buttons left in the console either"
    );
    screenshot(&client, "console-session.png").await;

    // Stop the console session with its button.
    client
        .goto(&format!("{base}/console/sessions/{id}"))
        .await
        .expect("goto");
    client
        .wait()
        .for_element(Locator::Css("button[data-command=stop]"))
        .await
        .expect("stop button")
        .click()
        .await
        .expect("stop");
    stack
        .wait_for_state(&id, SessionState::Ended, READY_TIMEOUT)
        .await;
    client.close().await.expect("close the browser");
    drop(driver);
    bot.kill();
    stack.finish().await;
}
