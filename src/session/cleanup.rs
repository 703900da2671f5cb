//! Ending a session, exactly once: whoever wins [`Store::claim_stop`](crate::store::Store::claim_stop)
//! (an explicit `stop`, the agent's own exit, a failed start, a restart that finds it stopping)
//! runs [`Manager::cleanup`].

use std::time::Duration;

use tracing::{error, info, warn};

use crate::runtime::{devcontainer, git};
use crate::store::{EndReason, Session, SessionKind, StoreError};
use crate::telemetry::names;

use super::{short_id, Manager};

/// How often listing an orchestrator's children is tried before its cleanup reports failure.
const CHILDREN_ATTEMPTS: u32 = 5;

impl Manager {
    /// Posts a line in the session's thread.
    pub(super) async fn say(&self, session: &Session, text: &str) {
        if let Err(e) = self
            .chat
            .post(&session.channel_id, Some(&session.thread_id), text)
            .await
        {
            warn!(error = %e, session = %session.id, "cannot post in the session thread");
        }
    }

    /// Ends a session from inside its actor: cleans up if nobody else has claimed it.
    pub(super) async fn finish(&self, session_id: &str, reason: EndReason, detail: Option<String>) {
        match self.store.claim_stop(session_id).await {
            Ok(Some(session)) => self.cleanup(session, reason, detail).await,
            Ok(None) => {} // someone else (an explicit stop) cleans up
            Err(e) => {
                error!(error = %e, session = session_id, "cannot claim the session for cleanup; the next start of the bot finishes it");
            }
        }
    }

    /// Cleanup of a session whose stop was claimed (state `stopping`). Each step is tried even
    /// when an earlier one failed; failures are logged and told in the thread.
    pub(super) async fn cleanup(
        &self,
        session: Session,
        reason: EndReason,
        detail: Option<String>,
    ) {
        self.forget(&session.id);
        let mut problems = Vec::new();
        if session.kind == SessionKind::Orchestrator {
            if let Err(e) = self.stop_children(&session).await {
                problems.push(format!("stopping its sessions: {e}"));
            }
        }
        let layout = &self.config.containers;
        // Whatever runs or was made for the session: a `devcontainer up` still under way, its
        // containers (found by label), its private directory.
        if let Err(e) = devcontainer::remove_session(&self.ssh, layout, &session.id).await {
            problems.push(format!("removing the container: {e}"));
        }
        if let Some(container) = &session.container_id {
            // Containers of older versions carry no session label.
            match self
                .store
                .container_users(container, Some(&session.id))
                .await
            {
                Ok(0) => match devcontainer::remove(&self.ssh, &layout.runtime, container).await {
                    Ok(()) => {
                        let _ = self.store.mark_container_removed(container).await;
                    }
                    Err(e) => problems.push(format!("removing the container: {e}")),
                },
                Ok(_) => {} // another session still uses it
                Err(e) => problems.push(format!("checking the container's users: {e}")),
            }
        }
        let git = &self.config.git;
        let (org, repo) = (&session.repo_org, &session.repo_name);
        match &session.worktree {
            Some(name) => {
                // Only the session that holds the worktree removes it (one refused because the
                // name was taken must not remove the owner's work). Sessions of older versions
                // took no lock: theirs is removed as before.
                let lock = git.worktree_lock(org, repo, name);
                match self.store.lock_holder(&lock).await {
                    Ok(Some(holder)) if holder != session.id => {}
                    Ok(holder) => {
                        match git::remove_worktree(
                            &self.ssh,
                            git,
                            org,
                            repo,
                            name,
                            self.config.git_timeout,
                        )
                        .await
                        {
                            Ok(()) if holder.is_some() => {
                                if let Err(e) = self.store.unlock(&lock, &session.id).await {
                                    problems.push(format!("releasing the worktree: {e}"));
                                }
                            }
                            Ok(()) => {}
                            Err(e) => problems.push(format!("removing the worktree: {e}")),
                        }
                    }
                    Err(e) => problems.push(format!("checking the worktree's owner: {e}")),
                }
            }
            None => {
                let lock = git.clone_lock(org, repo);
                if let Err(e) = self.store.unlock(&lock, &session.id).await {
                    problems.push(format!("releasing the clone: {e}"));
                }
            }
        }
        // Counted before the row ends, so an ended row implies a counted end.
        let kind: &'static str = session.kind.into();
        let reason_label: &'static str = reason.into();
        metrics::counter!(names::SESSIONS_ENDED_TOTAL, "reason" => reason_label).increment(1);
        metrics::gauge!(names::SESSIONS_ACTIVE, "kind" => kind).decrement(1.0);
        if let Err(e) = self
            .store
            .end_session(&session.id, reason, detail.as_deref())
            .await
        {
            error!(error = %e, session = %session.id, "cannot record the end of a session");
        }
        let mut text = format!("⏹️ Session ended ({reason})");
        if let Some(detail) = detail.as_deref().filter(|d| !d.is_empty()) {
            text.push_str(&format!(": {detail}"));
        }
        if !problems.is_empty() {
            text.push_str(&format!(
                "\n⚠️ Cleanup was incomplete: {}",
                problems.join("; ")
            ));
            warn!(session = %session.id, ?problems, "cleanup incomplete");
        }
        // The detail and the problems quote errors, which may quote the repository or the VM.
        let text = crate::chat::render::neutralize(&text);
        self.say(&session, &text).await;
        info!(session = %session.id, %reason, "session ended");
        if let Some(parent_id) = &session.parent_id {
            self.tell_parent(parent_id, &session, reason, detail.as_deref())
                .await;
        }
    }

    /// Stops every running child of an orchestrator that is ending (each told in its thread).
    /// Listing the children is retried briefly; a storage outage is reported, never taken for
    /// "no children".
    async fn stop_children(&self, parent: &Session) -> Result<(), StoreError> {
        let mut attempt = 0;
        let children = loop {
            match self.store.children(&parent.id).await {
                Ok(children) => break children,
                Err(e) if attempt + 1 >= CHILDREN_ATTEMPTS => return Err(e),
                Err(e) => {
                    warn!(error = %e, parent = %parent.id, "cannot list an orchestrator's sessions; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        };
        for child in children.into_iter().filter(|c| c.state().is_active()) {
            if let Ok(Some(claimed)) = self.store.claim_stop(&child.id).await {
                if let Some(handle) = self.handle(&child.id) {
                    let _ = handle.shutdown().await;
                }
                Box::pin(self.cleanup(
                    claimed,
                    EndReason::ParentEnded,
                    Some(format!(
                        "its orchestrator `{}` stopped",
                        short_id(&parent.id)
                    )),
                ))
                .await;
            }
        }
        Ok(())
    }

    /// Tells an orchestrator that one of its children ended (once: only the cleanup that won
    /// the claim gets here).
    async fn tell_parent(
        &self,
        parent_id: &str,
        child: &Session,
        reason: EndReason,
        detail: Option<&str>,
    ) {
        let parent = match self.store.session(parent_id).await {
            Ok(Some(parent)) => parent,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, parent = parent_id, "cannot tell an orchestrator that its session ended");
                return;
            }
        };
        if !parent.state().is_active() {
            return; // the parent is ending too
        }
        let kind: &'static str = child.kind.into();
        let why = detail.map_or_else(|| reason.to_string(), |d| format!("{reason}: {d}"));
        self.say(
            &parent,
            &format!("⏹️ {kind} `{}` ended ({why})", short_id(&child.id)),
        )
        .await;
        if let Some(handle) = self.handle(parent_id) {
            let _ = handle
                .message(super::actor::Turn::injected(format!(
                    "[SESSION_ENDED: {}] {why}",
                    child.id
                )))
                .await;
        }
    }
}
