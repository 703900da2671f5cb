//! SSH to the VM: a pool of multiplexed master connections (the `openssh` crate with its
//! native mux client).
//!
//! - One master connection per host carries many channels; no local `ssh` process is started
//!   per command. sshd limits channels per connection (`MaxSessions`, 10 by default), so each
//!   master carries at most [`SshConfig::max_channels_per_master`] and more masters are opened
//!   when all are full.
//! - The host key is pinned: the configured known_hosts content is written to a private file
//!   and checked strictly. Accepting a new key is possible only when explicitly enabled.
//! - The private key (content or path) is copied into a private temporary directory with mode
//!   0600, which is removed when the pool is dropped.
//! - Scripts run as `bash -lc 'exec bash -c "$1"' sm-script <script>`: the login shell gives the
//!   user's `PATH`, then hands over to a plain bash (see [`Script`] for the environment).
//! - [`SshPool::run`] bounds a command by the configured timeout on both ends: the remote
//!   command runs under coreutils `timeout`, which kills its whole process group, and the local
//!   wait gives up a little later.
//! - A master that died is noticed (`check`) and replaced; the failed command is tried once on
//!   a new master.
//! - With the host [`LOCAL_HOST`] (`SM_VM_HOST=local`, one-machine mode) nothing is connected:
//!   the same scripts run in a local `bash -lc` as the bot's own user, under the same
//!   `timeout`, with the same pipes.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::shell::Script;

/// What the login shell runs: nothing but replacing itself with a plain bash running the
/// script (its first argument). The login shell reads the profile (the user's `PATH`); being
/// replaced, it never runs `~/.bash_logout`, whose own commands would otherwise run under the
/// script's `set -e` and could change its exit status (Debian's does: `clear_console`).
const LOGIN_THEN_SCRIPT: &str = r#"exec bash -c "$1""#;

/// The host that means "this machine, as the bot's own user": no SSH at all.
pub const LOCAL_HOST: &str = "local";

/// How to authenticate.
#[derive(Clone)]
pub enum SshKey {
    /// The private key's content (`SM_VM_SSH_KEY`).
    Content(SecretString),
    /// A private key file (`SM_VM_SSH_KEY_PATH`).
    Path(PathBuf),
}

impl std::fmt::Debug for SshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Content(_) => f.write_str("SshKey::Content(<redacted>)"),
            Self::Path(p) => write!(f, "SshKey::Path({})", p.display()),
        }
    }
}

/// How the VM's host key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Only keys in this known_hosts content are accepted.
    Pinned(String),
    /// Any key is accepted on first contact (insecure; for bootstrapping only).
    AcceptNew,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Private key.
    pub key: SshKey,
    /// Host key checking.
    pub host_key: HostKeyPolicy,
    /// Bound for connecting and for each [`SshPool::run`].
    pub timeout: Duration,
    /// Channels one master carries before another is opened (keep below sshd's MaxSessions).
    pub max_channels_per_master: usize,
}

/// Errors from SSH.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The connection could not be made (unreachable, refused, host key, authentication).
    #[error("cannot connect to {target}: {reason}")]
    Connect {
        /// `user@host:port`.
        target: String,
        /// What ssh said.
        reason: String,
    },
    /// The command did not finish in time (it was killed on the VM too).
    #[error("remote command timed out after {0:?}")]
    Timeout(Duration),
    /// Running the command failed on the transport level.
    #[error("remote command failed to run: {0}")]
    Channel(String),
    /// Local preparation failed (temporary files).
    #[error("cannot prepare SSH credentials: {0}")]
    Local(String),
}

/// What a finished remote command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code; `None` when killed by a signal.
    pub status: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CommandOutput {
    /// Whether it exited with 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Whether coreutils `timeout` killed it (exit 124, or 137 after the kill grace).
    pub fn timed_out(&self) -> bool {
        matches!(self.status, Some(124 | 137))
    }
}

struct Master {
    session: Arc<Session>,
    channels: Arc<AtomicUsize>,
    /// When a liveness check last succeeded.
    checked: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long one liveness check of a master may take before the master counts as dead.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// A master checked this recently is used without checking it again.
const CHECK_FRESH: Duration = Duration::from_secs(2);

/// A channel slot on a master; released when dropped.
struct Lease {
    session: Arc<Session>,
    channels: Arc<AtomicUsize>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.channels.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connection pool to one VM. Share it in an `Arc`.
pub struct SshPool {
    // Field order matters: fields drop in declaration order, and a master is shut down through
    // its control socket inside `dir`, so the masters must go before the directory.
    /// The open masters. Held only to pick or change the list, never across network work.
    masters: std::sync::Mutex<Vec<Arc<Master>>>,
    /// Serialises opening new masters (so a burst opens one, not one each); sessions on
    /// healthy masters never wait for it.
    connecting: Mutex<()>,
    config: SshConfig,
    key_path: PathBuf,
    known_hosts_path: PathBuf,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for SshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshPool")
            .field("target", &self.target())
            .finish_non_exhaustive()
    }
}

impl SshPool {
    /// Prepares a private directory. Connects lazily, on first use; the key is read then, so a
    /// missing key is reported by the first command (and in `/health`), not at start.
    ///
    /// # Errors
    /// [`SshError::Local`] when the temporary files cannot be written.
    pub fn new(config: SshConfig) -> Result<Self, SshError> {
        let local = |e: std::io::Error| SshError::Local(e.to_string());
        let dir = tempfile::Builder::new()
            .prefix("sm-ssh-")
            .tempdir()
            .map_err(local)?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(local)?;
        let key_path = dir.path().join("id");
        let known_hosts_path = dir.path().join("known_hosts");
        let known = match &config.host_key {
            HostKeyPolicy::Pinned(content) => content.clone(),
            HostKeyPolicy::AcceptNew => String::new(),
        };
        write_private(&known_hosts_path, known.as_bytes(), true).map_err(local)?;
        Ok(Self {
            masters: std::sync::Mutex::new(Vec::new()),
            connecting: Mutex::new(()),
            config,
            key_path,
            known_hosts_path,
            dir,
        })
    }

    /// Whether scripts run on this machine instead of over SSH ([`LOCAL_HOST`]).
    pub fn is_local(&self) -> bool {
        self.config.host == LOCAL_HOST
    }

    /// `user@host:port`, for messages.
    pub fn target(&self) -> String {
        if self.is_local() {
            return "this machine".to_owned();
        }
        format!(
            "{}@{}:{}",
            self.config.user, self.config.host, self.config.port
        )
    }

    /// The private directory holding the key copy, known_hosts and the masters' control
    /// sockets (mode 0700, removed when the pool is dropped).
    pub fn private_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Shuts every master connection down (also done, without waiting, when the pool is
    /// dropped). Processes still running on them are cut off.
    pub async fn close(&self) {
        let masters: Vec<Arc<Master>> = self.masters_mut().drain(..).collect();
        for master in masters {
            let Ok(master) = Arc::try_unwrap(master) else {
                continue; // being checked: shuts down when dropped
            };
            match Arc::try_unwrap(master.session) {
                Ok(session) => {
                    if let Err(e) = session.close().await {
                        warn!(error = %e, "closing an SSH master failed");
                    }
                }
                // Still used by a running process: it shuts down when that ends.
                Err(_shared) => {}
            }
        }
    }

    /// How many master connections are open.
    pub async fn masters(&self) -> usize {
        self.masters_mut().len()
    }

    /// The list of masters (a poisoned lock is taken over: the list stays consistent, each
    /// change being one push or retain).
    fn masters_mut(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Master>>> {
        self.masters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Copies the key into the private directory. Done for every new master, so a rotated
    /// key file is picked up at the next reconnect.
    fn write_key(&self) -> Result<(), SshError> {
        let key = match &self.config.key {
            SshKey::Content(content) => content.expose_secret().to_owned(),
            SshKey::Path(path) => std::fs::read_to_string(path).map_err(|e| {
                SshError::Local(format!("cannot read the SSH key {}: {e}", path.display()))
            })?,
        };
        write_private(&self.key_path, key.trim_end().as_bytes(), true)
            .map_err(|e| SshError::Local(e.to_string()))
    }

    async fn connect(&self) -> Result<Session, SshError> {
        self.write_key()?;
        let mut builder = SessionBuilder::default();
        builder
            .user(self.config.user.clone())
            .port(self.config.port)
            .keyfile(&self.key_path)
            .user_known_hosts_file(&self.known_hosts_path)
            .known_hosts_check(match self.config.host_key {
                HostKeyPolicy::Pinned(_) => KnownHosts::Strict,
                HostKeyPolicy::AcceptNew => KnownHosts::Add,
            })
            .connect_timeout(self.config.timeout)
            .server_alive_interval(Duration::from_secs(15))
            .control_directory(self.dir.path());
        let target = self.target();
        let session = tokio::time::timeout(
            self.config.timeout * 2,
            builder.connect_mux(&self.config.host),
        )
        .await
        .map_err(|_| SshError::Connect {
            target: target.clone(),
            reason: format!("no answer within {:?}", self.config.timeout * 2),
        })?
        .map_err(|e| SshError::Connect {
            target: target.clone(),
            reason: error_chain(&e),
        })?;
        info!(%target, "SSH master connection established");
        Ok(session)
    }

    /// A channel slot on a live master, opening a master when none has room.
    ///
    /// No lock is held across network work: a candidate master is taken from the list, checked
    /// (at most [`CHECK_TIMEOUT`], skipped when it passed a check within [`CHECK_FRESH`]) and
    /// dropped from the list when it does not answer; a new master is opened outside the list's
    /// lock. So a frozen or dead master costs the callers that happened to pick it one bounded
    /// check, and callers on healthy masters never wait for it or for a reconnect.
    async fn lease(&self) -> Result<Lease, SshError> {
        if let Some(lease) = self.lease_existing().await {
            return Ok(lease);
        }
        // None has room: open one (one at a time), unless another caller just did.
        let _gate = self.connecting.lock().await;
        if let Some(lease) = self.lease_existing().await {
            return Ok(lease);
        }
        let session = Arc::new(self.connect().await?);
        let channels = Arc::new(AtomicUsize::new(1));
        self.masters_mut().push(Arc::new(Master {
            session: Arc::clone(&session),
            channels: Arc::clone(&channels),
            checked: std::sync::Mutex::new(Some(std::time::Instant::now())),
        }));
        Ok(Lease { session, channels })
    }

    /// A slot on an existing master that answers, or `None` when no master has room.
    async fn lease_existing(&self) -> Option<Lease> {
        let limit = self.config.max_channels_per_master.max(1);
        loop {
            // Reserve a slot on the least used master with room, under the lock, no I/O.
            let candidate = {
                let masters = self.masters_mut();
                let found = masters
                    .iter()
                    .filter(|m| m.channels.load(Ordering::SeqCst) < limit)
                    .min_by_key(|m| m.channels.load(Ordering::SeqCst))
                    .cloned();
                if let Some(m) = &found {
                    m.channels.fetch_add(1, Ordering::SeqCst);
                }
                found
            }?;
            let lease = Lease {
                session: Arc::clone(&candidate.session),
                channels: Arc::clone(&candidate.channels),
            };
            if self.answers(&candidate).await {
                return Some(lease);
            }
            drop(lease);
            warn!(target = %self.target(), "SSH master connection lost or frozen; it will be replaced");
            self.masters_mut().retain(|m| !Arc::ptr_eq(m, &candidate));
            // Dropping a master sends it an exit request through its control socket, and that
            // blocks while the master is frozen: drop it off the async workers.
            tokio::task::spawn_blocking(move || drop(candidate));
        }
    }

    /// Whether `master` answers a check within [`CHECK_TIMEOUT`] (or passed one recently).
    async fn answers(&self, master: &Master) -> bool {
        let fresh = master
            .checked
            .lock()
            .ok()
            .and_then(|c| *c)
            .is_some_and(|at| at.elapsed() < CHECK_FRESH);
        if fresh {
            return true;
        }
        let ok = matches!(
            tokio::time::timeout(CHECK_TIMEOUT, master.session.check()).await,
            Ok(Ok(()))
        );
        if ok {
            if let Ok(mut checked) = master.checked.lock() {
                *checked = Some(std::time::Instant::now());
            }
        }
        ok
    }

    /// Runs `script` with `bash -lc` (login PATH), bounded by the configured timeout.
    ///
    /// # Errors
    /// [`SshError`]; a non-zero exit is not an error (see [`CommandOutput::status`]).
    pub async fn run(&self, script: &Script) -> Result<CommandOutput, SshError> {
        self.run_with_timeout(script, self.config.timeout).await
    }

    /// Like [`SshPool::run`] with another bound (e.g. `devcontainer up`).
    ///
    /// # Errors
    /// [`SshError`].
    pub async fn run_with_timeout(
        &self,
        script: &Script,
        timeout: Duration,
    ) -> Result<CommandOutput, SshError> {
        match self.run_once(script, timeout).await {
            Err(SshError::Channel(reason)) => {
                warn!(%reason, "remote command failed on the transport; trying once more");
                // A master may have died since its last check: check them all again.
                for master in self.masters_mut().iter() {
                    if let Ok(mut checked) = master.checked.lock() {
                        *checked = None;
                    }
                }
                self.run_once(script, timeout).await
            }
            other => other,
        }
    }

    async fn run_once(
        &self,
        script: &Script,
        timeout: Duration,
    ) -> Result<CommandOutput, SshError> {
        if self.is_local() {
            return run_local(script, timeout).await;
        }
        let lease = self.lease().await?;
        let secs = timeout.as_secs().max(1).to_string();
        let mut command = lease.session.command("timeout");
        command
            .args([
                "--kill-after=5",
                secs.as_str(),
                "bash",
                "-lc",
                LOGIN_THEN_SCRIPT,
                "sm-script",
            ])
            .arg(script.render())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let local_bound = timeout + Duration::from_secs(10);
        let output = tokio::time::timeout(local_bound, command.output())
            .await
            .map_err(|_| SshError::Timeout(timeout))?
            .map_err(|e| SshError::Channel(error_chain(&e)))?;
        let result = CommandOutput {
            status: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        drop(lease);
        if result.timed_out() {
            return Err(SshError::Timeout(timeout));
        }
        Ok(result)
    }

    /// Starts a long-lived process (`bash -lc script`) with piped stdin, stdout and stderr.
    /// It holds a channel until it ends.
    ///
    /// # Errors
    /// [`SshError`].
    pub async fn spawn(&self, script: &Script) -> Result<RemoteProcess, SshError> {
        if self.is_local() {
            let child = tokio::process::Command::new("bash")
                .args(["-lc", LOGIN_THEN_SCRIPT, "sm-script"])
                .arg(script.render())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| SshError::Channel(error_chain(&e)))?;
            return Ok(RemoteProcess {
                child: Child::Local(child),
                _lease: None,
            });
        }
        let lease = self.lease().await?;
        let mut command = Session::to_command(Arc::clone(&lease.session), "bash");
        command
            .args(["-lc", LOGIN_THEN_SCRIPT, "sm-script"])
            .arg(script.render())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command
            .spawn()
            .await
            .map_err(|e| SshError::Channel(error_chain(&e)))?;
        Ok(RemoteProcess {
            child: Child::Ssh(child),
            _lease: Some(lease),
        })
    }
}

/// [`SshPool::run`] on this machine ([`LOCAL_HOST`]).
async fn run_local(script: &Script, timeout: Duration) -> Result<CommandOutput, SshError> {
    let secs = timeout.as_secs().max(1).to_string();
    let command = tokio::process::Command::new("timeout")
        .args([
            "--kill-after=5",
            secs.as_str(),
            "bash",
            "-lc",
            LOGIN_THEN_SCRIPT,
            "sm-script",
        ])
        .arg(script.render())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(timeout + Duration::from_secs(10), command)
        .await
        .map_err(|_| SshError::Timeout(timeout))?
        .map_err(|e| SshError::Channel(error_chain(&e)))?;
    let result = CommandOutput {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    if result.timed_out() {
        return Err(SshError::Timeout(timeout));
    }
    Ok(result)
}

/// A process's input, whichever way it runs.
pub type ProcessInput = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
/// A process's output or error stream, whichever way it runs.
pub type ProcessOutput = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

enum Child {
    Ssh(openssh::Child<Arc<Session>>),
    Local(tokio::process::Child),
}

/// A process running on the VM (or on this machine, [`LOCAL_HOST`]). Its channel is released
/// when it is dropped.
pub struct RemoteProcess {
    child: Child,
    _lease: Option<Lease>,
}

impl RemoteProcess {
    /// Its stdin, the first time.
    pub fn take_stdin(&mut self) -> Option<ProcessInput> {
        match &mut self.child {
            Child::Ssh(c) => c.stdin().take().map(|s| Box::new(s) as ProcessInput),
            Child::Local(c) => c.stdin.take().map(|s| Box::new(s) as ProcessInput),
        }
    }

    /// Its stdout, the first time.
    pub fn take_stdout(&mut self) -> Option<ProcessOutput> {
        match &mut self.child {
            Child::Ssh(c) => c.stdout().take().map(|s| Box::new(s) as ProcessOutput),
            Child::Local(c) => c.stdout.take().map(|s| Box::new(s) as ProcessOutput),
        }
    }

    /// Its stderr, the first time.
    pub fn take_stderr(&mut self) -> Option<ProcessOutput> {
        match &mut self.child {
            Child::Ssh(c) => c.stderr().take().map(|s| Box::new(s) as ProcessOutput),
            Child::Local(c) => c.stderr.take().map(|s| Box::new(s) as ProcessOutput),
        }
    }

    /// Waits for it to end; its exit code when it had one.
    ///
    /// # Errors
    /// [`SshError::Channel`] when the wait itself fails.
    pub async fn wait(self) -> Result<Option<i32>, SshError> {
        match self.child {
            Child::Ssh(c) => c
                .wait()
                .await
                .map(|s| s.code())
                .map_err(|e| SshError::Channel(error_chain(&e))),
            Child::Local(mut c) => c
                .wait()
                .await
                .map(|s| s.code())
                .map_err(|e| SshError::Channel(error_chain(&e))),
        }
    }
}

impl std::fmt::Debug for RemoteProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemoteProcess")
    }
}

fn write_private(path: &Path, content: &[u8], trailing_newline: bool) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content)?;
    if trailing_newline && !content.ends_with(b"\n") {
        file.write_all(b"\n")?;
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
