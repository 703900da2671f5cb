//! Configuration: every option is a command-line flag and an `SM_*` environment variable.
//!
//! # One place per setting
//!
//! Each setting is one field of [`Settings`] or of one of its groups ([`VmSettings`], …): a
//! typed clap argument whose doc comment is its help text and whose attributes declare the
//! rest:
//!
//! ```text
//! /// SSH port of the VM.                                    <- help text
//! #[arg(
//!     id = "vm_port",
//!     long = "vm-port",                                      <- flag
//!     env = "SM_VM_PORT",                                     <- variable
//!     default_value = "22",                                   <- default
//!     value_name = "PORT",
//!     value_parser = whole::<u16>(1, u16::MAX, "a TCP port (1-65535)")  <- parser and rule
//! )]
//! pub port: u16,                                              <- type
//! ```
//!
//! - **Required, optional or defaulted** follows from the type, as in clap: a plain `T`
//!   without a default is required, and its parser is wrapped in
//!   `required("what to set", parser)` so a missing or blank value says what is needed. An
//!   `Option<T>` is optional, and a blank value counts as unset. A setting with a default
//!   must not be blank ("must not be empty") unless its parser accepts the empty value, as
//!   the lists do (they are then empty). `hide_default_value` marks a fallback that the help
//!   text describes instead (the embedded database): the setting then reads as unset.
//! - **Parsers** are small functions `fn(&str) -> Result<T, String>`, or combinators such as
//!   `whole`, `list_of` and `required` that return one. They get the value trimmed, and
//!   their error says what is expected; that message is the problem reported.
//! - **Secrets** are typed [`SecretString`] (or [`DatabaseUrl`]) and marked
//!   `hide_env_values = true`, so neither `--help`, `Debug` nor `config` shows them.
//! - A **list** read from one value is typed `std::vec::Vec<T>`: clap's derive would read a
//!   plain `Vec<T>` as a repeated flag, and spelling out the path opts out of that. A `bool`
//!   takes a value (`--auto-pull=true`), so it says `action = ArgAction::Set`.
//! - A **rule involving several settings**, or one that only warns, is a line in the private
//!   function `rules` (the host key unless `SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY=true`, the
//!   key file unless the key itself is given, the legacy `SM_PROJECTS`, which chat platforms
//!   are configured).
//! - A value holding an example's **placeholder** (`REPLACE_ME`, `CHANGE-ME`) is refused
//!   whatever its parser would say, so a forgotten line of `.env.example` is a configuration
//!   problem rather than a connection failure.
//! - A **group that is optional as a whole** (Mattermost, when Teams is configured) is an
//!   `Option<Group>`; its fields keep their plain types but say `required = false` (clap
//!   would otherwise require them even when the group is absent), and `rules` requires them
//!   together. The group is `Some` exactly when one of its settings is set.
//!
//! So adding a setting is adding one field (and a line in `rules` if it has such a rule);
//! `--help`, the README table (`cargo run -q -- config --markdown`), the `config` report and
//! the validation follow from it.
//!
//! # Every problem at once
//!
//! Clap's typed parse stops at the first bad value and names a flag. So the program parses
//! [`Cli::raw_command`], in which every setting is read as text and none is required (clap
//! then only rejects unknown flags and answers `--help` and `--version`), and
//! [`Settings::from_matches`] checks that text:
//!
//! 1. each setting's value goes through the setting's own `value_parser`, and every failure
//!    becomes a [`ConfigProblem`] naming the variable, with the parser's message;
//! 2. the cross-field rules run on the values that passed;
//! 3. only when nothing is wrong are the checked values handed to clap's typed parser, which
//!    builds [`Settings`] (`FromArgMatches`).
//!
//! Problems are listed in `--help` order. [`ConfigReport`] renders the effective
//! configuration for the `config` subcommand, secrets redacted.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use clap::builder::ValueParser;
use clap::parser::ValueSource;
use clap::{
    Arg, ArgAction, ArgMatches, Args, Command, CommandFactory, FromArgMatches, Parser, Subcommand,
};
use ipnet::IpNet;
use secrecy::SecretString;
use url::Url;

pub use crate::permission::PermissionMode;
pub use crate::runtime::devcontainer::RepoConfigPolicy;

/// The default database when `SM_DATABASE_URL` is unset: an embedded SQLite file in the
/// working directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://session-manager.db";

/// The command line: one subcommand plus the global settings.
///
/// This declares the command line; parse it with [`Cli::raw_command`] and
/// [`Settings::from_matches`] (see the module documentation), not with `Cli::parse`, which
/// would stop at the first bad value and accept settings only before the subcommand.
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
    pub settings: Settings,
}

impl Cli {
    /// The command line the program parses: [`Cli`] with every setting global (accepted after
    /// the subcommand), not required, and read as text, so that [`Settings::from_matches`] can
    /// check them all. A hidden default (the embedded database) is left out, so that the
    /// setting reads as unset there; it applies when the typed settings are built.
    pub fn raw_command() -> Command {
        Self::command().mut_args(|arg| {
            if arg.get_env().is_none() {
                return arg;
            }
            let arg = arg
                .global(true)
                .required(false)
                .value_parser(ValueParser::string());
            if arg.is_hide_default_value_set() {
                arg.default_value(None)
            } else {
                arg
            }
        })
    }
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

/// The validated configuration the program runs with: every setting, grouped.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Settings (each flag is also an SM_* environment variable)")]
pub struct Settings {
    /// The Mattermost server; `None` when `SM_MATTERMOST_URL` is unset (Teams only).
    #[command(flatten)]
    pub mattermost: Option<MattermostSettings>,
    /// The Microsoft Teams bot; enabled when `SM_TEAMS_APP_ID` is set.
    #[command(flatten)]
    pub teams: TeamsSettings,
    /// The VM the sessions run on.
    #[command(flatten)]
    pub vm: VmSettings,
    /// Devcontainers and the agent inside them.
    #[command(flatten)]
    pub container: ContainerSettings,
    /// Repositories and worktrees on the VM.
    #[command(flatten)]
    pub repos: RepoSettings,
    /// Chat behaviour.
    #[command(flatten)]
    pub chat: ChatSettings,
    /// The OPNsense firewall API.
    #[command(flatten)]
    pub firewall: FirewallSettings,
    /// Signed approval callbacks.
    #[command(flatten)]
    pub callback: CallbackSettings,
    /// What an approval grants, and what is refused before any card.
    #[command(flatten)]
    pub egress: EgressSettings,
    /// The HTTP server.
    #[command(flatten)]
    pub http: HttpSettings,
    /// Storage.
    #[command(flatten)]
    pub database: DatabaseSettings,
    /// Log format: text or json (one JSON object per line). Levels come from RUST_LOG.
    #[arg(
        id = "log_format",
        long = "log-format",
        env = "SM_LOG_FORMAT",
        default_value = "text",
        value_name = "FORMAT",
        value_parser = log_format
    )]
    pub log_format: LogFormat,
    /// Non-fatal remarks found during validation (legacy settings and the like), to be logged.
    #[arg(skip)]
    pub warnings: Vec<String>,
    /// The profiles of `SM_PROFILES_FILE`, read and checked; empty without the file.
    #[arg(skip)]
    pub profiles: crate::profile::Profiles,
}

impl Settings {
    /// How the web console is reached: `SM_CONSOLE_AUTH`, or when unset `link` without a chat
    /// platform (one-machine mode) and `off` with one.
    pub fn console_auth(&self) -> ConsoleAuth {
        self.http
            .console_auth
            .unwrap_or(if self.has_chat_platform() {
                ConsoleAuth::Off
            } else {
                ConsoleAuth::Link
            })
    }

    /// Where the HTTP server listens: `SM_LISTEN_ADDR`, else `0.0.0.0:8000`, or
    /// `127.0.0.1:8000` in one-machine mode.
    pub fn listen_addr(&self) -> SocketAddr {
        self.http.listen_addr.unwrap_or_else(|| {
            let ip = if self.has_chat_platform() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                IpAddr::from([127, 0, 0, 1])
            };
            SocketAddr::new(ip, 8000)
        })
    }

    /// Whether Mattermost or Teams is configured (otherwise the console is the only chat
    /// surface).
    pub fn has_chat_platform(&self) -> bool {
        self.mattermost.is_some() || self.teams.enabled()
    }
}

/// What to set for each Mattermost setting when Mattermost is configured (or no platform is).
const MATTERMOST_REQUIRED: [(&str, &str); 3] = [
    (
        "SM_MATTERMOST_URL",
        "the Mattermost base URL, e.g. https://chat.example.com (or set SM_TEAMS_APP_ID to use Microsoft Teams only)",
    ),
    ("SM_MATTERMOST_TOKEN", "the bot account's access token"),
    ("SM_MATTERMOST_TEAM_ID", "the id of the team the bot serves"),
];

/// `SM_MATTERMOST_*`: the Mattermost server. Optional as a group: present exactly when one of
/// its settings is set, and then all three are required (see `rules`).
#[derive(Debug, Clone, Args)]
pub struct MattermostSettings {
    /// Mattermost server base URL, e.g. `https://chat.example.com`. Setting it enables
    /// Mattermost. With neither it nor SM_TEAMS_APP_ID set, the bot runs in one-machine mode:
    /// the web console is the chat surface.
    #[arg(
        id = "mattermost_url",
        long = "mattermost-url",
        env = "SM_MATTERMOST_URL",
        value_name = "URL",
        required = false,
        value_parser = http_url
    )]
    pub url: Url,
    /// Mattermost bot account access token (secret; required with SM_MATTERMOST_URL).
    #[arg(
        id = "mattermost_token",
        long = "mattermost-token",
        env = "SM_MATTERMOST_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        required = false,
        value_parser = secret_token
    )]
    pub token: SecretString,
    /// Id of the Mattermost team the bot serves (26 characters; required with
    /// SM_MATTERMOST_URL).
    #[arg(
        id = "mattermost_team_id",
        long = "mattermost-team-id",
        env = "SM_MATTERMOST_TEAM_ID",
        value_name = "ID",
        required = false,
        value_parser = mattermost_id
    )]
    pub team_id: String,
}

/// The Bot Framework's OpenID metadata, where inbound tokens' signing keys are published
/// (`shared/reference/wire-formats.md` §3.2; BBJS `authenticationConstants.ts`).
pub const BOT_FRAMEWORK_OPENID_METADATA_URL: &str =
    "https://login.botframework.com/v1/.well-known/openidconfiguration";

/// `SM_TEAMS_*`: the Microsoft Teams bot (a Bot Framework / Azure Bot registration). Teams is
/// enabled exactly when `SM_TEAMS_APP_ID` is set; the password is then required.
#[derive(Debug, Clone, Args)]
pub struct TeamsSettings {
    /// Microsoft App ID (a GUID) of the bot's Azure Bot registration. Setting it enables
    /// Microsoft Teams; inbound tokens must name it as their audience.
    #[arg(
        id = "teams_app_id",
        long = "teams-app-id",
        env = "SM_TEAMS_APP_ID",
        value_name = "GUID",
        value_parser = guid
    )]
    pub app_id: Option<String>,
    /// Client secret of the bot's app registration (secret; required with SM_TEAMS_APP_ID).
    #[arg(
        id = "teams_app_password",
        long = "teams-app-password",
        env = "SM_TEAMS_APP_PASSWORD",
        hide_env_values = true,
        value_name = "SECRET",
        value_parser = secret_token
    )]
    pub app_password: Option<SecretString>,
    /// Tenant (directory) id of a single-tenant bot; unset for a multi-tenant bot. Selects the
    /// tenant's token endpoint unless SM_TEAMS_TOKEN_URL is set.
    #[arg(
        id = "teams_tenant_id",
        long = "teams-tenant-id",
        env = "SM_TEAMS_TENANT_ID",
        value_name = "TENANT",
        value_parser = tenant
    )]
    pub tenant_id: Option<String>,
    /// Where the bot gets its Connector token (OAuth client credentials). Unset: the Bot
    /// Framework's (login.microsoftonline.com/botframework.com/oauth2/v2.0/token), or the
    /// tenant's when SM_TEAMS_TENANT_ID is set.
    #[arg(
        id = "teams_token_url",
        long = "teams-token-url",
        env = "SM_TEAMS_TOKEN_URL",
        value_name = "URL",
        value_parser = http_url
    )]
    pub token_url: Option<Url>,
    /// OpenID metadata of the issuer of inbound Bot Framework tokens (its JWKS verifies every
    /// request to /api/messages).
    #[arg(
        id = "teams_openid_metadata_url",
        long = "teams-openid-metadata-url",
        env = "SM_TEAMS_OPENID_METADATA_URL",
        default_value = BOT_FRAMEWORK_OPENID_METADATA_URL,
        value_name = "URL",
        value_parser = http_url
    )]
    pub openid_metadata_url: Url,
}

impl TeamsSettings {
    /// Whether Teams is configured (`SM_TEAMS_APP_ID` is set).
    pub fn enabled(&self) -> bool {
        self.app_id.is_some()
    }

    /// The token endpoint: `SM_TEAMS_TOKEN_URL`, else
    /// `https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token` with the tenant of a
    /// single-tenant bot or `botframework.com` (`shared/reference/wire-formats.md` §3.1).
    pub fn token_endpoint(&self) -> Url {
        if let Some(url) = &self.token_url {
            return url.clone();
        }
        let tenant = self.tenant_id.as_deref().unwrap_or("botframework.com");
        let raw = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token");
        // The tenant passed `tenant` (letters, digits, '-', '.'), so the URL parses.
        Url::parse(&raw).unwrap_or_else(|_| {
            Url::parse("https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token")
                .expect("a constant URL")
        })
    }
}

/// `SM_VM_*` and `SM_SSH_TIMEOUT_SECS`: the VM and how the bot logs in.
#[derive(Debug, Clone, Args)]
pub struct VmSettings {
    /// Host name or IP address of the VM that runs the devcontainers (required with a chat
    /// platform); `local` runs them on this machine as the bot's own user, without SSH (the
    /// default in one-machine mode; `scripts/setup-local` installs what that needs).
    #[arg(
        id = "vm_host",
        long = "vm-host",
        env = "SM_VM_HOST",
        value_name = "HOST",
        value_parser = required("the VM's host name or IP address", host_name)
    )]
    pub host: String,
    /// SSH port of the VM.
    #[arg(
        id = "vm_port",
        long = "vm-port",
        env = "SM_VM_PORT",
        default_value = "22",
        value_name = "PORT",
        value_parser = whole::<u16>(1, u16::MAX, "a TCP port (1-65535)")
    )]
    pub port: u16,
    /// User the bot logs in as on the VM.
    #[arg(
        id = "vm_user",
        long = "vm-user",
        env = "SM_VM_USER",
        default_value = "claude",
        value_name = "USER",
        value_parser = unix_user
    )]
    pub user: String,
    /// SSH private key content (secret). Preferred over SM_VM_SSH_KEY_PATH when both are set.
    #[arg(
        id = "vm_ssh_key",
        long = "vm-ssh-key",
        env = "SM_VM_SSH_KEY",
        hide_env_values = true,
        value_name = "KEY",
        value_parser = ssh_private_key
    )]
    pub ssh_key: Option<SecretString>,
    /// Path of the SSH private key file, used when SM_VM_SSH_KEY is unset (required then: the
    /// file is read at start and must hold a private key).
    #[arg(
        id = "vm_ssh_key_path",
        long = "vm-ssh-key-path",
        env = "SM_VM_SSH_KEY_PATH",
        default_value = "/secrets/ssh/id_ed25519",
        value_name = "PATH",
        value_parser = file_path
    )]
    pub ssh_key_path: PathBuf,
    /// The VM's SSH host key: known_hosts content, or the path of a known_hosts file.
    /// Required unless SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY=true.
    #[arg(
        id = "vm_known_hosts",
        long = "vm-known-hosts",
        env = "SM_VM_KNOWN_HOSTS",
        value_name = "KNOWN_HOSTS",
        value_parser = known_hosts
    )]
    pub known_hosts: Option<String>,
    /// Accept whatever host key the VM presents (insecure: a man in the middle goes unnoticed).
    #[arg(
        id = "vm_insecure_accept_new_host_key",
        long = "vm-insecure-accept-new-host-key",
        env = "SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY",
        default_value = "false",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = boolean
    )]
    pub insecure_accept_new_host_key: bool,
    /// Upper bound in seconds for each SSH operation (connect, command).
    #[arg(
        id = "ssh_timeout_secs",
        long = "ssh-timeout-secs",
        env = "SM_SSH_TIMEOUT_SECS",
        default_value = "30",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub ssh_timeout: Duration,
}

/// Devcontainers and the agent inside them.
#[derive(Debug, Clone, Args)]
pub struct ContainerSettings {
    /// Container runtime on the VM, passed to `devcontainer --docker-path`.
    #[arg(
        id = "container_runtime",
        long = "container-runtime",
        env = "SM_CONTAINER_RUNTIME",
        default_value = "podman",
        value_name = "PROGRAM",
        value_parser = word
    )]
    pub runtime: String,
    /// Container network every session's container runs on, whatever a repository's
    /// devcontainer.json says (the firewalled network).
    #[arg(
        id = "container_network",
        long = "container-network",
        env = "SM_CONTAINER_NETWORK",
        default_value = "isolated",
        value_name = "NAME",
        value_parser = word
    )]
    pub network: String,
    /// Image of the generated fallback devcontainer.
    #[arg(
        id = "container_image",
        long = "container-image",
        env = "SM_CONTAINER_IMAGE",
        default_value = "claude-code:latest",
        value_name = "IMAGE",
        value_parser = word
    )]
    pub image: String,
    /// Command that starts Claude Code inside the container (split like a shell would). The
    /// permission mode is not part of it (SM_PERMISSION_MODE); an old value ending in
    /// `--dangerously-skip-permissions` still works, as bypassPermissions, with a warning.
    #[arg(
        id = "claude_command",
        long = "claude-command",
        env = "SM_CLAUDE_COMMAND",
        default_value = "claude",
        value_name = "COMMAND",
        value_parser = command_line
    )]
    pub claude_command: std::vec::Vec<String>,
    /// Environment for the agent, comma-separated: a bare NAME is passed from the VM's
    /// environment (secrets stay on the VM); NAME=value is set by the bot and reaches the agent
    /// on its stdin, never on a command line on the VM (shown redacted by `config`).
    #[arg(
        id = "container_env",
        long = "container-env",
        env = "SM_CONTAINER_ENV",
        hide_env_values = true,
        default_value = "ANTHROPIC_API_KEY,CLAUDE_CODE_OAUTH_TOKEN",
        value_name = "LIST",
        value_parser = list_of(EnvEntry::parse)
    )]
    pub env: std::vec::Vec<EnvEntry>,
    /// What a repository's own devcontainer.json becomes: vetted (rebuilt keeping only what runs
    /// inside the container; what was dropped is listed in the thread), ignore (always the
    /// generated configuration) or trusted (used as written: its initializeCommand runs on the
    /// VM; only for operators who own every repository).
    #[arg(
        id = "repo_devcontainer",
        long = "repo-devcontainer",
        env = "SM_REPO_DEVCONTAINER",
        default_value = "vetted",
        value_name = "MODE",
        value_parser = repo_devcontainer
    )]
    pub repo_devcontainer: RepoConfigPolicy,
    /// How often the reconciler compares the bot's containers on the VM with the sessions in
    /// storage, in seconds.
    #[arg(
        id = "reconcile_interval_secs",
        long = "reconcile-interval-secs",
        env = "SM_RECONCILE_INTERVAL_SECS",
        default_value = "60",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub reconcile_interval: Duration,
    /// How long a container of an ended or unknown session may exist before the reconciler
    /// removes it, in seconds.
    #[arg(
        id = "reconcile_grace_secs",
        long = "reconcile-grace-secs",
        env = "SM_RECONCILE_GRACE_SECS",
        default_value = "120",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub reconcile_grace: Duration,
    /// Upper bound in seconds for `devcontainer up`.
    #[arg(
        id = "devcontainer_timeout_secs",
        long = "devcontainer-timeout-secs",
        env = "SM_DEVCONTAINER_TIMEOUT_SECS",
        default_value = "120",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub devcontainer_timeout: Duration,
    /// Compact an orchestrator session every N of its messages (0 = never).
    #[arg(
        id = "orchestrator_compact_threshold",
        long = "orchestrator-compact-threshold",
        env = "SM_ORCHESTRATOR_COMPACT_THRESHOLD",
        default_value = "50",
        value_name = "N",
        value_parser = whole::<u32>(0, 1_000_000, "a whole number of messages (0 = never)")
    )]
    pub orchestrator_compact_threshold: u32,
    /// Longest line of the agent's output (stream-json) the bot reads, in bytes; a longer one
    /// ends that turn with an error in the thread instead of growing the bot's memory.
    #[arg(
        id = "max_agent_line_bytes",
        long = "max-agent-line-bytes",
        env = "SM_MAX_AGENT_LINE_BYTES",
        default_value = "16777216",
        value_name = "BYTES",
        value_parser = whole::<usize>(1024, 1 << 30, "a whole number of bytes from 1024 to 1073741824")
    )]
    pub max_agent_line_bytes: usize,
    /// Live sessions one person may have at once (0 = no limit). Sessions an orchestrator
    /// spawns count for its orchestrator's limit (`SM_MAX_CHILD_SESSIONS`), not here.
    #[arg(
        id = "max_sessions_per_user",
        long = "max-sessions-per-user",
        env = "SM_MAX_SESSIONS_PER_USER",
        default_value = "0",
        value_name = "COUNT",
        value_parser = whole::<u32>(0, 100_000, "a whole number of sessions (0 = no limit)")
    )]
    pub max_sessions_per_user: u32,
    /// Live sessions in all, spawned ones included (0 = no limit).
    #[arg(
        id = "max_sessions",
        long = "max-sessions",
        env = "SM_MAX_SESSIONS",
        default_value = "0",
        value_name = "COUNT",
        value_parser = whole::<u32>(0, 100_000, "a whole number of sessions (0 = no limit)")
    )]
    pub max_sessions: u32,
    /// Seconds a turn may run before it is interrupted (the CLI's interrupt request), with a
    /// notice in the thread.
    #[arg(
        id = "turn_timeout_secs",
        long = "turn-timeout-secs",
        env = "SM_TURN_TIMEOUT_SECS",
        default_value = "1800",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub turn_timeout: Duration,
    /// Permission mode of the agents (the CLI's --permission-mode): default (asks before
    /// edits and commands), acceptEdits (edits in the container allowed, commands and other
    /// tools ask), plan (changes nothing) or bypassPermissions (never asks). Questions become
    /// cards in the session's thread; `!mode` switches a running session.
    #[arg(
        id = "permission_mode",
        long = "permission-mode",
        env = "SM_PERMISSION_MODE",
        default_value = "acceptEdits",
        value_name = "MODE",
        value_parser = permission_mode
    )]
    pub permission_mode: PermissionMode,
    /// Seconds a tool-permission card waits for an answer before the use is denied (the
    /// session's owner is mentioned once halfway).
    #[arg(
        id = "permission_timeout_secs",
        long = "permission-timeout-secs",
        env = "SM_PERMISSION_TIMEOUT_SECS",
        default_value = "900",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub permission_timeout: Duration,
    /// Seconds a session may go without a message (no turn running) before it hibernates:
    /// its agent is closed and its container stopped, not removed, until the next message
    /// wakes it with the conversation resumed (0 = never).
    #[arg(
        id = "session_idle_secs",
        long = "session-idle-secs",
        env = "SM_SESSION_IDLE_SECS",
        default_value = "7200",
        value_name = "SECS",
        value_parser = seconds_or_never
    )]
    pub session_idle: Duration,
    /// Seconds a session may live from its start; an older one is ended (reason `max_age`)
    /// with a notice in its thread (0 = no limit).
    #[arg(
        id = "session_max_age_secs",
        long = "session-max-age-secs",
        env = "SM_SESSION_MAX_AGE_SECS",
        default_value = "0",
        value_name = "SECS",
        value_parser = seconds_or_never
    )]
    pub session_max_age: Duration,
    /// Spending cap of one session in US dollars (0 = none), from the CLI's per-turn cost.
    /// At the cap the turn finishes, further messages wait, and the owner gets a card: Add
    /// the same amount again, or end the session.
    #[arg(
        id = "session_budget_usd",
        long = "session-budget-usd",
        env = "SM_SESSION_BUDGET_USD",
        default_value = "0",
        value_name = "USD",
        value_parser = dollars
    )]
    pub session_budget_usd: f64,
    /// Spending cap in US dollars of an orchestrator and all its sessions together (0 =
    /// none); at the cap the whole family waits for the card's answer.
    #[arg(
        id = "orchestrator_budget_usd",
        long = "orchestrator-budget-usd",
        env = "SM_ORCHESTRATOR_BUDGET_USD",
        default_value = "0",
        value_name = "USD",
        value_parser = dollars
    )]
    pub orchestrator_budget_usd: f64,
    /// Profiles file (TOML): named sets of session settings (model, permission mode, allowed
    /// and denied tools, budget, idle time, fallback image, extra environment names, who may
    /// pick it) that `start org/repo --profile=name` picks; the `default` profile applies
    /// otherwise. Read and checked at start; every problem in it is reported.
    #[arg(
        id = "profiles_file",
        long = "profiles-file",
        env = "SM_PROFILES_FILE",
        value_name = "PATH",
        value_parser = file_path
    )]
    pub profiles_file: Option<PathBuf>,
    /// Most sessions one orchestrator may run at once.
    #[arg(
        id = "max_child_sessions",
        long = "max-child-sessions",
        env = "SM_MAX_CHILD_SESSIONS",
        default_value = "8",
        value_name = "N",
        value_parser = whole::<usize>(1, 1000, "a whole number of sessions, at least 1")
    )]
    pub max_child_sessions: usize,
}

/// The flag older deployments put in `SM_CLAUDE_COMMAND` to skip every permission question.
pub const LEGACY_SKIP_PERMISSIONS: &str = "--dangerously-skip-permissions";

impl ContainerSettings {
    /// The spending caps (0 in a setting: no cap).
    pub fn budgets(&self) -> crate::budget::BudgetLimits {
        let cap = |d: f64| (d > 0.0).then_some(d);
        crate::budget::BudgetLimits {
            session: cap(self.session_budget_usd),
            orchestrator: cap(self.orchestrator_budget_usd),
        }
    }

    /// The agent's command without [`LEGACY_SKIP_PERMISSIONS`], and the permission mode in
    /// effect: `bypassPermissions` when the command carried that flag, `SM_PERMISSION_MODE`
    /// otherwise.
    pub fn agent_command(&self) -> (Vec<String>, PermissionMode) {
        let legacy = self
            .claude_command
            .iter()
            .any(|w| w == LEGACY_SKIP_PERMISSIONS);
        let command = self
            .claude_command
            .iter()
            .filter(|w| *w != LEGACY_SKIP_PERMISSIONS)
            .cloned()
            .collect();
        let mode = if legacy {
            PermissionMode::BypassPermissions
        } else {
            self.permission_mode
        };
        (command, mode)
    }
}

/// Where repositories come from and live on the VM.
#[derive(Debug, Clone, Args)]
pub struct RepoSettings {
    /// Where repositories are cloned from: `<base>/<org>/<repo>.git`.
    #[arg(
        id = "git_base_url",
        long = "git-base-url",
        env = "SM_GIT_BASE_URL",
        default_value = "https://github.com",
        value_name = "URL",
        value_parser = git_base_url
    )]
    pub git_base_url: Url,
    /// Where repositories are cloned on the VM (absolute path).
    #[arg(
        id = "repos_base_path",
        long = "repos-base-path",
        env = "SM_REPOS_BASE_PATH",
        default_value = "/home/claude/repos",
        value_name = "PATH",
        value_parser = absolute_path
    )]
    pub repos_base_path: PathBuf,
    /// Where git worktrees are created on the VM (absolute path).
    #[arg(
        id = "worktrees_path",
        long = "worktrees-path",
        env = "SM_WORKTREES_PATH",
        default_value = "/home/claude/worktrees",
        value_name = "PATH",
        value_parser = absolute_path
    )]
    pub worktrees_path: PathBuf,
    /// Fast-forward an existing clone before a session starts (true/false).
    #[arg(
        id = "auto_pull",
        long = "auto-pull",
        env = "SM_AUTO_PULL",
        default_value = "false",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = boolean
    )]
    pub auto_pull: bool,
    /// Organisation used when `start repo` names no organisation.
    #[arg(
        id = "default_org",
        long = "default-org",
        env = "SM_DEFAULT_ORG",
        value_name = "ORG",
        value_parser = github_org
    )]
    pub default_org: Option<String>,
    /// Legacy project map (JSON object). Accepted for compatibility and ignored, with a warning.
    #[arg(
        id = "projects",
        long = "projects",
        env = "SM_PROJECTS",
        default_value = "{}",
        value_name = "JSON",
        value_parser = legacy_projects
    )]
    pub projects: serde_json::Map<String, serde_json::Value>,
}

/// Chat behaviour.
#[derive(Debug, Clone, Args)]
pub struct ChatSettings {
    /// Sidebar category that project channels are put into for their members.
    #[arg(
        id = "channel_category",
        long = "channel-category",
        env = "SM_CHANNEL_CATEGORY",
        default_value = "Claude Sessions",
        value_name = "NAME",
        value_parser = category_name
    )]
    pub channel_category: String,
    /// Mention that addresses the bot in chat.
    #[arg(
        id = "bot_trigger",
        long = "bot-trigger",
        env = "SM_BOT_TRIGGER",
        default_value = "@claude",
        value_name = "MENTION",
        value_parser = word
    )]
    pub bot_trigger: String,
    /// Users allowed to use the bot at all (start sessions; drive those they own or were invited
    /// to): comma-separated user ids or usernames (a JSON array is accepted too). Empty means any
    /// member of a channel the bot serves.
    #[arg(
        id = "allowed_users",
        long = "allowed-users",
        env = "SM_ALLOWED_USERS",
        default_value = "",
        value_name = "LIST",
        value_parser = list
    )]
    pub allowed_users: std::vec::Vec<String>,
    /// Users allowed to approve network requests: comma-separated user ids or usernames
    /// (a JSON array is accepted too). Empty means the session's owner and the admins.
    #[arg(
        id = "allowed_approvers",
        long = "allowed-approvers",
        env = "SM_ALLOWED_APPROVERS",
        default_value = "",
        value_name = "LIST",
        value_parser = list
    )]
    pub allowed_approvers: std::vec::Vec<String>,
    /// Admins: may drive, stop and list every session (`status all`), from anywhere.
    /// Comma-separated user ids or usernames, resolved to ids at start; an entry that cannot be
    /// resolved is left out (fewer admins, never more).
    #[arg(
        id = "admin_users",
        long = "admin-users",
        env = "SM_ADMIN_USERS",
        default_value = "",
        value_name = "LIST",
        value_parser = list
    )]
    pub admin_users: std::vec::Vec<String>,
    /// Repositories sessions may be started on: comma-separated `org/*` or `org/repo` patterns
    /// (case-insensitive). Unset means `SM_DEFAULT_ORG/*` when that is set, otherwise any
    /// repository the VM's token can read (with a warning at start).
    #[arg(
        id = "allowed_repos",
        long = "allowed-repos",
        env = "SM_ALLOWED_REPOS",
        default_value = "",
        value_name = "LIST",
        value_parser = list_of(RepoPattern::parse)
    )]
    pub allowed_repos: std::vec::Vec<RepoPattern>,
    /// Type of the project channels the bot creates: private (only the session's owner and the
    /// people they invite are added) or public. Existing channels keep their type.
    #[arg(
        id = "project_channel_privacy",
        long = "project-channel-privacy",
        env = "SM_PROJECT_CHANNEL_PRIVACY",
        default_value = "private",
        value_name = "TYPE",
        value_parser = channel_privacy
    )]
    pub project_channel_privacy: ChannelPrivacy,
}

/// Who may see a project channel the bot creates (`SM_PROJECT_CHANNEL_PRIVACY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelPrivacy {
    /// Only its members (Mattermost channel type `P`).
    Private,
    /// Any member of the team (type `O`).
    Public,
}

fn channel_privacy(v: &str) -> Result<ChannelPrivacy, String> {
    match v.to_ascii_lowercase().as_str() {
        "private" => Ok(ChannelPrivacy::Private),
        "public" => Ok(ChannelPrivacy::Public),
        _ => Err(format!("expected private or public, got {v:?}")),
    }
}

/// One entry of `SM_ALLOWED_REPOS`: `org/*` (every repository of an organisation) or
/// `org/repo`, compared ASCII case-insensitively (as GitHub names are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPattern {
    org: String,
    /// `None` for `org/*`.
    repo: Option<String>,
}

impl RepoPattern {
    /// Parses `org/*` or `org/repo`.
    ///
    /// # Errors
    /// A message naming the bad entry.
    pub fn parse(v: &str) -> Result<Self, String> {
        let bad = || format!("{v:?} is not org/* or org/repo");
        let (org, repo) = v.split_once('/').ok_or_else(bad)?;
        github_org(org).map_err(|_| bad())?;
        let repo = match repo {
            "*" => None,
            name if !name.is_empty()
                && name.len() <= 100
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
            {
                Some(name.to_ascii_lowercase())
            }
            _ => return Err(bad()),
        };
        Ok(Self {
            org: org.to_ascii_lowercase(),
            repo,
        })
    }

    /// `org/*` for an organisation.
    pub fn whole_org(org: &str) -> Self {
        Self {
            org: org.to_ascii_lowercase(),
            repo: None,
        }
    }

    /// Whether `org/repo` matches.
    pub fn matches(&self, org: &str, repo: &str) -> bool {
        self.org.eq_ignore_ascii_case(org)
            && self
                .repo
                .as_deref()
                .is_none_or(|r| r.eq_ignore_ascii_case(repo))
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.org, self.repo.as_deref().unwrap_or("*"))
    }
}

/// The repositories sessions may be started on (`SM_ALLOWED_REPOS`, or its default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoAllowlist {
    /// Any repository the VM's token can read.
    Any,
    /// These patterns.
    Only(Vec<RepoPattern>),
}

impl RepoAllowlist {
    /// Whether `org/repo` may be opened.
    pub fn allows(&self, org: &str, repo: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(patterns) => patterns.iter().any(|p| p.matches(org, repo)),
        }
    }

    /// The list as the settings give it (for refusals).
    pub fn describe(&self) -> String {
        match self {
            Self::Any => "any repository".into(),
            Self::Only(patterns) => patterns
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

impl FirewallSettings {
    /// Whether OPNsense is configured (`SM_OPNSENSE_URL` and its credentials).
    pub fn enabled(&self) -> bool {
        self.url.is_some() && self.key.is_some() && self.secret.is_some()
    }
}

impl Settings {
    /// The effective repository allowlist: `SM_ALLOWED_REPOS`, else `SM_DEFAULT_ORG/*`, else
    /// any repository.
    pub fn repo_allowlist(&self) -> RepoAllowlist {
        if !self.chat.allowed_repos.is_empty() {
            RepoAllowlist::Only(self.chat.allowed_repos.clone())
        } else if let Some(org) = &self.repos.default_org {
            RepoAllowlist::Only(vec![RepoPattern::whole_org(org)])
        } else {
            RepoAllowlist::Any
        }
    }
}

/// `SM_OPNSENSE_*`: how to reach the OPNsense API and which alias to manage (what
/// [`OpnsenseClient::new`](crate::firewall::opnsense::OpnsenseClient::new) takes).
#[derive(Debug, Clone, Args)]
pub struct FirewallSettings {
    /// OPNsense base URL, e.g. `https://fw.example.com`. Unset: network requests are still
    /// asked and decided, but nothing enforces the decisions (a warning at start says so).
    #[arg(
        id = "opnsense_url",
        long = "opnsense-url",
        env = "SM_OPNSENSE_URL",
        value_name = "URL",
        value_parser = http_url
    )]
    pub url: Option<Url>,
    /// OPNsense API key (secret; required with SM_OPNSENSE_URL).
    #[arg(
        id = "opnsense_key",
        long = "opnsense-key",
        env = "SM_OPNSENSE_KEY",
        hide_env_values = true,
        value_name = "KEY",
        value_parser = secret_token
    )]
    pub key: Option<SecretString>,
    /// OPNsense API secret (secret; required with SM_OPNSENSE_URL).
    #[arg(
        id = "opnsense_secret",
        long = "opnsense-secret",
        env = "SM_OPNSENSE_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        value_parser = secret_token
    )]
    pub secret: Option<SecretString>,
    /// Name of the OPNsense host alias that holds the approved domains.
    #[arg(
        id = "opnsense_alias",
        long = "opnsense-alias",
        env = "SM_OPNSENSE_ALIAS",
        default_value = "llm_approved_domains",
        value_name = "NAME",
        value_parser = opnsense_alias
    )]
    pub alias: String,
    /// Verify the OPNsense TLS certificate (true/false).
    #[arg(
        id = "opnsense_verify_tls",
        long = "opnsense-verify-tls",
        env = "SM_OPNSENSE_VERIFY_TLS",
        default_value = "true",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = boolean
    )]
    pub verify_tls: bool,
    /// Upper bound in seconds for each OPNsense API call.
    #[arg(
        id = "opnsense_timeout_secs",
        long = "opnsense-timeout-secs",
        env = "SM_OPNSENSE_TIMEOUT_SECS",
        default_value = "30",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub timeout: Duration,
    /// Seconds an instance holds the firewall lease while it changes the alias; a lease whose
    /// holder died is taken over once it expires, so approvals never stay blocked.
    #[arg(
        id = "firewall_lease_secs",
        long = "firewall-lease-secs",
        env = "SM_FIREWALL_LEASE_SECS",
        default_value = "300",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub lease: Duration,
}

/// `SM_EGRESS_*` and friends: egress grants (what an approval grants, for how long, who may
/// give it, and which domains are refused before any card).
#[derive(Debug, Clone, Args)]
pub struct EgressSettings {
    /// Seconds an "Approve for N h" grant lasts (at most until its session ends).
    #[arg(
        id = "egress_grant_ttl_secs",
        long = "egress-grant-ttl-secs",
        env = "SM_EGRESS_GRANT_TTL_SECS",
        default_value = "28800",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub grant_ttl: Duration,
    /// Two-person rule: the owner of a session may not approve its own network requests
    /// (true/false).
    #[arg(
        id = "approval_separate_approver",
        long = "approval-separate-approver",
        env = "SM_APPROVAL_SEPARATE_APPROVER",
        default_value = "false",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = boolean
    )]
    pub separate_approver: bool,
    /// Open network-request cards one session may have at once; beyond it the agent is told
    /// `[NETWORK_DENIED: …]` without a card.
    #[arg(
        id = "max_pending_approvals",
        long = "max-pending-approvals",
        env = "SM_MAX_PENDING_APPROVALS",
        default_value = "5",
        value_name = "COUNT",
        value_parser = whole::<u32>(1, 1000, "a whole number of cards from 1 to 1000")
    )]
    pub max_pending: u32,
    /// Domains refused before any card: comma-separated patterns, `*.suffix` (the suffix and
    /// every name below it) or an exact name. Empty refuses none.
    #[arg(
        id = "denied_domains",
        long = "denied-domains",
        env = "SM_DENIED_DOMAINS",
        default_value = crate::firewall::policy::DEFAULT_DENIED,
        value_name = "LIST",
        value_parser = list_of(crate::firewall::policy::DomainPattern::parse)
    )]
    pub denied_domains: std::vec::Vec<crate::firewall::policy::DomainPattern>,
    /// Refuse, before any card, domains that resolve only to loopback, private, link-local or
    /// unique-local addresses (resolved from the bot; a name that does not resolve is not
    /// refused) (true/false).
    #[arg(
        id = "egress_refuse_private",
        long = "egress-refuse-private",
        env = "SM_EGRESS_REFUSE_PRIVATE",
        default_value = "true",
        value_name = "BOOL",
        action = ArgAction::Set,
        value_parser = boolean
    )]
    pub refuse_private: bool,
    /// DNS servers (`ip:port`, comma-separated, UDP) for the private-address check. Empty uses
    /// the system's resolver configuration (/etc/resolv.conf).
    #[arg(
        id = "egress_dns_servers",
        long = "egress-dns-servers",
        env = "SM_EGRESS_DNS_SERVERS",
        default_value = "",
        value_name = "LIST",
        value_parser = list_of(socket_address)
    )]
    pub dns_servers: std::vec::Vec<std::net::SocketAddr>,
}

fn socket_address(v: &str) -> Result<std::net::SocketAddr, String> {
    v.parse()
        .map_err(|_| format!("expected an ip:port address such as 10.0.0.53:53, got {v:?}"))
}

/// `SM_CALLBACK_*` and `SM_APPROVAL_TTL_SECS`: signed approval callbacks.
#[derive(Debug, Clone, Args)]
pub struct CallbackSettings {
    /// HMAC-SHA256 key that signs approval buttons (secret, at least 32 characters; required
    /// with a chat platform; in one-machine mode, unset means a key made at the first start
    /// and kept in the database).
    #[arg(
        id = "callback_secret",
        long = "callback-secret",
        env = "SM_CALLBACK_SECRET",
        hide_env_values = true,
        value_name = "SECRET",
        value_parser = required(
            "a random key of at least 32 characters (e.g. `openssl rand -hex 32`)",
            callback_secret
        )
    )]
    pub secret: SecretString,
    /// Seconds an approval request waits for a decision before it expires (denied to the agent).
    #[arg(
        id = "approval_ttl_secs",
        long = "approval-ttl-secs",
        env = "SM_APPROVAL_TTL_SECS",
        default_value = "3600",
        value_name = "SECS",
        value_parser = seconds
    )]
    pub approval_ttl: Duration,
    /// URL chat servers POST button clicks to (this bot's /callback as they reach it).
    #[arg(
        id = "callback_url",
        long = "callback-url",
        env = "SM_CALLBACK_URL",
        default_value = "http://session-manager:8000/callback",
        value_name = "URL",
        value_parser = http_url
    )]
    pub url: Url,
    /// Whether `secret` was made at this start because `SM_CALLBACK_SECRET` is unset in
    /// one-machine mode; `serve` then uses the key kept in the database instead
    /// ([`crate::store::Store::instance_key`]), so cards signed before a restart still verify.
    #[arg(skip)]
    pub secret_made: bool,
}

/// The HTTP server.
#[derive(Debug, Clone, Args)]
pub struct HttpSettings {
    /// Address the HTTP server listens on. Unset: 0.0.0.0:8000, or 127.0.0.1:8000 when no
    /// chat platform is configured (one-machine mode: the console is for this machine only).
    #[arg(
        id = "listen_addr",
        long = "listen-addr",
        env = "SM_LISTEN_ADDR",
        value_name = "ADDR",
        value_parser = socket_addr
    )]
    pub listen_addr: Option<SocketAddr>,
    /// Address for chat servers' requests alone (`/callback`), on a port of their own so a
    /// firewall or NetworkPolicy can admit them from the chat server only. Unset: they are
    /// served on SM_LISTEN_ADDR with `/health` and `/metrics`.
    #[arg(
        id = "callback_listen_addr",
        long = "callback-listen-addr",
        env = "SM_CALLBACK_LISTEN_ADDR",
        value_name = "ADDR",
        value_parser = socket_addr
    )]
    pub callback_listen_addr: Option<SocketAddr>,
    /// Requests per second each client IP may make, sustained.
    #[arg(
        id = "rate_limit_rps",
        long = "rate-limit-rps",
        env = "SM_RATE_LIMIT_RPS",
        default_value = "10",
        value_name = "N",
        value_parser = whole::<u32>(1, 1_000_000, "a whole number of requests per second, at least 1")
    )]
    pub rate_limit_rps: u32,
    /// Requests a client IP may make in a burst above the sustained rate.
    #[arg(
        id = "rate_limit_burst",
        long = "rate-limit-burst",
        env = "SM_RATE_LIMIT_BURST",
        default_value = "20",
        value_name = "N",
        value_parser = whole::<u32>(1, 1_000_000, "a whole number of requests, at least 1")
    )]
    pub rate_limit_burst: u32,
    /// Reverse proxies whose X-Forwarded-For is trusted: comma-separated IPs or CIDR networks.
    /// Empty means the socket peer is always the client.
    #[arg(
        id = "trusted_proxies",
        long = "trusted-proxies",
        env = "SM_TRUSTED_PROXIES",
        default_value = "",
        value_name = "LIST",
        value_parser = list_of(ip_net)
    )]
    pub trusted_proxies: std::vec::Vec<IpNet>,
    /// Who may use the web console at `/`: link (a one-time login link printed at start, for
    /// the person running the bot), token (SM_CONSOLE_TOKENS), proxy (a user header from an
    /// authenticating reverse proxy in SM_TRUSTED_PROXIES) or off. Unset: link when no chat
    /// platform is configured (one-machine mode), off otherwise.
    #[arg(
        id = "console_auth",
        long = "console-auth",
        env = "SM_CONSOLE_AUTH",
        value_name = "MODE",
        value_parser = console_auth
    )]
    pub console_auth: Option<ConsoleAuth>,
    /// Console login tokens, comma-separated `token=user` pairs (secret); `user` is a chat user
    /// id or username (resolved at start), or any name in one-machine mode. Required with
    /// SM_CONSOLE_AUTH=token.
    #[arg(
        id = "console_tokens",
        long = "console-tokens",
        env = "SM_CONSOLE_TOKENS",
        hide_env_values = true,
        default_value = "",
        value_name = "LIST",
        value_parser = console_tokens
    )]
    pub console_tokens: std::vec::Vec<ConsoleToken>,
    /// Who the login link logs in as (SM_CONSOLE_AUTH=link): a chat user id or username, so
    /// that the console acts as that person on chat sessions, or any name in one-machine
    /// mode. Unset: the user the bot runs as ($USER).
    #[arg(
        id = "console_operator",
        long = "console-operator",
        env = "SM_CONSOLE_OPERATOR",
        value_name = "USER",
        value_parser = console_user
    )]
    pub console_operator: Option<String>,
    /// The request header an authenticating reverse proxy (e.g. oauth2-proxy) puts the user in,
    /// with SM_CONSOLE_AUTH=proxy; trusted only from SM_TRUSTED_PROXIES.
    #[arg(
        id = "console_user_header",
        long = "console-user-header",
        env = "SM_CONSOLE_USER_HEADER",
        default_value = "X-Forwarded-User",
        value_name = "HEADER",
        value_parser = header_name
    )]
    pub console_user_header: String,
    /// Seconds the console keeps the thread of a session after it ended; older ones are
    /// forgotten (hourly). 0 keeps them forever. An edited post's or card's versions between
    /// its first and its latest are always dropped.
    #[arg(
        id = "console_retention_secs",
        long = "console-retention-secs",
        env = "SM_CONSOLE_RETENTION_SECS",
        default_value = "2592000",
        value_name = "SECS",
        value_parser = seconds_or_never
    )]
    pub console_retention: Duration,
}

/// How people log in to the web console (`SM_CONSOLE_AUTH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::Display)]
#[strum(serialize_all = "lowercase")]
pub enum ConsoleAuth {
    /// A random one-time login link printed at start (one-machine mode).
    Link,
    /// `SM_CONSOLE_TOKENS`: each token logs in as its user.
    Token,
    /// A user header set by an authenticating reverse proxy in `SM_TRUSTED_PROXIES`.
    Proxy,
    /// No console.
    Off,
}

/// One `token=user` pair of `SM_CONSOLE_TOKENS`.
#[derive(Clone)]
pub struct ConsoleToken {
    /// The secret token.
    pub token: SecretString,
    /// Who it logs in as (a chat user id or username).
    pub user: String,
}

impl fmt::Debug for ConsoleToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConsoleToken(***={})", self.user)
    }
}

/// Storage settings.
#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    /// Database: postgres://user:pass@host/db or sqlite://path. Unset means the embedded
    /// SQLite file sqlite://session-manager.db (secret: may hold a password).
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "SM_DATABASE_URL",
        hide_env_values = true,
        default_value = DEFAULT_DATABASE_URL,
        hide_default_value = true,
        value_name = "URL",
        value_parser = DatabaseUrl::parse
    )]
    pub url: DatabaseUrl,
    /// Maximum number of database connections.
    #[arg(
        id = "database_pool_size",
        long = "database-pool-size",
        env = "SM_DATABASE_POOL_SIZE",
        default_value = "5",
        value_name = "N",
        value_parser = whole::<u32>(1, 1000, "a whole number of connections, at least 1")
    )]
    pub pool_size: u32,
    /// Whether `url` is the embedded default (`SM_DATABASE_URL` unset or blank).
    #[arg(skip)]
    pub is_default: bool,
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

    /// The entry as `config` shows it: `NAME`, or `NAME=<redacted>` (the values reach the
    /// agent only, on its stdin; they are shown nowhere).
    pub fn redacted(&self) -> String {
        match self {
            Self::FromVm(name) => name.clone(),
            Self::Set(name, _) => format!("{name}=<redacted>"),
        }
    }
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

impl Settings {
    /// Checks every setting in `matches` (parsed with [`Cli::raw_command`]) and builds the
    /// typed settings; see the module documentation.
    ///
    /// # Errors
    /// [`ConfigErrors`] with every problem found, in `--help` order.
    ///
    /// # Panics
    /// When `matches` does not come from [`Cli::raw_command`] (a setting is not text there).
    pub fn from_matches(matches: &ArgMatches) -> Result<Settings, ConfigErrors> {
        let mut p = Problems::default();
        let mut values = Values::default();
        for arg in setting_args() {
            let var = env_name(arg);
            let given = matches
                .get_one::<String>(arg.get_id().as_str())
                .map(|v| v.trim())
                .filter(|v| !v.is_empty());
            // A hidden default is a fallback for an unset value (see `Cli::raw_command`).
            let defaulted =
                !arg.get_default_values().is_empty() && !arg.is_hide_default_value_set();
            // Blank or missing: a required setting's parser says what is needed, a setting
            // with a default is checked as blank (a list is then empty), an optional one is
            // unset.
            let text = match given {
                Some(v) => v,
                None if arg.is_required_set() || defaulted => "",
                None => continue,
            };
            // An example's placeholder left in place (`.env.example`, the manifests) is
            // refused, also where the parser would accept it (tokens, URLs).
            let checked = if is_placeholder(text) {
                Err(PLACEHOLDER_PROBLEM.to_owned())
            } else {
                check(arg, text)
            };
            let parsed = match checked {
                Ok(parsed) => Some(parsed),
                Err(_) if given.is_none() && defaulted => {
                    p.push(var, "must not be empty");
                    None
                }
                Err(message) => {
                    p.push(var, message);
                    None
                }
            };
            values.0.push(Checked {
                arg,
                var,
                text: text.to_owned(),
                parsed,
            });
        }
        let made = one_machine_defaults(&mut values, &mut p);
        rules(&values, &mut p);
        let profiles = profiles(&values, &mut p);
        if !p.problems.is_empty() {
            let position = |var: &str| setting_args().iter().position(|a| env_name(a) == var);
            p.problems.sort_by_key(|problem| position(problem.var));
            return Err(ConfigErrors(p.problems));
        }
        let argv = values
            .0
            .iter()
            .map(|c| format!("--{}={}", c.arg.get_long().unwrap_or_default(), c.text));
        let typed = Settings::augment_args(Command::new("settings"))
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(std::iter::once("settings".to_owned()).chain(argv))
            .and_then(|typed| Settings::from_arg_matches(&typed));
        // Not expected to fail: every value passed the same parsers just now.
        let mut settings = typed.map_err(|e| {
            ConfigErrors(vec![ConfigProblem {
                var: "arguments",
                message: format!("the checked settings do not build: {}", message(&e)),
            }])
        })?;
        settings.database.is_default = values.get::<DatabaseUrl>("SM_DATABASE_URL").is_none();
        settings.callback.secret_made = made.contains(&"SM_CALLBACK_SECRET");
        settings.warnings = p.warnings;
        settings.profiles = profiles;
        Ok(settings)
    }
}

/// What marks a value as an example's placeholder: `.env.example` and the example Secret say
/// `REPLACE_ME`, the example ConfigMap `CHANGE-ME`.
pub const PLACEHOLDERS: [&str; 2] = ["REPLACE_ME", "CHANGE-ME"];

/// The problem reported for a placeholder (the value itself is not repeated: it may sit in a
/// secret).
const PLACEHOLDER_PROBLEM: &str =
    "still holds a placeholder (REPLACE_ME or CHANGE-ME) from an example: set the real value";

/// Whether a value still holds one of the [`PLACEHOLDERS`].
fn is_placeholder(text: &str) -> bool {
    PLACEHOLDERS.iter().any(|marker| text.contains(marker))
}

/// The rules that involve more than one setting, or only warn. They run after every setting
/// was checked on its own and read the values that passed (a wrong value is already
/// reported).
fn rules(v: &Values, p: &mut Problems) {
    // `local`: this machine, no SSH (one-machine mode): no host key and no SSH key.
    let local = v.get::<String>("SM_VM_HOST").as_deref() == Some(crate::runtime::ssh::LOCAL_HOST);
    // The VM's host key is pinned, unless accepting any key was asked for (said loudly).
    if !local && !v.is_set("SM_VM_KNOWN_HOSTS") {
        match v.get::<bool>("SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY") {
            Some(true) => p.warn("SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY=true: the VM's host key is NOT checked; anyone who can intercept the connection can impersonate the VM. Set SM_VM_KNOWN_HOSTS."),
            Some(false) => p.push("SM_VM_KNOWN_HOSTS", "is required: the VM's host key as a known_hosts line (ssh-keyscan -p PORT HOST) or the path of a known_hosts file; or set SM_VM_INSECURE_ACCEPT_NEW_HOST_KEY=true to skip the check (insecure)"),
            None => {}
        }
    }
    // The bot's SSH key file is read now, so a missing or unreadable key is reported with the
    // other problems instead of at the first connection.
    if !local && !v.is_set("SM_VM_SSH_KEY") {
        if let Some(path) = v.get::<PathBuf>("SM_VM_SSH_KEY_PATH") {
            if let Err(problem) = private_key_file(&path) {
                p.push("SM_VM_SSH_KEY_PATH", problem);
            }
        }
    }
    // Chat platforms: Teams when its app id is set; Mattermost when any of its settings is,
    // and also when nothing else is configured (today's default platform).
    let teams = v.is_set("SM_TEAMS_APP_ID");
    if teams && !v.is_set("SM_TEAMS_APP_PASSWORD") {
        p.push(
            "SM_TEAMS_APP_PASSWORD",
            "is required: the client secret of the bot's app registration (SM_TEAMS_APP_ID is set)",
        );
    }
    if !teams {
        let dependent = [
            "SM_TEAMS_APP_PASSWORD",
            "SM_TEAMS_TENANT_ID",
            "SM_TEAMS_TOKEN_URL",
        ]
        .into_iter()
        .filter(|var| v.is_set(var))
        .collect::<Vec<_>>();
        if !dependent.is_empty() {
            p.push(
                "SM_TEAMS_APP_ID",
                format!(
                    "is required: the bot's Microsoft App ID ({} is set)",
                    dependent.join(", ")
                ),
            );
        }
    }
    let mattermost = MATTERMOST_REQUIRED.iter().any(|(var, _)| v.is_set(var));
    // No chat platform: one-machine mode, the web console is the chat surface.
    let console = v
        .get::<ConsoleAuth>("SM_CONSOLE_AUTH")
        .unwrap_or(if mattermost || teams {
            ConsoleAuth::Off
        } else {
            ConsoleAuth::Link
        });
    if !mattermost && !teams && console == ConsoleAuth::Off {
        for (var, what) in MATTERMOST_REQUIRED {
            p.push(var, format!("is required: {what}; or leave SM_CONSOLE_AUTH unset to use the web console alone"));
        }
    }
    match console {
        ConsoleAuth::Token
            if v.get::<Vec<ConsoleToken>>("SM_CONSOLE_TOKENS")
                .is_none_or(|t| t.is_empty()) =>
        {
            p.push(
                "SM_CONSOLE_TOKENS",
                "is required with SM_CONSOLE_AUTH=token: comma-separated token=user pairs",
            );
        }
        ConsoleAuth::Proxy
            if v.get::<Vec<IpNet>>("SM_TRUSTED_PROXIES")
                .is_none_or(|t| t.is_empty()) =>
        {
            p.push(
                "SM_TRUSTED_PROXIES",
                "is required with SM_CONSOLE_AUTH=proxy: the address of the authenticating reverse proxy (its user header is trusted from there only)",
            );
        }
        _ => {}
    }
    if mattermost {
        for (var, what) in MATTERMOST_REQUIRED {
            if !v.is_set(var) {
                p.push(var, format!("is required: {what}"));
            }
        }
    }
    // The firewall: all three together, or none (then nothing enforces an approval).
    let firewall = ["SM_OPNSENSE_URL", "SM_OPNSENSE_KEY", "SM_OPNSENSE_SECRET"];
    if firewall.iter().any(|var| v.is_set(var)) {
        for (var, what) in firewall.iter().zip([
            "the OPNsense base URL, e.g. https://fw.example.com",
            "the OPNsense API key",
            "the OPNsense API secret",
        ]) {
            if !v.is_set(var) {
                p.push(
                    var,
                    format!("is required: {what} (the other OPNsense settings are set)"),
                );
            }
        }
    } else {
        p.warn("SM_OPNSENSE_URL is unset: network requests are still asked and decided (cards, the audit log), but NOTHING ENFORCES the decisions: the sessions' egress is whatever the VM's own network allows. Set SM_OPNSENSE_URL, SM_OPNSENSE_KEY and SM_OPNSENSE_SECRET to apply them.");
    }
    // SM_PROJECTS is legacy: accepted and ignored, with a warning when it is not empty.
    let projects = v.get::<serde_json::Map<String, serde_json::Value>>("SM_PROJECTS");
    if projects.is_some_and(|projects| !projects.is_empty()) {
        p.warn("SM_PROJECTS is a legacy setting and is ignored: name the repository in `start org/repo` instead");
    }
    // Without an allowlist, any repository the VM's token can read may be opened: say so.
    let no_allowlist = v
        .get::<Vec<RepoPattern>>("SM_ALLOWED_REPOS")
        .is_none_or(|p| p.is_empty());
    if no_allowlist && !v.is_set("SM_DEFAULT_ORG") {
        p.warn("SM_ALLOWED_REPOS and SM_DEFAULT_ORG are unset: any repository the VM's token can read may be opened in a session. Set SM_ALLOWED_REPOS (e.g. acme/*).");
    }
    // Chat servers' requests on a port of their own: it must be another port.
    if let (main, Some(callback)) = (
        v.get::<SocketAddr>("SM_LISTEN_ADDR")
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8000))),
        v.get::<SocketAddr>("SM_CALLBACK_LISTEN_ADDR"),
    ) {
        if main.port() == callback.port() && main.port() != 0 {
            p.push(
                "SM_CALLBACK_LISTEN_ADDR",
                format!(
                    "must use another port than SM_LISTEN_ADDR ({main}), or be unset to share it"
                ),
            );
        }
    }
    // The permission mode moved out of SM_CLAUDE_COMMAND: the seed system's default keeps
    // working (as bypassPermissions), anything else that sets it there is refused.
    if let Some(command) = v.get::<Vec<String>>("SM_CLAUDE_COMMAND") {
        if command.iter().any(|w| w == LEGACY_SKIP_PERMISSIONS) {
            p.warn("SM_CLAUDE_COMMAND carries --dangerously-skip-permissions: the agents run with the permission mode bypassPermissions (nothing asks). Remove the flag and set SM_PERMISSION_MODE instead (default acceptEdits: commands ask in the thread).");
        }
        if let Some(flag) = command.iter().find(|w| {
            ["--permission-mode", "--permission-prompt-tool"]
                .iter()
                .any(|f| w.as_str() == *f || w.starts_with(&format!("{f}=")))
        }) {
            p.push(
                "SM_CLAUDE_COMMAND",
                format!("must not carry {flag}: the bot sets the permission mode (SM_PERMISSION_MODE) and answers the agent's permission questions itself"),
            );
        }
    }
    // Trusting repositories' devcontainer.json is the operator's explicit choice: say what it means.
    if v.get::<RepoConfigPolicy>("SM_REPO_DEVCONTAINER") == Some(RepoConfigPolicy::Trusted) {
        p.warn("SM_REPO_DEVCONTAINER=trusted: repositories' devcontainer.json are used as written; their initializeCommand runs on the VM and they may ask for privileges or mounts of the VM. Use it only when you own every repository the bot may open.");
    }
}

/// One-machine mode (no chat platform) needs neither `SM_VM_HOST` (unset means `local`: this
/// machine) nor `SM_CALLBACK_SECRET` (no chat server calls back; the console's cards are
/// signed with a key made here, which `serve` replaces with the one kept in the database).
/// Returns the settings it filled in.
fn one_machine_defaults(values: &mut Values, p: &mut Problems) -> Vec<&'static str> {
    let mut made = Vec::new();
    let chat = MATTERMOST_REQUIRED
        .iter()
        .any(|(var, _)| values.is_set(var))
        || values.is_set("SM_TEAMS_APP_ID");
    if chat {
        return made;
    }
    for (var, value) in [
        ("SM_VM_HOST", crate::runtime::ssh::LOCAL_HOST.to_owned()),
        ("SM_CALLBACK_SECRET", crate::console::auth::random_token()),
    ] {
        if values.is_set(var) {
            continue;
        }
        let Some(checked) = values.0.iter_mut().find(|c| c.var == var) else {
            continue;
        };
        checked.parsed = check(checked.arg, &value).ok();
        checked.text = value;
        p.problems.retain(|problem| problem.var != var);
        made.push(var);
    }
    made
}

/// Reads and checks `SM_PROFILES_FILE` when it is set: each problem in the file is a problem
/// of its own (all of them, not the first).
fn profiles(v: &Values, p: &mut Problems) -> crate::profile::Profiles {
    let Some(path) = v.get::<PathBuf>("SM_PROFILES_FILE") else {
        return crate::profile::Profiles::default();
    };
    match crate::profile::Profiles::load(&path) {
        Ok(profiles) => profiles,
        Err(problems) => {
            for problem in problems {
                p.push("SM_PROFILES_FILE", format!("{}: {problem}", path.display()));
            }
            crate::profile::Profiles::default()
        }
    }
}

/// The arguments of every setting as [`Settings`] declares them (typed value parsers,
/// `required` inferred from the field types), in `--help` order. Built once; the environment
/// values clap captured while building them are never read (values are passed as flags).
fn setting_args() -> &'static [Arg] {
    static ARGS: OnceLock<Vec<Arg>> = OnceLock::new();
    ARGS.get_or_init(|| {
        Settings::augment_args(Command::new("settings"))
            .get_arguments()
            .cloned()
            .collect()
    })
}

/// The variable of a setting's argument.
fn env_name(arg: &'static Arg) -> &'static str {
    arg.get_env()
        .and_then(|env| env.to_str())
        .unwrap_or_default()
}

/// Runs a setting's own value parser on `text` (clap keeps that public only inside a parse,
/// hence the one-argument command). The error is the parser's message.
fn check(arg: &Arg, text: &str) -> Result<ArgMatches, String> {
    let long = arg.get_long().unwrap_or_default();
    Command::new("check")
        .arg(arg.clone())
        .try_get_matches_from(["check".to_owned(), format!("--{long}={text}")])
        .map_err(|e| message(&e))
}

/// What a parser said, without clap's wrapping (which quotes the value: it may be a secret).
fn message(e: &clap::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => source.to_string(),
        None => e.kind().to_string(),
    }
}

/// A setting's value and what its parser made of it.
struct Checked {
    arg: &'static Arg,
    var: &'static str,
    /// As given (or defaulted), trimmed; empty for a blank value.
    text: String,
    /// The typed value under the argument's id; `None` when the parser refused the text.
    parsed: Option<ArgMatches>,
}

/// Every setting that has a value, checked: what [`rules`] read and the typed build uses.
#[derive(Default)]
struct Values(Vec<Checked>);

impl Values {
    /// Whether the setting has a non-blank value (given or default), valid or not.
    fn is_set(&self, var: &str) -> bool {
        self.0.iter().any(|c| c.var == var && !c.text.is_empty())
    }

    /// The typed value of a setting, if it has one that passed its parser.
    ///
    /// # Panics
    /// When `T` is not the setting's type (a programming error the tests catch).
    fn get<T: Clone + Send + Sync + 'static>(&self, var: &str) -> Option<T> {
        let c = self.0.iter().find(|c| c.var == var)?;
        c.parsed
            .as_ref()?
            .get_one::<T>(c.arg.get_id().as_str())
            .cloned()
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

    fn warn(&mut self, message: &str) {
        self.warnings.push(message.to_owned());
    }
}

// Parsers. Each takes the trimmed value and says what is expected when it refuses one; a
// setting's `value_parser` is one of them or a combinator around one.

/// A required setting: `what` says what to set when the value is missing or blank.
fn required<T, P>(
    what: &'static str,
    parse: P,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    P: Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static,
{
    move |v: &str| {
        if v.is_empty() {
            Err(format!("is required: {what}"))
        } else {
            parse(v)
        }
    }
}

/// A whole number from `min` to `max`; `what` describes it for the error message.
fn whole<T>(
    min: T,
    max: T,
    what: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + Copy + Send + Sync + 'static,
{
    move |v: &str| number(v, min, max, what)
}

/// A [`list`] whose items each go through `item`.
fn list_of<T: 'static>(
    item: fn(&str) -> Result<T, String>,
) -> impl Fn(&str) -> Result<Vec<T>, String> + Clone + Send + Sync + 'static {
    move |v: &str| list(v)?.iter().map(|entry| item(entry)).collect()
}

/// A private key file the bot can read: readable, and holding a private key (the pool copies
/// it at each connection, so it is read again then).
fn private_key_file(path: &std::path::Path) -> Result<(), String> {
    let content = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the SSH private key file {}: {e}; set SM_VM_SSH_KEY_PATH to the bot's private key file, or SM_VM_SSH_KEY to the key itself",
            path.display()
        )
    })?;
    if content.contains("PRIVATE KEY-----") {
        Ok(())
    } else {
        Err(format!(
            "{} holds no private key (expected -----BEGIN OPENSSH PRIVATE KEY----- or another PEM private key)",
            path.display()
        ))
    }
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

fn ssh_private_key(v: &str) -> Result<SecretString, String> {
    if v.contains("PRIVATE KEY") {
        Ok(SecretString::from(v.to_owned()))
    } else {
        Err("expected the content of an OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY----- …), not a path; use SM_VM_SSH_KEY_PATH for a file".into())
    }
}

fn file_path(v: &str) -> Result<PathBuf, String> {
    if v.is_empty() {
        Err("expected a path".into())
    } else {
        Ok(PathBuf::from(v))
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

/// A GUID such as an Azure AD application or object id, lowercased.
fn guid(v: &str) -> Result<String, String> {
    if is_guid(v) {
        Ok(v.to_ascii_lowercase())
    } else {
        Err(format!(
            "expected a GUID such as 0d9b645f-1c2e-4b5a-9d3c-2f1e0a9b8c7d, got {v:?}"
        ))
    }
}

/// Whether `v` is a GUID (`8-4-4-4-12` hexadecimal digits).
pub fn is_guid(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A tenant: its GUID, or a verified domain name such as `contoso.onmicrosoft.com`.
fn tenant(v: &str) -> Result<String, String> {
    let domain = v.contains('.')
        && v.len() <= 253
        && v.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if is_guid(v) || domain {
        Ok(v.to_ascii_lowercase())
    } else {
        Err(format!(
            "expected a tenant id (a GUID) or a domain such as contoso.onmicrosoft.com, got {v:?}"
        ))
    }
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
    if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!("expected a single word without spaces, got {v:?}"))
    } else {
        Ok(v.to_owned())
    }
}

fn command_line(v: &str) -> Result<Vec<String>, String> {
    match shlex::split(v) {
        Some(words) if !words.is_empty() => Ok(words),
        _ => Err(
            "expected a command line such as \"claude --model opus\" (unbalanced quotes?)".into(),
        ),
    }
}

fn git_base_url(v: &str) -> Result<Url, String> {
    let url = Url::parse(v)
        .map_err(|e| format!("expected a URL such as https://github.com, got {v:?} ({e})"))?;
    if !matches!(url.scheme(), "https" | "http" | "ssh" | "file") {
        return Err(format!(
            "expected an https://, ssh:// or file:// URL, got {v:?}"
        ));
    }
    if url.password().is_some() || !url.username().is_empty() {
        return Err(
            "must not contain credentials: private repositories use GH_TOKEN on the VM".into(),
        );
    }
    Ok(url)
}

/// `SM_PROJECTS`: a JSON object (blank counts as `{}`); [`rules`] warns when it is not empty.
fn legacy_projects(v: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    if v.is_empty() {
        return Ok(serde_json::Map::new());
    }
    serde_json::from_str(v).map_err(|e| {
        format!(
            "expected a JSON object such as {{}} ({e}); the setting is legacy and can be removed"
        )
    })
}

fn category_name(v: &str) -> Result<String, String> {
    if v.is_empty() || v.chars().count() > 64 {
        Err("expected a category name of at most 64 characters".into())
    } else {
        Ok(v.to_owned())
    }
}

fn callback_secret(v: &str) -> Result<SecretString, String> {
    if v.chars().count() < 32 {
        Err("is too short: use at least 32 random characters (e.g. `openssl rand -hex 32`)".into())
    } else {
        Ok(SecretString::from(v.to_owned()))
    }
}

fn socket_addr(v: &str) -> Result<SocketAddr, String> {
    v.parse::<SocketAddr>()
        .map_err(|_| format!("expected an address such as 0.0.0.0:8000, got {v:?}"))
}

fn log_format(v: &str) -> Result<LogFormat, String> {
    match v.to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("expected text or json, got {v:?}")),
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

fn dollars(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(d) if d.is_finite() && (0.0..=100_000.0).contains(&d) => Ok(d),
        _ => Err(format!(
            "expected an amount in US dollars between 0 and 100000 (0 = no cap), e.g. 5 or 0.50, got {v:?}"
        )),
    }
}

fn console_auth(v: &str) -> Result<ConsoleAuth, String> {
    v.parse()
        .map_err(|_| format!("expected link, token, proxy or off, got {v:?}"))
}

fn console_tokens(v: &str) -> Result<Vec<ConsoleToken>, String> {
    let mut out: Vec<ConsoleToken> = Vec::new();
    for (i, entry) in v
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .enumerate()
    {
        // The token is never repeated in a message: entries are named by position.
        let Some((token, user)) = entry.split_once('=') else {
            return Err(format!("entry {} is not token=user", i + 1));
        };
        let (token, user) = (token.trim(), user.trim());
        if token.chars().count() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "entry {}: a token must be at least 16 characters without spaces (e.g. from `openssl rand -hex 16`)",
                i + 1
            ));
        }
        if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "entry {}: expected a user id or username after `=`",
                i + 1
            ));
        }
        if out
            .iter()
            .any(|t| secrecy::ExposeSecret::expose_secret(&t.token) == token)
        {
            return Err(format!("entry {}: the same token is given twice", i + 1));
        }
        out.push(ConsoleToken {
            token: SecretString::from(token.to_owned()),
            user: user.trim_start_matches('@').to_owned(),
        });
    }
    Ok(out)
}

fn console_user(v: &str) -> Result<String, String> {
    let name = v.trim_start_matches('@');
    if crate::console::platform::is_user_name(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "expected a user id or username (letters, digits, `.`, `_`, `-`, `@`), got {v:?}"
        ))
    }
}

fn header_name(v: &str) -> Result<String, String> {
    match axum::http::HeaderName::from_bytes(v.as_bytes()) {
        Ok(name) => Ok(name.as_str().to_owned()),
        Err(_) => Err(format!(
            "expected an HTTP header name such as X-Forwarded-User, got {v:?}"
        )),
    }
}

fn permission_mode(v: &str) -> Result<PermissionMode, String> {
    v.parse()
        .map_err(|_| format!("expected default, acceptEdits, plan or bypassPermissions, got {v:?}"))
}

fn repo_devcontainer(v: &str) -> Result<RepoConfigPolicy, String> {
    v.parse()
        .map_err(|_| format!("expected vetted, ignore or trusted, got {v:?}"))
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

/// Seconds up to a year, 0 meaning "never" (the caller treats [`Duration::ZERO`] so).
fn seconds_or_never(v: &str) -> Result<Duration, String> {
    number::<u64>(
        v,
        0,
        31_536_000,
        "a whole number of seconds between 0 (never) and 31536000",
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

fn ip_net(item: &str) -> Result<IpNet, String> {
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

/// Every setting, in `--help` order. A hidden default (the embedded database) is described in
/// the help text instead, so it is not listed as the default.
pub fn setting_docs() -> Vec<SettingDoc> {
    setting_args()
        .iter()
        .map(|arg| SettingDoc {
            env: env_name(arg).to_owned(),
            flag: arg.get_long().unwrap_or_default().to_owned(),
            default: arg
                .get_default_values()
                .first()
                .filter(|_| !arg.is_hide_default_value_set())
                .map(|d| d.to_string_lossy().into_owned()),
            secret: arg.is_hide_env_values_set(),
            help: arg.get_help().map(ToString::to_string).unwrap_or_default(),
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
    /// `(variable, shown value, where it came from: env, .env, flag, default or unset)`,
    /// secrets already redacted.
    pub entries: Vec<(String, String, &'static str)>,
    /// Validation problems.
    pub problems: Vec<ConfigProblem>,
    /// Validation warnings.
    pub warnings: Vec<String>,
}

impl ConfigReport {
    /// Builds the report from the matches of [`Cli::raw_command`]. Secret values are shown as
    /// `<redacted>`, and a password inside any URL as `***`.
    pub fn new(matches: &ArgMatches) -> Self {
        let (problems, warnings) = match Settings::from_matches(matches) {
            Ok(s) => (Vec::new(), s.warnings),
            Err(e) => (e.0, Vec::new()),
        };
        let entries = setting_args()
            .iter()
            .map(|arg| {
                let env = env_name(arg).to_owned();
                let id = arg.get_id().as_str();
                let value = matches
                    .try_get_one::<String>(id)
                    .ok()
                    .flatten()
                    .filter(|v| !v.is_empty());
                let hidden_default = arg
                    .get_default_values()
                    .first()
                    .filter(|_| arg.is_hide_default_value_set());
                let shown = match (value, hidden_default) {
                    (None, Some(default)) => {
                        format!("<unset> (embedded default {})", default.to_string_lossy())
                    }
                    (None, None) => "<unset>".to_owned(),
                    (Some(v), _) if arg.is_hide_env_values_set() && id == "database_url" => {
                        redact_url_password(v)
                    }
                    (Some(v), _) if id == "container_env" => list(v)
                        .unwrap_or_default()
                        .iter()
                        .map(|e| {
                            EnvEntry::parse(e)
                                .map_or_else(|_| "<invalid>".to_owned(), |e| e.redacted())
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    (Some(_), _) if arg.is_hide_env_values_set() => "<redacted>".to_owned(),
                    (Some(v), _) => redact_url_password(v),
                };
                let source = match matches.value_source(id) {
                    Some(ValueSource::EnvVariable) => "env",
                    Some(ValueSource::CommandLine) => "flag",
                    Some(ValueSource::DefaultValue) => "default",
                    _ => "unset",
                };
                (env, shown, source)
            })
            .collect();
        Self {
            entries,
            problems,
            warnings,
        }
    }

    /// Shows the values the `.env` file gave as coming from `.env` rather than `env`.
    /// `loaded` names the variables the file set: those that were not in the real environment
    /// before it was read (the real environment wins).
    #[must_use]
    pub fn with_dotenv(mut self, loaded: &[String]) -> Self {
        for (env, _, source) in &mut self.entries {
            if *source == "env" && loaded.iter().any(|name| name == env) {
                *source = ".env";
            }
        }
        self
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
        let matches = Cli::raw_command()
            .try_get_matches_from(argv)
            .expect("clap accepts any text");
        Settings::from_matches(&matches)
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
            ("vm-ssh-key", TEST_KEY),
        ]
    }

    /// The shape of a private key (nothing logs in with it).
    const TEST_KEY: &str =
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot-a-real-key\n-----END OPENSSH PRIVATE KEY-----";

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
        assert_eq!(s.container.claude_command, vec!["claude"]);
        assert_eq!(s.container.permission_mode, PermissionMode::AcceptEdits);
        assert_eq!(s.container.permission_timeout, Duration::from_secs(900));
        assert_eq!(s.container.devcontainer_timeout, Duration::from_secs(120));
        assert_eq!(s.container.orchestrator_compact_threshold, 50);
        assert_eq!(s.repos.repos_base_path, PathBuf::from("/home/claude/repos"));
        assert_eq!(
            s.repos.worktrees_path,
            PathBuf::from("/home/claude/worktrees")
        );
        assert!(!s.repos.auto_pull);
        assert_eq!(s.repos.default_org, None);
        assert!(s.repos.projects.is_empty());
        assert!(!s.vm.insecure_accept_new_host_key);
        assert!(s.chat.allowed_users.is_empty());
        assert!(s.chat.admin_users.is_empty());
        assert_eq!(s.chat.project_channel_privacy, ChannelPrivacy::Private);
        assert_eq!(s.repo_allowlist(), RepoAllowlist::Any);
        assert_eq!(
            s.warnings,
            ["SM_ALLOWED_REPOS and SM_DEFAULT_ORG are unset: any repository the VM's token can read may be opened in a session. Set SM_ALLOWED_REPOS (e.g. acme/*)."],
            "an open repository list is said at start"
        );
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
        assert_eq!(s.http.listen_addr, None);
        assert_eq!(s.listen_addr(), "0.0.0.0:8000".parse().expect("addr"));
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
    fn the_callback_port_is_optional_and_must_differ() {
        let s = args(&complete()).expect("valid");
        assert_eq!(s.http.callback_listen_addr, None);
        let mut pairs = complete();
        pairs.push(("callback-listen-addr", "0.0.0.0:8001"));
        let s = args(&pairs).expect("valid");
        assert_eq!(
            s.http.callback_listen_addr,
            Some("0.0.0.0:8001".parse().expect("addr"))
        );
        let mut pairs = complete();
        pairs.push(("callback-listen-addr", "127.0.0.1:8000"));
        let err = args(&pairs).expect_err("same port");
        assert_eq!(err.0[0].var, "SM_CALLBACK_LISTEN_ADDR");
        assert!(err.0[0].message.contains("another port"), "{:?}", err.0);
    }

    #[test]
    fn the_repository_allowlist_and_its_defaults() {
        let mut pairs = complete();
        pairs.push(("allowed-repos", "Acme/*, tools/linter"));
        let s = args(&pairs).expect("valid");
        let list = s.repo_allowlist();
        assert!(list.allows("acme", "anything") && list.allows("ACME", "x"));
        assert!(list.allows("tools", "Linter") && !list.allows("tools", "linter-2"));
        assert!(!list.allows("evil", "linter"));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);

        let mut pairs = complete();
        pairs.push(("default-org", "acme"));
        let s = args(&pairs).expect("valid");
        assert_eq!(
            s.repo_allowlist(),
            RepoAllowlist::Only(vec![RepoPattern::whole_org("acme")]),
            "unset: the default organisation"
        );
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);

        for bad in [
            "acme", "acme/", "/x", "acme/a b", "acme/*/x", "-a/x", "acme/**",
        ] {
            let mut pairs = complete();
            pairs.push(("allowed-repos", bad));
            let err = args(&pairs).expect_err(bad);
            assert_eq!(err.0[0].var, "SM_ALLOWED_REPOS", "{bad}");
            assert!(err.0[0].message.contains("org/*"), "{bad}: {:?}", err.0);
        }
    }

    #[test]
    fn repository_devcontainers_are_vetted_unless_trusted_and_trust_is_said_loudly() {
        let s = args(&complete()).expect("valid");
        assert_eq!(s.container.repo_devcontainer, RepoConfigPolicy::Vetted);
        assert!(!s.warnings.iter().any(|w| w.contains("initializeCommand")));
        let mut pairs = complete();
        pairs.push(("repo-devcontainer", "trusted"));
        let s = args(&pairs).expect("valid");
        assert_eq!(s.container.repo_devcontainer, RepoConfigPolicy::Trusted);
        assert!(s
            .warnings
            .iter()
            .any(|w| w.contains("initializeCommand runs on the VM")));
        let mut pairs = complete();
        pairs.push(("repo-devcontainer", "open"));
        let err = args(&pairs).expect_err("invalid");
        assert_eq!(err.0[0].var, "SM_REPO_DEVCONTAINER");
    }

    #[test]
    fn the_permission_mode_is_its_own_setting_and_the_old_skip_flag_means_bypass() {
        let s = args(&complete()).expect("valid");
        assert_eq!(
            s.container.agent_command(),
            (vec!["claude".to_owned()], PermissionMode::AcceptEdits)
        );
        let mut pairs = complete();
        pairs.push(("permission-mode", "plan"));
        let s = args(&pairs).expect("valid");
        assert_eq!(s.container.agent_command().1, PermissionMode::Plan);
        // The seed system's default keeps working, loudly.
        let mut pairs = complete();
        pairs.push(("claude-command", "claude --dangerously-skip-permissions"));
        let s = args(&pairs).expect("valid");
        assert_eq!(
            s.container.agent_command(),
            (vec!["claude".to_owned()], PermissionMode::BypassPermissions)
        );
        assert!(s.warnings.iter().any(|w| w.contains("bypassPermissions")));
        for command in [
            "claude --permission-mode plan",
            "claude --permission-prompt-tool=stdio",
        ] {
            let mut pairs = complete();
            pairs.push(("claude-command", command));
            let err = args(&pairs).expect_err(command);
            assert_eq!(err.0[0].var, "SM_CLAUDE_COMMAND", "{command}");
        }
        let mut pairs = complete();
        pairs.push(("permission-mode", "yolo"));
        let err = args(&pairs).expect_err("invalid");
        assert_eq!(err.0[0].var, "SM_PERMISSION_MODE");
    }

    #[test]
    fn a_profiles_file_is_read_at_start_and_each_of_its_problems_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.toml");
        std::fs::write(&good, "[profile.review]\npermission_mode = \"plan\"\n").expect("write");
        let mut pairs = complete();
        let path = good.display().to_string();
        pairs.push(("profiles-file", &path));
        let settings = args(&pairs).expect("valid");
        assert_eq!(
            settings
                .profiles
                .get("review")
                .and_then(|p| p.permission_mode),
            Some(PermissionMode::Plan)
        );
        assert!(args(&complete()).expect("valid").profiles.is_empty());

        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[profile.a]\nmodel = 3\nbudget_usd = \"lots\"\n[profile.b]\nshell = true\n",
        )
        .expect("write");
        let mut pairs = complete();
        let path = bad.display().to_string();
        pairs.push(("profiles-file", &path));
        pairs.push(("vm-port", "0"));
        let err = args(&pairs).expect_err("invalid");
        let profile_problems: Vec<&ConfigProblem> = err
            .0
            .iter()
            .filter(|p| p.var == "SM_PROFILES_FILE")
            .collect();
        assert_eq!(profile_problems.len(), 3, "{err}");
        assert!(
            err.0.iter().any(|p| p.var == "SM_VM_PORT"),
            "with the others: {err}"
        );
        for needle in [
            "[profile.a] model",
            "[profile.a] budget_usd",
            "[profile.b] shell",
        ] {
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }

        let mut pairs = complete();
        let missing = dir.path().join("missing.toml").display().to_string();
        pairs.push(("profiles-file", &missing));
        let err = args(&pairs).expect_err("missing file");
        assert!(err.0[0].message.contains("cannot read"), "{err}");
    }

    #[test]
    fn container_env_values_are_redacted_in_the_report() {
        let entry = EnvEntry::parse("SECRET_X=hunter2").expect("entry");
        assert_eq!(entry.redacted(), "SECRET_X=<redacted>");
        assert_eq!(EnvEntry::parse("KEY").expect("entry").redacted(), "KEY");
    }

    #[test]
    fn the_ssh_key_file_is_checked_unless_the_key_is_given() {
        let dir = tempfile::tempdir().expect("dir");
        let mut pairs = complete();
        pairs.retain(|(f, _)| *f != "vm-ssh-key");
        // The default path (a container's mount) is missing here.
        let err = args(&pairs).expect_err("no key");
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].var, "SM_VM_SSH_KEY_PATH");
        assert!(
            err.0[0]
                .message
                .starts_with("cannot read the SSH private key file /secrets/ssh/id_ed25519"),
            "{err}"
        );
        let public = dir.path().join("id.pub");
        std::fs::write(
            &public,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPrDGLMQkvA x\n",
        )
        .expect("w");
        let public = public.display().to_string();
        let mut with_public = pairs.clone();
        with_public.push(("vm-ssh-key-path", public.as_str()));
        let err = args(&with_public).expect_err("not a private key");
        assert!(err.0[0].message.contains("holds no private key"), "{err}");
        let key = dir.path().join("id");
        std::fs::write(&key, TEST_KEY).expect("w");
        let key = key.display().to_string();
        let mut with_key = pairs.clone();
        with_key.push(("vm-ssh-key-path", key.as_str()));
        assert_eq!(
            args(&with_key).expect("valid").vm.ssh_key_path,
            PathBuf::from(&key)
        );
        // With the key's content the file is not needed.
        pairs.push(("vm-ssh-key", TEST_KEY));
        args(&pairs).expect("valid");
    }

    #[test]
    fn placeholders_are_refused_without_repeating_the_value() {
        let mut pairs = complete();
        let placeholders = [
            ("mattermost-url", "https://REPLACE_ME"),
            ("mattermost-token", "REPLACE_ME"),
            ("opnsense-secret", "xREPLACE_MEx"),
            ("vm-known-hosts", "vm ssh-ed25519 REPLACE_ME"),
            ("mattermost-team-id", "CHANGE-ME"),
            ("vm-ssh-key-path", "REPLACE_ME"),
        ];
        pairs.retain(|(f, _)| !placeholders.iter().any(|(p, _)| p == f) && *f != "vm-ssh-key");
        pairs.extend(placeholders);
        let err = args(&pairs).expect_err("placeholders");
        let vars: Vec<&str> = err.0.iter().map(|p| p.var).collect();
        assert_eq!(
            vars,
            [
                "SM_MATTERMOST_URL",
                "SM_MATTERMOST_TOKEN",
                "SM_MATTERMOST_TEAM_ID",
                "SM_VM_SSH_KEY_PATH",
                "SM_VM_KNOWN_HOSTS",
                "SM_OPNSENSE_SECRET"
            ],
            "{err}"
        );
        for problem in &err.0 {
            assert_eq!(problem.message, PLACEHOLDER_PROBLEM, "{problem}");
        }
    }

    #[test]
    fn the_report_tells_dotenv_values_from_the_environment() {
        let argv: Vec<String> = ["session-manager", "config", "--vm-user=agent"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let matches = Cli::raw_command()
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(argv)
            .expect("matches");
        let mut report = ConfigReport::new(&matches);
        // As if SM_VM_HOST came from the environment and SM_VM_PORT from .env.
        for (env, _, source) in &mut report.entries {
            if env == "SM_VM_HOST" || env == "SM_VM_PORT" {
                *source = "env";
            }
        }
        let report = report.with_dotenv(&["SM_VM_PORT".to_owned(), "SM_VM_USER".to_owned()]);
        let source = |var: &str| {
            report
                .entries
                .iter()
                .find(|(env, _, _)| env == var)
                .map(|(_, _, source)| *source)
        };
        assert_eq!(source("SM_VM_HOST"), Some("env"));
        assert_eq!(source("SM_VM_PORT"), Some(".env"));
        assert_eq!(source("SM_VM_USER"), Some("flag"), "a flag wins over .env");
        assert_eq!(source("SM_SSH_TIMEOUT_SECS"), Some("default"));
    }

    #[test]
    fn debug_output_contains_no_secret() {
        let mut pairs = complete();
        pairs.push((
            "database-url",
            "postgres://sm:hunter2-db@db.internal:5432/sm",
        ));
        pairs.retain(|(f, _)| *f != "vm-ssh-key");
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
    fn the_command_lines_are_well_formed() {
        Cli::command().debug_assert();
        Cli::raw_command().debug_assert();
        Settings::augment_args(Command::new("settings")).debug_assert();
        for arg in setting_args() {
            assert!(env_name(arg).starts_with("SM_"), "{arg:?}");
            assert!(arg.get_long().is_some(), "{arg:?}");
        }
    }

    #[test]
    fn every_default_passes_its_own_parser() {
        let mut defaults = 0;
        for arg in setting_args() {
            for default in arg.get_default_values() {
                let default = default.to_str().expect("UTF-8");
                assert_eq!(default, default.trim());
                if let Err(message) = check(arg, default) {
                    panic!("{}: default {default:?}: {message}", env_name(arg));
                }
                defaults += 1;
            }
        }
        assert!(defaults > 0);
    }

    #[test]
    fn problems_from_every_group_are_reported_at_once_in_help_order() {
        let mut pairs = complete();
        pairs.retain(|(f, _)| {
            !matches!(
                *f,
                "callback-secret" | "vm-known-hosts" | "mattermost-team-id"
            )
        });
        pairs.extend([
            ("log-format", "xml"),
            ("mattermost-team-id", "short"),
            ("database-pool-size", "0"),
            ("vm-port", "0"),
            ("claude-command", "'"),
            ("auto-pull", "maybe"),
            ("bot-trigger", "a b"),
            ("opnsense-alias", "9"),
            ("callback-url", "x"),
            ("listen-addr", "x"),
        ]);
        let err = args(&pairs).expect_err("invalid");
        let vars: Vec<_> = err.0.iter().map(|p| p.var).collect();
        assert_eq!(
            vars,
            [
                "SM_MATTERMOST_TEAM_ID",
                "SM_VM_PORT",
                "SM_VM_KNOWN_HOSTS",
                "SM_CLAUDE_COMMAND",
                "SM_AUTO_PULL",
                "SM_BOT_TRIGGER",
                "SM_OPNSENSE_ALIAS",
                "SM_CALLBACK_SECRET",
                "SM_CALLBACK_URL",
                "SM_LISTEN_ADDR",
                "SM_DATABASE_POOL_SIZE",
                "SM_LOG_FORMAT",
            ]
        );
        assert!(err.0[2].message.starts_with("is required: "), "{err}");
        assert!(err.0[7].message.starts_with("is required: "), "{err}");
    }

    #[test]
    fn every_required_setting_says_what_is_needed_when_missing_or_blank() {
        let required: Vec<_> = setting_args()
            .iter()
            .filter(|arg| arg.is_required_set())
            .map(|arg| env_name(arg))
            .collect();
        assert_eq!(required, ["SM_VM_HOST", "SM_CALLBACK_SECRET"]);
        let blank: Vec<_> = setting_args()
            .iter()
            .filter(|arg| arg.is_required_set())
            .map(|arg| (arg.get_long().expect("long"), " "))
            .collect();
        // Mattermost's settings are required together, and when no other platform is set.
        let mattermost = [
            "SM_MATTERMOST_URL",
            "SM_MATTERMOST_TOKEN",
            "SM_MATTERMOST_TEAM_ID",
        ];
        for mut pairs in [Vec::new(), blank] {
            // No platform is one-machine mode: nothing at all is required (the VM is this
            // machine, nothing calls back, the console is the chat surface).
            let settings = args(&pairs).expect("one-machine mode");
            assert_eq!(settings.vm.host, "local");
            assert!(!settings.has_chat_platform());
            assert_eq!(settings.console_auth(), ConsoleAuth::Link);
            let mut with_chat = pairs.clone();
            with_chat.push(("mattermost-url", "https://chat.example.com"));
            let err = args(&with_chat).expect_err("nothing given");
            for var in &required {
                let problem = err.0.iter().find(|p| p.var == *var).expect(var);
                assert!(problem.message.starts_with("is required: "), "{problem}");
            }
            pairs.push(("console-auth", "off"));
            let err = args(&pairs).expect_err("nothing given");
            for var in &mattermost {
                let problem = err.0.iter().find(|p| p.var == *var).expect(var);
                assert!(problem.message.starts_with("is required: "), "{problem}");
            }
        }
    }

    #[test]
    fn a_blank_value_must_not_be_empty_when_there_is_a_default_unless_it_is_a_list() {
        let blank_is_a_value = [
            "SM_CONTAINER_ENV",
            "SM_PROJECTS",
            "SM_ALLOWED_USERS",
            "SM_ALLOWED_APPROVERS",
            "SM_ADMIN_USERS",
            "SM_ALLOWED_REPOS",
            "SM_TRUSTED_PROXIES",
            "SM_DENIED_DOMAINS",
            "SM_EGRESS_DNS_SERVERS",
            "SM_CONSOLE_TOKENS",
        ];
        for arg in setting_args() {
            if arg.get_default_values().is_empty() || arg.is_hide_default_value_set() {
                continue;
            }
            let var = env_name(arg);
            let mut pairs = complete();
            pairs.push((arg.get_long().expect("long"), " "));
            let result = args(&pairs);
            if blank_is_a_value.contains(&var) {
                assert!(result.is_ok(), "{var}: {result:?}");
            } else {
                let err = result.expect_err(var);
                assert_eq!(
                    err.0,
                    [ConfigProblem {
                        var,
                        message: "must not be empty".into()
                    }]
                );
            }
        }
        let mut pairs = complete();
        pairs.extend([("container-env", ""), ("projects", " ")]);
        let s = args(&pairs).expect("valid");
        assert!(s.container.env.is_empty());
        assert!(s.repos.projects.is_empty());
        assert!(!s.warnings.iter().any(|w| w.contains("SM_PROJECTS")));
    }

    #[test]
    fn a_blank_optional_value_is_unset() {
        let dir = tempfile::tempdir().expect("dir");
        let key = dir.path().join("id");
        std::fs::write(&key, TEST_KEY).expect("key file");
        let key = key.display().to_string();
        let mut pairs = complete();
        pairs.retain(|(f, _)| *f != "vm-ssh-key");
        pairs.extend([
            ("vm-ssh-key", " "),
            ("vm-ssh-key-path", key.as_str()),
            ("default-org", ""),
            ("database-url", " "),
        ]);
        let s = args(&pairs).expect("valid");
        assert!(s.vm.ssh_key.is_none());
        assert_eq!(s.repos.default_org, None);
        assert_eq!(s.database.url.expose(), DEFAULT_DATABASE_URL);
        assert!(s.database.is_default);
        pairs.retain(|(f, _)| *f != "vm-known-hosts");
        pairs.push(("vm-known-hosts", "  "));
        let err = args(&pairs).expect_err("blank host key");
        assert_eq!(err.0.len(), 1);
        assert_eq!(err.0[0].var, "SM_VM_KNOWN_HOSTS");
        assert!(err.0[0].message.starts_with("is required: "));
    }

    #[test]
    fn values_are_trimmed_and_a_bad_host_key_is_not_also_missing() {
        let mut pairs = complete();
        pairs.extend([("vm-port", " 2222 "), ("default-org", " acme ")]);
        let s = args(&pairs).expect("valid");
        assert_eq!(s.vm.port, 2222);
        assert_eq!(s.repos.default_org.as_deref(), Some("acme"));
        pairs.retain(|(f, _)| *f != "vm-known-hosts");
        pairs.push(("vm-known-hosts", "/nonexistent/known_hosts"));
        let err = args(&pairs).expect_err("unreadable");
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].message.contains("cannot read"), "{err}");
    }

    #[test]
    fn the_reference_hides_the_embedded_default_and_lists_every_setting() {
        let docs = setting_docs();
        assert_eq!(docs.len(), setting_args().len());
        let db = docs
            .iter()
            .find(|d| d.env == "SM_DATABASE_URL")
            .expect("database");
        assert_eq!(db.default, None);
        assert!(db.secret);
        let markdown = markdown_reference();
        assert!(markdown.contains("| `SM_DATABASE_URL` | `--database-url` | (none) |"));
        assert!(markdown.contains("| `SM_ALLOWED_USERS` | `--allowed-users` | (empty) |"));
    }

    fn teams_only() -> Vec<(&'static str, &'static str)> {
        let mut pairs = complete();
        pairs.retain(|(f, _)| !f.starts_with("mattermost-"));
        pairs.extend([
            ("teams-app-id", "8E9F0A1B-2C3D-4E5F-8A9B-0C1D2E3F4A5B"),
            ("teams-app-password", "s3cr3t-teams"),
        ]);
        pairs
    }

    #[test]
    fn teams_alone_needs_no_mattermost_settings() {
        let s = args(&teams_only()).expect("Teams alone is enough");
        assert!(s.mattermost.is_none());
        assert!(s.teams.enabled());
        assert_eq!(
            s.teams.app_id.as_deref(),
            Some("8e9f0a1b-2c3d-4e5f-8a9b-0c1d2e3f4a5b")
        );
        assert_eq!(
            s.teams.openid_metadata_url.as_str(),
            BOT_FRAMEWORK_OPENID_METADATA_URL
        );
        assert_eq!(
            s.teams.token_endpoint().as_str(),
            "https://login.microsoftonline.com/botframework.com/oauth2/v2.0/token"
        );
        assert!(!format!("{s:?}").contains("s3cr3t-teams"), "secret");
        let mut pairs = teams_only();
        pairs.push(("teams-tenant-id", "0d9b645f-1c2e-4b5a-9d3c-2f1e0a9b8c7d"));
        assert_eq!(
            args(&pairs).expect("valid").teams.token_endpoint().as_str(),
            "https://login.microsoftonline.com/0d9b645f-1c2e-4b5a-9d3c-2f1e0a9b8c7d/oauth2/v2.0/token"
        );
        pairs.push(("teams-token-url", "http://127.0.0.1:9/token"));
        assert_eq!(
            args(&pairs).expect("valid").teams.token_endpoint().as_str(),
            "http://127.0.0.1:9/token"
        );
    }

    #[test]
    fn both_platforms_can_be_configured_and_mattermost_alone_is_unchanged() {
        let mut pairs = complete();
        pairs.extend(
            teams_only()
                .into_iter()
                .filter(|(f, _)| f.starts_with("teams-")),
        );
        let s = args(&pairs).expect("both");
        assert!(s.mattermost.is_some() && s.teams.enabled());
        let s = args(&complete()).expect("Mattermost alone");
        let mattermost = s.mattermost.expect("configured");
        assert_eq!(mattermost.team_id, "abcdefghijklmnopqrstuvwxyz");
        assert!(!s.teams.enabled());
    }

    #[test]
    fn teams_and_mattermost_settings_are_required_together() {
        // A Teams app id needs its password.
        let mut pairs = teams_only();
        pairs.retain(|(f, _)| *f != "teams-app-password");
        let err = args(&pairs).expect_err("no password");
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].var, "SM_TEAMS_APP_PASSWORD");
        assert!(err.0[0].message.starts_with("is required: "));
        // Teams settings without the app id name what is missing.
        let mut pairs = complete();
        pairs.push(("teams-tenant-id", "contoso.onmicrosoft.com"));
        let err = args(&pairs).expect_err("no app id");
        assert_eq!(err.0[0].var, "SM_TEAMS_APP_ID");
        assert!(err.0[0].message.contains("SM_TEAMS_TENANT_ID"), "{err}");
        // One Mattermost setting next to Teams asks for the other two.
        let mut pairs = teams_only();
        pairs.push(("mattermost-url", "https://chat.example.com"));
        let err = args(&pairs).expect_err("half Mattermost");
        let vars: Vec<_> = err.0.iter().map(|p| p.var).collect();
        assert_eq!(vars, ["SM_MATTERMOST_TOKEN", "SM_MATTERMOST_TEAM_ID"]);
        // Malformed Teams values.
        for (flag, value, var) in [
            ("teams-app-id", "not-a-guid", "SM_TEAMS_APP_ID"),
            ("teams-tenant-id", "no spaces", "SM_TEAMS_TENANT_ID"),
            ("teams-token-url", "ftp://x", "SM_TEAMS_TOKEN_URL"),
            (
                "teams-openid-metadata-url",
                "nope",
                "SM_TEAMS_OPENID_METADATA_URL",
            ),
            ("teams-app-password", "a b", "SM_TEAMS_APP_PASSWORD"),
        ] {
            let mut pairs = teams_only();
            pairs.retain(|(f, _)| *f != flag);
            pairs.push((flag, value));
            let err = args(&pairs).expect_err(flag);
            assert_eq!(err.0.len(), 1, "{flag}: {err}");
            assert_eq!(err.0[0].var, var);
        }
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
