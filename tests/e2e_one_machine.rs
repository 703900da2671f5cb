//! One-machine mode end to end, without any chat server: the real bot binary, started as the
//! testbed's VM user with `SM_VM_HOST=local` (no SSH), no Mattermost, no OPNsense and no
//! callback secret. The web console is the only chat surface: log in with the link the bot
//! prints, start a session, talk to the real Claude Code CLI in a real devcontainer, restart
//! the bot while a network request waits, decide it after the restart, stop the session.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use session_manager::store::{Platform, SessionState, Store};
use support::console::{plain_client, text_of, ConsoleClient};
use support::model_server::{ModelServer, Reply, Script as ModelScript};
use support::stack::{clean_vm, READY_TIMEOUT};
use support::testbed::Testbed;

const WAIT: Duration = Duration::from_secs(120);

/// The uid and gid of a user, from /etc/passwd.
fn ids_of(user: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("passwd");
    let line = passwd
        .lines()
        .find(|l| l.split(':').next() == Some(user))
        .unwrap_or_else(|| panic!("no user {user}"));
    let fields: Vec<&str> = line.split(':').collect();
    (
        fields[2].parse().expect("uid"),
        fields[3].parse().expect("gid"),
    )
}

/// The bot's own directory (a copy of the binary, its database), kept across restarts.
struct Home {
    dir: tempfile::TempDir,
    binary: std::path::PathBuf,
    uid: u32,
    gid: u32,
    user: String,
    vm_root: String,
    db_url: String,
    settings: Vec<(&'static str, String)>,
}

/// The bot as the VM user, and what it printed.
struct Bot {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    home: Home,
}

impl Bot {
    fn start(model: &ModelServer, tb: &Testbed, port: u16) -> Self {
        let user = tb.get("SM_TEST_VM_USER");
        let (uid, gid) = ids_of(&user);
        // A directory of the user's own, holding a copy of the binary and the database.
        let dir = tempfile::Builder::new()
            .prefix("sm-one-machine-")
            .tempdir_in("/tmp")
            .expect("tmp");
        let binary = dir.path().join("session-manager");
        std::fs::copy(env!("CARGO_BIN_EXE_session-manager"), &binary).expect("copy");
        for path in [dir.path(), binary.as_path()] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
        }
        let db_url = format!("sqlite://{}/sm.db", dir.path().display());
        let vm_root = format!("/home/{user}/sm-e2e/{}", uuid::Uuid::new_v4().simple());
        let env = format!(
            "ANTHROPIC_BASE_URL={},ANTHROPIC_API_KEY=test-key,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            model.url()
        );
        // No SM_VM_HOST: without a chat platform it means this machine. The rest points the
        // bot at the test world (its repositories, its image, the scripted model).
        let settings: Vec<(&str, String)> = vec![
            ("SM_DATABASE_URL", db_url.clone()),
            ("SM_LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("SM_GIT_BASE_URL", tb.get("SM_TEST_GIT_BASE_URL")),
            ("SM_REPOS_BASE_PATH", format!("{vm_root}/repos")),
            ("SM_WORKTREES_PATH", format!("{vm_root}/worktrees")),
            ("SM_CONTAINER_IMAGE", tb.get("SM_TEST_SANDBOX_IMAGE")),
            ("SM_CONTAINER_NETWORK", "host".into()),
            ("SM_CONTAINER_ENV", env),
            ("SM_DEVCONTAINER_TIMEOUT_SECS", "300".into()),
            ("SM_PERMISSION_MODE", "bypassPermissions".into()),
            ("SM_ALLOWED_REPOS", "acme/*".into()),
        ];
        let home = Home {
            dir,
            binary,
            uid,
            gid,
            user,
            vm_root,
            db_url,
            settings,
        };
        let (child, output) = Self::spawn(&home);
        Self {
            child,
            output,
            home,
        }
    }

    /// Starts the binary in `home`, collecting what it prints on stderr.
    fn spawn(home: &Home) -> (Child, Arc<Mutex<Vec<String>>>) {
        let mut command = Command::new(&home.binary);
        command
            .arg("serve")
            .current_dir(home.dir.path())
            .env_clear()
            .env("HOME", format!("/home/{}", home.user))
            .env("USER", &home.user)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("TMPDIR", home.dir.path())
            .env("RUST_LOG", "info")
            .envs(home.settings.iter().map(|(k, v)| (*k, v.as_str())))
            .uid(home.uid)
            .gid(home.gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn the bot");
        let output: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::clone(&output);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(line);
            }
        });
        (child, output)
    }

    /// Stops the bot as a service manager would (SIGTERM, then waits for it to exit).
    fn stop(&mut self) {
        // SAFETY: signalling the bot this test started, by its own pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the bot and starts it again on the same database and settings.
    fn restart(&mut self) {
        self.stop();
        let (child, output) = Self::spawn(&self.home);
        self.child = child;
        self.output = output;
    }

    /// Waits for a line of the bot's output containing `needle`.
    async fn printed(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(line) = self
                .output
                .lock()
                .expect("lines")
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the bot never printed {needle:?}:\n{}",
                self.output.lock().expect("lines").join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Logs in with the one-time link this run of the bot printed.
    async fn login(&self, base: &str) -> (ConsoleClient, String) {
        let link = self.printed("/console/login?token=").await;
        let token = link
            .split("token=")
            .nth(1)
            .expect("token")
            .trim()
            .to_owned();
        let console = ConsoleClient::login(base, &token).await.expect("the link");
        (console, token)
    }
}

impl Drop for Bot {
    fn drop(&mut self) {
        self.stop();
        clean_vm(self.home.vm_root.clone(), self.home.db_url.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_machine_mode_does_the_main_job_in_the_console_alone() {
    let tb = Testbed::load();
    let model = ModelServer::start(
        ModelScript::new()
            .on_last_user(
                "[NETWORK_APPROVED: pypi.org]",
                Reply::text("Thanks, pypi.org is approved."),
            )
            .on_last_user(
                "install requests",
                Reply::text("I need the package index first.\n[NETWORK_REQUEST: pypi.org]\n"),
            )
            .on_last_user("hello", Reply::text("Hello from one machine."))
            .fallback(Reply::text("ok")),
    )
    .await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let mut bot = Bot::start(&model, &tb, port);
    let base = format!("http://127.0.0.1:{port}");

    // What it says at start: the console is the chat surface, nothing enforces network
    // decisions, and the link to log in with.
    bot.printed("the web console is the chat surface").await;
    bot.printed("nothing enforces").await;
    let anonymous = plain_client();
    let page = anonymous.get(format!("{base}/")).send().await.expect("get");
    assert_eq!(page.status(), StatusCode::UNAUTHORIZED);
    let (console, token) = bot.login(&base).await;
    // Health says where sessions run.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health = anonymous
            .get(format!("{base}/health"))
            .send()
            .await
            .expect("health")
            .text()
            .await
            .expect("body");
        if health.contains("this machine runs the sessions (SM_VM_HOST=local)") {
            break;
        }
        assert!(Instant::now() < deadline, "{health}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        ConsoleClient::login(&base, &token).await.err(),
        Some(StatusCode::FORBIDDEN),
        "the link works once"
    );

    // Start, talk, decide a network request, stop: all in the console.
    let (status, answer) = console
        .post("/console/api/sessions", json!({"repo": "acme/widgets"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let id = answer["session"].as_str().expect("id").to_owned();
    let mut events = console.events(&id, None).await;
    events
        .until("the ready progress post", READY_TIMEOUT, |e| {
            text_of(e).contains("Ready")
        })
        .await;
    let say = |text: &'static str| {
        let console = &console;
        let id = id.clone();
        async move {
            let (status, answer) = console.say(&id, text).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
        }
    };
    say("hello").await;
    events
        .until("Claude's answer", WAIT, |e| {
            text_of(e).contains("Hello from one machine.")
        })
        .await;
    say("install requests").await;
    let card = events
        .until("the network card", WAIT, |e| {
            e["kind"] == "card" && text_of(e).contains("pypi.org")
        })
        .await;
    let post = card["post_id"].as_str().expect("post").to_owned();

    // A restart before the decision: the card signed by the first run is still answered (the
    // callback key made at the first start is kept in the database, not made again).
    drop(events);
    bot.restart();
    bot.printed("the web console is the chat surface").await;
    let (console, _) = bot.login(&base).await;
    let mut events = console.events(&id, None).await;
    let (status, answer) = console.click(&post, "approve").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the card from before the restart: {answer}"
    );
    events
        .until("the approved answer", WAIT, |e| {
            text_of(e).contains("Thanks, pypi.org is approved.")
        })
        .await;
    let (status, _) = console.command(&id, "stop").await;
    assert_eq!(status, StatusCode::OK);

    // The record: a console session, its approval in the audit log, ended.
    let store = Store::connect(&session_manager::config::DatabaseSettings {
        url: session_manager::config::DatabaseUrl::parse(&bot.home.db_url).expect("url"),
        is_default: false,
        pool_size: 1,
    })
    .await
    .expect("the bot's database");
    let deadline = Instant::now() + READY_TIMEOUT;
    let session = loop {
        let session = store.session(&id).await.expect("read").expect("row");
        if session.state() == SessionState::Ended {
            break session;
        }
        assert!(Instant::now() < deadline, "the session did not end");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(session.platform, Platform::Console);
    assert_eq!(session.started_by, tb.get("SM_TEST_VM_USER"));
    let audit = store.audit_log(Some(&id), 100).await.expect("audit");
    assert!(
        audit
            .iter()
            .any(|a| a.entry.action == "approved" && a.entry.domain.as_deref() == Some("pypi.org")),
        "{audit:?}"
    );
    store.close().await;
    drop(bot);
    model.stop().await;
}
