//! Shared test support: fresh databases on both backends, a TCP proxy that can cut the
//! database off, settings builders and an in-process bot on a port-0 listener.
//!
//! PostgreSQL is the real server on 127.0.0.1:5432 (override the admin URL with
//! `SM_TEST_DATABASE_URL`); each [`TestDatabase`] creates its own database and drops it when
//! dropped.
#![allow(dead_code)]

pub mod console;
pub mod dns;
pub mod mattermost;
pub mod model_server;
pub mod opnsense;
pub mod sessions;
pub mod stack;
pub mod teams;
pub mod testbed;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use session_manager::config::{Cli, DatabaseSettings, DatabaseUrl, Settings};
use session_manager::store::Store;
use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The PostgreSQL URL tests use to create and drop their databases.
pub fn pg_admin_url() -> String {
    std::env::var("SM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists only for one test.
pub struct TestDatabase {
    /// URL the store connects to.
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// A fresh PostgreSQL database on the local server.
    pub async fn postgres() -> Self {
        let name = format!("sm_test_{}", uuid::Uuid::new_v4().simple());
        let admin = pg_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed for this test: {e}"));
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let _ = conn.close().await;
        let mut url = url::Url::parse(&admin).expect("admin URL");
        url.set_path(&format!("/{name}"));
        Self {
            url: url.to_string(),
            pg_name: Some(name),
            _dir: None,
        }
    }

    /// A fresh SQLite file in a temporary directory.
    /// The database of an end-to-end test: SQLite, or PostgreSQL when
    /// `SM_TEST_E2E_DATABASE=postgres` (`scripts/test` runs the end-to-end tests on both, since
    /// production runs on PostgreSQL).
    pub async fn for_e2e() -> Self {
        match std::env::var("SM_TEST_E2E_DATABASE").as_deref() {
            Ok("postgres") => Self::postgres().await,
            Ok("sqlite") | Err(_) => Self::sqlite(),
            Ok(other) => panic!("SM_TEST_E2E_DATABASE={other:?}: expected postgres or sqlite"),
        }
    }

    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/test.db", dir.path().display());
        Self {
            url,
            pg_name: None,
            _dir: Some(dir),
        }
    }

    /// Database settings pointing at this database.
    pub fn settings(&self) -> DatabaseSettings {
        DatabaseSettings {
            url: DatabaseUrl::parse(&self.url).expect("test URL"),
            is_default: false,
            pool_size: 5,
        }
    }

    /// A migrated store on this database.
    pub async fn store(&self) -> Store {
        let store = Store::connect(&self.settings()).await.expect("connect");
        store.migrate().await.expect("migrate");
        store
    }

    /// Runs raw SQL outside the storage API (to plant bad rows, for example).
    pub async fn execute_raw(&self, sql: &str) {
        if self.pg_name.is_some() {
            let mut conn = sqlx::PgConnection::connect(&self.url)
                .await
                .expect("connect");
            sqlx::query(sql).execute(&mut conn).await.expect("raw SQL");
        } else {
            let mut conn = sqlx::SqliteConnection::connect(&self.url)
                .await
                .expect("connect");
            sqlx::query(sql).execute(&mut conn).await.expect("raw SQL");
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        let admin = pg_admin_url();
        // Drop may run inside a runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut conn)
                            .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// Every session in the database at `url` (ended ones included): its id and its workspace on
/// the VM, if it got that far. Empty when the database cannot be read.
pub async fn sessions_of(url: &str) -> Vec<(String, Option<String>)> {
    let query = "SELECT id, workspace_path FROM sessions";
    if url.starts_with("sqlite:") {
        let Ok(mut conn) = sqlx::SqliteConnection::connect(url).await else {
            return Vec::new();
        };
        let rows = sqlx::query_as::<_, (String, Option<String>)>(query)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
        let _ = conn.close().await;
        rows
    } else {
        let Ok(mut conn) = sqlx::PgConnection::connect(url).await else {
            return Vec::new();
        };
        let rows = sqlx::query_as::<_, (String, Option<String>)>(query)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
        let _ = conn.close().await;
        rows
    }
}

/// A TCP proxy on 127.0.0.1 that can be cut (listener and every open connection), to make a
/// server disappear from a client's point of view.
pub struct TcpProxy {
    /// Address clients connect to.
    pub addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    /// Starts forwarding `127.0.0.1:<new port>` to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let proxy = Self {
            addr,
            target,
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        proxy.accept_on(listener);
        proxy
    }

    fn accept_on(&self, listener: TcpListener) {
        let tasks = Arc::clone(&self.tasks);
        let target = self.target;
        let inner = Arc::clone(&tasks);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                inner.lock().expect("lock").push(conn);
            }
        });
        tasks.lock().expect("lock").push(accept);
    }

    /// Closes the listener and every forwarded connection.
    pub fn cut(&self) {
        for task in self.tasks.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    /// Listens again on the same address after [`TcpProxy::cut`].
    pub async fn restore(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind proxy");
        self.accept_on(listener);
    }
}

/// A [`TcpProxy`] to the server of the PostgreSQL URL `url`, and the same URL through it.
pub async fn proxied(url: &str) -> (TcpProxy, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (userinfo, hostpath) = match rest.split_once('@') {
        Some((user, hostpath)) => (format!("{user}@"), hostpath),
        None => (String::new(), rest),
    };
    let (hostport, path) = match hostpath.find('/') {
        Some(i) => (&hostpath[..i], &hostpath[i..]),
        None => (hostpath, ""),
    };
    let server = tokio::net::lookup_host(hostport)
        .await
        .expect("resolve the database host")
        .next()
        .expect("an address");
    let proxy = TcpProxy::start(server).await;
    let through = format!("{scheme}://{userinfo}{}{path}", proxy.addr);
    (proxy, through)
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A syntactically valid known_hosts line for settings whose VM is never reached.
pub const TEST_KNOWN_HOSTS: &str =
    "[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPrDGLMQkvA+6hwmqB/JCQHXOQKtest";

/// A private key's shape for settings whose VM is never reached (the key file check wants a
/// key; nothing ever logs in with this one).
pub const TEST_SSH_KEY: &str =
    "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----";

/// A 32-character callback secret for tests.
pub const CALLBACK_SECRET: &str = "test-callback-secret-0123456789abcdef";

/// Valid settings whose external services are unreachable (port 1 on loopback), plus
/// `extra` flags (`("rate-limit-rps", "5")`).
pub fn settings(database_url: &str, extra: &[(&str, &str)]) -> Settings {
    let mut argv: Vec<String> = vec!["session-manager".into(), "serve".into()];
    let mut pairs: Vec<(&str, &str)> = vec![
        ("mattermost-url", "http://127.0.0.1:1"),
        ("mattermost-token", "test-token"),
        ("mattermost-team-id", "abcdefghijklmnopqrstuvwxyz"),
        ("vm-host", "127.0.0.1"),
        ("vm-port", "1"),
        ("opnsense-url", "http://127.0.0.1:1"),
        ("opnsense-key", "test-key"),
        ("opnsense-secret", "test-secret"),
        ("callback-secret", CALLBACK_SECRET),
        ("vm-known-hosts", TEST_KNOWN_HOSTS),
        ("vm-ssh-key", TEST_SSH_KEY),
        ("database-url", database_url),
        ("listen-addr", "127.0.0.1:0"),
        ("rate-limit-rps", "1000"),
        ("rate-limit-burst", "1000"),
    ];
    for (k, v) in extra {
        pairs.retain(|(key, _)| key != k);
        pairs.push((k, v));
    }
    // A key file given by the test is the key (the content would be preferred over it).
    if extra.iter().any(|(k, _)| *k == "vm-ssh-key-path") {
        pairs.retain(|(k, _)| *k != "vm-ssh-key");
    }
    for (k, v) in pairs {
        argv.push(format!("--{k}={v}"));
    }
    let matches = Cli::raw_command()
        .try_get_matches_from(argv)
        .expect("arguments");
    Settings::from_matches(&matches).expect("valid test settings")
}

/// Logs into libtest's captured output (shown for failing tests); levels from RUST_LOG,
/// `warn` by default.
pub fn init_test_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The bot running in this process.
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Starts [`session_manager::serve`] on a fresh 127.0.0.1 port.
    pub async fn start(settings: Settings) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, settings).await
    }

    /// Starts [`session_manager::serve`] on a listener bound beforehand (when the settings
    /// must know the address, e.g. `SM_CALLBACK_URL`).
    pub async fn start_on(listener: TcpListener, settings: Settings) -> Self {
        init_test_tracing();
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let serve = session_manager::serve(settings, listener.into(), shutdown.clone());
        let handle = tokio::spawn(async move {
            let result = serve.await;
            if let Err(e) = &result {
                eprintln!("serve ended with an error: {e:#}");
            }
            result
        });
        Self {
            addr,
            shutdown,
            handle,
        }
    }

    /// `http://127.0.0.1:port{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Whether `serve` is still running (it returns only on shutdown or a fatal error).
    pub fn is_running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Shuts the bot down and waits for it; panics if it failed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle
            .await
            .expect("serve task")
            .expect("serve returned an error");
    }
}

/// A standard Mattermost session on `acme/widgets`, anchored at `thread`, to store directly.
#[allow(dead_code)]
pub fn new_session(thread: &str) -> session_manager::store::NewSession {
    use session_manager::store::{new_session_id, NewSession, Platform, SessionKind};
    NewSession {
        id: new_session_id(),
        platform: Platform::Mattermost,
        channel_id: "channel0000000000000000001".into(),
        thread_id: thread.into(),
        kind: SessionKind::Standard,
        parent_id: None,
        started_by: "user00000000000000000000001".into(),
        repo_host: "github.com".into(),
        repo_org: "acme".into(),
        repo_name: "widgets".into(),
        branch: Some("main".into()),
        worktree: None,
        profile: None,
    }
}
