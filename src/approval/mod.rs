//! Network approvals: `[NETWORK_REQUEST: domain]` → an Approve/Deny card → the firewall alias.
//!
//! Flow, all state in storage so a bot restart loses nothing:
//! 1. A marker from an agent ([`Approvals::on_marker`]): the domain is normalised and validated
//!    ([`crate::firewall::domain`]); a rejected one is answered `[NETWORK_DENIED: …]` at once,
//!    an already approved-and-applied one `[NETWORK_APPROVED: …]`. Otherwise a pending request
//!    is opened (one per session and domain: a repeated marker posts no second card) and a card
//!    is posted as its own thread reply, each button signed ([`signing`]).
//! 2. A click (a [`CardClick`] the chat adapter parsed, [`CardClickHandler::on_click`]):
//!    signature verified in constant time, expiry checked, the clicker checked against
//!    `SM_ALLOWED_APPROVERS`, then decided atomically in storage: the first decision wins. The
//!    answer (within Mattermost's 30 s) replaces the card's buttons at once; the firewall work,
//!    telling the agent and expiring stale requests happen in the background.
//! 3. The firewall worker ([`Approvals::run_workers`]) applies approved requests one at a time
//!    (serialised in this process and, through a storage lock, across instances), retries
//!    failures with backoff, and tells the agent `[NETWORK_APPROVED: …]` once applied. The
//!    expiry worker marks unanswered requests expired and tells the agent `[NETWORK_DENIED: …]`.
//! 4. Every request, decision, expiry and firewall result goes to the audit log.

pub mod signing;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use serde_json::{json, Map, Value};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::agent::markers::Marker;
use crate::chat::{
    ActionCard, CardAction, CardClick, CardClickHandler, ChatOutbound, ClickError, ClickReply,
    PostRef,
};
use crate::firewall::domain::parse_domain;
use crate::session::{short_id, MarkerHandler, SessionRuntime};
use crate::store::{
    now_ms, ApprovalRequest, AuditEntry, DecideOutcome, Decision, LockOutcome, Session, Store,
    StoreError,
};

/// Storage lock that serialises alias changes across instances.
const ALIAS_LOCK: &str = "firewall:alias";
/// First retry delay after a firewall failure; doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Largest retry delay.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// How often the workers look for due work when nothing wakes them.
const WORKER_INTERVAL: Duration = Duration::from_secs(5);

/// A failure to change the firewall.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    /// What went wrong.
    pub message: String,
    /// Retrying will not help (validation, missing alias, credentials).
    pub permanent: bool,
}

/// What the approval flow needs from the firewall.
#[async_trait]
pub trait AliasWriter: Send + Sync + 'static {
    /// Makes sure `domain` is in the approved-domains alias and applied.
    ///
    /// # Errors
    /// [`ApplyError`].
    async fn add(&self, domain: &str) -> Result<(), ApplyError>;
}

/// Where answers to an agent go (the session runtime; a recorder in tests).
#[async_trait]
pub trait AgentMailbox: Send + Sync + 'static {
    /// Delivers `text` to the session's agent (queued during a turn). A session that is not
    /// running drops it (it has nobody to tell).
    async fn deliver(&self, session_id: &str, text: String);
}

#[async_trait]
impl AgentMailbox for SessionRuntime {
    async fn deliver(&self, session_id: &str, text: String) {
        if let Err(e) = self.inject(session_id, text).await {
            info!(session = session_id, error = %e, "cannot deliver an approval answer (the session is not running)");
        }
    }
}

#[async_trait]
impl AliasWriter for crate::firewall::opnsense::OpnsenseClient {
    async fn add(&self, domain: &str) -> Result<(), ApplyError> {
        self.ensure_domains(&[domain.to_owned()])
            .await
            .map(|_| ())
            .map_err(|e| ApplyError {
                permanent: e.is_permanent(),
                message: e.to_string(),
            })
    }
}

/// Who may decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approvers {
    /// Anyone who can click the card (a member of the channel).
    ChannelMembers,
    /// These user ids only.
    Only(HashSet<String>),
}

/// Settings of the approval flow.
#[derive(Debug, Clone)]
pub struct ApprovalConfig {
    /// `SM_CALLBACK_URL`.
    pub callback_url: String,
    /// `SM_CALLBACK_SECRET`.
    pub secret: SecretString,
    /// `SM_APPROVAL_TTL_SECS`.
    pub ttl: Duration,
    /// `SM_ALLOWED_APPROVERS`, resolved.
    pub approvers: Approvers,
    /// `SM_OPNSENSE_ALIAS`, for messages.
    pub alias: String,
    /// `SM_FIREWALL_LEASE_SECS`: how long this instance may hold the firewall lease.
    pub lease: Duration,
}

/// The approval flow. Share it in an [`Arc`].
pub struct Approvals {
    store: Store,
    chat: Arc<dyn ChatOutbound>,
    firewall: Arc<dyn AliasWriter>,
    mailbox: Arc<dyn AgentMailbox>,
    config: ApprovalConfig,
    /// Wakes the workers (a decision to apply, an expired click).
    wake: Notify,
    apply_lock: Mutex<()>,
    instance: String,
    /// Background work started by clicks (telling an agent it was denied, updating expired
    /// cards); awaited by [`Approvals::run_workers`] when it stops.
    tasks: TaskTracker,
    /// This flow itself, for the background work it starts.
    me: std::sync::Weak<Approvals>,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals").finish_non_exhaustive()
    }
}

impl Approvals {
    /// The flow over storage, a chat platform, the firewall, and the mailbox that reaches the
    /// agents (the session runtime).
    pub fn new(
        store: Store,
        chat: Arc<dyn ChatOutbound>,
        firewall: Arc<dyn AliasWriter>,
        mailbox: Arc<dyn AgentMailbox>,
        config: ApprovalConfig,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            store,
            chat,
            firewall,
            mailbox,
            config,
            wake: Notify::new(),
            apply_lock: Mutex::new(()),
            instance: uuid::Uuid::new_v4().to_string(),
            tasks: TaskTracker::new(),
            me: me.clone(),
        })
    }

    /// Runs `work` on this flow's task tracker (awaited when the workers stop).
    fn in_background<F, Fut>(&self, work: F)
    where
        F: FnOnce(Arc<Approvals>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(me) = self.me.upgrade() {
            self.tasks.spawn(work(me));
        }
    }

    async fn tell_agent(&self, session_id: &str, text: String) {
        self.mailbox.deliver(session_id, text).await;
    }

    async fn audit(
        &self,
        request: &ApprovalRequest,
        thread: Option<&str>,
        action: &str,
        user: Option<(&str, &str)>,
        outcome: &str,
        detail: Option<String>,
    ) {
        let thread = match thread {
            Some(thread) => Some(thread.to_owned()),
            None => self
                .store
                .session(&request.session_id)
                .await
                .ok()
                .flatten()
                .map(|s| s.thread_id),
        };
        let entry = AuditEntry {
            at: now_ms(),
            session_id: Some(request.session_id.clone()),
            thread_id: thread,
            domain: Some(request.domain.clone()),
            action: action.to_owned(),
            user_id: user.map(|u| u.0.to_owned()),
            user_name: user.map(|u| u.1.to_owned()),
            outcome: outcome.to_owned(),
            detail,
        };
        if let Err(e) = self.store.append_audit(&entry).await {
            error!(error = %e, "cannot write the audit log");
        }
    }

    fn card(
        &self,
        request: &ApprovalRequest,
        session: Option<&Session>,
        status: Option<String>,
    ) -> ActionCard {
        let asker = session.map_or_else(
            || format!("session `{}`", short_id(&request.session_id)),
            |s| format!("session `{}` ({})", short_id(&s.id), s.repo_slug()),
        );
        let (text, actions) = match status {
            Some(status) => (
                format!(
                    "Network access to **{}** for {asker}\n{status}",
                    request.domain
                ),
                Vec::new(),
            ),
            None => {
                let actions = [("approve", "Approve", "good"), ("deny", "Deny", "danger")]
                    .into_iter()
                    .map(|(action, label, style)| {
                        let mut context = Map::new();
                        context.insert("request_id".into(), json!(request.id));
                        context.insert("action".into(), json!(action));
                        context.insert("expires".into(), json!(request.expires_at));
                        context.insert(
                            "signature".into(),
                            json!(signing::sign(
                                &self.config.secret,
                                &request.id,
                                action,
                                request.expires_at
                            )),
                        );
                        CardAction {
                            id: action.to_owned(),
                            label: label.to_owned(),
                            style: style.to_owned(),
                            context,
                        }
                    })
                    .collect();
                (
                    format!(
                        "Claude in {asker} asks to reach **{}**.\nApproving adds it to the firewall alias `{}`.",
                        request.domain, self.config.alias
                    ),
                    actions,
                )
            }
        };
        ActionCard {
            title: "Network access request".into(),
            text,
            actions,
            callback_url: self.config.callback_url.clone(),
            color: Some("#FF8000".into()),
        }
    }

    async fn update_card(&self, request: &ApprovalRequest, status: String) {
        let Some(post_id) = &request.card_post_id else {
            return;
        };
        let session = self.store.session(&request.session_id).await.ok().flatten();
        let Some(s) = &session else { return };
        let post = PostRef {
            channel_id: s.channel_id.clone(),
            post_id: post_id.clone(),
            root_id: Some(s.thread_id.clone()),
        };
        let card = self.card(request, session.as_ref(), Some(status));
        if let Err(e) = self.chat.update_card(&post, &card).await {
            warn!(error = %e, "cannot update the approval card");
        }
    }

    /// Decides a click (see the module documentation for the order of checks).
    async fn decide(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        let field = |k: &str| click.context.get(k);
        let (Some(request_id), Some(action), Some(expires), Some(signature)) = (
            field("request_id").and_then(Value::as_str),
            field("action").and_then(Value::as_str),
            field("expires").and_then(Value::as_i64),
            field("signature").and_then(Value::as_str),
        ) else {
            return Err(ClickError::BadRequest(
                "context must carry request_id, action, expires and signature".into(),
            ));
        };
        if !signing::verify(&self.config.secret, request_id, action, expires, signature) {
            warn!(request = request_id, user = %click.user_id, "refused a callback with a bad signature");
            return Err(ClickError::Forbidden);
        }
        let decision = match action {
            "approve" => Decision::Approve,
            "deny" => Decision::Deny,
            other => return Err(ClickError::BadRequest(format!("unknown action {other:?}"))),
        };
        let now = now_ms();
        if now >= expires {
            // Recorded now; the card and the agent are told in the background.
            let expired = self.store.expire_approvals(now).await.map_err(|e| {
                error!(error = %e, "cannot record expired requests");
                ClickError::Unavailable
            })?;
            self.in_background(|me| async move {
                for request in expired {
                    me.after_expiry(&request).await;
                }
            });
            return Ok(ClickReply::Notice(
                "This request has expired; Claude was told it is denied.".into(),
            ));
        }
        if let Approvers::Only(ids) = &self.config.approvers {
            if !ids.contains(&click.user_id) {
                if let Ok(Some(request)) = self.store.approval(request_id).await {
                    self.audit(
                        &request,
                        None,
                        "refused_approver",
                        Some((&click.user_id, &click.user_name)),
                        "rejected",
                        None,
                    )
                    .await;
                }
                return Ok(ClickReply::Notice(
                    "You are not allowed to approve or deny network access (SM_ALLOWED_APPROVERS)."
                        .into(),
                ));
            }
        }
        let outcome = self
            .store
            .decide_approval(request_id, decision, &click.user_id, &click.user_name, now)
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => ClickError::NotFound,
                e => {
                    error!(error = %e, request = request_id, "cannot record a decision");
                    ClickError::Unavailable
                }
            })?;
        match outcome {
            DecideOutcome::AlreadyDecided(request) => {
                let by = request
                    .decided_by_name
                    .clone()
                    .unwrap_or_else(|| "someone".into());
                Ok(ClickReply::Notice(format!(
                    "Already decided by @{by} ({}).",
                    request.state
                )))
            }
            DecideOutcome::Decided(request) => {
                let verb = if decision == Decision::Approve {
                    "approved"
                } else {
                    "denied"
                };
                self.audit(
                    &request,
                    None,
                    verb,
                    Some((&click.user_id, &click.user_name)),
                    "ok",
                    None,
                )
                .await;
                let session = self.store.session(&request.session_id).await.ok().flatten();
                let status = match decision {
                    Decision::Approve => {
                        format!("⏳ Approving {}… (by @{})", request.domain, click.user_name)
                    }
                    Decision::Deny => {
                        format!("🚫 Denied by @{} at {}", click.user_name, clock(now))
                    }
                };
                let card = self.card(&request, session.as_ref(), Some(status));
                if decision == Decision::Deny {
                    let by = click.user_name.clone();
                    self.in_background(|me| async move {
                        me.tell_agent(
                            &request.session_id,
                            format!("[NETWORK_DENIED: {}] denied by @{by}", request.domain),
                        )
                        .await;
                    });
                } else {
                    self.wake.notify_one();
                }
                Ok(ClickReply::ReplaceCard(card))
            }
        }
    }

    async fn after_expiry(&self, request: &ApprovalRequest) {
        self.audit(request, None, "expired", None, "ok", None).await;
        self.update_card(
            request,
            format!("⌛ Expired at {} without a decision", clock(now_ms())),
        )
        .await;
        self.tell_agent(
            &request.session_id,
            format!(
                "[NETWORK_DENIED: {}] nobody decided in time (the request expired)",
                request.domain
            ),
        )
        .await;
    }

    /// Applies due approvals and expires old requests until `cancel` fires, then waits for the
    /// background work clicks started.
    pub async fn run_workers(&self, cancel: CancellationToken) {
        self.work(cancel).await;
        self.tasks.close();
        self.tasks.wait().await;
    }

    async fn work(&self, cancel: CancellationToken) {
        loop {
            match self.store.expire_approvals(now_ms()).await {
                Ok(expired) => {
                    for request in expired {
                        self.after_expiry(&request).await;
                    }
                }
                Err(e) => warn!(error = %e, "cannot expire requests"),
            }
            match self.store.approvals_due_for_firewall(now_ms()).await {
                Ok(due) => {
                    for request in due {
                        self.apply(request).await;
                    }
                }
                Err(e) => warn!(error = %e, "cannot list approvals to apply"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(WORKER_INTERVAL) => {}
            }
        }
    }

    /// Applies one approved request to the firewall, serialised with every other change.
    async fn apply(&self, request: ApprovalRequest) {
        let _in_process = self.apply_lock.lock().await;
        // Across instances: a lease in storage, taken by whoever applies and released after.
        // A holder that died blocks the others only until its lease expires.
        let lease = self.config.lease;
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        let mut waited = Duration::ZERO;
        loop {
            match self
                .store
                .try_lease(ALIAS_LOCK, &self.instance, now_ms(), lease_ms)
                .await
            {
                Ok(LockOutcome::Acquired) => break,
                Ok(LockOutcome::Held { .. }) if waited < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    waited += Duration::from_millis(200);
                }
                _ => return, // try again at the next round
            }
        }
        // The change must end within the lease, or another instance could start one too.
        let result =
            match tokio::time::timeout(lease * 4 / 5, self.firewall.add(&request.domain)).await {
                Ok(result) => result,
                Err(_) => Err(ApplyError {
                    message: format!("the firewall did not answer within {:?}", lease * 4 / 5),
                    permanent: false,
                }),
            };
        let _ = self.store.unlock(ALIAS_LOCK, &self.instance).await;
        let session = self.store.session(&request.session_id).await.ok().flatten();
        match result {
            Ok(()) => {
                if self
                    .store
                    .mark_approval_applied(&request.id, now_ms())
                    .await
                    .unwrap_or(false)
                {
                    self.audit(&request, None, "firewall_applied", None, "ok", None)
                        .await;
                    let by = request.decided_by_name.clone().unwrap_or_default();
                    self.update_card(
                        &request,
                        format!(
                            "✅ Approved by @{by} at {}; the firewall allows it now",
                            clock(now_ms())
                        ),
                    )
                    .await;
                    self.tell_agent(
                        &request.session_id,
                        format!("[NETWORK_APPROVED: {}]", request.domain),
                    )
                    .await;
                }
            }
            Err(e) if e.permanent => {
                let _ = self.store.fail_approval(&request.id, &e.message).await;
                self.audit(
                    &request,
                    None,
                    "firewall_failed",
                    None,
                    "failed",
                    Some(e.message.clone()),
                )
                .await;
                self.update_card(
                    &request,
                    format!("❌ Approved, but the firewall refused it: {}", e.message),
                )
                .await;
                self.tell_agent(
                    &request.session_id,
                    format!(
                        "[NETWORK_DENIED: {}] the firewall refused it: {}",
                        request.domain, e.message
                    ),
                )
                .await;
            }
            Err(e) => {
                let attempts = u32::try_from(request.apply_attempts).unwrap_or(u32::MAX);
                let delay = FIRST_RETRY_DELAY
                    .checked_mul(2u32.saturating_pow(attempts.min(16)))
                    .unwrap_or(MAX_RETRY_DELAY)
                    .min(MAX_RETRY_DELAY);
                let next = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
                let _ = self
                    .store
                    .record_approval_attempt_failed(&request.id, &e.message, next)
                    .await;
                self.audit(
                    &request,
                    None,
                    "firewall_failed",
                    None,
                    "retrying",
                    Some(e.message.clone()),
                )
                .await;
                if request.apply_attempts == 0 {
                    self.update_card(
                        &request,
                        format!(
                            "⚠️ Approved, but the firewall is not reachable yet ({}); retrying",
                            e.message
                        ),
                    )
                    .await;
                    if let Some(s) = &session {
                        let _ = self
                            .chat
                            .post(&s.channel_id, Some(&s.thread_id), &format!("⚠️ `{}` is approved but the firewall could not be updated yet; the bot keeps retrying and will tell Claude when it works.", request.domain))
                            .await;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl CardClickHandler for Approvals {
    async fn on_click(&self, click: CardClick) -> Result<ClickReply, ClickError> {
        self.decide(click).await
    }
}

#[async_trait]
impl MarkerHandler for Approvals {
    async fn on_marker(&self, session: &Session, marker: Marker) -> Vec<String> {
        let raw = match marker {
            Marker::NetworkRequest { domain } => domain,
            _ => return Vec::new(),
        };
        let domain = match parse_domain(&raw) {
            Ok(domain) => domain.as_str().to_owned(),
            Err(e) => {
                let _ = self
                    .chat
                    .post(&session.channel_id, Some(&session.thread_id), &format!("🚫 Claude asked for network access to `{}`, which cannot be approved: {e}", raw.replace('`', "'")))
                    .await;
                let entry = AuditEntry {
                    at: now_ms(),
                    session_id: Some(session.id.clone()),
                    thread_id: Some(session.thread_id.clone()),
                    domain: Some(raw.chars().take(255).collect()),
                    action: "requested".into(),
                    outcome: "rejected".into(),
                    detail: Some(e.to_string()),
                    ..AuditEntry::default()
                };
                let _ = self.store.append_audit(&entry).await;
                return vec![format!("[NETWORK_DENIED: {raw}] {e}")];
            }
        };
        if let Ok(Some(_)) = self.store.applied_approval_for_domain(&domain).await {
            return vec![format!("[NETWORK_APPROVED: {domain}]")];
        }
        let now = now_ms();
        let ttl = i64::try_from(self.config.ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let (request, created) = match self
            .store
            .open_approval(&session.id, &domain, now, now + ttl)
            .await
        {
            Ok(opened) => opened,
            Err(e) => {
                error!(error = %e, "cannot open an approval request");
                return vec![format!(
                    "[NETWORK_DENIED: {domain}] the request could not be recorded; ask again later"
                )];
            }
        };
        if !created {
            return Vec::new(); // a card is already waiting
        }
        self.audit(
            &request,
            Some(&session.thread_id),
            "requested",
            None,
            "ok",
            None,
        )
        .await;
        let card = self.card(&request, Some(session), None);
        match self
            .chat
            .post_card(&session.channel_id, &session.thread_id, &card)
            .await
        {
            Ok(post) => {
                if let Err(e) = self
                    .store
                    .set_approval_card(&request.id, &post.post_id)
                    .await
                {
                    warn!(error = %e, "cannot record the card");
                }
            }
            Err(e) => warn!(error = %e, "cannot post the approval card; the request will expire"),
        }
        Vec::new()
    }
}

/// `HH:MM UTC` of a Unix-ms time.
fn clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02} UTC", secs / 3600, (secs % 3600) / 60)
}
