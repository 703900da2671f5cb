//! What reaches the VM is safe: hostile names never run anything, and the git token never
//! lands in a URL or `.git/config`. Against the testbed's real sshd.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use session_manager::runtime::devcontainer::{self, ContainerLayout};
use session_manager::runtime::git::{self, GitLayout};
use session_manager::runtime::shell::Script;
use session_manager::runtime::ssh::{HostKeyPolicy, SshConfig, SshKey, SshPool};
use support::testbed::Testbed;

fn pool(tb: &Testbed) -> SshPool {
    SshPool::new(SshConfig {
        host: tb.get("SM_TEST_VM_HOST"),
        port: tb.port(),
        user: tb.get("SM_TEST_VM_USER"),
        key: SshKey::Path(tb.get("SM_TEST_VM_KEY_PATH").into()),
        host_key: HostKeyPolicy::Pinned(tb.known_hosts()),
        timeout: Duration::from_secs(30),
        max_channels_per_master: 8,
    })
    .expect("pool")
}

async fn run(pool: &SshPool, script: &Script) -> session_manager::runtime::ssh::CommandOutput {
    pool.run(script).await.expect("ssh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_repository_branch_and_worktree_names_never_run_anything_on_the_vm() {
    let tb = Testbed::load();
    let vm = pool(&tb);
    let root = format!("/home/claude/sm-security/{}", uuid::Uuid::new_v4().simple());
    let canary = format!("/tmp/sm-canary-{}", uuid::Uuid::new_v4().simple());
    let layout = GitLayout {
        base_url: url::Url::parse(&tb.get("SM_TEST_GIT_BASE_URL")).expect("url"),
        repos_base: format!("{root}/repos"),
        worktrees_base: format!("{root}/worktrees"),
        auto_pull: true,
    };
    let corpus = [
        format!("x'; touch {canary}; '"),
        format!("x\"; touch {canary}; \""),
        format!("x; touch {canary}"),
        format!("$(touch {canary})"),
        format!("`touch {canary}`"),
        format!("x\ntouch {canary}"),
        format!("x && touch {canary}"),
        format!("x | touch {canary}"),
        format!("--upload-pack=touch {canary}"),
        format!("-c core.sshCommand=touch {canary}"),
    ];
    let timeout = Duration::from_secs(60);
    for hostile in &corpus {
        // Repository names, branch names and worktree names, each past the parser (which
        // refuses all of these) straight into the runtime.
        let _ = git::ensure_clone(&vm, &layout, "acme", hostile, None, timeout).await;
        let _ = git::ensure_clone(&vm, &layout, hostile, "widgets", None, timeout).await;
        let _ = git::ensure_clone(&vm, &layout, "acme", "widgets", Some(hostile), timeout).await;
        let _ = git::ensure_worktree(
            &vm,
            &layout,
            "acme",
            "widgets",
            Some(hostile),
            "wt",
            timeout,
        )
        .await;
        let _ = git::ensure_worktree(&vm, &layout, "acme", "widgets", None, hostile, timeout).await;
        let _ = git::remove_worktree(&vm, &layout, "acme", "widgets", hostile, timeout).await;
        let containers = ContainerLayout {
            runtime: "podman".into(),
            image: hostile.clone(),
            network: hostile.clone(),
            state_dir: format!("{}/state", root.trim_start_matches("/home/claude/")),
            up_timeout: timeout,
            repo_config: devcontainer::RepoConfigPolicy::Vetted,
            deployment: Some(hostile.clone()),
        };
        let _ = devcontainer::up(&vm, &containers, &format!("{root}/{hostile}"), None, "s1").await;
        let _ = devcontainer::up(&vm, &containers, &format!("{root}/ws"), None, hostile).await;
        let _ =
            devcontainer::up(&vm, &containers, &format!("{root}/ws"), Some(hostile), "s2").await;
        let _ = devcontainer::remove_session(&vm, &containers, hostile).await;
        let _ = devcontainer::inspect(&vm, "podman", hostile).await;
        let _ = devcontainer::remove(&vm, "podman", hostile).await;
    }
    let mut check = Script::new();
    check.command("test", &["-e", canary.as_str()]).expect("q");
    assert_eq!(
        run(&vm, &check).await.status,
        Some(1),
        "a hostile value was executed on the VM"
    );
    let mut cleanup = Script::new();
    cleanup.command("rm", &["-rf", root.as_str()]).expect("q");
    run(&vm, &cleanup).await;
    vm.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_in_chat_are_refused_before_anything_runs() {
    let tb = Testbed::load();
    let vm = pool(&tb);
    let canary = format!("/tmp/sm-canary-{}", uuid::Uuid::new_v4().simple());
    let commands = [
        format!("@claude start acme/x;touch{canary}"),
        format!("@claude start acme/widgets@$(touch {canary})"),
        format!("@claude start acme/widgets@`touch {canary}`"),
        format!("@claude start acme/widgets --worktree=a;touch{canary}"),
        format!("@claude start acme/widgets --worktree='x'$(touch {canary})"),
        "@claude start \"acme\"/widgets".to_owned(),
        format!("@claude start acme/widgets@main\ntouch {canary}"),
    ];
    for text in &commands {
        let parsed = session_manager::command::parse(
            text,
            &session_manager::command::ParseContext {
                trigger: "@claude",
                default_org: None,
                in_session_thread: false,
            },
        );
        assert!(
            matches!(parsed, Some(Err(_))),
            "{text:?} must be refused, got {parsed:?}"
        );
    }
    let mut check = Script::new();
    check.command("test", &["-e", canary.as_str()]).expect("q");
    assert_eq!(run(&vm, &check).await.status, Some(1));
    vm.close().await;
}

/// A git "dumb HTTP" server over the testbed's bare repositories that demands the token, the
/// way a private GitHub repository does.
#[derive(Clone)]
struct GitHttp {
    root: PathBuf,
    expected_auth: String,
    seen_auth: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

async fn serve_git(State(server): State<GitHttp>, request: Request) -> Response {
    let auth = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    server.seen_auth.lock().expect("lock").push(auth.clone());
    if auth != server.expected_auth {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"git\"")],
            "",
        )
            .into_response();
    }
    let path = request.uri().path().trim_start_matches('/');
    if path.split('/').any(|part| part == ".." || part.is_empty()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    match std::fs::read(server.root.join(path)) {
        Ok(bytes) => bytes.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_clone_uses_gh_token_without_writing_it_anywhere() {
    let tb = Testbed::load();
    let vm = pool(&tb);
    let token = format!("ghp_{}", uuid::Uuid::new_v4().simple());
    let git_root = tb
        .get("SM_TEST_GIT_BASE_URL")
        .trim_start_matches("file://")
        .to_owned();
    let mut prepare = Script::new();
    prepare
        .command(
            "git",
            &[
                "-C",
                &format!("{git_root}/acme/private.git"),
                "update-server-info",
            ],
        )
        .expect("q");
    assert!(
        run(&vm, &prepare).await.success(),
        "dumb HTTP needs info/refs"
    );

    let server = GitHttp {
        root: PathBuf::from(&git_root),
        expected_auth: format!(
            "Basic {}",
            base64(format!("x-access-token:{token}").as_bytes())
        ),
        seen_auth: std::sync::Arc::default(),
    };
    let app = axum::Router::new()
        .fallback(serve_git)
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let http = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // GH_TOKEN in the VM's environment, as an operator would set it.
    let mut write_env = Script::new();
    write_env
        .raw("mkdir -p \"$HOME/.config/sm-testbed\"")
        .raw("umask 077")
        .set("token", &token)
        .expect("q")
        .raw("printf 'export GH_TOKEN=%s\\n' \"$token\" > \"$HOME/.config/sm-testbed/env.sh\"");
    assert!(run(&vm, &write_env).await.success());

    let root = format!("/home/claude/sm-security/{}", uuid::Uuid::new_v4().simple());
    let layout = GitLayout {
        base_url: url::Url::parse(&format!("http://127.0.0.1:{port}")).expect("url"),
        repos_base: format!("{root}/repos"),
        worktrees_base: format!("{root}/worktrees"),
        auto_pull: true,
    };
    let cloned = git::ensure_clone(
        &vm,
        &layout,
        "acme",
        "private",
        None,
        Duration::from_secs(60),
    )
    .await;
    let result = async {
        let path = cloned.expect("the clone succeeds with GH_TOKEN");
        assert!(
            server
                .seen_auth
                .lock()
                .expect("lock")
                .iter()
                .any(|a| a == &server.expected_auth),
            "the token was used"
        );
        let mut inspect = Script::new();
        inspect
            .set("clone", &path.path)
            .expect("q")
            .set("token", &token)
            .expect("q");
        inspect.raw(
            "if grep -rqF \"$token\" \"$clone/.git\"; then echo token-found; else echo clean; fi",
        );
        inspect.raw("git -C \"$clone\" remote get-url origin");
        let out = run(&vm, &inspect).await;
        let mut lines = out.stdout.lines();
        assert_eq!(
            lines.next(),
            Some("clean"),
            "the token is nowhere under .git"
        );
        assert_eq!(
            lines.next(),
            Some(format!("http://127.0.0.1:{port}/acme/private.git").as_str()),
            "no credentials in the URL"
        );
        // A second run (fetch and fast-forward) works the same way.
        git::ensure_clone(
            &vm,
            &layout,
            "acme",
            "private",
            None,
            Duration::from_secs(60),
        )
        .await
        .expect("fetch with the token");
        let out = run(&vm, &inspect).await;
        assert_eq!(out.stdout.lines().next(), Some("clean"));

        // Without the token the clone is refused: the token really is what opened it.
        let mut no_env = Script::new();
        no_env.raw("rm -f \"$HOME/.config/sm-testbed/env.sh\"");
        run(&vm, &no_env).await;
        let other = GitLayout {
            repos_base: format!("{root}/other"),
            ..layout.clone()
        };
        let refused = git::ensure_clone(
            &vm,
            &other,
            "acme",
            "private",
            None,
            Duration::from_secs(60),
        )
        .await;
        assert!(
            refused.is_err(),
            "without GH_TOKEN the private repository cannot be read"
        );
    }
    .await;
    let mut cleanup = Script::new();
    cleanup
        .raw("rm -f \"$HOME/.config/sm-testbed/env.sh\"")
        .command("rm", &["-rf", root.as_str()])
        .expect("q");
    run(&vm, &cleanup).await;
    http.abort();
    vm.close().await;
    result
}
