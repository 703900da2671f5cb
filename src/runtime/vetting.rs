//! Vetting a repository's devcontainer configuration (`SM_REPO_DEVCONTAINER=vetted`).
//!
//! A repository's `.devcontainer/devcontainer.json` is written by whoever can open a pull
//! request, or by the agent itself. The devcontainer specification runs `initializeCommand` on
//! the host, copies `${localEnv:…}` from the host's environment, and passes `runArgs`, `mounts`,
//! `privileged`, `capAdd`, `securityOpt` and `workspaceMount` to the container runtime. So the
//! configuration is read with the devcontainer CLI itself (`devcontainer read-configuration`,
//! which parses JSONC; see [`super::devcontainer`] for how it is run) and rebuilt here from an
//! allow-list: what runs *inside* the container is kept (the image or Dockerfile build,
//! features from a registry, `containerEnv`, the in-container lifecycle commands, users,
//! customizations), everything that acts on the VM or widens the container is dropped and
//! listed, and the bot's own parts are added (the network, the session's private state mount).
//!
//! `${localEnv:NAME}` is recognised by value: `read-configuration` runs with every referenced
//! name set to a marker (`@@sm-localenv:NAME@@`), `HOME` set to a neutral directory and only
//! `PATH` real, so a value that contains a marker, the neutral home or the `PATH` came from the
//! VM's environment and is dropped.
//!
//! The same rules apply in `trusted` mode except that nothing is dropped (only the network and
//! the state mount are imposed).

use serde_json::{Map, Value};

/// Where the session's private Claude Code state (its `CLAUDE_CONFIG_DIR`) is mounted in every
/// container.
pub const CLAUDE_STATE_TARGET: &str = "/session-manager/claude";

/// The marker `read-configuration` substitutes for `${localEnv:NAME}` (`@@sm-localenv:NAME@@`).
pub const LOCALENV_MARKER: &str = "@@sm-localenv:";

/// Top-level keys kept as they are (after the `${localEnv:…}` check).
const KEPT: &[&str] = &[
    "name",
    "image",
    "containerUser",
    "remoteUser",
    "updateRemoteUserUID",
    "userEnvProbe",
    "overrideCommand",
    "shutdownAction",
    "init",
    "onCreateCommand",
    "updateContentCommand",
    "postCreateCommand",
    "postStartCommand",
    "postAttachCommand",
    "waitFor",
    "customizations",
    "forwardPorts",
    "portsAttributes",
    "otherPortsAttributes",
    "overrideFeatureInstallOrder",
];

/// Keys of `build` that are kept (`options` is dropped: those are `docker build` flags).
const BUILD_KEPT: &[&str] = &["dockerfile", "context", "args", "target", "cacheFrom"];

/// Environment variables a repository may not set for the agent: they redirect its API
/// traffic or its TLS trust.
fn agent_sensitive(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper.starts_with("ANTHROPIC_")
        || upper.starts_with("CLAUDE_")
        || matches!(
            upper.as_str(),
            "HTTP_PROXY"
                | "HTTPS_PROXY"
                | "ALL_PROXY"
                | "NO_PROXY"
                | "NODE_OPTIONS"
                | "NODE_TLS_REJECT_UNAUTHORIZED"
                | "NODE_EXTRA_CA_CERTS"
                | "SSL_CERT_FILE"
                | "SSL_CERT_DIR"
                | "LD_PRELOAD"
                | "LD_LIBRARY_PATH"
        )
}

/// How strict to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// Keep only what is allowed (`vetted`).
    Vetted,
    /// Keep everything (`trusted`).
    Trusted,
}

/// What the vetting needs to know about where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VetContext {
    /// `SM_CONTAINER_NETWORK`.
    pub network: String,
    /// The session's private directory on the VM (its `claude/` subdirectory is mounted at
    /// [`CLAUDE_STATE_TARGET`]).
    pub session_dir: String,
    /// The neutral `HOME` `read-configuration` ran with.
    pub neutral_home: String,
    /// The `PATH` it ran with.
    pub path: String,
}

/// A rebuilt configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Vetted {
    /// The configuration to start the container with.
    pub config: Value,
    /// What was left out, one short line each (`runArgs --privileged`, `initializeCommand`, …).
    pub dropped: Vec<String>,
    /// Absolute paths of the Dockerfile and build context, which must stay inside the
    /// workspace (checked on the VM, where symbolic links resolve).
    pub build_paths: Vec<String>,
}

/// Why a configuration cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VetError {
    /// `read-configuration` printed something else than its JSON.
    #[error("cannot read the repository's devcontainer configuration: {0}")]
    Unreadable(String),
}

/// The generated configuration for a repository without one (or `SM_REPO_DEVCONTAINER=ignore`):
/// `image` as the remote user `claude`, on the network, with the session's state mount. It is
/// `devcontainer/devcontainer.json` with those values filled in (a test keeps them equal).
pub fn fallback_config(image: &str, ctx: &VetContext) -> Value {
    let mut config = serde_json::json!({
        "image": image,
        "remoteUser": "claude",
    });
    impose(&mut config, ctx);
    config
}

/// The bot's own parts, whatever the repository says: the network and the state mount.
fn impose(config: &mut Value, ctx: &VetContext) {
    let Some(obj) = config.as_object_mut() else {
        return;
    };
    let given: Vec<Value> = obj
        .get("runArgs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut run_args = Vec::with_capacity(given.len() + 1);
    let mut skip_value = false;
    for arg in given {
        if std::mem::take(&mut skip_value) {
            continue; // the value of a two-word `--network X`
        }
        match arg.as_str() {
            Some(a) if is_network_arg(a) => skip_value = !a.contains('='),
            _ => run_args.push(arg),
        }
    }
    run_args.push(Value::String(format!("--network={}", ctx.network)));
    obj.insert("runArgs".into(), Value::Array(run_args));
    let mut mounts: Vec<Value> = obj
        .get("mounts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    mounts.push(Value::String(format!(
        "source={}/claude,target={CLAUDE_STATE_TARGET},type=bind",
        ctx.session_dir
    )));
    obj.insert("mounts".into(), Value::Array(mounts));
}

fn is_network_arg(arg: &str) -> bool {
    let flag = arg.split('=').next().unwrap_or(arg);
    matches!(flag, "--network" | "--net")
}

/// Rebuilds `read_configuration` (the JSON line `devcontainer read-configuration` printed).
///
/// # Errors
/// [`VetError::Unreadable`] when it is not that JSON.
pub fn vet(
    read_configuration: &str,
    strictness: Strictness,
    ctx: &VetContext,
) -> Result<Vetted, VetError> {
    let parsed: Value = serde_json::from_str(read_configuration.trim())
        .map_err(|e| VetError::Unreadable(format!("not JSON ({e})")))?;
    let original = parsed
        .get("configuration")
        .and_then(Value::as_object)
        .ok_or_else(|| VetError::Unreadable("no `configuration` object".into()))?;
    let config_dir = original
        .get("configFilePath")
        .and_then(|p| p.get("fsPath").or_else(|| p.get("path")))
        .and_then(Value::as_str)
        .and_then(|p| p.rsplit_once('/').map(|(dir, _)| dir.to_owned()))
        .unwrap_or_default();
    let mut dropped = Vec::new();
    let mut config = Map::new();
    for (key, value) in original {
        if key == "configFilePath" {
            continue;
        }
        if strictness == Strictness::Trusted {
            config.insert(key.clone(), value.clone());
            continue;
        }
        match key.as_str() {
            "build" => {
                if let Some(build) = vet_build(value, ctx, &mut dropped) {
                    config.insert(key.clone(), build);
                }
            }
            "features" => {
                if let Some(features) = vet_features(value, ctx, &mut dropped) {
                    config.insert(key.clone(), features);
                }
            }
            "containerEnv" | "remoteEnv" => {
                let env = vet_env(key, value, ctx, &mut dropped);
                config.insert(key.clone(), env);
            }
            "runArgs" => {
                let args = vet_run_args(value, ctx, &mut dropped);
                config.insert(key.clone(), args);
            }
            k if KEPT.contains(&k) => {
                if let Some(v) = clean(value, ctx, key, &mut dropped) {
                    config.insert(key.clone(), v);
                }
            }
            other => dropped.push(describe_dropped(other, value)),
        }
    }
    let mut build_paths = Vec::new();
    if let Some(build) = config.get_mut("build").and_then(Value::as_object_mut) {
        // Relative to the repository's configuration file, which the generated one is not
        // next to: made absolute, and checked to stay in the workspace.
        for (key, default) in [("dockerfile", "Dockerfile"), ("context", ".")] {
            let relative = build
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_owned();
            let absolute = if relative.starts_with('/') {
                relative
            } else {
                format!("{config_dir}/{relative}")
            };
            build.insert(key.into(), Value::String(absolute.clone()));
            build_paths.push(absolute);
        }
    }
    if strictness == Strictness::Vetted
        && !config.contains_key("image")
        && !config.contains_key("build")
    {
        dropped.push("the configuration names no image or build the bot can use".into());
    }
    let mut config = Value::Object(config);
    impose(&mut config, ctx);
    Ok(Vetted {
        config,
        dropped,
        build_paths,
    })
}

/// One line for a dropped top-level key.
fn describe_dropped(key: &str, value: &Value) -> String {
    let detail = match (key, value) {
        ("initializeCommand", _) => " (it would run on the VM)",
        ("mounts", _) => " (mounts of the VM or of other volumes)",
        ("workspaceMount", _) => " (a mount of the VM)",
        ("workspaceFolder", _) => " (goes with workspaceMount)",
        ("privileged", Value::Bool(false)) => "",
        ("privileged", _) => " (a privileged container)",
        ("capAdd", _) => " (added capabilities)",
        ("securityOpt", _) => " (security options)",
        ("appPort", _) => " (ports published on the VM)",
        ("dockerComposeFile" | "service" | "runServices", _) => {
            " (Docker Compose configurations are not supported)"
        }
        ("hostRequirements", _) => "",
        _ => "",
    };
    format!("`{key}`{detail}")
}

/// Whether a string came from the VM's environment.
fn from_vm_env(s: &str, ctx: &VetContext) -> bool {
    s.contains(LOCALENV_MARKER)
        || s.contains("${localEnv")
        || s.contains("${env:")
        || (!ctx.neutral_home.is_empty() && s.contains(&ctx.neutral_home))
        || (ctx.path.len() > 4 && s.contains(&ctx.path))
}

/// `value` without any string that came from the VM's environment; `None` when nothing is
/// left of it. `at` names where it is, for the dropped list.
fn clean(value: &Value, ctx: &VetContext, at: &str, dropped: &mut Vec<String>) -> Option<Value> {
    match value {
        Value::String(s) if from_vm_env(s, ctx) => {
            dropped.push(format!("`{at}` (uses ${{localEnv:…}})"));
            None
        }
        Value::Array(items) => {
            let mut kept = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if let Some(v) = clean(item, ctx, &format!("{at}[{i}]"), dropped) {
                    kept.push(v);
                }
            }
            Some(Value::Array(kept))
        }
        Value::Object(map) => {
            let mut kept = Map::new();
            for (k, v) in map {
                if let Some(v) = clean(v, ctx, &format!("{at}.{k}"), dropped) {
                    kept.insert(k.clone(), v);
                }
            }
            Some(Value::Object(kept))
        }
        other => Some(other.clone()),
    }
}

fn vet_build(value: &Value, ctx: &VetContext, dropped: &mut Vec<String>) -> Option<Value> {
    let build = value.as_object()?;
    let mut kept = Map::new();
    for (k, v) in build {
        if BUILD_KEPT.contains(&k.as_str()) {
            if let Some(v) = clean(v, ctx, &format!("build.{k}"), dropped) {
                kept.insert(k.clone(), v);
            }
        } else {
            dropped.push(format!("`build.{k}` (docker build options)"));
        }
    }
    Some(Value::Object(kept))
}

fn vet_features(value: &Value, ctx: &VetContext, dropped: &mut Vec<String>) -> Option<Value> {
    let features = value.as_object()?;
    let mut kept = Map::new();
    for (id, options) in features {
        if id.starts_with('.') || id.starts_with('/') {
            dropped.push(format!(
                "feature `{id}` (local features are not supported when vetted)"
            ));
            continue;
        }
        if let Some(options) = clean(options, ctx, &format!("features.{id}"), dropped) {
            kept.insert(id.clone(), options);
        }
    }
    Some(Value::Object(kept))
}

fn vet_env(key: &str, value: &Value, ctx: &VetContext, dropped: &mut Vec<String>) -> Value {
    let mut kept = Map::new();
    for (name, v) in value.as_object().into_iter().flatten() {
        if agent_sensitive(name) {
            dropped.push(format!(
                "`{key}.{name}` (it would change the agent's API or TLS settings)"
            ));
            continue;
        }
        if let Some(v) = clean(v, ctx, &format!("{key}.{name}"), dropped) {
            kept.insert(name.clone(), v);
        }
    }
    Value::Object(kept)
}

/// `runArgs` from an allow-list: flags that only shape the container from inside
/// (environment, labels, host name, resource limits, init). Everything else is dropped: it may
/// mount, publish, share namespaces or devices with the VM, or change the network.
fn vet_run_args(value: &Value, ctx: &VetContext, dropped: &mut Vec<String>) -> Value {
    const WITH_VALUE: &[&str] = &[
        "--env",
        "-e",
        "--label",
        "-l",
        "--hostname",
        "-h",
        "--shm-size",
        "--memory",
        "-m",
        "--memory-reservation",
        "--cpus",
        "--cpu-shares",
        "--pids-limit",
        "--stop-signal",
        "--stop-timeout",
    ];
    const ALONE: &[&str] = &["--init", "--rm", "--tty", "-t", "--interactive", "-i"];
    let args: Vec<&str> = value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let mut kept = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i];
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with('-') => (f, Some(v)),
            _ => (arg, None),
        };
        let takes_value = WITH_VALUE.contains(&flag);
        // A flag that is not allowed takes the next word with it when that is not a flag
        // itself (`-v /:/root`): both go.
        let unknown_with_value = !takes_value
            && !ALONE.contains(&flag)
            && flag.starts_with('-')
            && inline.is_none()
            && args.get(i + 1).is_some_and(|next| !next.starts_with('-'));
        let (value, used) = match (takes_value || unknown_with_value, inline) {
            (true, Some(v)) => (Some(v.to_owned()), 1),
            (true, None) => (args.get(i + 1).map(|v| (*v).to_owned()), 2),
            (false, _) => (None, 1),
        };
        let allowed = (takes_value || ALONE.contains(&flag)) && !is_network_arg(flag);
        let env_ok = match (flag, &value) {
            ("--env" | "-e", Some(v)) => {
                let name = v.split('=').next().unwrap_or(v);
                !agent_sensitive(name) && !from_vm_env(v, ctx) && v.contains('=')
            }
            _ => value.as_deref().is_none_or(|v| !from_vm_env(v, ctx)),
        };
        let shown: Vec<&str> = args[i..(i + used).min(args.len())].to_vec();
        if allowed && env_ok {
            kept.extend(shown.iter().map(|a| Value::String((*a).to_owned())));
        } else if is_network_arg(flag) {
            dropped.push(format!(
                "`runArgs {}` (the container runs on SM_CONTAINER_NETWORK)",
                shown.join(" ")
            ));
        } else {
            dropped.push(format!("`runArgs {}`", shown.join(" ")));
        }
        i += used;
    }
    Value::Array(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> VetContext {
        VetContext {
            network: "isolated".into(),
            session_dir: "/home/claude/.local/share/session-manager/sessions/s1".into(),
            neutral_home: "/home/claude/.local/share/session-manager/neutral-home".into(),
            path: "/home/claude/.local/bin:/usr/bin:/bin".into(),
        }
    }

    fn read(config: Value) -> String {
        json!({
            "configuration": config,
            "workspace": {"workspaceFolder": "/workspaces/w"}
        })
        .to_string()
    }

    #[test]
    fn a_hostile_configuration_keeps_only_what_runs_inside() {
        let hostile = json!({
            "name": "x",
            "build": {"dockerfile": "Dockerfile", "context": "..", "args": {"A": "@@sm-localenv:GH_TOKEN@@", "B": "b"}, "options": ["-v", "/:/host"]},
            "initializeCommand": "touch /tmp/pwned",
            "containerEnv": {"TOKEN": "@@sm-localenv:GH_TOKEN@@", "HOMEX": "/home/claude/.local/share/session-manager/neutral-home", "PLAIN": "v", "ANTHROPIC_BASE_URL": "http://evil"},
            "mounts": ["source=/home/claude,target=/host,type=bind"],
            "runArgs": ["--privileged", "--network=host", "-v", "/:/root", "--cap-add=SYS_ADMIN", "--env", "FOO=bar", "--label=x=y", "--device", "/dev/kvm", "--pid=host"],
            "privileged": true,
            "capAdd": ["NET_ADMIN"],
            "securityOpt": ["seccomp=unconfined"],
            "workspaceMount": "source=/,target=/workspace,type=bind",
            "workspaceFolder": "/workspace",
            "postCreateCommand": "echo hi",
            "postStartCommand": ["sh", "-c", "echo @@sm-localenv:GH_TOKEN@@"],
            "remoteUser": "claude",
            "features": {"./local": {}, "ghcr.io/devcontainers/features/node:1": {"version": "20"}},
            "configFilePath": {"fsPath": "/ws/.devcontainer/devcontainer.json"}
        });
        let v = vet(&read(hostile), Strictness::Vetted, &ctx()).expect("vetted");
        let c = &v.config;
        for gone in [
            "initializeCommand",
            "privileged",
            "capAdd",
            "securityOpt",
            "workspaceMount",
            "workspaceFolder",
        ] {
            assert!(c.get(gone).is_none(), "{gone} kept: {c}");
        }
        assert_eq!(
            c["runArgs"],
            json!(["--env", "FOO=bar", "--label=x=y", "--network=isolated"])
        );
        assert_eq!(
            c["mounts"],
            json!(["source=/home/claude/.local/share/session-manager/sessions/s1/claude,target=/session-manager/claude,type=bind"])
        );
        assert_eq!(c["containerEnv"], json!({"PLAIN": "v"}));
        assert_eq!(c["build"]["args"], json!({"B": "b"}));
        assert!(c["build"].get("options").is_none());
        assert_eq!(c["build"]["dockerfile"], "/ws/.devcontainer/Dockerfile");
        assert_eq!(c["build"]["context"], "/ws/.devcontainer/..");
        assert_eq!(
            v.build_paths,
            vec!["/ws/.devcontainer/Dockerfile", "/ws/.devcontainer/.."]
        );
        assert_eq!(c["postCreateCommand"], "echo hi");
        assert_eq!(c["postStartCommand"], json!(["sh", "-c"]));
        assert_eq!(
            c["features"],
            json!({"ghcr.io/devcontainers/features/node:1": {"version": "20"}})
        );
        let listed = v.dropped.join("\n");
        for shown in [
            "initializeCommand",
            "runArgs --privileged",
            "runArgs --network=host",
            "runArgs -v /:/root",
            "runArgs --cap-add=SYS_ADMIN",
            "runArgs --device /dev/kvm",
            "runArgs --pid=host",
            "`mounts`",
            "containerEnv.TOKEN",
            "containerEnv.HOMEX",
            "containerEnv.ANTHROPIC_BASE_URL",
            "build.options",
            "build.args.A",
            "feature `./local`",
            "`privileged`",
            "postStartCommand[2]",
        ] {
            assert!(listed.contains(shown), "{shown} not listed in:\n{listed}");
        }
        assert!(
            !c.to_string().contains("@@sm-localenv"),
            "no marker left: {c}"
        );
    }

    #[test]
    fn trusted_keeps_everything_but_the_network() {
        let config = json!({"image": "x", "initializeCommand": "echo", "runArgs": ["--privileged", "--net", "host"], "configFilePath": {"fsPath": "/ws/.devcontainer.json"}});
        let v = vet(&read(config), Strictness::Trusted, &ctx()).expect("trusted");
        assert_eq!(v.config["initializeCommand"], "echo");
        assert_eq!(
            v.config["runArgs"],
            json!(["--privileged", "--network=isolated"])
        );
        assert!(v.dropped.is_empty());
    }

    #[test]
    fn the_fallback_is_the_template_with_the_values_filled_in() {
        let c = fallback_config("localhost/claude-sandbox:test", &ctx());
        assert_eq!(c["image"], "localhost/claude-sandbox:test");
        assert_eq!(c["runArgs"], json!(["--network=isolated"]));
        assert_eq!(c["remoteUser"], "claude");
        assert!(c["mounts"][0]
            .as_str()
            .expect("mount")
            .ends_with("/sessions/s1/claude,target=/session-manager/claude,type=bind"));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(vet("not json", Strictness::Vetted, &ctx()).is_err());
        assert!(vet("{}", Strictness::Vetted, &ctx()).is_err());
    }
}
