//! Git on the VM: clones, branches and worktrees, as scripts run over SSH.
//!
//! Layout: the main clone of `org/repo` lives at `<SM_REPOS_BASE_PATH>/<host>/<org>/<repo>`;
//! worktrees at `<SM_WORKTREES_PATH>/<org>/<repo>/<name>`, each on a branch of its own name
//! (created from the requested branch, or from the clone's default branch).
//!
//! Credentials: private repositories are read with `GH_TOKEN` from the VM's environment,
//! handed to git by a credential helper given with `-c` for that one invocation. The token is
//! never part of a URL, never written to `.git/config`, and never on a command line (the
//! helper expands `$GH_TOKEN` when git asks for it).

use std::time::Duration;

use url::Url;

use super::shell::{QuoteError, Script};
use super::ssh::{SshError, SshPool};

/// Defines `git_auth`, which runs git with the one-shot credential helper. `credential.helper=`
/// first empties the helper list so no configured helper stores the token.
const GIT_AUTH: &str = r#"git_auth() { git -c credential.helper= -c 'credential.helper=!f() { test -n "${GH_TOKEN:-}" || exit 0; echo username=x-access-token; echo "password=${GH_TOKEN}"; }; f' "$@"; }"#;

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

    /// The storage lock name that guards a main clone.
    pub fn clone_lock(&self, org: &str, repo: &str) -> String {
        format!("clone:{}/{org}/{repo}", self.host())
    }
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

/// Clones `org/repo` if needed, checks out `branch` when given, fast-forwards if configured.
/// Returns the clone's path.
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
) -> Result<String, GitError> {
    let path = layout.clone_path(org, repo);
    let mut s = Script::new();
    s.raw("export GIT_TERMINAL_PROMPT=0")
        .raw(GIT_AUTH)
        .set("dest", &path)?
        .set("url", &layout.clone_url(org, repo))?
        .set("branch", branch.unwrap_or_default())?
        .set("pull", if layout.auto_pull { "yes" } else { "no" })?
        .raw(r#"if [ ! -d "$dest/.git" ]; then mkdir -p "$(dirname "$dest")"; git_auth clone --quiet -- "$url" "$dest"; fi"#)
        .raw(r#"cd "$dest""#)
        .raw(r#"if [ -n "$branch" ] || [ "$pull" = yes ]; then git_auth fetch --quiet --prune origin; fi"#)
        .raw(r#"if [ -n "$branch" ]; then if git show-ref --verify --quiet "refs/heads/$branch"; then git checkout --quiet "$branch" --; else git checkout --quiet -b "$branch" --track "origin/$branch" --; fi; fi"#)
        .raw(r#"if [ "$pull" = yes ]; then git_auth pull --quiet --ff-only; fi"#);
    run(pool, &s, timeout, "cloning the repository").await?;
    Ok(path)
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
    let mut s = Script::new();
    s.raw("export GIT_TERMINAL_PROMPT=0")
        .raw(GIT_AUTH)
        .set("url", &layout.clone_url(org, repo))?
        .raw(r#"if git_auth ls-remote -- "$url" HEAD >/dev/null 2>&1; then echo exists; else echo missing; fi"#);
    let out = pool.run_with_timeout(&s, timeout).await?;
    Ok(out.stdout.trim() == "exists")
}

/// Creates (or reuses) the worktree `name` of the main clone, on a branch named `name` made
/// from `branch` (or the clone's current branch). Returns its path.
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
) -> Result<String, GitError> {
    let path = layout.worktree_path(org, repo, name);
    let mut s = Script::new();
    s.set("clone", &layout.clone_path(org, repo))?
        .set("wt", &path)?
        .set("name", name)?
        .set("branch", branch.unwrap_or_default())?
        .raw(r#"if [ -e "$wt/.git" ]; then exit 0; fi"#)
        .raw(r#"cd "$clone""#)
        .raw("git worktree prune")
        .raw(r#"mkdir -p "$(dirname "$wt")""#)
        .raw(r#"base=HEAD; if [ -n "$branch" ]; then base="origin/$branch"; fi"#)
        .raw(r#"if git show-ref --verify --quiet "refs/heads/$name"; then git worktree add --quiet "$wt" "$name"; else git worktree add --quiet -b "$name" "$wt" "$base"; fi"#);
    run(pool, &s, timeout, "creating the worktree").await?;
    Ok(path)
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
    let mut s = Script::new();
    s.set("clone", &layout.clone_path(org, repo))?
        .set("wt", &layout.worktree_path(org, repo, name))?
        .raw(r#"cd "$clone""#)
        .raw(r#"if [ -e "$wt" ]; then git worktree remove --force "$wt"; fi"#)
        .raw("git worktree prune");
    run(pool, &s, timeout, "removing the worktree").await
}

async fn run(
    pool: &SshPool,
    script: &Script,
    timeout: Duration,
    step: &'static str,
) -> Result<(), GitError> {
    let out = pool.run_with_timeout(script, timeout).await?;
    if out.success() {
        return Ok(());
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
        let local = layout("file:///var/lib/sm-testbed/git");
        assert_eq!(local.host(), "local");
        assert_eq!(
            local.clone_url("acme", "x"),
            "file:///var/lib/sm-testbed/git/acme/x.git"
        );
    }

    #[test]
    fn the_token_only_appears_as_a_variable_reference() {
        assert!(GIT_AUTH.contains("${GH_TOKEN}"));
        assert!(!GIT_AUTH.contains("https://"), "never in a URL");
        assert!(GIT_AUTH.starts_with("git_auth() { git -c credential.helper= "));
    }
}
