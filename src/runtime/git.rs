//! Git on the VM: clones, branches and worktrees, as scripts run over SSH.
//!
//! Layout: the main clone of `org/repo` lives at `<SM_REPOS_BASE_PATH>/<host>/<org>/<repo>`;
//! worktrees at `<SM_WORKTREES_PATH>/<org>/<repo>/<name>`.
//!
//! # Branches
//! `org/repo@branch` means "work on `branch`": when the remote has it, it is checked out (the
//! main clone tracks it; a worktree gets it, or a branch of its own made from it when another
//! checkout holds it); when it does not exist yet, it is created from the default branch
//! (without an upstream, so a push creates it on the remote) and the result says so. A
//! worktree without a branch gets a new branch named after the worktree, from the clone's
//! current commit.
//!
//! # Nothing a container wrote runs on the VM
//! A main-clone session has the clone's `.git` inside its container, so anything in it may have
//! been written by the agent (see git's documentation of hooks, `core.fsmonitor`,
//! `core.hooksPath` and of `safe.directory`/`protocol.*.allow`). Every git command therefore
//! runs as `sm_git`: with `core.hooksPath=/dev/null` (no hook runs), `core.fsmonitor=false`,
//! `core.sshCommand=ssh`, `core.pager=cat`, `protocol.ext.allow=never` and no credential
//! helper. Before git touches an existing clone, [`SANITIZE`] removes from its local config
//! every key that makes git run a program or send credentials elsewhere (filters, textconv and
//! merge drivers, includes, `url.*.insteadOf`, `credential.*`, `http.*`, `core.askPass`, …),
//! and checks that `remote.origin.url` is still `<SM_GIT_BASE_URL>/<org>/<repo>.git`: a
//! changed one is put back and reported ([`GitNote`]), never fetched from. It also empties the
//! clone's `.git/hooks` of everything but git's own `*.sample` files: containers mount that
//! directory read-only, so what is there was written before (by an older version's container,
//! a trusted configuration, or by hand) and would run in every container on the repository.
//!
//! # Credentials
//! Private repositories are read with `GH_TOKEN` from the VM's environment. The scrubbed
//! environment of every script ([`super::shell`]) keeps it only in an unexported variable; git
//! gets it for one invocation, with a credential helper configured for the origin of
//! `SM_GIT_BASE_URL` only, which also checks the host git asks about. The token is never part
//! of a URL, never written to `.git/config`, and never on a command line.

use std::time::Duration;

use url::Url;

use super::shell::{QuoteError, Script};
use super::ssh::{CommandOutput, SshError, SshPool};

/// Functions every git script defines (fixed text): `sm_git`, `git_auth`, `sm_sanitize`,
/// `sm_check_origin`. They expect `sm_gh_token` (set by the scrubbed environment),
/// `sm_git_scope`, `sm_git_host` and `url` to be set.
const GIT_PRELUDE: &str = r#"export GIT_TERMINAL_PROMPT=0
sm_git() { git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c core.sshCommand=ssh -c core.pager=cat -c protocol.ext.allow=never -c credential.helper= "$@"; }
sm_helper='!f() { test "${1:-}" = get || exit 0; test -n "${GH_TOKEN:-}" || exit 0; h=; while IFS= read -r l; do case "$l" in host=*) h=${l#host=} ;; esac; done; test "$h" = "${SM_GIT_HOST:-}" || exit 0; echo username=x-access-token; echo "password=${GH_TOKEN}"; }; f'
git_auth() { GH_TOKEN="$sm_gh_token" SM_GIT_HOST="$sm_git_host" sm_git -c "credential.$sm_git_scope.helper=$sm_helper" "$@"; }"#;

/// Defines `sm_sanitize DIR` and `sm_check_origin DIR` (fixed text). Each change is reported on
/// stdout as `sm-note=<kind>:<detail>`.
pub const SANITIZE: &str = r#"sm_sanitize() {
  sm_git -C "$1" config --local --name-only --list 2>/dev/null | while IFS= read -r sm_k; do
    case "$(printf '%s' "$sm_k" | tr '[:upper:]' '[:lower:]')" in
      core.fsmonitor|core.hookspath|core.sshcommand|core.pager|core.editor|core.askpass|core.gitproxy|core.worktree|core.alternaterefscommand|core.attributesfile|core.excludesfile|\
      include.*|includeif.*|filter.*|diff.external|diff.*.textconv|diff.*.command|merge.*.driver|\
      remote.*.uploadpack|remote.*.receivepack|remote.*.proxy|remote.*.vcs|remote.*.pushurl|\
      url.*|credential.*|http.*|protocol.*|gpg.*|ssh.*|pager.*|sequence.editor|uploadpack.*|receive.*|submodule.*|alias.*|extensions.worktreeconfig)
        printf 'sm-note=config:%s\n' "$sm_k"
        sm_git -C "$1" config --local --unset-all "$sm_k" 2>/dev/null || true ;;
    esac
  done
  sm_h="$1/.git/hooks"
  if [ -L "$sm_h" ]; then printf 'sm-note=hook:hooks/ (a symbolic link)\n'; rm -f -- "$sm_h"; fi
  if [ -d "$sm_h" ]; then
    for sm_f in "$sm_h"/* "$sm_h"/.[!.]*; do
      [ -e "$sm_f" ] || [ -L "$sm_f" ] || continue
      case "$sm_f" in *.sample) if [ -f "$sm_f" ] && [ ! -L "$sm_f" ]; then continue; fi ;; esac
      printf 'sm-note=hook:%s\n' "${sm_f##*/}"
      rm -rf -- "$sm_f" 2>/dev/null || true
    done
  fi
}
sm_check_origin() {
  sm_actual=$(sm_git -C "$1" config --local --get remote.origin.url 2>/dev/null || true)
  if [ "$sm_actual" != "$url" ]; then
    printf 'sm-note=origin:%s\n' "$(printf '%s' "$sm_actual" | tr '\n' ' ' | head -c 300)"
    sm_git -C "$1" remote set-url origin "$url" 2>/dev/null || sm_git -C "$1" remote add origin "$url"
  fi
}
sm_default_branch() { sm_git symbolic-ref --quiet --short refs/remotes/origin/HEAD 2>/dev/null || echo HEAD; }"#;

/// Where repositories come from and go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitLayout {
    /// `SM_GIT_BASE_URL`, e.g. `https://github.com` (a `file://` URL in tests).
    pub base_url: Url,
    /// `SM_REPOS_BASE_PATH`.
    pub repos_base: String,
    /// `SM_WORKTREES_PATH`.
    pub worktrees_base: String,
    /// `SM_AUTO_PULL`: fast-forward the main clone before a session.
    pub auto_pull: bool,
}

impl GitLayout {
    /// The host part of the clone path: the base URL's host, or `local` for `file://`.
    pub fn host(&self) -> String {
        self.base_url.host_str().unwrap_or("local").to_owned()
    }

    /// `<base>/<org>/<repo>.git`.
    pub fn clone_url(&self, org: &str, repo: &str) -> String {
        format!(
            "{}/{org}/{repo}.git",
            self.base_url.as_str().trim_end_matches('/')
        )
    }

    /// `<repos>/<host>/<org>/<repo>`.
    pub fn clone_path(&self, org: &str, repo: &str) -> String {
        format!(
            "{}/{}/{org}/{repo}",
            self.repos_base.trim_end_matches('/'),
            self.host()
        )
    }

    /// `<worktrees>/<org>/<repo>/<name>`.
    pub fn worktree_path(&self, org: &str, repo: &str, name: &str) -> String {
        format!(
            "{}/{org}/{repo}/{name}",
            self.worktrees_base.trim_end_matches('/')
        )
    }

    /// The storage lock name that guards a main clone ([`clone_lock`]).
    pub fn clone_lock(&self, org: &str, repo: &str) -> String {
        clone_lock(&self.host(), org, repo)
    }

    /// The storage lock name that gives a worktree to one session ([`worktree_lock`]).
    pub fn worktree_lock(&self, org: &str, repo: &str, name: &str) -> String {
        worktree_lock(&self.host(), org, repo, name)
    }

    /// The URL git's credential configuration is scoped to: the base URL's scheme, host and
    /// port (`credential.<url>.helper`).
    pub fn credential_scope(&self) -> String {
        let url = &self.base_url;
        match url.port() {
            Some(port) => format!("{}://{}:{port}", url.scheme(), url.host_str().unwrap_or("")),
            None => format!("{}://{}", url.scheme(), url.host_str().unwrap_or("")),
        }
    }

    /// The `host` git's credential protocol names for the base URL (`host[:port]`).
    pub fn credential_host(&self) -> String {
        let host = self.base_url.host_str().unwrap_or("");
        match self.base_url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        }
    }

    /// A script with the git functions, for `org/repo` (whose URL is `$url`).
    fn script(&self, org: &str, repo: &str) -> Result<Script, QuoteError> {
        let mut s = Script::new();
        s.set("url", &self.clone_url(org, repo))?
            .set("sm_git_scope", &self.credential_scope())?
            .set("sm_git_host", &self.credential_host())?
            .raw(GIT_PRELUDE)
            .raw(SANITIZE);
        Ok(s)
    }
}

/// The storage lock name that guards the main clone of `org/repo` on `host`
/// (`clone:<host>/<org>/<repo>`): held by the one session working in it.
pub fn clone_lock(host: &str, org: &str, repo: &str) -> String {
    format!("clone:{host}/{org}/{repo}")
}

/// The storage lock name that gives worktree `name` of `org/repo` on `host` to one session
/// (`worktree:<host>/<org>/<repo>/<name>`).
pub fn worktree_lock(host: &str, org: &str, repo: &str, name: &str) -> String {
    format!("worktree:{host}/{org}/{repo}/{name}")
}

/// Something git work did that the thread should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitNote {
    /// The branch did not exist and was made from `base` (the default branch).
    BranchCreated {
        /// The new branch.
        branch: String,
        /// What it was made from.
        base: String,
    },
    /// The branch is checked out elsewhere, so the worktree got `own`, made from it.
    BranchOfBranch {
        /// The worktree's branch.
        own: String,
        /// The branch it was made from.
        from: String,
    },
    /// `remote.origin.url` had been changed (to this value, as found); it was put back and
    /// not used.
    OriginChanged(String),
    /// A local configuration key that makes git run programs or send credentials was removed.
    ConfigRemoved(String),
    /// A hook (anything in the clone's `.git/hooks` but git's own `*.sample` files) was
    /// removed: git in every container on the repository would have run it.
    HookRemoved(String),
}

impl GitNote {
    /// One line for the thread (values in code spans, cut to a readable length).
    pub fn line(&self) -> String {
        match self {
            Self::BranchCreated { branch, base } => format!(
                "Branch {} did not exist: made it from {}",
                code(branch),
                code(base)
            ),
            Self::BranchOfBranch { own, from } => format!(
                "Branch {} is checked out elsewhere: this worktree works on {}, made from it",
                code(from),
                code(own)
            ),
            Self::OriginChanged(found) => format!(
                "⚠️ The clone's remote.origin.url had been changed to {} (from inside a session); it was put back and not used",
                code(found)
            ),
            Self::ConfigRemoved(key) => format!(
                "⚠️ Removed {} from the clone's git configuration (it could run programs on the VM)",
                code(key)
            ),
            Self::HookRemoved(name) => format!(
                "⚠️ Removed the hook {} from the clone's `.git/hooks` (it would run in every session's container on this repository)",
                code(name)
            ),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        let rest = line.trim_end().strip_prefix("sm-note=")?;
        let (kind, detail) = rest.split_once(':')?;
        Some(match kind {
            "branch-created" => {
                let (branch, base) = detail.split_once(':')?;
                Self::BranchCreated {
                    branch: branch.to_owned(),
                    base: base.to_owned(),
                }
            }
            "branch-of-branch" => {
                let (own, from) = detail.split_once(':')?;
                Self::BranchOfBranch {
                    own: own.to_owned(),
                    from: from.to_owned(),
                }
            }
            "origin" => Self::OriginChanged(detail.to_owned()),
            "config" => Self::ConfigRemoved(detail.to_owned()),
            "hook" => Self::HookRemoved(detail.to_owned()),
            _ => return None,
        })
    }
}

/// A value from the VM in a code span, without backticks or control characters, cut to 120
/// characters.
fn code(value: &str) -> String {
    let clean: String = value
        .chars()
        .filter(|c| !c.is_control() && !crate::text::is_invisible(*c))
        .map(|c| if c == '`' { '\'' } else { c })
        .take(120)
        .collect();
    format!("`{clean}`")
}

/// The notes a script printed.
fn notes(out: &CommandOutput) -> Vec<GitNote> {
    out.stdout.lines().filter_map(GitNote::parse).collect()
}

/// A workspace made ready for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    /// Its path on the VM.
    pub path: String,
    /// What was done that the thread should hear about.
    pub notes: Vec<GitNote>,
}

/// Errors from git work.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// A value could not be quoted.
    #[error(transparent)]
    Quote(#[from] QuoteError),
    /// SSH failed.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// Git failed; its message.
    #[error("{step} failed: {message}")]
    Failed {
        /// What was being done.
        step: &'static str,
        /// The last lines git printed.
        message: String,
    },
}

/// Clones `org/repo` if needed and makes it safe to use, checks out `branch` when given
/// (creating it from the default branch when the remote has none), fast-forwards if
/// configured. Returns the clone's path and what was done.
///
/// # Errors
/// [`GitError`].
pub async fn ensure_clone(
    pool: &SshPool,
    layout: &GitLayout,
    org: &str,
    repo: &str,
    branch: Option<&str>,
    timeout: Duration,
) -> Result<Workspace, GitError> {
    let path = layout.clone_path(org, repo);
    let mut s = layout.script(org, repo)?;
    s.set("dest", &path)?
        .set("branch", branch.unwrap_or_default())?
        .set("pull", if layout.auto_pull { "yes" } else { "no" })?
        .raw(r#"if [ ! -d "$dest/.git" ]; then mkdir -p "$(dirname "$dest")"; git_auth clone --quiet -- "$url" "$dest"; fi"#)
        .raw(r#"cd "$dest""#)
        .raw("sm_sanitize .")
        .raw("sm_check_origin .")
        .raw(r#"if [ -n "$branch" ] || [ "$pull" = yes ]; then git_auth fetch --quiet --prune origin; fi"#)
        .raw(r#"if [ -n "$branch" ]; then
  if sm_git show-ref --verify --quiet "refs/heads/$branch"; then sm_git checkout --quiet "$branch" --
  elif sm_git show-ref --verify --quiet "refs/remotes/origin/$branch"; then sm_git checkout --quiet -b "$branch" --track "origin/$branch" --
  else base=$(sm_default_branch); sm_git checkout --quiet --no-track -b "$branch" "$base" --; printf 'sm-note=branch-created:%s:%s\n' "$branch" "$base"; fi
fi"#)
        .raw(r#"if [ "$pull" = yes ] && sm_git rev-parse --abbrev-ref --symbolic-full-name '@{u}' >/dev/null 2>&1; then git_auth pull --quiet --ff-only; fi"#);
    let out = run(pool, &s, timeout, "cloning the repository").await?;
    Ok(Workspace {
        path,
        notes: notes(&out),
    })
}

/// Whether `org/repo` exists and can be read (`git ls-remote`, with `GH_TOKEN` as for clones).
///
/// # Errors
/// [`GitError`] when the check itself cannot run.
pub async fn repo_exists(
    pool: &SshPool,
    layout: &GitLayout,
    org: &str,
    repo: &str,
    timeout: Duration,
) -> Result<bool, GitError> {
    let mut s = layout.script(org, repo)?;
    s.raw(r#"if git_auth ls-remote -- "$url" HEAD >/dev/null 2>&1; then echo exists; else echo missing; fi"#);
    let out = pool.run_with_timeout(&s, timeout).await?;
    Ok(out.stdout.trim() == "exists")
}

/// Creates (or reuses) the worktree `name` of the main clone (see the module documentation
/// for the branch it gets). Returns its path and what was done.
///
/// # Errors
/// [`GitError`].
pub async fn ensure_worktree(
    pool: &SshPool,
    layout: &GitLayout,
    org: &str,
    repo: &str,
    branch: Option<&str>,
    name: &str,
    timeout: Duration,
) -> Result<Workspace, GitError> {
    let path = layout.worktree_path(org, repo, name);
    let mut s = layout.script(org, repo)?;
    s.set("clone", &layout.clone_path(org, repo))?
        .set("wt", &path)?
        .set("name", name)?
        .set("branch", branch.unwrap_or_default())?
        .raw(r#"cd "$clone""#)
        .raw("sm_sanitize .")
        .raw("sm_check_origin .")
        .raw(r#"if [ -e "$wt/.git" ]; then exit 0; fi"#)
        .raw("sm_git worktree prune")
        .raw(r#"mkdir -p "$(dirname "$wt")""#)
        .raw(r#"if [ -n "$branch" ]; then
  git_auth fetch --quiet --prune origin
  if ! sm_git show-ref --verify --quiet "refs/heads/$branch"; then
    if sm_git show-ref --verify --quiet "refs/remotes/origin/$branch"; then sm_git branch --quiet --track "$branch" "origin/$branch"
    else base=$(sm_default_branch); sm_git branch --quiet --no-track "$branch" "$base"; printf 'sm-note=branch-created:%s:%s\n' "$branch" "$base"; fi
  fi
  if sm_git worktree list --porcelain | grep -qxF "branch refs/heads/$branch"; then
    if sm_git show-ref --verify --quiet "refs/heads/$name"; then sm_git worktree add --quiet "$wt" "$name"; else sm_git worktree add --quiet -b "$name" "$wt" "$branch"; fi
    printf 'sm-note=branch-of-branch:%s:%s\n' "$name" "$branch"
  else
    sm_git worktree add --quiet "$wt" "$branch"
  fi
elif sm_git show-ref --verify --quiet "refs/heads/$name"; then sm_git worktree add --quiet "$wt" "$name"
else sm_git worktree add --quiet -b "$name" "$wt" HEAD; fi"#);
    let out = run(pool, &s, timeout, "creating the worktree").await?;
    Ok(Workspace {
        path,
        notes: notes(&out),
    })
}

/// Makes an existing clone of `org/repo` safe again ([`SANITIZE`]: its configuration, origin
/// and hooks) without touching its checkout. Returns what was removed or put back.
///
/// # Errors
/// [`GitError`].
pub async fn sanitize(
    pool: &SshPool,
    layout: &GitLayout,
    org: &str,
    repo: &str,
    timeout: Duration,
) -> Result<Vec<GitNote>, GitError> {
    let mut s = layout.script(org, repo)?;
    s.set("clone", &layout.clone_path(org, repo))?
        .raw(r#"cd "$clone""#)
        .raw("sm_sanitize .")
        .raw("sm_check_origin .");
    let out = run(pool, &s, timeout, "checking the clone").await?;
    Ok(notes(&out))
}

/// Removes a worktree with `git worktree remove` and prunes the clone's records of it.
///
/// # Errors
/// [`GitError`].
pub async fn remove_worktree(
    pool: &SshPool,
    layout: &GitLayout,
    org: &str,
    repo: &str,
    name: &str,
    timeout: Duration,
) -> Result<(), GitError> {
    let mut s = layout.script(org, repo)?;
    s.set("clone", &layout.clone_path(org, repo))?
        .set("wt", &layout.worktree_path(org, repo, name))?
        .raw(r#"cd "$clone""#)
        .raw("sm_sanitize . >/dev/null")
        .raw(r#"if [ -e "$wt" ]; then sm_git worktree remove --force "$wt"; fi"#)
        .raw("sm_git worktree prune");
    run(pool, &s, timeout, "removing the worktree")
        .await
        .map(|_| ())
}

async fn run(
    pool: &SshPool,
    script: &Script,
    timeout: Duration,
    step: &'static str,
) -> Result<CommandOutput, GitError> {
    let out = pool.run_with_timeout(script, timeout).await?;
    if out.success() {
        return Ok(out);
    }
    let message = out
        .stderr
        .lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    Err(GitError::Failed {
        step,
        message: if message.is_empty() {
            format!("exit status {:?}", out.status)
        } else {
            message
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(base: &str) -> GitLayout {
        GitLayout {
            base_url: Url::parse(base).expect("url"),
            repos_base: "/home/claude/repos/".into(),
            worktrees_base: "/home/claude/worktrees".into(),
            auto_pull: false,
        }
    }

    #[test]
    fn paths_follow_the_layout() {
        let l = layout("https://github.com");
        assert_eq!(l.host(), "github.com");
        assert_eq!(
            l.clone_url("acme", "widgets"),
            "https://github.com/acme/widgets.git"
        );
        assert_eq!(
            l.clone_path("acme", "widgets"),
            "/home/claude/repos/github.com/acme/widgets"
        );
        assert_eq!(
            l.worktree_path("acme", "widgets", "w-1"),
            "/home/claude/worktrees/acme/widgets/w-1"
        );
        assert_eq!(
            l.clone_lock("acme", "widgets"),
            "clone:github.com/acme/widgets"
        );
        assert_eq!(l.credential_scope(), "https://github.com");
        assert_eq!(l.credential_host(), "github.com");
        let local = layout("file:///var/lib/sm-testbed/git");
        assert_eq!(local.host(), "local");
        assert_eq!(
            local.clone_url("acme", "x"),
            "file:///var/lib/sm-testbed/git/acme/x.git"
        );
        let http = layout("http://127.0.0.1:8080/git");
        assert_eq!(http.credential_scope(), "http://127.0.0.1:8080");
        assert_eq!(http.credential_host(), "127.0.0.1:8080");
    }

    #[test]
    fn the_token_only_appears_as_a_variable_reference() {
        assert!(GIT_PRELUDE.contains("GH_TOKEN=\"$sm_gh_token\""));
        assert!(!GIT_PRELUDE.contains("https://"), "never in a URL");
        assert!(GIT_PRELUDE.contains("-c core.hooksPath=/dev/null"));
    }

    #[test]
    fn notes_are_read_and_shown_inert() {
        let out = CommandOutput {
            status: Some(0),
            stdout: "noise\nsm-note=branch-created:feature-x:origin/main\nsm-note=origin:http://evil/`x`\nsm-note=config:core.fsmonitor\nsm-note=hook:post-`checkout`\n".into(),
            stderr: String::new(),
        };
        let notes = notes(&out);
        assert_eq!(
            notes,
            vec![
                GitNote::BranchCreated {
                    branch: "feature-x".into(),
                    base: "origin/main".into()
                },
                GitNote::OriginChanged("http://evil/`x`".into()),
                GitNote::ConfigRemoved("core.fsmonitor".into()),
                GitNote::HookRemoved("post-`checkout`".into()),
            ]
        );
        assert_eq!(
            notes[3].line().matches('`').count(),
            4,
            "{}",
            notes[3].line()
        );
        assert_eq!(
            notes[1].line().matches('`').count(),
            2,
            "one code span, its backticks neutralised"
        );
    }

    /// The sanitizer and the wrapper against a real local repository with a hostile
    /// configuration: nothing it names runs, and every dangerous key is gone.
    #[test]
    fn a_hostile_local_config_runs_nothing_and_is_cleaned() {
        let dir = tempfile::tempdir().expect("dir");
        let repo = dir.path().join("r");
        let canary = dir.path().join("ran");
        let sh = |script: &str| {
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(script)
                .env("HOME", dir.path())
                .output()
                .expect("bash");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let touch = format!("touch {}", canary.display());
        sh(&format!(
            "set -e; git init -q {r}; cd {r}; git -c user.email=a@b -c user.name=a commit -q --allow-empty -m one; \
             printf '#!/bin/sh\\n{touch}\\n' > .git/hooks/post-checkout; chmod +x .git/hooks/post-checkout; \
             printf '#!/bin/sh\\n' > .git/hooks/pre-commit.sample; \
             git config core.fsmonitor '{touch}'; git config filter.evil.smudge '{touch}'; git config filter.evil.clean '{touch}'; \
             echo '* filter=evil' > .gitattributes; git config url.http://evil/.insteadOf file://; git config core.askPass '{touch}'",
            r = repo.display()
        ));
        let mut s = Script::new();
        s.set("url", "file:///expected/acme/r.git")
            .and_then(|s| s.set("sm_git_scope", "file://"))
            .and_then(|s| s.set("sm_git_host", ""))
            .expect("q");
        s.raw(GIT_PRELUDE).raw(SANITIZE);
        s.set("repo", &repo.display().to_string()).expect("q");
        s.raw(r#"cd "$repo"; sm_sanitize .; sm_check_origin ."#)
            .raw("sm_git checkout --quiet -b other; sm_git status --short >/dev/null; sm_git checkout --quiet -")
            .raw("sm_git config --local --list");
        let out = sh(&s.render());
        assert!(!canary.exists(), "a hook, fsmonitor, filter or askpass ran");
        for key in [
            "core.fsmonitor",
            "filter.evil.smudge",
            "url.http://evil/.insteadof",
            "core.askpass",
        ] {
            assert!(
                out.contains(&format!("sm-note=config:{key}")),
                "{key} reported: {out}"
            );
            assert!(
                !out.to_lowercase().contains(&format!("\n{key}=")),
                "{key} removed: {out}"
            );
        }
        assert!(
            out.contains("sm-note=origin:"),
            "the missing origin is reported"
        );
        assert!(out.contains("remote.origin.url=file:///expected/acme/r.git"));
        // The planted hook is gone and reported; git's own samples stay, unreported.
        assert!(out.contains("sm-note=hook:post-checkout"), "{out}");
        assert!(!repo.join(".git/hooks/post-checkout").exists());
        assert!(repo.join(".git/hooks/pre-commit.sample").exists());
        assert!(!out.contains(".sample"), "{out}");
    }
}
