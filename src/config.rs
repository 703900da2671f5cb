//! Configuration: every option is a command-line flag and an `SM_*` environment variable.
//!
//! Configuration is read in two steps, so that every problem can be reported at once:
//!
//! 1. [`SettingsArgs`] is what clap parses (derive API, `env = "SM_…"` on every field). Each
//!    value is kept as the raw string the operator wrote, so a malformed number or URL is not a
//!    clap error that stops at the first problem and names a flag instead of the variable.
//! 2. [`Settings::from_args`] validates all of them and returns either the typed [`Settings`]
//!    the rest of the program uses, or every [`ConfigProblem`] found, each naming its variable
//!    and what is expected.
//!
//! Secrets (tokens, keys, the HMAC secret, passwords inside URLs) are held in
//! [`secrecy::SecretString`] or [`DatabaseUrl`], whose `Debug` output is redacted, and are marked
//! `hide_env_values` for clap so `--help` never shows them. [`ConfigReport`] renders the effective
//! configuration for the `config` subcommand with the same redaction.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ipnet::IpNet;
use secrecy::SecretString;
use url::Url;

/// The default database when `SM_DATABASE_URL` is unset: an embedded SQLite file in the
/// working directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://session-manager.db";

/// The command line: one subcommand plus the global settings.
#[derive(Debug, Parser)]
#[command(
    name = "session-manager",
    version,
    about = "Drive Claude Code sessions in devcontainers from chat threads, with human-approved network egress.",
    long_about = None
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: CliCommand,
    /// Every setting, as flags and `SM_*` variables.
    #[command(flatten)]
    pub settings: SettingsArgs,
}

/// The subcommands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub enum CliCommand {
    /// Run the bot: storage, the HTTP server (/health, /metrics, /callback) and the chat side.
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets redacted) and every validation problem.
    /// Exits with status 1 when there is a problem.
    Config {
        /// Print the configuration reference as a Markdown table instead (used for README.md).
        #[arg(long)]
        markdown: bool,
    },
}

/// Raw settings as parsed by clap. Values stay strings until [`Settings::from_args`] validates
/// them; see the module documentation for why.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Settings (each flag is also an SM_* environment variable)")]
pub struct SettingsArgs {
    /// Mattermost server base URL, e.g. `https://chat.example.com` (required).
    #[arg(long, env = "SM_MATTERMOST_URL", global = true, value_name = "URL")]
    pub mattermost_url: Option<String>,
    /// Mattermost bot account access token (required, secret).
    #[arg(
        long,
        env = "SM_MATTERMOST_TOKEN",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub mattermost_token: Option<String>,
    /// Id of the Mattermost team the bot serves (required; 26 characters).
    #[arg(long, env = "SM_MATTERMOST_TEAM_ID", global = true, value_name = "ID")]
    pub mattermost_team_id: Option<String>,

    /// Host name or IP address of the VM that runs the devcontainers (required).
    #[arg(long, env = "SM_VM_HOST", global = true, value_name = "HOST")]
    pub vm_host: Option<String>,
    /// SSH port of the VM.
    #[arg(
        long,
        env = "SM_VM_PORT",
        global = true,
        default_value = "22",
        value_name = "PORT"
    )]
    pub vm_port: Option<String>,
    /// User the bot logs in as on the VM.
    #[arg(
        long,
        env = "SM_VM_USER",
        global = true,
        default_value = "claude",
        value_name = "USER"
    )]
    pub vm_user: Option<String>,
    /// SSH private key content (secret). Preferred over SM_VM_SSH_KEY_PATH when both are set.
    #[arg(
        long,
        env = "SM_VM_SSH_KEY",
        global = true,
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub vm_ssh_key: Option<String>,
    /// Path of the SSH private key file, used when SM_VM_SSH_KEY is unset.
    #[arg(
        long,
        env = "SM_VM_SSH_KEY_PATH",
        global = true,
        default_value = "/secrets/ssh/id_ed25519",
        value_name = "PATH"
    )]
    pub vm_ssh_key_path: Option<String>,
    /// The VM's SSH host key: known_hosts content, or the path of a known_hosts file.
    /// Required unless SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY=true.
    #[arg(
        long,
        env = "SM_VM_KNOWN_HOSTS",
        global = true,
        value_name = "KNOWN_HOSTS"
    )]
    pub vm_known_hosts: Option<String>,
    /// Accept whatever host key the VM presents (insecure: a man in the middle goes unnoticed).
    #[arg(
        long,
        env = "SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY",
        global = true,
        default_value = "false",
        value_name = "BOOL"
    )]
    pub vm_insecure_accept_new_host_key: Option<String>,
    /// Upper bound in seconds for each SSH operation (connect, command).
    #[arg(
        long,
        env = "SM_SSH_TIMEOUT_SECS",
        global = true,
        default_value = "30",
        value_name = "SECS"
    )]
    pub ssh_timeout_secs: Option<String>,

    /// Container runtime on the VM, passed to `devcontainer --docker-path`.
    #[arg(
        long,
        env = "SM_CONTAINER_RUNTIME",
        global = true,
        default_value = "podman",
        value_name = "PROGRAM"
    )]
    pub container_runtime: Option<String>,
    /// Container network of the generated fallback devcontainer (the firewalled network).
    #[arg(
        long,
        env = "SM_CONTAINER_NETWORK",
        global = true,
        default_value = "isolated",
        value_name = "NAME"
    )]
    pub container_network: Option<String>,
    /// Image of the generated fallback devcontainer.
    #[arg(
        long,
        env = "SM_CONTAINER_IMAGE",
        global = true,
        default_value = "claude-code:latest",
        value_name = "IMAGE"
    )]
    pub container_image: Option<String>,
    /// Command that starts Claude Code inside the container (split like a shell would).
    #[arg(
        long,
        env = "SM_CLAUDE_COMMAND",
        global = true,
        default_value = "claude --dangerously-skip-permissions",
        value_name = "COMMAND"
    )]
    pub claude_command: Option<String>,
    /// Environment for the agent, comma-separated: a bare NAME is passed from the VM's
    /// environment (secrets stay on the VM); NAME=value is set by the bot (non-secret settings).
    #[arg(
        long,
        env = "SM_CONTAINER_ENV",
        global = true,
        default_value = "ANTHROPIC_API_KEY,CLAUDE_CODE_OAUTH_TOKEN",
        value_name = "LIST"
    )]
    pub container_env: Option<String>,
    /// Upper bound in seconds for `devcontainer up`.
    #[arg(
        long,
        env = "SM_DEVCONTAINER_TIMEOUT_SECS",
        global = true,
        default_value = "120",
        value_name = "SECS"
    )]
    pub devcontainer_timeout_secs: Option<String>,
    /// Compact an orchestrator session every N of its messages (0 = never).
    #[arg(
        long,
        env = "SM_ORCHESTRATOR_COMPACT_THRESHOLD",
        global = true,
        default_value = "50",
        value_name = "N"
    )]
    pub orchestrator_compact_threshold: Option<String>,

    /// Most sessions one orchestrator may run at once.
    #[arg(
        long,
        env = "SM_MAX_CHILD_SESSIONS",
        global = true,
        default_value = "8",
        value_name = "N"
    )]
    pub max_child_sessions: Option<String>,
    /// Where repositories are cloned from: `<base>/<org>/<repo>.git`.
    #[arg(
        long,
        env = "SM_GIT_BASE_URL",
        global = true,
        default_value = "https://github.com",
        value_name = "URL"
    )]
    pub git_base_url: Option<String>,
    /// Where repositories are cloned on the VM (absolute path).
    #[arg(
        long,
        env = "SM_REPOS_BASE_PATH",
        global = true,
        default_value = "/home/claude/repos",
        value_name = "PATH"
    )]
    pub repos_base_path: Option<String>,
    /// Where git worktrees are created on the VM (absolute path).
    #[arg(
        long,
        env = "SM_WORKTREES_PATH",
        global = true,
        default_value = "/home/claude/worktrees",
        value_name = "PATH"
    )]
    pub worktrees_path: Option<String>,
    /// Fast-forward an existing clone before a session starts (true/false).
    #[arg(
        long,
        env = "SM_AUTO_PULL",
        global = true,
        default_value = "false",
        value_name = "BOOL"
    )]
    pub auto_pull: Option<String>,
    /// Organisation used when `start repo` names no organisation.
    #[arg(long, env = "SM_DEFAULT_ORG", global = true, value_name = "ORG")]
    pub default_org: Option<String>,
    /// Legacy project map (JSON object). Accepted for compatibility and ignored, with a warning.
    #[arg(
        long,
        env = "SM_PROJECTS",
        global = true,
        default_value = "{}",
        value_name = "JSON"
    )]
    pub projects: Option<String>,

    /// Sidebar category that project channels are put into for their members.
    #[arg(
        long,
        env = "SM_CHANNEL_CATEGORY",
        global = true,
        default_value = "Claude Sessions",
        value_name = "NAME"
    )]
    pub channel_category: Option<String>,
    /// Mention that addresses the bot in chat.
    #[arg(
        long,
        env = "SM_BOT_TRIGGER",
        global = true,
        default_value = "@claude",
        value_name = "MENTION"
    )]
    pub bot_trigger: Option<String>,
    /// Users allowed to start, stop and drive sessions: comma-separated user ids or usernames
    /// (a JSON array is accepted too). Empty means any member of a channel the bot serves.
    #[arg(
        long,
        env = "SM_ALLOWED_USERS",
        global = true,
        default_value = "",
        value_name = "LIST"
    )]
    pub allowed_users: Option<String>,
    /// Users allowed to approve network requests: comma-separated user ids or usernames
    /// (a JSON array is accepted too). Empty means any member of the channel.
    #[arg(
        long,
        env = "SM_ALLOWED_APPROVERS",
        global = true,
        default_value = "",
        value_name = "LIST"
    )]
    pub allowed_approvers: Option<String>,

    /// OPNsense base URL, e.g. `https://fw.example.com` (required).
    #[arg(long, env = "SM_OPNSENSE_URL", global = true, value_name = "URL")]
    pub opnsense_url: Option<String>,
    /// OPNsense API key (required, secret).
    #[arg(
        long,
        env = "SM_OPNSENSE_KEY",
        global = true,
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub opnsense_key: Option<String>,
    /// OPNsense API secret (required, secret).
    #[arg(
        long,
        env = "SM_OPNSENSE_SECRET",
        global = true,
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub opnsense_secret: Option<String>,
    /// Name of the OPNsense host alias that holds the approved domains.
    #[arg(
        long,
        env = "SM_OPNSENSE_ALIAS",
        global = true,
        default_value = "llm_approved_domains",
        value_name = "NAME"
    )]
    pub opnsense_alias: Option<String>,
    /// Verify the OPNsense TLS certificate (true/false).
    #[arg(
        long,
        env = "SM_OPNSENSE_VERIFY_TLS",
        global = true,
        default_value = "true",
        value_name = "BOOL"
    )]
    pub opnsense_verify_tls: Option<String>,
    /// Upper bound in seconds for each OPNsense API call.
    #[arg(
        long,
        env = "SM_OPNSENSE_TIMEOUT_SECS",
        global = true,
        default_value = "30",
        value_name = "SECS"
    )]
    pub opnsense_timeout_secs: Option<String>,

    /// HMAC-SHA256 key that signs approval buttons (required, secret, at least 32 characters).
    #[arg(
        long,
        env = "SM_CALLBACK_SECRET",
        global = true,
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub callback_secret: Option<String>,
    /// Seconds an approval request waits for a decision before it expires (denied to the agent).
    #[arg(
        long,
        env = "SM_APPROVAL_TTL_SECS",
        global = true,
        default_value = "3600",
        value_name = "SECS"
    )]
    pub approval_ttl_secs: Option<String>,
    /// URL chat servers POST button clicks to (this bot's /callback as they reach it).
    #[arg(
        long,
        env = "SM_CALLBACK_URL",
        global = true,
        default_value = "http://session-manager:8000/callback",
        value_name = "URL"
    )]
    pub callback_url: Option<String>,

    /// Address the HTTP server listens on.
    #[arg(
        long,
        env = "SM_LISTEN_ADDR",
        global = true,
        default_value = "0.0.0.0:8000",
        value_name = "ADDR"
    )]
    pub listen_addr: Option<String>,
    /// Requests per second each client IP may make, sustained.
    #[arg(
        long,
        env = "SM_RATE_LIMIT_RPS",
        global = true,
        default_value = "10",
        value_name = "N"
    )]
    pub rate_limit_rps: Option<String>,
    /// Requests a client IP may make in a burst above the sustained rate.
    #[arg(
        long,
        env = "SM_RATE_LIMIT_BURST",
        global = true,
        default_value = "20",
        value_name = "N"
    )]
    pub rate_limit_burst: Option<String>,
    /// Reverse proxies whose X-Forwarded-For is trusted: comma-separated IPs or CIDR networks.
    /// Empty means the socket peer is always the client.
    #[arg(
        long,
        env = "SM_TRUSTED_PROXIES",
        global = true,
        default_value = "",
        value_name = "LIST"
    )]
    pub trusted_proxies: Option<String>,

    /// Database: postgres://user:pass@host/db or sqlite://path. Unset means the embedded
    /// SQLite file sqlite://session-manager.db (secret: may hold a password).
    #[arg(
        long,
        env = "SM_DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,
    /// Maximum number of database connections.
    #[arg(
        long,
        env = "SM_DATABASE_POOL_SIZE",
        global = true,
        default_value = "5",
        value_name = "N"
    )]
    pub database_pool_size: Option<String>,

    /// Log format: text or json (one JSON object per line). Levels come from RUST_LOG.
    #[arg(
        long,
        env = "SM_LOG_FORMAT",
        global = true,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: Option<String>,
}

/// One validation problem: the variable and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The environment variable, e.g. `SM_SSH_TIMEOUT_SECS`.
    pub var: &'static str,
    /// What is wrong and what is expected. Never contains a secret value.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.message)
    }
}

/// All problems found in one validation pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

/// The validated configuration the program runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The Mattermost server.
    pub mattermost: MattermostSettings,
    /// The VM the sessions run on.
    pub vm: VmSettings,
    /// Devcontainers and the agent inside them.
    pub container: ContainerSettings,
    /// Repositories and worktrees on the VM.
    pub repos: RepoSettings,
    /// Chat behaviour.
    pub chat: ChatSettings,
    /// The OPNsense firewall API.
    pub firewall: FirewallSettings,
    /// Signed approval callbacks.
    pub callback: CallbackSettings,
    /// The HTTP server.
    pub http: HttpSettings,
    /// Storage.
    pub database: DatabaseSettings,
    /// Log output format.
    pub log_format: LogFormat,
    /// Non-fatal remarks found during validation (legacy settings and the like), to be logged.
    pub warnings: Vec<String>,
}

/// `SM_MATTERMOST_*`.
#[derive(Debug, Clone)]
pub struct MattermostSettings {
    /// Base URL, without the `/api/v4` suffix.
    pub url: Url,
    /// Bot access token (`Authorization: Bearer`).
    pub token: SecretString,
    /// Team id.
    pub team_id: String,
}

/// `SM_VM_*` and `SM_SSH_TIMEOUT_SECS`.
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// Host name or IP address.
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Key content, preferred over `ssh_key_path` when present.
    pub ssh_key: Option<SecretString>,
    /// Key file, used when `ssh_key` is `None`.
    pub ssh_key_path: PathBuf,
    /// Bound for each SSH operation.
    pub ssh_timeout: Duration,
    /// Pinned host keys (known_hosts content); `None` only when accepting any key was asked for.
    pub known_hosts: Option<String>,
}

/// Container and agent settings.
#[derive(Debug, Clone)]
pub struct ContainerSettings {
    /// `docker` or `podman` (or a path to either) on the VM.
    pub runtime: String,
    /// Network of the generated fallback devcontainer.
    pub network: String,
    /// Image of the generated fallback devcontainer.
    pub image: String,
    /// `SM_CLAUDE_COMMAND` split into program and arguments (never empty).
    pub claude_command: Vec<String>,
    /// `SM_CONTAINER_ENV`.
    pub env: Vec<EnvEntry>,
    /// Bound for `devcontainer up`.
    pub devcontainer_timeout: Duration,
    /// Orchestrator auto-compaction interval in messages; 0 disables it.
    pub orchestrator_compact_threshold: u32,
    /// `SM_MAX_CHILD_SESSIONS`.
    pub max_child_sessions: usize,
}

/// Where repositories live on the VM.
#[derive(Debug, Clone)]
pub struct RepoSettings {
    /// `SM_GIT_BASE_URL`.
    pub git_base_url: Url,
    /// Clone root (absolute).
    pub repos_base_path: PathBuf,
    /// Worktree root (absolute).
    pub worktrees_path: PathBuf,
    /// Fast-forward existing clones before a session.
    pub auto_pull: bool,
    /// Organisation for `start repo`.
    pub default_org: Option<String>,
}

/// An environment variable for the agent (`SM_CONTAINER_ENV`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvEntry {
    /// `NAME`: passed from the VM's environment (secrets stay on the VM).
    FromVm(String),
    /// `NAME=value`: set by the bot (non-secret settings such as `ANTHROPIC_BASE_URL`).
    Set(String, String),
}

impl EnvEntry {
    /// Parses `NAME` or `NAME=value`; names are `[A-Za-z_][A-Za-z0-9_]*`.
    ///
    /// # Errors
    /// A message naming the bad entry.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let (name, value) = match entry.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (entry, None),
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "{entry:?} is not NAME or NAME=value with a valid variable name"
            ));
        }
        Ok(match value {
            Some(v) => Self::Set(name.to_owned(), v.to_owned()),
            None => Self::FromVm(name.to_owned()),
        })
    }

    /// The `-e` argument for `podman exec`/`docker exec`: `NAME` (value from the VM's
    /// environment) or `NAME=value`.
    pub fn exec_arg(&self) -> String {
        match self {
            Self::FromVm(name) => name.clone(),
            Self::Set(name, value) => format!("{name}={value}"),
        }
    }
}

/// Chat behaviour.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// Sidebar category for project channels.
    pub channel_category: String,
    /// Mention that addresses the bot.
    pub bot_trigger: String,
    /// Approvers as written (user ids or usernames); resolved to ids at start. Empty = any
    /// channel member.
    pub allowed_approvers: Vec<String>,
    /// Users who may start, stop and drive sessions, as written; resolved to ids at start.
    /// Empty = any member of a channel the bot serves.
    pub allowed_users: Vec<String>,
}

/// `SM_OPNSENSE_*`.
#[derive(Debug, Clone)]
pub struct FirewallSettings {
    /// Base URL, without `/api`.
    pub url: Url,
    /// API key (HTTP Basic user).
    pub key: SecretString,
    /// API secret (HTTP Basic password).
    pub secret: SecretString,
    /// Host alias holding the approved domains.
    pub alias: String,
    /// Verify the TLS certificate.
    pub verify_tls: bool,
    /// Bound for each API call.
    pub timeout: Duration,
}

/// `SM_CALLBACK_*`.
#[derive(Debug, Clone)]
pub struct CallbackSettings {
    /// HMAC-SHA256 key for approval buttons.
    pub secret: SecretString,
    /// URL the chat server posts clicks to.
    pub url: Url,
    /// How long an approval request waits for a decision.
    pub approval_ttl: Duration,
}

/// The HTTP server.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Listen address.
    pub listen_addr: SocketAddr,
    /// Sustained requests per second per client IP (at least 1).
    pub rate_limit_rps: u32,
    /// Burst size per client IP (at least 1).
    pub rate_limit_burst: u32,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// Storage settings.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// Which database, with credentials.
    pub url: DatabaseUrl,
    /// Whether `url` came from the default (no `SM_DATABASE_URL`).
    pub is_default: bool,
    /// Maximum connections in the pool.
    pub pool_size: u32,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Which storage backend a [`DatabaseUrl`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseBackend {
    /// `postgres://` or `postgresql://`.
    Postgres,
    /// `sqlite:` (file path or `:memory:`).
    Sqlite,
}

/// A database URL. Its `Debug` and `Display` mask the password, so it can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    raw: String,
    backend: DatabaseBackend,
}

impl DatabaseUrl {
    /// Parses and classifies a URL.
    ///
    /// # Errors
    /// A message naming what is expected when the scheme is neither PostgreSQL nor SQLite or
    /// a PostgreSQL URL does not parse.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let lower = raw.to_ascii_lowercase();
        let backend = if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Url::parse(raw).map_err(|e| format!("not a valid PostgreSQL URL ({e})"))?;
            DatabaseBackend::Postgres
        } else if lower.starts_with("sqlite:") {
            if raw.len() <= "sqlite:".len() {
                return Err("a sqlite: URL needs a path, e.g. sqlite://session-manager.db".into());
            }
            DatabaseBackend::Sqlite
        } else {
            return Err(
                "expected postgres://user:password@host:5432/db or sqlite://path/to/file.db".into(),
            );
        };
        Ok(Self {
            raw: raw.to_owned(),
            backend,
        })
    }

    /// The backend this URL selects.
    pub fn backend(&self) -> DatabaseBackend {
        self.backend
    }

    /// The URL with its password, for the database driver only. Never log this.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// For SQLite: the file path (without query), or `None` for an in-memory database.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        if self.backend != DatabaseBackend::Sqlite {
            return None;
        }
        let rest = self.raw.get("sqlite:".len()..).unwrap_or_default();
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let path = rest.split('?').next().unwrap_or_default();
        if path.is_empty() || path == ":memory:" {
            None
        } else {
            Some(PathBuf::from(path))
        }
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url_password(&self.raw))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// Replaces the password of a URL with `***`; other strings are returned unchanged.
pub fn redact_url_password(value: &str) -> String {
    match Url::parse(value) {
        Ok(mut url) if url.password().is_some() => {
            // Only fails for URLs that cannot have a password, which this one has.
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => value.to_owned(),
    }
}

impl Settings {
    /// Parses the process's arguments and environment (after reading `.env` if present)
    /// and validates them. Intended for tests and embedding; `main` uses [`Cli`] directly.
    ///
    /// # Errors
    /// [`ConfigErrors`] with every problem found.
    pub fn from_args(args: &SettingsArgs) -> Result<Settings, ConfigErrors> {
        let mut p = Problems::default();
        let settings = validate(args, &mut p);
        match settings {
            Some(s) if p.problems.is_empty() => Ok(Settings {
                warnings: p.warnings,
                ..s
            }),
            _ => Err(ConfigErrors(p.problems)),
        }
    }
}

#[derive(Default)]
struct Problems {
    problems: Vec<ConfigProblem>,
    warnings: Vec<String>,
}

impl Problems {
    fn push(&mut self, var: &'static str, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            var,
            message: message.into(),
        });
    }

    /// A required value: present and not blank.
    fn required<'a>(
        &mut self,
        var: &'static str,
        value: &'a Option<String>,
        what: &str,
    ) -> Option<&'a str> {
        match value.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.push(var, format!("is required: {what}"));
                None
            }
        }
    }

    /// An optional value: `None` when absent or blank.
    fn optional(value: &Option<String>) -> Option<&str> {
        value.as_deref().map(str::trim).filter(|v| !v.is_empty())
    }

    /// Applies a parser to a present value and records its error under `var`.
    fn check<T>(
        &mut self,
        var: &'static str,
        value: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = value?;
        match parse(value) {
            Ok(v) => Some(v),
            Err(message) => {
                self.push(var, message);
                None
            }
        }
    }

    /// A value with a clap default: blank counts as missing.
    fn with_default<T>(
        &mut self,
        var: &'static str,
        value: &Option<String>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match Self::optional(value) {
            Some(v) => self.check(var, Some(v), parse),
            None => {
                self.push(var, "must not be empty");
                None
            }
        }
    }
}

fn validate(a: &SettingsArgs, p: &mut Problems) -> Option<Settings> {
    let mattermost = {
        let url = p.required(
            "SM_MATTERMOST_URL",
            &a.mattermost_url,
            "the Mattermost base URL, e.g. https://chat.example.com",
        );
        let url = p.check("SM_MATTERMOST_URL", url, http_url);
        let token = p.required(
            "SM_MATTERMOST_TOKEN",
            &a.mattermost_token,
            "the bot account's access token",
        );
        let token = p.check("SM_MATTERMOST_TOKEN", token, secret_token);
        let team = p.required(
            "SM_MATTERMOST_TEAM_ID",
            &a.mattermost_team_id,
            "the id of the team the bot serves",
        );
        let team = p.check("SM_MATTERMOST_TEAM_ID", team, mattermost_id);
        match (url, token, team) {
            (Some(url), Some(token), Some(team_id)) => Some(MattermostSettings {
                url,
                token,
                team_id,
            }),
            _ => None,
        }
    };

    let vm = {
        let host = p.required("SM_VM_HOST", &a.vm_host, "the VM's host name or IP address");
        let host = p.check("SM_VM_HOST", host, host_name);
        let port = p.with_default("SM_VM_PORT", &a.vm_port, |v| {
            number::<u16>(v, 1, u16::MAX, "a TCP port (1-65535)")
        });
        let user = p.with_default("SM_VM_USER", &a.vm_user, unix_user);
        let key = p.check("SM_VM_SSH_KEY", Problems::optional(&a.vm_ssh_key), |v| {
            if v.contains("PRIVATE KEY") {
                Ok(SecretString::from(v.to_owned()))
            } else {
                Err("expected the content of an OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY----- …), not a path; use SM_VM_SSH_KEY_PATH for a file".into())
            }
        });
        let key_path = p.with_default("SM_VM_SSH_KEY_PATH", &a.vm_ssh_key_path, |v| {
            Ok(PathBuf::from(v))
        });
        let timeout = p.with_default("SM_SSH_TIMEOUT_SECS", &a.ssh_timeout_secs, seconds);
        let insecure = p.with_default(
            "SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY",
            &a.vm_insecure_accept_new_host_key,
            boolean,
        );
        let known_hosts = match (Problems::optional(&a.vm_known_hosts), insecure) {
            (Some(value), _) => p.check("SM_VM_KNOWN_HOSTS", Some(value), known_hosts),
            (None, Some(true)) => {
                p.warnings.push("SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY=true: the VM's host key is NOT checked; anyone who can intercept the connection can impersonate the VM. Set SM_VM_KNOWN_HOSTS.".into());
                None
            }
            (None, Some(false)) => {
                p.push(
                    "SM_VM_KNOWN_HOSTS",
                    "is required: the VM's host key as a known_hosts line (ssh-keyscan -p PORT HOST) or the path of a known_hosts file; or set SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY=true to skip the check (insecure)",
                );
                None
            }
            (None, None) => None,
        };
        match (host, port, user, key_path, timeout, insecure) {
            (
                Some(host),
                Some(port),
                Some(user),
                Some(ssh_key_path),
                Some(ssh_timeout),
                Some(_),
            ) => Some(VmSettings {
                host,
                port,
                user,
                ssh_key: key,
                ssh_key_path,
                ssh_timeout,
                known_hosts,
            }),
            _ => None,
        }
    };

    let container = {
        let runtime = p.with_default("SM_CONTAINER_RUNTIME", &a.container_runtime, word);
        let network = p.with_default("SM_CONTAINER_NETWORK", &a.container_network, word);
        let image = p.with_default("SM_CONTAINER_IMAGE", &a.container_image, word);
        let command = p.with_default("SM_CLAUDE_COMMAND", &a.claude_command, |v| {
            match shlex::split(v) {
                Some(words) if !words.is_empty() => Ok(words),
                _ => Err("expected a command line such as \"claude --dangerously-skip-permissions\" (unbalanced quotes?)".into()),
            }
        });
        let env = p.check(
            "SM_CONTAINER_ENV",
            Some(a.container_env.as_deref().unwrap_or_default()),
            |v| {
                list(v)?
                    .iter()
                    .map(|entry| EnvEntry::parse(entry))
                    .collect::<Result<Vec<_>, _>>()
            },
        );
        let dc_timeout = p.with_default(
            "SM_DEVCONTAINER_TIMEOUT_SECS",
            &a.devcontainer_timeout_secs,
            seconds,
        );
        let threshold = p.with_default(
            "SM_ORCHESTRATOR_COMPACT_THRESHOLD",
            &a.orchestrator_compact_threshold,
            |v| number::<u32>(v, 0, 1_000_000, "a whole number of messages (0 = never)"),
        );
        let max_children = p.with_default("SM_MAX_CHILD_SESSIONS", &a.max_child_sessions, |v| {
            number::<usize>(v, 1, 1000, "a whole number of sessions, at least 1")
        });
        match (
            runtime,
            network,
            image,
            command,
            dc_timeout,
            threshold,
            env,
            max_children,
        ) {
            (
                Some(runtime),
                Some(network),
                Some(image),
                Some(claude_command),
                Some(devcontainer_timeout),
                Some(orchestrator_compact_threshold),
                Some(env),
                Some(max_child_sessions),
            ) => Some(ContainerSettings {
                runtime,
                network,
                image,
                claude_command,
                env,
                max_child_sessions,
                devcontainer_timeout,
                orchestrator_compact_threshold,
            }),
            _ => None,
        }
    };

    let repos = {
        let git_base = p.with_default("SM_GIT_BASE_URL", &a.git_base_url, |v| {
            let url = Url::parse(v).map_err(|e| {
                format!("expected a URL such as https://github.com, got {v:?} ({e})")
            })?;
            if !matches!(url.scheme(), "https" | "http" | "ssh" | "file") {
                return Err(format!(
                    "expected an https://, ssh:// or file:// URL, got {v:?}"
                ));
            }
            if url.password().is_some() || !url.username().is_empty() {
                return Err(
                    "must not contain credentials: private repositories use GH_TOKEN on the VM"
                        .into(),
                );
            }
            Ok(url)
        });
        let base = p.with_default("SM_REPOS_BASE_PATH", &a.repos_base_path, absolute_path);
        let worktrees = p.with_default("SM_WORKTREES_PATH", &a.worktrees_path, absolute_path);
        let auto_pull = p.with_default("SM_AUTO_PULL", &a.auto_pull, boolean);
        let default_org = p.check(
            "SM_DEFAULT_ORG",
            Problems::optional(&a.default_org),
            github_org,
        );
        if let Some(projects) = Problems::optional(&a.projects) {
            match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(projects) {
                Ok(map) if map.is_empty() => {}
                Ok(_) => p.warnings.push(
                    "SM_PROJECTS is a legacy setting and is ignored: name the repository in `start org/repo` instead".into(),
                ),
                Err(e) => p.push(
                    "SM_PROJECTS",
                    format!("expected a JSON object such as {{}} ({e}); the setting is legacy and can be removed"),
                ),
            }
        }
        match (git_base, base, worktrees, auto_pull) {
            (Some(git_base_url), Some(repos_base_path), Some(worktrees_path), Some(auto_pull)) => {
                Some(RepoSettings {
                    git_base_url,
                    repos_base_path,
                    worktrees_path,
                    auto_pull,
                    default_org,
                })
            }
            _ => None,
        }
    };

    let chat = {
        let category = p.with_default("SM_CHANNEL_CATEGORY", &a.channel_category, |v| {
            if v.chars().count() > 64 {
                Err("expected a category name of at most 64 characters".into())
            } else {
                Ok(v.to_owned())
            }
        });
        let trigger = p.with_default("SM_BOT_TRIGGER", &a.bot_trigger, word);
        let approvers = p.check(
            "SM_ALLOWED_APPROVERS",
            Some(a.allowed_approvers.as_deref().unwrap_or_default()),
            list,
        );
        let users = p.check(
            "SM_ALLOWED_USERS",
            Some(a.allowed_users.as_deref().unwrap_or_default()),
            list,
        );
        match (category, trigger, approvers, users) {
            (
                Some(channel_category),
                Some(bot_trigger),
                Some(allowed_approvers),
                Some(allowed_users),
            ) => Some(ChatSettings {
                channel_category,
                bot_trigger,
                allowed_approvers,
                allowed_users,
            }),
            _ => None,
        }
    };

    let firewall = {
        let url = p.required(
            "SM_OPNSENSE_URL",
            &a.opnsense_url,
            "the OPNsense base URL, e.g. https://fw.example.com",
        );
        let url = p.check("SM_OPNSENSE_URL", url, http_url);
        let key = p.required("SM_OPNSENSE_KEY", &a.opnsense_key, "the OPNsense API key");
        let key = p.check("SM_OPNSENSE_KEY", key, secret_token);
        let secret = p.required(
            "SM_OPNSENSE_SECRET",
            &a.opnsense_secret,
            "the OPNsense API secret",
        );
        let secret = p.check("SM_OPNSENSE_SECRET", secret, secret_token);
        let alias = p.with_default("SM_OPNSENSE_ALIAS", &a.opnsense_alias, opnsense_alias);
        let verify = p.with_default("SM_OPNSENSE_VERIFY_TLS", &a.opnsense_verify_tls, boolean);
        let timeout = p.with_default(
            "SM_OPNSENSE_TIMEOUT_SECS",
            &a.opnsense_timeout_secs,
            seconds,
        );
        match (url, key, secret, alias, verify, timeout) {
            (Some(url), Some(key), Some(secret), Some(alias), Some(verify_tls), Some(timeout)) => {
                Some(FirewallSettings {
                    url,
                    key,
                    secret,
                    alias,
                    verify_tls,
                    timeout,
                })
            }
            _ => None,
        }
    };

    let callback = {
        let secret = p.required(
            "SM_CALLBACK_SECRET",
            &a.callback_secret,
            "a random key of at least 32 characters (e.g. `openssl rand -hex 32`)",
        );
        let secret = p.check("SM_CALLBACK_SECRET", secret, |v| {
            if v.chars().count() < 32 {
                Err(
                    "is too short: use at least 32 random characters (e.g. `openssl rand -hex 32`)"
                        .into(),
                )
            } else {
                Ok(SecretString::from(v.to_owned()))
            }
        });
        let url = p.with_default("SM_CALLBACK_URL", &a.callback_url, http_url);
        let ttl = p.with_default("SM_APPROVAL_TTL_SECS", &a.approval_ttl_secs, seconds);
        match (secret, url, ttl) {
            (Some(secret), Some(url), Some(approval_ttl)) => Some(CallbackSettings {
                secret,
                url,
                approval_ttl,
            }),
            _ => None,
        }
    };

    let http = {
        let listen = p.with_default("SM_LISTEN_ADDR", &a.listen_addr, |v| {
            v.parse::<SocketAddr>()
                .map_err(|_| format!("expected an address such as 0.0.0.0:8000, got {v:?}"))
        });
        let rps = p.with_default("SM_RATE_LIMIT_RPS", &a.rate_limit_rps, |v| {
            number::<u32>(
                v,
                1,
                1_000_000,
                "a whole number of requests per second, at least 1",
            )
        });
        let burst = p.with_default("SM_RATE_LIMIT_BURST", &a.rate_limit_burst, |v| {
            number::<u32>(v, 1, 1_000_000, "a whole number of requests, at least 1")
        });
        let proxies = p.check(
            "SM_TRUSTED_PROXIES",
            Some(a.trusted_proxies.as_deref().unwrap_or_default()),
            |v| {
                list(v)?
                    .iter()
                    .map(|item| parse_net(item))
                    .collect::<Result<Vec<_>, _>>()
            },
        );
        match (listen, rps, burst, proxies) {
            (
                Some(listen_addr),
                Some(rate_limit_rps),
                Some(rate_limit_burst),
                Some(trusted_proxies),
            ) => Some(HttpSettings {
                listen_addr,
                rate_limit_rps,
                rate_limit_burst,
                trusted_proxies,
            }),
            _ => None,
        }
    };

    let database = {
        let given = Problems::optional(&a.database_url);
        let url = p.check(
            "SM_DATABASE_URL",
            Some(given.unwrap_or(DEFAULT_DATABASE_URL)),
            DatabaseUrl::parse,
        );
        let pool = p.with_default("SM_DATABASE_POOL_SIZE", &a.database_pool_size, |v| {
            number::<u32>(v, 1, 1000, "a whole number of connections, at least 1")
        });
        match (url, pool) {
            (Some(url), Some(pool_size)) => Some(DatabaseSettings {
                url,
                is_default: given.is_none(),
                pool_size,
            }),
            _ => None,
        }
    };

    let log_format = p.with_default("SM_LOG_FORMAT", &a.log_format, |v| {
        match v.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("expected text or json, got {v:?}")),
        }
    });

    Some(Settings {
        mattermost: mattermost?,
        vm: vm?,
        container: container?,
        repos: repos?,
        chat: chat?,
        firewall: firewall?,
        callback: callback?,
        http: http?,
        database: database?,
        log_format: log_format?,
        warnings: Vec::new(),
    })
}

/// known_hosts content, or the path of a known_hosts file (read now).
fn known_hosts(v: &str) -> Result<String, String> {
    let content = if v.starts_with('/') && !v.contains('\n') {
        std::fs::read_to_string(v)
            .map_err(|e| format!("cannot read the known_hosts file {v:?}: {e}"))?
    } else {
        v.to_owned()
    };
    let has_key = content.lines().any(|l| {
        let l = l.trim();
        !l.starts_with('#')
            && l.split_whitespace().nth(1).is_some_and(|t| {
                t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.starts_with("sk-")
            })
    });
    if has_key {
        Ok(content)
    } else {
        Err("expected known_hosts lines (`host key-type base64-key`, e.g. from ssh-keyscan) or the path of such a file".into())
    }
}

fn http_url(v: &str) -> Result<Url, String> {
    let url = Url::parse(v).map_err(|e| {
        format!(
            "expected an http(s) URL, got {:?} ({e})",
            redact_url_password(v)
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "expected an http:// or https:// URL with a host, got {:?}",
            redact_url_password(v)
        ));
    }
    Ok(url)
}

fn secret_token(v: &str) -> Result<SecretString, String> {
    if v.chars().any(char::is_whitespace) {
        return Err("must not contain whitespace (a stray newline or space?)".into());
    }
    Ok(SecretString::from(v.to_owned()))
}

fn mattermost_id(v: &str) -> Result<String, String> {
    if v.len() == 26
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "expected a Mattermost id (26 lowercase letters and digits), got {v:?}"
        ))
    }
}

fn host_name(v: &str) -> Result<String, String> {
    let ok = v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "expected a host name or IP address (no scheme, path or spaces), got {v:?}"
        ))
    }
}

fn unix_user(v: &str) -> Result<String, String> {
    let mut bytes = v.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    if first_ok
        && v.len() <= 32
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
    {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "expected a Unix user name (lowercase letters, digits, _ and -, starting with a letter), got {v:?}"
        ))
    }
}

fn word(v: &str) -> Result<String, String> {
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!("expected a single word without spaces, got {v:?}"))
    } else {
        Ok(v.to_owned())
    }
}

fn github_org(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 39
        && !v.starts_with('-')
        && !v.ends_with('-')
        && !v.contains("--")
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "expected a GitHub organisation name (letters, digits and single hyphens, at most 39), got {v:?}"
        ))
    }
}

fn opnsense_alias(v: &str) -> Result<String, String> {
    let bytes = v.as_bytes();
    let starts_ok = match bytes {
        [first, ..] if first.is_ascii_alphabetic() => true,
        [b'_', second, ..] => second.is_ascii_alphanumeric(),
        _ => false,
    };
    if starts_ok
        && v.len() <= 31
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_')
    {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "expected an OPNsense alias name (letters, digits and _, starting with a letter, at most 31), got {v:?}"
        ))
    }
}

fn absolute_path(v: &str) -> Result<PathBuf, String> {
    if v.starts_with('/') && !v.contains(['\n', '\r', '\0']) {
        Ok(PathBuf::from(v))
    } else {
        Err(format!("expected an absolute path on the VM, got {v:?}"))
    }
}

fn seconds(v: &str) -> Result<Duration, String> {
    number::<u64>(
        v,
        1,
        86_400,
        "a whole number of seconds between 1 and 86400",
    )
    .map(Duration::from_secs)
}

fn number<T>(v: &str, min: T, max: T, what: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + Copy,
{
    match v.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(format!("expected {what}, got {v:?}")),
    }
}

fn boolean(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got {v:?}")),
    }
}

/// A list: comma-separated (`a, b`) or a JSON array of strings (`["a","b"]`, `[]`).
fn list(v: &str) -> Result<Vec<String>, String> {
    let v = v.trim();
    if v.starts_with('[') {
        let items: Vec<String> = serde_json::from_str(v).map_err(|e| {
            format!("expected a comma-separated list or a JSON array of strings ({e})")
        })?;
        return Ok(items
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect());
    }
    Ok(v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect())
}

fn parse_net(item: &str) -> Result<IpNet, String> {
    item.parse::<IpNet>()
        .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!("expected IP addresses or CIDR networks such as 10.0.0.0/8, got {item:?}")
        })
}

/// One documented setting, read from the clap definition (so the docs cannot drift from
/// `--help`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingDoc {
    /// The environment variable.
    pub env: String,
    /// The long flag, without `--`.
    pub flag: String,
    /// The default, if any.
    pub default: Option<String>,
    /// Whether the value is a secret (redacted everywhere).
    pub secret: bool,
    /// The help text.
    pub help: String,
}

/// Every setting, in `--help` order.
pub fn setting_docs() -> Vec<SettingDoc> {
    Cli::command()
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy().into_owned();
            Some(SettingDoc {
                env,
                flag: arg.get_long().unwrap_or_default().to_owned(),
                default: arg
                    .get_default_values()
                    .first()
                    .map(|d| d.to_string_lossy().into_owned()),
                secret: arg.is_hide_env_values_set(),
                help: arg.get_help().map(ToString::to_string).unwrap_or_default(),
            })
        })
        .collect()
}

/// The configuration reference as a Markdown table (the README embeds exactly this).
pub fn markdown_reference() -> String {
    let mut out = String::from("| Variable | Flag | Default | Meaning |\n|---|---|---|---|\n");
    for doc in setting_docs() {
        let default = match &doc.default {
            Some(d) if d.is_empty() => "(empty)".to_owned(),
            Some(d) => format!("`{d}`"),
            None => "(none)".to_owned(),
        };
        out.push_str(&format!(
            "| `{}` | `--{}` | {} | {} |\n",
            doc.env,
            doc.flag,
            default,
            doc.help.replace('|', "\\|").replace('\n', " ")
        ));
    }
    out
}

/// The effective configuration as the `config` subcommand prints it.
#[derive(Debug, Clone)]
pub struct ConfigReport {
    /// `(variable, shown value, where it came from)`, secrets already redacted.
    pub entries: Vec<(String, String, &'static str)>,
    /// Validation problems.
    pub problems: Vec<ConfigProblem>,
    /// Validation warnings.
    pub warnings: Vec<String>,
}

impl ConfigReport {
    /// Builds the report from clap's matches. Secret values are shown as `<redacted>`, and a
    /// password inside any URL as `***`.
    pub fn new(matches: &ArgMatches) -> Self {
        let cli = Cli::from_arg_matches(matches);
        let (problems, warnings) = match cli {
            Ok(cli) => match Settings::from_args(&cli.settings) {
                Ok(s) => (Vec::new(), s.warnings),
                Err(e) => (e.0, Vec::new()),
            },
            Err(e) => (
                vec![ConfigProblem {
                    var: "arguments",
                    message: e.to_string(),
                }],
                Vec::new(),
            ),
        };
        let command = Cli::command();
        let entries = command
            .get_arguments()
            .filter_map(|arg| {
                let env = arg.get_env()?.to_string_lossy().into_owned();
                let id = arg.get_id().as_str();
                let value = matches
                    .try_get_one::<String>(id)
                    .ok()
                    .flatten()
                    .filter(|v| !v.is_empty());
                let shown = match value {
                    None if id == "database_url" => {
                        format!("<unset> (embedded default {DEFAULT_DATABASE_URL})")
                    }
                    None => "<unset>".to_owned(),
                    Some(_) if arg.is_hide_env_values_set() && id == "database_url" => {
                        redact_url_password(value.map(String::as_str).unwrap_or_default())
                    }
                    Some(_) if arg.is_hide_env_values_set() => "<redacted>".to_owned(),
                    Some(v) => redact_url_password(v),
                };
                let source = match matches.value_source(id) {
                    Some(ValueSource::EnvVariable) => "env",
                    Some(ValueSource::CommandLine) => "flag",
                    Some(ValueSource::DefaultValue) => "default",
                    _ => "unset",
                };
                Some((env, shown, source))
            })
            .collect();
        Self {
            entries,
            problems,
            warnings,
        }
    }
}

impl fmt::Display for ConfigReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# session-manager effective configuration (secrets redacted)"
        )?;
        let width = self
            .entries
            .iter()
            .map(|(k, _, _)| k.len())
            .max()
            .unwrap_or(0);
        for (env, value, source) in &self.entries {
            writeln!(f, "{env:<width$} = {value}    # {source}")?;
        }
        for w in &self.warnings {
            writeln!(f, "# warning: {w}")?;
        }
        if self.problems.is_empty() {
            writeln!(f, "# no problems found")?;
        } else {
            writeln!(f, "# {} problem(s):", self.problems.len())?;
            for p in &self.problems {
                writeln!(f, "#   {p}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> Result<Settings, ConfigErrors> {
        let mut argv = vec!["session-manager".to_owned(), "serve".to_owned()];
        for (flag, value) in pairs {
            argv.push(format!("--{flag}={value}"));
        }
        let cli = Cli::try_parse_from(argv).expect("clap accepts strings");
        Settings::from_args(&cli.settings)
    }

    fn complete() -> Vec<(&'static str, &'static str)> {
        vec![
            ("mattermost-url", "https://chat.example.com"),
            ("mattermost-token", "tok-abcdef"),
            ("mattermost-team-id", "abcdefghijklmnopqrstuvwxyz"),
            ("vm-host", "vm.internal"),
            ("opnsense-url", "https://fw.example.com"),
            ("opnsense-key", "key123"),
            ("opnsense-secret", "sec456"),
            ("callback-secret", "0123456789abcdef0123456789abcdef"),
            (
                "vm-known-hosts",
                "[vm.internal]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPrDGLMQkvA",
            ),
        ]
    }

    #[test]
    fn defaults_match_the_reference() {
        let s = args(&complete()).expect("valid");
        assert_eq!(s.vm.user, "claude");
        assert_eq!(s.vm.port, 22);
        assert_eq!(s.vm.ssh_key_path, PathBuf::from("/secrets/ssh/id_ed25519"));
        assert_eq!(s.vm.ssh_timeout, Duration::from_secs(30));
        assert_eq!(s.container.runtime, "podman");
        assert_eq!(s.container.network, "isolated");
        assert_eq!(s.container.image, "claude-code:latest");
        assert_eq!(
            s.container.claude_command,
            vec!["claude", "--dangerously-skip-permissions"]
        );
        assert_eq!(s.container.devcontainer_timeout, Duration::from_secs(120));
        assert_eq!(s.container.orchestrator_compact_threshold, 50);
        assert_eq!(s.repos.repos_base_path, PathBuf::from("/home/claude/repos"));
        assert_eq!(
            s.repos.worktrees_path,
            PathBuf::from("/home/claude/worktrees")
        );
        assert!(!s.repos.auto_pull);
        assert_eq!(s.repos.default_org, None);
        assert_eq!(s.chat.channel_category, "Claude Sessions");
        assert_eq!(s.chat.bot_trigger, "@claude");
        assert!(s.chat.allowed_approvers.is_empty());
        assert_eq!(s.firewall.alias, "llm_approved_domains");
        assert!(s.firewall.verify_tls);
        assert_eq!(s.firewall.timeout, Duration::from_secs(30));
        assert_eq!(
            s.callback.url.as_str(),
            "http://session-manager:8000/callback"
        );
        assert_eq!(s.http.listen_addr, "0.0.0.0:8000".parse().expect("addr"));
        assert_eq!(s.database.pool_size, 5);
        assert_eq!(s.http.rate_limit_rps, 10);
        assert_eq!(s.http.rate_limit_burst, 20);
        assert!(s.http.trusted_proxies.is_empty());
        assert_eq!(s.database.url.expose(), DEFAULT_DATABASE_URL);
        assert!(s.database.is_default);
        assert_eq!(
            s.database.url.sqlite_path(),
            Some(PathBuf::from("session-manager.db"))
        );
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.repos.git_base_url.as_str(), "https://github.com/");
        assert_eq!(
            s.container.env,
            vec![
                EnvEntry::FromVm("ANTHROPIC_API_KEY".into()),
                EnvEntry::FromVm("CLAUDE_CODE_OAUTH_TOKEN".into())
            ]
        );
        assert!(s
            .vm
            .known_hosts
            .as_deref()
            .is_some_and(|k| k.contains("ssh-ed25519")));
    }

    #[test]
    fn the_host_key_is_required_unless_insecure_is_asked_for() {
        let mut pairs = complete();
        pairs.retain(|(f, _)| *f != "vm-known-hosts");
        let err = args(&pairs).expect_err("no host key");
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].var, "SM_VM_KNOWN_HOSTS");
        assert!(err.0[0]
            .message
            .contains("SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY"));
        pairs.push(("vm-insecure-accept-new-host-key", "true"));
        let s = args(&pairs).expect("insecure accepted");
        assert_eq!(s.vm.known_hosts, None);
        assert!(
            s.warnings.iter().any(|w| w.contains("NOT checked")),
            "said loudly"
        );
        let mut pairs = complete();
        pairs.retain(|(f, _)| *f != "vm-known-hosts");
        pairs.push(("vm-known-hosts", "not a key"));
        assert_eq!(args(&pairs).expect_err("bad").0[0].var, "SM_VM_KNOWN_HOSTS");
    }

    #[test]
    fn every_problem_is_reported_at_once_and_names_its_variable() {
        let err = args(&[
            ("ssh-timeout-secs", "abc"),
            ("rate-limit-burst", "0"),
            ("database-url", "mysql://x"),
        ])
        .expect_err("invalid");
        let vars: Vec<_> = err.0.iter().map(|p| p.var).collect();
        for expected in [
            "SM_MATTERMOST_URL",
            "SM_MATTERMOST_TOKEN",
            "SM_MATTERMOST_TEAM_ID",
            "SM_VM_HOST",
            "SM_OPNSENSE_URL",
            "SM_OPNSENSE_KEY",
            "SM_OPNSENSE_SECRET",
            "SM_CALLBACK_SECRET",
            "SM_SSH_TIMEOUT_SECS",
            "SM_RATE_LIMIT_BURST",
            "SM_DATABASE_URL",
        ] {
            assert!(vars.contains(&expected), "{expected} missing from {vars:?}");
        }
    }

    #[test]
    fn malformed_values_are_rejected_with_what_is_expected() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "mattermost-url",
                "chat.example.com",
                "SM_MATTERMOST_URL",
                "http",
            ),
            ("mattermost-url", "ftp://chat", "SM_MATTERMOST_URL", "http"),
            ("mattermost-team-id", "short", "SM_MATTERMOST_TEAM_ID", "26"),
            ("vm-host", "http://vm/x", "SM_VM_HOST", "host name"),
            ("vm-port", "70000", "SM_VM_PORT", "port"),
            ("vm-user", "Root User", "SM_VM_USER", "Unix user"),
            ("vm-ssh-key", "/path/to/key", "SM_VM_SSH_KEY", "private key"),
            ("ssh-timeout-secs", "-1", "SM_SSH_TIMEOUT_SECS", "seconds"),
            (
                "claude-command",
                "claude 'unbalanced",
                "SM_CLAUDE_COMMAND",
                "command line",
            ),
            (
                "repos-base-path",
                "relative/path",
                "SM_REPOS_BASE_PATH",
                "absolute",
            ),
            ("auto-pull", "maybe", "SM_AUTO_PULL", "true or false"),
            ("default-org", "-bad", "SM_DEFAULT_ORG", "GitHub"),
            ("projects", "not json", "SM_PROJECTS", "JSON object"),
            ("opnsense-alias", "9bad", "SM_OPNSENSE_ALIAS", "alias"),
            (
                "opnsense-verify-tls",
                "nope",
                "SM_OPNSENSE_VERIFY_TLS",
                "true or false",
            ),
            ("callback-secret", "tooshort", "SM_CALLBACK_SECRET", "32"),
            ("listen-addr", "localhost", "SM_LISTEN_ADDR", "address"),
            ("rate-limit-rps", "0", "SM_RATE_LIMIT_RPS", "at least 1"),
            (
                "trusted-proxies",
                "10.0.0.0/8,proxy",
                "SM_TRUSTED_PROXIES",
                "CIDR",
            ),
            (
                "database-url",
                "mysql://db",
                "SM_DATABASE_URL",
                "postgres://",
            ),
            (
                "database-pool-size",
                "0",
                "SM_DATABASE_POOL_SIZE",
                "at least 1",
            ),
            ("log-format", "xml", "SM_LOG_FORMAT", "json"),
            (
                "git-base-url",
                "https://user:tok@github.com",
                "SM_GIT_BASE_URL",
                "credentials",
            ),
            (
                "container-env",
                "GOOD,bad-name=1",
                "SM_CONTAINER_ENV",
                "NAME",
            ),
            (
                "bot-trigger",
                "@claude bot",
                "SM_BOT_TRIGGER",
                "single word",
            ),
        ];
        for (flag, value, var, expected) in cases {
            let mut pairs = complete();
            pairs.retain(|(f, _)| f != flag);
            pairs.push((flag, value));
            let err = args(&pairs).expect_err(flag);
            assert_eq!(err.0.len(), 1, "{flag}: {err}");
            assert_eq!(err.0[0].var, *var);
            assert!(
                err.0[0].message.contains(expected),
                "{flag}: {:?} lacks {expected:?}",
                err.0[0].message
            );
        }
    }

    #[test]
    fn lists_accept_commas_and_json_arrays() {
        let mut pairs = complete();
        pairs.push(("allowed-approvers", " alice, ,bob "));
        pairs.push(("allowed-users", "carol,4xk8d1a9wjf3ub7mq2zc6nhe5r"));
        pairs.push(("trusted-proxies", "10.0.0.0/8, 192.168.1.1"));
        let s = args(&pairs).expect("valid");
        assert_eq!(s.chat.allowed_approvers, vec!["alice", "bob"]);
        assert_eq!(
            s.chat.allowed_users,
            vec!["carol", "4xk8d1a9wjf3ub7mq2zc6nhe5r"]
        );
        assert_eq!(s.http.trusted_proxies.len(), 2);
        assert!(s.http.trusted_proxies[1].contains(&"192.168.1.1".parse::<IpAddr>().expect("ip")));
        let mut pairs = complete();
        pairs.push(("allowed-approvers", r#"["carol","dave"]"#));
        let s = args(&pairs).expect("valid");
        assert_eq!(s.chat.allowed_approvers, vec!["carol", "dave"]);
        let mut pairs = complete();
        pairs.push(("allowed-approvers", "[]"));
        assert!(args(&pairs)
            .expect("valid")
            .chat
            .allowed_approvers
            .is_empty());
    }

    #[test]
    fn legacy_projects_warns_but_is_accepted() {
        let mut pairs = complete();
        pairs.push(("projects", r#"{"app":{"repo":"org/app"}}"#));
        let s = args(&pairs).expect("valid");
        assert!(s.warnings.iter().any(|w| w.contains("SM_PROJECTS")));
    }

    #[test]
    fn debug_output_contains_no_secret() {
        let mut pairs = complete();
        pairs.push((
            "database-url",
            "postgres://sm:hunter2-db@db.internal:5432/sm",
        ));
        pairs.push(("vm-ssh-key", "-----BEGIN OPENSSH PRIVATE KEY-----\nkeymaterial-xyz\n-----END OPENSSH PRIVATE KEY-----"));
        let s = args(&pairs).expect("valid");
        let debug = format!("{s:?}");
        for secret in [
            "tok-abcdef",
            "key123",
            "sec456",
            "0123456789abcdef0123456789abcdef",
            "hunter2-db",
            "keymaterial-xyz",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked in {debug}");
        }
        assert!(debug.contains("db.internal"), "host stays visible: {debug}");
        assert_eq!(s.database.url.backend(), DatabaseBackend::Postgres);
        assert!(!s.database.is_default);
    }

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            redact_url_password("postgres://u:p@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url_password("sqlite://x.db"), "sqlite://x.db");
        assert_eq!(redact_url_password("not a url"), "not a url");
    }
}
