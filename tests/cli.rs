//! The binary as an operator runs it: configuration errors, redaction, `serve`, `migrate`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_session-manager");

const SECRETS: &[&str] = &[
    "mm-token-SECRET-1",
    "opn-key-SECRET-2",
    "opn-secret-SECRET-3",
    "callback-SECRET-4-0123456789abcdef0123",
    "dbpass-SECRET-5",
    "sshkey-SECRET-6",
];

/// The required variables, with unreachable endpoints on loopback.
fn required_env() -> Vec<(&'static str, String)> {
    vec![
        ("SM_MATTERMOST_URL", "http://127.0.0.1:1".into()),
        ("SM_MATTERMOST_TOKEN", SECRETS[0].into()),
        ("SM_MATTERMOST_TEAM_ID", "abcdefghijklmnopqrstuvwxyz".into()),
        ("SM_VM_HOST", "127.0.0.1".into()),
        ("SM_VM_PORT", "1".into()),
        ("SM_OPNSENSE_URL", "http://127.0.0.1:1".into()),
        ("SM_OPNSENSE_KEY", SECRETS[1].into()),
        ("SM_OPNSENSE_SECRET", SECRETS[2].into()),
        ("SM_CALLBACK_SECRET", SECRETS[3].into()),
        (
            "SM_VM_KNOWN_HOSTS",
            "[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPrDGLMQkvAtest".into(),
        ),
        ("SM_VM_SSH_KEY", TEST_SSH_KEY.into()),
    ]
}

/// The shape of a private key (nothing logs in with it).
const TEST_SSH_KEY: &str =
    "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----";

/// A command with a clean environment (no SM_* from the developer's shell), run in `dir`,
/// which is its TMPDIR too (its SSH pool's private directory goes there, and with `dir`, also
/// when the process is killed).
fn command(dir: &Path, env: &[(&str, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TMPDIR", dir)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn run(dir: &Path, env: &[(&str, String)], args: &[&str]) -> Output {
    command(dir, env, args).output().expect("run the binary")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn assert_no_secret(output: &str) {
    for secret in SECRETS {
        assert!(
            !output.contains(secret),
            "secret {secret} leaked:\n{output}"
        );
    }
}

#[test]
fn a_missing_required_variable_stops_serve_and_is_named() {
    let dir = tempfile::tempdir().expect("dir");
    let mut env = required_env();
    env.retain(|(k, _)| *k != "SM_OPNSENSE_SECRET");
    let out = run(dir.path(), &env, &["serve"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SM_OPNSENSE_SECRET: is required"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("SM_").count(),
        1,
        "only the missing one is named: {stderr}"
    );
    assert_no_secret(&text(&out));
    assert!(
        !dir.path().join("session-manager.db").exists(),
        "nothing started"
    );
}

#[test]
fn a_malformed_variable_stops_serve_and_is_named() {
    let dir = tempfile::tempdir().expect("dir");
    let mut env = required_env();
    env.push(("SM_SSH_TIMEOUT_SECS", "soon".into()));
    env.push(("SM_OPNSENSE_VERIFY_TLS", "perhaps".into()));
    let out = run(dir.path(), &env, &["migrate"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SM_SSH_TIMEOUT_SECS: expected a whole number of seconds")
            && stderr.contains("\"soon\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("SM_OPNSENSE_VERIFY_TLS: expected true or false"),
        "{stderr}"
    );
}

#[test]
fn config_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().expect("dir");
    let mut env = required_env();
    env.push((
        "SM_DATABASE_URL",
        format!("postgres://sm:{}@db.internal:5432/sessions", SECRETS[4]),
    ));
    env.push((
        "SM_VM_SSH_KEY",
        format!(
            "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----",
            SECRETS[5]
        ),
    ));
    env.push(("SM_VM_USER", "agent".into()));
    let out = run(dir.path(), &env, &["config"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert_no_secret(&all);
    assert!(
        all.contains("SM_MATTERMOST_TOKEN") && all.contains("<redacted>"),
        "{all}"
    );
    assert!(
        all.contains("postgres://sm:***@db.internal:5432/sessions"),
        "{all}"
    );
    assert!(
        all.lines()
            .any(|l| l.starts_with("SM_VM_USER") && l.contains("= agent") && l.ends_with("# env")),
        "{all}"
    );
    assert!(
        all.lines().any(|l| l.starts_with("SM_CONTAINER_RUNTIME")
            && l.contains("= podman")
            && l.ends_with("# default")),
        "{all}"
    );
    assert!(all.contains("no problems found"), "{all}");

    // With problems: every one listed, exit status 1, still no secret.
    env.retain(|(k, _)| *k != "SM_MATTERMOST_URL");
    env.push(("SM_RATE_LIMIT_RPS", "lots".into()));
    let out = run(dir.path(), &env, &["config"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("2 problem(s)"), "{all}");
    assert!(all.contains("SM_MATTERMOST_URL: is required"), "{all}");
    assert!(all.contains("SM_RATE_LIMIT_RPS: expected"), "{all}");
    assert_no_secret(&all);
}

#[test]
fn help_lists_every_variable_and_shows_no_secret_value() {
    let dir = tempfile::tempdir().expect("dir");
    let out = run(dir.path(), &required_env(), &["serve", "--help"]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert_no_secret(&all);
    for doc in session_manager::config::setting_docs() {
        assert!(all.contains(&doc.env), "{} missing from --help", doc.env);
    }
}

#[test]
fn dotenv_file_is_read() {
    let dir = tempfile::tempdir().expect("dir");
    let mut dotenv = String::new();
    for (k, v) in required_env() {
        dotenv.push_str(&format!("{k}=\"{v}\"\n"));
    }
    dotenv.push_str("SM_DEFAULT_ORG=acme-corp\n");
    std::fs::write(dir.path().join(".env"), dotenv).expect("write .env");
    let out = run(dir.path(), &[], &["config"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.lines().any(|l| l.starts_with("SM_DEFAULT_ORG")
            && l.contains("acme-corp")
            && l.ends_with("# .env")),
        "a value from .env says so: {all}"
    );
    // The real environment wins over .env, and says so.
    let out = run(
        dir.path(),
        &[("SM_DEFAULT_ORG", "from-env".into())],
        &["config"],
    );
    let all = text(&out);
    assert!(
        all.lines().any(|l| l.starts_with("SM_DEFAULT_ORG")
            && l.contains("from-env")
            && l.ends_with("# env")),
        "{all}"
    );
    assert!(
        all.lines()
            .any(|l| l.starts_with("SM_VM_HOST") && l.ends_with("# .env")),
        "the rest still comes from .env: {all}"
    );
}

#[test]
fn a_missing_or_unreadable_ssh_key_is_a_configuration_problem() {
    let dir = tempfile::tempdir().expect("dir");
    let mut env = required_env();
    env.retain(|(k, _)| *k != "SM_VM_SSH_KEY");
    // The default path (a container's mount) does not exist here.
    let out = run(dir.path(), &env, &["config"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains(
            "SM_VM_SSH_KEY_PATH: cannot read the SSH private key file /secrets/ssh/id_ed25519"
        ),
        "{all}"
    );
    // serve says so at once, with the other problems, instead of starting.
    let mut broken = env.clone();
    broken.retain(|(k, _)| *k != "SM_OPNSENSE_KEY");
    let started = Instant::now();
    let out = run(dir.path(), &broken, &["serve"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "at once");
    assert!(
        stderr.contains("SM_VM_SSH_KEY_PATH: cannot read the SSH private key file")
            && stderr.contains("SM_OPNSENSE_KEY: is required"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("session-manager.db").exists(),
        "nothing started"
    );

    // A file that is not a private key (a public key, say).
    let public = dir.path().join("id_ed25519.pub");
    std::fs::write(
        &public,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPrDGLMQkvA me@host\n",
    )
    .expect("write");
    env.push(("SM_VM_SSH_KEY_PATH", public.display().to_string()));
    let out = run(dir.path(), &env, &["config"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("holds no private key"), "{all}");

    // A readable private key file: no problem.
    let key = dir.path().join("id_ed25519");
    std::fs::write(&key, TEST_SSH_KEY).expect("write");
    env.retain(|(k, _)| *k != "SM_VM_SSH_KEY_PATH");
    env.push(("SM_VM_SSH_KEY_PATH", key.display().to_string()));
    let out = run(dir.path(), &env, &["config"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("no problems found"));
}

#[test]
fn placeholders_from_the_examples_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let mut env = required_env();
    for (name, value) in [
        ("SM_MATTERMOST_URL", "https://REPLACE_ME"),
        ("SM_OPNSENSE_KEY", "REPLACE_ME"),
        ("SM_MATTERMOST_TEAM_ID", "CHANGE-ME"),
    ] {
        env.retain(|(k, _)| *k != name);
        env.push((name, value.into()));
    }
    let out = run(dir.path(), &env, &["config"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("3 problem(s)"), "{all}");
    for name in [
        "SM_MATTERMOST_URL",
        "SM_OPNSENSE_KEY",
        "SM_MATTERMOST_TEAM_ID",
    ] {
        assert!(
            all.contains(&format!("{name}: still holds a placeholder")),
            "{name}: {all}"
        );
    }
}

#[test]
fn migrate_creates_the_database_and_runs_twice() {
    let dir = tempfile::tempdir().expect("dir");
    let mut env = required_env();
    env.push(("SM_DATABASE_URL", "sqlite://state/sm.db".into()));
    std::fs::create_dir(dir.path().join("state")).expect("mkdir");
    for _ in 0..2 {
        let out = run(dir.path(), &env, &["migrate"]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("migrations applied"), "{}", text(&out));
    }
    assert!(dir.path().join("state/sm.db").exists());
}

/// A running `serve` process, killed by its own handle if the test ends early.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_in_an_empty_directory_creates_sqlite_answers_health_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("dir");
    let mut env = required_env();
    env.push(("SM_LISTEN_ADDR", "127.0.0.1:0".into()));
    env.push(("SM_LOG_FORMAT", "json".into()));
    env.push(("RUST_LOG", "info".into()));
    let mut child = command(dir.path(), &env, &["serve"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut server = Server(child);

    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let mut addr = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while addr.is_none() && Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let json: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        if json["message"] == "HTTP server listening" {
            addr = json["addr"].as_str().map(str::to_owned);
        }
        log.push(json);
    }
    let addr = addr.unwrap_or_else(|| panic!("never listened; log: {log:?}"));
    assert!(
        log.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("embedded SQLite"))),
        "the embedded default is announced: {log:?}"
    );
    assert!(
        dir.path().join("session-manager.db").exists(),
        "SQLite file created"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let body: serde_json::Value = rt.block_on(async {
        let client = reqwest::Client::new();
        let mut body = serde_json::Value::Null;
        for _ in 0..100 {
            let r = client
                .get(format!("http://{addr}/health"))
                .send()
                .await
                .expect("health");
            assert_eq!(r.status(), 200);
            body = r.json().await.expect("JSON");
            if ["mattermost", "vm", "firewall"]
                .iter()
                .all(|c| body["components"][c]["status"] == "down")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        body
    });
    assert_eq!(body["components"]["database"]["status"], "up", "{body}");
    for component in ["mattermost", "vm", "firewall"] {
        assert_eq!(
            body["components"][component]["status"], "down",
            "{component}: {body}"
        );
    }

    // SAFETY: signalling our own child by the pid we spawned.
    let pid = i32::try_from(server.0.id()).expect("pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "did not stop within 15 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    let rest: Vec<String> = rx.iter().collect();
    let _ = reader.join();
    let all_logs = format!("{log:?}{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM received")),
        "{rest:?}"
    );
    assert_no_secret(&all_logs);
    // One line per external system at start: reached, or not reached and why.
    let lines: Vec<serde_json::Value> = log
        .iter()
        .cloned()
        .chain(rest.iter().filter_map(|l| serde_json::from_str(l).ok()))
        .collect();
    let about = |system: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["system"] == system)
            .map(|l| l["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        about("database"),
        ["database: reached, migrations applied"],
        "{lines:?}"
    );
    for (system, name) in [
        ("VM", "VM"),
        ("Mattermost", "Mattermost"),
        ("firewall (OPNsense)", "firewall (OPNsense)"),
    ] {
        let said = about(system);
        assert_eq!(
            said.len(),
            1,
            "one line for {system}, not one per retry: {said:?}"
        );
        assert!(
            said[0].starts_with(&format!("{name}: not reached: "))
                && said[0].to_lowercase().contains("refused"),
            "{system} says why it was not reached: {said:?}"
        );
    }
}

/// Runs `serve` with `extra` settings until it logs the line of `system` (JSON logs), and
/// returns that line's message.
fn start_line(extra: &[(&'static str, &str)], system: &str) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let mut env = required_env();
    for (name, value) in extra {
        env.retain(|(k, _)| k != name);
        env.push((name, (*value).to_owned()));
    }
    env.push(("SM_LISTEN_ADDR", "127.0.0.1:0".into()));
    env.push(("SM_LOG_FORMAT", "json".into()));
    env.push(("RUST_LOG", "info".into()));
    let mut child = command(dir.path(), &env, &["serve"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let _server = Server(child);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no {system} line within 60 s: {seen:?}"
        );
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let json: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if json["system"] == system {
            return json["message"].as_str().unwrap_or_default().to_owned();
        }
        seen.push(line);
    }
}

#[test]
fn an_unresolvable_chat_server_is_logged_with_the_dns_failure() {
    // `.invalid` never resolves (RFC 2606).
    let line = start_line(
        &[("SM_MATTERMOST_URL", "http://chat.sm-test.invalid")],
        "Mattermost",
    );
    assert!(
        line.starts_with("Mattermost: not reached: http://chat.sm-test.invalid/"),
        "{line}"
    );
    assert!(
        line.contains("dns error"),
        "the cause (a DNS failure) is kept: {line}"
    );
}

#[test]
fn teams_gets_a_start_line_too() {
    let line = start_line(
        &[
            ("SM_TEAMS_APP_ID", "00000000-0000-0000-0000-000000000001"),
            ("SM_TEAMS_APP_PASSWORD", "test-password"),
            ("SM_TEAMS_TOKEN_URL", "http://127.0.0.1:1/token"),
            ("SM_TEAMS_OPENID_METADATA_URL", "http://127.0.0.1:1/openid"),
        ],
        "Microsoft Teams",
    );
    assert!(
        line.starts_with("Microsoft Teams: not reached: http://127.0.0.1:1/token: ")
            && line.to_lowercase().contains("refused"),
        "{line}"
    );
}
