//! The bot's runtime image, built with podman from a local base (no registry) and the binary
//! cargo already built, answers /health while pointed at the fakes.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::mattermost::FakeMattermost;
use support::testbed::Testbed;

/// `podman …` as root with the testbed's containers.conf.
fn podman(tb: &Testbed) -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", tb.get("SM_TEST_ROOT_CONTAINERS_CONF"));
    cmd
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("podman");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the container and image it made, by their ids, whatever happens to the test.
struct Cleanup<'a> {
    tb: &'a Testbed,
    container: Option<String>,
    image: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(id) = &self.container {
            let _ = podman(self.tb).args(["rm", "--force", id]).output();
        }
        let _ = podman(self.tb)
            .args(["rmi", "--force", &self.image])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_image_built_from_a_local_base_answers_health() {
    let tb = Testbed::load();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let context = tempfile::tempdir().expect("context");
    std::fs::copy(root.join("Dockerfile"), context.path().join("Dockerfile")).expect("Dockerfile");
    std::fs::copy(
        root.join(".dockerignore"),
        context.path().join(".dockerignore"),
    )
    .expect(".dockerignore");
    std::fs::create_dir_all(context.path().join("target/release")).expect("dirs");
    std::fs::copy(
        env!("CARGO_BIN_EXE_session-manager"),
        context.path().join("target/release/session-manager"),
    )
    .expect("binary");

    let image = format!(
        "localhost/session-manager:smoke-{}",
        uuid::Uuid::new_v4().simple()
    );
    let mut cleanup = Cleanup {
        tb: &tb,
        container: None,
        image: image.clone(),
    };
    let started = Instant::now();
    run(podman(&tb).args([
        "build",
        "--network=host",
        "--target",
        "runtime-prebuilt",
        "--build-arg",
        &format!("RUNTIME_IMAGE={}", tb.get("SM_TEST_RUNTIME_BASE_IMAGE")),
        "--tag",
        &image,
        &context.path().display().to_string(),
    ]));
    println!("image built in {:.1} s", started.elapsed().as_secs_f64());
    let user = run(podman(&tb).args(["image", "inspect", "--format", "{{.Config.User}}", &image]));
    assert_eq!(user, "10001:10001", "the image runs as its non-root user");

    let fake = FakeMattermost::start().await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        probe.local_addr().expect("addr").port()
    };
    let env = [
        format!("SM_MATTERMOST_URL={}", fake.url()),
        format!("SM_MATTERMOST_TOKEN={}", fake.bot_token()),
        format!("SM_MATTERMOST_TEAM_ID={}", fake.team_id()),
        "SM_VM_HOST=127.0.0.1".to_owned(),
        "SM_VM_PORT=1".to_owned(),
        format!("SM_VM_KNOWN_HOSTS={}", support::TEST_KNOWN_HOSTS),
        format!("SM_VM_SSH_KEY={}", support::TEST_SSH_KEY),
        "SM_OPNSENSE_URL=http://127.0.0.1:1".to_owned(),
        "SM_OPNSENSE_KEY=k".to_owned(),
        "SM_OPNSENSE_SECRET=s".to_owned(),
        format!("SM_CALLBACK_SECRET={}", support::CALLBACK_SECRET),
        format!("SM_LISTEN_ADDR=127.0.0.1:{port}"),
        "SM_DATABASE_URL=sqlite:///tmp/session-manager.db".to_owned(),
    ];
    let mut args: Vec<String> = [
        "run",
        "--detach",
        "--network=host",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop=ALL",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for e in &env {
        args.push("--env".into());
        args.push(e.clone());
    }
    args.push(image.clone());
    let id = run(podman(&tb).args(&args));
    cleanup.container = Some(id.clone());

    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/health")).await {
            if r.status() == 200 {
                let body: serde_json::Value = r.json().await.expect("json");
                if body["components"]["mattermost"]["status"] == "up" {
                    break body;
                }
            }
        }
        if Instant::now() > deadline {
            let logs = podman(&tb)
                .args(["logs", &id])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
            panic!("the container never answered /health with 200; logs: {logs:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(body["components"]["database"]["status"], "up");
    assert_eq!(body["role"], "active");
    drop(cleanup);
    fake.stop().await;
}
