//! Two instances on one PostgreSQL: one acts, the other stands by and takes over when the
//! first dies.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::TestDatabase;

/// A `serve` process; killed (SIGKILL) when dropped, and its TMPDIR (where its SSH pool keeps
/// its private directory) removed.
struct Instance {
    child: Child,
    addr: String,
    /// Every log message it wrote so far.
    messages: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _tmp: tempfile::TempDir,
}

impl Instance {
    fn start(database_url: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut child = Command::new(env!("CARGO_BIN_EXE_session-manager"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TMPDIR", tmp.path())
            .env("SM_VM_SSH_KEY", support::TEST_SSH_KEY)
            .env("SM_MATTERMOST_URL", "http://127.0.0.1:1")
            .env("SM_MATTERMOST_TOKEN", "t")
            .env("SM_MATTERMOST_TEAM_ID", "abcdefghijklmnopqrstuvwxyz")
            .env("SM_VM_HOST", "127.0.0.1")
            .env("SM_VM_PORT", "1")
            .env("SM_VM_KNOWN_HOSTS", support::TEST_KNOWN_HOSTS)
            .env("SM_OPNSENSE_URL", "http://127.0.0.1:1")
            .env("SM_OPNSENSE_KEY", "k")
            .env("SM_OPNSENSE_SECRET", "s")
            .env("SM_CALLBACK_SECRET", support::CALLBACK_SECRET)
            .env("SM_DATABASE_URL", database_url)
            .env("SM_LISTEN_ADDR", "127.0.0.1:0")
            .env("SM_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = std::sync::Arc::clone(&messages);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(json) = serde_json::from_str::<Value>(&line) {
                    if json["message"] == "HTTP server listening" {
                        let _ = tx.send(json["addr"].as_str().unwrap_or_default().to_owned());
                    }
                    if let Some(message) = json["message"].as_str() {
                        log.lock().expect("log").push(message.to_owned());
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the instance listens");
        Self {
            child,
            addr,
            messages,
            _tmp: tmp,
        }
    }

    /// Whether it logged a message containing `needle`.
    fn logged(&self, needle: &str) -> bool {
        self.messages
            .lock()
            .expect("log")
            .iter()
            .any(|m| m.contains(needle))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::get(format!("http://{}{path}", self.addr))
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_until<F>(what: &str, timeout: Duration, mut check: F)
where
    F: AsyncFnMut() -> bool,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_instance_dies() {
    let db = TestDatabase::postgres().await;
    let first = Instance::start(&db.url);
    wait_until(
        "the first instance is active",
        Duration::from_secs(20),
        async || first.get("/health?probe=readiness").await.0 == 200,
    )
    .await;
    assert_eq!(first.get("/health").await.1["role"], "active");

    let second = Instance::start(&db.url);
    // It tried the lock and found it taken.
    wait_until(
        "the second instance tried the lock",
        Duration::from_secs(20),
        async || second.logged("another instance is active"),
    )
    .await;
    let (status, health) = second.get("/health").await;
    assert_eq!(status, 200, "a standby is alive: {health}");
    assert_eq!(health["role"], "standby", "{health}");
    let (status, ready) = second.get("/health?probe=readiness").await;
    assert_eq!(status, 503, "a standby is not ready: {ready}");
    assert_eq!(
        first.get("/health?probe=readiness").await.0,
        200,
        "the first one stays active"
    );

    // The active instance dies without a goodbye.
    let died = Instant::now();
    drop(first);
    wait_until(
        "the standby takes over",
        Duration::from_secs(20),
        async || second.get("/health?probe=readiness").await.0 == 200,
    )
    .await;
    let took = died.elapsed();
    assert!(took < Duration::from_secs(10), "took over in {took:?}");
    assert_eq!(second.get("/health").await.1["role"], "active");
    println!(
        "standby took over {:.1} s after the active instance died",
        took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_database_is_always_active() {
    let db = TestDatabase::sqlite();
    let only = Instance::start(&db.url);
    wait_until("active", Duration::from_secs(20), async || {
        only.get("/health?probe=readiness").await.0 == 200
    })
    .await;
    assert_eq!(only.get("/health").await.1["role"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_loses_its_database_suspends_and_comes_back_as_active_or_standby() {
    let db = TestDatabase::postgres().await;
    let (proxy, through) = support::proxied(&db.url).await;
    let first = Instance::start(&through);
    wait_until(
        "the first instance is active",
        Duration::from_secs(20),
        async || first.get("/health?probe=readiness").await.0 == 200,
    )
    .await;

    // The database goes away (as in a restart): the instance suspends and stays up.
    proxy.cut();
    wait_until(
        "the first instance suspends",
        Duration::from_secs(20),
        async || first.get("/health").await.1["role"] == "suspended",
    )
    .await;
    let (status, ready) = first.get("/health?probe=readiness").await;
    assert_eq!(status, 503, "a suspended instance is not ready: {ready}");
    // It comes back: the same instance is active again.
    proxy.restore().await;
    wait_until(
        "the first instance is active again",
        Duration::from_secs(20),
        async || first.get("/health?probe=readiness").await.0 == 200,
    )
    .await;
    assert_eq!(first.get("/health").await.1["role"], "active");

    // Cut again, and another instance takes the lock meanwhile: the first one stands by.
    proxy.cut();
    wait_until(
        "the first instance suspends again",
        Duration::from_secs(20),
        async || first.get("/health").await.1["role"] == "suspended",
    )
    .await;
    let second = Instance::start(&db.url);
    wait_until(
        "the second instance takes over",
        Duration::from_secs(20),
        async || second.get("/health?probe=readiness").await.0 == 200,
    )
    .await;
    proxy.restore().await;
    wait_until(
        "the first instance stands by",
        Duration::from_secs(20),
        async || first.get("/health").await.1["role"] == "standby",
    )
    .await;
    let (status, _) = first.get("/health?probe=readiness").await;
    assert_eq!(status, 503, "a standby is not ready");
    assert_eq!(second.get("/health").await.1["role"], "active");

    // And it takes over in turn when the second one dies: the process never exited.
    drop(second);
    wait_until(
        "the first instance takes over",
        Duration::from_secs(20),
        async || first.get("/health?probe=readiness").await.0 == 200,
    )
    .await;
    assert_eq!(first.get("/health").await.1["role"], "active");
}
