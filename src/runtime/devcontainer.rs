//! Devcontainers on the VM: `devcontainer up`, and the container the agent runs in.
//!
//! A repository's own `.devcontainer/devcontainer.json` or `.devcontainer.json` (JSONC) is
//! used as it is. Without one, [`fallback_config`] is written to a directory the bot owns on
//! the VM (never into the repository) and passed with `--config`.
//!
//! Containers the bot starts carry its own labels ([`LABEL_MANAGED`], [`LABEL_WORKSPACE`]),
//! given to `devcontainer up` as `--id-label`, so the same workspace reuses its container and
//! the bot can find every container it made. Ids are always compared in full (`--no-trunc`).
//!
//! `devcontainer up` prints one JSON line on stdout (`@devcontainers/cli` 0.89):
//! `{"outcome":"success","containerId","remoteUser","remoteWorkspaceFolder"}` or
//! `{"outcome":"error","message","description"}`; its logs go to stderr.

use std::time::Duration;

use serde_json::{json, Value};

use super::shell::{QuoteError, Script};
use super::ssh::{SshError, SshPool};

/// Label on every container the bot starts.
pub const LABEL_MANAGED: &str = "session-manager.managed";
/// Label carrying the workspace folder on the VM.
pub const LABEL_WORKSPACE: &str = "session-manager.workspace";

/// How containers are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerLayout {
    /// `SM_CONTAINER_RUNTIME` (`podman` or `docker`).
    pub runtime: String,
    /// `SM_CONTAINER_IMAGE`, for the fallback configuration.
    pub image: String,
    /// `SM_CONTAINER_NETWORK`, for the fallback configuration.
    pub network: String,
    /// Where generated configurations are written on the VM.
    pub config_dir: String,
    /// `SM_DEVCONTAINER_TIMEOUT_SECS`.
    pub up_timeout: Duration,
}

/// What `devcontainer up` reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpResult {
    /// Full container id.
    pub container_id: String,
    /// User the agent runs as.
    pub remote_user: String,
    /// The workspace inside the container.
    pub remote_workspace_folder: String,
    /// Whether the repository's own configuration was used.
    pub own_config: bool,
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
    /// The output could not be read.
    #[error("unexpected output from devcontainer up: {0}")]
    Output(String),
}

/// The configuration used when a repository has none: `SM_CONTAINER_IMAGE` on
/// `SM_CONTAINER_NETWORK`, running as `claude`, with the shared volumes that keep Claude's
/// configuration and conversations (`--resume` needs them) across containers. It is
/// `devcontainer/devcontainer.json` with those two values filled in (a test keeps them equal).
pub fn fallback_config(image: &str, network: &str) -> Value {
    json!({
        "image": image,
        "remoteUser": "claude",
        "runArgs": [format!("--network={network}")],
        "mounts": [
            "source=claude-config-shared,target=/home/claude/.claude,type=volume",
            "source=claude-mem-shared,target=/home/claude/.claude-mem,type=volume"
        ]
    })
}

/// Runs `devcontainer up` for `workspace` (a path on the VM). `config_name` names the
/// generated fallback file (e.g. the session id) when the repository has no configuration.
///
/// # Errors
/// [`DevcontainerError`]; an error outcome carries the CLI's message.
pub async fn up(
    pool: &SshPool,
    layout: &ContainerLayout,
    workspace: &str,
    config_name: &str,
) -> Result<UpResult, DevcontainerError> {
    let config_path = format!(
        "{}/{config_name}/devcontainer.json",
        layout.config_dir.trim_end_matches('/')
    );
    let fallback = fallback_config(&layout.image, &layout.network).to_string();
    let mut s = Script::new();
    s.set("ws", workspace)?
        .set("cfg", &config_path)?
        .set("fallback", &fallback)?
        .set("runtime", &layout.runtime)?
        .set("managed", &format!("{LABEL_MANAGED}=true"))?
        .set("wslabel", &format!("{LABEL_WORKSPACE}={workspace}"))?
        .raw(r#"set -- --docker-path "$runtime" --workspace-folder "$ws" --id-label "$managed" --id-label "$wslabel""#)
        .raw(r#"if [ -f "$ws/.devcontainer/devcontainer.json" ] || [ -f "$ws/.devcontainer.json" ]; then echo "own-config" >&2; own=yes; else mkdir -p "$(dirname "$cfg")"; printf '%s\n' "$fallback" > "$cfg"; own=no; set -- "$@" --config "$cfg"; fi"#)
        .raw(r#"devcontainer up "$@" </dev/null 2>"$cfg.log.$$" && status=0 || status=$?"#)
        .raw(r#"echo "own=$own""#)
        .raw(r#"tail -n 20 "$cfg.log.$$" >&2 2>/dev/null; rm -f "$cfg.log.$$""#)
        .raw(r#"exit "$status""#);
    // The generated file's directory must exist for the log even with an own config.
    let mut prepared = Script::new();
    prepared
        .set("cfg", &config_path)?
        .raw(r#"mkdir -p "$(dirname "$cfg")""#);
    pool.run(&prepared).await?;
    let out = pool.run_with_timeout(&s, layout.up_timeout).await?;
    let own_config = out.stdout.lines().any(|l| l.trim() == "own=yes");
    parse_up_output(&out.stdout, &out.stderr).map(|mut r| {
        r.own_config = own_config;
        r
    })
}

/// Reads the JSON result line of `devcontainer up` from its stdout.
///
/// # Errors
/// [`DevcontainerError::Up`] for an error outcome, [`DevcontainerError::Output`] when no
/// result line is found.
pub fn parse_up_output(stdout: &str, stderr: &str) -> Result<UpResult, DevcontainerError> {
    let result = stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.get("outcome").is_some());
    let Some(result) = result else {
        let tail: String = stderr
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(DevcontainerError::Output(format!(
            "no result line; last log lines:\n{tail}"
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
        return Err(DevcontainerError::Up { message });
    }
    let container_id = field("containerId");
    if container_id.is_empty() {
        return Err(DevcontainerError::Output(
            "success without a containerId".into(),
        ));
    }
    Ok(UpResult {
        container_id,
        remote_user: Some(field("remoteUser"))
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "root".into()),
        remote_workspace_folder: field("remoteWorkspaceFolder"),
        own_config: false,
    })
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

/// Full ids of every container carrying [`LABEL_MANAGED`].
///
/// # Errors
/// [`DevcontainerError`].
pub async fn managed_containers(
    pool: &SshPool,
    runtime: &str,
) -> Result<Vec<String>, DevcontainerError> {
    let mut s = Script::new();
    s.command(
        runtime,
        &[
            "ps",
            "--all",
            "--no-trunc",
            "--quiet",
            "--filter",
            &format!("label={LABEL_MANAGED}=true"),
        ],
    )?;
    let out = pool.run(&s).await?;
    Ok(out
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_fallback_uses_image_network_and_shared_volumes() {
        let c = fallback_config("localhost/claude-sandbox:test", "isolated");
        assert_eq!(c["image"], "localhost/claude-sandbox:test");
        assert_eq!(c["runArgs"][0], "--network=isolated");
        let mounts = c["mounts"].to_string();
        assert!(mounts.contains("claude-config-shared") && mounts.contains("claude-mem-shared"));
        assert_eq!(c["remoteUser"], "claude");
    }
}
