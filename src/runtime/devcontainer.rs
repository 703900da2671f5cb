//! Devcontainers on the VM: `devcontainer up`, the check of what it created, and the bot's
//! containers found by label.
//!
//! # Which configuration
//! `SM_REPO_DEVCONTAINER` ([`RepoConfigPolicy`]) decides what a repository's own
//! `.devcontainer/devcontainer.json` (or `.devcontainer.json`) becomes:
//! - `vetted` (default): read with `devcontainer read-configuration` in a scrubbed environment
//!   (every `${localEnv:NAME}` it references set to a marker, `HOME` a neutral directory) and
//!   rebuilt from an allow-list ([`super::vetting`]); what was dropped is listed in
//!   [`UpResult::dropped`];
//! - `ignore`: the generated configuration ([`super::vetting::fallback_config`]) always;
//! - `trusted`: the repository's configuration as it is, with only the network and the state
//!   mount imposed.
//!
//! The result is written to the session's own directory on the VM (never into the
//! repository) and passed with `--config`. The session directory,
//! `$HOME/<state dir>/sessions/<session id>/`, also holds the session's Claude Code state
//! (`claude/`, mounted at [`CLAUDE_STATE_TARGET`] and
//! given to the agent as `CLAUDE_CONFIG_DIR`), so no state is shared between sessions and it
//! survives container re-creation; it is removed when the session ends.
//!
//! # What was created is checked
//! Features and base images can ask for privileges too, so after `up` the container itself is
//! inspected ([`verify`]): not privileged, no added capabilities or devices, no host PID/IPC/UTS
//! namespace, on `SM_CONTAINER_NETWORK`, and no mount but the workspace, the session's state
//! directory, a worktree's git directory (below), the read-only hooks and configuration of the
//! clone's git directory, and anonymous volumes. A container that fails is removed and the
//! start fails, saying why (except in `trusted` mode).
//!
//! # Worktrees
//! A git worktree's `.git` is a file naming its git directory inside the main clone's `.git`
//! (`<clone>/.git/worktrees/<name>`), where the objects and refs it commits to live too. For
//! git to work in a worktree's container, the clone's `.git` is mounted there at its own path
//! (the one git wrote). The bot names that directory (never the worktree's `.git` file, which
//! the agent can rewrite); it must be a directory, not a symbolic link, and is mounted at its
//! real path. The container can then change the clone's git data as a main-clone session
//! can: the bot runs git on the VM as it does for any clone (see [`super::git`]).
//!
//! # The clone's hooks and configuration
//! Every session on a repository shares its clone's git directory, and git inside a container
//! runs what that directory's hooks and configuration say. So in every container that has it
//! (a main clone's as part of the workspace, a worktree's at its own path), `hooks/` and
//! `config` ([`GIT_GUARDED`]) are bind-mounted read-only over it, and [`verify`] requires
//! both mounts: what one session's agent writes there cannot run in another's container.
//!
//! # Stops during `up`, and labels
//! `devcontainer up` runs in a process group of its own whose id is kept in the session
//! directory (`up.pid`), so a stop during the start kills it ([`remove_session`]) and removes
//! whatever it created, found by label. Containers carry [`LABEL_MANAGED`], [`LABEL_SESSION`]
//! and [`LABEL_WORKSPACE`] (given to `devcontainer up` as `--id-label`), which the reconciler
//! uses to find the ones no session owns. Ids are always compared in full (`--no-trunc`).
//!
//! `devcontainer up` prints one JSON line on stdout (`@devcontainers/cli` 0.89):
//! `{"outcome":"success","containerId","remoteUser","remoteWorkspaceFolder"}` or
//! `{"outcome":"error","message","description"}`; its logs go to stderr.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::shell::{QuoteError, Script};
use super::ssh::{SshError, SshPool};
use super::vetting::{self, Strictness, VetContext, VetError, CLAUDE_STATE_TARGET};

/// Label on every container the bot starts.
pub const LABEL_MANAGED: &str = "session-manager.managed";
/// Label carrying the workspace folder on the VM.
pub const LABEL_WORKSPACE: &str = "session-manager.workspace";
/// Label carrying the id of the session the container belongs to.
pub const LABEL_SESSION: &str = "session-manager.session";
/// The label naming the deployment (one bot's database) a container belongs to.
pub const LABEL_DEPLOYMENT: &str = "session-manager.deployment";

/// How a repository's own devcontainer configuration is used (`SM_REPO_DEVCONTAINER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::Display)]
#[strum(serialize_all = "snake_case", ascii_case_insensitive)]
pub enum RepoConfigPolicy {
    /// Rebuilt from an allow-list: nothing of it runs on the VM or widens the container.
    Vetted,
    /// Never used: the generated configuration always.
    Ignore,
    /// Used as written (for operators who own every repository); only the network and the
    /// state mount are imposed.
    Trusted,
}

/// How containers are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerLayout {
    /// `SM_CONTAINER_RUNTIME` (`podman` or `docker`).
    pub runtime: String,
    /// `SM_CONTAINER_IMAGE`, for the generated configuration.
    pub image: String,
    /// `SM_CONTAINER_NETWORK`: every container runs on it.
    pub network: String,
    /// Where the bot keeps its state on the VM, relative to the VM user's home.
    pub state_dir: String,
    /// `SM_DEVCONTAINER_TIMEOUT_SECS`.
    pub up_timeout: Duration,
    /// `SM_REPO_DEVCONTAINER`.
    pub repo_config: RepoConfigPolicy,
    /// This deployment's id ([`crate::store::Store::deployment_id`]): containers are labelled
    /// with it ([`LABEL_DEPLOYMENT`]) and the reconciler looks only at its own.
    pub deployment: Option<String>,
}

/// Which configuration a container was started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    /// The generated one (the repository has none, or `ignore`).
    Generated,
    /// The repository's, vetted.
    Vetted,
    /// The repository's, trusted.
    Trusted,
}

/// What `devcontainer up` reported, and how it came about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpResult {
    /// Full container id.
    pub container_id: String,
    /// User the agent runs as.
    pub remote_user: String,
    /// The workspace inside the container.
    pub remote_workspace_folder: String,
    /// Which configuration was used.
    pub source: ConfigSource,
    /// What was left out of the repository's configuration, one line each.
    pub dropped: Vec<String>,
    /// The session's directory on the VM (absolute).
    pub session_dir: String,
}

/// Errors from devcontainer work.
#[derive(Debug, thiserror::Error)]
pub enum DevcontainerError {
    /// A value could not be quoted.
    #[error(transparent)]
    Quote(#[from] QuoteError),
    /// SSH failed.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// `devcontainer up` reported an error.
    #[error("devcontainer up failed: {message}")]
    Up {
        /// Its message (and description).
        message: String,
    },
    /// `devcontainer up` failed because the container runtime read an image record that
    /// another of its processes was writing or removing at that moment
    /// ([`TRANSIENT_RUNTIME_ERRORS`]); the image is fine and another try works.
    #[error("devcontainer up failed: {message}; the container runtime said: {detail}")]
    RuntimeRace {
        /// The CLI's message (and description).
        message: String,
        /// The runtime's own error line from the CLI's log.
        detail: String,
    },
    /// `devcontainer up` did not finish within its bound (`SM_DEVCONTAINER_TIMEOUT_SECS`); it
    /// runs on until the session's cleanup stops it and its build ([`remove_session`]). `log`
    /// is the end of the CLI's log: the step it was waiting on.
    #[error("devcontainer up did not finish within {} s; the end of its log:\n{log}", .after.as_secs())]
    UpTimeout {
        /// The bound it ran into.
        after: Duration,
        /// The CLI's last log lines, or why they could not be read.
        log: String,
    },
    /// The output could not be read.
    #[error("unexpected output from devcontainer up: {0}")]
    Output(String),
    /// The repository's configuration could not be read.
    #[error(transparent)]
    Vet(#[from] VetError),
    /// The configuration file or a build path leads outside the workspace.
    #[error("the repository's devcontainer configuration refers to {0}, outside the repository")]
    OutsideWorkspace(String),
    /// A session id that is not one (ids are lowercase UUIDs: letters, digits and `-`).
    #[error("{0:?} is not a session id")]
    BadSessionId(String),
    /// The main clone's git directory cannot be shared with a worktree's container.
    #[error("the clone's git directory {0} cannot be shared with the container: it (or its hooks or config) is missing, not what it should be, a symbolic link, or a path a mount cannot name")]
    GitDir(String),
    /// The container that was created breaks the rules; it was removed.
    #[error("the container asked for {}, which is not allowed; it was removed", .0.join(", "))]
    Violation(Vec<String>),
}

impl DevcontainerError {
    /// Whether another `devcontainer up` is likely to work: a [`Self::RuntimeRace`], or the
    /// CLI's own step that gives the container user the VM user's uid failing to set up a
    /// container (building the `-uid` image, `podman build … updateUID.Dockerfile …`, or
    /// running it, `podman run … vsc-…-uid …`). Rootless podman sometimes fails these when
    /// other image operations run at the same moment. A repository's own build or image
    /// failing is not this.
    pub fn is_retryable(&self) -> bool {
        let message = match self {
            Self::RuntimeRace { .. } => return true,
            Self::Up { message } => message,
            _ => return false,
        };
        if !message.contains("An error occurred setting up the container") {
            return false;
        }
        // The CLI names the runtime as it was given: podman, or the session's shim
        // (`…/sessions/<id>/runtime`, see [`runtime_shim`]).
        let runs = message.contains("podman run") || message.contains("/runtime run ");
        let runs_uid_image = runs
            && message.split_whitespace().any(|word| {
                let name = word.rsplit('/').next().unwrap_or(word);
                let name = name.split(':').next().unwrap_or(name);
                name.starts_with("vsc-") && name.ends_with("-uid")
            });
        message.contains("updateUID.Dockerfile") || runs_uid_image
    }
}

/// The session's directory on the VM, relative to the VM user's home.
///
/// # Errors
/// [`DevcontainerError::BadSessionId`] unless the id is letters, digits and `-` only (it names
/// a directory that is removed with the session).
pub fn session_dir_relative(
    layout: &ContainerLayout,
    session_id: &str,
) -> Result<String, DevcontainerError> {
    let valid = !session_id.is_empty()
        && session_id.len() <= 64
        && session_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !session_id.starts_with('-');
    if !valid {
        return Err(DevcontainerError::BadSessionId(
            session_id.chars().take(80).collect(),
        ));
    }
    Ok(format!(
        "{}/sessions/{session_id}",
        layout.state_dir.trim_end_matches('/')
    ))
}

/// What the preparation found on the VM.
struct Prepared {
    session_dir: String,
    /// The real path of the git directory to share with the container (worktrees).
    git_dir: Option<String>,
    ctx: VetContext,
    /// `read-configuration`'s JSON, when the repository has a configuration to use.
    read: Option<String>,
}

/// Runs `devcontainer up` for `workspace` (a path on the VM) as session `session_id`, with the
/// configuration [`ContainerLayout::repo_config`] calls for, then checks what was created.
/// `git_dir` is the main clone's `.git` when `workspace` is a worktree of it: it is mounted
/// too (see the module documentation).
///
/// # Errors
/// [`DevcontainerError`]; an error outcome carries the CLI's message.
pub async fn up(
    pool: &SshPool,
    layout: &ContainerLayout,
    workspace: &str,
    git_dir: Option<&str>,
    session_id: &str,
) -> Result<UpResult, DevcontainerError> {
    let prepared = prepare(pool, layout, workspace, git_dir, session_id).await?;
    let (mut config, dropped, build_paths, source) = match (&prepared.read, layout.repo_config) {
        (Some(read), RepoConfigPolicy::Vetted) => {
            let v = vetting::vet(read, Strictness::Vetted, &prepared.ctx)?;
            (v.config, v.dropped, v.build_paths, ConfigSource::Vetted)
        }
        (Some(read), RepoConfigPolicy::Trusted) => {
            let v = vetting::vet(read, Strictness::Trusted, &prepared.ctx)?;
            (v.config, v.dropped, v.build_paths, ConfigSource::Trusted)
        }
        _ => (
            vetting::fallback_config(&layout.image, &prepared.ctx),
            Vec::new(),
            Vec::new(),
            ConfigSource::Generated,
        ),
    };
    if let Some(git_dir) = &prepared.git_dir {
        share_git_dir(&mut config, git_dir)?;
    }
    // The git directory whose hooks and configuration are made read-only (a trusted
    // configuration runs as written).
    let guarded = match (source, &prepared.git_dir) {
        (ConfigSource::Trusted, _) => None,
        (_, Some(git_dir)) => {
            guard_git_dir(&mut config, git_dir, git_dir)?;
            Some(git_dir.clone())
        }
        (_, None) => {
            let git_dir = format!("{}/.git", workspace.trim_end_matches('/'));
            guard_git_dir(
                &mut config,
                &git_dir,
                &format!("{}/.git", default_workspace_target(workspace)),
            )?;
            Some(git_dir)
        }
    };
    let mut s = Script::new();
    s.set("ws", workspace)?
        .set("dir", &prepared.session_dir)?
        .set("config", &config.to_string())?
        .set("runtime", &layout.runtime)?
        .set("managed", &format!("{LABEL_MANAGED}=true"))?
        .set("sessionlabel", &format!("{LABEL_SESSION}={session_id}"))?
        .set("wslabel", &format!("{LABEL_WORKSPACE}={workspace}"))?
        .set(
            "deploymentlabels",
            &layout
                .deployment
                .as_deref()
                .map(|d| format!("{LABEL_DEPLOYMENT}={d}"))
                .unwrap_or_default(),
        )?
        .raw(r#"printf '%s\n' "$config" > "$dir/devcontainer.json""#)
        .raw(r#"ws_real=$(realpath "$ws")"#)
        .command("set", &std::iter::once("--").chain(build_paths.iter().map(String::as_str)).collect::<Vec<_>>())?
        .raw(r#"for p in "$@"; do r=$(realpath -m "$p"); case "$r/" in "$ws_real"/*) ;; *) printf 'sm-outside=%s\n' "$p"; exit 3 ;; esac; done"#)
        .set("guarded", guarded.as_deref().unwrap_or_default())?
        // What is mounted read-only must be what it says: a real directory of hooks and a real
        // configuration file (a symbolic link would mount whatever it names on the VM).
        .raw(r#"if [ -n "$guarded" ]; then if [ -L "$guarded" ] || [ ! -d "$guarded" ] || [ -L "$guarded/hooks" ] || [ -L "$guarded/config" ] || [ ! -f "$guarded/config" ] || { [ -e "$guarded/hooks" ] && [ ! -d "$guarded/hooks" ]; }; then printf 'sm-bad-gitdir\n'; exit 3; fi; mkdir -p "$guarded/hooks"; fi"#)
        .raw(r#""$runtime" ps -a --external --no-trunc --quiet > "$dir/external.before" 2>/dev/null || true"#)
        .set(
            "shim",
            &runtime_shim(
                &layout.runtime,
                &format!("{LABEL_SESSION}={session_id}"),
                EVENTS_POLL_SECS,
            )?,
        )?
        .raw(r#"printf '%s' "$shim" > "$dir/runtime"; chmod 700 "$dir/runtime""#)
        .set("imagelock", &image_lock_path(layout))?
        // A shared hold on the image lock while `up` runs: removing a `-uid` image takes it
        // exclusively (see [`REMOVE_IMAGES`]).
        .raw(r#"setsid flock --close --shared "$HOME/$imagelock" devcontainer up --docker-path "$dir/runtime" --workspace-folder "$ws" --config "$dir/devcontainer.json" --id-label "$managed" --id-label "$sessionlabel" --id-label "$wslabel" ${deploymentlabels:+--id-label "$deploymentlabels"} </dev/null >"$dir/up.out" 2>"$dir/up.log" &"#)
        .raw(r#"printf '%s\n' "$!" > "$dir/up.pid""#)
        .raw(r#"wait "$!" && status=0 || status=$?"#)
        .raw(r#"rm -f "$dir/up.pid""#)
        .raw(r#"cat "$dir/up.out"; tail -n 20 "$dir/up.log" >&2"#)
        .raw(r#"exit "$status""#);
    let out = match pool.run_with_timeout(&s, layout.up_timeout).await {
        Err(SshError::Timeout(after)) => {
            let log = log_tail(pool, &prepared.session_dir, "up.log").await;
            tracing::warn!(session = session_id, log = %log, "devcontainer up timed out");
            return Err(DevcontainerError::UpTimeout { after, log });
        }
        other => other?,
    };
    if let Some(path) = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("sm-outside="))
    {
        return Err(DevcontainerError::OutsideWorkspace(path.to_owned()));
    }
    if out.stdout.lines().any(|l| l == "sm-bad-gitdir") {
        return Err(DevcontainerError::GitDir(guarded.unwrap_or_default()));
    }
    let parsed = parse_up_output(&out.stdout, &out.stderr).inspect_err(|e| {
        // The CLI's outcome names the failed command; its log says why (podman's own error).
        tracing::warn!(session = session_id, error = %e, log = %last_lines(&out.stderr, 12), "devcontainer up failed");
    })?;
    if source != ConfigSource::Trusted {
        let problems = verify(
            pool,
            layout,
            &parsed.container_id,
            workspace,
            &prepared.session_dir,
            prepared.git_dir.as_deref(),
        )
        .await?;
        if !problems.is_empty() {
            let _ = remove(pool, &layout.runtime, &parsed.container_id).await;
            return Err(DevcontainerError::Violation(problems));
        }
    }
    Ok(UpResult {
        container_id: parsed.container_id,
        remote_user: parsed.remote_user,
        remote_workspace_folder: parsed.remote_workspace_folder,
        source,
        dropped,
        session_dir: prepared.session_dir,
    })
}

/// How often the [`runtime_shim`]'s `events` looks for the session's running containers
/// (seconds): the longest an `up` waits for a start event podman never showed.
pub const EVENTS_POLL_SECS: u32 = 10;

/// The container runtime as `devcontainer up` is given it (`--docker-path`, a script in the
/// session's directory): `runtime` itself, except for `events`.
///
/// `devcontainer up` (0.89) starts `<runtime> events --format json --filter event=start` and,
/// right after, `<runtime> run`, and waits for a start event of a container with its labels.
/// It waits until `SM_DEVCONTAINER_TIMEOUT_SECS` if none comes, which happens with rootless
/// podman 4.3: the container can start before `podman events` has opened the event log (a busy
/// VM; devcontainers/cli issue 1236). CI also saw `up` wait after "Container started" with that
/// race ruled out, for a cause not pinned down: the start event did not reach the CLI. (The
/// CLI itself polls the container list instead of reading events for one runtime, `wslc`.)
///
/// So the shim's `events` reads from two seconds before it was asked (`--since`), and every
/// `poll_secs` it also prints a start event (`{"ID":…,"Status":"start","Type":"container"}`,
/// podman's JSON event shape) for each running container labelled `session_label`: a start
/// that never reached the CLI reaches it then. The CLI checks every start event's labels
/// itself, so one of another container changes nothing. The reader is the shim's own process
/// (`exec`), because the CLI stops listening with SIGKILL. The poller beside it goes on while
/// the CLI runs, also after the reader has ended: a `podman events` that ended by itself (exit
/// status 0, so the CLI says nothing) left `up` waiting in a benchmark run. It stops within
/// `poll_secs` of the CLI's end (its exit, not its parent's wait for it).
///
/// `run` gets `--pull=never`: the CLI has built or pulled its image just before, and rootless
/// podman 4.3 was seen to copy a freshly built `-uid` image into a new layer at `run` (an
/// `image pull` event, a second layer with the same digest), once by a `run` whose layer was
/// left half made and mounted (docs/operations.md, §3.3). An image `run` cannot find fails at
/// once instead, which `up` tries again ([`DevcontainerError::is_retryable`]).
///
/// # Errors
/// [`QuoteError`] for a runtime or label that cannot be quoted.
pub fn runtime_shim(
    runtime: &str,
    session_label: &str,
    poll_secs: u32,
) -> Result<String, QuoteError> {
    Ok(format!(
        r#"#!/bin/sh
# Written by session-manager for devcontainer up (see runtime_shim).
rt={runtime}
if [ "$1" = events ]; then
  shift
  caller=$PPID
  while sleep {poll_secs} && kill -0 "$caller" 2>/dev/null && [ "$(ps -o stat= -p "$caller" | cut -c1)" != Z ]; do
    for id in $("$rt" ps --no-trunc --quiet --filter label={label} --filter status=running 2>/dev/null); do
      printf '{{"ID":"%s","Status":"start","Type":"container"}}\n' "$id"
    done
  done </dev/null &
  exec "$rt" events --since "$(( $(date +%s) - 2 ))" "$@"
fi
if [ "$1" = run ]; then shift; exec "$rt" run --pull=never "$@"; fi
exec "$rt" "$@"
"#,
        runtime = super::shell::quote(runtime)?,
        label = super::shell::quote(session_label)?,
    ))
}

/// An awk program that reads `ps -eo pid=,ppid=` and prints every process below `root` (its
/// descendants, at any depth), one pid a line.
const BELOW: &str = r#"{ parent[$1] = $2 } END { for (p in parent) { q = parent[p]; for (n = 0; n < 64 && q > 1 && q != root; n++) q = parent[q]; if (q == root) print p } }"#;

/// What rootless podman says when it reads an image record that another podman process is
/// writing or removing at that moment (podman 4.3, seen when sessions start side by side:
/// `Error: locating item named "manifest" for image with ID "…": file does not exist`, and
/// `layer not known` for a layer that vanished under it). The image itself is fine; a second
/// look succeeds. (`image not known` is not among them: a missing image says it too.)
pub const TRANSIENT_RUNTIME_ERRORS: [&str; 2] =
    ["locating item named \"manifest\"", "layer not known"];

/// The error for the CLI's error outcome `message`: [`DevcontainerError::RuntimeRace`] when
/// its log shows one of the [`TRANSIENT_RUNTIME_ERRORS`], else [`DevcontainerError::Up`].
fn up_error(message: String, log: &str) -> DevcontainerError {
    let Some(line) = log
        .lines()
        .find(|l| TRANSIENT_RUNTIME_ERRORS.iter().any(|m| l.contains(m)))
    else {
        return DevcontainerError::Up { message };
    };
    // The CLI stamps its log lines: `[2026-12-07T03:23:25.411Z] Error: …`.
    let detail = line
        .trim()
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
        .map_or(line.trim(), |(_, said)| said)
        .to_owned();
    DevcontainerError::RuntimeRace { message, detail }
}

/// Adds read-only bind mounts over the hooks and configuration ([`GIT_GUARDED`]) of the git
/// directory at `git_dir` on the VM, seen at `target` in the container.
fn guard_git_dir(config: &mut Value, git_dir: &str, target: &str) -> Result<(), DevcontainerError> {
    let binds: Vec<(String, String, bool)> = git_guards(git_dir, target)
        .into_iter()
        .map(|(source, destination)| (source, destination, true))
        .collect();
    add_bind_mounts(config, git_dir, &binds)
}

/// Adds the bind mount of a worktree's git directory (a real path) at the same path.
fn share_git_dir(config: &mut Value, git_dir: &str) -> Result<(), DevcontainerError> {
    add_bind_mounts(
        config,
        git_dir,
        &[(git_dir.to_owned(), git_dir.to_owned(), false)],
    )
}

/// Appends bind mounts, each `(source on the VM, target in the container, read-only)`, to
/// the configuration's `mounts`.
///
/// # Errors
/// [`DevcontainerError::GitDir`] (naming `git_dir`) for a path a mount string cannot say: it
/// is written as `key=value,…`, so a path with `,` or `=`, or a relative one, is refused.
fn add_bind_mounts(
    config: &mut Value,
    git_dir: &str,
    binds: &[(String, String, bool)],
) -> Result<(), DevcontainerError> {
    if binds
        .iter()
        .flat_map(|(source, target, _)| [source, target])
        .any(|p| p.contains([',', '=']) || !p.starts_with('/'))
    {
        return Err(DevcontainerError::GitDir(git_dir.to_owned()));
    }
    let Some(obj) = config.as_object_mut() else {
        return Err(DevcontainerError::Output(
            "the configuration is not an object".into(),
        ));
    };
    let mounts = obj
        .entry("mounts")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(list) = mounts {
        for (source, target, read_only) in binds {
            let suffix = if *read_only { ",readonly" } else { "" };
            list.push(Value::String(format!(
                "source={source},target={target},type=bind{suffix}"
            )));
        }
    }
    Ok(())
}

/// Makes the session's directory, checks the git directory to share (`sm-gitdir=` its real
/// path) and, when the repository's configuration is to be used, reads it with the
/// devcontainer CLI in a scrubbed environment.
async fn prepare(
    pool: &SshPool,
    layout: &ContainerLayout,
    workspace: &str,
    git_dir: Option<&str>,
    session_id: &str,
) -> Result<Prepared, DevcontainerError> {
    let mut s = Script::new();
    s.set("ws", workspace)?
        .set("gitdir", git_dir.unwrap_or_default())?
        .set("rel", &session_dir_relative(layout, session_id)?)?
        .set("base", layout.state_dir.trim_end_matches('/'))?
        .set("runtime", &layout.runtime)?
        .set(
            "mode",
            if layout.repo_config == RepoConfigPolicy::Ignore {
                "ignore"
            } else {
                "read"
            },
        )?
        .raw(r#"dir="$HOME/$rel"; neutral="$HOME/$base/neutral-home""#)
        .raw(r#"mkdir -p "$dir/claude" "$neutral"; chmod 700 "$HOME/$base" "$dir""#)
        .raw(r#"printf 'sm-dir=%s\nsm-home=%s\nsm-path=%s\n' "$dir" "$neutral" "$PATH""#)
        .raw(r#"if [ -n "$gitdir" ]; then if [ -d "$gitdir" ] && [ ! -L "$gitdir" ]; then printf 'sm-gitdir=%s\n' "$(realpath "$gitdir")"; else printf 'sm-bad-gitdir\n'; exit 0; fi; fi"#)
        .raw(r#"cfg=; for f in "$ws/.devcontainer/devcontainer.json" "$ws/.devcontainer.json"; do if [ -e "$f" ] || [ -L "$f" ]; then cfg=$f; break; fi; done"#)
        .raw(r#"if [ "$mode" = ignore ] || [ -z "$cfg" ]; then exit 0; fi"#)
        .raw(r#"ws_real=$(realpath "$ws"); for f in "$cfg" "$ws/.devcontainer"; do if [ -e "$f" ]; then case "$(realpath "$f")/" in "$ws_real"/*) ;; *) printf 'sm-outside=%s\n' "${f#"$ws"/}"; exit 0 ;; esac; fi; done"#)
        .raw(r#"names=$(grep -rhoE '(localEnv|env):[A-Za-z_][A-Za-z0-9_]*' "$ws/.devcontainer" "$ws/.devcontainer.json" 2>/dev/null | sed -E 's/^(localEnv|env)://' | sort -u | head -n 200 || true)"#)
        .raw(r#"set --; for n in $names; do case "$n" in PATH|HOME) ;; *) set -- "$@" "$n=@@sm-localenv:$n@@" ;; esac; done"#)
        .raw(r#"echo sm-config"#)
        .raw(r#"env -i PATH="$PATH" HOME="$neutral" LANG=C.UTF-8 "$@" devcontainer read-configuration --docker-path "$runtime" --workspace-folder "$ws" 2>"$dir/read.log" || { echo sm-read-failed; tail -n 5 "$dir/read.log" >&2; }"#);
    let out = pool.run(&s).await?;
    if !out.success() {
        return Err(DevcontainerError::Output(format!(
            "cannot prepare the session's directory (exit status {:?}): {}",
            out.status,
            last_lines(&out.stderr, 5)
        )));
    }
    let field = |key: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_default()
            .to_owned()
    };
    if let Some(path) = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("sm-outside="))
    {
        return Err(DevcontainerError::OutsideWorkspace(path.to_owned()));
    }
    if out.stdout.lines().any(|l| l == "sm-bad-gitdir") {
        return Err(DevcontainerError::GitDir(
            git_dir.unwrap_or_default().to_owned(),
        ));
    }
    let session_dir = field("sm-dir=");
    if session_dir.is_empty() {
        return Err(DevcontainerError::Output(
            "the session's directory was not reported".into(),
        ));
    }
    let mut lines = out.stdout.lines();
    let read = if lines.any(|l| l == "sm-config") {
        let rest: Vec<&str> = lines.collect();
        if rest.contains(&"sm-read-failed") {
            return Err(VetError::Unreadable(last_lines(&out.stderr, 5)).into());
        }
        Some(rest.join("\n"))
    } else {
        None
    };
    Ok(Prepared {
        ctx: VetContext {
            network: layout.network.clone(),
            session_dir: session_dir.clone(),
            neutral_home: field("sm-home="),
            path: field("sm-path="),
        },
        session_dir,
        git_dir: Some(field("sm-gitdir=")).filter(|d| !d.is_empty()),
        read,
    })
}

/// Reads the JSON result line of `devcontainer up` from its stdout.
///
/// # Errors
/// [`DevcontainerError::Up`] for an error outcome ([`DevcontainerError::RuntimeRace`] when
/// the log on `stderr` shows a [`TRANSIENT_RUNTIME_ERRORS`] message),
/// [`DevcontainerError::Output`] when no result line is found.
pub fn parse_up_output(stdout: &str, stderr: &str) -> Result<Parsed, DevcontainerError> {
    let result = stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.get("outcome").is_some());
    let Some(result) = result else {
        return Err(DevcontainerError::Output(format!(
            "no result line; last log lines:\n{}",
            last_lines(stderr, 5)
        )));
    };
    let field = |k: &str| {
        result
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    if field("outcome") != "success" {
        let mut message = field("message");
        let description = field("description");
        if !description.is_empty() && description != message {
            message = format!("{message} ({description})");
        }
        return Err(up_error(message, stderr));
    }
    let container_id = field("containerId");
    if container_id.is_empty() {
        return Err(DevcontainerError::Output(
            "success without a containerId".into(),
        ));
    }
    Ok(Parsed {
        container_id,
        remote_user: Some(field("remoteUser"))
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "root".into()),
        remote_workspace_folder: field("remoteWorkspaceFolder"),
    })
}

/// The fields of a successful `devcontainer up` result line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Full container id.
    pub container_id: String,
    /// User the agent runs as (`root` when the CLI names none).
    pub remote_user: String,
    /// The workspace inside the container.
    pub remote_workspace_folder: String,
}

/// The last lines of a log in the session's directory on the VM (`dir`), read with a short
/// bound of its own; when it cannot be read, why.
async fn log_tail(pool: &SshPool, dir: &str, name: &str) -> String {
    let mut s = Script::new();
    let read = match s.set("log", &format!("{dir}/{name}")) {
        Ok(s) => {
            s.raw(r#"tail -n 40 "$log""#);
            pool.run_with_timeout(s, Duration::from_secs(15)).await
        }
        Err(e) => return format!("(cannot name {name}: {e})"),
    };
    match read {
        Ok(out) if out.success() => last_lines(&out.stdout, 12),
        Ok(out) => format!("(cannot read {name}: {})", out.stderr.trim()),
        Err(e) => format!("(cannot read {name}: {e})"),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The parts of `podman container inspect` the check reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspected {
    #[serde(default)]
    host_config: HostConfig,
    #[serde(default)]
    mounts: Vec<Mount>,
    #[serde(default)]
    network_settings: NetworkSettings,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HostConfig {
    #[serde(default)]
    privileged: bool,
    #[serde(default)]
    cap_add: Option<Vec<String>>,
    #[serde(default)]
    devices: Option<Vec<Value>>,
    #[serde(default)]
    network_mode: String,
    #[serde(default)]
    pid_mode: String,
    #[serde(default)]
    ipc_mode: String,
    #[serde(rename = "UTSMode", default)]
    uts_mode: String,
    #[serde(default)]
    security_opt: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Mount {
    #[serde(rename = "Type", default)]
    kind: String,
    /// Whether the container may write it (a mount without the field counts as writable).
    #[serde(rename = "RW", default = "writable")]
    rw: bool,
    #[serde(default)]
    source: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    destination: String,
}

fn writable() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NetworkSettings {
    #[serde(default)]
    networks: Option<BTreeMap<String, Value>>,
}

/// Checks a created container (see the module documentation). Returns what is wrong, one
/// short phrase each; empty when it is fine.
///
/// # Errors
/// [`DevcontainerError`] when it cannot be inspected.
pub async fn verify(
    pool: &SshPool,
    layout: &ContainerLayout,
    container_id: &str,
    workspace: &str,
    session_dir: &str,
    git_dir: Option<&str>,
) -> Result<Vec<String>, DevcontainerError> {
    let mut s = Script::new();
    s.command(&layout.runtime, &["container", "inspect", container_id])?;
    let out = pool.run(&s).await?;
    if !out.success() {
        return Err(DevcontainerError::Output(format!(
            "cannot inspect the container: {}",
            out.stderr.trim()
        )));
    }
    Ok(violations(
        &out.stdout,
        &layout.network,
        workspace,
        session_dir,
        git_dir,
    ))
}

/// [`verify`] for a session's existing container before it is used again (a session resumed
/// after a bot restart, or woken from hibernation): it may have been made by an older version
/// or under other settings (`SM_REPO_DEVCONTAINER=trusted`, another `SM_CONTAINER_NETWORK`).
/// `git_dir` is the main clone's `.git` as configured, for a worktree; it is resolved on the
/// VM first, as `up` resolves it.
///
/// # Errors
/// [`DevcontainerError`] when the git directory cannot be resolved or the container cannot be
/// inspected.
pub async fn verify_existing(
    pool: &SshPool,
    layout: &ContainerLayout,
    container_id: &str,
    workspace: &str,
    session_dir: &str,
    git_dir: Option<&str>,
) -> Result<Vec<String>, DevcontainerError> {
    let git_dir = match git_dir {
        None => None,
        Some(configured) => {
            let mut s = Script::new();
            s.set("gitdir", configured)?.raw(r#"realpath "$gitdir""#);
            let out = pool.run(&s).await?;
            if !out.success() {
                return Err(DevcontainerError::Output(format!(
                    "cannot resolve the clone's git directory {configured}: {}",
                    out.stderr.trim()
                )));
            }
            Some(out.stdout.trim().to_owned())
        }
    };
    verify(
        pool,
        layout,
        container_id,
        workspace,
        session_dir,
        git_dir.as_deref(),
    )
    .await
}

/// What is wrong with a container, from its `inspect` JSON (an array of one object).
/// `git_dir` is a worktree's shared git directory (mounted at its own path).
pub fn violations(
    inspect: &str,
    network: &str,
    workspace: &str,
    session_dir: &str,
    git_dir: Option<&str>,
) -> Vec<String> {
    let parsed: Vec<Inspected> = match serde_json::from_str(inspect) {
        Ok(parsed) => parsed,
        Err(e) => return vec![format!("an inspection that cannot be read ({e})")],
    };
    let Some(c) = parsed.into_iter().next() else {
        return vec!["an inspection without the container".into()];
    };
    let h = &c.host_config;
    let mut problems = Vec::new();
    if h.privileged {
        problems.push("--privileged".to_owned());
    }
    if let Some(caps) = h.cap_add.as_ref().filter(|c| !c.is_empty()) {
        problems.push(format!("added capabilities ({})", caps.join(", ")));
    }
    if h.devices.as_ref().is_some_and(|d| !d.is_empty()) {
        problems.push("devices of the VM".into());
    }
    for (what, mode) in [
        ("PID", &h.pid_mode),
        ("IPC", &h.ipc_mode),
        ("UTS", &h.uts_mode),
    ] {
        if mode == "host" {
            problems.push(format!("the VM's {what} namespace"));
        }
    }
    if let Some(opts) = &h.security_opt {
        let widened: Vec<&String> = opts
            .iter()
            .filter(|o| o.as_str() != "label=disable")
            .collect();
        if !widened.is_empty() {
            problems.push(format!(
                "security options ({})",
                widened
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let on_network = if network == "host" {
        h.network_mode == "host"
    } else {
        h.network_mode != "host"
            && c.network_settings
                .networks
                .as_ref()
                .is_some_and(|n| n.len() == 1 && n.contains_key(network))
    };
    if !on_network {
        problems.push(format!("another network than {network}"));
    }
    let state = format!("{}/claude", session_dir.trim_end_matches('/'));
    let workspace = workspace.trim_end_matches('/');
    // The clone's git directory: a worktree's is mounted at its own path; a main clone's is
    // the workspace's `.git`, wherever the workspace is mounted.
    let guards = match git_dir {
        Some(g) => git_guards(g.trim_end_matches('/'), g.trim_end_matches('/')),
        None => c
            .mounts
            .iter()
            .find(|m| m.kind == "bind" && m.source.trim_end_matches('/') == workspace)
            .map(|m| {
                git_guards(
                    &format!("{workspace}/.git"),
                    &format!("{}/.git", m.destination.trim_end_matches('/')),
                )
            })
            .unwrap_or_default(),
    };
    for m in &c.mounts {
        let anonymous = m.kind == "volume"
            && m.name.len() == 64
            && m.name.bytes().all(|b| b.is_ascii_hexdigit());
        let source = m.source.trim_end_matches('/');
        let destination = m.destination.trim_end_matches('/');
        let ours = m.kind == "bind"
            && (source == workspace
                || (source == state && m.destination == CLAUDE_STATE_TARGET)
                || git_dir.is_some_and(|g| {
                    let g = g.trim_end_matches('/');
                    source == g && destination == g
                })
                || (!m.rw && guards.iter().any(|(s, d)| source == s && destination == d)));
        if !(anonymous || ours) {
            let what = if m.kind == "bind" { &m.source } else { &m.name };
            problems.push(format!("a {} mount of {what}", m.kind));
        }
    }
    for (source, destination) in &guards {
        let guarded = c.mounts.iter().any(|m| {
            m.kind == "bind"
                && !m.rw
                && m.source.trim_end_matches('/') == source
                && m.destination.trim_end_matches('/') == destination
        });
        if !guarded {
            problems.push(format!("{destination} writable (it must be read-only)"));
        }
    }
    problems
}

/// The parts of a clone's git directory that make git run programs: its hooks and its
/// configuration (`core.hooksPath`, filters, `core.fsmonitor`, aliases, …). Sessions on one
/// repository share the clone's git directory, so every container that has it gets these
/// read-only: what one session's agent wrote there would otherwise run in another session's
/// container.
pub const GIT_GUARDED: [&str; 2] = ["hooks", "config"];

/// The read-only mounts over [`GIT_GUARDED`] for the git directory at `git_dir` on the VM,
/// seen at `target` in the container: `(source, destination)` pairs.
fn git_guards(git_dir: &str, target: &str) -> Vec<(String, String)> {
    GIT_GUARDED
        .iter()
        .map(|part| (format!("{git_dir}/{part}"), format!("{target}/{part}")))
        .collect()
}

/// Where the devcontainer CLI mounts a workspace folder when the configuration does not say
/// (vetting drops `workspaceMount` and `workspaceFolder`): `/workspaces/<folder name>`.
fn default_workspace_target(workspace: &str) -> String {
    let name = workspace
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    format!("/workspaces/{name}")
}

/// The state of a container, from `<runtime> inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Running.
    Running,
    /// Exists but stopped (e.g. after a host reboot).
    Stopped,
    /// Does not exist.
    Gone,
}

/// Looks a container up by its full id.
///
/// # Errors
/// [`DevcontainerError`].
pub async fn inspect(
    pool: &SshPool,
    runtime: &str,
    container_id: &str,
) -> Result<ContainerState, DevcontainerError> {
    let mut s = Script::new();
    s.set("runtime", runtime)?
        .set("id", container_id)?
        .raw(r#"if state=$("$runtime" container inspect --format '{{.State.Running}}' "$id" 2>/dev/null); then echo "running=$state"; else echo gone; fi"#);
    let out = pool.run(&s).await?;
    Ok(match out.stdout.trim() {
        "running=true" => ContainerState::Running,
        "gone" => ContainerState::Gone,
        _ => ContainerState::Stopped,
    })
}

/// Starts a stopped container.
///
/// # Errors
/// [`DevcontainerError`].
pub async fn start(
    pool: &SshPool,
    runtime: &str,
    container_id: &str,
) -> Result<(), DevcontainerError> {
    let mut s = Script::new();
    s.command(runtime, &["start", container_id])?;
    let out = pool.run(&s).await?;
    if out.success() {
        Ok(())
    } else {
        Err(DevcontainerError::Up {
            message: out.stderr.trim().to_owned(),
        })
    }
}

/// Stops a container without removing it (a hibernating session's): its processes get
/// `SIGTERM`, then `SIGKILL` after 5 s. One already stopped is fine.
///
/// # Errors
/// [`DevcontainerError`], also when there is no such container.
pub async fn stop(
    pool: &SshPool,
    runtime: &str,
    container_id: &str,
) -> Result<(), DevcontainerError> {
    let mut s = Script::new();
    s.command(runtime, &["stop", "--time", "5", container_id])?;
    let out = pool.run(&s).await?;
    if out.success() {
        Ok(())
    } else {
        Err(DevcontainerError::Up {
            message: out.stderr.trim().to_owned(),
        })
    }
}

/// Removes a container (stopping it first).
///
/// # Errors
/// [`DevcontainerError`].
pub async fn remove(
    pool: &SshPool,
    runtime: &str,
    container_id: &str,
) -> Result<(), DevcontainerError> {
    let mut s = Script::new();
    s.command(runtime, &["rm", "--force", "--time", "5", container_id])?;
    let out = pool.run(&s).await?;
    if out.success() || out.stderr.contains("no such container") {
        Ok(())
    } else {
        Err(DevcontainerError::Up {
            message: out.stderr.trim().to_owned(),
        })
    }
}

/// Removes every container labelled with session `session_id` (stopping it first), and
/// nothing else: what a failed `devcontainer up` left behind.
///
/// # Errors
/// [`DevcontainerError`].
pub async fn remove_session_containers(
    pool: &SshPool,
    runtime: &str,
    session_id: &str,
) -> Result<(), DevcontainerError> {
    let mut s = Script::new();
    s.set("runtime", runtime)?
        .set("label", &format!("{LABEL_SESSION}={session_id}"))?
        .raw(r#"for id in $("$runtime" ps -a --no-trunc --quiet --filter "label=$label"); do "$runtime" rm --force --time 5 "$id" >/dev/null; done"#);
    let out = pool.run(&s).await?;
    if out.success() {
        Ok(())
    } else {
        Err(DevcontainerError::Up {
            message: last_lines(&out.stderr, 3),
        })
    }
}

/// Removes everything of a session on the VM: kills a `devcontainer up` still running for it
/// (its whole process group), removes every container labelled with the session and the
/// `vsc-…-uid` image tag `devcontainer up` built for each (one per workspace folder, so every
/// worktree would leave one behind), and deletes the session's directory
/// (its Claude Code state and generated configuration).
///
/// # Errors
/// [`DevcontainerError`].
pub async fn remove_session(
    pool: &SshPool,
    layout: &ContainerLayout,
    session_id: &str,
) -> Result<(), DevcontainerError> {
    let mut s = Script::new();
    s.set("rel", &session_dir_relative(layout, session_id)?)?
        .set("runtime", &layout.runtime)?
        .set("label", &format!("{LABEL_SESSION}={session_id}"))?
        .set("imagelock", &image_lock_path(layout))?
        .set("imagewait", &IMAGE_LOCK_WAIT_SECS.to_string())?
        .raw(r#"dir="$HOME/$rel""#)
        // INT, then TERM, then KILL for the process group. A `podman build`'s RUN step runs in
        // a session of its own under the build (`buildah-oci-runtime`), outside the group, and
        // an interrupted build leaves it running (podman 4.3): every process below `up`, listed
        // before the signals, gets KILL last.
        .raw(r#"sm_signal() { kill "-$1" -- "-$pid" 2>/dev/null || return 0; for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 -- "-$pid" 2>/dev/null || return 0; sleep 0.5; done; }"#)
        .set("below", BELOW)?
        .raw(r#"if [ -f "$dir/up.pid" ]; then pid=$(cat "$dir/up.pid"); case "$pid" in ''|*[!0-9]*) ;; *) tree=$(ps -eo pid=,ppid= | awk -v root="$pid" "$below"); sm_signal INT; sm_signal TERM; kill -KILL -- "-$pid" 2>/dev/null || true; [ -z "$tree" ] || kill -KILL $tree 2>/dev/null || true ;; esac"#)
        // Build containers the interrupted `up` left (buildah working containers carry no
        // labels: those that were not there before it started).
        .raw(r#"  for id in $("$runtime" ps -a --external --no-trunc --quiet 2>/dev/null); do if ! grep -qxF "$id" "$dir/external.before" 2>/dev/null && [ "$("$runtime" ps -a --external --no-trunc --filter "id=$id" --format '{{.Command}}' 2>/dev/null)" = buildah ]; then "$runtime" rm --force "$id" >/dev/null 2>&1 || true; fi; done"#)
        .raw("fi")
        .raw(r#"images=$("$runtime" ps -a --no-trunc --filter "label=$label" --format '{{.Image}}' 2>/dev/null | sort -u) || images="""#)
        .raw(r#"for id in $("$runtime" ps -a --no-trunc --quiet --filter "label=$label"); do "$runtime" rm --force --time 5 "$id" >/dev/null; done"#)
        // Only the CLI's per-folder `-uid` tags, never forced: one still used by a container
        // (another session on the same folder) stays, and so does every other image (the
        // sandbox image, a repository's built image).
        // In the background, detached: the wait for running `up`s must not hold up the
        // session's cleanup (nor outlast this command's timeout).
        .set("removeimages", REMOVE_IMAGES)?
        .raw(r#"images="$images" runtime="$runtime" imagelock="$imagelock" imagewait="$imagewait" setsid bash -c "$removeimages" </dev/null >/dev/null 2>&1 &"#)
        .raw(r#"rm -rf "$dir" 2>/dev/null || "$runtime" unshare rm -rf "$dir""#);
    let out = pool.run(&s).await?;
    if out.success() {
        Ok(())
    } else {
        Err(DevcontainerError::Up {
            message: last_lines(&out.stderr, 3),
        })
    }
}

/// Removes, of the images named in `$images`, those `devcontainer up` builds to give the
/// container user the VM user's uid (`vsc-<folder>-<hash>-uid`, with or without a registry and
/// tag) with `$runtime image rm`; a failure (the image is still in use) is ignored. Then it
/// removes the dangling images (`$runtime image prune`: untagged and used by no container),
/// which is what a repository's failed Dockerfile build leaves (its last good step), and an
/// image a rebuild replaced; a hostile repository failing its build at every start would
/// otherwise fill the VM's disk.
///
/// Rootless podman (4.3) fails other commands that look at images while one is removed ("image
/// not known" from `podman images`, "an error occurred setting up the container" from the
/// `devcontainer up` of another session), and a build's steps are dangling for a moment
/// between one step and the next, so each removal holds the image lock
/// ([`image_lock_path`], `$imagelock`, relative to the home directory) exclusively, waiting at
/// most [`IMAGE_LOCK_WAIT_SECS`]; every `devcontainer up` holds it shared. When the wait runs
/// out the images stay (a later session stop removes them). Each removal is bounded (120 s,
/// then TERM): every `devcontainer up` waits while it holds the lock, so a removal that hangs
/// must not stall every session start on the VM.
const REMOVE_IMAGES: &str = r#"for image in $images; do case "$image" in vsc-*-uid|vsc-*-uid:*|*/vsc-*-uid|*/vsc-*-uid:*) flock --close --exclusive --wait "$imagewait" "$HOME/$imagelock" timeout --kill-after=10 120 "$runtime" image rm "$image" >/dev/null 2>&1 || true ;; esac; done; flock --close --exclusive --wait "$imagewait" "$HOME/$imagelock" timeout --kill-after=10 120 "$runtime" image prune --force >/dev/null 2>&1 || true"#;

/// How long removing a session's `-uid` image waits for running `devcontainer up`s, seconds
/// (in the background: the session's cleanup does not wait for it).
pub const IMAGE_LOCK_WAIT_SECS: u32 = 300;

/// The image lock file, relative to the VM user's home: beside the sessions' directories.
fn image_lock_path(layout: &ContainerLayout) -> String {
    format!("{}/images.lock", layout.state_dir.trim_end_matches('/'))
}

/// A container carrying [`LABEL_MANAGED`], as the reconciler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    /// Full id.
    pub id: String,
    /// [`LABEL_SESSION`], when set (containers of older versions lack it).
    pub session: Option<String>,
    /// [`LABEL_WORKSPACE`], when set.
    pub workspace: Option<String>,
    /// [`LABEL_DEPLOYMENT`], when set (containers of older versions lack it).
    pub deployment: Option<String>,
    /// Whether it runs.
    pub running: bool,
}

/// Every container carrying [`LABEL_MANAGED`].
///
/// # Errors
/// [`DevcontainerError`].
pub async fn managed_containers(
    pool: &SshPool,
    runtime: &str,
) -> Result<Vec<ManagedContainer>, DevcontainerError> {
    let mut s = Script::new();
    s.command(
        runtime,
        &[
            "ps",
            "--all",
            "--no-trunc",
            "--filter",
            &format!("label={LABEL_MANAGED}=true"),
            "--format",
            "json",
        ],
    )?;
    let out = pool.run(&s).await?;
    if !out.success() {
        return Err(DevcontainerError::Output(last_lines(&out.stderr, 3)));
    }
    parse_ps(&out.stdout)
}

/// Reads `ps --format json` (podman: one JSON array).
fn parse_ps(stdout: &str) -> Result<Vec<ManagedContainer>, DevcontainerError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        id: String,
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
        #[serde(default)]
        state: String,
    }
    let text = stdout.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let entries: Vec<Entry> = serde_json::from_str(text)
        .map_err(|e| DevcontainerError::Output(format!("cannot read the container list ({e})")))?;
    Ok(entries
        .into_iter()
        .map(|e| {
            let labels = e.labels.unwrap_or_default();
            ManagedContainer {
                id: e.id,
                session: labels.get(LABEL_SESSION).cloned(),
                workspace: labels.get(LABEL_WORKSPACE).cloned(),
                deployment: labels.get(LABEL_DEPLOYMENT).cloned(),
                running: e.state.eq_ignore_ascii_case("running"),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What CI's `devcontainer up` printed when podman read an image record being written.
    const MANIFEST_RACE: &str = r#"[2026-12-07T03:23:25.411Z] Command failed: podman inspect --type image localhost/claude-sandbox:test
[2026-12-07T03:23:25.411Z] Error: locating item named "manifest" for image with ID "e146cf6b64880f78b11d6c4877287c2e5e11208c5314ca59a3b05036f4afe75f" (consider removing the image to resolve the issue): file does not exist
[2026-12-07T03:23:25.411Z] Command failed: podman pull localhost/claude-sandbox:test
Error: Command failed: podman pull localhost/claude-sandbox:test"#;

    const FAILED: &str = r#"{"outcome":"error","message":"Command failed: podman pull localhost/claude-sandbox:test","description":"An error occurred setting up the container."}"#;

    #[test]
    fn a_runtime_race_in_the_log_is_retryable_and_says_what_the_runtime_said() {
        let up = |log: &str| parse_up_output(FAILED, log).expect_err("failed");
        let race = up(MANIFEST_RACE);
        assert!(race.is_retryable(), "{race:?}");
        assert_eq!(
            race.to_string(),
            "devcontainer up failed: Command failed: podman pull localhost/claude-sandbox:test (An error occurred setting up the container.); the container runtime said: Error: locating item named \"manifest\" for image with ID \"e146cf6b64880f78b11d6c4877287c2e5e11208c5314ca59a3b05036f4afe75f\" (consider removing the image to resolve the issue): file does not exist"
        );
        assert!(up("Error: layer not known").is_retryable());
        let missing = up("Error: localhost/claude-sandbox:test: image not known");
        assert!(!missing.is_retryable(), "a missing image is not a race");
        let refused = up("Error: initializing source docker://localhost/claude-sandbox:test: pinging container registry localhost: connection refused");
        assert!(!refused.is_retryable(), "{refused:?}");
        assert!(matches!(refused, DevcontainerError::Up { .. }));
    }

    #[test]
    fn only_runtime_races_and_the_clis_uid_step_setup_failures_are_retried() {
        let glitch = DevcontainerError::Up {
            message: "Command failed: podman build -f /tmp/devcontainercli-claude/updateUID.Dockerfile-0.89.0 -t vsc-widgets-1558-uid (An error occurred setting up the container.)".into(),
        };
        assert!(glitch.is_retryable());
        let run = DevcontainerError::Up {
            message: "Command failed: podman run --sig-proxy=false -a STDOUT -a STDERR --mount type=bind,source=/w,target=/workspaces/widgets --userns=keep-id --network=host --entrypoint /bin/sh -l devcontainer.metadata=[{\"remoteUser\":\"claude\"}] vsc-widgets-3c1268935574f9b61ebd068d3e3597a12b200ee0fcbe9eca95c45491a400d51e-uid -c echo Container started (An error occurred setting up the container.)".into(),
        };
        assert!(run.is_retryable());
        let through_the_shim = DevcontainerError::Up {
            message: "Command failed: /home/claude/.local/share/session-manager/sessions/6f1c/runtime run --pull=never --sig-proxy=false -a STDOUT -a STDERR --entrypoint /bin/sh vsc-widgets-3c12-uid -c echo Container started (An error occurred setting up the container.)".into(),
        };
        assert!(through_the_shim.is_retryable());
        for other in [
            DevcontainerError::Up {
                message: "Command failed: podman build -f /work/repo/.devcontainer/Dockerfile (An error occurred setting up the container.)".into(),
            },
            DevcontainerError::Up {
                message: "updateUID.Dockerfile: no space left on device".into(),
            },
            DevcontainerError::Up {
                message: "Command failed: podman run --entrypoint /bin/sh localhost/vsc-widgets-uid-extra:latest -c echo (An error occurred setting up the container.)".into(),
            },
            DevcontainerError::Output("x".into()),
        ] {
            assert!(!other.is_retryable(), "{other}");
        }
    }

    /// A shim (polling every second, for session `s1`) in a temporary directory over a fake
    /// runtime that appends its arguments, one call a line, to `calls` and prints them; its
    /// `ps` also prints a container id, and its `events` then listens forever (it hears
    /// nothing, like a reader that lost the start).
    fn shim_over_fake() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("dir");
        let fake = dir.path().join("fake runtime");
        let calls = dir.path().join("calls");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nprintf '%s|' \"$@\" >> {calls}; echo >> {calls}\ncase \"$1\" in\nps) echo c0ffee ;;\nevents) printf '%s|' \"$@\"; echo; exec sleep 60 ;;\n*) printf '%s|' \"$@\" ;;\nesac\n",
                calls = crate::runtime::shell::quote(&calls.to_string_lossy()).expect("q")
            ),
        )
        .expect("fake");
        let shim = dir.path().join("shim");
        std::fs::write(
            &shim,
            runtime_shim(&fake.to_string_lossy(), "session-manager.session=s1", 1).expect("shim"),
        )
        .expect("write");
        for file in [&fake, &shim] {
            std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod");
        }
        (dir, shim, calls)
    }

    fn calls(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_runtime_shim_passes_everything_but_events_and_run_unchanged() {
        let (_dir, shim, _) = shim_over_fake();
        let run = |args: &[&str]| {
            let out = std::process::Command::new(&shim)
                .args(args)
                .output()
                .expect("shim ran");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(run(&["build", "-t", "a b"]), "build|-t|a b|");
        assert_eq!(run(&["-v"]), "-v|");
        // `run` never pulls: the image is there, or the run fails at once.
        assert_eq!(run(&["run", "--rm", "a b"]), "run|--pull=never|--rm|a b|");
    }

    #[test]
    fn the_runtime_shims_events_replay_and_show_the_sessions_running_containers() {
        use std::io::BufRead;
        let (_dir, shim, calls_file) = shim_over_fake();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let mut child = std::process::Command::new(&shim)
            .args(["events", "--format", "json", "--filter", "event=start"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("shim ran");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let next = || {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("a line from the shim")
        };
        // The reader, from two seconds back.
        let reader = next();
        let parts: Vec<&str> = reader.split('|').collect();
        assert_eq!(parts[..2], ["events", "--since"], "{reader}");
        let since: u64 = parts[2].parse().expect("a Unix time");
        assert!(since + 2 >= now && since <= now, "{since} vs {now}");
        assert_eq!(
            parts[3..],
            ["--format", "json", "--filter", "event=start", ""]
        );
        // The reader hears nothing; the session's running container comes as a start event,
        // and again at every poll.
        for _ in 0..2 {
            assert_eq!(
                next(),
                r#"{"ID":"c0ffee","Status":"start","Type":"container"}"#
            );
        }
        assert!(
            calls(&calls_file).contains(&"ps|--no-trunc|--quiet|--filter|label=session-manager.session=s1|--filter|status=running|".to_owned()),
            "{:?}",
            calls(&calls_file)
        );
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    #[test]
    fn the_runtime_shims_poller_outlives_its_reader_but_not_its_caller() {
        let (dir, shim, calls_file) = shim_over_fake();
        let pid_file = dir.path().join("reader.pid");
        // The caller (a shell standing in for the CLI) starts the shim, kills its reader at
        // once (as a reader that ends by itself), and leaves after 3 s.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#""$0" events & echo $! > "$1"; sleep 0.3; kill -KILL "$(cat "$1")"; sleep 3"#)
            .arg(&shim)
            .arg(&pid_file)
            .output()
            .expect("sh ran");
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            printed.contains(r#"{"ID":"c0ffee","Status":"start","Type":"container"}"#),
            "no start event after the reader ended: {printed}"
        );
        std::thread::sleep(Duration::from_millis(1500));
        let settled = calls(&calls_file).len();
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(
            calls(&calls_file).len(),
            settled,
            "the poller outlived its caller: {:?}",
            calls(&calls_file)
        );
    }

    #[test]
    fn every_process_below_up_is_found_and_nothing_else() {
        // `ps -eo pid=,ppid=` as the VM prints it (right-aligned): `up` is 10; the build's RUN
        // step (13, 14) sits below it in a session of its own; 20 and 21 are another session's.
        let listing = "    1     0\n   10     1\n   11    10\n   12    11\n   13    12\n   14    13\n   20     1\n   21    20\n";
        let mut child = std::process::Command::new("awk")
            .args(["-v", "root=10", BELOW])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("awk");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), listing.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("awk ran");
        let mut found: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().parse().expect("a pid"))
            .collect();
        found.sort_unstable();
        assert_eq!(found, [11, 12, 13, 14]);
    }

    #[test]
    fn only_the_clis_uid_images_are_removed_with_a_session_then_the_dangling_ones() {
        // The script's own line, with a runtime that reports what it is asked to remove.
        let matches = |image: &str| {
            let home = tempfile::tempdir().expect("home");
            let fake = home.path().join("fake-runtime");
            std::fs::write(&fake, "#!/bin/sh\necho \"$*\" >> \"$HOME/calls\"\n").expect("fake");
            std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod");
            let script = format!(
                r#"runtime="$HOME/fake-runtime"; imagelock=images.lock; imagewait=5; images="$1"; {REMOVE_IMAGES}; cat "$HOME/calls" 2>/dev/null"#
            );
            let out = std::process::Command::new("bash")
                .args(["-c", &script, "probe", image])
                .env("HOME", home.path())
                .output()
                .expect("bash");
            let calls = String::from_utf8_lossy(&out.stdout).into_owned();
            let calls: Vec<&str> = calls.lines().collect();
            assert_eq!(
                calls.last(),
                Some(&"image prune --force"),
                "the dangling images go last, whatever was named: {calls:?}"
            );
            match calls.as_slice() {
                [removed, _prune] => *removed == format!("image rm {image}"),
                [_prune] => false,
                other => panic!("unexpected calls: {other:?}"),
            }
        };
        for image in [
            "localhost/vsc-widgets-7fcc9e286d185b890dd7cf2aa6956d90d283849994b42f511aca6334bf28f00d-uid:latest",
            "vsc-widgets-4df05f4f-5827a6b19d3e81d012e2b49cc3ac37bd99a3da5d953549b5631d2cbc787cc259-uid",
            "localhost/vsc-with-devcontainer-1421856acf93-uid",
        ] {
            assert!(matches(image), "{image} is a -uid image");
        }
        for image in [
            "localhost/claude-sandbox:test",
            "localhost/claude-sandbox:07f91c851696",
            "claude-code:latest",
            "localhost/claude-sandbox:vsc-x-uid",
            "localhost/vsc-widgets-7fcc9e286d18",
            "localhost/vsc-widgets-7fcc9e286d18-features:latest",
            "localhost/vsc-widgets-uid-extra:latest",
        ] {
            assert!(!matches(image), "{image} is not a -uid image");
        }
    }

    #[test]
    fn images_are_removed_only_when_no_devcontainer_up_runs() {
        // A `devcontainer up` holds the lock shared (as `up` runs it) and logs when it ends;
        // the removal, started while it runs, must log after it.
        let home = tempfile::tempdir().expect("home");
        let log = home.path().join("order.log");
        let lock = home.path().join("images.lock");
        let mut up = std::process::Command::new("flock")
            .arg("--shared")
            .arg(&lock)
            .args(["bash", "-c", r#"sleep 1; echo up-done >> "$1""#, "up"])
            .arg(&log)
            .spawn()
            .expect("flock");
        // The holder has the lock once the lock file exists and a non-blocking exclusive try fails.
        while std::process::Command::new("flock")
            .args(["--exclusive", "--nonblock"])
            .arg(&lock)
            .arg("true")
            .status()
            .expect("flock")
            .success()
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let fake = home.path().join("fake-runtime");
        std::fs::write(&fake, "#!/bin/sh\necho \"$2 $3\" >> \"$log\"\n").expect("fake");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let script = format!(
            r#"runtime="$HOME/fake-runtime"; imagelock=images.lock; imagewait=30; images="localhost/vsc-w-1-uid"; {REMOVE_IMAGES}"#
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .env("HOME", home.path())
            .env("log", &log)
            .output()
            .expect("bash");
        assert!(out.status.success(), "{out:?}");
        assert!(up.wait().expect("up").success());
        let order = std::fs::read_to_string(&log).expect("log");
        assert_eq!(order, "up-done\nrm localhost/vsc-w-1-uid\nprune --force\n");
    }

    #[test]
    fn parses_success_and_error_outcomes() {
        let ok = "noise\n{\"outcome\":\"success\",\"containerId\":\"abc123\",\"remoteUser\":\"claude\",\"remoteWorkspaceFolder\":\"/workspaces/w\"}\n";
        let r = parse_up_output(ok, "").expect("success");
        assert_eq!(r.container_id, "abc123");
        assert_eq!(r.remote_user, "claude");
        assert_eq!(r.remote_workspace_folder, "/workspaces/w");
        let err = "{\"outcome\":\"error\",\"message\":\"Command failed\",\"description\":\"An error occurred setting up the container.\"}";
        match parse_up_output(err, "") {
            Err(DevcontainerError::Up { message }) => {
                assert!(
                    message.contains("Command failed") && message.contains("setting up"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse_up_output("", "log line\nlast"), Err(DevcontainerError::Output(m)) if m.contains("last"))
        );
        assert!(matches!(
            parse_up_output("{\"outcome\":\"success\"}", ""),
            Err(DevcontainerError::Output(_))
        ));
    }

    const CLEAN: &str = r#"[{"HostConfig":{"Privileged":false,"CapAdd":[],"Devices":[],"NetworkMode":"host","PidMode":"private","IpcMode":"shareable","UTSMode":"private","SecurityOpt":["label=disable"]},
      "Mounts":[{"Type":"bind","Source":"/ws/w","Destination":"/workspaces/w"},{"Type":"bind","Source":"/s/x/claude","Destination":"/session-manager/claude"},
                {"Type":"bind","Source":"/ws/w/.git/hooks","Destination":"/workspaces/w/.git/hooks","RW":false},
                {"Type":"bind","Source":"/ws/w/.git/config","Destination":"/workspaces/w/.git/config","RW":false},
                {"Type":"volume","Name":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef","Destination":"/var/lib/x"}],
      "NetworkSettings":{"Networks":{}}}]"#;

    #[test]
    fn a_clean_container_passes_and_each_widening_is_named() {
        assert_eq!(
            violations(CLEAN, "host", "/ws/w/", "/s/x", None),
            Vec::<String>::new()
        );
        let bad = CLEAN
            .replace("\"Privileged\":false", "\"Privileged\":true")
            .replace("\"CapAdd\":[]", "\"CapAdd\":[\"SYS_ADMIN\"]")
            .replace("\"PidMode\":\"private\"", "\"PidMode\":\"host\"")
            .replace(
                "[\"label=disable\"]",
                "[\"label=disable\",\"seccomp=unconfined\"]",
            )
            .replace("\"Source\":\"/ws/w\"", "\"Source\":\"/home/claude\"");
        let problems = violations(&bad, "host", "/ws/w", "/s/x", None).join("; ");
        for expected in [
            "--privileged",
            "SYS_ADMIN",
            "PID namespace",
            "seccomp=unconfined",
            "bind mount of /home/claude",
        ] {
            assert!(problems.contains(expected), "{expected} in {problems}");
        }
        let named = CLEAN.replace(
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "claude-config-shared",
        );
        assert!(
            violations(&named, "host", "/ws/w", "/s/x", None)[0].contains("claude-config-shared")
        );
        assert!(violations(CLEAN, "isolated", "/ws/w", "/s/x", None)[0].contains("network"));
        let isolated = CLEAN
            .replace("\"NetworkMode\":\"host\"", "\"NetworkMode\":\"bridge\"")
            .replace("\"Networks\":{}", "\"Networks\":{\"isolated\":{}}");
        assert!(violations(&isolated, "isolated", "/ws/w", "/s/x", None).is_empty());
        assert!(!violations("garbage", "host", "/ws/w", "/s/x", None).is_empty());
        // A worktree's git directory: allowed at its own path, and only when it is the one named.
        let git = CLEAN.replace("/ws/w/.git/", "/r/w/.git/").replace("/workspaces/w/.git/", "/r/w/.git/").replace(
            "\"Mounts\":[",
            "\"Mounts\":[{\"Type\":\"bind\",\"Source\":\"/r/w/.git\",\"Destination\":\"/r/w/.git\"},",
        );
        assert!(violations(&git, "host", "/ws/w", "/s/x", Some("/r/w/.git/")).is_empty());
        assert!(violations(&git, "host", "/ws/w", "/s/x", None)[0].contains("/r/w/.git"));
        assert!(!violations(&git, "host", "/ws/w", "/s/x", Some("/r/other/.git")).is_empty());
        let elsewhere = git.replace("\"Destination\":\"/r/w/.git\"", "\"Destination\":\"/etc\"");
        assert!(!violations(&elsewhere, "host", "/ws/w", "/s/x", Some("/r/w/.git")).is_empty());
    }

    #[test]
    fn the_clones_hooks_and_config_are_read_only_in_every_container() {
        // A main clone: its `.git/hooks` and `.git/config`, below the workspace's mount.
        assert!(violations(CLEAN, "host", "/ws/w", "/s/x", None).is_empty());
        let writable = CLEAN.replacen("\"RW\":false", "\"RW\":true", 1);
        let problems = violations(&writable, "host", "/ws/w", "/s/x", None).join("; ");
        assert!(
            problems.contains("bind mount of /ws/w/.git/hooks"),
            "{problems}"
        );
        assert!(
            problems.contains("/workspaces/w/.git/hooks writable"),
            "{problems}"
        );
        let unguarded = CLEAN.replace(",\"RW\":false", "").replace(
            "{\"Type\":\"bind\",\"Source\":\"/ws/w/.git/hooks\",\"Destination\":\"/workspaces/w/.git/hooks\"},",
            "",
        );
        let problems = violations(&unguarded, "host", "/ws/w", "/s/x", None).join("; ");
        assert!(
            problems.contains("/workspaces/w/.git/hooks writable"),
            "{problems}"
        );
        assert!(
            problems.contains("/workspaces/w/.git/config writable"),
            "{problems}"
        );
        // Read-only, but over another path: the real one stays writable.
        let elsewhere = CLEAN.replace(
            "\"Destination\":\"/workspaces/w/.git/config\"",
            "\"Destination\":\"/tmp/config\"",
        );
        let problems = violations(&elsewhere, "host", "/ws/w", "/s/x", None).join("; ");
        assert!(
            problems.contains("/workspaces/w/.git/config writable"),
            "{problems}"
        );
        // A worktree: the main clone's git directory at its own path, guarded there.
        let worktree = r#"[{"HostConfig":{"NetworkMode":"host"},"Mounts":[
            {"Type":"bind","Source":"/wt/a","Destination":"/workspaces/a"},
            {"Type":"bind","Source":"/r/w/.git","Destination":"/r/w/.git"},
            {"Type":"bind","Source":"/r/w/.git/hooks","Destination":"/r/w/.git/hooks","RW":false},
            {"Type":"bind","Source":"/r/w/.git/config","Destination":"/r/w/.git/config","RW":false}],
            "NetworkSettings":{"Networks":{}}}]"#;
        assert!(violations(worktree, "host", "/wt/a", "/s/x", Some("/r/w/.git")).is_empty());
        let open = worktree.replace(",\"RW\":false", ",\"RW\":true");
        let problems = violations(&open, "host", "/wt/a", "/s/x", Some("/r/w/.git")).join("; ");
        assert!(problems.contains("/r/w/.git/hooks writable"), "{problems}");
        assert!(problems.contains("/r/w/.git/config writable"), "{problems}");
        // What `up` adds to the configuration.
        let mut config = serde_json::json!({"image": "i"});
        guard_git_dir(
            &mut config,
            "/ws/w/.git",
            &format!("{}/.git", default_workspace_target("/ws/w/")),
        )
        .expect("guarded");
        assert_eq!(
            config["mounts"],
            serde_json::json!([
                "source=/ws/w/.git/hooks,target=/workspaces/w/.git/hooks,type=bind,readonly",
                "source=/ws/w/.git/config,target=/workspaces/w/.git/config,type=bind,readonly"
            ])
        );
        for bad in ["/r/a,target=/etc/.git", "/r/a=b/.git", "relative/.git"] {
            assert!(guard_git_dir(&mut config, bad, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_worktrees_git_directory_is_mounted_at_its_own_path() {
        let mut config =
            serde_json::json!({"image": "i", "mounts": ["source=/s,target=/t,type=bind"]});
        share_git_dir(&mut config, "/r/w/.git").expect("shared");
        assert_eq!(
            config["mounts"],
            serde_json::json!([
                "source=/s,target=/t,type=bind",
                "source=/r/w/.git,target=/r/w/.git,type=bind"
            ])
        );
        let mut bare = serde_json::json!({"image": "i"});
        share_git_dir(&mut bare, "/r/w/.git").expect("shared");
        assert_eq!(bare["mounts"].as_array().map(Vec::len), Some(1));
        for bad in ["/r/a,target=/etc/.git", "/r/a=b/.git", "relative/.git"] {
            assert!(share_git_dir(&mut bare, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_container_list_is_read_with_labels() {
        let list = r#"[{"Id":"aaa","Labels":{"session-manager.managed":"true","session-manager.session":"s1","session-manager.workspace":"/w"},"State":"running"},
                       {"Id":"bbb","Labels":null,"State":"exited"}]"#;
        let parsed = parse_ps(list).expect("list");
        assert_eq!(parsed[0].session.as_deref(), Some("s1"));
        assert!(parsed[0].running && !parsed[1].running);
        assert_eq!(parse_ps("").expect("empty"), Vec::new());
    }

    #[test]
    fn the_policy_is_read_case_insensitively() {
        assert_eq!(
            "Vetted".parse::<RepoConfigPolicy>().ok(),
            Some(RepoConfigPolicy::Vetted)
        );
        assert_eq!(
            "trusted".parse::<RepoConfigPolicy>().ok(),
            Some(RepoConfigPolicy::Trusted)
        );
        assert!("open".parse::<RepoConfigPolicy>().is_err());
    }
}
