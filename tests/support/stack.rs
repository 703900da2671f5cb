//! The whole bot against the testbed: the fake Mattermost, the scripted model server, real
//! storage, and the testbed's sshd, rootless podman, devcontainer CLI and Claude Code CLI.
//! [`Stack`] runs the bot in process (or as a real process, [`BotProcess`], to kill it like a
//! crashed pod) and cleans the VM after the test, also when it fails.

use std::time::{Duration, Instant};

use session_manager::runtime::shell::Script;
use session_manager::runtime::ssh::{HostKeyPolicy, SshConfig, SshKey, SshPool};
use session_manager::store::{SessionState, Store};

use super::mattermost::FakeMattermost;
use super::model_server::{ModelServer, Script as ModelScript};
use super::testbed::Testbed;
use super::{settings, TestApp, TestDatabase};

/// Everything one test needs; `finish` stops what it started.
pub struct Stack {
    pub fake: FakeMattermost,
    pub model: ModelServer,
    pub app: Option<TestApp>,
    pub db: TestDatabase,
    pub store: Store,
    pub vm: SshPool,
    /// Starts the sessions.
    pub alice: String,
    /// Another member of the team (no rights unless invited).
    pub bob: String,
    /// Another member of the team, named in `SM_ADMIN_USERS` when a test says so.
    pub carol: String,
    pub town: String,
    /// Per-test directory on the VM for clones and worktrees.
    pub vm_root: String,
    /// The extra settings the test started with (the bot process gets them too).
    pub extra: Vec<(String, String)>,
    /// The DNS server the bot's egress policy asks (`SM_EGRESS_DNS_SERVERS`):
    /// `inside.egress.test` resolves to 127.0.0.1, `outside.egress.test` to a public address.
    pub dns: super::dns::FakeDns,
}

pub const READY_TIMEOUT: Duration = Duration::from_secs(420);

impl Stack {
    pub async fn start(script: ModelScript) -> Self {
        Self::start_with(script, &[]).await
    }

    /// Like [`Stack::start`], with more settings; `{callback}` in a value is replaced by the
    /// app's own /callback URL, `{vm_root}` by the test's directory on the VM (removed with
    /// the stack).
    pub async fn start_with(script: ModelScript, extra: &[(&str, String)]) -> Self {
        Self::start_on(script, extra, TestDatabase::for_e2e().await, None).await
    }

    /// Like [`Stack::start_with`] on PostgreSQL, the bot reaching it through a [`TcpProxy`]
    /// the test can cut (as a database restart looks to the bot); the test's own store
    /// connects directly.
    pub async fn start_behind_proxy(
        script: ModelScript,
        extra: &[(&str, String)],
    ) -> (Self, super::TcpProxy) {
        let db = TestDatabase::postgres().await;
        let (proxy, url) = super::proxied(&db.url).await;
        let stack = Self::start_on(script, extra, db, Some(url)).await;
        (stack, proxy)
    }

    async fn start_on(
        script: ModelScript,
        extra: &[(&str, String)],
        db: TestDatabase,
        bot_database_url: Option<String>,
    ) -> Self {
        let tb = Testbed::load();
        let fake = FakeMattermost::start().await;
        let alice = fake.add_user("alice");
        let bob = fake.add_user("bob");
        let carol = fake.add_user("carol");
        // Notices meant for one person stay private (the runbook grants this permission).
        fake.grant_ephemeral_posts(&fake.bot_user_id());
        let town = fake.create_channel(
            "town-square",
            &[
                alice.as_str(),
                bob.as_str(),
                carol.as_str(),
                fake.bot_user_id().as_str(),
            ],
        );
        let model = ModelServer::start(script).await;
        let vm_root = format!("/home/claude/sm-e2e/{}", uuid::Uuid::new_v4().simple());
        let vm = SshPool::new(vm_ssh_config(&tb, Duration::from_secs(30), 8)).expect("ssh");
        let store = db.store().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let callback = format!("http://{}/callback", listener.local_addr().expect("addr"));
        let dns = super::dns::FakeDns::start(&[
            ("inside.egress.test", std::net::Ipv4Addr::LOCALHOST),
            (
                "outside.egress.test",
                std::net::Ipv4Addr::new(93, 184, 216, 34),
            ),
        ])
        .await;
        let mut extra: Vec<(&str, String)> = extra
            .iter()
            .map(|(k, v)| {
                let v = v.replace("{callback}", &callback);
                (*k, v.replace("{vm_root}", &vm_root))
            })
            .collect();
        if !extra.iter().any(|(k, _)| *k == "egress-dns-servers") {
            extra.insert(0, ("egress-dns-servers", dns.addr().to_string()));
        }
        if let Some(url) = bot_database_url {
            extra.push(("database-url", url));
        }
        let app = TestApp::start_on(
            listener,
            Self::settings(&tb, &fake, &model, &db, &vm_root, &extra),
        )
        .await;
        // The bot listens once its WebSocket is up (town-square is not caught up on).
        let deadline = Instant::now() + Duration::from_secs(30);
        while fake.websocket_connections() == 0 {
            assert!(
                Instant::now() < deadline,
                "the bot never connected to the fake Mattermost"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            fake,
            model,
            app: Some(app),
            db,
            store,
            vm,
            alice,
            bob,
            carol,
            town,
            vm_root,
            extra: extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            dns,
        }
    }

    pub fn settings(
        tb: &Testbed,
        fake: &FakeMattermost,
        model: &ModelServer,
        db: &TestDatabase,
        vm_root: &str,
        extra: &[(&str, String)],
    ) -> session_manager::config::Settings {
        let env = format!(
            "ANTHROPIC_BASE_URL={},ANTHROPIC_API_KEY=test-key,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            model.url()
        );
        let owned: Vec<(&str, String)> = vec![
            ("mattermost-url", fake.url()),
            ("mattermost-token", fake.bot_token()),
            ("mattermost-team-id", fake.team_id()),
            ("vm-host", tb.get("SM_TEST_VM_HOST")),
            ("vm-port", tb.get("SM_TEST_VM_PORT")),
            ("vm-user", tb.get("SM_TEST_VM_USER")),
            ("vm-ssh-key-path", tb.get("SM_TEST_VM_KEY_PATH")),
            ("vm-known-hosts", tb.get("SM_TEST_VM_KNOWN_HOSTS")),
            ("git-base-url", tb.get("SM_TEST_GIT_BASE_URL")),
            ("repos-base-path", format!("{vm_root}/repos")),
            ("worktrees-path", format!("{vm_root}/worktrees")),
            ("container-image", tb.get("SM_TEST_SANDBOX_IMAGE")),
            ("container-network", "host".into()),
            ("container-env", env),
            // A 2-core CI machine building an image while other tests run needs more than
            // production's 120 s.
            ("devcontainer-timeout-secs", "300".into()),
            // Tests of other things drive tools without answering permission cards; the
            // permission tests set the mode they exercise.
            ("permission-mode", "bypassPermissions".into()),
        ];
        let pairs: Vec<(&str, &str)> = owned
            .iter()
            .chain(extra.iter())
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        settings(&db.url, &pairs)
    }

    /// Waits until `check` finds something, or panics with `what` and the posts so far.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return found;
            }
            if Instant::now() > deadline {
                let posts: Vec<String> = self
                    .fake
                    .posts()
                    .iter()
                    .map(|p| format!("{}: {}", p.user_id, p.message))
                    .collect();
                panic!("timed out waiting for {what}; posts:\n{}", posts.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The bot's post whose text contains `needle`, in `root`'s thread when given.
    pub fn bot_post(&self, root: Option<&str>, needle: &str) -> Option<super::mattermost::Post> {
        let bot = self.fake.bot_user_id();
        self.fake.posts().into_iter().find(|p| {
            p.user_id == bot
                && p.message.contains(needle)
                && root.is_none_or(|r| p.root_id == r || p.id == r)
        })
    }

    /// Waits (up to 120 s) for the bot's post containing `needle`, in `root`'s thread when
    /// given; panics with `what` and the posts so far.
    pub async fn wait_for_bot_post(
        &self,
        what: &str,
        root: Option<&str>,
        needle: &str,
    ) -> super::mattermost::Post {
        self.wait_for(what, Duration::from_secs(120), |s| s.bot_post(root, needle))
            .await
    }

    /// Starts a session from town-square and waits until it is ready. Returns its thread root.
    pub async fn start_session(&self, command: &str) -> (String, String) {
        self.start_session_as(&self.alice, command).await
    }

    /// Like [`Stack::start_session`], started by `user`.
    pub async fn start_session_as(&self, user: &str, command: &str) -> (String, String) {
        let before: std::collections::HashSet<String> =
            self.fake.posts().into_iter().map(|p| p.id).collect();
        self.fake
            .post_as(user, &self.town, None, command)
            .expect("post");
        let anchor_marker = command
            .split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .split('@')
            .next()
            .unwrap_or_default()
            .to_owned();
        // The new thread: an anchor that was not there before (a test may start several
        // sessions on one repository).
        let bot = self.fake.bot_user_id();
        let root = self
            .wait_for("the session thread", Duration::from_secs(30), |s| {
                s.fake.posts().into_iter().find(|p| {
                    p.user_id == bot
                        && p.root_id.is_empty()
                        && !before.contains(&p.id)
                        && p.message.contains(&format!("for `{anchor_marker}"))
                })
            })
            .await;
        self.wait_for("Ready in the progress post", READY_TIMEOUT, |s| {
            if let Some(failed) = s.bot_post(Some(&root.id), "❌") {
                panic!("start failed: {}", failed.message);
            }
            s.bot_post(Some(&root.id), "Ready")
        })
        .await;
        (root.channel_id, root.id)
    }

    /// Starts a session from a Teams channel: `user` writes `command` (with the bot
    /// @mentioned) to the bot's messaging endpoint, and this waits until the new Teams session
    /// says Ready in its thread. Returns the session.
    pub async fn start_teams_session(
        &self,
        teams: &super::teams::FakeTeams,
        channel: &str,
        user: &super::teams::TeamsUser,
        command: &str,
    ) -> session_manager::store::Session {
        use session_manager::store::Platform;
        let before: std::collections::HashSet<String> = self
            .store
            .active_sessions()
            .await
            .expect("sessions")
            .into_iter()
            .map(|s| s.id)
            .collect();
        let endpoint = self
            .app
            .as_ref()
            .expect("app")
            .url(session_manager::chat::teams::MESSAGES_PATH);
        let ask = teams.channel_message(channel, user, command, true);
        assert_eq!(
            teams
                .send(&endpoint, &ask, Some(&teams.valid_token()))
                .await
                .0,
            200
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let session = loop {
            let found = self
                .store
                .active_sessions()
                .await
                .expect("sessions")
                .into_iter()
                .find(|x| x.platform == Platform::Teams && !before.contains(&x.id));
            if let Some(found) = found {
                break found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no Teams session started"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        self.wait_for("Ready in the Teams thread", READY_TIMEOUT, |_| {
            let texts: Vec<String> = teams
                .thread(channel, Some(&session.thread_id))
                .into_iter()
                .filter_map(|m| m.text)
                .collect();
            if let Some(failed) = texts.iter().find(|t| t.contains('❌')) {
                panic!("start failed: {failed}");
            }
            texts.iter().any(|t| t.contains("Ready")).then_some(())
        })
        .await;
        session
    }

    /// The session anchored at a thread.
    pub async fn session_at(&self, channel: &str, root: &str) -> session_manager::store::Session {
        self.store
            .session_by_thread(session_manager::store::Platform::Mattermost, channel, root)
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("no session anchored at {root}"))
    }

    /// Stops the in-process bot and runs the real binary instead (to kill it like a pod),
    /// waiting until it listens to chat.
    pub async fn switch_to_process(&mut self, tb: &Testbed) -> BotProcess {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
        let bot = BotProcess::start(self, tb);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.fake.websocket_connections() == 0 {
            assert!(Instant::now() < deadline, "the bot process never connected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bot
    }

    /// Waits until a session reaches `state`.
    pub async fn wait_for_state(
        &self,
        id: &str,
        state: SessionState,
        timeout: Duration,
    ) -> session_manager::store::Session {
        let deadline = Instant::now() + timeout;
        loop {
            let session = self
                .store
                .session(id)
                .await
                .expect("read")
                .expect("session");
            if session.state() == state {
                return session;
            }
            assert!(
                Instant::now() < deadline,
                "session {id} stayed {:?}, wanted {state:?}",
                session.state()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn vm_run(&self, script: &Script) -> session_manager::runtime::ssh::CommandOutput {
        self.vm.run(script).await.expect("ssh")
    }

    pub async fn finish(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
        // The VM is cleaned in Drop (also when a test fails before it gets here).
    }
}

impl Drop for Stack {
    /// Removes what the test's sessions left on the VM, even when the test failed (a passing
    /// test's stops left nothing, but a test may end with sessions running): the containers of
    /// its workspaces and of its sessions, the images `devcontainer up` built for them, the
    /// sessions' private directories and the test's directory.
    fn drop(&mut self) {
        clean_vm(self.vm_root.clone(), self.db.url.clone());
    }
}

/// Removes what a test's sessions left on the VM (see [`Stack`]'s `Drop`): the containers of
/// its workspaces under `root` and of the sessions recorded in `db_url`, the images
/// `devcontainer up` built for them, the sessions' private directories and `root` itself.
pub fn clean_vm(root: String, db_url: String) {
    let tb = Testbed::load();
    let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                // Every session the test made, ended ones included.
                let sessions = super::sessions_of(&db_url).await;
                let Ok(vm) = SshPool::new(vm_ssh_config(&tb, Duration::from_secs(300), 4)) else {
                    return;
                };
                let mut cleanup = Script::new();
                if cleanup.set("root", &root).is_err() {
                    return;
                }
                // Image removals hold the bot's image lock, as the bot's own do: rootless
                // podman fails other sessions' `devcontainer up` (a spurious `podman pull` of
                // the sandbox image) when an image is removed under them. They may wait for
                // other tests' `up`s, so they come last, after everything else is gone; the
                // lock is never inherited by podman.
                cleanup.raw(r#"mkdir -p "$HOME/.local/share/session-manager"; sm_rmi() { flock --close --exclusive --wait 20 "$HOME/.local/share/session-manager/images.lock" podman image rm "$1" >/dev/null 2>&1 || true; }; images="""#);
                // A container, and (to remove last) the -uid image `devcontainer up` built for
                // its workspace (as the bot's own cleanup removes it) and the image that one
                // was built on when it is a per-workspace one too (a repository's Dockerfile).
                cleanup.raw(r#"sm_rm() { image=$(podman inspect --format '{{.ImageName}}' "$1" 2>/dev/null) || image=; podman rm -f "$1" >/dev/null 2>&1 || true; case "$image" in vsc-*-uid|vsc-*-uid:*|*/vsc-*-uid|*/vsc-*-uid:*) images="$images $image"; base=${image%-uid*}; case "$base" in vsc-*|*/vsc-*) images="$images $base" ;; esac ;; esac; }"#);
                cleanup.raw(r#"for id in $(podman ps -aq --no-trunc --filter label=session-manager.managed=true); do case "$(podman inspect --format '{{index .Config.Labels "session-manager.workspace"}}' "$id")" in "$root"/*) sm_rm "$id" ;; esac; done"#);
                for (id, workspace) in &sessions {
                    if cleanup.set("sid", id).is_err()
                        || cleanup.set("ws", workspace.as_deref().unwrap_or_default()).is_err()
                    {
                        continue;
                    }
                    cleanup.raw(r#"for c in $(podman ps -aq --no-trunc --filter "label=session-manager.session=$sid"); do sm_rm "$c"; done"#);
                    cleanup.raw(r#"d="$HOME/.local/share/session-manager/sessions/$sid"; rm -rf "$d" 2>/dev/null || podman unshare rm -rf "$d""#);
                    // The images `devcontainer up` names after the workspace folder
                    // (vsc-<basename>-<sha256 of the path>), a repository's built image among
                    // them, once no container uses them.
                    cleanup.raw(r#"if [ -n "$ws" ]; then name="vsc-$(basename "$ws" | tr '[:upper:]' '[:lower:]')-$(printf '%s' "$ws" | sha256sum | cut -d' ' -f1)"; images="$images $name-uid $name"; fi"#);
                }
                cleanup.raw(r#"rm -rf "$root" 2>/dev/null || podman unshare rm -rf "$root""#);
                cleanup.raw(r#"for image in $images; do sm_rmi "$image"; done"#);
                let _ = vm.run(&cleanup).await;
                vm.close().await;
            });
        })
        .join();
}

/// How a test reaches the testbed's VM user over SSH.
pub fn vm_ssh_config(tb: &Testbed, timeout: Duration, max_channels_per_master: usize) -> SshConfig {
    SshConfig {
        host: tb.get("SM_TEST_VM_HOST"),
        port: tb.port(),
        user: tb.get("SM_TEST_VM_USER"),
        key: SshKey::Path(tb.get("SM_TEST_VM_KEY_PATH").into()),
        host_key: HostKeyPolicy::Pinned(tb.known_hosts()),
        timeout,
        max_channels_per_master,
    }
}

/// The bot as a separate process, so it can be killed like a crashed pod.
pub struct BotProcess {
    pub child: std::process::Child,
    /// What the bot printed on stderr, line by line.
    pub output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The process's TMPDIR: its SSH pool keeps its key and control sockets under it.
    pub tmp: tempfile::TempDir,
}

impl BotProcess {
    pub fn start(stack: &Stack, tb: &Testbed) -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let env = format!(
            "ANTHROPIC_BASE_URL={},ANTHROPIC_API_KEY=test-key,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            stack.model.url()
        );
        let repos = format!("{}/repos", stack.vm_root);
        let worktrees = format!("{}/worktrees", stack.vm_root);
        let args: Vec<(&str, String)> = vec![
            ("mattermost-url", stack.fake.url()),
            ("mattermost-token", stack.fake.bot_token()),
            ("mattermost-team-id", stack.fake.team_id()),
            ("opnsense-url", "http://127.0.0.1:1".into()),
            ("opnsense-key", "k".into()),
            ("opnsense-secret", "s".into()),
            ("callback-secret", super::CALLBACK_SECRET.into()),
            ("database-url", stack.db.url.clone()),
            ("listen-addr", "127.0.0.1:0".into()),
            ("vm-host", tb.get("SM_TEST_VM_HOST")),
            ("vm-port", tb.get("SM_TEST_VM_PORT")),
            ("vm-user", tb.get("SM_TEST_VM_USER")),
            ("vm-ssh-key-path", tb.get("SM_TEST_VM_KEY_PATH")),
            ("vm-known-hosts", tb.get("SM_TEST_VM_KNOWN_HOSTS")),
            ("git-base-url", tb.get("SM_TEST_GIT_BASE_URL")),
            ("repos-base-path", repos),
            ("worktrees-path", worktrees),
            ("container-image", tb.get("SM_TEST_SANDBOX_IMAGE")),
            ("container-network", "host".into()),
            ("container-env", env),
            ("devcontainer-timeout-secs", "300".into()),
            ("permission-mode", "bypassPermissions".into()),
        ];
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_session-manager"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TMPDIR", tmp.path())
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let extra = stack.extra.iter().map(|(k, v)| (k.as_str(), v.clone()));
        let mut all: Vec<(&str, String)> = args;
        for (k, v) in extra {
            all.retain(|(key, _)| *key != k);
            all.push((k, v));
        }
        // As environment variables, as a deployment sets them: a process's command line is
        // visible to every user of the machine (`ps`), its environment is not.
        for (k, v) in all {
            cmd.env(
                format!("SM_{}", k.replace('-', "_").to_ascii_uppercase()),
                v,
            );
        }
        let mut child = cmd.spawn().expect("spawn the bot");
        let output: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        if let Some(stderr) = child.stderr.take() {
            let lines = std::sync::Arc::clone(&output);
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    if let Ok(mut lines) = lines.lock() {
                        lines.push(line);
                    }
                }
            });
        }
        Self { child, output, tmp }
    }

    /// Waits (up to 60 s) for a line of the bot's stderr containing `needle`.
    pub async fn printed(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(line) = self
                .output
                .lock()
                .ok()
                .and_then(|lines| lines.iter().find(|l| l.contains(needle)).cloned())
            {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "the bot never printed {needle:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the bot without warning, then the SSH masters it leaves behind.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_ssh_masters_under(self.tmp.path());
    }
}

impl Drop for BotProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_ssh_masters_under(self.tmp.path());
    }
}

/// Kills `ssh` master processes whose control files live under `dir`. Returns how many.
pub fn kill_ssh_masters_under(dir: &std::path::Path) -> usize {
    let dir = dir.display().to_string();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmd.starts_with("ssh ") && cmd.contains(&dir) {
            if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                // SAFETY: signalling an ssh master the bot under test started, by its pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
        }
    }
    killed
}
