//! A session runtime that records what the dispatcher asks of it, over real storage: `start`
//! moves the row to idle like the real runtime would, nothing else touches a VM.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use session_manager::chat::{InboundMessage, PostRef};
use session_manager::runtime::git::{clone_lock, worktree_lock};
use session_manager::session::{Delivery, SessionControl, SessionError};
use session_manager::store::{Session, SessionState, Store};

/// One request the dispatcher made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `start(session id)`.
    Start(String),
    /// `send(session id, text)`.
    Send(String, String),
    /// `stop(session id, requested by)`.
    Stop(String, String),
    /// `compact(session id)`.
    Compact(String),
    /// `clear(session id)`.
    Clear(String),
    /// `restart(session id)`.
    Restart(String),
    /// `set_permission_mode(session id, mode)`.
    Mode(String, String),
}

/// Records calls; see the module documentation.
pub struct RecordingSessions {
    store: Store,
    calls: Mutex<Vec<Call>>,
    /// The next `send` answers `Queued`.
    pub queue_next: Mutex<bool>,
    /// A `send` of exactly this text waits for a permit of `gate` (a turn that hangs).
    pub blocked_text: Mutex<Option<String>>,
    /// Released with `add_permits`.
    pub gate: tokio::sync::Semaphore,
    /// Queue positions the next `send`s answer, in order (after `queue_next`).
    pub positions: Mutex<std::collections::VecDeque<usize>>,
    /// `send` sleeps 0–2 ms (derived from the post id) to shake out ordering bugs.
    jitter: bool,
    /// `org/repo` slugs that do not exist (`repo_exists` answers false).
    missing: Mutex<HashSet<String>>,
}

impl RecordingSessions {
    /// A runtime over `store`.
    pub fn new(store: Store, jitter: bool) -> Self {
        Self {
            store,
            calls: Mutex::new(Vec::new()),
            queue_next: Mutex::new(false),
            positions: Mutex::new(std::collections::VecDeque::new()),
            blocked_text: Mutex::new(None),
            gate: tokio::sync::Semaphore::new(0),
            jitter,
            missing: Mutex::new(HashSet::new()),
        }
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    /// `org/repo` will be reported as not existing.
    pub fn forget_repo(&self, slug: &str) {
        self.missing.lock().expect("lock").insert(slug.to_owned());
    }

    fn record(&self, call: Call) {
        self.calls.lock().expect("lock").push(call);
    }
}

#[async_trait]
impl SessionControl for RecordingSessions {
    async fn repo_exists(&self, org: &str, repo: &str) -> Result<bool, SessionError> {
        Ok(!self
            .missing
            .lock()
            .expect("lock")
            .contains(&format!("{org}/{repo}")))
    }
    /// Takes the main clone's or the worktree's lock, as the runtime does when it prepares the
    /// workspace, then marks the session idle.
    async fn start(&self, session: Session, _progress: PostRef) -> Result<(), SessionError> {
        let lock = match &session.worktree {
            None => clone_lock(&session.repo_host, &session.repo_org, &session.repo_name),
            Some(name) => worktree_lock(
                &session.repo_host,
                &session.repo_org,
                &session.repo_name,
                name,
            ),
        };
        self.store
            .try_lock(&lock, &session.id)
            .await
            .map_err(|_| SessionError::StorageUnavailable)?;
        self.store
            .set_session_state(&session.id, SessionState::Idle)
            .await
            .map_err(|_| SessionError::StorageUnavailable)?;
        self.record(Call::Start(session.id));
        Ok(())
    }
    async fn send(
        &self,
        session: &Session,
        message: &InboundMessage,
    ) -> Result<Delivery, SessionError> {
        if self.jitter {
            let pause = u64::from(message.post_id.bytes().map(u32::from).sum::<u32>() % 3);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        let blocked =
            self.blocked_text.lock().expect("lock").as_deref() == Some(message.text.as_str());
        if blocked {
            if let Ok(permit) = self.gate.acquire().await {
                permit.forget();
            }
        }
        self.record(Call::Send(session.id.clone(), message.text.clone()));
        if std::mem::take(&mut *self.queue_next.lock().expect("lock")) {
            return Ok(Delivery::Queued { position: 2 });
        }
        if let Some(position) = self.positions.lock().expect("lock").pop_front() {
            return Ok(Delivery::Queued { position });
        }
        Ok(Delivery::Delivered)
    }
    async fn stop(&self, session: &Session, requested_by: &str) -> Result<(), SessionError> {
        self.record(Call::Stop(session.id.clone(), requested_by.into()));
        Ok(())
    }
    async fn compact(&self, session: &Session) -> Result<(), SessionError> {
        self.record(Call::Compact(session.id.clone()));
        Ok(())
    }
    async fn clear(&self, session: &Session) -> Result<(), SessionError> {
        self.record(Call::Clear(session.id.clone()));
        Ok(())
    }
    async fn restart(&self, session: &Session) -> Result<(), SessionError> {
        self.record(Call::Restart(session.id.clone()));
        Ok(())
    }
    async fn set_permission_mode(
        &self,
        session: &Session,
        mode: session_manager::permission::PermissionMode,
    ) -> Result<(), SessionError> {
        self.record(Call::Mode(session.id.clone(), mode.to_string()));
        Ok(())
    }
    async fn interrupt(&self, _session: &Session) -> Result<bool, SessionError> {
        Ok(false)
    }
}
