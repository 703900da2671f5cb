//! Bringing a session's workspace and container up (or, after a bot restart, finding them
//! again), and what can go wrong doing it.

use crate::chat::progress::Progress;
use crate::runtime::devcontainer::{
    self, ConfigSource, ContainerState, DevcontainerError, RepoConfigPolicy,
};
use crate::runtime::git::{self, GitError, Workspace};
use crate::store::{ContainerDetails, EndReason, LockOutcome, Session, StoreError};

use super::{short_id, AgentContainer, Manager, SessionPlan};

/// How many times `devcontainer up` is tried when it fails in a way another try is likely to
/// get past ([`DevcontainerError::is_retryable`]).
const UP_TRIES: u32 = 3;
/// The pause before another try, times the tries so far.
const UP_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a session could not be brought up. Each variant knows what the user should do
/// ([`StartError::hint`]) and why the session ends ([`StartError::end_reason`]); its `Display`
/// is the message shown in the thread.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another session works in the main clone.
    #[error("the main clone of `{slug}` is in use by session `{}`", short_id(.holder))]
    CloneInUse {
        /// `org/repo`.
        slug: String,
        /// The session holding the clone.
        holder: String,
    },
    /// Another session works in the worktree.
    #[error("the worktree `{name}` of `{slug}` belongs to session `{}`", short_id(.holder))]
    WorktreeInUse {
        /// `org/repo`.
        slug: String,
        /// The worktree's name.
        name: String,
        /// The session holding it.
        holder: String,
    },
    /// The clone or worktree lock could not be taken (storage).
    #[error("cannot lock the clone: {0}")]
    Lock(#[source] StoreError),
    /// Cloning or checking out failed.
    #[error("{0}")]
    Clone(#[source] GitError),
    /// Making the worktree failed.
    #[error("{0}")]
    Worktree(#[source] GitError),
    /// `devcontainer up` failed.
    #[error("{0}")]
    Container(#[source] DevcontainerError),
    /// The container could not be recorded (storage).
    #[error("cannot record the container: {0}")]
    Record(#[source] StoreError),
    /// Resuming a session that never got a container.
    #[error("this session never got a container")]
    NoContainer,
    /// Resuming a session whose container is gone.
    #[error("its container is gone (removed or lost with the VM)")]
    ContainerGone {
        /// `org/repo`, for the hint.
        slug: String,
    },
    /// Resuming: the container could not be checked or started again.
    #[error("cannot check the container: {0}")]
    Inspect(#[source] DevcontainerError),
    /// The agent did not start.
    #[error("{0}")]
    Agent(#[source] super::agent::AgentError),
    /// A stop arrived while the session was starting.
    #[error("stopped while starting")]
    Stopped,
}

impl StartError {
    /// What the user can do about it (Markdown).
    pub fn hint(&self) -> String {
        match self {
            Self::CloneInUse { slug, .. } => format!(
                "start with `--worktree` to work in a separate worktree, e.g. `start {slug} --worktree`"
            ),
            Self::WorktreeInUse { slug, .. } => format!(
                "pick another worktree name, or `--worktree` alone for one of its own, e.g. `start {slug} --worktree`"
            ),
            Self::Lock(_) | Self::Record(_) => "try again".into(),
            Self::Clone(_) => "check the repository and branch names, and that GH_TOKEN on the VM can read a private repository".into(),
            Self::Worktree(_) => "check that the branch exists".into(),
            Self::Container(_) => "check the repository's devcontainer.json, or SM_CONTAINER_IMAGE and the container runtime on the VM".into(),
            Self::NoContainer | Self::Stopped => "start a new session".into(),
            Self::ContainerGone { slug } => format!("start a new session for `{slug}`"),
            Self::Inspect(_) => "try `!restart` later".into(),
            Self::Agent(_) => "check that the Claude Code CLI is installed in the container image and that its credentials are set on the VM (SM_CONTAINER_ENV)".into(),
        }
    }

    /// Why the session ends.
    pub fn end_reason(&self) -> EndReason {
        match self {
            Self::Lock(_) | Self::Record(_) | Self::Inspect(_) => EndReason::Error,
            Self::ContainerGone { .. } => EndReason::ContainerGone,
            Self::Stopped => EndReason::UserRequested,
            Self::CloneInUse { .. }
            | Self::WorktreeInUse { .. }
            | Self::Clone(_)
            | Self::Worktree(_)
            | Self::Container(_)
            | Self::NoContainer
            | Self::Agent(_) => EndReason::StartFailed,
        }
    }

    /// The thread's message: what failed and what to do. The error is made inert
    /// ([`crate::chat::render::neutralize`]): it may quote the repository or the VM.
    pub fn report(&self) -> String {
        format!(
            "❌ {}\n\n**What to do:** {}",
            crate::chat::render::neutralize(&self.to_string()),
            self.hint()
        )
    }
}

/// The thread's notice for a container made again because it lacked `missing` (phrases of
/// [`devcontainer::verify`], which may quote the container's mounts: neutralized).
fn remade_notice(missing: &[String]) -> String {
    crate::chat::render::neutralize(&format!(
        "🔒 This session's container lacked protections the bot now requires ({}); it is made again. The workspace and the conversation are kept; what was installed in the container outside the workspace is not.",
        missing.join("; ")
    ))
}

impl Manager {
    /// Clone (or worktree) and container, or, when resuming, the existing container.
    pub(super) async fn prepare(
        &self,
        plan: &mut SessionPlan,
        mut progress: Option<&mut Progress>,
    ) -> Result<(), StartError> {
        let session = plan.session.clone();
        let runtime = &self.config.containers.runtime;
        if plan.resume {
            let container = session
                .container_id
                .as_deref()
                .ok_or(StartError::NoContainer)?;
            let state = match devcontainer::inspect(&self.ssh, runtime, container).await {
                Ok(ContainerState::Gone) => {
                    return Err(StartError::ContainerGone {
                        slug: session.repo_slug(),
                    })
                }
                Ok(state) => state,
                Err(e) => return Err(StartError::Inspect(e)),
            };
            // The container is there: run the agent in it as recorded, if it still has every
            // protection this version requires. (A session of an older version recorded no
            // details: `devcontainer up` below finds its container, and checks it.)
            if let Some(details) = &session.container {
                let missing = self
                    .missing_protections(&session, container, details)
                    .await
                    .map_err(StartError::Inspect)?;
                if missing.is_empty() {
                    if state == ContainerState::Stopped {
                        devcontainer::start(&self.ssh, runtime, container)
                            .await
                            .map_err(StartError::Inspect)?;
                    }
                    plan.container = Some(AgentContainer {
                        id: container.to_owned(),
                        user: details.user.clone(),
                        folder: details.folder.clone(),
                        private_state: true,
                    });
                    return Ok(());
                }
                // Made before this version's protections, or under other settings: made again
                // (the workspace and the conversation are kept), as `up` below does.
                tracing::warn!(session = %session.id, container, ?missing, "the session's container lacks protections this version requires; making it again");
                self.say(&session, &remade_notice(&missing)).await;
                devcontainer::remove(&self.ssh, runtime, container)
                    .await
                    .map_err(StartError::Inspect)?;
                // What that container could write (hooks, configuration) is taken out of the
                // clone before any container on it runs git again.
                let notes = git::sanitize(
                    &self.ssh,
                    &self.config.git,
                    &session.repo_org,
                    &session.repo_name,
                    self.config.git_timeout,
                )
                .await
                .map_err(StartError::Clone)?;
                if !notes.is_empty() {
                    let lines: Vec<String> = notes.iter().map(git::GitNote::line).collect();
                    self.say(
                        &session,
                        &crate::chat::render::neutralize(&lines.join("\n")),
                    )
                    .await;
                }
            }
        } else if let Some(p) = progress.as_deref_mut() {
            p.step(&format!("Cloning `{}`", session.repo_slug())).await;
        }
        let workspace = match (&session.workspace_path, plan.resume) {
            (Some(path), true) => path.clone(),
            _ => {
                let Workspace { path, notes } = self.prepare_workspace(&session).await?;
                tracing::info!(session = %session.id, ?notes, "workspace ready");
                if let Some(p) = progress.as_deref_mut() {
                    for note in &notes {
                        p.note(&note.line());
                    }
                }
                path
            }
        };
        if let (false, Some(p)) = (plan.resume, progress.as_deref_mut()) {
            p.step("Starting the container").await;
        }
        // A worktree's git data lives in the main clone's `.git`: its container needs it too.
        let git_dir = self.shared_git_dir(&session);
        let git_dir = git_dir.as_deref();
        let containers = &self.config.containers_of(&session);
        let mut tries = 0;
        let up = loop {
            tries += 1;
            match devcontainer::up(&self.ssh, containers, &workspace, git_dir, &session.id).await
            {
                Err(e) if e.is_retryable() && tries < UP_TRIES => {
                    tracing::warn!(session = %session.id, error = %e, tries, "devcontainer up failed in a way another try is likely to get past; trying again");
                    // What the failed try created is removed, so the next one starts clean.
                    if let Err(e) = devcontainer::remove_session_containers(
                        &self.ssh,
                        &containers.runtime,
                        &session.id,
                    )
                    .await
                    {
                        tracing::warn!(session = %session.id, error = %e, "cannot remove the failed try's containers");
                    }
                    tokio::time::sleep(UP_RETRY_DELAY * tries).await;
                }
                other => break other,
            }
        }
        .map_err(StartError::Container)?;
        if let Some(p) = progress {
            match up.source {
                ConfigSource::Vetted if up.dropped.is_empty() => {
                    p.note("The repository's devcontainer.json is used as it is (nothing needed dropping).");
                }
                ConfigSource::Vetted => {
                    p.note("Left out of the repository's devcontainer.json (it would act on the VM or widen the container):");
                    for line in &up.dropped {
                        p.note(&format!("• {line}"));
                    }
                }
                ConfigSource::Trusted => p.note("⚠️ The repository's devcontainer.json is used as it is (SM_REPO_DEVCONTAINER=trusted)."),
                ConfigSource::Generated => {}
            }
        }
        if let Err(e) = self
            .store
            .record_container(&up.container_id, &self.config.vm_host, &workspace)
            .await
        {
            tracing::warn!(error = %e, "cannot record the container");
        }
        let details = ContainerDetails {
            session_dir: up.session_dir.clone(),
            user: up.remote_user.clone(),
            folder: up.remote_workspace_folder.clone(),
        };
        self.store
            .set_session_container(
                &session.id,
                Some(&up.container_id),
                Some(&workspace),
                Some(&details),
            )
            .await
            .map_err(StartError::Record)?;
        plan.session.container_id = Some(up.container_id.clone());
        plan.session.workspace_path = Some(workspace);
        plan.session.container = Some(details);
        plan.container = Some(AgentContainer {
            id: up.container_id,
            user: up.remote_user,
            folder: up.remote_workspace_folder,
            private_state: true,
        });
        Ok(())
    }

    /// The main clone's `.git` (as configured), which a worktree session's container shares;
    /// `None` for a session in the main clone.
    fn shared_git_dir(&self, session: &Session) -> Option<String> {
        session.worktree.as_ref().map(|_| {
            format!(
                "{}/.git",
                self.config
                    .git
                    .clone_path(&session.repo_org, &session.repo_name)
            )
        })
    }

    /// What the session's existing container lacks of the protections this version's
    /// settings require ([`devcontainer::verify_existing`]); empty when it has them all, and
    /// always empty under `SM_REPO_DEVCONTAINER=trusted` (a repository's configuration then
    /// runs as written).
    async fn missing_protections(
        &self,
        session: &Session,
        container: &str,
        details: &ContainerDetails,
    ) -> Result<Vec<String>, DevcontainerError> {
        let containers = self.config.containers_of(session);
        let Some(workspace) = session.workspace_path.as_deref() else {
            return Ok(Vec::new());
        };
        if containers.repo_config == RepoConfigPolicy::Trusted {
            return Ok(Vec::new());
        }
        let git_dir = self.shared_git_dir(session);
        devcontainer::verify_existing(
            &self.ssh,
            &containers,
            container,
            workspace,
            &details.session_dir,
            git_dir.as_deref(),
        )
        .await
    }

    /// Starts the session's container again when it was stopped (by hand, or by a VM restart)
    /// so a lost agent can be resumed in it.
    pub(super) async fn revive_container(&self, container_id: &str) -> Result<(), StartError> {
        let runtime = &self.config.containers.runtime;
        match devcontainer::inspect(&self.ssh, runtime, container_id).await {
            Ok(ContainerState::Stopped) => {
                tracing::info!(
                    container = container_id,
                    "the session's container was stopped; starting it again"
                );
                devcontainer::start(&self.ssh, runtime, container_id)
                    .await
                    .map_err(StartError::Inspect)
            }
            Ok(_) => Ok(()),
            Err(e) => Err(StartError::Inspect(e)),
        }
    }

    /// The main clone (locked for this session) or a worktree of it (likewise). Returns its
    /// path and what git did that the thread should hear about.
    async fn prepare_workspace(&self, session: &Session) -> Result<Workspace, StartError> {
        let git = &self.config.git;
        let (org, repo) = (&session.repo_org, &session.repo_name);
        let lock = match &session.worktree {
            None => git.clone_lock(org, repo),
            Some(name) => git.worktree_lock(org, repo, name),
        };
        match self.store.try_lock(&lock, &session.id).await {
            Ok(LockOutcome::Acquired) => {}
            Ok(LockOutcome::Held { holder }) => {
                return Err(match &session.worktree {
                    None => StartError::CloneInUse {
                        slug: session.repo_slug(),
                        holder,
                    },
                    Some(name) => StartError::WorktreeInUse {
                        slug: session.repo_slug(),
                        name: name.clone(),
                        holder,
                    },
                })
            }
            Err(e) => return Err(StartError::Lock(e)),
        }
        let clone_branch = match session.worktree {
            None => session.branch.as_deref(),
            Some(_) => None,
        };
        let timeout = self.config.git_timeout;
        let clone = git::ensure_clone(&self.ssh, git, org, repo, clone_branch, timeout)
            .await
            .map_err(StartError::Clone)?;
        match &session.worktree {
            None => Ok(clone),
            Some(name) => {
                let mut worktree = git::ensure_worktree(
                    &self.ssh,
                    git,
                    org,
                    repo,
                    session.branch.as_deref(),
                    name,
                    timeout,
                )
                .await
                .map_err(StartError::Worktree)?;
                let mut notes = clone.notes;
                notes.append(&mut worktree.notes);
                worktree.notes = notes;
                Ok(worktree)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remade_notice_lists_what_was_missing_and_mentions_nobody() {
        // An old trusted container's mounts are named by the repository.
        let notice = remade_notice(&[
            "a read-only mount of /w/.git/hooks".to_owned(),
            "a bind mount of /srv/@channel".to_owned(),
        ]);
        assert!(
            notice.contains("a read-only mount of /w/.git/hooks"),
            "{notice}"
        );
        assert!(!notice.contains("@channel"), "{notice}");
        assert!(notice.contains("channel"), "{notice}");
    }
}
