//! # session-manager
//!
//! Lets a team drive Claude Code from chat: `@claude start org/repo` in a Mattermost (or Teams)
//! channel opens a thread, the bot starts Claude Code in a devcontainer on a VM over SSH, and
//! the thread becomes the conversation. Egress from the container is blocked by an OPNsense
//! firewall; the agent asks for a domain with `[NETWORK_REQUEST: domain]` and a person approves
//! or denies it with HMAC-signed buttons.
//!
//! ## Data path
//!
//! ```text
//! chat ──events──▶ chat adapter ──ChatEvent──▶ dispatcher ──▶ command | session input
//!                                                                        │
//! chat ◀──posts── renderer ◀──agent events / markers── agent ◀──stdio── session actor
//!                                   │                  (claude in a devcontainer, over SSH)
//!                        approvals / orchestrator ──▶ firewall (OPNsense), storage
//! ```
//!
//! ## Layout
//!
//! - [`access`]: who may do what: session owners, participants, admins, allowed users.
//! - [`chat`]: the platform-neutral chat interface, the Mattermost adapter and output
//!   rendering.
//! - [`command`]: the in-chat command grammar (`start org/repo`, `stop`, …) as typed commands.
//! - [`approval`]: network requests from agents → signed Approve/Deny cards → the firewall.
//! - [`agent`]: what the agent prints: the control-marker scanner.
//! - [`firewall`]: domain validation before anything reaches OPNsense.
//! - [`dispatch`]: routing of chat messages to commands and sessions, one ordered worker per
//!   thread ([`workers`]).
//! - [`config`]: one validated [`config::Settings`] from `SM_*` variables and flags (clap).
//! - [`store`]: storage API over PostgreSQL or embedded SQLite (sqlx), migrations in `sql/`.
//! - [`http`]: axum server: `/health`, `/metrics`, `/callback`, per-client rate limiting.
//! - [`runtime`]: the VM side: quoted remote scripts and the multiplexed SSH pool.
//! - [`session`]: the session API and runtime: one actor per session owning its agent, the
//!   one way to start a session, lifecycle, cleanup, recovery after a restart, and markers as
//!   events.
//! - [`orchestrator`]: orchestrator sessions spawning workers and reviewers through markers.
//! - [`leader`]: only one instance acts at a time (a PostgreSQL advisory lock); others stand by.
//! - [`health`]: component health registry that `/health` reports.
//! - [`telemetry`]: tracing setup and the Prometheus metrics recorder.
//! - [`text`]: character properties shared by everything that shows untrusted text.
//! - [`workers`]: one ordered worker per key (threads for the dispatcher, sessions for the
//!   marker router).
//! - `main.rs`: parses the command line and calls [`serve`] or [`migrate`].
//!
//! `docs/architecture.md` draws the module map and the task tree (who spawns and who awaits
//! what).
//!
//! Outside `src/`: `sql/` (migrations per backend), `tests/` (integration tests and their
//! fakes in `tests/support/`), `scripts/test` (the whole test suite), `deploy/k8s/` and
//! `devcontainer/`.

#![warn(missing_docs)]

pub mod access;
pub mod agent;
pub mod approval;
pub mod budget;
pub mod chat;
pub mod command;
pub mod config;
pub mod console;
pub mod dispatch;
pub mod firewall;
pub mod health;
pub mod http;
pub mod leader;
pub mod orchestrator;
pub mod permission;
pub mod profile;
pub mod runtime;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod workers;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::access::{Access, Roles};
use crate::approval::{ApprovalConfig, Approvals, Approvers, GatedAliasWriter};
use crate::budget::{BudgetConfig, Budgets};
use crate::chat::mattermost::adapter::{MattermostAdapter, MattermostConfig};
use crate::chat::mattermost::rest::RetryPolicy;
use crate::chat::mattermost::websocket::WsSettings;
use crate::chat::router::ChatRouter;
use crate::chat::teams::{TeamsAdapter, TeamsConfig};
use crate::chat::CardClickHandler;
use crate::chat::ChatEvent;
use crate::chat::{ChatOutbound, ClickHandlers, GatedClicks};
use crate::config::Settings;
use crate::dispatch::{DispatchConfig, Dispatcher};
use crate::firewall::opnsense::OpnsenseClient;
use crate::firewall::policy::EgressPolicy;
use crate::health::HealthRegistry;
use crate::http::ratelimit::ClientRateLimiter;
use crate::http::AppState;
use crate::leader::{Gate, Role};
use crate::orchestrator::{Orchestrator, OrchestratorConfig};
use crate::permission::{ClickRouter, PermissionConfig, Permissions};
use crate::profile::ProfileBook;
use crate::runtime::devcontainer::ContainerLayout;
use crate::runtime::git::GitLayout;
use crate::runtime::shell::Script;
use crate::runtime::ssh::{HostKeyPolicy, SshConfig, SshKey, SshPool};
use crate::session::{MarkerHandlers, RuntimeConfig, SessionRuntime};
use crate::store::Store;
use crate::telemetry::{names, Metrics};

/// How long a shutdown waits for the sessions' actors (and cleanups under way) to finish.
/// The Kubernetes deployment gives the pod 60 s (`terminationGracePeriodSeconds`).
pub const SESSION_GRACE: Duration = Duration::from_secs(20);
/// How long a shutdown waits for every task `serve` started, the sessions included; what is
/// still running then is aborted.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(40);
/// Markers the agents' actors may hand over before the router takes them.
const MARKER_QUEUE: usize = 256;

/// How often external endpoints are probed for `/health`.
const REACHABILITY_INTERVAL: Duration = Duration::from_secs(15);
/// How often old de-duplication records of inbound posts are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// How long inbound posts are remembered for de-duplication (each channel's newest is kept
/// regardless: it is the catch-up cursor).
const INBOUND_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The name of one-machine mode's callback key in [`Store::instance_key`].
const CALLBACK_SECRET_KEY: &str = "callback_secret";

/// How often idle rate-limit buckets are dropped and metrics upkeep runs.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(10);

/// Opens storage and applies migrations, announcing which database is used.
///
/// # Errors
/// When the database cannot be opened or a migration fails.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let db = &settings.database;
    if db.is_default {
        let path = db
            .url
            .sqlite_path()
            .map(|p| std::path::absolute(&p).unwrap_or(p))
            .unwrap_or_default();
        info!(path = %path.display(), "SM_DATABASE_URL is not set: using the embedded SQLite database (created if missing)");
    } else {
        info!(url = %db.url, "using the database from SM_DATABASE_URL");
    }
    let store = Store::connect(db)
        .await
        .with_context(|| format!("cannot open the database {}", db.url))?;
    store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    info!(system = "database", backend = ?store.backend(), "database: reached, migrations applied");
    Ok(store)
}

/// `session-manager migrate`: applies the migrations and returns.
///
/// # Errors
/// As [`open_store`].
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    info!(backend = ?store.backend(), "migrations applied");
    store.close().await;
    Ok(())
}

/// Runs the bot on `listener` until `shutdown` is cancelled, then stops every task it started
/// and returns. Tests call this with a listener on port 0.
///
/// # Errors
/// When storage cannot be opened or the HTTP server fails.
pub async fn serve(
    mut settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::get();
    for warning in &settings.warnings {
        warn!("{warning}");
    }
    let store = open_store(&settings).await?;
    if settings.callback.secret_made {
        // One-machine mode without SM_CALLBACK_SECRET: the key of the first start, kept in the
        // database, so cards signed before a restart can still be answered after it.
        let made = settings.callback.secret.expose_secret().to_owned();
        let kept = store
            .instance_key(CALLBACK_SECRET_KEY, &made)
            .await
            .context("cannot read or keep the callback key in the database")?;
        settings.callback.secret = SecretString::from(kept);
    }
    let mut tasks = JoinSet::new();
    let (role_tx, role) = watch::channel(Role::Standby);
    tasks.spawn(leader::run(
        settings.database.url.clone(),
        role_tx,
        shutdown.clone(),
    ));

    let health = HealthRegistry::new();
    let limiter = Arc::new(ClientRateLimiter::new(
        NonZeroU32::new(settings.http.rate_limit_rps).unwrap_or(NonZeroU32::MIN),
        NonZeroU32::new(settings.http.rate_limit_burst).unwrap_or(NonZeroU32::MIN),
        settings.http.trusted_proxies.clone(),
    ));
    if settings.http.trusted_proxies.is_empty() {
        info!("SM_TRUSTED_PROXIES is empty: X-Forwarded-For is ignored and the socket peer is the client");
    }

    {
        let limiter = Arc::clone(&limiter);
        let cancel = shutdown.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(MAINTENANCE_INTERVAL) => {}
                }
                let clients = limiter.sweep();
                metrics::gauge!(names::RATE_LIMITER_CLIENTS).set(clients as f64);
                metrics.upkeep();
            }
        });
    }

    {
        let store = store.clone();
        let cancel = shutdown.clone();
        let console_retention = settings.http.console_retention;
        tasks.spawn(async move {
            let ago = |age: Duration| {
                store::now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX / 2)
            };
            loop {
                match store.prune_inbound_posts(ago(INBOUND_RETENTION)).await {
                    Ok(0) => {}
                    Ok(n) => info!(pruned = n, "forgot old inbound-post records"),
                    Err(e) => warn!(error = %e, "cannot prune inbound-post records"),
                }
                let ended_before = (!console_retention.is_zero()).then(|| ago(console_retention));
                match store.prune_transcript(ended_before).await {
                    Ok(0) => {}
                    Ok(n) => info!(pruned = n, "forgot console transcript events no page needs"),
                    Err(e) => warn!(error = %e, "cannot prune the console transcript"),
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(PRUNE_INTERVAL) => {}
                }
            }
        });
    }
    let ssh = Arc::new(ssh_pool(&settings).context("cannot prepare SSH to the VM")?);
    let firewall: Arc<dyn approval::AliasWriter> = if settings.firewall.enabled() {
        let client = Arc::new(
            OpnsenseClient::new(&settings.firewall)
                .context("cannot prepare the OPNsense client")?,
        );
        tasks.spawn(firewall_health_loop(
            Arc::clone(&client),
            health.clone(),
            shutdown.clone(),
        ));
        client
    } else {
        warn!(system = "firewall", "no firewall is configured (SM_OPNSENSE_URL): network requests are asked and decided, but nothing enforces the decisions");
        Arc::new(approval::Unenforced::default())
    };
    let clicks = ClickHandlers::new();
    // Every thread's record, which the web console replays and follows.
    let transcript = console::Transcript::new(store.clone());
    let console = console_of(&settings, &store, &transcript, &clicks, &shutdown);
    // Teams posts activities to this bot's HTTP server: its adapter and route exist from the
    // start; the dispatcher reads the queued events once this instance is active.
    let teams = match TeamsConfig::from_settings(&settings.teams, &settings.chat.bot_trigger) {
        None => None,
        Some(config) => {
            let adapter = Arc::new(
                TeamsAdapter::connect(config, store.clone())
                    .await
                    .context("cannot prepare the Microsoft Teams adapter")?,
            );
            let (events_tx, events_rx) = mpsc::channel(256);
            let routes =
                chat::teams::routes(Arc::clone(&adapter), events_tx.clone(), clicks.clone());
            info!(path = chat::teams::MESSAGES_PATH, "serving Microsoft Teams");
            // Teams only calls in, so its start line is about the way out: whether the token
            // endpoint gives the bot a Connector token (like the VM and firewall probes, on a
            // standby too; nothing is posted).
            let (probe, endpoint) = (Arc::clone(&adapter), settings.teams.token_endpoint());
            let cancel = shutdown.clone();
            tasks.spawn(async move {
                let mut reach = Reachability::new("Microsoft Teams");
                tokio::select! {
                    () = cancel.cancelled() => {}
                    checked = probe.connector().check_token() => {
                        reach.report(match checked {
                            Ok(()) => Ok(format!("the token endpoint {endpoint} issued a token")),
                            Err(e) => Err(format!("{endpoint}: {e}")),
                        });
                    }
                }
            });
            Some((adapter, events_rx, routes, events_tx))
        }
    };
    let (teams, teams_routes) = match teams {
        Some((adapter, events, routes, inbox)) => (Some((adapter, events, inbox)), Some(routes)),
        None => (None, None),
    };
    tasks.spawn(vm_health_loop(
        Arc::clone(&ssh),
        health.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(run_chat(
        settings.clone(),
        Shared {
            store: store.clone(),
            ssh: Arc::clone(&ssh),
            firewall: Arc::clone(&firewall),
            clicks: clicks.clone(),
            health: health.clone(),
            teams,
            transcript: Arc::clone(&transcript),
            console: console.clone(),
        },
        role.clone(),
        shutdown.clone(),
    ));
    if let Some(console) = &console {
        announce_console(&settings, console, &listeners);
    }

    let state = AppState {
        store: store.clone(),
        health,
        limiter,
        metrics,
        role,
        clicks,
        console,
    };
    let server = match listeners.callback {
        None => {
            serve_http(
                listeners.main,
                http::router_with(state, teams_routes),
                "HTTP server",
                &shutdown,
            )
            .await
        }
        Some(callback) => {
            let (ops, chat) = tokio::join!(
                serve_http(
                    listeners.main,
                    http::operations_router(state.clone()),
                    "/health, /metrics",
                    &shutdown
                ),
                serve_http(
                    callback,
                    http::chat_router_with(state, teams_routes),
                    "/callback and /api/messages",
                    &shutdown
                ),
            );
            ops.and(chat)
        }
    };

    shutdown.cancel();
    let joined = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                error!(error = %e, "background task failed");
            }
        }
    })
    .await;
    if joined.is_err() {
        warn!(
            left = tasks.len(),
            "tasks still running after the shutdown grace period are aborted"
        );
        tasks.shutdown().await;
    }
    // The ssh master processes are daemonized: close them, or they outlive the bot.
    ssh.close().await;
    store.close().await;
    info!("stopped");
    server
}

/// Where [`serve`] answers HTTP: one listener for everything, or chat servers' requests on a
/// listener of their own (`SM_CALLBACK_LISTEN_ADDR`).
#[derive(Debug)]
pub struct Listeners {
    /// `/health` and `/metrics`, and `/callback` when `callback` is `None`.
    pub main: TcpListener,
    /// `/callback` alone.
    pub callback: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(main: TcpListener) -> Self {
        Self {
            main,
            callback: None,
        }
    }
}

/// Serves `app` on `listener` until `shutdown`; a failure cancels `shutdown` so the rest stops.
async fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    what: &'static str,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener has no address")?;
    info!(%addr, routes = what, "HTTP server listening");
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
    .await;
    if served.is_err() {
        shutdown.cancel();
    }
    served.with_context(|| format!("the HTTP server for {what} on {addr} failed"))
}

/// What `serve` shares with the chat side.
struct Shared {
    store: Store,
    ssh: Arc<SshPool>,
    firewall: Arc<dyn approval::AliasWriter>,
    clicks: ClickHandlers,
    health: HealthRegistry,
    /// The Teams adapter, the events its `/api/messages` route queues and a sender into that
    /// queue (the console's messages for Teams sessions), when Teams is on.
    teams: Option<(
        Arc<TeamsAdapter>,
        mpsc::Receiver<ChatEvent>,
        mpsc::Sender<ChatEvent>,
    )>,
    /// Every thread's record.
    transcript: Arc<console::Transcript>,
    /// The web console, when it is on.
    console: Option<console::Console>,
}

/// Runs the chat side for every term this instance is active: waits until it is, then runs
/// [`active_term`] until shutdown or until the instance becomes a standby (another one took
/// over while it was suspended), and waits again. While it is only suspended the term goes on,
/// acting on nothing (see [`leader::Gate`]).
async fn run_chat(
    settings: Settings,
    shared: Shared,
    mut role: tokio::sync::watch::Receiver<Role>,
    cancel: CancellationToken,
) {
    let Shared {
        store,
        ssh,
        firewall,
        clicks,
        health,
        teams,
        transcript,
        console,
    } = shared;
    let (teams, mut teams_events, teams_inbox) = match teams {
        Some((adapter, events, inbox)) => (Some(adapter), Some(events), Some(inbox)),
        None => (None, None, None),
    };
    let gate = Gate::new(role.clone());
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            active = role.wait_for(|r| *r == Role::Active) => if active.is_err() { break },
        }
        let term = cancel.child_token();
        let standing_by = {
            let (mut role, term) = (role.clone(), term.clone());
            tokio::spawn(async move {
                if role.wait_for(|r| *r == Role::Standby).await.is_ok() {
                    term.cancel();
                }
            })
        };
        teams_events = active_term(
            &settings,
            Term {
                store: store.clone(),
                ssh: Arc::clone(&ssh),
                firewall: Arc::clone(&firewall),
                clicks: clicks.clone(),
                health: health.clone(),
                teams: teams.clone(),
                teams_inbox: teams_inbox.clone(),
                gate: gate.clone(),
                transcript: Arc::clone(&transcript),
                console: console.clone(),
            },
            teams_events,
            term,
        )
        .await;
        if let Some(console) = &console {
            console.set_live(None);
        }
        standing_by.abort();
        let _ = standing_by.await;
        clicks.clear();
        if cancel.is_cancelled() {
            break;
        }
        warn!("this instance is a standby now: its sessions were let go to the active instance");
    }
    if let Some(adapter) = &teams {
        adapter.close().await;
    }
}

/// What one active term works with.
struct Term {
    store: Store,
    ssh: Arc<SshPool>,
    firewall: Arc<dyn approval::AliasWriter>,
    clicks: ClickHandlers,
    health: HealthRegistry,
    teams: Option<Arc<TeamsAdapter>>,
    /// A sender into the Teams dispatcher's queue (the console's messages).
    teams_inbox: Option<mpsc::Sender<ChatEvent>>,
    gate: Gate,
    transcript: Arc<console::Transcript>,
    console: Option<console::Console>,
}

/// One term as the active instance: connects to Mattermost (retrying with backoff while it is
/// unreachable, so the rest of the bot keeps serving), resolves `SM_ALLOWED_USERS`, then runs
/// adapters, dispatchers and sessions until `cancel` fires. Returns the Teams event queue,
/// which outlives the term (the `/api/messages` route feeds it).
async fn active_term(
    settings: &Settings,
    term: Term,
    teams_events: Option<mpsc::Receiver<ChatEvent>>,
    cancel: CancellationToken,
) -> Option<mpsc::Receiver<ChatEvent>> {
    let Term {
        store,
        ssh,
        firewall,
        clicks,
        health,
        teams,
        teams_inbox,
        gate,
        transcript,
        console,
    } = term;
    let settings = settings.clone();
    let mattermost = match settings.mattermost.as_ref() {
        None => None,
        Some(mattermost) => {
            match connect_mattermost(&settings, mattermost, &store, &health, &cancel).await {
                Some(adapter) => Some(adapter),
                None => return teams_events, // shutting down
            }
        }
    };
    // With the console on, every post, edit and card on a platform, and every message in a
    // session thread, is recorded for it (and nothing is, with the console off).
    let recording = console.as_ref().map(|_| Arc::clone(&transcript));
    let recorded = |adapter: Arc<dyn ChatOutbound>| -> Arc<dyn ChatOutbound> {
        match &recording {
            Some(transcript) => console::Recording::new(adapter, Arc::clone(transcript)),
            None => adapter,
        }
    };
    let observed = |dispatcher: Dispatcher| match &recording {
        Some(transcript) => dispatcher.with_transcript(Arc::clone(transcript)),
        None => dispatcher,
    };
    let mattermost_out = mattermost
        .clone()
        .map(|a| recorded(a as Arc<dyn ChatOutbound>));
    let teams_out = teams.clone().map(|a| recorded(a as Arc<dyn ChatOutbound>));
    let console_out = console
        .as_ref()
        .map(|_| console::ConsoleChat::new(Arc::clone(&transcript)) as Arc<dyn ChatOutbound>);
    let Some(chat) = ChatRouter::with_console(
        mattermost_out.clone(),
        teams_out.clone(),
        console_out.clone(),
    )
    .map(|chat| chat.with_gate(gate.clone())) else {
        error!("no chat platform is configured (SM_MATTERMOST_URL or SM_TEAMS_APP_ID) and the console is off: the chat side is off");
        return teams_events;
    };
    let platforms: Vec<Arc<dyn ChatOutbound>> = [
        mattermost_out.clone(),
        teams_out.clone(),
        console_out.clone(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let users = match resolve_users(&platforms, "SM_ALLOWED_USERS", &settings.chat.allowed_users)
        .await
    {
        None => {
            warn!("SM_ALLOWED_USERS is empty: every member of a channel the bot serves may start sessions");
            Access::Everyone
        }
        Some(ids) => Access::Only(ids),
    };
    let admins = resolve_users(&platforms, "SM_ADMIN_USERS", &settings.chat.admin_users)
        .await
        .unwrap_or_default();
    let roles = Roles { users, admins };
    // Who may pick each profile, resolved like the other user lists (fewer, never more).
    let mut pickers = std::collections::HashMap::new();
    for profile in settings.profiles.iter() {
        if let Some(ids) = resolve_users(&platforms, "SM_PROFILES_FILE users", &profile.users).await
        {
            pickers.insert(profile.name.clone(), Access::Only(ids));
        }
    }
    let profiles = Arc::new(ProfileBook::new(settings.profiles.clone(), pickers));
    let approvers = match resolve_users(
        &platforms,
        "SM_ALLOWED_APPROVERS",
        &settings.chat.allowed_approvers,
    )
    .await
    {
        None => {
            info!("SM_ALLOWED_APPROVERS is empty: a session's owner and the admins decide its network requests");
            Approvers::OwnerAndAdmins
        }
        Some(ids) => Approvers::Only(ids),
    };
    let egress_policy = match EgressPolicy::new(
        settings.egress.denied_domains.clone(),
        settings.egress.refuse_private,
        &settings.egress.dns_servers,
    ) {
        Ok(policy) => policy,
        Err(e) => {
            warn!(error = %e, "the private-address check of network requests is off");
            EgressPolicy::new(settings.egress.denied_domains.clone(), false, &[])
                .unwrap_or_else(|_| EgressPolicy::allow_all())
        }
    };
    let allowlist = settings.repo_allowlist();
    // What this deployment's containers are labelled with (the reconciler leaves other
    // deployments' containers on the same VM user alone).
    let deployment = loop {
        match store.deployment_id().await {
            Ok(id) => break id,
            Err(e) => {
                warn!(error = %e, "cannot read this deployment's id; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return teams_events,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let limits = session::SessionLimits {
        per_user: settings.container.max_sessions_per_user,
        total: settings.container.max_sessions,
    };
    // Ownership is a tree: the runtime knows only where markers go; the approval flow, the
    // orchestrator and the marker router hold the runtime.
    let (markers_tx, markers_rx) = mpsc::channel(MARKER_QUEUE);
    let (permissions_tx, permissions_rx) = mpsc::channel(MARKER_QUEUE);
    let (budgets_tx, budgets_rx) = mpsc::channel(MARKER_QUEUE);
    let runtime = SessionRuntime::new(
        Arc::clone(&ssh),
        store.clone(),
        Arc::new(chat.clone()),
        runtime_config(&settings, &deployment),
        session::Outlets {
            markers: markers_tx,
            permissions: permissions_tx,
            budgets: budgets_tx,
        },
        gate.clone(),
    );
    let approvals = Approvals::new(
        store.clone(),
        Arc::new(chat.clone()),
        Arc::new(GatedAliasWriter::new(firewall, gate.clone())),
        Arc::new(runtime.clone()),
        ApprovalConfig {
            callback_url: settings.callback.url.to_string(),
            secret: settings.callback.secret.clone(),
            ttl: settings.callback.approval_ttl,
            approvers,
            alias: settings.firewall.alias.clone(),
            lease: settings.firewall.lease,
            admins: roles.admins.clone(),
            grant_ttl: settings.egress.grant_ttl,
            separate_approver: settings.egress.separate_approver,
            max_pending: settings.egress.max_pending,
            policy: Arc::new(egress_policy),
        },
    );
    let repo_host = settings
        .repos
        .git_base_url
        .host_str()
        .unwrap_or("local")
        .to_owned();
    let orchestrator = Arc::new(Orchestrator::new(
        store.clone(),
        chat.clone(),
        runtime.clone(),
        OrchestratorConfig {
            max_children: settings.container.max_child_sessions,
            git: runtime_config(&settings, &deployment).git,
            default_org: settings.repos.default_org.clone(),
            repo_host: repo_host.clone(),
            allowlist: allowlist.clone(),
            limits,
            profiles: Arc::clone(&profiles),
            roles: roles.clone(),
        },
    ));
    let markers_stop = CancellationToken::new();
    let router = tokio::spawn(session::markers::route(
        markers_rx,
        MarkerHandlers {
            network: approvals.clone(),
            orchestrator,
        },
        runtime.clone(),
        markers_stop.clone(),
    ));
    let workers = {
        let (approvals, cancel) = (Arc::clone(&approvals), cancel.clone());
        tokio::spawn(async move { approvals.run_workers(cancel).await })
    };
    let reconciler = tokio::spawn(session::reconcile::run(
        Arc::clone(&ssh),
        store.clone(),
        session::reconcile::ReconcileConfig {
            containers: runtime_config(&settings, &deployment).containers,
            interval: settings.container.reconcile_interval,
            grace: settings.container.reconcile_grace,
            gate: gate.clone(),
        },
        cancel.clone(),
    ));
    // Tool-permission questions: cards in the session's thread, answered by its people.
    let permissions = Permissions::new(
        store.clone(),
        Arc::new(chat.clone()),
        Arc::new(runtime.clone()),
        PermissionConfig {
            callback_url: settings.callback.url.to_string(),
            secret: settings.callback.secret.clone(),
            timeout: settings.container.permission_timeout,
            roles: roles.clone(),
        },
    );
    let permission_flow =
        tokio::spawn(Arc::clone(&permissions).run(permissions_rx, cancel.clone()));
    // Spending caps: a card to the owner when a budget is spent.
    let budgets = Budgets::new(
        store.clone(),
        Arc::new(chat.clone()),
        Arc::new(runtime.clone()),
        BudgetConfig {
            limits: settings.container.budgets(),
            callback_url: settings.callback.url.to_string(),
            secret: settings.callback.secret.clone(),
            roles: roles.clone(),
        },
    );
    let budget_flow = tokio::spawn(Arc::clone(&budgets).run(budgets_rx, cancel.clone()));
    let clicked: Arc<dyn CardClickHandler> = Arc::new(GatedClicks::new(
        Arc::new(ClickRouter {
            other: approvals,
            kinds: vec![
                (
                    permission::CARD_KIND,
                    permissions as Arc<dyn CardClickHandler>,
                ),
                (budget::CARD_KIND, budgets as Arc<dyn CardClickHandler>),
            ],
        }),
        gate.clone(),
    ));
    clicks.set(match &recording {
        Some(transcript) => Arc::new(console::RecordingClicks::new(
            clicked,
            Arc::clone(transcript),
        )),
        None => clicked,
    });
    runtime.recover().await;
    // One dispatcher per platform, over the one session runtime: a thread is found on the
    // platform its message came from.
    let config = DispatchConfig {
        trigger: settings.chat.bot_trigger.clone(),
        default_org: settings.repos.default_org.clone(),
        repo_host,
        roles: roles.clone(),
        allowlist,
        limits,
        permission_mode: settings.container.agent_command().1,
        budgets: settings.container.budgets(),
        profiles,
    };
    let sessions: Arc<dyn session::SessionControl> = Arc::new(runtime.clone());
    let mut chat_tasks = JoinSet::new();
    let mut inboxes = std::collections::HashMap::new();
    if let (Some(adapter), Some(out)) = (&mattermost, &mattermost_out) {
        let dispatcher = Dispatcher::new(
            Arc::clone(out),
            store.clone(),
            Arc::clone(&sessions),
            config.clone(),
        )
        .with_gate(gate.clone());
        let dispatcher = observed(dispatcher);
        let (events_tx, events_rx) = mpsc::channel(256);
        inboxes.insert(store::Platform::Mattermost, events_tx.clone());
        chat_tasks.spawn(Arc::clone(adapter).run(events_tx, health.clone(), cancel.clone()));
        let cancel = cancel.clone();
        chat_tasks.spawn(async move {
            dispatcher.run(events_rx, cancel).await;
        });
    }
    if let (Some(out), Some(console)) = (&console_out, &console) {
        let dispatcher = Dispatcher::new(
            Arc::clone(out),
            store.clone(),
            Arc::clone(&sessions),
            config.clone(),
        )
        .with_gate(gate.clone());
        let dispatcher = observed(dispatcher);
        let (events_tx, events_rx) = mpsc::channel(256);
        inboxes.insert(store::Platform::Console, events_tx);
        if let Some(inbox) = &teams_inbox {
            inboxes.insert(store::Platform::Teams, inbox.clone());
        }
        console.set_live(Some(Arc::new(console::Live {
            chat: chat.clone(),
            roles: roles.clone(),
            inboxes: std::mem::take(&mut inboxes),
            profiles: Arc::clone(&config.profiles),
            trigger: settings.chat.bot_trigger.clone(),
        })));
        let cancel = cancel.clone();
        chat_tasks.spawn(async move {
            dispatcher.run(events_rx, cancel).await;
        });
    }
    let mut teams_dispatcher = None;
    if let (Some(adapter), Some(events)) = (&teams, teams_events) {
        health.register("teams");
        health.report(
            "teams",
            health::ComponentStatus::Up,
            Some(format!("serving {}", chat::teams::MESSAGES_PATH)),
        );
        let dispatcher = Dispatcher::new(
            teams_out.clone().unwrap_or_else(|| adapter.clone()),
            store.clone(),
            Arc::clone(&sessions),
            config.clone(),
        )
        .with_gate(gate.clone());
        let dispatcher = observed(dispatcher);
        teams_dispatcher = Some(tokio::spawn(dispatcher.run(events, cancel.clone())));
    }
    while let Some(done) = chat_tasks.join_next().await {
        if let Err(e) = done {
            error!(error = %e, "a chat task failed");
        }
    }
    let teams_events = match teams_dispatcher {
        Some(task) => match task.await {
            Ok(events) => Some(events),
            Err(e) => {
                error!(error = %e, "the Teams dispatcher failed");
                None
            }
        },
        None => None,
    };
    runtime.detach_all(SESSION_GRACE).await;
    markers_stop.cancel();
    let _ = router.await;
    let _ = workers.await;
    let _ = permission_flow.await;
    let _ = budget_flow.await;
    let _ = reconciler.await;
    teams_events
}

/// Connects to Mattermost, retrying with backoff (reported on `/health` as component
/// `mattermost`) while it is unreachable; `None` when `cancel` fires first.
async fn connect_mattermost(
    settings: &Settings,
    mattermost: &config::MattermostSettings,
    store: &Store,
    health: &HealthRegistry,
    cancel: &CancellationToken,
) -> Option<Arc<MattermostAdapter>> {
    let config = MattermostConfig {
        url: mattermost.url.clone(),
        token: mattermost.token.clone(),
        team_id: mattermost.team_id.clone(),
        channel_category: settings.chat.channel_category.clone(),
        request_timeout: Duration::from_secs(30),
        retry: RetryPolicy::default(),
        websocket: WsSettings::default(),
        channel_privacy: settings.chat.project_channel_privacy,
    };
    health.register("mattermost");
    let mut delay = Duration::from_secs(1);
    let mut reach = Reachability::new("Mattermost");
    let url = config::redact_url_password(mattermost.url.as_str());
    loop {
        match MattermostAdapter::connect(config.clone(), store.clone()).await {
            Ok(adapter) => {
                reach.report(Ok(format!("{url} answers; the bot's token is valid")));
                return Some(Arc::new(adapter));
            }
            Err(e) => {
                if !reach.report(Err(format!("{url}: {e} (retrying in {delay:?})"))) {
                    warn!(error = %e, retry_in = ?delay, "cannot connect to Mattermost");
                }
                health.report(
                    "mattermost",
                    health::ComponentStatus::Down,
                    Some(e.to_string()),
                );
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Reports the firewall as component `firewall`: an API call (the alias lookup) every interval.
async fn firewall_health_loop(
    firewall: Arc<OpnsenseClient>,
    health: HealthRegistry,
    cancel: CancellationToken,
) {
    health.register("firewall");
    let mut reach = Reachability::new("firewall (OPNsense)");
    loop {
        match firewall.check().await {
            Ok(()) => {
                let detail = format!("OPNsense answers; alias {} exists", firewall.alias());
                reach.report(Ok(detail.clone()));
                health.report("firewall", health::ComponentStatus::Up, Some(detail));
            }
            Err(e) => {
                reach.report(Err(e.to_string()));
                health.report(
                    "firewall",
                    health::ComponentStatus::Down,
                    Some(e.to_string()),
                );
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(REACHABILITY_INTERVAL) => {}
        }
    }
}

/// The session runtime's settings.
fn runtime_config(settings: &Settings, deployment: &str) -> RuntimeConfig {
    RuntimeConfig {
        git: GitLayout {
            base_url: settings.repos.git_base_url.clone(),
            repos_base: settings.repos.repos_base_path.display().to_string(),
            worktrees_base: settings.repos.worktrees_path.display().to_string(),
            auto_pull: settings.repos.auto_pull,
        },
        containers: ContainerLayout {
            runtime: settings.container.runtime.clone(),
            image: settings.container.image.clone(),
            network: settings.container.network.clone(),
            state_dir: ".local/share/session-manager".into(),
            up_timeout: settings.container.devcontainer_timeout,
            repo_config: settings.container.repo_devcontainer,
            deployment: Some(deployment.to_owned()),
        },
        claude_command: settings.container.agent_command().0,
        permission_mode: settings.container.agent_command().1,
        budgets: settings.container.budgets(),
        container_env: settings.container.env.clone(),
        vm_host: settings.vm.host.clone(),
        git_timeout: settings.vm.ssh_timeout.max(Duration::from_secs(300)),
        orchestrator_compact_threshold: settings.container.orchestrator_compact_threshold,
        max_agent_line_bytes: settings.container.max_agent_line_bytes,
        turn_timeout: settings.container.turn_timeout,
        session_idle: settings.container.session_idle,
        session_max_age: settings.container.session_max_age,
    }
}

/// The web console, unless `SM_CONSOLE_AUTH` (or its default) turns it off.
fn console_of(
    settings: &Settings,
    store: &Store,
    transcript: &Arc<console::Transcript>,
    clicks: &ClickHandlers,
    shutdown: &CancellationToken,
) -> Option<console::Console> {
    let mode = settings.console_auth();
    if mode == config::ConsoleAuth::Off {
        return None;
    }
    // Link mode logs in the person running the bot, under their own name.
    let operator = settings.http.console_operator.clone().unwrap_or_else(|| {
        std::env::var("USER")
            .ok()
            .filter(|u| console::platform::is_user_name(u))
            .unwrap_or_else(|| "operator".to_owned())
    });
    let auth = console::auth::Auth::new(
        mode,
        settings.http.console_tokens.clone(),
        &settings.http.console_user_header,
        settings.http.trusted_proxies.clone(),
        operator,
    );
    Some(console::Console::new(
        store.clone(),
        Arc::clone(transcript),
        Arc::new(auth),
        clicks.clone(),
        shutdown.clone(),
    ))
}

/// Says where the console is, and in link mode prints its one-time login link (on stderr,
/// not in the log: it is a credential until it is used).
fn announce_console(settings: &Settings, console: &console::Console, listeners: &Listeners) {
    let addr = listeners
        .main
        .local_addr()
        .map_or_else(|_| settings.listen_addr().to_string(), |a| a.to_string());
    if !settings.has_chat_platform() {
        info!(%addr, "no chat platform is configured (SM_MATTERMOST_URL, SM_TEAMS_APP_ID): the web console is the chat surface");
    }
    let mode = console.auth().mode();
    info!(%addr, auth = %mode, "web console at http://{addr}/");
    if let Some(token) = console.auth().link_token() {
        let host = if addr.starts_with("0.0.0.0:") {
            addr.replacen("0.0.0.0", "127.0.0.1", 1)
        } else {
            addr.clone()
        };
        eprintln!("\n    Web console: open this link to log in (it works once):\n    http://{host}/console/login?token={token}\n");
    }
}

/// The SSH pool to the VM.
///
/// # Errors
/// When the key cannot be read or written.
pub fn ssh_pool(settings: &Settings) -> anyhow::Result<SshPool> {
    let key = match &settings.vm.ssh_key {
        Some(content) => SshKey::Content(content.clone()),
        None => SshKey::Path(settings.vm.ssh_key_path.clone()),
    };
    let host_key = match &settings.vm.known_hosts {
        Some(known) => HostKeyPolicy::Pinned(known.clone()),
        None => HostKeyPolicy::AcceptNew,
    };
    Ok(SshPool::new(SshConfig {
        host: settings.vm.host.clone(),
        port: settings.vm.port,
        user: settings.vm.user.clone(),
        key,
        host_key,
        timeout: settings.vm.ssh_timeout,
        max_channels_per_master: 8,
    })?)
}

/// Reports the VM as component `vm`: an SSH command (a local one with `SM_VM_HOST=local`)
/// every interval.
async fn vm_health_loop(ssh: Arc<SshPool>, health: HealthRegistry, cancel: CancellationToken) {
    health.register("vm");
    let mut reach = Reachability::new("VM");
    loop {
        let mut probe = Script::new();
        probe.raw("true");
        let result = match ssh.run(&probe).await {
            Ok(out) if out.success() && ssh.is_local() => {
                Ok("this machine runs the sessions (SM_VM_HOST=local)".to_owned())
            }
            Ok(out) if out.success() => Ok(format!("{} answers over SSH", ssh.target())),
            Ok(out) => Err(format!(
                "{}: the probe `true` exited with {:?}: {}",
                ssh.target(),
                out.status,
                out.stderr.trim()
            )),
            Err(e) => Err(e.to_string()),
        };
        reach.report(result.clone());
        match result {
            Ok(detail) => health.report("vm", health::ComponentStatus::Up, Some(detail)),
            Err(detail) => health.report("vm", health::ComponentStatus::Down, Some(detail)),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(REACHABILITY_INTERVAL) => {}
        }
    }
}

/// Logs whether an external system answers: one line at start (reached, or not reached and
/// why), then one whenever that changes. `/health` has the current state.
struct Reachability {
    system: &'static str,
    /// The last outcome logged; `None` before the first.
    last: Option<bool>,
}

impl Reachability {
    fn new(system: &'static str) -> Self {
        Self { system, last: None }
    }

    /// Logs `result` (what answered, or why not) when the outcome differs from the last one.
    /// Returns whether it logged.
    fn report(&mut self, result: Result<String, String>) -> bool {
        let up = result.is_ok();
        if self.last == Some(up) {
            return false;
        }
        let again = if self.last.is_some() { " again" } else { "" };
        self.last = Some(up);
        let system = self.system;
        match result {
            Ok(detail) => info!(system, "{system}: reached{again}: {detail}"),
            Err(cause) if again.is_empty() => warn!(system, "{system}: not reached: {cause}"),
            Err(cause) => warn!(system, "{system}: lost: {cause}"),
        }
        true
    }
}

/// Resolves a list setting of users (`SM_ALLOWED_USERS`, `SM_ADMIN_USERS`,
/// `SM_ALLOWED_APPROVERS`: ids or usernames, AAD object ids for Teams) to user ids on every
/// platform served; `None` when the list is empty. An entry one platform does not know is
/// simply not a user there; an entry no platform knows is left out (fewer people, never more)
/// and logged under the setting's own name.
async fn resolve_users(
    platforms: &[Arc<dyn ChatOutbound>],
    setting: &'static str,
    entries: &[String],
) -> Option<std::collections::HashSet<String>> {
    if entries.is_empty() {
        return None;
    }
    let mut ids = std::collections::HashSet::new();
    for entry in entries {
        let mut known = false;
        for chat in platforms {
            match chat.resolve_user(entry).await {
                Ok(user) => {
                    known = true;
                    ids.insert(user.id);
                }
                Err(e) => {
                    tracing::debug!(setting, user = %entry, platform = %chat.platform(), error = %e, "not a user on this platform");
                }
            }
        }
        if !known {
            warn!(setting, user = %entry, "a listed user is not known on any chat platform; left out");
        }
    }
    info!(setting, users = ids.len(), "users resolved");
    Some(ids)
}

/// Resolves when the process receives SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("SIGINT received: shutting down"),
        () = terminate => info!("SIGTERM received: shutting down"),
    }
}
